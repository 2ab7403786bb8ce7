//! CNI specification versions and what each one allows.

use std::fmt;

/// A CNI spec version this crate speaks. Ordered, so `v >= Version::V0_4_0` reads as the spec does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version we accept, oldest first, as `VERSION` prints them.
pub const SUPPORTED: [Version; 5] = [
    Version::V0_3_0,
    Version::V0_3_1,
    Version::V0_4_0,
    Version::V1_0_0,
    Version::V1_1_0,
];

impl Version {
    pub const LATEST: Version = Version::V1_1_0;

    pub fn parse(s: &str) -> Option<Version> {
        SUPPORTED.iter().copied().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK appeared in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// STATUS and GC appeared in 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` on every IP.
    pub fn result_has_ip_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// Route `mtu`/`advmss`/`priority`/`table`/`scope` and interface `mtu`/`socketPath`/`pciID`
    /// are 1.1.0 fields.
    pub fn result_has_1_1_fields(self) -> bool {
        self >= Version::V1_1_0
    }

    pub fn supported_strings() -> Vec<&'static str> {
        SUPPORTED.iter().map(|v| v.as_str()).collect()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_nothing_else() {
        for v in SUPPORTED {
            assert_eq!(Version::parse(v.as_str()), Some(v));
        }
        for bad in ["0.2.0", "0.1.0", "1.2.0", "", "1.0", "v1.0.0"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn features_follow_the_spec() {
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_status_and_gc());
        assert!(Version::V1_1_0.has_status_and_gc());
        assert!(Version::V0_4_0.result_has_ip_version());
        assert!(!Version::V1_0_0.result_has_ip_version());
    }
}
