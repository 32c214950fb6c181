//! `/proc/self/mountinfo`: the source of truth for what is mounted, so the plugin keeps no
//! state in memory and works the same after a restart.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::Error;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo, the fields this crate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Per-mount options such as `rw,nosuid,nodev,noexec,relatime`.
    pub mount_options: String,
    /// Filesystem options such as `size=1024k,mode=750,gid=1234`.
    pub super_options: String,
}

impl MountEntry {
    pub fn has_mount_option(&self, option: &str) -> bool {
        self.mount_options.split(',').any(|o| o == option)
    }
}

/// Parse mountinfo text (see proc(5)); malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    // id parent major:minor root mount_point options [optional...] - fstype source super
    let separator = fields.iter().position(|f| *f == b"-")?;
    if separator < 6 || fields.len() < separator + 4 {
        return None;
    }
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    Some(MountEntry {
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        mount_options: text(fields[5]),
        fs_type: text(fields[separator + 1]),
        source: text(fields[separator + 2]),
        super_options: text(fields[separator + 3]),
    })
}

/// The kernel writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// All mounts visible to this process.
pub fn read_mounts() -> Result<Vec<MountEntry>, Error> {
    let text = std::fs::read(MOUNTINFO).map_err(|e| Error::io("read", MOUNTINFO, e))?;
    Ok(parse(&text))
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>, Error> {
    // mountinfo shows resolved paths; also compare the path as given in case it is gone.
    let resolved = std::fs::canonicalize(path).ok();
    let matches = |p: &Path| p == path || resolved.as_deref() == Some(p);
    // Later lines are mounted on top of earlier ones.
    Ok(read_mounts()?
        .into_iter()
        .rev()
        .find(|m| matches(&m.mount_point)))
}

pub fn is_mount_point(path: &Path) -> Result<bool, Error> {
    Ok(mount_at(path)?.is_some())
}

/// This driver's tmpfs volumes under `kubelet_dir`: the tmpfs mounts whose source is
/// `driver_name` and whose mount point has kubelet's CSI volume layout. Sorted, unique.
pub fn discover_mounts(kubelet_dir: &Path, driver_name: &str) -> Result<Vec<PathBuf>, Error> {
    let pods = std::fs::canonicalize(kubelet_dir)
        .unwrap_or_else(|_| kubelet_dir.to_path_buf())
        .join("pods");
    let mut found: Vec<PathBuf> = read_mounts()?
        .into_iter()
        .filter(|m| m.fs_type == "tmpfs" && m.source == driver_name)
        .filter(|m| is_csi_volume_layout(&pods, &m.mount_point))
        .map(|m| m.mount_point)
        .collect();
    found.sort();
    found.dedup();
    Ok(found)
}

/// `<pods>/<uid>/volumes/kubernetes.io~csi/<name>/mount`, plain components only.
pub(crate) fn is_csi_volume_layout(pods_dir: &Path, path: &Path) -> bool {
    use std::path::Component;
    let Ok(rest) = path.strip_prefix(pods_dir) else {
        return false;
    };
    let parts: Vec<&std::ffi::OsStr> = rest
        .components()
        .map_while(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    parts.len() == rest.components().count()
        && matches!(parts.as_slice(), [_uid, v, csi, _name, m]
            if *v == "volumes" && *csi == "kubernetes.io~csi" && *m == "mount")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 0:51 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/db/mount rw,nosuid,nodev,noexec,relatime shared:50 - tmpfs csi.hsmsecrets.io rw,size=1024k,mode=750,gid=1234
99 22 0:52 / /tmp/with\\040space\\011tab\\134back rw,relatime - tmpfs tmpfs rw
100 22 0:53 / /mnt/x rw master:1 propagate_from:2 - nfs srv:/export rw,vers=4
garbage line
";

    #[test]
    fn parses_fields_and_optional_tags() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 4);
        let csi = &mounts[1];
        assert_eq!(
            csi.mount_point,
            Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/db/mount")
        );
        assert_eq!(csi.fs_type, "tmpfs");
        assert_eq!(csi.source, "csi.hsmsecrets.io");
        assert!(csi.has_mount_option("noexec") && csi.has_mount_option("nodev"));
        assert!(!csi.has_mount_option("exec"));
        assert_eq!(csi.super_options, "rw,size=1024k,mode=750,gid=1234");
        assert_eq!(mounts[3].fs_type, "nfs");
        assert_eq!(mounts[3].source, "srv:/export");
    }

    #[test]
    fn unescapes_octal_sequences() {
        let mounts = parse(SAMPLE);
        assert_eq!(
            mounts[2].mount_point,
            Path::new("/tmp/with space\ttab\\back")
        );
        assert_eq!(
            unescape(b"a\\04"),
            b"a\\04",
            "truncated escape stays literal"
        );
        assert_eq!(unescape(b"\\999"), b"\\999", "non-octal stays literal");
    }

    #[test]
    fn recognises_kubelet_csi_layout() {
        let pods = Path::new("/k/pods");
        let ok = Path::new("/k/pods/uid/volumes/kubernetes.io~csi/name/mount");
        assert!(is_csi_volume_layout(pods, ok));
        for bad in [
            "/k/pods/uid/volumes/kubernetes.io~csi/name",
            "/k/pods/uid/volumes/kubernetes.io~secret/name/mount",
            "/k/pods/uid/volumes/kubernetes.io~csi/name/mount/x",
            "/k/pods/uid/../uid/volumes/kubernetes.io~csi/name/mount",
            "/other/pods/uid/volumes/kubernetes.io~csi/name/mount",
        ] {
            assert!(!is_csi_volume_layout(pods, Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn root_is_a_mount_point() {
        assert!(is_mount_point(Path::new("/")).expect("mountinfo readable"));
        assert!(!is_mount_point(Path::new("/definitely/not/here")).expect("mountinfo readable"));
    }
}
