//! A secret's keys rendered as the files of a volume, in the format and with the names
//! and modes its layout asks for (pure: values in, files out). Errors name keys, never
//! values.

use hsm_secrets_csi::PayloadFile;

use super::VolumeError;
use crate::hsm::{SecretData, validate_key};
use crate::inject::{FileMode, Format, VolumeLayout};

/// The files of `secret` (read as `data`) under `layout`, with `volume_mode` where the
/// layout sets none.
pub fn render_secret(
    secret: &str,
    data: &SecretData,
    layout: &VolumeLayout,
    volume_mode: FileMode,
) -> Result<Vec<PayloadFile>, VolumeError> {
    let keys: Vec<&str> = data.keys().collect();
    // The store validates keys on write; checked again because they become file names.
    for key in &keys {
        validate_key(key).map_err(|source| VolumeError::Unrenderable {
            secret: secret.to_string(),
            key: key.to_string(),
            problem: source.to_string(),
            fix: "rewrite the secret with valid key names (kubectl hsm import)",
        })?;
    }
    let names = layout.rendered_names(secret, &keys)?;
    let options = layout.secret(secret);
    let top = options.top_name(secret);
    let value = |key: &str| data.get(key).unwrap_or_default();
    match options.format {
        Format::Files => Ok(names
            .into_iter()
            .map(|(key, name)| {
                PayloadFile::new(
                    format!("{top}/{name}"),
                    value(key).to_vec(),
                    options.mode_of(Some(key), volume_mode).bits(),
                )
            })
            .collect()),
        Format::Env => {
            let mut out = Vec::new();
            for (key, name) in &names {
                let bytes = value(key);
                if bytes.contains(&0) {
                    return Err(unrenderable(secret, key, "holds a NUL byte", Format::Env));
                }
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                shell_quote(bytes, &mut out);
                out.push(b'\n');
            }
            Ok(vec![PayloadFile::new(
                top,
                out,
                options.mode_of(None, volume_mode).bits(),
            )])
        }
        Format::Json => {
            let mut object = serde_json::Map::new();
            for (key, name) in &names {
                let text = std::str::from_utf8(value(key))
                    .map_err(|_| unrenderable(secret, key, "is not UTF-8 text", Format::Json))?;
                object.insert(name.clone(), text.into());
            }
            // A map of strings always serializes; the fallback keeps the path panic-free.
            let mut out = serde_json::to_vec(&object).unwrap_or_default();
            out.push(b'\n');
            Ok(vec![PayloadFile::new(
                top,
                out,
                options.mode_of(None, volume_mode).bits(),
            )])
        }
    }
}

fn unrenderable(secret: &str, key: &str, problem: &str, format: Format) -> VolumeError {
    VolumeError::Unrenderable {
        secret: secret.to_string(),
        key: key.to_string(),
        problem: format!("{problem}, which format {format} cannot hold"),
        fix: "use format files for this secret (hsmsecrets.io/format.<secret>: \"files\")",
    }
}

/// POSIX single quotes: every byte literal, a `'` written as `'\''`. `set -a; . file`
/// restores the exact value, newlines included.
fn shell_quote(value: &[u8], out: &mut Vec<u8>) {
    out.push(b'\'');
    for &byte in value {
        match byte {
            b'\'' => out.extend_from_slice(b"'\\''"),
            other => out.push(other),
        }
    }
    out.push(b'\'');
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::inject::Spelling;

    fn data(pairs: &[(&str, &[u8])]) -> SecretData {
        let mut data = SecretData::new();
        for (k, v) in pairs {
            data.insert(k, v.to_vec()).unwrap();
        }
        data
    }

    fn layout(fields: &[(&str, &str)], secrets: &[&str]) -> VolumeLayout {
        VolumeLayout::parse(fields.iter().copied(), Spelling::Attribute, secrets).unwrap()
    }

    #[test]
    fn files_take_their_names_and_modes() {
        let layout = layout(
            &[
                ("fileMode.tls", "0444,private=0400"),
                ("keyNames.tls", "private=tls.key,certificate=tls.crt"),
                ("path.tls", "web"),
            ],
            &["tls"],
        );
        let files = render_secret(
            "tls",
            &data(&[("private", b"k"), ("certificate", b"c"), ("ca.crt", b"a")]),
            &layout,
            FileMode::DEFAULT,
        )
        .unwrap();
        let got: Vec<_> = files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
        assert_eq!(
            got,
            [
                ("web/ca.crt", 0o444),
                ("web/tls.crt", 0o444),
                ("web/tls.key", 0o400)
            ]
        );
    }

    #[test]
    fn env_values_are_single_quoted_for_the_shell() {
        let layout = layout(
            &[
                ("format.db", "env"),
                ("keyNames.db", "pass.word=DB_PASSWORD"),
            ],
            &["db"],
        );
        let files = render_secret(
            "db",
            &data(&[("pass.word", b"it's $HOME\nline2"), ("USER", b"app")]),
            &layout,
            FileMode::DEFAULT,
        )
        .unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "db.env");
        assert_eq!(files[0].mode, 0o440);
        assert_eq!(
            String::from_utf8(files[0].contents.clone()).unwrap(),
            "USER='app'\nDB_PASSWORD='it'\\''s $HOME\nline2'\n"
        );
        let error = render_secret(
            "db",
            &data(&[("USER", b"a\0b"), ("pass.word", b"p")]),
            &layout,
            FileMode::DEFAULT,
        );
        let message = error.unwrap_err().to_string();
        assert!(
            message.contains("NUL") && !message.contains("a\0b"),
            "{message}"
        );
    }

    #[test]
    fn json_is_one_object_of_text_values() {
        let layout = layout(&[("format.db", "json"), ("fileMode.db", "0400")], &["db"]);
        let files = render_secret(
            "db",
            &data(&[("user", b"app"), ("pass", b"p\"w")]),
            &layout,
            FileMode::DEFAULT,
        )
        .unwrap();
        assert_eq!(files[0].path, "db.json");
        assert_eq!(files[0].mode, 0o400);
        let parsed: serde_json::Value = serde_json::from_slice(&files[0].contents).unwrap();
        assert_eq!(parsed, serde_json::json!({"user": "app", "pass": "p\"w"}));
        let error = render_secret(
            "db",
            &data(&[("bin", &[0xff, 0xfe])]),
            &layout,
            FileMode::DEFAULT,
        )
        .unwrap_err();
        assert_eq!(error.kind(), "unrenderable_value");
        assert!(
            error.to_string().contains("\"bin\" is not UTF-8"),
            "{error}"
        );
    }
}
