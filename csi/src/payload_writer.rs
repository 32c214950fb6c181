//! Atomic volume content with kubelet's AtomicWriter layout:
//!
//! ```text
//! <dir>/..<generation>/<secret>/<key>   immutable once written
//! <dir>/..data -> ..<generation>         swapped with one rename(2)
//! <dir>/<secret> -> ..data/<secret>      what the pod sees
//! ```
//!
//! A reader that resolves `..data` once sees one complete generation, never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Error, Payload, PayloadFile, mount::dir_mode};

pub const DATA_LINK: &str = "..data";
const DATA_TMP_LINK: &str = "..data_tmp";
/// Kubernetes object key names are bounded by 253 bytes.
pub const MAX_COMPONENT_BYTES: usize = 253;
/// `<secret>/<key>`.
pub const MAX_DEPTH: usize = 2;

/// Whether [`write_payload`] changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Unchanged,
    Written { generation: String },
}

/// Check every file path and mode; the error names the offending file.
pub fn validate_payload(payload: &Payload) -> Result<(), Error> {
    let mut files = BTreeSet::new();
    let mut dirs = BTreeSet::new();
    for file in &payload.files {
        let invalid = |reason: &str| Error::InvalidPayloadFile {
            path: file.path.clone(),
            reason: reason.to_string(),
        };
        validate_path(&file.path).map_err(invalid)?;
        if file.mode & !0o777 != 0 {
            return Err(invalid("mode has bits beyond 0o777"));
        }
        if !files.insert(file.path.as_str()) {
            return Err(invalid("duplicate path"));
        }
        if let Some((dir, _)) = file.path.split_once('/') {
            dirs.insert(dir);
        }
    }
    if let Some(both) = dirs.iter().find(|d| files.contains(*d)) {
        return Err(Error::InvalidPayloadFile {
            path: (*both).to_string(),
            reason: "is both a file and a directory".into(),
        });
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("path is empty");
    }
    if path.starts_with('/') {
        return Err("must be relative, not start with '/'");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    let components: Vec<&str> = path.split('/').collect();
    if components.len() > MAX_DEPTH {
        return Err("deeper than <secret>/<key>");
    }
    for component in components {
        if component.is_empty() {
            return Err("has an empty component");
        }
        if component == "." || component.starts_with("..") {
            // `..`-prefixed names are the writer's own (..data, generations).
            return Err("has a '.' or '..'-prefixed component");
        }
        if component.len() > MAX_COMPONENT_BYTES {
            return Err("has a component longer than 253 bytes");
        }
    }
    Ok(())
}

/// Make `dir` hold exactly `payload`, owned `root:gid` (the writer's user and group
/// without a gid), switching atomically. A plain-directory marker in `dir` is kept. Skips all
/// writes when content, modes and group already match. `dir` must exist.
pub fn write_payload(
    dir: &Path,
    payload: &Payload,
    gid: Option<u32>,
) -> Result<WriteOutcome, Error> {
    validate_payload(payload)?;
    let top_level: BTreeSet<&str> = payload
        .files
        .iter()
        .map(|f| top_component(&f.path))
        .collect();

    let current = current_generation(dir)?;
    if let Some(current) = &current {
        let unchanged = generation_matches(&dir.join(current), payload, gid)
            .map_err(|e| Error::io("compare", dir.join(current), e))?;
        if unchanged && visible_links_present(dir, &top_level) {
            return Ok(WriteOutcome::Unchanged);
        }
    }

    let generation = create_generation(dir, gid)?;
    let generation_dir = dir.join(&generation);
    if let Err(e) = write_generation(&generation_dir, &payload.files, gid) {
        let _ = fs::remove_dir_all(&generation_dir);
        return Err(e);
    }
    swap_data_link(dir, &generation)?;
    update_visible_links(dir, &top_level)?;
    remove_old_generations(dir, &generation)?;
    Ok(WriteOutcome::Written { generation })
}

/// The generation `..data` points to, if the volume has content.
pub fn current_generation(dir: &Path) -> Result<Option<String>, Error> {
    let link = dir.join(DATA_LINK);
    match fs::read_link(&link) {
        Ok(target) => Ok(target
            .to_str()
            .filter(|t| t.starts_with("..") && !t.contains('/'))
            .map(str::to_string)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read link", link, e)),
    }
}

fn top_component(path: &str) -> &str {
    path.split_once('/').map_or(path, |(top, _)| top)
}

fn generation_matches(generation: &Path, payload: &Payload, gid: Option<u32>) -> io::Result<bool> {
    let mut on_disk = BTreeSet::new();
    collect_files(generation, "", 1, &mut on_disk)?;
    let wanted: BTreeSet<String> = payload.files.iter().map(|f| f.path.clone()).collect();
    if on_disk != wanted {
        return Ok(false);
    }
    for file in &payload.files {
        if !file_matches(&generation.join(&file.path), file, gid)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn collect_files(
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut BTreeSet<String>,
) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if kind.is_dir() && depth < MAX_DEPTH {
            collect_files(&entry.path(), &format!("{prefix}{name}/"), depth + 1, out)?;
        } else {
            // Anything unexpected (a symlink, a too-deep dir) forces a rewrite.
            out.insert(if kind.is_file() {
                format!("{prefix}{name}")
            } else {
                String::new()
            });
        }
    }
    Ok(())
}

fn file_matches(path: &Path, file: &PayloadFile, gid: Option<u32>) -> io::Result<bool> {
    let meta = fs::symlink_metadata(path)?;
    // Without a group, files get the writer's own (root's on a node; the plugin user's in
    // an unprivileged plain-directory run).
    let expected_gid = gid.unwrap_or_else(|| nix::unistd::getegid().as_raw());
    if meta.mode() & 0o7777 != file.mode
        || meta.gid() != expected_gid
        || meta.len() != file.contents.len() as u64
    {
        return Ok(false);
    }
    let mut existing = Vec::with_capacity(file.contents.len());
    File::open(path)?.read_to_end(&mut existing)?;
    let same = existing == file.contents;
    existing.fill(0);
    std::hint::black_box(&existing);
    Ok(same)
}

fn visible_links_present(dir: &Path, top_level: &BTreeSet<&str>) -> bool {
    top_level.iter().all(|name| {
        fs::read_link(dir.join(name)).is_ok_and(|t| t == Path::new(DATA_LINK).join(name))
    })
}

fn create_generation(dir: &Path, gid: Option<u32>) -> Result<String, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = format!("..{}.{:09}", now.as_secs(), now.subsec_nanos());
    for attempt in 0..100u32 {
        let name = if attempt == 0 {
            stamp.clone()
        } else {
            format!("{stamp}_{attempt}")
        };
        let path = dir.join(&name);
        match create_dir(&path, gid) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("create generation", path, e)),
        }
    }
    Err(Error::io(
        "create generation",
        dir.join(stamp),
        io::Error::from(io::ErrorKind::AlreadyExists),
    ))
}

fn create_dir(path: &Path, gid: Option<u32>) -> io::Result<()> {
    DirBuilder::new().mode(0o700).create(path)?;
    set_owner_and_mode(path, gid, dir_mode(gid))
}

// Explicit chmod after create: the process umask must not change what the pod sees.
fn set_owner_and_mode(path: &Path, gid: Option<u32>, mode: u32) -> io::Result<()> {
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid)?;
    }
    fs::set_permissions(path, Permissions::from_mode(mode))
}

fn write_generation(
    generation: &Path,
    files: &[PayloadFile],
    gid: Option<u32>,
) -> Result<(), Error> {
    let mut made_dirs = BTreeSet::new();
    for file in files {
        if let Some((secret, _)) = file.path.split_once('/')
            && made_dirs.insert(secret)
        {
            let path = generation.join(secret);
            create_dir(&path, gid).map_err(|e| Error::io("create dir", path, e))?;
        }
        let path = generation.join(&file.path);
        write_file(&path, file, gid).map_err(|e| Error::io("write", path, e))?;
    }
    Ok(())
}

fn write_file(path: &Path, file: &PayloadFile, gid: Option<u32>) -> io::Result<()> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    out.write_all(&file.contents)?;
    if gid.is_some() {
        std::os::unix::fs::fchown(&out, None, gid)?;
    }
    out.set_permissions(Permissions::from_mode(file.mode))
}

fn swap_data_link(dir: &Path, generation: &str) -> Result<(), Error> {
    let tmp = dir.join(DATA_TMP_LINK);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale link", tmp, e)),
    }
    symlink(generation, &tmp).map_err(|e| Error::io("create link", &tmp, e))?;
    let data = dir.join(DATA_LINK);
    fs::rename(&tmp, &data).map_err(|e| Error::io("rename link", data, e))
}

fn update_visible_links(dir: &Path, top_level: &BTreeSet<&str>) -> Result<(), Error> {
    let mut existing: BTreeMap<String, PathBuf> = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") {
            existing.insert(name, entry.path());
        }
    }
    for name in top_level {
        let link = dir.join(name);
        let wanted = Path::new(DATA_LINK).join(name);
        if fs::read_link(&link).is_ok_and(|t| t == wanted) {
            continue;
        }
        if existing.contains_key(*name) {
            remove_entry(&link)?;
        }
        symlink(&wanted, &link).map_err(|e| Error::io("create link", &link, e))?;
    }
    for (name, path) in existing {
        if !top_level.contains(name.as_str()) {
            remove_entry(&path)?;
        }
    }
    Ok(())
}

fn remove_old_generations(dir: &Path, keep: &str) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let name = entry.file_name();
        let is_internal = name.to_str().is_some_and(|n| n.starts_with(".."));
        let kept = [DATA_LINK, keep, crate::plain_directory::MARKER].map(OsStr::new);
        if is_internal && !kept.contains(&name.as_os_str()) {
            remove_entry(&entry.path())?;
        }
    }
    Ok(())
}

fn remove_entry(path: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("inspect", path, e))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| Error::io("remove", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(files: &[(&str, &str, u32)]) -> Payload {
        Payload::new(
            files
                .iter()
                .map(|(p, c, m)| PayloadFile::new(*p, c.as_bytes(), *m))
                .collect(),
        )
    }

    fn read(dir: &Path, path: &str) -> String {
        fs::read_to_string(dir.join(path)).expect("file readable")
    }

    fn entries(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn rejects_bad_paths_naming_the_file() {
        let long = "k".repeat(254);
        let cases = [
            "",
            "/abs",
            "a/b/c",
            "..",
            "../x",
            "s/..",
            "s/.",
            ".",
            "s//k",
            "s/",
            "a\0b",
            "..data",
            long.as_str(),
        ];
        for path in cases {
            let err = validate_payload(&payload(&[(path, "x", 0o440)]))
                .expect_err(&format!("{path:?} must be rejected"));
            assert!(
                matches!(&err, Error::InvalidPayloadFile { path: p, .. } if p == path),
                "{err}"
            );
        }
        validate_payload(&payload(&[
            (&"k".repeat(253), "x", 0o440),
            (".dockerconfigjson", "x", 0o400),
        ]))
        .expect("253-byte names and dotfiles are fine");
    }

    #[test]
    fn rejects_duplicates_conflicts_and_special_modes() {
        let dup = payload(&[("s/k", "1", 0o440), ("s/k", "2", 0o440)]);
        assert!(
            validate_payload(&dup)
                .expect_err("dup")
                .to_string()
                .contains("duplicate")
        );
        let both = payload(&[("s", "1", 0o440), ("s/k", "2", 0o440)]);
        assert!(
            validate_payload(&both)
                .expect_err("conflict")
                .to_string()
                .contains("both")
        );
        let suid = payload(&[("s/k", "1", 0o4755)]);
        assert!(
            validate_payload(&suid)
                .expect_err("suid")
                .to_string()
                .contains("mode")
        );
    }

    #[test]
    fn writes_layout_and_swaps_generations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = payload(&[
            ("db/user", "u1", 0o440),
            ("db/pass", "p1", 0o400),
            ("token", "t1", 0o444),
        ]);
        let WriteOutcome::Written { generation: g1 } =
            write_payload(dir.path(), &first, None).expect("write")
        else {
            panic!("first write must write");
        };
        assert_eq!(
            fs::read_link(dir.path().join("..data")).expect("link"),
            Path::new(&g1)
        );
        assert_eq!(
            fs::read_link(dir.path().join("db")).expect("link"),
            Path::new("..data/db")
        );
        assert_eq!(read(dir.path(), "db/pass"), "p1");
        assert_eq!(read(dir.path(), "token"), "t1");
        let mode = fs::metadata(dir.path().join("db/pass"))
            .expect("meta")
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o400);

        assert_eq!(
            write_payload(dir.path(), &first, None).expect("same"),
            WriteOutcome::Unchanged
        );

        let second = payload(&[("db/user", "u2", 0o440), ("api/key", "k2", 0o440)]);
        let WriteOutcome::Written { generation: g2 } =
            write_payload(dir.path(), &second, None).expect("write")
        else {
            panic!("changed content must write");
        };
        assert_ne!(g1, g2);
        assert_eq!(read(dir.path(), "db/user"), "u2");
        assert!(!dir.path().join("db/pass").exists(), "removed key is gone");
        assert_eq!(
            entries(dir.path()),
            BTreeSet::from(["..data".to_string(), g2, "api".into(), "db".into()]),
            "stale links and the old generation are removed"
        );
    }

    #[test]
    fn mode_change_alone_is_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_payload(dir.path(), &payload(&[("s/k", "v", 0o440)]), None).expect("write");
        let outcome =
            write_payload(dir.path(), &payload(&[("s/k", "v", 0o400)]), None).expect("write");
        assert!(matches!(outcome, WriteOutcome::Written { .. }));
        let mode = fs::metadata(dir.path().join("s/k")).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o400);
    }
}
