//! Two pods on one node reach each other, their gateway and an address of the node, in both
//! modes, IPv4 only and dual stack.

mod common;

use common::*;
use serde_json::json;
use trellis_tests::Netns;

fn pods_talk(mode: &str, dual: bool) {
    let node = Node::new();
    // An address that belongs to the node itself (not the bridge), as a service on the node has.
    node.ns
        .exec_ok(&["ip", "link", "add", "nd0", "type", "veth", "peer", "name", "nd0p"]);
    node.ns.exec_ok(&["ip", "addr", "add", "198.51.100.1/32", "dev", "nd0"]);
    node.ns
        .exec_ok(&["ip", "addr", "add", "2001:db8:100::1/128", "dev", "nd0"]);
    node.ns.exec_ok(&["ip", "link", "set", "nd0", "up"]);
    node.ns.exec_ok(&["ip", "link", "set", "nd0p", "up"]);
    let conf = node.conf(mode, dual, json!({}));
    let (a, b) = (Netns::new("tpa"), Netns::new("tpb"));
    let ra = node.add(&conf, "pod-a", &a);
    let rb = node.add(&conf, "pod-b", &b);
    let (ia, ib) = (addresses(&ra), addresses(&rb));
    assert_eq!(ia.len(), if dual { 2 } else { 1 }, "{ra}");
    for (from, to) in [(&a, &ib), (&b, &ia)] {
        for ip in to.iter() {
            assert!(ping(from, ip), "{mode}: {} cannot reach {ip}", from.name);
        }
    }
    // The gateway. Bridge mode: the bridge holds it and answers. Routed mode: nothing holds the
    // link-local gateway (as with Calico's 169.254.1.1); it resolves to the host end's MAC, so
    // the pod reaches it at layer 2 and everything beyond it through it.
    let host_mac = ra["interfaces"][if mode == "bridge" { 1 } else { 0 }]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    for ip in ra["ips"].as_array().unwrap() {
        let gw = ip["gateway"].as_str().unwrap();
        if mode == "bridge" {
            assert!(ping(&a, gw), "{mode}: no reply from gateway {gw}");
        } else {
            let neigh = a.exec_ok(&["ip", "neigh", "show", gw, "dev", "eth0"]);
            assert!(
                neigh.contains(&host_mac),
                "{mode}: gateway {gw} resolves to {neigh:?}, not the host end {host_mac}"
            );
        }
    }
    assert!(ping(&a, "198.51.100.1"), "{mode}: pod cannot reach the node");
    if dual {
        assert!(
            ping(&a, "2001:db8:100::1"),
            "{mode}: pod cannot reach the node over IPv6"
        );
    }
    // The result names the pod's interface.
    let pod_if = ra["ips"][0]["interface"].as_u64().unwrap() as usize;
    assert_eq!(ra["interfaces"][pod_if]["name"], "eth0");
    assert_eq!(ra["interfaces"][pod_if]["sandbox"], a.path().to_string_lossy().as_ref());
    assert_eq!(ra["interfaces"][pod_if]["mtu"], 1400);
    let mtu = a.exec_ok(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1400");
    node.del(&conf, "pod-a", Some(&a)).ok();
    node.del(&conf, "pod-b", Some(&b)).ok();
    assert!(node.host_ends().is_empty());
    assert_eq!(node.reservations(), 0);
}

#[test]
fn bridge_mode_ipv4() {
    pods_talk("bridge", false);
}

#[test]
fn bridge_mode_dual_stack() {
    pods_talk("bridge", true);
}

#[test]
fn routed_mode_ipv4() {
    pods_talk("routed", false);
}

#[test]
fn routed_mode_dual_stack() {
    pods_talk("routed", true);
}

#[test]
fn masquerade_rewrites_traffic_leaving_the_subnet_only() {
    let node = Node::new();
    // An "outside" host reachable from the node over a veth.
    let outside = Netns::new("tpo");
    node.ns.exec_ok(&[
        "ip",
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "up1",
        "netns",
        &outside.name,
    ]);
    node.ns.exec_ok(&["ip", "addr", "add", "203.0.113.1/24", "dev", "up0"]);
    node.ns.exec_ok(&["ip", "link", "set", "up0", "up"]);
    outside.exec_ok(&["ip", "addr", "add", "203.0.113.2/24", "dev", "up1"]);
    outside.exec_ok(&["ip", "link", "set", "up1", "up"]);
    let conf = node.conf("bridge", false, json!({}));
    let pod = Netns::new("tpm");
    node.add(&conf, "pod-m", &pod);
    // The outside host has no route back to the pod subnet: only a masqueraded ping returns.
    assert!(ping(&pod, "203.0.113.2"), "masqueraded traffic did not come back");
    let without = node.conf(
        "bridge",
        false,
        json!({"name": "tnet2", "ipMasq": false, "bridge": "tbr1",
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.87.0.0/24"}]], "dataDir": node.data.path()}}),
    );
    let pod2 = Netns::new("tpm");
    node.add(&without, "pod-n", &pod2);
    let out = pod2.exec(&["ping", "-c", "1", "-W", "1", "203.0.113.2"]);
    assert!(
        !out.status.success(),
        "a pod of a network without ipMasq was masqueraded"
    );
    node.del(&conf, "pod-m", Some(&pod)).ok();
    node.del(&without, "pod-n", Some(&pod2)).ok();
}
