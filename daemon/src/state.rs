//! The daemon's own state under `--state-dir` (`/run/trellis`, a hostPath in the manifest):
//! what it must remember across its own restarts, and nothing else. Today that is the pod
//! CIDRs it held, so that a restarted daemon asks the datastore for the same ones (etcd) even
//! after its lease expired, and its pods keep addresses that are routed to them.
//!
//! `/run` is emptied at boot, as it should be: pods do not survive a reboot (trellis-ipam
//! releases their reservations then), so their CIDR need not either.

use ipnetwork::IpNetwork;
use std::path::{Path, PathBuf};

pub const DEFAULT_DIR: &str = "/run/trellis";

fn cidrs_file(dir: &Path) -> PathBuf {
    dir.join("pod-cidrs.json")
}

/// Remembers `cidrs` (atomically; unchanged content is not rewritten).
pub fn write_cidrs(dir: &Path, cidrs: &[IpNetwork]) -> std::io::Result<()> {
    let text = serde_json::to_string(cidrs).expect("CIDRs are JSON") + "\n";
    crate::cniconf::write_if_changed(&cidrs_file(dir), &text).map(|_| ())
}

/// The CIDRs remembered; none when there is no (readable) file.
pub fn read_cidrs(dir: &Path) -> Vec<IpNetwork> {
    std::fs::read_to_string(cidrs_file(dir))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Where the plugin leaves each protected pod's identity (one file per host end), so that the
/// dataplane can put the pod's anti-spoofing elements back after a flushed ruleset.
pub fn pod_records(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_round_trip_and_a_missing_file_is_none() {
        let dir = std::env::temp_dir().join(format!("trellisd-state-{}", std::process::id()));
        assert!(read_cidrs(&dir).is_empty());
        let cidrs: Vec<IpNetwork> = vec!["10.244.3.0/24".parse().unwrap(), "fd00:244:3::/64".parse().unwrap()];
        write_cidrs(&dir, &cidrs).unwrap();
        assert_eq!(read_cidrs(&dir), cidrs);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
