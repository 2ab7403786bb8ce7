//! Route reflection end to end: six real `trellisd` processes in BGP mode without the mesh,
//! two of them route reflectors (`--bgp-route-reflector-cluster-id`, one cluster ID), the four
//! others their clients, pods wired by the real plugins, traffic over the reflected routes; one
//! reflector's daemon killed. Dual stack: IPv4 and IPv6 pod CIDRs, each with its next hop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use trellis_tests::cluster::{wait_until, Cluster, Options, Stack, UNDERLAY, UNDERLAY6};

const NODES: usize = 6;
/// Node indexes (0-based) of the reflectors.
const REFLECTORS: [usize; 2] = [0, 1];

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

/// Every pod on `nodes` (one pod per node, pod i on node i) pings every other; `Err` lists
/// what failed.
fn reach_among(c: &Cluster, nodes: &[usize]) -> Result<(), String> {
    let mut missing = Vec::new();
    for a in nodes {
        for b in nodes.iter().filter(|b| *b != a) {
            for ip in &c.pods[*b].ips {
                if !c.ping(*a, ip) {
                    missing.push(format!("node{} -> node{} ({ip})", a + 1, b + 1));
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join("\n"))
    }
}

/// Node `i`'s route to node `j`'s pod CIDR goes straight to node `j` (a reflector never changes
/// the next hop).
fn route_via_node(c: &Cluster, i: usize, j: usize) -> bool {
    c.route_to(i, &c.node_cidr(j))
        .contains(&format!("via {UNDERLAY}.{} ", 11 + j))
}

/// Two reflector nodes and four clients with `"Mesh": false`: every pod reaches every pod,
/// which without reflection the clients could not (they peer with the reflectors only). Then
/// reflector 1's daemon is killed (SIGKILL: no NOTIFICATION, its kernel routes and pods stay):
/// - at once nothing changes for the others: a client's ping to another client's pod loses
///   nothing, and the killed node's pods are still reached (its routes are kept, stale, by
///   graceful restart on the clients, and by reflector 2, which goes on reflecting them);
/// - once the killed node's lease expires (`--lease-ttl 10`, before its 60 s restart time), it
///   is no node any more: every node drops its routes, and the five others keep reaching each
///   other, the clients through reflector 2 alone.
#[test]
fn bgp_two_reflector_nodes_four_clients_one_reflector_killed() {
    let backend = r#"{"Type": "bgp", "ASNumber": 64512, "Mesh": false, "HoldTime": 9, "GracefulRestartSeconds": 60}"#;
    let net_conf = format!(
        r#"{{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "Backend": {backend}}}"#
    );
    let node_args: BTreeMap<usize, Vec<String>> = REFLECTORS
        .iter()
        .map(|i| (*i, vec!["--bgp-route-reflector-cluster-id".into(), "1.0.0.1".into()]))
        .collect();
    // Dual stack: the reflectors pass on each node's IPv6 CIDR with its IPv6 next hop too.
    let options = Options {
        node_args,
        underlay: Stack::DualStack,
        ..Options::default()
    };
    let mut c = Cluster::with_options(
        NODES,
        &net_conf,
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
        options,
    );
    for node in 0..NODES {
        c.add_pod(node);
    }
    if let Err(missing) = c.all_reach_all(Duration::from_secs(30)) {
        panic!(
            "unreachable:\n{missing}\nnode3 log:\n{}\nnode1 log:\n{}",
            c.log(2),
            c.log(0)
        );
    }
    // Every node's routes: one per other node, straight to it.
    for i in 0..NODES {
        let routes = c.nodes[i].ns.exec_ok(&["ip", "route", "show", "proto", "117"]);
        assert_eq!(routes.lines().count(), NODES - 1, "node{}: {routes}", i + 1);
        let routes6 = c.nodes[i].ns.exec_ok(&["ip", "-6", "route", "show", "proto", "117"]);
        assert_eq!(routes6.lines().count(), NODES - 1, "node{}: {routes6}", i + 1);
        for j in (0..NODES).filter(|j| *j != i) {
            assert!(route_via_node(&c, i, j), "node{} to node{}: {routes}", i + 1, j + 1);
            assert!(routes6.contains(&format!("via {UNDERLAY6}{} ", 11 + j)), "{routes6}");
        }
    }
    // The reflectors share a cluster ID: what one reflects to the other comes back as a loop.
    let loops = "trellisd_bgp_routes_dropped_total{reason=\"cluster_list_loop\"}";
    for i in REFLECTORS {
        assert!(
            c.metric(i, loops) > 0.0,
            "node{}: {loops} = {}",
            i + 1,
            c.metric(i, loops)
        );
    }
    assert_eq!(c.metric(2, loops), 0.0);

    // Reflector 1's daemon killed (dropping the process guard sends SIGKILL) while node 3's
    // pod pings node 4's.
    let target = c.pods[3].ips[0].clone();
    let (sent, got) = c.ping_during(2, &target, 4, |c| {
        c.nodes[0].daemon = None;
    });
    assert_eq!(sent, got, "pings lost when a reflector died\nnode3 log:\n{}", c.log(2));
    // Its routes are still everywhere (graceful restart; its lease still holds).
    for i in 1..NODES {
        assert!(
            route_via_node(&c, i, 0),
            "node{}: {}",
            i + 1,
            c.route_to(i, &c.node_cidr(0))
        );
    }
    reach_among(&c, &[0, 1, 2, 3, 4, 5]).unwrap_or_else(|m| panic!("right after the kill:\n{m}"));

    // Its lease expires: it is gone for everyone, the others are whole through reflector 2.
    let cidr0 = c.node_cidr(0);
    wait_until("the killed node's routes gone", Duration::from_secs(40), || {
        (1..NODES).all(|i| c.route_to(i, &cidr0).is_empty())
    });
    for i in 1..NODES {
        for j in (1..NODES).filter(|j| *j != i) {
            assert!(route_via_node(&c, i, j), "node{} to node{}", i + 1, j + 1);
        }
    }
    reach_among(&c, &[1, 2, 3, 4, 5]).unwrap_or_else(|m| panic!("through reflector 2:\n{m}\nnode3 log:\n{}", c.log(2)));
}
