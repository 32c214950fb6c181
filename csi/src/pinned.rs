//! Directories reached without following any symlink, in any component.
//!
//! kubelet hands us paths under its pods directory, which pods and other node software
//! can shape. A symlink anywhere on the way (a pod's volume directory pointed at `/etc`)
//! would place a tmpfs, its files, or an unmount elsewhere on the host. Every path is
//! therefore walked from `/` one component at a time with `O_PATH | O_NOFOLLOW`, refusing
//! a symlink wherever it stands, and then used only through the opened directory
//! (`/proc/self/fd/N`), so the path cannot be swapped between the check and the use.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::Error;

/// An open directory and the path it was reached by (for messages only).
#[derive(Debug)]
pub struct PinnedDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl PinnedDir {
    /// Opens the directory at `path`, which lies under the trusted directory `root` (the
    /// kubelet directory the operator configured, which may itself be reached through a
    /// symlink), refusing a symlink or a non-directory in any component below `root`.
    /// `Ok(None)` when a component does not exist.
    pub fn open_under(root: &Path, path: &Path) -> Result<Option<Self>, Error> {
        let Ok(below) = path.strip_prefix(root) else {
            return Err(Error::invalid(
                "target_path",
                format!("{} is not under {}", path.display(), root.display()),
            ));
        };
        let mut dir = Self::trusted(root)?;
        for component in below.components() {
            match component {
                Component::Normal(name) => match dir.child(name)? {
                    Some(next) => dir = next,
                    None => return Ok(None),
                },
                _ => {
                    return Err(Error::invalid(
                        "target_path",
                        format!("{} must be a plain path", path.display()),
                    ));
                }
            }
        }
        Ok(Some(dir))
    }

    /// The parent directory of `path` (under `root`), pinned, and the last component.
    pub fn open_parent_under(root: &Path, path: &Path) -> Result<Option<(Self, OsString)>, Error> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::invalid(
                "target_path",
                format!("{} has no parent directory", path.display()),
            ));
        };
        Ok(Self::open_under(root, parent)?.map(|dir| (dir, name.to_owned())))
    }

    fn trusted(root: &Path) -> Result<Self, Error> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", root, e.into()))?;
        Ok(Self {
            fd,
            path: root.to_path_buf(),
        })
    }

    /// The directory `name` inside this one, never through a symlink.
    pub fn child(&self, name: &OsStr) -> Result<Option<Self>, Error> {
        let path = self.path.join(name);
        let fd = match openat(
            self.fd.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(Error::io("open", path, e.into())),
        };
        let stat = fstat(&fd).map_err(|e| Error::io("inspect", &path, e.into()))?;
        let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            return Err(Error::Symlink { path });
        }
        if kind != SFlag::S_IFDIR {
            return Err(Error::invalid(
                "target_path",
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(Some(Self { fd, path }))
    }

    /// Creates the directory `name` inside this one (mode 0750 before umask); false when
    /// it already existed.
    pub fn create_child(&self, name: &OsStr) -> Result<bool, Error> {
        match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(0o750)) {
            Ok(()) => Ok(true),
            Err(Errno::EEXIST) => Ok(false),
            Err(e) => Err(Error::io(
                "create target dir",
                self.path.join(name),
                e.into(),
            )),
        }
    }

    /// Removes the empty directory `name` inside this one; nothing to do when it is gone.
    pub fn remove_child(&self, name: &OsStr) -> Result<(), Error> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(
                "remove target dir",
                self.path.join(name),
                e.into(),
            )),
        }
    }

    /// A path that reaches exactly this directory, whatever happens to the path it was
    /// opened by: for mount(2), umount(2) and the payload writer.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The path it was reached by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory itself is on a tmpfs: what a volume of this driver must be
    /// before anything is written into it (else the files would reach the disk below).
    pub fn is_tmpfs(&self) -> Result<bool, Error> {
        let fs = nix::sys::statfs::fstatfs(&self.fd)
            .map_err(|e| Error::io("inspect", &self.path, e.into()))?;
        Ok(fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_are_refused_in_every_component() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real/pods/x");
        std::fs::create_dir_all(&real).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        assert!(PinnedDir::open_under(tmp.path(), &real).unwrap().is_some());
        let through = tmp.path().join("link/pods/x");
        match PinnedDir::open_under(tmp.path(), &through) {
            Err(Error::Symlink { path }) => assert_eq!(path, tmp.path().join("link")),
            other => panic!("{other:?}"),
        }
        // The last component too.
        symlink(&real, tmp.path().join("real/pods/y")).unwrap();
        assert!(matches!(
            PinnedDir::open_under(tmp.path(), &tmp.path().join("real/pods/y")),
            Err(Error::Symlink { .. })
        ));
        assert!(
            PinnedDir::open_under(tmp.path(), &tmp.path().join("real/missing/z"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_proc_path_reaches_the_opened_directory_after_a_swap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let pinned = PinnedDir::open_under(tmp.path(), &dir).unwrap().unwrap();
        std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(pinned.proc_path().join("f"), b"x").unwrap();
        assert!(tmp.path().join("moved/f").exists());
        assert!(!dir.join("f").exists());
    }
}
