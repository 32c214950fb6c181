//! tmpfs mounting and unmounting through nix.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::pinned::PinnedDir;
use crate::{Error, Payload, mountinfo};

/// Secrets are data: nothing on the volume may be a device, run, or gain privileges.
pub const MOUNT_FLAGS: MsFlags = MsFlags::MS_NODEV
    .union(MsFlags::MS_NOEXEC)
    .union(MsFlags::MS_NOSUID);

const FLOOR: u64 = 1024 * 1024;
const SLACK: u64 = 64 * 1024;
// tmpfs charges whole pages per file; 64 KiB covers the largest common page size. The
// limit is a cap, not a reservation, so generous rounding costs no memory.
const PER_FILE_ROUNDING: u64 = 64 * 1024;
// Stacked mounts at one target are unexpected; bound the unmount loop anyway.
const MAX_STACKED: usize = 8;

/// Size limit for a volume holding `payload`: room for two generations (the old one lives
/// until the new one is in place), plus slack, never below 1 MiB.
pub fn tmpfs_size_for(payload: &Payload) -> u64 {
    let generation: u64 = payload
        .files
        .iter()
        .map(|f| (f.contents.len() as u64).div_ceil(PER_FILE_ROUNDING) * PER_FILE_ROUNDING)
        .sum();
    (2 * generation + SLACK).max(FLOOR)
}

/// Mode of the volume root and its directories: the pod's group may traverse; others only
/// when there is no fsGroup to grant access through.
pub fn dir_mode(gid: Option<u32>) -> u32 {
    if gid.is_some() { 0o750 } else { 0o755 }
}

/// Mount a fresh tmpfs at `target` (an existing directory), root owned `root:gid`.
pub fn mount_tmpfs(target: &Path, source: &str, size: u64, gid: Option<u32>) -> Result<(), Error> {
    let data = format!(
        "size={size},mode={:o},uid=0,gid={}",
        dir_mode(gid),
        gid.unwrap_or(0)
    );
    nix::mount::mount(
        Some(source),
        target,
        Some("tmpfs"),
        MOUNT_FLAGS,
        Some(data.as_str()),
    )
    .map_err(|source| Error::Mount {
        target: target.to_path_buf(),
        source,
    })
}

/// Grow the tmpfs at `target` to at least `required` bytes (never shrinks).
pub fn ensure_capacity(target: &Path, required: u64) -> Result<(), Error> {
    let stat = nix::sys::statvfs::statvfs(target).map_err(|source| Error::Mount {
        target: target.to_path_buf(),
        source,
    })?;
    let current = stat.blocks() as u64 * stat.fragment_size() as u64;
    if current >= required {
        return Ok(());
    }
    // A remount replaces the per-mount flags, so they are restated.
    let data = format!("size={required}");
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MOUNT_FLAGS,
        Some(data.as_str()),
    )
    .map_err(|source| Error::Mount {
        target: target.to_path_buf(),
        source,
    })
}

/// Unmount this driver's tmpfs at `target` (the entry `name` of the pinned `parent`),
/// every layer of it; a busy mount is detached lazily so the volume can still go away
/// while a process holds a file open. Succeeds when nothing is mounted; refuses, touching
/// nothing, when what is mounted there is not a tmpfs of `driver_name`.
///
/// umount(2) is given `/proc/self/fd/<parent>/<name>` with `UMOUNT_NOFOLLOW`: the parent
/// is the directory that was checked, and the last component is never followed.
pub fn unmount(
    parent: &PinnedDir,
    name: &std::ffi::OsStr,
    target: &Path,
    driver_name: &str,
) -> Result<(), Error> {
    let at = parent.proc_path().join(name);
    let fail = |source| Error::Unmount {
        target: target.to_path_buf(),
        source,
    };
    for _ in 0..MAX_STACKED {
        match mountinfo::mount_at(target)? {
            None => return Ok(()),
            Some(m) if m.fs_type != "tmpfs" || m.source != driver_name => {
                return Err(Error::ForeignMount {
                    target: target.to_path_buf(),
                    fs_type: m.fs_type,
                    mount_source: m.source,
                });
            }
            Some(_) => {}
        }
        match nix::mount::umount2(&at, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(Errno::EBUSY) => {
                tracing::warn!(target = %target.display(), "volume busy, detaching lazily");
                nix::mount::umount2(&at, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
                    .map_err(fail)?;
            }
            // Raced with another unmount: the loop re-reads mountinfo.
            Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(e) => return Err(fail(e)),
        }
    }
    if mountinfo::is_mount_point(target)? {
        return Err(fail(Errno::EBUSY));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PayloadFile;

    #[test]
    fn size_has_floor_and_room_for_two_generations() {
        assert_eq!(tmpfs_size_for(&Payload::default()), FLOOR);
        let small = Payload::new(vec![PayloadFile::new("s/k", vec![1; 10], 0o440)]);
        assert_eq!(tmpfs_size_for(&small), FLOOR);
        let big = Payload::new(vec![PayloadFile::new("s/k", vec![1; 3 << 20], 0o440)]);
        assert_eq!(tmpfs_size_for(&big), 2 * (3 << 20) + SLACK);
    }
}
