//! Kubernetes name rules the annotations must follow, and the node label that
//! marks a node whose node plugin has a device ready.

use crate::contract::node_ready_label;

/// Longest HSMDevice name whose ready label key stays valid: the name part of
/// a label key (`device.<name>`) is at most 63 characters.
pub const MAX_DEVICE_NAME_LEN: usize = 63 - "device.".len();

/// Why `name` is not a DNS-1123 subdomain (the rule for HSMSecret and
/// HSMDevice object names), or `None` when it is one.
pub fn validate_object_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > 253 {
        return Some(format!("is {} characters long (at most 253)", name.len()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Some(format!(
            "contains {bad:?}; only lowercase letters, digits, '-' and '.' are allowed"
        ));
    }
    for label in name.split('.') {
        let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !alnum(label.chars().next()) || !alnum(label.chars().last()) {
            return Some("must start and end with a letter or digit, also around each '.'".into());
        }
    }
    None
}

/// Why `name` cannot name an HSMDevice, or `None` when it can.
pub fn validate_device_name(name: &str) -> Option<String> {
    if let Some(reason) = validate_object_name(name) {
        return Some(reason);
    }
    (name.len() > MAX_DEVICE_NAME_LEN).then(|| {
        format!(
            "is {} characters long; device names are at most {MAX_DEVICE_NAME_LEN} so the \
             node label {} stays a valid label key",
            name.len(),
            node_ready_label("<name>")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_follow_dns_1123_subdomains() {
        for good in ["a", "db-credentials", "api.key-2", &"a".repeat(253)] {
            assert_eq!(validate_object_name(good), None, "{good}");
        }
        for bad in [
            "",
            "Db",
            "db_credentials",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a/b",
            "a,b",
            &"a".repeat(254),
        ] {
            assert!(
                validate_object_name(bad).is_some(),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn device_names_must_fit_the_ready_label() {
        assert_eq!(validate_device_name(&"d".repeat(MAX_DEVICE_NAME_LEN)), None);
        let long = validate_device_name(&"d".repeat(MAX_DEVICE_NAME_LEN + 1)).unwrap_or_default();
        assert!(long.contains("label"), "{long}");
        assert_eq!(
            node_ready_label("prod-hsm"),
            "hsmsecrets.io/device.prod-hsm"
        );
    }
}
