//! BGP mode, kernel side, between three node namespaces: the routes come from what the speaker
//! learned (`Sources::learned`, beside the leases; no speaker runs here), nothing moves before the
//! speaker has synced, plain routes on the subnet, a tunnel (VXLAN here; IPIP where the kernel has it)
//! to a node behind a router.

mod dataplane_support;

use dataplane_support::*;
use trellis_net::Route;
use trellisd::backend::bgp::BgpRoute;
use trellisd::backend::TRELLISD_PROTO;
use trellisd::config::{Backend, CrossSubnet};
use trellisd::lease::BackendData;
use trellisd::lease::Lease;
use trellisd::reconcile::{Dataplane, ReconcileReport, Sources};

type Leases = std::collections::BTreeMap<String, Lease>;

fn bgp(cross_subnet: CrossSubnet) -> Backend {
    Backend::Bgp {
        as_number: 64512,
        mesh: true,
        peers: vec![],
        route_reflectors: vec![],
        cross_subnet,
        hold_time: 90,
        graceful_restart: 120,
    }
}

/// What node `i`'s speaker would have learned from the others: their pod CIDRs via their
/// underlay addresses.
fn learned(c: &Cluster, i: usize) -> Vec<BgpRoute> {
    c.nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .flat_map(|(_, n)| {
            n.cidrs.iter().map(|cidr| BgpRoute {
                prefix: *cidr,
                next_hop: n.underlay.ip,
            })
        })
        .collect()
}

/// The leases, and `rib` as what the speaker learned.
fn with<'a>(leases: &'a Leases, rib: &'a [BgpRoute]) -> Sources<'a> {
    Sources {
        leases,
        learned: Some(rib),
    }
}

/// Reconciles every node with its RIB; `true` when none changed anything.
async fn learn_everything(c: &Cluster, dps: &mut [Dataplane], leases: &Leases) -> bool {
    let mut quiet = true;
    for (i, dp) in dps.iter_mut().enumerate() {
        quiet &= dp.reconcile(with(leases, &learned(c, i))).await.unwrap() == ReconcileReport::default();
    }
    quiet
}

#[tokio::test]
async fn learned_routes_reach_the_pods_and_nothing_moves_before_the_first_rib() {
    let c = cluster(false).await;
    let n1 = &c.nodes[0];
    // An earlier run's routes: one still right, one to a node that has gone since.
    n1.ip(&[
        "route",
        "add",
        "10.244.2.0/24",
        "via",
        "192.168.77.12",
        "dev",
        "ul0",
        "proto",
        "117",
    ]);
    n1.ip(&[
        "route",
        "add",
        "10.244.9.0/24",
        "via",
        "192.168.77.19",
        "dev",
        "ul0",
        "proto",
        "117",
    ]);

    let (mut dps, leases) = start(&c, &bgp(CrossSubnet::Ipip)).await;
    assert_eq!(
        dps[0].backend_data(),
        BackendData::Bgp {
            asn: 64512,
            vtep_mac: None,
            rr_cluster_id: None
        }
    );
    assert_eq!(dps[0].pod_mtu(), 1480, "room for the cross-subnet IPIP tunnel");
    // The speaker has not synced: reconciling leaves everything in place, however often.
    for _ in 0..2 {
        assert_eq!(dps[0].reconcile(&leases).await.unwrap(), ReconcileReport::default());
    }
    assert_eq!(
        dps[0].installed_routes().await.unwrap(),
        2,
        "the speaker's `restarted` flag"
    );
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(
        routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0") && routes.contains("10.244.9.0/24"),
        "{routes}"
    );

    // The first RIB: direct routes on the subnet (by nexthop object: the earlier run's plain
    // route to node-2 moves onto one in place); the gone node's route removed.
    assert_eq!(
        dps[0].reconcile(with(&leases, &learned(&c, 0))).await.unwrap(),
        ReconcileReport {
            added: 2 + 2,
            removed: 1
        },
        "2 nexthops, 2 routes"
    );
    learn_everything(&c, &mut dps, &leases).await;
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    assert!(routes.contains("10.244.3.0/24 via 192.168.77.13 dev ul0"), "{routes}");
    assert!(!routes.contains("10.244.9.0"), "{routes}");
    assert_full_mesh(&c).await;
    assert!(learn_everything(&c, &mut dps, &leases).await, "idempotent");

    // A deleted route is noticed and put back.
    let mut changes = dps[0].kernel_changes();
    n1.ip(&["route", "del", "10.244.3.0/24"]);
    assert!(fired(&mut changes, 3).await, "the kernel watch saw the deletion");
    assert_eq!(
        dps[0].reconcile(with(&leases, &learned(&c, 0))).await.unwrap(),
        ReconcileReport { added: 1, removed: 0 }
    );

    // What the kernel cannot or must not take: off the subnet (through IPIP where the kernel
    // has it, otherwise noted as impossible), our own prefix reflected back. (What the import
    // policy drops never gets here: `bgp::policy` and bgp_bird.rs test it.)
    let mut rib = learned(&c, 0);
    for (prefix, via) in [("10.244.8.0/24", "10.99.0.8"), ("10.244.1.0/24", "192.168.77.12")] {
        rib.push(BgpRoute {
            prefix: prefix.parse().unwrap(),
            next_hop: via.parse().unwrap(),
        });
    }
    let tunnel = n1.nl.link_by_name("trellis.ipip").await.unwrap();
    let report = dps[0].reconcile(with(&leases, &rib)).await.unwrap();
    let notices: Vec<_> = dps[0].notices().map(str::to_string).collect();
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(
        !routes.contains("default") && !routes.contains("10.244.1.0"),
        "{routes}"
    );
    if tunnel.is_some() {
        assert_eq!(
            report,
            ReconcileReport { added: 2, removed: 0 },
            "a nexthop and its route"
        );
        assert!(
            routes.contains("10.244.8.0/24 via 10.99.0.8 dev trellis.ipip onlink"),
            "{routes}"
        );
    } else {
        eprintln!("note: no IPIP support in this kernel: the off-subnet route is refused, as it must be");
        assert_eq!(report, ReconcileReport::default());
        assert!(
            notices
                .iter()
                .any(|n| n.contains("10.244.8.0/24 via 10.99.0.8") && n.contains("tunnel is unavailable")),
            "{notices:?}"
        );
    }

    // A withdrawn route goes.
    let mut rib = learned(&c, 0);
    rib.retain(|r| r.prefix.to_string() != "10.244.3.0/24");
    dps[0].reconcile(with(&leases, &rib)).await.unwrap();
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(
        routes.contains("10.244.2.0/24") && !routes.contains("10.244.3.0/24"),
        "{routes}"
    );
    assert!(!pings(n1, c.nodes[2].pod_ip4).await, "no route, no way");
}

#[tokio::test]
async fn cross_subnet_vxlan_to_a_node_behind_a_router() {
    let c = cluster_behind_router(false).await;
    let (mut dps, leases) = start(&c, &bgp(CrossSubnet::Vxlan)).await;
    assert!(matches!(
        dps[0].backend_data(),
        BackendData::Bgp { vtep_mac: Some(_), .. }
    ));
    assert_eq!(dps[0].pod_mtu(), 1450);
    learn_everything(&c, &mut dps, &leases).await;

    let (n1, n3) = (&c.nodes[0], &c.nodes[2]);
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    assert!(
        routes.contains("10.244.3.0/24 via 10.244.3.0 dev trellis.1 onlink"),
        "{routes}"
    );
    let fdb = run("bridge", &["-n", n1.ns.name(), "fdb", "show", "dev", "trellis.1"]);
    assert!(fdb.contains("dst 192.168.78.13 self permanent"), "{fdb}");
    let routes3 = n3.routes(&["route", "show", "proto", "117"]);
    assert!(
        routes3.contains("10.244.1.0/24 via 10.244.1.0 dev trellis.1 onlink")
            && routes3.contains("10.244.2.0/24 via 10.244.2.0 dev trellis.1 onlink"),
        "{routes3}"
    );
    assert_full_mesh(&c).await;
    assert!(learn_everything(&c, &mut dps, &leases).await, "idempotent");

    // CrossSubnet none would refuse it: the kernel would not take the gateway.
    let mut none = c.nodes[0].dataplane(&bgp(CrossSubnet::None)).await;
    none.set_own(&leases["node-1"]).await.unwrap();
    none.reconcile(with(&leases, &learned(&c, 0))).await.unwrap();
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(!routes.contains("10.244.3.0/24"), "{routes}");
    let notices: Vec<_> = none.notices().collect();
    assert!(
        notices.len() == 1 && notices[0].contains("CrossSubnet is \"none\""),
        "{notices:?}"
    );
}

#[tokio::test]
async fn cross_subnet_ipip_to_a_node_behind_a_router() {
    if let Err(why) = ipip_support().await {
        eprintln!("SKIPPED cross_subnet_ipip_to_a_node_behind_a_router: {why}");
        return;
    }
    let c = cluster_behind_router(false).await;
    let (mut dps, leases) = start(&c, &bgp(CrossSubnet::Ipip)).await;
    learn_everything(&c, &mut dps, &leases).await;
    let n1 = &c.nodes[0];
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    assert!(
        routes.contains("10.244.3.0/24 via 192.168.78.13 dev trellis.ipip onlink"),
        "{routes}"
    );
    let ours: Vec<Route> = n1.our_routes().await;
    assert!(ours.iter().all(|r| r.protocol == Some(TRELLISD_PROTO)));
    assert_full_mesh(&c).await;
    assert!(learn_everything(&c, &mut dps, &leases).await, "idempotent");
}

/// Issue 13, item 2: an IPv4 underlay link that has IPv6 addresses too. IPv6 routes whose next
/// hop is on the link's IPv6 prefix are on-link: installed as plain routes, and the pods reach
/// each other over IPv6. (The underlay is detected as the daemon does, `underlay::detect`.)
#[tokio::test]
async fn ipv6_next_hops_on_the_links_ipv6_prefix_are_on_link() {
    let c = cluster(true).await;
    let backend = bgp(CrossSubnet::None);
    let v6 = |i: usize| -> std::net::IpAddr { format!("fd00:77::1{i}").parse().unwrap() };
    let mut dps = Vec::new();
    let mut leases = Leases::new();
    for (n, i) in c.nodes.iter().zip(1..) {
        n.ip(&["address", "add", &format!("{}/64", v6(i)), "dev", "ul0", "nodad"]);
        let mut cfg = n.config(&backend);
        cfg.underlay = trellisd::underlay::detect(&n.nl, Some("ul0"), Some(n.underlay.ip))
            .await
            .unwrap();
        let mut dp = trellisd::reconcile::Dataplane::new_in(cfg, trellisd::metrics::Metrics::new(), n.ns.path())
            .await
            .unwrap();
        let lease = n.lease(&dp);
        dp.set_own(&lease).await.unwrap();
        leases.insert(n.name.clone(), lease);
        dps.push(dp);
    }
    // Each node's pod CIDRs via its underlay address of their family.
    let rib = |me: usize| -> Vec<BgpRoute> {
        (1..=3)
            .filter(|j| *j != me)
            .flat_map(|j| {
                let n = &c.nodes[j - 1];
                n.cidrs.iter().map(move |cidr| BgpRoute {
                    prefix: *cidr,
                    next_hop: if cidr.is_ipv4() { n.underlay.ip } else { v6(j) },
                })
            })
            .collect()
    };
    for (dp, i) in dps.iter_mut().zip(1..) {
        dp.reconcile(with(&leases, &rib(i))).await.unwrap();
    }
    let n1 = &c.nodes[0];
    let routes = n1.routes(&["-6", "route", "show", "proto", "117"]);
    assert!(
        routes.contains("fd00:244:2::/64 via fd00:77::12 dev ul0")
            && routes.contains("fd00:244:3::/64 via fd00:77::13 dev ul0"),
        "{routes}\nnotices: {:?}",
        dps[0].notices().collect::<Vec<_>>()
    );
    assert!(
        !dps[0].notices().any(|n| n.contains("off this node's subnet")),
        "{:?}",
        dps[0].notices().collect::<Vec<_>>()
    );
    assert_full_mesh(&c).await;
}
