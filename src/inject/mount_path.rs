//! `hsmsecrets.io/mount-path`: where the secrets appear in the containers.

use std::fmt;

use super::error::InjectError;

/// An absolute, normalized container path that hides nothing the container
/// or Kubernetes needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountPath(String);

/// Directories whose whole subtree belongs to the kernel, the image's programs and
/// libraries, or Kubernetes: no path below them either.
const RESERVED_TREES: &[(&str, &str)] = &[
    ("/proc", "the process filesystem"),
    ("/sys", "the kernel's sysfs"),
    ("/dev", "the container's devices"),
    ("/bin", "the container's programs"),
    ("/sbin", "the container's programs"),
    ("/usr", "the container's programs and libraries"),
    ("/lib", "the container's libraries"),
    ("/lib32", "the container's libraries"),
    ("/lib64", "the container's libraries"),
    ("/boot", "the container's boot files"),
    ("/var/lib/kubelet", "kubelet's directory"),
    (
        "/var/run/secrets/kubernetes.io",
        "the service account token Kubernetes mounts",
    ),
    (
        "/run/secrets/kubernetes.io",
        "the service account token Kubernetes mounts",
    ),
];

/// Directories that must not be replaced themselves, though a directory below them may
/// hold secrets (`/etc/nginx/certs`, `/var/run/hsm-secrets`, `/home/app/secrets`).
const RESERVED_EXACT: &[(&str, &str)] = &[
    ("/", "the container's whole filesystem"),
    (
        "/etc",
        "the container's configuration (/etc/hosts, /etc/resolv.conf, ...)",
    ),
    ("/var", "the container's variable data"),
    ("/var/lib", "the container's state"),
    ("/run", "the container's runtime state"),
    ("/var/run", "the container's runtime state"),
    (
        "/var/run/secrets",
        "the service account token Kubernetes mounts",
    ),
    (
        "/run/secrets",
        "the service account token Kubernetes mounts",
    ),
    ("/tmp", "the container's temporary files"),
    ("/root", "root's home directory"),
    ("/home", "the users' home directories"),
];

const MAX_LEN: usize = 1024;

impl MountPath {
    pub const DEFAULT: &'static str = "/var/run/hsm-secrets";

    pub fn default_path() -> Self {
        MountPath(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Accept an absolute path without `.`/`..` or empty components (one
    /// trailing `/` is dropped) outside the reserved directories.
    pub fn parse(value: &str) -> Result<Self, InjectError> {
        let invalid = |reason: &str| InjectError::InvalidMountPath {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if value.is_empty() {
            return Err(invalid(
                "is empty; remove the annotation for the default /var/run/hsm-secrets or give \
                 an absolute path",
            ));
        }
        if value.len() > MAX_LEN {
            return Err(invalid(
                "is longer than 1024 characters; use a shorter path",
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(invalid(
                "contains control characters; use a plain absolute path",
            ));
        }
        if !value.starts_with('/') {
            return Err(invalid(
                "is a relative path; container mount paths must be absolute, e.g. \
                 /var/run/hsm-secrets",
            ));
        }
        let trimmed = match value.strip_suffix('/') {
            Some(rest) if !rest.is_empty() => rest,
            _ => value,
        };
        if trimmed != "/" {
            for component in trimmed[1..].split('/') {
                match component {
                    "" => return Err(invalid("contains \"//\"; write each '/' once")),
                    "." | ".." => {
                        return Err(invalid(
                            "contains a '.' or '..' component; write the plain absolute path",
                        ));
                    }
                    _ => {}
                }
            }
        }
        let reserved = RESERVED_EXACT
            .iter()
            .find(|(path, _)| *path == trimmed)
            .or_else(|| {
                RESERVED_TREES.iter().find(|(tree, _)| {
                    trimmed == *tree
                        || trimmed
                            .strip_prefix(tree)
                            .is_some_and(|rest| rest.starts_with('/'))
                })
            });
        if let Some((_, what)) = reserved {
            return Err(InjectError::ReservedMountPath {
                value: value.to_owned(),
                what,
            });
        }
        Ok(MountPath(trimmed.to_owned()))
    }
}

impl Default for MountPath {
    fn default() -> Self {
        Self::default_path()
    }
}

impl fmt::Display for MountPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedicated_directories_are_accepted_and_normalized() {
        for (input, path) in [
            ("/var/run/hsm-secrets", "/var/run/hsm-secrets"),
            ("/var/run/hsm-secrets/", "/var/run/hsm-secrets"),
            ("/etc/hsm", "/etc/hsm"),
            ("/secrets", "/secrets"),
            ("/var/run/secrets/hsm", "/var/run/secrets/hsm"),
            ("/devices", "/devices"),
        ] {
            let parsed = MountPath::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(parsed.as_str(), path);
        }
    }

    #[test]
    fn reserved_directories_name_what_they_would_hide() {
        for (input, hidden) in [
            ("/", "whole filesystem"),
            ("/proc", "process"),
            ("/proc/self", "process"),
            ("/sys/fs", "sysfs"),
            ("/dev", "devices"),
            ("/dev/shm", "devices"),
            ("/etc", "configuration"),
            ("/etc/", "configuration"),
            // Whole trees, not just their top directory.
            ("/usr/lib", "libraries"),
            ("/usr/local/bin", "programs"),
            ("/lib64/x", "libraries"),
            ("/var/lib/kubelet", "kubelet"),
            ("/var/lib/kubelet/pods", "kubelet"),
            ("/var/lib", "state"),
            ("/var/run/secrets/kubernetes.io", "service account"),
            (
                "/var/run/secrets/kubernetes.io/serviceaccount",
                "service account",
            ),
            (
                "/run/secrets/kubernetes.io/serviceaccount",
                "service account",
            ),
        ] {
            let error = MountPath::parse(input).expect_err(input);
            assert_eq!(error.kind(), "reserved_mount_path", "{input}");
            assert!(error.to_string().contains(hidden), "{input}: {error}");
        }
    }
}
