//! Whole clusters on one machine: real etcd, real `trellisd` processes in node namespaces, pods
//! wired by the real plugins with the CNI config each daemon wrote, traffic between them.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use trellis_tests::cluster::{wait_until, Cluster};

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

fn net_conf(backend: &str) -> String {
    format!(
        r#"{{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "Backend": {backend}}}"#
    )
}

const VXLAN: &str = r#"{"Type": "vxlan", "VNI": 1, "Port": 8472}"#;
const VXLAN_DIRECT: &str = r#"{"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": true}"#;
const HOST_GW: &str = r#"{"Type": "host-gw"}"#;

fn three_nodes_two_pods_each(backend: &str) -> Cluster {
    let mut c = Cluster::new(
        3,
        &net_conf(backend),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
    );
    for node in 0..3 {
        c.add_pod(node);
        c.add_pod(node);
    }
    c
}

fn every_pod_reaches_every_pod(backend: &str) {
    let c = three_nodes_two_pods_each(backend);
    if let Err(missing) = c.all_reach_all(Duration::from_secs(15)) {
        panic!("{backend}: unreachable:\n{missing}\nnode1 log:\n{}", c.log(0));
    }
}

#[test]
fn vxlan_every_pod_reaches_every_pod() {
    every_pod_reaches_every_pod(VXLAN);
}

#[test]
fn vxlan_direct_routing_every_pod_reaches_every_pod() {
    every_pod_reaches_every_pod(VXLAN_DIRECT);
}

#[test]
fn host_gw_every_pod_reaches_every_pod() {
    // IPv4 only: host-gw routes a pod CIDR via the node's underlay address, and this underlay
    // has IPv4 addresses only (as flannel, IPv6 host-gw needs an IPv6 underlay).
    let mut c = Cluster::new(
        3,
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}"#,
        &trellisd(),
        &[],
    );
    for node in 0..3 {
        c.add_pod(node);
        c.add_pod(node);
    }
    if let Err(missing) = c.all_reach_all(Duration::from_secs(15)) {
        panic!("host-gw: unreachable:\n{missing}\nnode1 log:\n{}", c.log(0));
    }
}

#[test]
fn a_node_removed_from_etcd_disappears_from_the_others() {
    let mut c = three_nodes_two_pods_each(VXLAN);
    let cidr3 = c.node_cidr(2);
    wait_until("route to node3", Duration::from_secs(10), || {
        !c.route_to(0, &cidr3).is_empty()
    });
    c.stop_daemon(2);
    let out = c.etcdctl(&["del", "--prefix", "/trellis/leases/node3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..2 {
        wait_until("node3's route gone", Duration::from_secs(10), || {
            c.route_to(i, &cidr3).is_empty()
        });
        let neigh = c.nodes[i].ns.exec_ok(&["ip", "neigh", "show", "nud", "permanent"]);
        let fdb = c.nodes[i].ns.exec_ok(&["bridge", "fdb", "show", "dev", "trellis.1"]);
        let underlay3 = format!("{}.13", trellis_tests::cluster::UNDERLAY);
        assert!(
            !fdb.contains(&underlay3),
            "node{}: node3's FDB entry stayed: {fdb}",
            i + 1
        );
        let vtep3 = cidr3.split('/').next().unwrap();
        assert!(
            !neigh.contains(&format!("{vtep3} ")),
            "node{}: node3's neighbour stayed: {neigh}",
            i + 1
        );
    }
}

#[test]
fn a_route_deleted_by_hand_comes_back_within_a_second() {
    let c = three_nodes_two_pods_each(HOST_GW);
    let cidr2 = c.node_cidr(1);
    wait_until("route to node2", Duration::from_secs(10), || {
        !c.route_to(0, &cidr2).is_empty()
    });
    c.nodes[0].ns.exec_ok(&["ip", "route", "del", &cidr2]);
    let t = Instant::now();
    wait_until("route back", Duration::from_secs(3), || {
        !c.route_to(0, &cidr2).is_empty()
    });
    eprintln!("route restored after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_millis(1500), "took {:?}", t.elapsed());
}

#[test]
fn restarting_a_daemon_loses_no_ping() {
    let mut c = three_nodes_two_pods_each(VXLAN);
    c.all_reach_all(Duration::from_secs(15)).unwrap();
    let target = c.pods[2].ips[0].clone();
    let (sent, got) = c.ping_during(0, &target, 5, |c| {
        c.stop_daemon(1);
        std::thread::sleep(Duration::from_millis(500));
        c.start_daemon(1);
        std::thread::sleep(Duration::from_secs(2));
    });
    assert_eq!(sent, 100);
    assert_eq!(sent, got, "pings lost while node2's daemon restarted");
}

#[test]
fn etcd_down_for_30_seconds_loses_no_ping_and_the_daemons_catch_up() {
    let mut c = Cluster::new(
        2,
        &net_conf(VXLAN),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
    );
    c.add_pod(0);
    c.add_pod(1);
    c.all_reach_all(Duration::from_secs(15)).unwrap();
    let target = c.pods[1].ips[0].clone();
    let (sent, got) = c.ping_during(0, &target, 33, |c| {
        c.stop_etcd();
        std::thread::sleep(Duration::from_secs(30));
        c.start_etcd();
    });
    assert_eq!(sent, got, "pings lost while etcd was down");
    // The daemons catch up: a lease written after etcd came back reaches node1's kernel.
    let fake = r#"{"node":"node9","underlayIp":"192.168.200.99","podCidrs":["10.244.99.0/24"],"backend":{"type":"vxlan","vtepMAC":"02:00:00:00:00:09","vni":1}}"#;
    let t = Instant::now();
    loop {
        // Its ownership record first, as a node's claim writes it: a lease without one is refused.
        let owned = c.etcdctl(&["put", "/trellis/leases/cidrs/10.244.99.0_24", "node9"]);
        if owned.status.success() && c.etcdctl(&["put", "/trellis/leases/node9", fake]).status.success() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "etcd did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    while c.route_to(0, "10.244.99.0/24").is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node1 did not learn a lease put after etcd's restart; its log:\n{}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_and_metrics_are_served() {
    let c = Cluster::new(2, &net_conf(VXLAN), &trellisd(), &["--resync", "1"]);
    wait_until("healthy", Duration::from_secs(10), || {
        c.http_get(0, "/healthz").0 == 200
    });
    let t = Instant::now();
    loop {
        let (status, body) = c.http_get(0, "/metrics");
        assert_eq!(status, 200);
        let value = |name: &str| -> f64 {
            body.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0)
        };
        if value("trellisd_leases") == 2.0 && value("trellisd_kernel_objects_programmed_total") > 0.0 {
            assert!(value("trellisd_reconcile_runs_total") >= 1.0, "{body}");
            assert!(body.contains("trellisd_reconcile_seconds_bucket"), "{body}");
            assert!(body.contains("trellisd_datastore_errors_total"), "{body}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "metrics never showed both leases:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What `nft flush ruleset` (a reload of the distribution's nftables service) or a deleted
/// rule takes away, the daemon puts back within a second, and the pods' egress with it.
#[test]
fn a_flushed_masquerade_table_is_repaired_within_a_second() {
    let c = three_nodes_two_pods_each(VXLAN);
    let cidr = c.node_cidr(0);
    let outside = format!("{}.1", trellis_tests::cluster::UNDERLAY); // beyond the cluster CIDR
    let egress = || c.ping(0, &outside);
    wait_until("pod egress", Duration::from_secs(10), egress);
    let table = |c: &Cluster| c.nodes[0].ns.exec(&["nft", "list", "table", "inet", "trellis"]);
    let whole = |c: &Cluster| {
        let t = String::from_utf8_lossy(&table(c).stdout).into_owned();
        t.matches(" masquerade comment").count() == 4 && t.contains(&cidr)
    };
    for (what, cmd) in [
        ("nft flush ruleset", vec!["nft", "flush", "ruleset"]),
        (
            "a deleted rule",
            vec!["nft", "flush", "chain", "inet", "trellis", "postrouting"],
        ),
        (
            "the node's CIDR removed",
            vec![
                "nft",
                "delete",
                "element",
                "inet",
                "trellis",
                "masq_net4",
                &format!("{{ {cidr} }}"),
            ],
        ),
    ] {
        assert!(whole(&c));
        c.nodes[0].ns.exec_ok(&cmd);
        let t = Instant::now();
        wait_until(what, Duration::from_secs(3), || whole(&c));
        eprintln!("{what}: repaired after {:?}", t.elapsed());
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{what}: took {:?}",
            t.elapsed()
        );
        assert!(egress(), "{what}: pod egress not back");
    }
    assert_eq!(c.http_get(0, "/healthz").0, 200);
}

/// A hung etcd (SIGSTOP: a disk stall, a paused VM) that resumes after more than the lease TTL
/// expires every lease at once. That is no evidence that the nodes died: they keep each other's
/// routes and re-register as soon as etcd answers, and no ping is lost.
#[test]
fn a_hung_etcd_for_30_seconds_loses_no_ping() {
    let mut c = Cluster::new(3, &net_conf(VXLAN), &trellisd(), &["--lease-ttl", "5", "--resync", "5"]);
    for node in 0..3 {
        c.add_pod(node);
    }
    c.all_reach_all(Duration::from_secs(15)).unwrap();
    // Nodes of a real cluster did not start together. These did, and would notice the stall
    // and reconnect in step (each renews every TTL/3 from its start): node3's daemon restarts
    // until its renewals fall half a period after node1's.
    let period = 5.0 / 3.0;
    let t1 = session_starts(&c.log(0))[0];
    for attempt in 1.. {
        c.stop_daemon(2);
        std::thread::sleep(Duration::from_millis(500));
        c.start_daemon(2);
        wait_until("node3's session", Duration::from_secs(10), || {
            session_starts(&c.log(2)).len() > attempt
        });
        let t3 = *session_starts(&c.log(2)).last().unwrap();
        let phase = (t3 - t1).rem_euclid(period);
        eprintln!("node3 renews {phase:.2} s after node1 (in a period of {period:.2} s)");
        if (period / 4.0..period * 3.0 / 4.0).contains(&phase) {
            break;
        }
        assert!(attempt < 10, "node3 never got out of step with node1");
    }
    c.all_reach_all(Duration::from_secs(15)).unwrap();
    let target = c.pods[2].ips[0].clone();
    let signal = |c: &Cluster, sig: i32| {
        let pid = c.etcd.as_ref().and_then(|e| e.pid()).expect("etcd runs");
        // SAFETY: kill(2) on the test's own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "signal {sig} to etcd");
    };
    // 40 s of pings: 30 s of stall (six TTLs), then 9.5 s of nodes coming back.
    let (sent, got) = c.ping_during(0, &target, 40, |c| {
        signal(c, libc::SIGSTOP);
        std::thread::sleep(Duration::from_secs(30));
        signal(c, libc::SIGCONT);
    });
    eprintln!("hung etcd: {} of {sent} pings lost", sent - got);
    let held: f64 = (0..3).map(|i| c.metric(i, "trellisd_lease_removals_held_total")).sum();
    eprintln!("lease removals held back: {held}");
    assert_eq!(sent, got, "pings lost around a hung etcd; node1's log:\n{}", c.log(0));
    // Everyone is back in etcd, and every route stayed.
    c.all_reach_all(Duration::from_secs(5)).unwrap();
}

/// When each etcd session of a daemon's log began (its "holding pod CIDRs" lines), in seconds
/// of the day.
fn session_starts(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("etcd: holding pod CIDRs"))
        .filter_map(|l| {
            // 2026-12-02T16:12:37.629490Z
            let time = l.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
            let mut hms = time.split(':').map(|x| x.parse::<f64>());
            Some(hms.next()?.ok()? * 3600.0 + hms.next()?.ok()? * 60.0 + hms.next()?.ok()?)
        })
        .collect()
}
