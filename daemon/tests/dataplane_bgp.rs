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

/// Issue 13, item 11: a change of a few learned routes among many is worked out and applied
/// alone (an incremental run), and leaves the kernel exactly as a complete run would: after
/// every change a resync (which reads the kernel and works everything out) has nothing to do.
/// Routes added, moved to another next hop, withdrawn, the last route of a next hop withdrawn
/// (its nexthop object goes), a route via a new next hop (a new nexthop object).
#[tokio::test]
async fn learned_route_changes_are_applied_alone_and_as_a_complete_run_would() {
    let c = cluster(false).await;
    let (mut dps, leases) = start(&c, &bgp(CrossSubnet::None)).await;
    let n1 = &c.nodes[0];
    let (via2, via3): (std::net::IpAddr, std::net::IpAddr) =
        ("192.168.77.12".parse().unwrap(), "192.168.77.13".parse().unwrap());
    // 300 prefixes, sorted as the speaker sends them: 10.250.0-199 via node 2, 200-299 via 3.
    let prefix = |i: u32| -> ipnetwork::IpNetwork { format!("10.{}.{}.0/24", 250 + i / 256, i % 256).parse().unwrap() };
    let mut rib: std::collections::BTreeMap<ipnetwork::IpNetwork, std::net::IpAddr> = (0..300)
        .map(|i| (prefix(i), if i < 200 { via2 } else { via3 }))
        .collect();
    let as_list = |rib: &std::collections::BTreeMap<ipnetwork::IpNetwork, std::net::IpAddr>| -> Vec<BgpRoute> {
        rib.iter()
            .map(|(p, nh)| BgpRoute {
                prefix: *p,
                next_hop: *nh,
            })
            .collect()
    };
    let dp = &mut dps[0];
    assert_eq!(
        dp.reconcile(with(&leases, &as_list(&rib))).await.unwrap(),
        ReconcileReport {
            added: 300 + 2,
            removed: 0
        }
    );
    let before = dp.incremental_runs();
    let count = |s: &str| s.lines().count();

    // What changes, its report, and whether it must be an incremental run: those after a run
    // that deleted something may not be, as the kernel watch reports our own deletions (then
    // the complete run goes, reading the kernel).
    let v = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
    type Rib = std::collections::BTreeMap<ipnetwork::IpNetwork, std::net::IpAddr>;
    type Step = (&'static str, Box<dyn Fn(&mut Rib)>, ReconcileReport, bool);
    let steps: Vec<Step> = vec![
        (
            "one added",
            Box::new(move |r| {
                r.insert(prefix(300), via2);
            }),
            ReconcileReport { added: 1, removed: 0 },
            true,
        ),
        (
            "one moved to node 3",
            Box::new(move |r| {
                r.insert(prefix(5), via3);
            }),
            ReconcileReport { added: 1, removed: 0 },
            true,
        ),
        (
            "a route via a new next hop: a new nexthop",
            Box::new(move |r| {
                r.insert(prefix(400), v("192.168.77.50"));
            }),
            ReconcileReport { added: 2, removed: 0 },
            true,
        ),
        (
            "one withdrawn",
            Box::new(move |r| {
                r.remove(&prefix(6));
            }),
            ReconcileReport { added: 0, removed: 1 },
            true,
        ),
        (
            "node 3's routes withdrawn: its nexthop goes",
            Box::new(move |r| r.retain(|_, nh| *nh != via3)),
            ReconcileReport {
                added: 0,
                removed: 101 + 1,
            },
            false,
        ),
        ("nothing", Box::new(|_| {}), ReconcileReport::default(), false),
    ];
    for (what, change, report, incremental) in steps {
        change(&mut rib);
        let list = as_list(&rib);
        let runs = dp.incremental_runs();
        assert_eq!(dp.reconcile(with(&leases, &list)).await.unwrap(), report, "{what}");
        if incremental {
            assert_eq!(dp.incremental_runs(), runs + 1, "{what}: an incremental run");
        }
        assert_eq!(
            dp.resync(with(&leases, &list)).await.unwrap(),
            ReconcileReport::default(),
            "{what}: the kernel holds what a complete run wants"
        );
        let routes = n1.routes(&["route", "show", "proto", "117"]);
        assert_eq!(count(&routes), rib.len(), "{what}: {routes}");
        for (p, nh) in &rib {
            assert!(
                routes.contains(&format!("{p} via {nh} dev ul0")),
                "{what}: {p} via {nh} in {routes}"
            );
        }
    }
    assert!(dp.incremental_runs() - before >= 4);
    let nexthops = run("ip", &["-n", n1.ns.name(), "nexthop", "show", "proto", "117"]);
    assert_eq!(count(&nexthops), 2, "node 2's and the new one's: {nexthops}");
}
