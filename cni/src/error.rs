//! The CNI error object, printed on stdout exactly as the spec shows it.

use crate::version::Version;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Error codes. 1–99 are the spec's; 100 and up are Trellis's own (documented in `docs/errors.md`).
pub mod code {
    /// The config's `cniVersion` is not one this plugin speaks, or the verb is not in that version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field of the config is not supported (a value we understand but cannot honour).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container does not exist or is not known.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A `CNI_*` environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// An I/O error: reading stdin, writing state, a file we could not open.
    pub const IO: u32 = 5;
    /// Content (the config, a result) could not be decoded.
    pub const DECODE: u32 = 6;
    /// The network config is invalid: a field is missing, has the wrong type or a bad value.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Transient: the caller should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve an ADD now.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: the plugin can serve ADDs with limited connectivity.
    pub const LIMITED_CONNECTIVITY: u32 = 51;

    /// IPAM: every address of a range set is taken.
    pub const NO_ADDRESS_AVAILABLE: u32 = 100;
    /// A kernel (netlink, sysctl, nftables) operation failed.
    pub const KERNEL: u32 = 101;
    /// A delegated plugin could not be found or run, or printed something that is not CNI.
    pub const DELEGATE: u32 = 102;
    /// The on-disk address store is unusable or inconsistent.
    pub const STORE: u32 = 103;
    /// CHECK found the container's network not as the previous result describes it.
    pub const CHECK_MISMATCH: u32 = 104;
    /// A hostPort (`runtimeConfig.portMappings`) another pod on the node already holds.
    pub const HOST_PORT_IN_USE: u32 = 105;
}

/// A CNI error: a code, a one-line message and details a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_NETWORK_CONFIG, msg)
    }

    pub fn io(what: impl fmt::Display, err: &std::io::Error) -> CniError {
        CniError::new(code::IO, format!("{what}: {err}"))
    }

    /// The error as the spec prints it, tagged with the version the config asked for.
    pub fn to_json(&self, version: Version) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_spec_shape() {
        let e = CniError::new(code::INVALID_ENV, "bad").with_details("CNI_IFNAME is empty");
        assert_eq!(
            e.to_json(Version::V1_0_0),
            serde_json::json!({"cniVersion": "1.0.0", "code": 4, "msg": "bad", "details": "CNI_IFNAME is empty"})
        );
        let e = CniError::new(code::IO, "x");
        assert!(e.to_json(Version::V0_3_1).get("details").is_none());
    }
}
