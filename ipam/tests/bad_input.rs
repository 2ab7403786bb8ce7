//! Every kind of bad input gets the right CNI code, a message an operator can act on, a non-zero
//! exit, and writes nothing.

mod common;

use common::*;
use serde_json::{json, Value};
use trellis_cni::code;
use trellis_tests::{require_root, CniCall, TempDir};

fn expect_error(dir: &TempDir, conf: Value, want: u32, needle: &str) {
    let before = tree(dir.path());
    let out = call(&ipam_bin(), "ADD", &conf, "c1");
    assert_eq!(out.err_code(), want as u64, "{conf}: {}", out.stdout);
    let v = out.json();
    let text = format!("{} {}", v["msg"], v["details"]);
    assert!(text.contains(needle), "{conf}: message {text:?} lacks {needle:?}");
    assert_eq!(tree(dir.path()), before, "{conf}: a failed ADD wrote something");
}

#[test]
fn bad_configs_get_the_right_code_and_write_nothing() {
    require_root();
    let dir = TempDir::new("bad");
    let d = dir.path();
    let ok = |ipam: Value| config("1.0.0", "badnet", d, "trellis-ipam", ipam);
    let cases: Vec<(Value, u32, &str)> = vec![
        (
            json!({"cniVersion": "1.0.0", "name": "badnet", "type": "bridge"}),
            code::INVALID_NETWORK_CONFIG,
            "ipam",
        ),
        (ok(json!({})), code::INVALID_NETWORK_CONFIG, "no ranges"),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/24", "rangeStart": "10.41.0.1"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "outside subnet",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/24", "rangeEnd": "10.40.1.1"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "outside subnet",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/33"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "invalid subnet",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.300/24"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "invalid subnet",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "0.0.0.0/0"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "every address",
        ),
        (
            ok(json!({"subnet": "::/0"})),
            code::INVALID_NETWORK_CONFIG,
            "every address",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "fd00:40::/127"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "too small",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/24", "rangeStart": "10.40.0.1", "rangeEnd": "10.40.0.1"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "no address",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/24"}], [{"subnet": "10.40.0.128/25"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "overlap",
        ),
        (
            ok(json!({"ranges": [[{"subnet": 42}]]})),
            code::INVALID_NETWORK_CONFIG,
            "invalid type",
        ),
        (
            ok(json!({"ranges": [[{"subnet": "10.40.0.0/24", "gateway": "not-an-ip"}]]})),
            code::INVALID_NETWORK_CONFIG,
            "ipam config",
        ),
        (
            config(
                "1.0.0",
                "badnet",
                std::path::Path::new("relative"),
                "trellis-ipam",
                json!({"subnet": "10.40.0.0/24"}),
            ),
            code::INVALID_NETWORK_CONFIG,
            "dataDir",
        ),
        (
            config(
                "1.0.0",
                "badnet",
                &d.join("../../etc"),
                "trellis-ipam",
                json!({"subnet": "10.40.0.0/24"}),
            ),
            code::INVALID_NETWORK_CONFIG,
            "dataDir",
        ),
        (
            config(
                "1.0.0",
                "../escape",
                d,
                "trellis-ipam",
                json!({"subnet": "10.40.0.0/24"}),
            ),
            code::INVALID_NETWORK_CONFIG,
            "network name",
        ),
        (
            config("1.0.0", "a/b", d, "trellis-ipam", json!({"subnet": "10.40.0.0/24"})),
            code::INVALID_NETWORK_CONFIG,
            "network name",
        ),
        (
            config("0.2.0", "badnet", d, "trellis-ipam", json!({"subnet": "10.40.0.0/24"})),
            code::INCOMPATIBLE_VERSION,
            "0.2.0",
        ),
        (
            config("7.0.0", "badnet", d, "trellis-ipam", json!({"subnet": "10.40.0.0/24"})),
            code::INCOMPATIBLE_VERSION,
            "plugin supports",
        ),
    ];
    for (conf, want, needle) in cases {
        expect_error(&dir, conf, want, needle);
    }
}

#[test]
fn malformed_json_is_a_decoding_error() {
    require_root();
    let dir = TempDir::new("bad");
    let mut child = std::process::Command::new(ipam_bin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "/x")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/x")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"cniVersion\": \"1.0.0\", \"name\": ")
        .unwrap();
    let out = trellis_tests::CniOutput::from_child(child);
    assert_eq!(out.err_code(), code::DECODE as u64);
    assert!(tree(dir.path()).is_empty());
}

#[test]
fn bad_environment_is_code_4() {
    require_root();
    let dir = TempDir::new("bad");
    let conf = config(
        "1.0.0",
        "badnet",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.40.0.0/24"}),
    );
    let base = CniCall::new(ipam_bin(), "ADD", conf).container("c1").netns("/x");
    for call in [
        base.clone().container("bad id!"),
        base.clone().ifname("this-name-is-way-too-long"),
        base.clone().ifname("a/b"),
        base.clone().command("FROB"),
    ] {
        assert_eq!(call.run().err_code(), code::INVALID_ENV as u64, "{call:?}");
    }
    assert!(tree(dir.path()).is_empty());
}

#[test]
fn an_exhausted_range_is_named_and_reserves_nothing() {
    require_root();
    let dir = TempDir::new("bad");
    let conf = config(
        "1.0.0",
        "full",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.41.0.0/24"}], [{"subnet": "10.42.0.0/30"}]]}),
    );
    call(&ipam_bin(), "ADD", &conf, "c0").ok();
    let before = reserved(dir.path(), "full");
    let out = call(&ipam_bin(), "ADD", &conf, "c1");
    assert_eq!(out.err_code(), code::NO_ADDRESS_AVAILABLE as u64);
    assert!(
        out.json()["msg"].as_str().unwrap().contains("10.42.0.0/30"),
        "{}",
        out.stdout
    );
    // The first range set had room, but nothing was reserved from it either.
    assert_eq!(reserved(dir.path(), "full"), before);
}

#[test]
fn a_symlink_planted_in_the_data_dir_is_refused() {
    require_root();
    let dir = TempDir::new("bad");
    let target = TempDir::new("target");
    std::os::unix::fs::symlink(target.path(), dir.path().join("planted")).unwrap();
    let conf = config(
        "1.0.0",
        "planted",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.43.0.0/24"}),
    );
    let out = call(&ipam_bin(), "ADD", &conf, "c1");
    assert_eq!(out.err_code(), code::STORE as u64);
    assert!(out.stdout.contains("symlink"), "{}", out.stdout);
    assert!(tree(target.path()).is_empty(), "wrote through the symlink");

    // A symlink in place of a reservation file: the address counts as taken and is never written.
    let conf = config(
        "1.0.0",
        "real",
        dir.path(),
        "trellis-ipam",
        json!({"subnet": "10.43.0.0/24"}),
    );
    std::fs::create_dir_all(dir.path().join("real")).unwrap();
    let victim = target.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("real/10.43.0.2")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("real/last_reserved_ip.0")).unwrap();
    assert_eq!(call(&ipam_bin(), "ADD", &conf, "c1").ips(), ["10.43.0.3"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
}

#[test]
fn a_symlink_planted_at_the_temporary_reservation_leaves_nothing_behind() {
    require_root();
    let dir = TempDir::new("bad");
    let target = TempDir::new("target");
    let conf = config(
        "1.0.0",
        "tmp",
        dir.path(),
        "trellis-ipam",
        json!({"ranges": [[{"subnet": "10.44.0.0/24"}], [{"subnet": "fd00:44::/64"}]]}),
    );
    call(&ipam_bin(), "ADD", &conf, "c0").ok();
    let victim = target.path().join("victim");
    std::fs::write(&victim, "keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("tmp/.trellis/tmp-reservation")).unwrap();
    let before = tree(dir.path());
    let out = call(&ipam_bin(), "ADD", &conf, "c1");
    assert_eq!(out.err_code(), code::STORE as u64, "{}", out.stdout);
    assert!(out.stdout.contains("tmp-reservation"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert_eq!(tree(dir.path()), before, "the refused ADD left something behind");
    // The store still works for everyone else once the symlink is gone.
    std::fs::remove_file(dir.path().join("tmp/.trellis/tmp-reservation")).unwrap();
    assert_eq!(call(&ipam_bin(), "ADD", &conf, "c1").ips().len(), 2);
}
