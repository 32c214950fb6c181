//! Volumes as plain directories, for development without the privilege to mount
//! ([`MountMode::PlainDirectory`](crate::MountMode::PlainDirectory)): the payload is
//! written into the target directory itself, on whatever filesystem holds kubelet's
//! directory. Secrets then reach the disk; never use this on a real node.
//!
//! Nothing is kept in memory here either: a marker file in the target, holding the
//! driver name, says "this directory is one of our volumes", so a restarted plugin
//! recognises (republishes, unpublishes, discovers) what an earlier run wrote.
//!
//! ```text
//! <target>/..hsm-secrets-plain-directory   "<driver name>\n", written first
//! <target>/..data -> ..<generation>         as on tmpfs (payload_writer)
//! ```

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;

use crate::mount::dir_mode;
use crate::mountinfo::{self, is_csi_volume_layout};
use crate::{Error, Payload, payload_writer};

/// The marker file. `..`-prefixed: no payload file can take the name, and the payload
/// writer leaves it alone.
pub const MARKER: &str = "..hsm-secrets-plain-directory";
/// A marker is one driver name; anything larger is not ours.
const MAX_MARKER_BYTES: u64 = 512;

/// Whether `target` is a plain-directory volume of `driver_name`: a real directory
/// (not a mount point) holding a regular marker file naming the driver.
pub fn is_plain_volume(target: &Path, driver_name: &str) -> Result<bool, Error> {
    let marker = target.join(MARKER);
    let meta = match fs::symlink_metadata(&marker) {
        Ok(meta) => meta,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(Error::io("inspect", marker, e)),
    };
    if !meta.is_file() || meta.len() > MAX_MARKER_BYTES {
        return Ok(false);
    }
    let mut text = String::new();
    fs::File::open(&marker)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| Error::io("read", &marker, e))?;
    Ok(text.trim_end() == driver_name && !mountinfo::is_mount_point(target)?)
}

/// This driver's plain-directory volumes under `kubelet_dir`, in kubelet's CSI volume
/// layout. Sorted.
pub fn discover(kubelet_dir: &Path, driver_name: &str) -> Result<Vec<PathBuf>, Error> {
    let pods = fs::canonicalize(kubelet_dir)
        .unwrap_or_else(|_| kubelet_dir.to_path_buf())
        .join("pods");
    let mut found = Vec::new();
    for pod in read_dir_or_empty(&pods)? {
        let csi = pod.join("volumes").join("kubernetes.io~csi");
        for volume in read_dir_or_empty(&csi)? {
            let target = volume.join("mount");
            if is_csi_volume_layout(&pods, &target) && is_plain_volume(&target, driver_name)? {
                found.push(target);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()
            .map_err(|e| Error::io("list", dir, e)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(Vec::new())
        }
        Err(e) => Err(Error::io("list", dir, e)),
    }
}

/// The group the volume's files can get: `wanted` when this process may give files
/// to it (root, or a member), else none, with one warning per process lifetime of the
/// plugin (`warned`). Tried on `target` itself, which then carries the group.
pub fn applicable_group(
    target: &Path,
    wanted: Option<u32>,
    warned: &AtomicBool,
) -> Result<Option<u32>, Error> {
    let Some(gid) = wanted else {
        return Ok(None);
    };
    match nix::unistd::chown(target, None, Some(nix::unistd::Gid::from_raw(gid))) {
        Ok(()) => Ok(Some(gid)),
        Err(Errno::EPERM) => {
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    fs_group = gid,
                    "plain-directory volumes: this process may not give files to the pod's \
                     fsGroup; files keep the plugin's own user and group (run as root for \
                     group ownership)"
                );
            }
            Ok(None)
        }
        Err(source) => Err(Error::io(
            "chown",
            target,
            io::Error::from_raw_os_error(source as i32),
        )),
    }
}

/// First publish: create the target (or take kubelet's empty one), mark it, write the
/// payload. On failure, undo exactly that. Returns the group the files got.
pub fn publish(
    target: &Path,
    driver_name: &str,
    payload: &Payload,
    fs_group: Option<u32>,
    warned: &AtomicBool,
) -> Result<Option<u32>, Error> {
    let created = match fs::create_dir(target) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::symlink_metadata(target).map_err(|e| Error::io("inspect", target, e))?;
            if !meta.is_dir() {
                return Err(Error::invalid(
                    "target_path",
                    "exists and is not a directory",
                ));
            }
            let mut entries = fs::read_dir(target).map_err(|e| Error::io("list", target, e))?;
            if entries.next().is_some() {
                return Err(Error::ForeignDirectory {
                    target: target.to_path_buf(),
                });
            }
            false
        }
        Err(e) => return Err(Error::io("create target dir", target, e)),
    };
    let result = mark_and_write(target, driver_name, payload, fs_group, warned);
    if result.is_err() {
        let undone = if created {
            fs::remove_dir_all(target)
        } else {
            clear_dir(target)
        };
        if let Err(e) = undone {
            tracing::warn!(error = %e, "could not remove what a failed publish wrote");
        }
    }
    result
}

fn mark_and_write(
    target: &Path,
    driver_name: &str,
    payload: &Payload,
    fs_group: Option<u32>,
    warned: &AtomicBool,
) -> Result<Option<u32>, Error> {
    // The marker goes first: a plugin that dies mid-write leaves a volume that a restart
    // still recognises and can remove.
    let marker = target.join(MARKER);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&marker)
        .and_then(|mut f| f.write_all(format!("{driver_name}\n").as_bytes()))
        .map_err(|e| Error::io("write marker", &marker, e))?;
    Ok(rewrite(target, payload, fs_group, warned)?.0)
}

/// Writes `payload` into an existing plain-directory volume (also the republish path).
pub fn rewrite(
    target: &Path,
    payload: &Payload,
    fs_group: Option<u32>,
    warned: &AtomicBool,
) -> Result<(Option<u32>, payload_writer::WriteOutcome), Error> {
    let gid = applicable_group(target, fs_group, warned)?;
    fs::set_permissions(target, fs::Permissions::from_mode(dir_mode(gid)))
        .map_err(|e| Error::io("chmod", target, e))?;
    let outcome = payload_writer::write_payload(target, payload, gid)?;
    Ok((gid, outcome))
}

/// Unpublish: remove the volume directory and everything in it. Only call on a target
/// [`is_plain_volume`] recognised.
pub fn remove(target: &Path) -> Result<(), Error> {
    // remove_dir_all does not follow symlinks: the visible links into ..data are
    // removed, never their targets.
    match fs::remove_dir_all(target) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(Error::io("remove plain-directory volume", target, e))
        }
        _ => Ok(()),
    }
}

fn clear_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if fs::symlink_metadata(&path)?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume_dir(root: &Path, pod: &str) -> PathBuf {
        let parent = root
            .join("pods")
            .join(pod)
            .join("volumes/kubernetes.io~csi/v");
        fs::create_dir_all(&parent).expect("parent");
        parent.join("mount")
    }

    #[test]
    fn marker_must_be_a_regular_file_naming_the_driver() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = volume_dir(root.path(), "a");
        assert!(!is_plain_volume(&target, "d").expect("absent target"));
        fs::create_dir(&target).expect("dir");
        assert!(!is_plain_volume(&target, "d").expect("no marker"));
        fs::write(target.join(MARKER), "other\n").expect("write");
        assert!(!is_plain_volume(&target, "d").expect("other driver"));
        fs::write(target.join(MARKER), "d\n").expect("write");
        assert!(is_plain_volume(&target, "d").expect("ours"));
        fs::remove_file(target.join(MARKER)).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", target.join(MARKER)).expect("symlink");
        assert!(!is_plain_volume(&target, "d").expect("a symlink is not a marker"));
    }

    #[test]
    fn discovery_finds_marked_volumes_in_kubelet_layout_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let ours = volume_dir(root.path(), "a");
        let unmarked = volume_dir(root.path(), "b");
        let warned = AtomicBool::new(false);
        publish(&ours, "d", &Payload::default(), None, &warned).expect("publish");
        fs::create_dir(&unmarked).expect("dir");
        let outside = root.path().join("pods/c/elsewhere");
        fs::create_dir_all(&outside).expect("dir");
        fs::write(outside.join(MARKER), "d\n").expect("marker");
        assert_eq!(discover(root.path(), "d").expect("discover"), vec![ours]);
        assert!(
            discover(&root.path().join("absent"), "d")
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_non_empty_foreign_directory_is_refused_and_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        let target = volume_dir(root.path(), "a");
        fs::create_dir(&target).expect("dir");
        fs::write(target.join("precious"), "x").expect("write");
        let warned = AtomicBool::new(false);
        let err = publish(&target, "d", &Payload::default(), None, &warned).expect_err("refused");
        assert!(matches!(err, Error::ForeignDirectory { .. }), "{err}");
        assert!(target.join("precious").exists());
        assert!(!target.join(MARKER).exists());
    }
}
