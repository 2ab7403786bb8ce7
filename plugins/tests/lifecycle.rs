//! What ADD creates, DEL removes: many cycles, concurrency, repeated and late DELs.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use trellis_tests::{CniOutput, Netns};

fn cycles_leave_the_node_as_before(mode: &str) {
    let node = Node::new();
    let conf = node.conf(mode, true, json!({}));
    // The first pod creates what every pod of the network shares (the bridge with its gateway
    // addresses, forwarding, the subnet's masquerade rule), as the reference bridge does; the
    // snapshot is taken after it.
    let warm = Netns::new("tpw");
    node.add(&conf, "warm", &warm);
    node.del(&conf, "warm", Some(&warm)).ok();
    let before = node.snapshot();
    for i in 0..200 {
        let pod = Netns::new("tpc");
        node.add(&conf, &format!("cycle{i}"), &pod);
        node.del(&conf, &format!("cycle{i}"), Some(&pod)).ok();
    }
    let after = node.snapshot();
    assert_same(&before, &after, &format!("{mode}: 200 ADD/DEL cycles changed the node"));
}

#[test]
fn two_hundred_cycles_leave_the_node_as_before_bridge() {
    cycles_leave_the_node_as_before("bridge");
}

#[test]
fn two_hundred_cycles_leave_the_node_as_before_routed() {
    cycles_leave_the_node_as_before("routed");
}

fn concurrent(mode: &str) {
    let node = Node::new();
    let conf = node.conf(mode, false, json!({}));
    let before = {
        let warm = Netns::new("tpw");
        node.add(&conf, "warm", &warm);
        node.del(&conf, "warm", Some(&warm)).ok();
        node.snapshot()
    };
    let pods: Vec<Netns> = (0..50).map(|_| Netns::new("tpx")).collect();
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.call("ADD", &conf, &format!("c{i}"), Some(p)).spawn())
        .collect();
    let mut seen = HashSet::new();
    for child in children {
        let r = CniOutput::from_child(child).ok();
        for ip in addresses(&r) {
            assert!(seen.insert(ip.clone()), "duplicate {ip}");
        }
    }
    assert_eq!(node.host_ends().len(), 50);
    // Every pod reaches the first one.
    let first = addresses(&node.add(&conf, "c0", &pods[0]))[0].clone();
    for p in pods.iter().skip(1).step_by(7) {
        assert!(ping(p, &first), "{mode}: {} cannot reach {first}", p.name);
    }
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| node.call("DEL", &conf, &format!("c{i}"), Some(p)).spawn())
        .collect();
    for child in children {
        CniOutput::from_child(child).ok();
    }
    assert_same(
        &before,
        &node.snapshot(),
        &format!("{mode}: 50 concurrent ADD/DELs changed the node"),
    );
}

#[test]
fn fifty_concurrent_adds_then_dels_bridge() {
    concurrent("bridge");
}

#[test]
fn fifty_concurrent_adds_then_dels_routed() {
    concurrent("routed");
}

#[test]
fn del_twice_and_del_after_the_namespace_is_gone_succeed_and_release() {
    let node = Node::new();
    for mode in ["bridge", "routed"] {
        let conf = node.conf(mode, true, json!({}));
        let pod = Netns::new("tpd");
        node.add(&conf, "d1", &pod);
        node.del(&conf, "d1", Some(&pod)).ok();
        node.del(&conf, "d1", Some(&pod)).ok();
        let pod2 = Netns::new("tpd");
        node.add(&conf, "d2", &pod2);
        let path = pod2.path().to_path_buf();
        drop(pod2);
        // The namespace is gone: DEL still releases the address and removes the host end.
        node.call("DEL", &conf, "d2", None).netns(&path).run().ok();
        node.del(&conf, "d2", None).ok();
        assert!(node.host_ends().is_empty(), "{mode}: {:?}", node.host_ends());
        assert_eq!(node.reservations(), 0, "{mode}");
        // DEL of something never added.
        node.del(&conf, "never", None).ok();
    }
}

#[test]
fn add_retried_for_the_same_attachment_keeps_its_address() {
    let node = Node::new();
    let conf = node.conf("bridge", true, json!({}));
    let pod = Netns::new("tpr");
    let first = addresses(&node.add(&conf, "r1", &pod));
    let again = addresses(&node.add(&conf, "r1", &pod));
    assert_eq!(first, again);
    assert_eq!(node.host_ends().len(), 1);
    node.del(&conf, "r1", Some(&pod)).ok();
}

#[test]
fn gc_removes_host_ends_and_reservations_of_attachments_no_longer_valid() {
    let node = Node::new();
    let conf = node.conf("routed", false, json!({}));
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("tpg")).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&conf, &format!("g{i}"), p);
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    node.call("GC", &gc, "", None).run().ok();
    assert_eq!(node.host_ends().len(), 1);
    assert_eq!(node.reservations(), 1);
    assert!(pods[1].exec(&["ip", "link", "show", "eth0"]).status.success());
    assert!(!pods[0].exec(&["ip", "link", "show", "eth0"]).status.success());
    node.del(&conf, "g1", Some(&pods[1])).ok();
}

/// A spec-valid container ID of `len` characters, ending in `last`.
fn long_id(len: usize, last: char) -> String {
    let mut id: String = "0123456789abcdef".chars().cycle().take(len - 1).collect();
    id.push(last);
    id
}

#[test]
fn container_ids_of_hundreds_of_characters_work_and_leave_nothing() {
    // The spec does not limit a container ID's length; the kernel limits a link's label and
    // the file system a file name, so names derived from the ID must not grow with it.
    let node = Node::new();
    for mode in ["bridge", "routed"] {
        let conf = node.conf(
            mode,
            true,
            json!({"runtimeConfig": {"portMappings": [{"hostPort": 18081, "containerPort": 80}]}}),
        );
        let warm = Netns::new("tpw");
        node.add(&conf, "warm", &warm);
        node.del(&conf, "warm", Some(&warm)).ok();
        let before = node.snapshot();
        for len in [250, 1000] {
            // Two IDs alike but for their last character are two attachments.
            let (a, b) = (long_id(len, 'a'), long_id(len, 'b'));
            let (pa, pb) = (Netns::new("tpl"), Netns::new("tpl"));
            let mut with_prev = conf.clone();
            with_prev["prevResult"] = node.add(&conf, &a, &pa);
            let mut other = conf.clone();
            other["runtimeConfig"] = json!({});
            node.add(&other, &b, &pb);
            assert_eq!(node.host_ends().len(), 2, "{mode} {len}");
            node.call("CHECK", &with_prev, &a, Some(&pa)).run().ok();
            let mut gc = conf.clone();
            gc["cni.dev/valid-attachments"] = json!([{"containerID": a, "ifname": "eth0"}]);
            node.call("GC", &gc, "", None).run().ok();
            assert_eq!(node.host_ends().len(), 1, "{mode} {len}: GC kept the wrong ones");
            assert_eq!(node.reservations(), 2, "{mode} {len}");
            node.call("CHECK", &with_prev, &a, Some(&pa)).run().ok();
            node.del(&conf, &a, Some(&pa)).ok();
            node.del(&other, &b, Some(&pb)).ok();
            assert_same(
                &before,
                &node.snapshot(),
                &format!("{mode}: a {len}-character ID left something"),
            );
        }
    }
}

#[test]
fn gc_with_null_valid_attachments_as_go_runtimes_send_cleans_an_emptied_node() {
    // libcni marshals an empty Go slice that was never allocated as `null`: a node whose last
    // pod is gone gets `"cni.dev/valid-attachments": null`, and that means "none".
    let node = Node::new();
    let conf = node.conf("bridge", true, json!({}));
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("tpg")).collect();
    for (i, p) in pods.iter().enumerate() {
        node.add(&conf, &format!("n{i}"), p);
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = serde_json::Value::Null;
    node.call("GC", &gc, "", None).run().ok();
    assert!(node.host_ends().is_empty(), "{:?}", node.host_ends());
    assert_eq!(node.reservations(), 0);
    // A config without the key at all is still refused: nobody said what is in use.
    node.add(&conf, "n0", &pods[0]);
    let out = node.call("GC", &conf, "", None).run();
    assert_eq!(out.err_code(), trellis_cni::code::INVALID_NETWORK_CONFIG as u64);
    assert!(out.stdout.contains("valid-attachments"), "{}", out.stdout);
    assert_eq!(node.host_ends().len(), 1);
    node.del(&conf, "n0", Some(&pods[0])).ok();
}
