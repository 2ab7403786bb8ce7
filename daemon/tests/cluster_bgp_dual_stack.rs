//! BGP mode with IPv6 end to end (issue 13, item 1): real `trellisd` processes announcing their
//! IPv6 pod CIDRs over MP-BGP with their IPv6 underlay address as next hop, pods wired by the
//! real plugins, real ICMP and ICMPv6 between every pair of pods, on three underlays:
//!
//! - dual stack (each node at `192.168.200.(10+N)` and `fd00:200::(10+N)` on one link), IPv4
//!   sessions carrying both families: the node mesh, and through a BIRD route reflector;
//! - the same underlay with an eBGP top-of-rack router (BIRD, AS 65000; an AS per node, as
//!   Calico's AS-per-rack design), IPv4 routes over IPv4 sessions and IPv6 routes over IPv6
//!   sessions;
//! - IPv6 only (no IPv4 on the nodes at all; etcd reached over IPv6), the mesh over IPv6
//!   sessions, the BGP identifier derived from the IPv6 address.

use std::path::PathBuf;
use std::time::Duration;
use trellis_tests::bird::{bird_has, Bird};
use trellis_tests::cluster::{wait_until, Cluster, Options, Stack, UNDERLAY, UNDERLAY6};

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

const DUAL_POOLS: &str =
    r#""Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "IPv6SubnetLen": 64"#;

fn cluster(nodes: usize, pools: &str, backend: &str, options: Options) -> Cluster {
    let net_conf = format!(r#"{{{pools}, "Backend": {backend}}}"#);
    Cluster::with_options(
        nodes,
        &net_conf,
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
        options,
    )
}

fn add_pods(c: &mut Cluster) {
    for node in 0..c.nodes.len() {
        c.add_pod(node);
        c.add_pod(node);
    }
}

fn reach(c: &Cluster, what: &str) {
    if let Err(missing) = c.all_reach_all(Duration::from_secs(20)) {
        let logs: String = (0..c.nodes.len())
            .map(|i| format!("node{} log:\n{}\n", i + 1, c.log(i)))
            .collect();
        panic!("{what}: unreachable:\n{missing}\n{logs}");
    }
}

/// Every pod has an address of each family in `families` (`4`, `6`).
fn assert_families(c: &Cluster, families: &[u8]) {
    for p in &c.pods {
        let got: Vec<u8> = p.ips.iter().map(|ip| if ip.contains(':') { 6 } else { 4 }).collect();
        assert_eq!(got, families, "pod {} has {:?}", p.id, p.ips);
    }
}

/// Node `i`'s routes of trellisd's protocol for `family` (`-4`, `-6`).
fn bgp_routes(c: &Cluster, i: usize, family: &str) -> String {
    c.nodes[i].ns.exec_ok(&["ip", family, "route", "show", "proto", "117"])
}

fn dual_stack() -> Options {
    Options {
        underlay: Stack::DualStack,
        ..Options::default()
    }
}

#[test]
fn bgp_dual_stack_mesh_over_ipv4_sessions_every_pod_reaches_every_pod_over_ipv4_and_ipv6() {
    let mut c = cluster(
        3,
        DUAL_POOLS,
        r#"{"Type": "bgp", "ASNumber": 64512, "Mesh": true, "HoldTime": 9}"#,
        dual_stack(),
    );
    add_pods(&mut c);
    assert_families(&c, &[4, 6]);
    reach(&c, "dual-stack bgp mesh");
    // Each node holds the two other nodes' CIDRs of each family, via their underlay address of
    // that family: the IPv6 ones came over the IPv4 sessions, with IPv6 next hops.
    for i in 0..3 {
        let (v4, v6) = (bgp_routes(&c, i, "-4"), bgp_routes(&c, i, "-6"));
        assert_eq!(
            (v4.lines().count(), v6.lines().count()),
            (2, 2),
            "node{}:\n{v4}{v6}",
            i + 1
        );
        for j in (0..3).filter(|j| *j != i) {
            assert!(v4.contains(&format!("via {UNDERLAY}.{}", 11 + j)), "{v4}");
            assert!(v6.contains(&format!("via {UNDERLAY6}{}", 11 + j)), "{v6}");
        }
    }
}

#[test]
fn bgp_dual_stack_through_a_bird_route_reflector_every_pod_reaches_every_pod() {
    let backend = format!(
        r#"{{"Type": "bgp", "ASNumber": 64512, "Mesh": false, "RouteReflectors": ["{UNDERLAY}.1"], "HoldTime": 9}}"#
    );
    let mut c = cluster(3, DUAL_POOLS, &backend, dual_stack());
    let bird = c.start_bird_reflector(&["ipv4", "ipv6"]);
    add_pods(&mut c);
    reach(&c, "dual-stack bgp through BIRD");
    // BIRD's IPv6 table holds each node's IPv6 CIDR via that node's IPv6 underlay address.
    let cidrs: Vec<String> = (0..3).map(|i| c.node_cidr_of(i, 1)).collect();
    wait_until(
        "BIRD holds every node's IPv6 CIDR via its IPv6 address",
        Duration::from_secs(10),
        || {
            let routes = bird.routes();
            (0..3).all(|i| bird_has(&routes, &cidrs[i], &format!("{UNDERLAY6}{}", 11 + i)))
        },
    );
}

/// BIRD as an eBGP top-of-rack router (AS 65000) for `n` nodes in AS 65001.., each over an IPv4
/// session (IPv4 routes) and an IPv6 session (IPv6 routes); it installs what it learns in the
/// underlay namespace's kernel and forwards.
fn start_bird_tor(c: &Cluster, n: usize) -> Bird {
    c.underlay.sysctl("net.ipv4.ip_forward=1");
    c.underlay.sysctl("net.ipv6.conf.all.forwarding=1");
    let mut conf = format!(
        "log stderr all;\nrouter id {UNDERLAY}.1;\nprotocol device {{ }}\n\
         protocol kernel {{ ipv4 {{ export all; }}; }}\nprotocol kernel {{ ipv6 {{ export all; }}; }}\n"
    );
    for i in 1..=n {
        for (family, local, neighbor) in [
            ("ipv4", format!("{UNDERLAY}.1"), format!("{UNDERLAY}.{}", 10 + i)),
            ("ipv6", format!("{UNDERLAY6}1"), format!("{UNDERLAY6}{}", 10 + i)),
        ] {
            conf += &format!(
                "protocol bgp node{i}_{family} {{\n  local {local} as 65000;\n  neighbor {neighbor} as {};\n  \
                 hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 2;\n  \
                 {family} {{ import all; export all; }};\n}}\n",
                65000 + i
            );
        }
    }
    Bird::start(&c.underlay, c.dir.path(), "tor", &conf)
}

#[test]
fn bgp_dual_stack_through_an_ebgp_top_of_rack_router_over_ipv4_and_ipv6_sessions() {
    let backend = format!(
        r#"{{"Type": "bgp", "ASNumber": 64512, "Mesh": false, "HoldTime": 9,
             "Peers": [{{"IP": "{UNDERLAY}.1", "ASNumber": 65000}}, {{"IP": "{UNDERLAY6}1", "ASNumber": 65000}}]}}"#
    );
    let options = Options {
        node_args: (0..3)
            .map(|i| (i, vec!["--bgp-as-number".to_string(), (65001 + i).to_string()]))
            .collect(),
        ..dual_stack()
    };
    let mut c = cluster(3, DUAL_POOLS, &backend, options);
    let tor = start_bird_tor(&c, 3);
    add_pods(&mut c);
    reach(&c, "dual-stack bgp through an eBGP ToR");
    // Every session is up, and the IPv6 routes came over the IPv6 sessions (their protocol
    // names end in _ipv6).
    let protocols = tor.birdc(&["show", "protocols"]);
    assert_eq!(
        protocols.lines().filter(|l| l.contains("Established")).count(),
        6,
        "{protocols}"
    );
    let table = tor.birdc(&["show", "route", "table", "master6"]);
    for i in 1..=3 {
        assert!(table.contains(&format!("node{i}_ipv6")), "{table}");
    }
}

#[test]
fn bgp_ipv6_only_underlay_mesh_over_ipv6_sessions_with_a_derived_router_id() {
    let pools = r#""EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "IPv6SubnetLen": 64"#;
    let options = Options {
        underlay: Stack::V6Only,
        ..Options::default()
    };
    let mut c = cluster(
        3,
        pools,
        r#"{"Type": "bgp", "ASNumber": 64512, "Mesh": true, "HoldTime": 9}"#,
        options,
    );
    // No IPv4 on the nodes' links at all.
    for n in &c.nodes {
        let v4 = n.ns.exec_ok(&["ip", "-4", "addr", "show", "dev", "ul0"]);
        assert!(v4.trim().is_empty(), "{v4}");
    }
    add_pods(&mut c);
    assert_families(&c, &[6]);
    reach(&c, "IPv6-only bgp mesh");
    for i in 0..3 {
        let v6 = bgp_routes(&c, i, "-6");
        assert_eq!(v6.lines().count(), 2, "node{}:\n{v6}", i + 1);
        // The identifier: the low 32 bits of fd00:200::(11+i).
        let id = format!("router_id=0.0.0.{}", 0x11 + i);
        assert!(c.log(i).contains(&id), "node{} log lacks {id}:\n{}", i + 1, c.log(i));
    }
}
