//! How each secret of a volume is laid out: per-secret and per-key file modes, key file
//! names, the name under the mount path, and the output format (a file per key, one
//! `.env` file, one JSON document).
//!
//! The same options arrive two ways, parsed here by one function so that the node plugin
//! refuses at publish exactly what the webhook refuses at admission:
//!
//! | option      | pod annotation                     | CSI volume attribute |
//! |-------------|------------------------------------|----------------------|
//! | file modes  | `hsmsecrets.io/file-mode.<secret>` | `fileMode.<secret>`  |
//! | key names   | `hsmsecrets.io/key-names.<secret>` | `keyNames.<secret>`  |
//! | name        | `hsmsecrets.io/path.<secret>`      | `path.<secret>`      |
//! | format      | `hsmsecrets.io/format.<secret>`    | `format.<secret>`    |
//!
//! Per-key settings live in the value (`"0444,tls.key=0400"`), not in the annotation
//! name: secret and key names may both contain dots, and an annotation name has at most
//! 63 characters.

use std::collections::BTreeMap;
use std::fmt;

use super::file_mode::FileMode;

/// One of the per-secret options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LayoutOption {
    FileMode,
    KeyNames,
    Path,
    Format,
}

impl LayoutOption {
    pub const ALL: [LayoutOption; 4] = [
        LayoutOption::FileMode,
        LayoutOption::KeyNames,
        LayoutOption::Path,
        LayoutOption::Format,
    ];

    /// `hsmsecrets.io/<this><secret>`.
    pub const fn annotation_prefix(self) -> &'static str {
        match self {
            LayoutOption::FileMode => "hsmsecrets.io/file-mode.",
            LayoutOption::KeyNames => "hsmsecrets.io/key-names.",
            LayoutOption::Path => "hsmsecrets.io/path.",
            LayoutOption::Format => "hsmsecrets.io/format.",
        }
    }

    /// `<this><secret>` among the volume attributes.
    pub const fn attribute_prefix(self) -> &'static str {
        match self {
            LayoutOption::FileMode => "fileMode.",
            LayoutOption::KeyNames => "keyNames.",
            LayoutOption::Path => "path.",
            LayoutOption::Format => "format.",
        }
    }

    fn example(self) -> &'static str {
        match self {
            LayoutOption::FileMode => "\"0444\" or \"0444,tls.key=0400\"",
            LayoutOption::KeyNames => "\"private=tls.key,certificate=tls.crt\"",
            LayoutOption::Path => "\"tls\"",
            LayoutOption::Format => "\"files\", \"env\" or \"json\"",
        }
    }
}

/// Where the options were written, so an error names the field the user wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Spelling {
    /// Pod annotations, read by the injection webhook.
    #[default]
    Annotation,
    /// CSI volume attributes, read by the node plugin and the validating webhook.
    Attribute,
}

impl Spelling {
    fn prefix(self, option: LayoutOption) -> &'static str {
        match self {
            Spelling::Annotation => option.annotation_prefix(),
            Spelling::Attribute => option.attribute_prefix(),
        }
    }

    fn field(self, option: LayoutOption, secret: &str) -> String {
        match self {
            Spelling::Annotation => format!("annotation {}{secret}", option.annotation_prefix()),
            Spelling::Attribute => {
                format!("volume attribute \"{}{secret}\"", option.attribute_prefix())
            }
        }
    }
}

/// A layout option that cannot be honoured: the field, what is wrong, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {problem}; {fix}")]
pub struct LayoutError {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

/// How a secret's keys become files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// A directory with one file per key (the default).
    #[default]
    Files,
    /// One file of `NAME='value'` lines, for `set -a; . file` or an env-file loader.
    Env,
    /// One JSON object of string values.
    Json,
}

impl Format {
    fn parse(value: &str) -> Option<Self> {
        match value.trim() {
            "files" => Some(Format::Files),
            "env" => Some(Format::Env),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Files => "files",
            Format::Env => "env",
            Format::Json => "json",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The options of one secret; every field absent means today's layout: a directory named
/// after the secret, a file per key, the volume's mode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretLayout {
    pub format: Format,
    /// The name under the mount path (a directory for `files`, the file otherwise).
    pub path: Option<String>,
    /// The mode of every file of the secret, over the volume's.
    pub mode: Option<FileMode>,
    /// Modes of single keys (format `files` only), over the secret's.
    pub key_modes: BTreeMap<String, FileMode>,
    /// Key → the name it is rendered under (file name, variable name or JSON property).
    pub key_names: BTreeMap<String, String>,
}

impl SecretLayout {
    fn is_default(&self) -> bool {
        *self == SecretLayout::default()
    }

    /// The name this secret takes directly under the mount path.
    pub fn top_name(&self, secret: &str) -> String {
        match (&self.path, self.format) {
            (Some(path), _) => path.clone(),
            (None, Format::Files) => secret.to_string(),
            (None, Format::Env) => format!("{secret}.env"),
            (None, Format::Json) => format!("{secret}.json"),
        }
    }

    /// The mode of `key`'s file (or of the single file), given the volume's.
    pub fn mode_of(&self, key: Option<&str>, volume: FileMode) -> FileMode {
        key.and_then(|k| self.key_modes.get(k).copied())
            .or(self.mode)
            .unwrap_or(volume)
    }
}

/// The layout options of one volume, validated together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeLayout {
    spelling: Spelling,
    /// Only secrets with at least one option.
    secrets: BTreeMap<String, SecretLayout>,
}

impl VolumeLayout {
    /// Parses the options among `fields` (annotations or volume attributes: other keys are
    /// ignored) for a volume of `secrets`, checking each option and the volume as a whole.
    pub fn parse<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
        spelling: Spelling,
        secrets: &[&str],
    ) -> Result<Self, LayoutError> {
        let mut layout = VolumeLayout {
            spelling,
            secrets: BTreeMap::new(),
        };
        for (key, value) in fields {
            let Some((option, secret)) = LayoutOption::ALL
                .iter()
                .find_map(|o| key.strip_prefix(spelling.prefix(*o)).map(|s| (*o, s)))
            else {
                continue;
            };
            let error = |problem: String, fix: String| LayoutError {
                field: spelling.field(option, secret),
                problem,
                fix,
            };
            if !secrets.contains(&secret) {
                return Err(error(
                    format!(
                        "names {secret:?}, which is not among the volume's secrets ({})",
                        secrets.join(", ")
                    ),
                    "end the name with a secret the volume mounts, or remove the option".into(),
                ));
            }
            let entry = layout.secrets.entry(secret.to_string()).or_default();
            parse_option(entry, option, value).map_err(|(problem, fix)| error(problem, fix))?;
        }
        layout.secrets.retain(|_, l| !l.is_default());
        layout.check(secrets)?;
        Ok(layout)
    }

    /// The options of `secret` (the default layout when it has none).
    pub fn secret(&self, secret: &str) -> SecretLayout {
        self.secrets.get(secret).cloned().unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The same options as CSI volume attributes, for the volume the webhook adds.
    pub fn attributes(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (secret, layout) in &self.secrets {
            let mut put = |option: LayoutOption, value: String| {
                out.insert(format!("{}{secret}", option.attribute_prefix()), value);
            };
            if layout.format != Format::Files {
                put(LayoutOption::Format, layout.format.to_string());
            }
            if let Some(path) = &layout.path {
                put(LayoutOption::Path, path.clone());
            }
            let modes: Vec<String> = layout
                .mode
                .map(|m| m.to_string())
                .into_iter()
                .chain(layout.key_modes.iter().map(|(k, m)| format!("{k}={m}")))
                .collect();
            if !modes.is_empty() {
                put(LayoutOption::FileMode, modes.join(","));
            }
            if !layout.key_names.is_empty() {
                let names: Vec<String> = layout
                    .key_names
                    .iter()
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect();
                put(LayoutOption::KeyNames, names.join(","));
            }
        }
        out
    }

    /// Rules between options of one secret and between secrets, known without the keys.
    fn check(&self, secrets: &[&str]) -> Result<(), LayoutError> {
        for (secret, layout) in &self.secrets {
            if layout.format != Format::Files
                && let Some(key) = layout.key_modes.keys().next()
            {
                return Err(LayoutError {
                    field: self.spelling.field(LayoutOption::FileMode, secret),
                    problem: format!(
                        "sets a mode for key {key:?}, but format {} renders the secret as one \
                         file",
                        layout.format
                    ),
                    fix: "give the secret one mode (e.g. \"0400\"), or use format files".into(),
                });
            }
            let mut rendered: BTreeMap<&str, &str> = BTreeMap::new();
            for (key, name) in &layout.key_names {
                check_rendered_name(layout.format, name).map_err(|problem| LayoutError {
                    field: self.spelling.field(LayoutOption::KeyNames, secret),
                    problem: format!("renames key {key:?} to {name:?}, which {problem}"),
                    fix: rendered_name_fix(layout.format).into(),
                })?;
                if let Some(other) = rendered.insert(name, key) {
                    return Err(LayoutError {
                        field: self.spelling.field(LayoutOption::KeyNames, secret),
                        problem: format!("renders keys {other:?} and {key:?} both as {name:?}"),
                        fix: "give each key its own name".into(),
                    });
                }
            }
        }
        let mut tops: BTreeMap<String, &str> = BTreeMap::new();
        for secret in secrets {
            let top = self.secret(secret).top_name(secret);
            if let Some(other) = tops.insert(top.clone(), secret) {
                let culprit = if self.secrets.contains_key(*secret) {
                    secret
                } else {
                    other
                };
                return Err(LayoutError {
                    field: self.spelling.field(LayoutOption::Path, culprit),
                    problem: format!(
                        "puts secrets {other:?} and {secret:?} both at {top:?} under the mount \
                         path"
                    ),
                    fix: "give each secret its own path".into(),
                });
            }
        }
        Ok(())
    }

    /// What `secret`'s keys are rendered as, in key order: `(key, name)`. Refuses a rename
    /// of a key the secret does not hold, two keys rendered under one name, and (format
    /// env) a key that is no variable name. Called with the keys the token holds at
    /// publish, and with the HSMSecret's `status.keys` at admission.
    pub fn rendered_names<'k>(
        &self,
        secret: &str,
        keys: &[&'k str],
    ) -> Result<Vec<(&'k str, String)>, LayoutError> {
        let layout = self.secrets.get(secret);
        let format = layout.map(|l| l.format).unwrap_or_default();
        let field = |option| self.spelling.field(option, secret);
        if let Some(layout) = layout {
            let unknown = layout
                .key_names
                .keys()
                .map(|k| (LayoutOption::KeyNames, k))
                .chain(layout.key_modes.keys().map(|k| (LayoutOption::FileMode, k)))
                .find(|(_, k)| !keys.contains(&k.as_str()));
            if let Some((option, key)) = unknown {
                return Err(LayoutError {
                    field: field(option),
                    problem: format!(
                        "names key {key:?}, which HSMSecret {secret:?} does not hold (keys: {})",
                        keys.join(", ")
                    ),
                    fix: "use one of the secret's keys, or remove the entry".into(),
                });
            }
        }
        let mut names = Vec::with_capacity(keys.len());
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for key in keys {
            let renamed = layout.and_then(|l| l.key_names.get(*key));
            let name = renamed.cloned().unwrap_or_else(|| key.to_string());
            if renamed.is_none() {
                check_rendered_name(format, &name).map_err(|problem| LayoutError {
                    field: field(LayoutOption::KeyNames),
                    problem: format!(
                        "is needed: HSMSecret {secret:?} holds key {key:?}, which {problem}"
                    ),
                    fix: format!(
                        "rename it, e.g. {}{secret}: \"{key}={}\"",
                        self.spelling.prefix(LayoutOption::KeyNames),
                        suggested_variable(key)
                    ),
                })?;
            }
            if let Some(other) = seen.insert(name.clone(), key) {
                return Err(LayoutError {
                    field: field(LayoutOption::KeyNames),
                    problem: format!(
                        "renders keys {other:?} and {key:?} of HSMSecret {secret:?} both as \
                         {name:?}"
                    ),
                    fix: "give each key its own name".into(),
                });
            }
            names.push((*key, name));
        }
        Ok(names)
    }
}

fn parse_option(
    layout: &mut SecretLayout,
    option: LayoutOption,
    value: &str,
) -> Result<(), (String, String)> {
    let example = || format!("write it like {}", option.example());
    match option {
        LayoutOption::Format => {
            layout.format = Format::parse(value)
                .ok_or_else(|| (format!("is {value:?}, not a known format"), example()))?;
        }
        LayoutOption::Path => {
            let path = value.trim();
            check_file_name(path).map_err(|problem| {
                (
                    format!("is {path:?}, which {problem}"),
                    "use one name (letters, digits, '-', '_', '.'), no '/'".into(),
                )
            })?;
            layout.path = Some(path.to_string());
        }
        LayoutOption::FileMode => {
            for entry in entries(value).map_err(|p| (p, example()))? {
                match entry.split_once('=') {
                    None => {
                        let mode =
                            FileMode::parse(entry).map_err(|e| (mode_problem(e), example()))?;
                        if layout.mode.replace(mode).is_some() {
                            return Err(("gives the secret's mode twice".into(), example()));
                        }
                    }
                    Some((key, mode)) => {
                        let key = key.trim();
                        check_key(key).map_err(|p| (p, example()))?;
                        let mode = FileMode::parse(mode).map_err(|e| {
                            (format!("for key {key:?}: {}", mode_problem(e)), example())
                        })?;
                        if layout.key_modes.insert(key.to_string(), mode).is_some() {
                            return Err((format!("gives key {key:?} twice"), example()));
                        }
                    }
                }
            }
        }
        LayoutOption::KeyNames => {
            for entry in entries(value).map_err(|p| (p, example()))? {
                let Some((key, name)) = entry.split_once('=') else {
                    return Err((format!("has entry {entry:?} without '='"), example()));
                };
                let (key, name) = (key.trim(), name.trim());
                check_key(key).map_err(|p| (p, example()))?;
                if layout
                    .key_names
                    .insert(key.to_string(), name.to_string())
                    .is_some()
                {
                    return Err((format!("renames key {key:?} twice"), example()));
                }
            }
        }
    }
    Ok(())
}

/// Comma-separated, non-empty entries.
fn entries(value: &str) -> Result<Vec<&str>, String> {
    if value.trim().is_empty() {
        return Err("is empty".into());
    }
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    if entries.iter().any(|e| e.is_empty()) {
        return Err(format!("{value:?} has an empty entry"));
    }
    Ok(entries)
}

fn mode_problem(error: super::InjectError) -> String {
    match error {
        super::InjectError::InvalidFileMode { value, reason } => format!("{value:?} {reason}"),
        other => other.to_string(),
    }
}

fn check_key(key: &str) -> Result<(), String> {
    crate::hsm::validate_key(key).map_err(|e| format!("names key {key:?}, which is invalid: {e}"))
}

/// A single path component the volume writer accepts and kubelet would: a Kubernetes
/// Secret key name that is not one of the writer's own `..` names.
fn check_file_name(name: &str) -> Result<(), String> {
    crate::hsm::validate_key(name).map_err(|e| match e {
        crate::hsm::StoreError::InvalidName { why, .. } => why,
        other => other.to_string(),
    })
}

/// POSIX shells take `[A-Za-z_][A-Za-z0-9_]*`; anything else is lost or rejected by
/// `set -a; . file` and most env-file loaders.
pub fn check_variable_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => Err("is empty".into()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            Err("does not start with a letter or '_', as an environment variable must".into())
        }
        _ => match chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
            Some(c) => Err(format!(
                "contains {c:?}, which an environment variable name cannot hold"
            )),
            None if name.len() > 253 => Err("is longer than 253 characters".into()),
            None => Ok(()),
        },
    }
}

fn check_rendered_name(format: Format, name: &str) -> Result<(), String> {
    match format {
        Format::Files | Format::Json => check_file_name(name),
        Format::Env => check_variable_name(name),
    }
}

fn rendered_name_fix(format: Format) -> &'static str {
    match format {
        Format::Files | Format::Json => {
            "use letters, digits, '-', '_' and '.', not starting with \"..\""
        }
        Format::Env => "use letters, digits and '_', not starting with a digit (e.g. DB_PASSWORD)",
    }
}

/// `tls.key` → `TLS_KEY`, for the fix of an error.
fn suggested_variable(key: &str) -> String {
    let mut name: String = key
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() {
            true => c.to_ascii_uppercase(),
            false => '_',
        })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

/// Whether `key` is a per-secret layout annotation (the webhook's known annotations are
/// open to these).
pub fn is_layout_annotation(key: &str) -> bool {
    LayoutOption::ALL
        .iter()
        .any(|o| key.starts_with(o.annotation_prefix()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(fields: &[(&str, &str)], secrets: &[&str]) -> Result<VolumeLayout, LayoutError> {
        VolumeLayout::parse(fields.iter().copied(), Spelling::Annotation, secrets)
    }

    #[test]
    fn options_parse_and_round_trip_through_volume_attributes() {
        let layout = parse(
            &[
                ("hsmsecrets.io/file-mode.web-tls", "0444, tls.key=0400"),
                ("hsmsecrets.io/key-names.web-tls", "private=tls.key"),
                ("hsmsecrets.io/path.web-tls", "tls"),
                ("hsmsecrets.io/format.db.main", "env"),
                ("hsmsecrets.io/file-mode", "0440"),
            ],
            &["web-tls", "db.main"],
        )
        .unwrap();
        let tls = layout.secret("web-tls");
        assert_eq!(tls.format, Format::Files);
        assert_eq!(tls.top_name("web-tls"), "tls");
        assert_eq!(
            tls.mode_of(Some("tls.key"), FileMode::DEFAULT).bits(),
            0o400
        );
        assert_eq!(
            tls.mode_of(Some("tls.crt"), FileMode::DEFAULT).bits(),
            0o444
        );
        assert_eq!(layout.secret("db.main").top_name("db.main"), "db.main.env");
        let attributes = layout.attributes();
        assert_eq!(attributes["fileMode.web-tls"], "0444,tls.key=0400");
        assert_eq!(attributes["format.db.main"], "env");
        let again = VolumeLayout::parse(
            attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            Spelling::Attribute,
            &["web-tls", "db.main"],
        )
        .unwrap();
        assert_eq!(again.secrets, layout.secrets);
    }

    #[test]
    fn bad_options_name_the_field_and_the_fix() {
        type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let rows: &[Row] = &[
            (
                &[("hsmsecrets.io/format.db", "yaml")],
                "format.db",
                "\"env\"",
            ),
            (
                &[("hsmsecrets.io/format.other", "env")],
                "format.other",
                "among the volume's",
            ),
            (&[("hsmsecrets.io/path.db", "a/b")], "path.db", "no '/'"),
            (&[("hsmsecrets.io/path.db", "..data")], "path.db", "'..'"),
            (
                &[("hsmsecrets.io/file-mode.db", "0644")],
                "file-mode.db",
                "0444",
            ),
            (
                &[("hsmsecrets.io/file-mode.db", "0400,0444")],
                "file-mode.db",
                "twice",
            ),
            (
                &[("hsmsecrets.io/file-mode.db", "a=0400,a=0444")],
                "file-mode.db",
                "twice",
            ),
            (
                &[("hsmsecrets.io/file-mode.db", "a=0600")],
                "file-mode.db",
                "read bits",
            ),
            (
                &[("hsmsecrets.io/file-mode.db", "0400,")],
                "file-mode.db",
                "empty entry",
            ),
            (
                &[("hsmsecrets.io/key-names.db", "a")],
                "key-names.db",
                "without '='",
            ),
            (
                &[("hsmsecrets.io/key-names.db", "a=x,b=x")],
                "key-names.db",
                "own name",
            ),
            (
                &[("hsmsecrets.io/key-names.db", "a=x/y")],
                "key-names.db",
                "'/'",
            ),
            (
                &[
                    ("hsmsecrets.io/format.db", "env"),
                    ("hsmsecrets.io/key-names.db", "a=tls.key"),
                ],
                "key-names.db",
                "DB_PASSWORD",
            ),
            (
                &[
                    ("hsmsecrets.io/format.db", "json"),
                    ("hsmsecrets.io/file-mode.db", "a=0400"),
                ],
                "file-mode.db",
                "one mode",
            ),
            (&[("hsmsecrets.io/path.db", "api")], "path.db", "own path"),
            (
                &[
                    ("hsmsecrets.io/format.api", "env"),
                    ("hsmsecrets.io/path.db", "api.env"),
                ],
                "path",
                "own path",
            ),
        ];
        for (fields, field, hint) in rows {
            let error = parse(fields, &["db", "api"]).expect_err(&format!("{fields:?}"));
            let message = error.to_string();
            assert!(error.field.contains(field), "{fields:?}: {message}");
            assert!(message.contains(hint), "{fields:?}: {message}");
        }
    }

    #[test]
    fn rendered_names_refuse_collisions_unknown_keys_and_bad_variables() {
        let layout = parse(
            &[
                ("hsmsecrets.io/format.db", "env"),
                ("hsmsecrets.io/key-names.db", "password=DB_PASSWORD"),
                ("hsmsecrets.io/key-names.tls", "private=tls.key"),
            ],
            &["db", "tls"],
        )
        .unwrap();
        let names = layout.rendered_names("db", &["password", "USER"]).unwrap();
        assert_eq!(
            names,
            [
                ("password", "DB_PASSWORD".to_string()),
                ("USER", "USER".into())
            ]
        );
        let error = layout
            .rendered_names("db", &["password", "user.name"])
            .unwrap_err();
        assert!(error.to_string().contains("user.name=USER_NAME"), "{error}");
        let error = layout.rendered_names("db", &["USER"]).unwrap_err();
        assert!(error.to_string().contains("does not hold"), "{error}");
        let error = layout
            .rendered_names("tls", &["private", "tls.key"])
            .unwrap_err();
        assert!(error.to_string().contains("both as \"tls.key\""), "{error}");
        assert!(
            layout.rendered_names("other", &["x.y"]).is_ok(),
            "files take any key"
        );
    }

    #[test]
    fn variable_names() {
        for good in ["A", "_a", "DB_PASSWORD", "x1"] {
            assert!(check_variable_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "a-b", "a.b", "a b", "é"] {
            assert!(check_variable_name(bad).is_err(), "{bad}");
        }
        assert_eq!(suggested_variable("tls.key"), "TLS_KEY");
        assert_eq!(suggested_variable("1st"), "_1ST");
    }
}
