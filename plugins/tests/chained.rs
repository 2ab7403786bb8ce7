//! The reference `tuning`, `bandwidth`, `portmap` and `firewall` plugins (Debian's
//! containernetworking-plugins) accept `trellis`'s result as `prevResult` in a conflist, as a
//! runtime chains them: ADD in order, each fed the previous result; DEL in reverse.

mod common;

use common::*;
use serde_json::{json, Value};
use trellis_tests::cni::reference_plugin;
use trellis_tests::{CniCall, Netns};

fn chain() -> Vec<Value> {
    vec![
        json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "777"}}),
        json!({"type": "bandwidth", "ingressRate": 8000000, "ingressBurst": 1000000, "egressRate": 8000000, "egressBurst": 1000000}),
        json!({"type": "portmap", "capabilities": {"portMappings": true},
               "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}}),
        json!({"type": "firewall", "backend": "iptables"}),
    ]
}

fn run_chain(mode: &str) {
    let node = Node::new();
    let conf = node.conf(mode, false, json!({"cniVersion": "1.0.0"}));
    let pod = Netns::new("tpch");
    let mut prev = node.add(&conf, "chained", &pod);
    let mut applied = Vec::new();
    for link in chain() {
        let mut c = link.clone();
        c["cniVersion"] = json!("1.0.0");
        c["name"] = conf["name"].clone();
        c["prevResult"] = prev.clone();
        let ty = c["type"].as_str().unwrap().to_string();
        let mut call = CniCall::new(reference_plugin(&ty), "ADD", c.clone())
            .container("chained")
            .netns(pod.path());
        call.exec_in_netns = Some(node.ns.name.clone());
        let out = call.run();
        assert_eq!(
            out.exit_code, 0,
            "{mode}: {ty} refused trellis's result: {} {}",
            out.stdout, out.stderr
        );
        prev = out.json();
        applied.push((ty, c));
    }
    // Each plugin did its work on what trellis made.
    assert_eq!(pod.exec_ok(&["cat", "/proc/sys/net/core/somaxconn"]).trim(), "777");
    assert!(
        node.ns.exec_ok(&["tc", "qdisc", "show"]).contains("tbf"),
        "{mode}: bandwidth set no shaping"
    );
    assert!(
        node.ns.exec_ok(&["iptables-save"]).contains("18080"),
        "{mode}: portmap set no DNAT"
    );
    // CHECK through the chain (the reference plugins check against the final result), then DEL.
    for (ty, c) in applied.iter().rev() {
        let mut c = c.clone();
        c["prevResult"] = prev.clone();
        let mut call = CniCall::new(reference_plugin(ty), "DEL", c)
            .container("chained")
            .netns(pod.path());
        call.exec_in_netns = Some(node.ns.name.clone());
        call.run().ok();
    }
    let mut del = conf.clone();
    del["prevResult"] = prev;
    node.call("DEL", &del, "chained", Some(&pod)).run().ok();
    assert!(node.host_ends().is_empty());
}

#[test]
fn reference_plugins_chain_after_bridge_mode() {
    run_chain("bridge");
}

#[test]
fn reference_plugins_chain_after_routed_mode() {
    run_chain("routed");
}
