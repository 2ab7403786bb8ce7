//! The VXLAN dataplane between three node namespaces: pods reach each other (IPv4 and IPv6),
//! with routes by nexthop object (the default) and plain; a removed lease takes its objects
//! along, what someone deletes comes back, stale routes of ours go at start-up, a restart
//! changes nothing, and switching between the two kinds of route loses no packet.

mod dataplane_support;

use dataplane_support::*;
use trellis_net::ethtool::Ethtool;
use trellisd::backend::checksum::tx_checksum_offload;
use trellisd::backend::vxlan::vtep_mac;
use trellisd::config::ChecksumOffload;
use trellisd::metrics::Metrics;
use trellisd::reconcile::{Dataplane, ReconcileReport, NEXTHOP_ID_RANGE};

fn bridge(node: &Node, args: &[&str]) -> String {
    run("bridge", &[&["-n", node.ns.name()], args].concat())
}

#[tokio::test]
async fn pods_reach_each_other_and_a_removed_lease_takes_its_objects_along() {
    pods_reach_each_other_and_a_removed_lease_takes_its_objects_along_with(true).await;
}

#[tokio::test]
async fn the_same_with_plain_routes() {
    pods_reach_each_other_and_a_removed_lease_takes_its_objects_along_with(false).await;
}

async fn pods_reach_each_other_and_a_removed_lease_takes_its_objects_along_with(nexthops: bool) {
    let mut c = cluster(true).await;
    if !nexthops {
        c.plain_routes();
    }
    // Per remote CIDR, one nexthop object more (or none).
    let nh = |n: usize| if nexthops { n } else { 0 };
    let backend = vxlan(false);
    let (mut dps, mut leases) = start(&c, &backend).await;
    let (n1, n3) = (&c.nodes[0], &c.nodes[2]);
    let (mac2, mac3) = (vtep_mac("node-2").to_string(), vtep_mac("node-3").to_string());

    // The device, as flannel would make it.
    let details = n1.ip(&["-d", "link", "show", "trellis.1"]);
    for want in [
        "vxlan id 1",
        "dstport 8472",
        "nolearning",
        "mtu 1450",
        "local 192.168.77.11",
        "dev ul0",
        &vtep_mac("node-1").to_string(),
        "state UNKNOWN",
    ] {
        assert!(details.contains(want), "{want:?} not in {details}");
    }
    assert_eq!(dps[0].pod_mtu(), 1450);
    let addrs = n1.ip(&["addr", "show", "dev", "trellis.1"]);
    assert!(
        addrs.contains("10.244.1.0/32") && addrs.contains("fd00:244:1::/128"),
        "{addrs}"
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let (want_csum, _) = tx_checksum_offload(ChecksumOffload::Auto, Some(release.trim()));
    let ethtool = Ethtool::open_in(n1.ns.path()).unwrap();
    assert_eq!(ethtool.tx_checksum("trellis.1").unwrap(), want_csum);

    // Route + permanent neighbour per remote CIDR, one FDB entry per remote node.
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 dev trellis.1 onlink"),
        "{routes}"
    );
    let routes6 = n1.routes(&["-6", "route", "show", "proto", "117"]);
    assert!(
        routes6.contains("fd00:244:3::/64 via fd00:244:3:: dev trellis.1"),
        "{routes6}"
    );
    // By nexthop object: each route names one of ours, one per remote CIDR.
    let all_routes = n1.ip(&["route", "show", "proto", "117"]) + &n1.ip(&["-6", "route", "show", "proto", "117"]);
    assert_eq!(all_routes.matches(" nhid ").count(), nh(4), "{all_routes}");
    let ours = n1.our_nexthops();
    assert_eq!(ours.len(), nh(4), "{ours:?}");
    if nexthops {
        assert!(
            ours.iter()
                .any(|l| l.contains("via 10.244.2.0 dev trellis.1 scope link proto 117 onlink")),
            "{ours:?}"
        );
    }
    let neigh = n1.ip(&["neigh", "show", "dev", "trellis.1"]);
    assert!(
        neigh.contains(&format!("10.244.2.0 lladdr {mac2} PERMANENT")),
        "{neigh}"
    );
    assert!(
        neigh.contains(&format!("fd00:244:3:: lladdr {mac3} PERMANENT")),
        "{neigh}"
    );
    let fdb = bridge(n1, &["fdb", "show", "dev", "trellis.1"]);
    assert!(
        fdb.contains(&format!("{mac2} dst 192.168.77.12 self permanent")),
        "{fdb}"
    );
    assert!(
        fdb.contains(&format!("{mac3} dst 192.168.77.13 self permanent")),
        "{fdb}"
    );

    // Node masquerade: this node's pods, cluster CIDRs exempt.
    let nft = run(
        "ip",
        &["netns", "exec", n1.ns.name(), "nft", "list", "table", "inet", "trellis"],
    );
    assert!(nft.contains("10.244.1.0/24") && nft.contains("10.244.0.0/16"), "{nft}");

    // A second run with the same leases changes nothing.
    for dp in &mut dps {
        assert_eq!(dp.reconcile(&leases).await.unwrap(), ReconcileReport::default());
    }
    assert_full_mesh(&c).await;

    // node-3 leaves: its 2 routes (and nexthops), 2 neighbours and FDB entry go on the others.
    leases.remove("node-3");
    for dp in &mut dps[..2] {
        let report = dp.reconcile(&leases).await.unwrap();
        assert_eq!(
            report,
            ReconcileReport {
                added: 0,
                removed: 5 + nh(2)
            }
        );
    }
    assert!(!n1.ip(&["route", "show", "proto", "117"]).contains("10.244.3.0"));
    assert!(!n1.ip(&["-6", "route", "show", "proto", "117"]).contains("fd00:244:3::"));
    assert_eq!(n1.our_nexthops().len(), nh(2));
    assert!(!n1.ip(&["neigh", "show", "dev", "trellis.1"]).contains("10.244.3.0"));
    assert!(!bridge(n1, &["fdb", "show", "dev", "trellis.1"]).contains(&mac3));
    assert!(pings(n1, c.nodes[1].pod_ip4).await);
    assert!(!pings(n1, n3.pod_ip4).await, "no route to node-3's pods any more");
}

#[tokio::test]
async fn what_someone_deletes_comes_back_and_the_kernel_watch_says_so() {
    let c = cluster(true).await;
    let (mut dps, leases) = start(&c, &vxlan(false)).await;
    let n1 = &c.nodes[0];
    let mut changes = dps[0].kernel_changes();
    let dp = &mut dps[0];

    n1.ip(&["route", "del", "10.244.2.0/24"]);
    assert!(fired(&mut changes, 1).await, "a deleted route wakes the reconciler");
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 0 },
        "the route again, by the nexthop that stayed"
    );
    assert!(n1
        .routes(&["route", "show", "proto", "117"])
        .contains("10.244.2.0/24 via 10.244.2.0"));
    assert!(!fired(&mut changes, 1).await, "our own repair does not wake it again");

    // A nexthop deleted by hand takes its route along (without a route notification).
    let nexthop = n1
        .our_nexthops()
        .into_iter()
        .find(|l| l.contains("via 10.244.3.0 "))
        .expect("the nexthop to node-3's VTEP");
    let id = nexthop.split(' ').nth(1).unwrap().to_string();
    n1.ip(&["nexthop", "del", "id", &id]);
    assert!(!n1.ip(&["route", "show"]).contains("10.244.3.0/24"));
    assert!(fired(&mut changes, 1).await, "a deleted nexthop wakes the reconciler");
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 2, removed: 0 },
        "the nexthop and its route"
    );
    assert!(pings(n1, c.nodes[2].pod_ip4).await);

    n1.ip(&["neigh", "del", "fd00:244:3::", "dev", "trellis.1"]);
    assert!(fired(&mut changes, 1).await, "a deleted neighbour wakes the reconciler");
    assert_eq!(dp.reconcile(&leases).await.unwrap().added, 1);

    let mac3 = vtep_mac("node-3").to_string();
    let ns = n1.ns.name();
    run(
        "bridge",
        &[
            "-n",
            ns,
            "fdb",
            "del",
            &mac3,
            "dev",
            "trellis.1",
            "dst",
            "192.168.77.13",
            "self",
        ],
    );
    assert!(fired(&mut changes, 1).await, "a deleted FDB entry wakes the reconciler");
    assert_eq!(dp.reconcile(&leases).await.unwrap().added, 1);

    // Someone else takes our destination: it is ours again after the run.
    n1.ip(&[
        "route",
        "replace",
        "10.244.3.0/24",
        "via",
        "192.168.77.99",
        "dev",
        "ul0",
    ]);
    assert!(fired(&mut changes, 1).await, "a replaced route wakes the reconciler");
    assert_eq!(dp.reconcile(&leases).await.unwrap().added, 1);
    assert!(n1
        .routes(&["route", "show", "10.244.3.0/24"])
        .contains("via 10.244.3.0 dev trellis.1"));

    // The whole device: recreated with everything on it (the kernel deleted the nexthops on
    // it, and their routes, with it).
    n1.ip(&["link", "del", "trellis.1"]);
    assert!(fired(&mut changes, 1).await, "a deleted device wakes the reconciler");
    let report = dp.reconcile(&leases).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport {
            added: 4 + 4 + 4 + 2,
            removed: 0
        },
        "4 nexthops, 4 routes, 4 neighbours, 2 FDB entries"
    );
    assert_full_mesh(&c).await;
}

#[tokio::test]
async fn start_up_removes_stale_routes_of_ours_only_and_a_restart_changes_nothing() {
    let c = cluster(false).await;
    let n1 = &c.nodes[0];
    let backend = vxlan(false);
    // Left by an earlier run: a route of ours to a CIDR no node holds any more, and a device
    // with an old setting (port). Not ours: a route with another protocol.
    n1.ip(&[
        "route",
        "add",
        "10.244.99.0/24",
        "via",
        "192.168.77.99",
        "dev",
        "ul0",
        "proto",
        "117",
    ]);
    n1.ip(&["route", "add", "10.55.0.0/24", "via", "192.168.77.98", "dev", "ul0"]);
    // Nexthops: one of ours that no route wants any more, and someone else's (in our ID range,
    // even, but not our protocol) that must stay.
    let stale = (NEXTHOP_ID_RANGE.start + 500).to_string();
    let theirs = (NEXTHOP_ID_RANGE.start + 501).to_string();
    let nexthop = |id: &str, proto: &str| {
        n1.ip(&[
            "nexthop",
            "add",
            "id",
            id,
            "via",
            "192.168.77.99",
            "dev",
            "ul0",
            "proto",
            proto,
        ])
    };
    nexthop(&stale, "117");
    nexthop(&theirs, "boot");
    let old = "link add trellis.1 type vxlan id 1 dstport 4789 local 192.168.77.11 dev ul0 nolearning";
    n1.ip(&old.split(' ').collect::<Vec<_>>());
    // The device of an earlier VNI, with a route of ours on it; and someone else's VXLAN device.
    for dev in ["trellis.7 type vxlan id 7", "vx-other type vxlan id 9"] {
        let add = format!("link add {dev} dstport 4789 local 192.168.77.11 dev ul0");
        n1.ip(&add.split(' ').collect::<Vec<_>>());
    }
    n1.ip(&["link", "set", "trellis.7", "up"]);
    n1.ip(&["route", "add", "10.244.98.0/24", "dev", "trellis.7", "proto", "117"]);

    let (mut dps, leases) = start(&c, &backend).await;
    let routes = n1.routes(&["route", "show"]);
    assert!(!routes.contains("10.244.99.0/24"), "{routes}");
    assert!(routes.contains("10.55.0.0/24 via 192.168.77.98"), "{routes}");
    let nexthops = n1.ip(&["nexthop", "show"]);
    assert!(!nexthops.contains(&format!("id {stale} ")), "{nexthops}");
    assert!(nexthops.contains(&format!("id {theirs} ")), "{nexthops}");
    assert!(n1.ip(&["-d", "link", "show", "trellis.1"]).contains("dstport 8472"));
    let links = n1.ip(&["link", "show"]);
    assert!(!links.contains("trellis.7"), "{links}");
    assert!(links.contains("vx-other"), "{links}");
    assert!(!n1.ip(&["route", "show"]).contains("10.244.98.0"));
    assert_full_mesh(&c).await;

    // A restart: the dataplane stays while no daemon runs, and the next one adopts it.
    let index = n1.nl.link_by_name("trellis.1").await.unwrap().unwrap().index;
    drop(dps.remove(0));
    assert!(pings(n1, c.nodes[1].pod_ip4).await, "nothing torn down on drop");
    let metrics = Metrics::new();
    let mut dp = Dataplane::new_in(n1.config(&backend), metrics.clone(), n1.ns.path())
        .await
        .unwrap();
    assert_eq!(n1.nl.link_by_name("trellis.1").await.unwrap().unwrap().index, index);
    dp.set_own(&leases["node-1"]).await.unwrap();
    assert_eq!(dp.reconcile(&leases).await.unwrap(), ReconcileReport::default());
    let text = metrics.render();
    for want in [
        "trellisd_reconcile_runs_total 1",
        "trellisd_leases 3",
        "trellisd_reconcile_seconds_count 1",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    assert_full_mesh(&c).await;
}

/// Pings from `from`'s pod to `to`, every 10 ms for `secs`, in the background: the count of
/// replies lost (`ping -c` counts what was sent when it ends, so none is in flight).
fn continuous_ping(from: &Node, to: std::net::IpAddr, secs: u32) -> std::thread::JoinHandle<(u32, u32)> {
    let (ns, to) = (from.pod.name().to_string(), to.to_string());
    std::thread::spawn(move || {
        let count = (secs * 100).to_string();
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-q", "-i", "0.01", "-W", "1", "-c", &count, &to,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("{text}"));
        let num = |word: &str| -> u32 {
            let before = stats.split(word).next().unwrap();
            before.split_whitespace().last().unwrap().parse().unwrap()
        };
        (num(" packets transmitted"), num(" received"))
    })
}

#[tokio::test]
async fn switching_between_plain_routes_and_nexthops_loses_no_packet() {
    let mut c = cluster(true).await;
    c.plain_routes();
    let backend = vxlan(false);
    let (mut dps, leases) = start(&c, &backend).await;
    let n1 = &c.nodes[0];
    assert!(n1.our_nexthops().is_empty());
    let pings4 = continuous_ping(n1, c.nodes[1].pod_ip4, 3);
    let pings6 = continuous_ping(n1, c.nodes[2].pod_ip6.unwrap(), 3);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // An upgrade to a daemon with nexthop objects: every route replaced in place.
    drop(dps.remove(0));
    let mut cfg = n1.config(&backend);
    cfg.nexthop_objects = true;
    let mut dp = Dataplane::new_in(cfg.clone(), Metrics::new(), n1.ns.path())
        .await
        .unwrap();
    dp.set_own(&leases["node-1"]).await.unwrap();
    let report = dp.reconcile(&leases).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport { added: 8, removed: 0 },
        "4 nexthops, 4 routes replaced"
    );
    assert_eq!(n1.our_nexthops().len(), 4);
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;

    // And back: plain routes in place, then our nexthops removed.
    drop(dp);
    cfg.nexthop_objects = false;
    let mut dp = Dataplane::new_in(cfg, Metrics::new(), n1.ns.path()).await.unwrap();
    dp.set_own(&leases["node-1"]).await.unwrap();
    let report = dp.reconcile(&leases).await.unwrap();
    assert_eq!(report, ReconcileReport { added: 4, removed: 4 });
    assert!(n1.our_nexthops().is_empty());
    assert!(!n1.ip(&["route", "show", "proto", "117"]).contains("nhid"));

    for (what, pings) in [("IPv4", pings4), ("IPv6", pings6)] {
        let (sent, received) = tokio::task::spawn_blocking(move || pings.join().unwrap())
            .await
            .unwrap();
        assert_eq!(received, sent, "{what}: {received} of {sent} pings answered");
    }
}

#[tokio::test]
async fn a_reconcile_after_a_lease_change_sends_only_the_difference_and_a_resync_reads_the_kernel() {
    let c = cluster(true).await;
    let (mut dps, mut leases) = start(&c, &vxlan(false)).await;
    let n1 = &c.nodes[0];
    let mut changes = dps[0].kernel_changes();
    let dp = &mut dps[0];

    // node-3 moves to another underlay address: its FDB entry follows, nothing else changes.
    let was = leases["node-3"].clone();
    let mut moved = was.clone();
    moved.underlay_ip = "192.168.77.33".parse().unwrap();
    leases.insert("node-3".into(), moved);
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 1 }
    );
    let mac3 = vtep_mac("node-3").to_string();
    let fdb = bridge(n1, &["fdb", "show", "dev", "trellis.1"]);
    assert!(
        fdb.contains(&format!("{mac3} dst 192.168.77.33 self permanent")),
        "{fdb}"
    );
    assert!(!fdb.contains("192.168.77.13"), "{fdb}");
    // What the kernel holds is what that run assumed. (Its deletion of the old FDB entry woke
    // the watch: let that pass first.)
    while fired(&mut changes, 1).await {}
    assert_eq!(dp.resync(&leases).await.unwrap(), ReconcileReport::default());

    // A change the kernel watch does not report (a neighbour's MAC replaced in place): a
    // reconcile trusts the last run and sends nothing; a resync reads the kernel and repairs it.
    n1.ip(&[
        "neigh",
        "replace",
        "10.244.2.0",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "trellis.1",
        "nud",
        "permanent",
    ]);
    assert!(!fired(&mut changes, 1).await, "not reported");
    assert_eq!(dp.reconcile(&leases).await.unwrap(), ReconcileReport::default());
    assert_eq!(
        dp.resync(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 0 }
    );
    let mac2 = vtep_mac("node-2").to_string();
    assert!(n1
        .ip(&["neigh", "show", "dev", "trellis.1"])
        .contains(&format!("10.244.2.0 lladdr {mac2}")));

    // A change the watch reports makes the next reconcile read the kernel.
    n1.ip(&["route", "del", "10.244.2.0/24"]);
    assert!(fired(&mut changes, 1).await);
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 0 }
    );

    // node-3 back where it really is.
    leases.insert("node-3".into(), was);
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 1 }
    );
    assert_full_mesh(&c).await;
}
