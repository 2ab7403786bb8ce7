//! A runtime that gives up on an ADD kills the plugin with SIGKILL (Go's `exec.CommandContext`
//! kills only the child it started) and then runs DEL. The plugin's IPAM child must not outlive
//! it: one that reserves after that DEL leaks the address until GC or a reboot.

mod common;

use common::*;
use serde_json::json;
use trellis_tests::process::HeldLock;
use trellis_tests::Netns;

#[test]
fn a_plugin_killed_mid_add_leaves_no_reservation_once_del_has_run() {
    let node = Node::new();
    let conf = node.conf("bridge", true, json!({}));
    let lock = node.data.path().join("tnet/lock");
    let mut leaked = Vec::new();
    for i in 0..10 {
        let id = format!("killed{i}");
        let pod = Netns::new("tpk");
        let reserved = node.reservations();
        // The IPAM child is caught waiting for the store's lock and stopped there, so that it
        // can only go on after the runtime's DEL (the order that leaks).
        let held = HeldLock::take(&lock);
        let mut add = node.call("ADD", &conf, &id, Some(&pod)).spawn();
        let ipam = held.stall_child(add.id(), "trellis-ipam");
        add.kill().expect("SIGKILL the plugin");
        add.wait().expect("reap the plugin");
        node.del(&conf, &id, Some(&pod)).ok();
        ipam.resume();
        if node.reservations() > reserved {
            leaked.push(id);
        }
    }
    assert!(
        leaked.is_empty(),
        "{} of 10 killed ADDs reserved an address after their DEL: {leaked:?}",
        leaked.len()
    );
    assert!(
        std::fs::read_dir(node.data.path().join("tnet/.trellis/index"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "index entries left behind"
    );
    assert!(node.host_ends().is_empty(), "{:?}", node.host_ends());
}
