//! ADD, DEL, CHECK, STATUS and GC of the built `trellis-ipam`, run as a runtime runs it.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use trellis_cni::code;
use trellis_tests::{require_root, CniCall, CniOutput, TempDir};

#[test]
fn add_prints_each_cni_version_and_del_releases() {
    require_root();
    let dir = TempDir::new("ipam");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let conf = config(
            v,
            "verbs",
            dir.path(),
            "trellis-ipam",
            json!({"ranges": [[{"subnet": "10.20.0.0/24"}], [{"subnet": "fd00:20::/64"}]], "routes": [{"dst": "0.0.0.0/0"}]}),
        );
        let id = format!("c{i}");
        let out = call(&ipam_bin(), "ADD", &conf, &id).ok();
        assert_eq!(out["cniVersion"], *v);
        let ips = out["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "one address per range set: {out}");
        assert!(ips[0]["address"].as_str().unwrap().starts_with("10.20.0."));
        assert!(ips[1]["address"].as_str().unwrap().starts_with("fd00:20::"));
        assert_eq!(ips[0]["gateway"], "10.20.0.1");
        assert_eq!(out["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(ips[0].get("version").is_some(), v.starts_with('0'), "{v}: {out}");
    }
    assert_eq!(reserved(dir.path(), "verbs").len(), 10);
    let conf = config(
        "1.0.0",
        "verbs",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.20.0.0/24"}], [{"subnet": "fd00:20::/64"}]]}),
    );
    for i in 0..5 {
        call(&ipam_bin(), "DEL", &conf, &format!("c{i}")).ok();
        // DEL is idempotent.
        call(&ipam_bin(), "DEL", &conf, &format!("c{i}")).ok();
    }
    assert!(reserved(dir.path(), "verbs").is_empty());
}

#[test]
fn repeated_add_returns_the_same_addresses_and_round_robin_moves_on() {
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.0.0",
        "rr",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.21.0.0/24"}),
    );
    let a = call(&ipam_bin(), "ADD", &conf, "a").ips();
    assert_eq!(call(&ipam_bin(), "ADD", &conf, "a").ips(), a);
    assert_eq!(a, ["10.21.0.2"]);
    // Another ifname of the same container is another attachment.
    let a1 = CniCall::new(ipam_bin(), "ADD", conf.clone())
        .container("a")
        .ifname("net1")
        .netns("/x")
        .run()
        .ips();
    assert_eq!(a1, ["10.21.0.3"]);
    call(&ipam_bin(), "DEL", &conf, "a").ok();
    // A released address is not handed out again at once: round-robin continues after the last.
    assert_eq!(call(&ipam_bin(), "ADD", &conf, "b").ips(), ["10.21.0.4"]);
}

#[test]
fn two_hundred_concurrent_adds_get_two_hundred_distinct_addresses() {
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.0.0",
        "conc",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.22.0.0/24"}]]}),
    );
    let children: Vec<_> = (0..200)
        .map(|i| {
            CniCall::new(ipam_bin(), "ADD", conf.clone())
                .container(&format!("pod{i}"))
                .netns("/x")
                .spawn()
        })
        .collect();
    let mut seen = HashSet::new();
    for child in children {
        let ips = CniOutput::from_child(child).ips();
        assert_eq!(ips.len(), 1);
        assert!(seen.insert(ips[0].clone()), "duplicate address {}", ips[0]);
    }
    assert_eq!(seen.len(), 200);
    assert_eq!(reserved(dir.path(), "conc"), seen);
    let children: Vec<_> = (0..200)
        .map(|i| {
            CniCall::new(ipam_bin(), "DEL", conf.clone())
                .container(&format!("pod{i}"))
                .spawn()
        })
        .collect();
    for child in children {
        CniOutput::from_child(child).ok();
    }
    assert!(reserved(dir.path(), "conc").is_empty());
}

#[test]
fn check_reports_a_missing_reservation() {
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.0.0",
        "chk",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.23.0.0/24"}),
    );
    let result = call(&ipam_bin(), "ADD", &conf, "c1").ok();
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result;
    call(&ipam_bin(), "CHECK", &with_prev, "c1").ok();
    std::fs::remove_file(dir.path().join("chk/10.23.0.2")).unwrap();
    assert_eq!(
        call(&ipam_bin(), "CHECK", &with_prev, "c1").err_code(),
        code::CHECK_MISMATCH as u64
    );
}

#[test]
fn gc_releases_everything_not_in_valid_attachments() {
    require_root();
    let dir = TempDir::new("ipam");
    let mut conf = config(
        "1.1.0",
        "gc",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.24.0.0/24"}),
    );
    for i in 0..5 {
        call(&ipam_bin(), "ADD", &conf, &format!("c{i}")).ok();
    }
    conf["cni.dev/valid-attachments"] =
        json!([{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c3", "ifname": "eth0"}]);
    call(&ipam_bin(), "GC", &conf, "").ok();
    assert_eq!(
        reserved(dir.path(), "gc"),
        HashSet::from(["10.24.0.3".to_string(), "10.24.0.5".to_string()])
    );
    // The survivors are still found by (container, ifname).
    assert_eq!(call(&ipam_bin(), "ADD", &conf, "c1").ips(), ["10.24.0.3"]);
    // GC without the list refuses to guess.
    conf.as_object_mut().unwrap().remove("cni.dev/valid-attachments");
    assert_eq!(
        call(&ipam_bin(), "GC", &conf, "").err_code(),
        code::INVALID_NETWORK_CONFIG as u64
    );
    assert_eq!(reserved(dir.path(), "gc").len(), 2);
    // `null` is what Go runtimes (libcni) send once the node has no pod left: none is in use.
    conf["cni.dev/valid-attachments"] = serde_json::Value::Null;
    call(&ipam_bin(), "GC", &conf, "").ok();
    assert!(
        reserved(dir.path(), "gc").is_empty(),
        "{:?}",
        reserved(dir.path(), "gc")
    );
}

#[test]
fn status_fails_with_50_when_the_store_is_unusable_or_the_range_exhausted() {
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.1.0",
        "st",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.25.0.0/30"}),
    );
    call(&ipam_bin(), "STATUS", &conf, "").ok();
    // A /30 has one assignable address once the gateway is taken out.
    call(&ipam_bin(), "ADD", &conf, "c1").ok();
    let out = call(&ipam_bin(), "STATUS", &conf, "");
    assert_eq!(out.err_code(), code::PLUGIN_NOT_AVAILABLE as u64);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("10.25.0.0/30"),
        "{}",
        out.stdout
    );
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let conf = config("1.1.0", "st", &file, "trellis-ipam", json!({"subnet": "10.25.0.0/24"}));
    assert_eq!(
        call(&ipam_bin(), "STATUS", &conf, "").err_code(),
        code::PLUGIN_NOT_AVAILABLE as u64
    );
}

#[test]
fn del_of_something_never_added_succeeds_and_creates_nothing() {
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.0.0",
        "none",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.26.0.0/24"}),
    );
    call(&ipam_bin(), "DEL", &conf, "ghost").ok();
    assert!(tree(dir.path()).is_empty());
}

#[test]
fn container_ids_of_hundreds_of_characters_are_reserved_found_and_released() {
    // The spec does not limit a container ID's length; a file name holds 255 bytes.
    require_root();
    let dir = TempDir::new("ipam");
    let conf = config(
        "1.1.0",
        "long",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.25.0.0/24"}),
    );
    let long = |last: char| "0123456789abcdef".repeat(25) + &last.to_string();
    let (a, b) = (long('a'), long('b'));
    let ip_a = call(&ipam_bin(), "ADD", &conf, &a).ips();
    let ip_b = call(&ipam_bin(), "ADD", &conf, &b).ips();
    assert_ne!(ip_a, ip_b);
    assert_eq!(
        call(&ipam_bin(), "ADD", &conf, &a).ips(),
        ip_a,
        "a retried ADD got another address"
    );
    // A reservation host-local made for a long ID: the index is rebuilt from it.
    std::fs::write(dir.path().join("long/10.25.0.200"), format!("{}\r\neth0", long('c'))).unwrap();
    call(&ipam_bin(), "ADD", &conf, "short").ok();
    call(&ipam_bin(), "DEL", &conf, &a).ok();
    assert!(!reserved(dir.path(), "long").contains(&ip_a[0]));
    assert!(reserved(dir.path(), "long").contains(&ip_b[0]));
    for id in [b.as_str(), &long('c'), "short"] {
        call(&ipam_bin(), "DEL", &conf, id).ok();
    }
    assert!(
        reserved(dir.path(), "long").is_empty(),
        "{:?}",
        reserved(dir.path(), "long")
    );
}
