//! Routes, IPv4 and IPv6 through the same calls.

mod common;

use common::{ip, netns};
use trellis_net::{IpFamily, IpNetwork, Netlink, Route, RouteFilter, RouteScope};

const PROTO: u8 = 99;

#[tokio::test]
async fn routes_with_gateway_protocol_metric_and_mtu_in_both_families() {
    let ns = netns("route");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let dev = common::dual_stack_link(&nl).await;
    let dev_name = nl.link_by_index(dev).await.unwrap().unwrap().name;
    for (family, dst, gw) in [
        (IpFamily::V4, "10.1.0.0/24", "10.0.0.2"),
        (IpFamily::V6, "fd01::/64", "fd00::2"),
    ] {
        let route = Route::new(dst.parse().unwrap())
            .via(gw.parse().unwrap())
            .dev(dev)
            .protocol(PROTO)
            .metric(50)
            .mtu(1400);
        nl.add_route(&route).await.unwrap();

        let ours = RouteFilter {
            family: Some(family),
            protocol: Some(PROTO),
            ..Default::default()
        };
        let listed = nl.routes(&ours).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let got = &listed[0];
        assert_eq!(
            (got.destination, got.gateway, got.oif),
            (route.destination, route.gateway, Some(dev))
        );
        assert_eq!(
            (got.protocol, got.metric, got.mtu, got.table),
            (Some(PROTO), Some(50), Some(1400), 254)
        );

        let err = nl.add_route(&route).await.unwrap_err();
        assert!(err.is_exists(), "{err}");
        let want = format!("adding route {dst} via {gw} dev {dev_name} proto {PROTO}: File exists (EEXIST)");
        assert_eq!(err.to_string(), want);

        nl.replace_route(&route.clone().mtu(1300)).await.unwrap();
        assert_eq!(nl.routes(&ours).await.unwrap()[0].mtu, Some(1300));

        // Delete what was listed; deleting again is success.
        nl.del_route(got).await.unwrap();
        assert!(nl.routes(&ours).await.unwrap().is_empty());
        nl.del_route(&route).await.unwrap();
    }
}

#[tokio::test]
async fn onlink_gateway_outside_every_subnet() {
    let ns = netns("onlink");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let dev = common::dual_stack_link(&nl).await;
    for (dst, gw) in [("10.2.0.0/24", "192.168.99.1"), ("fd02::/64", "fd99::1")] {
        let plain = Route::new(dst.parse().unwrap())
            .via(gw.parse().unwrap())
            .dev(dev)
            .protocol(PROTO);
        if dst.starts_with("10.") {
            // IPv4 refuses a gateway it cannot reach without `onlink`.
            let err = nl.add_route(&plain).await.unwrap_err();
            assert!(
                err.to_string().starts_with("adding route 10.2.0.0/24 via 192.168.99.1"),
                "{err}"
            );
            // The kernel's extended ACK message is kept.
            assert!(err.to_string().ends_with("Nexthop has invalid gateway"), "{err}");
            assert_eq!(err.errno(), Some(libc::ENETUNREACH), "{err}");
        }
        nl.replace_route(&plain.clone().onlink()).await.unwrap();
        let filter = RouteFilter {
            protocol: Some(PROTO),
            ..Default::default()
        };
        let listed = nl.routes(&filter).await.unwrap();
        let got = listed.iter().find(|r| r.destination == plain.destination).unwrap();
        assert!(got.onlink, "{got:?}");
        let family = if dst.contains(':') { "-6" } else { "-4" };
        let shown = ip(&ns, &[family, "route", "show"]);
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(&format!("{dst} via {gw}")) && l.contains("onlink")),
            "{shown}"
        );
    }
}

#[tokio::test]
async fn device_routes_big_tables_and_scopes() {
    let ns = netns("table");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let dev = common::dual_stack_link(&nl).await;
    for dst in ["10.3.0.0/24", "fd03::/64"] {
        let route = Route::new(dst.parse().unwrap()).dev(dev).table(1000).protocol(PROTO);
        nl.add_route(&route).await.unwrap();
        let in_table = RouteFilter {
            table: Some(1000),
            ..Default::default()
        };
        let listed = nl.routes(&in_table).await.unwrap();
        let got = listed
            .iter()
            .find(|r| r.destination == route.destination)
            .expect("route in table 1000");
        if route.family() == IpFamily::V4 {
            assert_eq!(got.scope, Some(RouteScope::Link), "no gateway: link scope");
        }
        assert!(nl
            .routes(&RouteFilter {
                table: Some(254),
                ..Default::default()
            })
            .await
            .unwrap()
            .iter()
            .all(|r| r.destination != route.destination));
        nl.del_route(&Route::new(dst.parse().unwrap()).table(1000))
            .await
            .unwrap();
        assert!(nl
            .routes(&in_table)
            .await
            .unwrap()
            .iter()
            .all(|r| r.destination != route.destination));
    }
    // Host bits are cleared rather than rejected.
    let sloppy: IpNetwork = "10.4.0.9/24".parse().unwrap();
    nl.add_route(&Route::new(sloppy).dev(dev)).await.unwrap();
    assert!(ip(&ns, &["route"]).contains("10.4.0.0/24"));
}

#[tokio::test]
async fn deleting_missing_routes_is_success() {
    let ns = netns("delroute");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let dev = common::dual_stack_link(&nl).await;
    for dst in ["10.9.0.0/24", "fd09::/64"] {
        nl.del_route(&Route::new(dst.parse().unwrap())).await.unwrap();
        nl.del_route(&Route::new(dst.parse().unwrap()).dev(dev).protocol(PROTO))
            .await
            .unwrap();
    }
}
