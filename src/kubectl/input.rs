//! Where key values come from: `--from-literal`, `--from-file`, `--from-env-file`, or a
//! hidden terminal prompt. Values live in zeroizing buffers, never appear in `Debug`,
//! and no error message quotes one.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};

use clap::Args;
use zeroize::Zeroizing;

use super::{KubectlError, Term};
use crate::hsm::validate_key;

/// Largest total a Kubernetes Secret can carry (the import Secret must fit).
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

#[derive(Args, Debug, Clone, Default)]
pub struct KeySourceArgs {
    /// A key and its value (repeatable). The value shows in the process list and shell
    /// history: prefer --from-file or the prompt for real secrets.
    #[arg(long = "from-literal", value_name = "KEY=VALUE")]
    pub from_literal: Vec<String>,
    /// A file whose content is the value (repeatable); the key defaults to the file name.
    #[arg(long = "from-file", value_name = "[KEY=]PATH")]
    pub from_file: Vec<String>,
    /// A file of KEY=VALUE lines (# comments, 'single' or "double" quotes, optional `export`).
    #[arg(long = "from-env-file", value_name = "PATH")]
    pub from_env_file: Vec<PathBuf>,
}

impl KeySourceArgs {
    fn is_empty(&self) -> bool {
        self.from_literal.is_empty() && self.from_file.is_empty() && self.from_env_file.is_empty()
    }
}

/// Secret bytes: zeroed on drop, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<{} bytes>)", self.0.len())
    }
}

/// The keys to write, each with where it came from (for duplicate errors).
#[derive(Debug, Default)]
pub struct KeySet {
    entries: BTreeMap<String, (SecretValue, String)>,
}

impl KeySet {
    /// Adds a key; a key given twice is an error naming the key and both sources.
    pub fn insert(
        &mut self,
        key: &str,
        value: SecretValue,
        origin: impl Into<String>,
    ) -> Result<(), KubectlError> {
        let origin = origin.into();
        validate_key(key).map_err(|e| KubectlError::usage(format!("{origin}: {e}")))?;
        if let Some((_, first)) = self.entries.get(key) {
            return Err(KubectlError::usage(format!(
                "key {key:?} is given twice ({first} and {origin}); give each key once"
            )));
        }
        self.entries.insert(key.to_string(), (value, origin));
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretValue)> {
        self.entries.iter().map(|(k, (v, _))| (k.as_str(), v))
    }

    fn total_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(k, (v, _))| k.len() + v.expose().len())
            .sum()
    }

    /// Reads every source in flag order (literals, files, env files), or prompts when
    /// none is given and a terminal is attached.
    pub fn collect(
        args: &KeySourceArgs,
        prompt: &mut dyn Prompt,
        term: &mut Term<'_>,
    ) -> Result<Self, KubectlError> {
        let mut set = KeySet::default();
        for literal in &args.from_literal {
            let (key, value) = parse_literal(literal)?;
            set.insert(
                key,
                SecretValue::new(value.as_bytes().to_vec()),
                "--from-literal",
            )?;
        }
        for spec in &args.from_file {
            let (key, path) = parse_file_spec(spec)?;
            let bytes = std::fs::read(&path).map_err(|e| KubectlError::Input {
                what: format!("--from-file {}", path.display()),
                detail: e.to_string(),
            })?;
            set.insert(
                &key,
                SecretValue::new(bytes),
                format!("--from-file {}", path.display()),
            )?;
        }
        for path in &args.from_env_file {
            let text =
                Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|e| KubectlError::Input {
                        what: format!("--from-env-file {}", path.display()),
                        detail: e.to_string(),
                    })?,
                );
            for entry in parse_env_file(&text, path)? {
                set.insert(
                    &entry.key,
                    entry.value,
                    format!("{}:{}", path.display(), entry.line),
                )?;
            }
        }
        if args.is_empty() {
            if !prompt.available() {
                return Err(KubectlError::usage(
                    "no keys given: use --from-literal KEY=VALUE, --from-file [KEY=]PATH or \
                     --from-env-file PATH, or run in a terminal to type values",
                ));
            }
            for (key, value) in prompt.read_entries(term)? {
                set.insert(&key, value, "the prompt")?;
            }
        }
        if set.is_empty() {
            return Err(KubectlError::usage(
                "no keys given (the env file or the prompt held none)",
            ));
        }
        if set.total_bytes() > MAX_SECRET_BYTES {
            return Err(KubectlError::usage(format!(
                "the keys total {} bytes; a Kubernetes Secret (the import path) holds at most {MAX_SECRET_BYTES}",
                set.total_bytes()
            )));
        }
        Ok(set)
    }
}

/// `KEY=VALUE`; the error never quotes the argument (it may be all value).
pub fn parse_literal(arg: &str) -> Result<(&str, &str), KubectlError> {
    arg.split_once('=').ok_or_else(|| {
        KubectlError::usage(
            "--from-literal needs KEY=VALUE, and one argument has no '=' (not shown: it may \
             be a secret value)",
        )
    })
}

/// `[KEY=]PATH`; the key defaults to the file name.
pub fn parse_file_spec(spec: &str) -> Result<(String, PathBuf), KubectlError> {
    let (key, path) = match spec.split_once('=') {
        Some((key, path)) => (key.to_string(), PathBuf::from(path)),
        None => {
            let path = PathBuf::from(spec);
            let key = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    KubectlError::usage(format!(
                        "--from-file {spec:?} names no file; use --from-file KEY=PATH"
                    ))
                })?;
            (key, path)
        }
    };
    if key.is_empty() {
        return Err(KubectlError::usage(format!(
            "--from-file {spec:?} has an empty key before '='; use --from-file KEY=PATH"
        )));
    }
    if path.as_os_str().is_empty() {
        return Err(KubectlError::usage(format!(
            "--from-file {spec:?} has no path after '='"
        )));
    }
    Ok((key, path))
}

/// One `KEY=VALUE` of an env file.
#[derive(Debug)]
pub struct EnvEntry {
    pub key: String,
    pub value: SecretValue,
    /// 1-based line number, for messages.
    pub line: usize,
}

/// Parses an env file: blank lines and `#` comments are skipped, `export ` is allowed,
/// `"double"` quotes take `\n \t \\ \"` escapes, `'single'` quotes are literal, unquoted
/// values are trimmed. Errors name the file and line, never the value.
pub fn parse_env_file(text: &str, path: &Path) -> Result<Vec<EnvEntry>, KubectlError> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let at = || format!("{}:{line_no}", path.display());
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (key, rest) = line.split_once('=').ok_or_else(|| KubectlError::Input {
            what: at(),
            detail: "expected KEY=VALUE".into(),
        })?;
        let key = key.trim();
        let value = parse_env_value(rest.trim()).map_err(|why| KubectlError::Input {
            what: at(),
            detail: format!("{why} in the value of {key:?}"),
        })?;
        out.push(EnvEntry {
            key: key.to_string(),
            value: SecretValue::new(value.as_bytes().to_vec()),
            line: line_no,
        });
    }
    Ok(out)
}

fn parse_env_value(v: &str) -> Result<Zeroizing<String>, &'static str> {
    let mut out = Zeroizing::new(String::new());
    if let Some(body) = v.strip_prefix('\'') {
        let end = body.find('\'').ok_or("unterminated single quote")?;
        if !trailing_is_comment(&body[end + 1..]) {
            return Err("text after the closing quote");
        }
        out.push_str(&body[..end]);
        return Ok(out);
    }
    if let Some(body) = v.strip_prefix('"') {
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    if !trailing_is_comment(&body[i + 1..]) {
                        return Err("text after the closing quote");
                    }
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(c @ ('\\' | '"' | '$')) => out.push(c),
                    Some(_) => return Err("unknown escape (use \\n, \\t, \\r, \\\\ or \\\")"),
                    None => return Err("unterminated double quote"),
                },
                c => out.push(c),
            }
        }
        return Err("unterminated double quote");
    }
    out.push_str(v);
    Ok(out)
}

fn trailing_is_comment(rest: &str) -> bool {
    let rest = rest.trim();
    rest.is_empty() || rest.starts_with('#')
}

/// Interactive entry of keys and values.
pub trait Prompt {
    /// Whether a person can answer (stdin is a terminal).
    fn available(&self) -> bool;
    /// Asks for key names (visible) and values (hidden) until an empty key name.
    fn read_entries(
        &mut self,
        term: &mut Term<'_>,
    ) -> Result<Vec<(String, SecretValue)>, KubectlError>;
}

/// Reads from the controlling terminal, with echo off while a value is typed.
pub struct TerminalPrompt;

impl Prompt for TerminalPrompt {
    fn available(&self) -> bool {
        std::io::stdin().is_terminal()
    }

    fn read_entries(
        &mut self,
        term: &mut Term<'_>,
    ) -> Result<Vec<(String, SecretValue)>, KubectlError> {
        let io = |e: std::io::Error| KubectlError::Input {
            what: "terminal".into(),
            detail: e.to_string(),
        };
        let stdin = std::io::stdin();
        let mut entries = Vec::new();
        term.note("Enter keys and values; an empty key name ends the input.");
        loop {
            let _ = write!(term.err, "key name: ");
            let _ = term.err.flush();
            let mut key = String::new();
            if stdin.lock().read_line(&mut key).map_err(io)? == 0 {
                break;
            }
            let key = key.trim().to_string();
            if key.is_empty() {
                break;
            }
            validate_key(&key).map_err(|e| KubectlError::usage(e.to_string()))?;
            let value =
                hidden::read_line(term, &format!("value for {key} (hidden): ")).map_err(io)?;
            entries.push((key, SecretValue::new(value.as_bytes().to_vec())));
        }
        Ok(entries)
    }
}

mod hidden {
    use std::io::BufRead;
    use std::os::fd::AsFd;

    use nix::sys::termios::{LocalFlags, SetArg, Termios, tcgetattr, tcsetattr};
    use zeroize::Zeroizing;

    use super::Term;

    /// Puts the terminal back even when reading fails.
    struct Restore(Termios);

    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
        }
    }

    /// Prompts, then reads one line from stdin with echo off (the newline still echoes,
    /// via ECHONL). The prompt appears only once echo is off, so nothing typed after it
    /// can show.
    pub fn read_line(term: &mut Term<'_>, prompt: &str) -> std::io::Result<Zeroizing<String>> {
        let stdin = std::io::stdin();
        let original = tcgetattr(stdin.as_fd())?;
        let mut silent = original.clone();
        silent.local_flags.remove(LocalFlags::ECHO);
        silent.local_flags.insert(LocalFlags::ECHONL);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &silent)?;
        let _restore = Restore(original);
        let _ = write!(term.err, "{prompt}");
        let _ = term.err.flush();
        let mut line = Zeroizing::new(String::new());
        stdin.lock().read_line(&mut line)?;
        while line.ends_with('\n') || line.ends_with('\r') {
            line.pop();
        }
        Ok(line)
    }
}
