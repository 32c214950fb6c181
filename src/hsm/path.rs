//! Names: where a secret lives (`<namespace>/<name>`) and what its keys may be called.

use std::fmt;

use super::StoreError;

/// Longest key name accepted (a file name on the pod side).
pub const MAX_KEY_LEN: usize = 253;

/// Address of a secret in a token: `<namespace>/<name>`. Both parts are validated as
/// Kubernetes names so that one namespace can never spell a path into another.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretPath {
    namespace: String,
    name: String,
}

impl SecretPath {
    pub fn new(namespace: &str, name: &str) -> Result<Self, StoreError> {
        validate_dns_label(namespace, 63).map_err(|why| StoreError::InvalidName {
            what: "namespace",
            name: namespace.into(),
            why,
        })?;
        validate_dns_subdomain(name).map_err(|why| StoreError::InvalidName {
            what: "secret name",
            name: name.into(),
            why,
        })?;
        Ok(Self {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::str::FromStr for SecretPath {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s.split_once('/') {
            Some((ns, name)) => Self::new(ns, name),
            None => Err(StoreError::InvalidName {
                what: "secret path",
                name: s.into(),
                why: "expected <namespace>/<name>".into(),
            }),
        }
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Key names follow Kubernetes Secret keys (`[-._a-zA-Z0-9]+`): they become file names
/// in the pod, so no `/`, no NUL, not `.` or `..`, bounded length.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad_char = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
    let why = if key.is_empty() {
        Some("must not be empty".to_string())
    } else if key.len() > MAX_KEY_LEN {
        Some(format!("must be at most {MAX_KEY_LEN} characters"))
    } else if key == "." || key == ".." {
        Some("must not be '.' or '..'".to_string())
    } else if key.starts_with("..") {
        Some("must not start with '..' (reserved for the volume's own files)".to_string())
    } else {
        bad_char.map(|c| format!("contains {c:?}; use only letters, digits, '-', '_' and '.'"))
    };
    match why {
        Some(why) => Err(StoreError::InvalidName {
            what: "key",
            name: key.escape_debug().to_string(),
            why,
        }),
        None => Ok(()),
    }
}

fn validate_dns_label(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("must be 1 to {max} characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("use only lower-case letters, digits and '-'".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn validate_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    for part in s.split('.') {
        validate_dns_label(part, 63).map_err(|why| format!("{why} (each '.'-separated part)"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_validated() {
        assert!(SecretPath::new("shop", "db").is_ok());
        assert!(SecretPath::new("shop", "db.prod-1").is_ok());
        for (ns, name) in [
            ("", "db"),
            ("Shop", "db"),
            ("shop", ""),
            ("shop", "a/b"),
            ("shop", ".."),
            ("shop", "db\0"),
            ("-x", "db"),
            ("shop", "a..b"),
        ] {
            let err = SecretPath::new(ns, name).expect_err(&format!("{ns}/{name}"));
            assert!(matches!(err, StoreError::InvalidName { .. }), "{err}");
        }
        let err = "nopath".parse::<SecretPath>().expect_err("no slash");
        assert!(err.to_string().contains("<namespace>/<name>"));
    }

    #[test]
    fn keys_are_validated() {
        for ok in ["password", "tls.crt", "a_b-c", ".hidden"] {
            validate_key(ok).expect(ok);
        }
        let long = "k".repeat(MAX_KEY_LEN + 1);
        for bad in ["", ".", "..", "..data", "a/b", "a\0b", "é", long.as_str()] {
            let err = validate_key(bad).expect_err(bad);
            assert!(err.to_string().contains("key"), "{err}");
        }
    }
}
