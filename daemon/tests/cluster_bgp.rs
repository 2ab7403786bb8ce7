//! BGP mode end to end: real `trellisd` processes speaking BGP to each other (full mesh) or to a
//! real BIRD route reflector in the underlay namespace, pods wired by the real plugins, traffic
//! over the BGP-learned routes.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use trellis_tests::bird::{bird_has, Bird};
use trellis_tests::cluster::{wait_until, Cluster, UNDERLAY};

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

fn net_conf(backend: &str) -> String {
    format!(r#"{{"Network": "10.244.0.0/16", "Backend": {backend}}}"#)
}

fn cluster(backend: &str, nodes: usize) -> Cluster {
    let mut c = Cluster::new(
        nodes,
        &net_conf(backend),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
    );
    for node in 0..nodes {
        c.add_pod(node);
        c.add_pod(node);
    }
    c
}

fn reach(c: &Cluster, what: &str) {
    if let Err(missing) = c.all_reach_all(Duration::from_secs(20)) {
        panic!("{what}: unreachable:\n{missing}\nnode1 log:\n{}", c.log(0));
    }
}

#[test]
fn bgp_full_mesh_every_pod_reaches_every_pod() {
    let c = cluster(r#"{"Type": "bgp", "ASNumber": 64512, "Mesh": true, "HoldTime": 9}"#, 3);
    reach(&c, "bgp mesh");
    // The routes are BGP's: via the other nodes' underlay addresses, with trellisd's protocol.
    let routes = c.nodes[0].ns.exec_ok(&["ip", "route", "show", "proto", "117"]);
    assert_eq!(routes.lines().count(), 2, "{routes}");
    assert!(
        routes.contains(&format!("via {UNDERLAY}.12")) && routes.contains(&format!("via {UNDERLAY}.13")),
        "{routes}"
    );
}

#[test]
fn bgp_with_a_bird_route_reflector_every_pod_reaches_every_pod() {
    let backend = format!(
        r#"{{"Type": "bgp", "ASNumber": 64512, "Mesh": false, "RouteReflectors": ["{UNDERLAY}.1"], "HoldTime": 9}}"#
    );
    let mut c = Cluster::new(
        3,
        &net_conf(&backend),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
    );
    let bird = c.start_bird_reflector(&["ipv4"]);
    for node in 0..3 {
        c.add_pod(node);
        c.add_pod(node);
    }
    reach(&c, "bgp via BIRD");
    // BIRD's own table holds every node's pod CIDR with that node as next hop.
    let cidrs: Vec<String> = (0..3).map(|i| c.node_cidr(i)).collect();
    wait_until(
        "BIRD holds every node's CIDR via the node",
        Duration::from_secs(10),
        || {
            let routes = bird.routes();
            (0..3).all(|i| bird_has(&routes, &cidrs[i], &format!("{UNDERLAY}.{}", 11 + i)))
        },
    );
}

#[test]
fn bgp_daemon_restart_with_graceful_restart_loses_no_ping() {
    let mut c = cluster(r#"{"Type": "bgp", "ASNumber": 64512, "Mesh": true, "HoldTime": 9}"#, 3);
    reach(&c, "bgp mesh");
    let target = c.pods[2].ips[0].clone();
    let (sent, got) = c.ping_during(0, &target, 6, |c| {
        // Restart the daemon of the node the target pod is on, and the first pod's.
        for i in [1, 0] {
            c.stop_daemon(i);
            std::thread::sleep(Duration::from_millis(300));
            c.start_daemon(i);
            std::thread::sleep(Duration::from_millis(1200));
        }
    });
    assert_eq!(
        sent,
        got,
        "pings lost across BGP daemon restarts\nnode1 log:\n{}",
        c.log(0)
    );
    reach(&c, "after restarts");
}

/// Issue 13: a configured peer's own TCP MD5 password from a file, as a mounted Secret. The
/// daemon's session with BIRD comes up signed; then the Secret is rotated on both sides (BIRD's
/// password, and the file swapped in through the `..data` symlink as the kubelet does): the
/// session goes down until a resync re-reads the file, then comes back with the new password.
#[test]
fn bgp_peer_password_file_rotated_like_a_secret() {
    let secret = trellis_tests::TempDir::new("bgpsecret");
    let dir = secret.path().to_path_buf();
    let publish = |version: u32, password: &str| {
        let v = dir.join(format!("..v{version}"));
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("tor1"), format!("{password}\n")).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        if !dir.join("tor1").is_symlink() {
            std::os::unix::fs::symlink("..data/tor1", dir.join("tor1")).unwrap();
        }
    };
    publish(1, "alpha-X");
    let bird_conf = |password: &str| {
        format!(
            "log stderr all;\nrouter id {UNDERLAY}.1;\nprotocol device {{ }}\nprotocol bgp node1 {{\n  \
             local {UNDERLAY}.1 as 64512;\n  neighbor {UNDERLAY}.11 as 64512;\n  direct;\n  password \"{password}\";\n  \
             hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 2; error wait time 1, 2;\n  \
             ipv4 {{ import all; export all; }};\n}}\n"
        )
    };
    let backend = format!(
        r#"{{"Type": "bgp", "ASNumber": 64512, "Mesh": false, "HoldTime": 9, "Peers": [{{"IP": "{UNDERLAY}.1", "ASNumber": 64512, "PasswordFile": "{}"}}]}}"#,
        dir.join("tor1").display()
    );
    let c = Cluster::new(
        1,
        &net_conf(&backend),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "1"],
    );
    let bird = Bird::start(&c.underlay, c.dir.path(), "bird", &bird_conf("alpha-X"));
    let established = format!("trellisd_bgp_peer_established{{peer=\"{UNDERLAY}.1\"");
    let flaps = format!("trellisd_bgp_peer_flaps_total{{peer=\"{UNDERLAY}.1\"");
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !ok() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{what}: not within 20 s\nBIRD:\n{}\nnode1 log:\n{}",
                bird.birdc(&["show", "protocols", "all", "node1"]),
                c.log(0)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait("established with the first password", &|| {
        c.metric(0, &established) == 1.0
    });

    bird.reconfigure(&bird_conf("bravo-Y"));
    wait("down: BIRD has the new password, the node not yet", &|| {
        c.metric(0, &established) == 0.0 && c.metric(0, &flaps) >= 1.0
    });
    publish(2, "bravo-Y");
    wait("established with the rotated password", &|| {
        c.metric(0, &established) == 1.0
    });
    assert!(c.log(0).contains("password changed"), "{}", c.log(0));
}
