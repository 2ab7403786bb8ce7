//! Nexthop objects and routes that name them, IPv4 and IPv6, cross-checked with `ip`.

mod common;

use std::time::Duration;

use common::{ip, netns};
use trellis_net::monitor::{Change, Group, Monitor};
use trellis_net::netns::NetnsGuard;
use trellis_net::{IpFamily, Netlink, Nexthop, Route, RouteFilter};

/// iproute2 prints numbers it has no name for (99 would be "openr").
const PROTO: u8 = 117;

/// A namespace `tnet-TAG-…` with an up veth holding 10.0.0.1/24 and fd00::1/64 (an IPv4 address
/// also makes the local table exist, without which the kernel calls every onlink gateway
/// invalid): the namespace, a connection and the veth's index. `None`, with the reason printed,
/// on a kernel without nexthop objects.
async fn setup(tag: &str) -> Option<(NetnsGuard, Netlink, u32)> {
    let ns = netns(tag);
    let nl = Netlink::connect_in(ns.path()).unwrap();
    if !nl.nexthops_supported().await.unwrap() {
        eprintln!("SKIP: this kernel has no nexthop objects (Linux 5.3+)");
        return None;
    }
    let dev = common::dual_stack_link(&nl).await;
    Some((ns, nl, dev))
}

fn ours(family: IpFamily) -> RouteFilter {
    RouteFilter {
        family: Some(family),
        protocol: Some(PROTO),
        ..Default::default()
    }
}

#[tokio::test]
async fn nexthops_and_routes_by_nexthop_in_both_families() {
    let Some((ns, nl, dev)) = setup("nh").await else {
        return;
    };
    for (id, family, dst, gw) in [
        (1001, IpFamily::V4, "10.1.0.0/24", "10.1.0.0"),
        (1002, IpFamily::V6, "fd01::/64", "fd01::"),
    ] {
        // An onlink gateway outside every subnet, as the VXLAN backend uses.
        let nh = Nexthop::new(id, family)
            .via(gw.parse().unwrap())
            .dev(dev)
            .onlink()
            .protocol(PROTO);
        nl.add_nexthop(&nh).await.unwrap();
        let err = nl.add_nexthop(&nh).await.unwrap_err();
        assert!(err.is_exists(), "{err}");
        let listed: Vec<Nexthop> = nl
            .nexthops()
            .await
            .unwrap()
            .into_iter()
            .filter(|n| n.id == id)
            .collect();
        assert_eq!(listed, std::slice::from_ref(&nh));
        let shown = ip(&ns, &["nexthop", "show", "id", &id.to_string()]);
        assert!(
            shown.contains(&format!("via {gw} dev")) && shown.contains("onlink") && shown.contains("proto 117"),
            "{shown}"
        );

        let route = Route::new(dst.parse().unwrap()).nexthop(id).protocol(PROTO);
        nl.add_route(&route).await.unwrap();
        let got = nl.routes(&ours(family)).await.unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].destination, got[0].nexthop_id, got[0].gateway, got[0].oif),
            (route.destination, Some(id), Some(gw.parse().unwrap()), Some(dev)),
            "the kernel reports the nexthop's gateway and device on the route"
        );
        // A route read back (gateway and device included) can be replaced and deleted as is.
        nl.replace_route(&got[0]).await.unwrap();
        assert_eq!(nl.routes(&ours(family)).await.unwrap().len(), 1);

        // Replacing the nexthop moves the route with it.
        let moved = nh.clone().via(
            match family {
                IpFamily::V4 => "10.1.0.9",
                IpFamily::V6 => "fd01::9",
            }
            .parse()
            .unwrap(),
        );
        nl.replace_nexthop(&moved).await.unwrap();
        assert_eq!(nl.routes(&ours(family)).await.unwrap()[0].gateway, moved.gateway);

        nl.del_route(&got[0]).await.unwrap();
        assert!(nl.routes(&ours(family)).await.unwrap().is_empty());

        // Deleting a nexthop takes its routes with it; deleting it again is success.
        nl.add_route(&route).await.unwrap();
        nl.del_nexthop(id).await.unwrap();
        assert!(nl.routes(&ours(family)).await.unwrap().is_empty());
        nl.del_nexthop(id).await.unwrap();
    }
}

#[tokio::test]
async fn nexthops_made_by_ip_are_read_groups_included() {
    let Some((ns, nl, dev)) = setup("nhip").await else {
        return;
    };
    let dev_name = nl.link_by_index(dev).await.unwrap().unwrap().name;
    ip(&ns, &["nexthop", "add", "id", "7", "via", "10.0.0.2", "dev", &dev_name]);
    ip(
        &ns,
        &["-6", "nexthop", "add", "id", "8", "via", "fd00::2", "dev", &dev_name],
    );
    // A blackhole nexthop uses the loopback device, which must be up.
    ip(&ns, &["link", "set", "lo", "up"]);
    ip(&ns, &["nexthop", "add", "id", "9", "blackhole"]);
    ip(&ns, &["nexthop", "add", "id", "10", "group", "7"]);
    let mut all = nl.nexthops().await.unwrap();
    all.sort_by_key(|n| n.id);
    assert_eq!(all.iter().map(|n| n.id).collect::<Vec<_>>(), [7, 8, 9, 10]);
    assert_eq!(
        (all[0].family, all[0].gateway, all[0].oif, all[0].onlink),
        (Some(IpFamily::V4), Some("10.0.0.2".parse().unwrap()), Some(dev), false)
    );
    assert_eq!(
        (all[1].family, all[1].gateway),
        (Some(IpFamily::V6), Some("fd00::2".parse().unwrap()))
    );
    assert!(all[2].blackhole);
    assert_eq!(all[3].group, [7]);
}

#[tokio::test]
async fn bad_nexthops_get_the_kernels_words() {
    let Some((_ns, nl, dev)) = setup("nhbad").await else {
        return;
    };
    // Not onlink, and the gateway is on no subnet of the device.
    let nh = Nexthop::new(5, IpFamily::V4).via("10.77.0.1".parse().unwrap()).dev(dev);
    let err = nl.add_nexthop(&nh).await.unwrap_err().to_string();
    assert!(err.starts_with("adding nexthop id 5 via 10.77.0.1 dev "), "{err}");
    assert!(err.contains("Nexthop has invalid gateway"), "{err}");
    // A route naming a nexthop that does not exist.
    let err = nl
        .add_route(&Route::new("10.5.0.0/24".parse().unwrap()).nexthop(404))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Nexthop id does not exist"), "{err}");
}

#[tokio::test]
async fn nexthop_changes_are_reported() {
    let Some((ns, nl, dev)) = setup("nhmon").await else {
        return;
    };
    let mut mon = Monitor::open_in(ns.path(), &[Group::Nexthop]).unwrap();
    let nh = Nexthop::new(77, IpFamily::V4)
        .via("10.0.0.2".parse().unwrap())
        .dev(dev)
        .protocol(PROTO);
    nl.add_nexthop(&nh).await.unwrap();
    nl.del_nexthop(77).await.unwrap();
    let mut seen = Vec::new();
    let wait = async {
        while seen.len() < 2 {
            if let Some(Change::Nexthop { deleted, nexthop }) = mon.next().await {
                seen.push((deleted, nexthop.id, nexthop.protocol));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .unwrap_or_else(|_| panic!("nexthop notifications missing; got {seen:?}"));
    assert_eq!(seen, [(false, 77, Some(PROTO)), (true, 77, Some(PROTO))]);
}
