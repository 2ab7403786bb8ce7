//! CHECK finds what someone changed behind the plugin's back; STATUS says when ADD cannot work.

mod common;

use common::*;
use serde_json::json;
use trellis_cni::code;
use trellis_tests::Netns;

/// ADDs a pod and returns the config with its result as `prevResult`, ready for CHECK.
fn added(node: &Node, conf: &serde_json::Value, id: &str, pod: &Netns) -> serde_json::Value {
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = node.add(conf, id, pod);
    node.call("CHECK", &with_prev, id, Some(pod)).run().ok();
    with_prev
}

#[test]
fn check_passes_then_reports_a_removed_address_or_route() {
    let node = Node::new();
    for mode in ["bridge", "routed"] {
        let conf = node.conf(mode, true, json!({}));
        let pod = Netns::new("tpk");
        let mut with_prev = added(&node, &conf, "k1", &pod);

        let addr = with_prev["prevResult"]["ips"][0]["address"]
            .as_str()
            .unwrap()
            .to_string();
        pod.exec_ok(&["ip", "addr", "del", &addr, "dev", "eth0"]);
        let out = node.call("CHECK", &with_prev, "k1", Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{mode}");
        assert!(out.stdout.contains(&addr), "{mode}: {}", out.stdout);
        node.del(&conf, "k1", Some(&pod)).ok();

        // A route removed.
        let pod = Netns::new("tpk");
        let result = node.add(&conf, "k2", &pod);
        with_prev["prevResult"] = result;
        pod.exec_ok(&["ip", "route", "del", "default"]);
        let out = node.call("CHECK", &with_prev, "k2", Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{mode}");
        assert!(out.stdout.contains("0.0.0.0/0"), "{mode}: {}", out.stdout);
        node.del(&conf, "k2", Some(&pod)).ok();
    }
}

#[test]
fn status_is_50_when_a_non_bridge_holds_the_bridge_name_or_the_range_is_full() {
    let node = Node::new();
    let conf = node.conf("bridge", false, json!({}));
    node.call("STATUS", &conf, "", None).run().ok();
    node.ns
        .exec_ok(&["ip", "link", "add", "tbr0", "type", "veth", "peer", "name", "tbr0p"]);
    let out = node.call("STATUS", &conf, "", None).run();
    assert_eq!(out.err_code(), code::PLUGIN_NOT_AVAILABLE as u64);
    assert!(out.stdout.contains("not a bridge"), "{}", out.stdout);
    node.ns.exec_ok(&["ip", "link", "del", "tbr0"]);
    let small = node.conf("bridge", false, json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.86.0.0/30"}]], "dataDir": node.data.path()}}));
    let pod = Netns::new("tps");
    node.add(&small, "s1", &pod);
    assert_eq!(
        node.call("STATUS", &small, "", None).run().err_code(),
        code::PLUGIN_NOT_AVAILABLE as u64
    );
    node.del(&small, "s1", Some(&pod)).ok();
}

#[test]
fn check_reports_a_host_end_pod_end_or_bridge_set_down_in_both_modes() {
    let node = Node::new();
    for mode in ["bridge", "routed"] {
        let conf = node.conf(mode, true, json!({}));
        let pod = Netns::new("tpk");
        let with_prev = added(&node, &conf, "down1", &pod);
        let host_end = node.host_ends().pop().unwrap();
        node.ns.exec_ok(&["ip", "link", "set", &host_end, "down"]);
        let out = node.call("CHECK", &with_prev, "down1", Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{mode}: {}", out.stdout);
        let v = out.json();
        assert!(
            v["msg"].as_str().unwrap().contains(&host_end) && v["msg"].as_str().unwrap().contains("down"),
            "{mode}: {v}"
        );
        assert!(
            v["details"].as_str().is_some_and(|d| d.contains("ip link set")),
            "{mode}: {v}"
        );
        node.ns.exec_ok(&["ip", "link", "set", &host_end, "up"]);
        // The other links the pod's traffic crosses: its own end, and the bridge.
        pod.exec_ok(&["ip", "link", "set", "eth0", "down"]);
        let out = node.call("CHECK", &with_prev, "down1", Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{mode}: {}", out.stdout);
        assert!(
            out.json()["msg"].as_str().unwrap().contains("eth0"),
            "{mode}: {}",
            out.stdout
        );
        pod.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        if mode == "bridge" {
            node.ns.exec_ok(&["ip", "link", "set", "tbr0", "down"]);
            let out = node.call("CHECK", &with_prev, "down1", Some(&pod)).run();
            assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{}", out.stdout);
            assert!(out.json()["msg"].as_str().unwrap().contains("tbr0"), "{}", out.stdout);
            node.ns.exec_ok(&["ip", "link", "set", "tbr0", "up"]);
        }
        node.del(&conf, "down1", Some(&pod)).ok();
    }
}

#[test]
fn check_reports_a_deleted_host_route_in_routed_mode() {
    let node = Node::new();
    let conf = node.conf("routed", true, json!({}));
    for family in [0, 1] {
        let pod = Netns::new("tpk");
        let id = format!("route{family}");
        let with_prev = added(&node, &conf, &id, &pod);
        let ip = addresses(&with_prev["prevResult"])[family].clone();
        let host_end = node.host_ends().pop().unwrap();
        node.ns.exec_ok(&["ip", "route", "del", &ip, "dev", &host_end]);
        let out = node.call("CHECK", &with_prev, &id, Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{ip}: {}", out.stdout);
        let v = out.json();
        assert!(v["msg"].as_str().unwrap().contains(&ip), "{ip}: {v}");
        assert!(v["details"].as_str().is_some_and(|d| !d.is_empty()), "{ip}: {v}");
        node.del(&conf, &id, Some(&pod)).ok();
    }
}
