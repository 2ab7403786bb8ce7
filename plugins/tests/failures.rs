//! Every failure path: the right code, a message, a non-zero exit, and a node left exactly as it
//! was (no veth, no address, no route, no reservation).

mod common;

use common::*;
use serde_json::{json, Value};
use trellis_cni::code;
use trellis_tests::Netns;

/// Runs a failing ADD and checks the code, the message and that the node did not change.
fn fails_cleanly(node: &Node, conf: &Value, pod: &Netns, want: u32, needle: &str) {
    let before = node.snapshot();
    let out = node.call("ADD", conf, "bad", Some(pod)).run();
    assert_eq!(out.err_code(), want as u64, "{}", out.stdout);
    assert!(out.stdout.contains(needle), "message {} lacks {needle:?}", out.stdout);
    assert_same(
        &before,
        &node.snapshot(),
        &format!("a failed ADD left something on the node: {}", out.stdout),
    );
    assert!(
        !pod.exec(&["ip", "link", "show", "eth0"]).status.success() || needle == "already exists",
        "the pod kept an eth0"
    );
}

/// A node where the network's shared objects already exist (so that the snapshot only shows
/// what one ADD would add).
fn warm_node(mode: &str) -> (Node, Value) {
    let node = Node::new();
    let conf = node.conf(mode, true, json!({}));
    let warm = Netns::new("tpw");
    node.add(&conf, "warm", &warm);
    node.del(&conf, "warm", Some(&warm)).ok();
    (node, conf)
}

#[test]
fn a_failing_route_rolls_back_the_veth_addresses_and_reservation() {
    // Both modes share the undo path (the host end by name, then IPAM DEL); bridge mode has a
    // step that fails late and on purpose: an IPAM route whose gateway is on no link. The
    // kernel refuses it after the veth, the pod's addresses and the reservation were made.
    let (node, conf) = warm_node("bridge");
    let mut bad = conf.clone();
    bad["ipam"]["routes"] = json!([{"dst": "192.0.2.0/24", "gw": "10.99.99.99"}]);
    fails_cleanly(&node, &bad, &Netns::new("tpf"), code::KERNEL, "192.0.2.0/24");
}

#[test]
fn an_exhausted_range_creates_nothing() {
    let node = Node::new();
    let conf = node.conf("bridge", false, json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.85.0.0/30"}]], "dataDir": node.data.path()}}));
    let first = Netns::new("tpe");
    node.add(&conf, "e1", &first);
    fails_cleanly(
        &node,
        &conf,
        &Netns::new("tpe"),
        code::NO_ADDRESS_AVAILABLE,
        "10.85.0.0/30",
    );
    node.del(&conf, "e1", Some(&first)).ok();
}

#[test]
fn a_non_bridge_device_with_the_bridge_name_is_refused_and_the_address_released() {
    let node = Node::new();
    node.ns
        .exec_ok(&["ip", "link", "add", "tbr0", "type", "veth", "peer", "name", "tbr0p"]);
    let conf = node.conf("bridge", false, json!({}));
    fails_cleanly(
        &node,
        &conf,
        &Netns::new("tpb"),
        code::INVALID_NETWORK_CONFIG,
        "not a bridge",
    );
}

#[test]
fn an_ifname_already_taken_in_the_pod_is_refused_and_the_address_released() {
    let (node, conf) = warm_node("bridge");
    let pod = Netns::new("tpi");
    pod.exec_ok(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    fails_cleanly(&node, &conf, &pod, code::KERNEL, "already exists");
    assert!(
        pod.exec(&["ip", "link", "show", "eth0p"]).status.success(),
        "the pod's own eth0 was touched"
    );
}

#[test]
fn a_missing_namespace_or_ipam_plugin_or_bad_config_changes_nothing() {
    let (node, conf) = warm_node("bridge");
    let pod = Netns::new("tpn");
    let before = node.snapshot();

    let out = node
        .call("ADD", &conf, "x", None)
        .netns("/run/netns/trellis-no-such-ns")
        .run();
    assert_eq!(out.err_code(), code::INVALID_ENV as u64);

    let mut no_ipam = conf.clone();
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    let out = node.call("ADD", &no_ipam, "x", Some(&pod)).run();
    assert_eq!(out.err_code(), code::DELEGATE as u64);
    assert!(out.stdout.contains("no-such-ipam"), "{}", out.stdout);

    for (field, value, needle) in [
        ("mode", json!("tunnel"), "tunnel"),
        ("mtu", json!(20), "mtu"),
        ("bridge", json!("a-name-far-too-long"), "bridge"),
        ("ipam", json!({}), "ipam.type"),
        ("isGateway", json!("yes"), "expected a boolean"),
    ] {
        let mut bad = conf.clone();
        bad[field] = value;
        let out = node.call("ADD", &bad, "x", Some(&pod)).run();
        assert_eq!(
            out.err_code(),
            code::INVALID_NETWORK_CONFIG as u64,
            "{field}: {}",
            out.stdout
        );
        assert!(out.stdout.contains(needle), "{field}: {}", out.stdout);
    }
    assert_same(&before, &node.snapshot(), "a refused ADD changed the node");
    assert!(!pod.exec(&["ip", "link", "show", "eth0"]).status.success());
}

#[test]
fn add_into_the_nodes_own_namespace_is_refused_and_changes_nothing() {
    // A runtime bug (or a hostNetwork pod sent through CNI) passes the node's own namespace as
    // the pod's: wiring it would replace the node's default route, and DEL would then leave the
    // node with none.
    let (node, conf) = warm_node("bridge");
    node.ns
        .exec_ok(&["ip", "link", "add", "tup0", "type", "veth", "peer", "name", "tup0p"]);
    node.ns.exec_ok(&["ip", "link", "set", "tup0p", "up"]);
    node.ns.exec_ok(&["ip", "link", "set", "tup0", "up"]);
    node.ns.exec_ok(&["ip", "addr", "add", "192.0.2.10/24", "dev", "tup0"]);
    node.ns.exec_ok(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
    let before = node.snapshot();
    let own = node.ns.path().to_string_lossy().into_owned();
    for mode in ["bridge", "routed"] {
        let mut conf = conf.clone();
        conf["mode"] = json!(mode);
        for netns in [own.as_str(), "/proc/self/ns/net"] {
            let out = node.call("ADD", &conf, "self", None).netns(netns).run();
            assert_eq!(
                out.err_code(),
                code::INVALID_ENV as u64,
                "{mode} {netns}: {}",
                out.stdout
            );
            let v = out.json();
            assert!(v["msg"].as_str().unwrap().contains(netns), "{mode}: {v}");
            assert!(
                v["msg"].as_str().unwrap().contains("own network namespace"),
                "{mode}: {v}"
            );
            assert!(v["details"].as_str().is_some_and(|d| d.contains("pod")), "{mode}: {v}");
            // What a runtime does after a failed ADD.
            node.call("DEL", &conf, "self", None).netns(netns).run().ok();
        }
    }
    assert_same(
        &before,
        &node.snapshot(),
        "an ADD into the node's namespace changed the node",
    );
}

#[test]
fn a_cni_netns_that_is_not_a_network_namespace_is_code_4_and_changes_nothing() {
    let (node, conf) = warm_node("bridge");
    let dir = trellis_tests::TempDir::new("netns");
    let file = dir.path().join("not-a-netns");
    std::fs::write(&file, "x").unwrap();
    let before = node.snapshot();
    for netns in [file.as_path(), dir.path(), std::path::Path::new("/proc/self/ns/mnt")] {
        let out = node.call("ADD", &conf, "notns", None).netns(netns).run();
        assert_eq!(
            out.err_code(),
            code::INVALID_ENV as u64,
            "{}: {}",
            netns.display(),
            out.stdout
        );
        let v = out.json();
        assert!(v["msg"].as_str().unwrap().contains(&*netns.to_string_lossy()), "{v}");
        assert!(
            v["details"].as_str().is_some_and(|d| d.contains("network namespace")),
            "{v}"
        );
    }
    assert_same(&before, &node.snapshot(), "a refused ADD changed the node");
}

/// A node whose bridge exists, up, without the network's gateway addresses (made by hand, or
/// left by a config with another subnet).
fn node_with_a_bare_bridge() -> Node {
    let node = Node::new();
    node.ns.exec_ok(&["ip", "link", "add", "tbr0", "type", "bridge"]);
    node.ns.exec_ok(&["ip", "link", "set", "tbr0", "up"]);
    node
}

#[test]
fn a_failed_add_removes_the_gateway_addresses_it_gave_an_existing_bridge() {
    let node = node_with_a_bare_bridge();
    let conf = node.conf("bridge", true, json!({}));
    let pod = Netns::new("tpi");
    pod.exec_ok(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
    fails_cleanly(&node, &conf, &pod, code::KERNEL, "already exists");
}

#[test]
fn a_subnet_of_everything_is_refused_before_the_node_is_touched() {
    let node = node_with_a_bare_bridge();
    let data = node.data.path();
    for ipam in [
        json!({"type": "trellis-ipam", "ranges": [[{"subnet": "0.0.0.0/0"}]], "dataDir": data}),
        json!({"type": "trellis-ipam", "ranges": [[{"subnet": "::/0"}]], "dataDir": data}),
        // Another IPAM plugin may hand out such an address: the plugin refuses it too.
        json!({"type": "static", "addresses": [{"address": "10.88.0.5/0", "gateway": "10.88.0.1"}]}),
    ] {
        // Debian's reference plugins speak CNI up to 1.0.0.
        let conf = node.conf("bridge", false, json!({"cniVersion": "1.0.0", "ipam": ipam}));
        fails_cleanly(&node, &conf, &Netns::new("tpz"), code::INVALID_NETWORK_CONFIG, "/0");
    }
}

/// A failed ADD on a node that enforces NetworkPolicy: the pod was held (its interface name in
/// routed mode, its addresses in bridge mode) before the failure, and nothing of it stays held
/// (a stale address would hold the next pod that gets it).
#[test]
fn a_failed_add_leaves_nothing_held_for_network_policy_both_modes() {
    use trellis_net::nft::{PolicyState, PolicyTable, PortKind, POLICY_TABLE};
    for (mode, kind) in [("bridge", PortKind::Bridged), ("routed", PortKind::Routed)] {
        let (node, conf) = warm_node(mode);
        trellis_net::netns::run_in(node.ns.path(), || {
            PolicyTable::new(POLICY_TABLE, kind)
                .and_then(|t| t.apply(&PolicyState::default()))
                .map(|_| ())
        })
        .unwrap()
        .unwrap();
        let records = trellis_tests::TempDir::new("records");
        let mut conf = conf;
        conf["antiSpoofingRecords"] = json!(records.path());
        let pod = Netns::new("tph");
        pod.exec_ok(&["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"]);
        fails_cleanly(&node, &conf, &pod, code::KERNEL, "already exists");
        let table = node.ns.exec_ok(&["nft", "list", "table", "inet", POLICY_TABLE]);
        assert!(!table.contains("elements"), "{mode}: something stayed held:\n{table}");
    }
}
