//! The host end of a pod's veth: a name and a label derived from the attachment, so that DEL
//! (which may come after the pod's namespace is gone) and GC find it without any state file.

use trellis_cni::env::{bounded_container_id, fnv1a64};

/// Every host end Trellis creates starts with this.
pub const HOST_PREFIX: &str = "trl";

/// `trl` + 12 hex digits of a hash of (network, container ID, ifname): 15 bytes, the kernel's
/// limit, stable across retries, and 48 bits make a collision on one node vanishingly unlikely.
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    let h = fnv1a64([network, container_id, ifname]);
    format!("{HOST_PREFIX}{:012x}", h >> 16)
}

/// The longest label the kernel takes for a link: `IFALIASZ` (256) less the NUL, which the
/// netlink attribute carries too (255 bytes are refused with `ERANGE`).
pub const MAX_ALIAS_LEN: usize = 254;

/// The longest hostPort owner. An nftables element's comment shares the element's 255 bytes
/// of extensions with its key and data: measured on 6.18, a 252-byte comment is refused and a
/// 253-byte one silently dropped. 200 leaves room on every map and kernel.
pub const MAX_OWNER_LEN: usize = 200;

/// The longest network name the labels leave room for (with a 15-byte ifname and a shortened
/// container ID); longer names are refused in the config.
pub const MAX_NETWORK_LEN: usize = 128;

/// `trellis/<network>/<container ID>/<ifname>`, the container ID shortened
/// ([`bounded_container_id`]) when the whole would pass `max` (the spec does not limit an ID's
/// length).
fn label(network: &str, container_id: &str, ifname: &str, max: usize) -> String {
    let room = max.saturating_sub(network_prefix(network).len() + 1 + ifname.len());
    format!(
        "{}{}/{ifname}",
        network_prefix(network),
        bounded_container_id(container_id, room)
    )
}

/// The label (`IFLA_IFALIAS`) written on the host end, which GC reads back to learn whose it is.
/// Unchanged from earlier versions wherever those could write it (up to [`MAX_ALIAS_LEN`]).
pub fn host_alias(network: &str, container_id: &str, ifname: &str) -> String {
    label(network, container_id, ifname, MAX_ALIAS_LEN)
}

/// The owner the attachment's nftables elements carry (hostPorts, anti-spoofing): its label,
/// bounded to [`MAX_OWNER_LEN`] (an element comment's room).
pub fn element_owner(network: &str, container_id: &str, ifname: &str) -> String {
    label(network, container_id, ifname, MAX_OWNER_LEN)
}

/// The owners the attachment's hostPort elements may carry: the one ADD writes now
/// ([`element_owner`]) first, then the whole label that earlier versions wrote when
/// it differs (they wrote it whole up to about 250 bytes), so DEL, CHECK and GC find both.
pub fn hostport_owners(network: &str, container_id: &str, ifname: &str) -> Vec<String> {
    let owner = element_owner(network, container_id, ifname);
    let whole = format!("{}{container_id}/{ifname}", network_prefix(network));
    if whole == owner || whole.len() > MAX_ALIAS_LEN {
        vec![owner]
    } else {
        vec![owner, whole]
    }
}

/// What every label of `network` starts with.
fn network_prefix(network: &str) -> String {
    format!("trellis/{network}/")
}

/// Whether `alias` labels a host end (or hostPort) of `network`.
pub fn is_of_network(alias: &str, network: &str) -> bool {
    alias.starts_with(&network_prefix(network))
}

/// A stable, locally administered unicast MAC for a bridge, derived from its name.
pub fn bridge_mac(bridge: &str) -> trellis_net::MacAddr {
    let h = fnv1a64(["bridge", bridge]).to_be_bytes();
    trellis_net::MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
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
    fn names_never_change_across_versions() {
        // Host ends made by an older plugin must be found by a newer one's DEL and GC.
        assert_eq!(host_veth_name("net", "abc", "eth0"), "trlf4a7b98154ef");
        assert_eq!(host_alias("net", "abc", "eth0"), "trellis/net/abc/eth0");
    }

    #[test]
    fn aliases_tell_their_network() {
        let a = host_alias("net", "c1", "eth0");
        assert!(is_of_network(&a, "net"));
        assert!(!is_of_network(&a, "ne"));
        assert!(!is_of_network(&a, "other"));
    }

    #[test]
    fn labels_and_owners_of_long_ids_fit_and_stay_distinct() {
        let long = |last: char| "0123456789".repeat(30) + &last.to_string();
        let network = "n".repeat(MAX_NETWORK_LEN);
        for (label, max) in [
            (host_alias as fn(&str, &str, &str) -> String, MAX_ALIAS_LEN),
            (
                |n: &str, c: &str, i: &str| hostport_owners(n, c, i).remove(0),
                MAX_OWNER_LEN,
            ),
        ] {
            let (a, b) = (
                label(&network, &long('a'), "fifteen-chars-x"),
                label(&network, &long('b'), "fifteen-chars-x"),
            );
            assert!(a.len() <= max, "{}", a.len());
            assert_ne!(a, b);
            assert!(is_of_network(&a, &network) && a.ends_with("/fifteen-chars-x"), "{a}");
        }
    }

    #[test]
    fn hostport_owners_include_the_whole_label_earlier_versions_wrote() {
        assert_eq!(hostport_owners("net", "abc", "eth0"), ["trellis/net/abc/eth0"]);
        let id = "a".repeat(220);
        let owners = hostport_owners("net", &id, "eth0");
        assert_eq!(owners.len(), 2);
        assert!(owners[0].len() <= MAX_OWNER_LEN);
        assert_eq!(owners[1], format!("trellis/net/{id}/eth0"));
        assert_eq!(hostport_owners("net", &"a".repeat(300), "eth0").len(), 1);
    }
}
