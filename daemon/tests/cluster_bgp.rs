//! BGP mode end to end: real `trellisd` processes speaking BGP to each other (full mesh) or to a
//! real BIRD route reflector in the underlay namespace, pods wired by the real plugins, traffic
//! over the BGP-learned routes.

use std::path::PathBuf;
use std::time::Duration;
use trellis_tests::bird::bird_has;
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
