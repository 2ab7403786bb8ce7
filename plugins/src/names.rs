//! The host end of a pod's veth: a name and a label derived from the attachment, so that DEL
//! (which may come after the pod's namespace is gone) and GC find it without any state file.

/// Every host end Trellis creates starts with this.
pub const HOST_PREFIX: &str = "trl";

/// `trl` + 12 hex digits of a hash of (network, container ID, ifname): 15 bytes, the kernel's
/// limit, stable across retries, and 48 bits make a collision on one node vanishingly unlikely.
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    let h = fnv1a64([network, container_id, ifname]);
    format!("{HOST_PREFIX}{:012x}", h >> 16)
}

/// The label (`IFLA_IFALIAS`) written on the host end, which GC reads back to learn whose it is.
pub fn host_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("trellis/{network}/{container_id}/{ifname}")
}

/// The (container ID, ifname) of a host end of `network`, from its label.
pub fn parse_alias<'a>(alias: &'a str, network: &str) -> Option<(&'a str, &'a str)> {
    let rest = alias
        .strip_prefix("trellis/")?
        .strip_prefix(network)?
        .strip_prefix('/')?;
    rest.split_once('/')
}

/// A stable, locally administered unicast MAC for a bridge, derived from its name.
pub fn bridge_mac(bridge: &str) -> trellis_net::MacAddr {
    let h = fnv1a64(["bridge", bridge]).to_be_bytes();
    trellis_net::MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
}

/// FNV-1a over the parts with a separator that cannot occur in them.
fn fnv1a64<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_short_and_distinct() {
        let a = host_veth_name("net", "abc", "eth0");
        assert_eq!(a, host_veth_name("net", "abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with(HOST_PREFIX));
        assert_ne!(a, host_veth_name("net", "abc", "eth1"));
        assert_ne!(a, host_veth_name("net2", "abc", "eth0"));
        assert_ne!(host_veth_name("n", "ab", "c"), host_veth_name("n", "a", "bc"));
    }

    #[test]
    fn aliases_round_trip_per_network() {
        let a = host_alias("net", "c1", "eth0");
        assert_eq!(parse_alias(&a, "net"), Some(("c1", "eth0")));
        assert_eq!(parse_alias(&a, "ne"), None);
        assert_eq!(parse_alias(&a, "other"), None);
    }
}
