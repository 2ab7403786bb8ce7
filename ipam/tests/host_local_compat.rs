//! A node can switch between the reference host-local (Debian's `containernetworking-plugins`)
//! and trellis-ipam in either direction without losing or duplicating a reservation.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use trellis_tests::cni::reference_plugin;
use trellis_tests::{require_root, TempDir};

fn conf(dir: &Path, ty: &str) -> Value {
    // /28: 13 assignable addresses, so both plugins must work around each other's reservations.
    config(
        "0.4.0",
        "compat",
        dir,
        ty,
        json!({"ranges": [[{"subnet": "10.30.0.0/28"}]]}),
    )
}

#[test]
fn trellis_never_hands_out_what_host_local_reserved_and_releases_it() {
    require_root();
    let dir = TempDir::new("compat");
    let hl = reference_plugin("host-local");
    let mut taken = HashSet::new();
    for i in 0..5 {
        let ips = call(&hl, "ADD", &conf(dir.path(), "host-local"), &format!("hl{i}")).ips();
        taken.insert(ips[0].clone());
    }
    for i in 0..8 {
        let ips = call(&ipam_bin(), "ADD", &conf(dir.path(), "trellis-ipam"), &format!("tr{i}")).ips();
        assert!(taken.insert(ips[0].clone()), "trellis-ipam handed out {} twice", ips[0]);
    }
    // 13 addresses, 13 pods: both must now report the range exhausted.
    assert_ne!(
        call(&ipam_bin(), "ADD", &conf(dir.path(), "trellis-ipam"), "x").exit_code,
        0
    );
    assert_ne!(call(&hl, "ADD", &conf(dir.path(), "host-local"), "y").exit_code, 0);
    // trellis-ipam releases a reservation that host-local made (the store was written by
    // host-local since trellis last looked: the index is rebuilt once).
    let before = reserved(dir.path(), "compat");
    call(&ipam_bin(), "DEL", &conf(dir.path(), "trellis-ipam"), "hl2").ok();
    assert_eq!(before.len() - 1, reserved(dir.path(), "compat").len());
    // And repeated ADD of a host-local attachment returns host-local's address.
    let hl0 = call(&ipam_bin(), "ADD", &conf(dir.path(), "trellis-ipam"), "hl0").ips();
    assert!(before.contains(&hl0[0]));
    assert_eq!(reserved(dir.path(), "compat").len(), before.len() - 1);
}

#[test]
fn host_local_never_hands_out_what_trellis_reserved_and_releases_it() {
    require_root();
    let dir = TempDir::new("compat");
    let hl = reference_plugin("host-local");
    let mut taken = HashSet::new();
    for i in 0..6 {
        let ips = call(&ipam_bin(), "ADD", &conf(dir.path(), "trellis-ipam"), &format!("tr{i}")).ips();
        taken.insert(ips[0].clone());
    }
    for i in 0..7 {
        let ips = call(&hl, "ADD", &conf(dir.path(), "host-local"), &format!("hl{i}")).ips();
        assert!(taken.insert(ips[0].clone()), "host-local handed out {} twice", ips[0]);
    }
    assert_eq!(taken.len(), 13);
    // host-local finds and releases trellis's reservations (same file format).
    for i in 0..6 {
        call(&hl, "DEL", &conf(dir.path(), "host-local"), &format!("tr{i}")).ok();
    }
    assert_eq!(reserved(dir.path(), "compat").len(), 7);
    // trellis-ipam keeps working after host-local changed the store behind its back.
    let ips = call(&ipam_bin(), "ADD", &conf(dir.path(), "trellis-ipam"), "tr-new").ips();
    assert!(!reserved(dir.path(), "compat").is_empty() && ips.len() == 1);
    for i in 0..7 {
        call(&ipam_bin(), "DEL", &conf(dir.path(), "trellis-ipam"), &format!("hl{i}")).ok();
    }
    assert_eq!(reserved(dir.path(), "compat"), HashSet::from([ips[0].clone()]));
}
