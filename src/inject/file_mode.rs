//! `hsmsecrets.io/file-mode`: the permission of the secret files.

use std::fmt;

use super::error::InjectError;

/// Permission bits of the secret files: read bits only, since the volume is a
/// read-only tmpfs and a write or execute bit on a secret is a mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMode(u32);

impl FileMode {
    /// Owner and group may read (`0440`), as the DESIGN's example shows.
    pub const DEFAULT: FileMode = FileMode(0o440);

    const READ_BITS: u32 = 0o444;

    pub fn bits(self) -> u32 {
        self.0
    }

    /// Parse octal digits (`0440`, `440`, `0400`).
    pub fn parse(value: &str) -> Result<Self, InjectError> {
        let invalid = |reason: String| InjectError::InvalidFileMode {
            value: value.to_owned(),
            reason,
        };
        let digits = value.trim();
        if digits.is_empty() {
            return Err(invalid(
                "is empty; write an octal mode such as \"0440\", or remove the annotation for \
                 the default 0440"
                    .into(),
            ));
        }
        if let Some(bad) = digits.chars().find(|c| !('0'..='7').contains(c)) {
            return Err(invalid(format!(
                "is not an octal mode ({bad:?} is not a digit 0-7); write it like \"0440\""
            )));
        }
        // Longer strings only matter when they are leading zeros.
        let significant = digits.trim_start_matches('0');
        let bits = if significant.len() > 4 {
            u32::MAX
        } else {
            u32::from_str_radix(digits, 8).map_err(|error| invalid(error.to_string()))?
        };
        if bits > 0o777 {
            return Err(invalid(
                "is above 0777: setuid, setgid and sticky bits make no sense on secret files; \
                 use read bits only, e.g. \"0440\""
                    .into(),
            ));
        }
        if bits & !Self::READ_BITS != 0 {
            let suggestion = match bits & Self::READ_BITS {
                0 => Self::DEFAULT.0,
                read => read,
            };
            return Err(invalid(format!(
                "grants write or execute permission ({:04o}); the secrets volume is read-only, \
                 so use read bits only: \"{suggestion:04o}\"",
                bits & !Self::READ_BITS,
            )));
        }
        if bits == 0 {
            return Err(invalid(
                "lets nobody read the files; use e.g. \"0400\" (owner), \"0440\" (owner and \
                 group) or \"0444\" (everyone)"
                    .into(),
            ));
        }
        Ok(FileMode(bits))
    }
}

impl Default for FileMode {
    fn default() -> Self {
        FileMode::DEFAULT
    }
}

/// Four octal digits, as the CSI volume attribute carries it (`0440`).
impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_modes_are_accepted_and_printed_with_four_digits() {
        for (input, printed) in [
            ("0440", "0440"),
            ("440", "0440"),
            ("0400", "0400"),
            ("0444", "0444"),
            ("004", "0004"),
            ("000440", "0440"),
            (" 0440 ", "0440"),
        ] {
            let mode = FileMode::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(mode.to_string(), printed, "{input}");
        }
    }

    #[test]
    fn a_write_bit_suggests_the_read_only_mode() {
        let error = FileMode::parse("0644").expect_err("write bit").to_string();
        assert!(error.contains("\"0444\""), "{error}");
        let error = FileMode::parse("0222").expect_err("write only").to_string();
        assert!(error.contains("\"0440\""), "{error}");
    }
}
