//! The VXLAN dataplane between three node namespaces: pods reach each other (IPv4 and IPv6),
//! a removed lease takes its objects along, what someone deletes comes back, stale routes of
//! ours go at start-up, and a restart changes nothing.

mod dataplane_support;

use dataplane_support::*;
use trellis_net::ethtool::Ethtool;
use trellisd::backend::vxlan::{tx_checksum_offload, vtep_mac};
use trellisd::config::ChecksumOffload;
use trellisd::metrics::Metrics;
use trellisd::reconcile::{Dataplane, ReconcileReport};

fn bridge(node: &Node, args: &[&str]) -> String {
    run("bridge", &[&["-n", node.ns.name()], args].concat())
}

#[tokio::test]
async fn pods_reach_each_other_and_a_removed_lease_takes_its_objects_along() {
    let c = cluster("vx", true).await;
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
    let routes = n1.ip(&["route", "show", "proto", "117"]);
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0 dev trellis.1 onlink"),
        "{routes}"
    );
    let routes6 = n1.ip(&["-6", "route", "show", "proto", "117"]);
    assert!(
        routes6.contains("fd00:244:3::/64 via fd00:244:3:: dev trellis.1"),
        "{routes6}"
    );
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

    // node-3 leaves: its 2 routes, 2 neighbours and FDB entry go on the others.
    leases.remove("node-3");
    for dp in &mut dps[..2] {
        let report = dp.reconcile(&leases).await.unwrap();
        assert_eq!(report, ReconcileReport { added: 0, removed: 5 });
    }
    assert!(!n1.ip(&["route", "show", "proto", "117"]).contains("10.244.3.0"));
    assert!(!n1.ip(&["-6", "route", "show", "proto", "117"]).contains("fd00:244:3::"));
    assert!(!n1.ip(&["neigh", "show", "dev", "trellis.1"]).contains("10.244.3.0"));
    assert!(!bridge(n1, &["fdb", "show", "dev", "trellis.1"]).contains(&mac3));
    assert!(pings(n1, c.nodes[1].pod_ip4).await);
    assert!(!pings(n1, n3.pod_ip4).await, "no route to node-3's pods any more");
}

#[tokio::test]
async fn what_someone_deletes_comes_back_and_the_kernel_watch_says_so() {
    let c = cluster("kw", true).await;
    let (mut dps, leases) = start(&c, &vxlan(false)).await;
    let n1 = &c.nodes[0];
    let mut changes = dps[0].kernel_changes();
    let dp = &mut dps[0];

    n1.ip(&["route", "del", "10.244.2.0/24"]);
    assert!(fired(&mut changes, 1).await, "a deleted route wakes the reconciler");
    assert_eq!(
        dp.reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 1, removed: 0 }
    );
    assert!(n1
        .ip(&["route", "show", "proto", "117"])
        .contains("10.244.2.0/24 via 10.244.2.0"));
    assert!(!fired(&mut changes, 1).await, "our own repair does not wake it again");

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
        .ip(&["route", "show", "10.244.3.0/24"])
        .contains("via 10.244.3.0 dev trellis.1"));

    // The whole device: recreated with everything on it.
    n1.ip(&["link", "del", "trellis.1"]);
    assert!(fired(&mut changes, 1).await, "a deleted device wakes the reconciler");
    let report = dp.reconcile(&leases).await.unwrap();
    assert_eq!(report, ReconcileReport { added: 10, removed: 0 });
    assert_full_mesh(&c).await;
}

#[tokio::test]
async fn start_up_removes_stale_routes_of_ours_only_and_a_restart_changes_nothing() {
    let c = cluster("st", false).await;
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
    let old = "link add trellis.1 type vxlan id 1 dstport 4789 local 192.168.77.11 dev ul0 nolearning";
    n1.ip(&old.split(' ').collect::<Vec<_>>());

    let (mut dps, leases) = start(&c, &backend).await;
    let routes = n1.ip(&["route", "show"]);
    assert!(!routes.contains("10.244.99.0/24"), "{routes}");
    assert!(routes.contains("10.55.0.0/24 via 192.168.77.98"), "{routes}");
    assert!(n1.ip(&["-d", "link", "show", "trellis.1"]).contains("dstport 8472"));
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
