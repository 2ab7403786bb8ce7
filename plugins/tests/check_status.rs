//! CHECK finds what someone changed behind the plugin's back; STATUS says when ADD cannot work.

mod common;

use common::*;
use serde_json::json;
use trellis_cni::code;
use trellis_tests::Netns;

#[test]
fn check_passes_then_reports_a_removed_address_or_route() {
    let node = Node::new();
    for mode in ["bridge", "routed"] {
        let conf = node.conf(mode, true, json!({}));
        let pod = Netns::new("tpk");
        let result = node.add(&conf, "k1", &pod);
        let mut with_prev = conf.clone();
        with_prev["prevResult"] = result.clone();
        node.call("CHECK", &with_prev, "k1", Some(&pod)).run().ok();

        let addr = result["ips"][0]["address"].as_str().unwrap();
        pod.exec_ok(&["ip", "addr", "del", addr, "dev", "eth0"]);
        let out = node.call("CHECK", &with_prev, "k1", Some(&pod)).run();
        assert_eq!(out.err_code(), code::CHECK_MISMATCH as u64, "{mode}");
        assert!(out.stdout.contains(addr), "{mode}: {}", out.stdout);
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
