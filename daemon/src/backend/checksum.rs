//! TX checksum offload on the VXLAN device: on or off, by the running kernel's version.
//!
//! # Why
//!
//! On kernels without "netfilter: nat: never update the UDP checksum when it's 0" (mainline
//! 5.7-rc5, commit ea64d8d6c675; stable 5.4.41, 4.19.123, 4.14.181), a VXLAN packet whose outer
//! UDP header gets NATed (kube-proxy's `MASQUERADE --random-fully` on traffic to a service)
//! leaves with a corrupted outer checksum when the device offloads the inner checksum: the
//! receiver drops it ("UDP: bad checksum"), and TCP connections stall for 63 seconds (SYN
//! retries) — flannel#1279, calico#3145. The workaround is to turn TX checksum offload off on the
//! VXLAN device (`ethtool -K flannel.1 tx-checksum-ip-generic off`), at a CPU cost. With
//! `ChecksumOffload: auto` we turn it off only on kernels that predate the fix
//! ([`tx_checksum_offload`]), as Calico's felix did ("ChecksumOffloadBroken" below v5.7); `on`
//! and `off` force it.
//!
//! The decision is made once, at start ([`decide`]); the VXLAN device keeps it in place (see
//! `super::vxlan`).

use crate::config::ChecksumOffload;

/// A kernel release's version numbers (`6.1.0-18-amd64` -> 6.1.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl KernelVersion {
    /// Parses the leading `MAJOR.MINOR[.PATCH]` of a release string (`uname -r`).
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let head: String = release
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = head.split('.').filter(|p| !p.is_empty()).map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(Result::ok).unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }

    /// Whether this kernel carries "netfilter: nat: never update the UDP checksum when it's 0":
    /// mainline from 5.7 (merged for 5.7-rc5), and the stable backports 5.4.41, 4.19.123 and
    /// 4.14.181. Other branches (5.6, 4.9 and older) are counted as unfixed, as are distribution
    /// kernels that number their backports differently (Ubuntu 5.4.0-N, RHEL 4.18.0-N): the safe
    /// side, which only costs some CPU.
    pub fn has_udp_checksum_fix(self) -> bool {
        let KernelVersion(major, minor, patch) = self;
        match (major, minor) {
            (m, _) if m > 5 => true,
            (5, n) if n >= 7 => true,
            (5, 4) => patch >= 41,
            (4, 19) => patch >= 123,
            (4, 14) => patch >= 181,
            _ => false,
        }
    }
}

/// Whether TX checksum offload should be on for the VXLAN device, and why (for the log).
/// `release` is the running kernel's (`uname -r`), `None` when it could not be read.
pub fn tx_checksum_offload(setting: ChecksumOffload, release: Option<&str>) -> (bool, String) {
    match setting {
        ChecksumOffload::On => (true, "ChecksumOffload is \"on\" in net-conf.json".into()),
        ChecksumOffload::Off => (false, "ChecksumOffload is \"off\" in net-conf.json".into()),
        ChecksumOffload::Auto => match release.map(|r| (r, KernelVersion::parse(r))) {
            Some((r, Some(v))) if v.has_udp_checksum_fix() => (
                true,
                format!(
                    "kernel {r} carries the VXLAN/NAT UDP checksum fix (mainline 5.7; stable 5.4.41, \
                     4.19.123, 4.14.181)"
                ),
            ),
            Some((r, Some(_))) => (
                false,
                format!(
                    "kernel {r} predates the VXLAN/NAT UDP checksum fix (mainline 5.7; stable 5.4.41, \
                     4.19.123, 4.14.181): NATed VXLAN packets would leave with bad checksums \
                     (flannel#1279); set ChecksumOffload \"on\" if your distribution backported it"
                ),
            ),
            Some((r, None)) => (false, format!("kernel release {r:?} not understood: off to be safe")),
            None => (false, "kernel release unknown: off to be safe".into()),
        },
    }
}

/// Decides for the running kernel ([`tx_checksum_offload`]) and logs the decision and why.
pub fn decide(setting: ChecksumOffload) -> bool {
    let release = kernel_release();
    let (on, reason) = tx_checksum_offload(setting, release.as_deref());
    tracing::info!(
        kernel = release.as_deref().unwrap_or("unknown"),
        tx_checksum_offload = if on { "on" } else { "off" },
        "VXLAN TX checksum offload: {reason}"
    );
    on
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        for (release, want) in [
            ("6.18.44-fc-v595", Some(KernelVersion(6, 18, 44))),
            ("5.4.0-42-generic", Some(KernelVersion(5, 4, 0))),
            ("4.18.0-348.el8.x86_64", Some(KernelVersion(4, 18, 0))),
            ("3.10", Some(KernelVersion(3, 10, 0))),
            ("6.9-rc1", Some(KernelVersion(6, 9, 0))),
            ("garbage", None),
            ("6", None),
        ] {
            assert_eq!(KernelVersion::parse(release), want, "{release}");
        }
    }

    #[test]
    fn offload_goes_off_only_on_kernels_without_the_fix() {
        let auto = |r: &str| tx_checksum_offload(ChecksumOffload::Auto, Some(r)).0;
        for fixed in [
            "5.7.0",
            "5.10.0-28-amd64",
            "6.1.0-18-amd64",
            "6.18.44-fc-v595",
            "5.4.41",
            "4.19.123",
            "4.14.181",
        ] {
            assert!(auto(fixed), "{fixed} has the fix");
        }
        for broken in [
            "5.6.19",
            "5.4.40",
            "5.4.0-107-generic",
            "4.19.122",
            "4.14.180",
            "4.18.0-348.el8",
            "4.9.337",
            "3.10.0-1160.el7",
        ] {
            assert!(!auto(broken), "{broken} predates the fix");
        }
        assert!(!tx_checksum_offload(ChecksumOffload::Auto, None).0);
        assert!(!tx_checksum_offload(ChecksumOffload::Auto, Some("weird")).0);
        assert!(tx_checksum_offload(ChecksumOffload::On, Some("3.10.0")).0);
        assert!(!tx_checksum_offload(ChecksumOffload::Off, Some("6.18.0")).0);
        let (_, why) = tx_checksum_offload(ChecksumOffload::Auto, Some("5.4.0-42-generic"));
        assert!(
            why.contains("5.4.0-42-generic") && why.contains("flannel#1279"),
            "{why}"
        );
    }
}
