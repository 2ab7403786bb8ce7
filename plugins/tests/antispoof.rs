//! Anti-spoofing against a hostile pod with CAP_NET_RAW: pod A writes whole Ethernet frames on
//! its interface (`trellis_tests::forge`) to pod B on the same node — UDP with its own source,
//! another pod's, an outside address, and (bridge mode) a forged MAC; a gratuitous ARP and an
//! unsolicited NDP advertisement claiming B's addresses — and B counts what arrives while the
//! node's neighbour cache is checked for poisoning. Each case runs with `antiSpoofing` on (the
//! default) and off (the forgeries must then get through, or the test proves nothing), in bridge
//! and routed mode, IPv4 and IPv6.

mod common;

use common::Node;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;
use trellis_tests::forge::{arp_claim, mac_of, na_claim, send_frames, udp4, udp6, Mac, Receiver};
use trellis_tests::Netns;

const TIMES: usize = 10;
const PORT: u16 = 7777;

fn addrs(result: &Value) -> (Ipv4Addr, Ipv6Addr) {
    let ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let v4 = ips.iter().find_map(|i| match i {
        IpAddr::V4(a) => Some(*a),
        _ => None,
    });
    let v6 = ips.iter().find_map(|i| match i {
        IpAddr::V6(a) => Some(*a),
        _ => None,
    });
    (v4.unwrap(), v6.unwrap())
}

/// What got through: datagrams per kind, and whether the node's neighbour entries for B were
/// poisoned.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    own_source4: usize,
    own_source6: usize,
    other_pod_source4: usize,
    other_pod_source6: usize,
    outside_source4: usize,
    outside_source6: usize,
    forged_mac: usize,
    arp_poisoned: bool,
    ndp_poisoned: bool,
}

fn count(sources: &[IpAddr], ip: IpAddr) -> usize {
    sources.iter().filter(|s| **s == ip).count()
}

fn node_neigh_mac(node: &Node, ip: IpAddr) -> String {
    let out = node.ns.ip(&["neigh", "show", &ip.to_string()]);
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or("")
        .to_string()
}

fn mac_text(m: Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn attack(mode: &str, anti_spoofing: bool) -> Outcome {
    let node = Node::new();
    let conf = node.conf(mode, true, json!({"antiSpoofing": anti_spoofing}));
    let (a, b) = (Netns::new("tsa"), Netns::new("tsb"));
    let (a4, a6) = addrs(&node.add(&conf, "a", &a));
    let (b4, b6) = addrs(&node.add(&conf, "b", &b));
    let (a_mac, b_mac) = (mac_of(&a, "eth0"), mac_of(&b, "eth0"));
    // Normal traffic works either way.
    a.exec_ok(&["ping", "-c", "1", "-W", "2", &b4.to_string()]);
    a.exec_ok(&["ping", "-c", "1", "-W", "2", &b6.to_string()]);
    if mode == "bridge" {
        // B in the node's neighbour cache (the node is B's gateway on the bridge), old enough
        // that the kernel takes an update (`locktime`, 1 s).
        node.ns.exec_ok(&["ping", "-c", "1", "-W", "2", &b4.to_string()]);
        node.ns.exec_ok(&["ping", "-c", "1", "-W", "2", &b6.to_string()]);
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Where A's frames go first: B itself on a bridge, the host end (A's gateway) when routed.
    let next_hop: Mac = if mode == "bridge" {
        b_mac
    } else {
        let host_end = trellis_plugin::names::host_veth_name("tnet", "a", "eth0");
        mac_of(&node.ns, &host_end)
    };
    let other_pod4: Ipv4Addr = "10.88.0.200".parse().unwrap();
    let other_pod6: Ipv6Addr = "fd00:88::c8".parse().unwrap();
    let outside4: Ipv4Addr = "8.8.8.8".parse().unwrap();
    let outside6: Ipv6Addr = "2001:4860:4860::8888".parse().unwrap();
    let forged: Mac = [0x0a, 0x58, 0xde, 0xad, 0xbe, 0xef];

    let rx = Receiver::bind(b.path(), PORT);
    let frames = vec![
        udp4(next_hop, a_mac, a4, b4, PORT, b"own"),
        udp6(next_hop, a_mac, a6, b6, PORT, b"own"),
        udp4(next_hop, a_mac, other_pod4, b4, PORT, b"other pod"),
        udp6(next_hop, a_mac, other_pod6, b6, PORT, b"other pod"),
        udp4(next_hop, a_mac, outside4, b4, PORT, b"outside"),
        udp6(next_hop, a_mac, outside6, b6, PORT, b"outside"),
    ];
    send_frames(a.path(), "eth0", &frames, TIMES);
    let mut sources = rx.sources(Duration::from_millis(300));
    // The right address with someone else's MAC (a bridge learns MACs per port).
    let forged_before = sources.len();
    if mode == "bridge" {
        send_frames(a.path(), "eth0", &[udp4(next_hop, forged, a4, b4, PORT, b"mac")], TIMES);
        sources.extend(rx.sources(Duration::from_millis(300)));
    }
    let forged_mac = sources.len() - forged_before;

    // Claim B's addresses for A's MAC: the node's cache must keep B's.
    let gw6 = trellis_tests::forge::link_local(a_mac);
    send_frames(
        a.path(),
        "eth0",
        &[arp_claim(a_mac, a_mac, b4), na_claim(a_mac, gw6, b6, a_mac)],
        3,
    );
    std::thread::sleep(Duration::from_millis(200));
    let a_text = mac_text(a_mac);
    let outcome = Outcome {
        own_source4: count(&sources, a4.into()),
        own_source6: count(&sources, a6.into()),
        other_pod_source4: count(&sources, other_pod4.into()),
        other_pod_source6: count(&sources, other_pod6.into()),
        outside_source4: count(&sources, outside4.into()),
        outside_source6: count(&sources, outside6.into()),
        forged_mac,
        arp_poisoned: node_neigh_mac(&node, b4.into()) == a_text,
        ndp_poisoned: node_neigh_mac(&node, b6.into()) == a_text,
    };
    eprintln!("{mode} mode, antiSpoofing {anti_spoofing}: {outcome:?}");
    node.del(&conf, "a", Some(&a)).ok();
    node.del(&conf, "b", Some(&b)).ok();
    outcome
}

/// What anti-spoofing must let through: only A's own datagrams.
fn protected() -> Outcome {
    Outcome {
        own_source4: TIMES,
        own_source6: TIMES,
        ..Outcome::default()
    }
}

#[test]
fn bridge_mode_drops_forged_sources_macs_arp_and_ndp() {
    assert_eq!(attack("bridge", true), protected());
}

#[test]
fn routed_mode_drops_forged_sources() {
    // ARP and NDP on a routed host end reach only the node, which answers for itself: nothing
    // to poison there (the node's entry for B is on B's own host end).
    assert_eq!(attack("routed", true), protected());
}

#[test]
fn without_anti_spoofing_the_same_forgeries_get_through() {
    let bridge = attack("bridge", false);
    assert_eq!(bridge.other_pod_source4, TIMES, "{bridge:?}");
    assert_eq!(bridge.other_pod_source6, TIMES, "{bridge:?}");
    assert_eq!(bridge.outside_source4, TIMES, "{bridge:?}");
    assert_eq!(bridge.forged_mac, TIMES, "{bridge:?}");
    assert!(bridge.arp_poisoned && bridge.ndp_poisoned, "{bridge:?}");
    let routed = attack("routed", false);
    assert_eq!(routed.other_pod_source4, TIMES, "{routed:?}");
    assert_eq!(routed.other_pod_source6, TIMES, "{routed:?}");
}
