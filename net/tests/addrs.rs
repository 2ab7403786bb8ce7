//! Addresses, IPv4 and IPv6.

mod common;

use common::{ip, netns};
use trellis_net::{AddressOptions, IpNetwork, Netlink};

#[tokio::test]
async fn addresses_are_added_idempotently_listed_and_deleted_in_both_families() {
    let ns = netns("addr");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (link, _) = common::veth_pair_up(&nl).await;
    for cidr in ["10.20.0.5/24", "fd00:20::5/64"] {
        let addr: IpNetwork = cidr.parse().unwrap();
        nl.add_address(link.index, addr).await.unwrap();
        nl.add_address(link.index, addr)
            .await
            .expect("adding again is success (replace)");
        let listed = nl.addresses(link.index).await.unwrap();
        assert_eq!(listed.iter().filter(|a| a.address == addr).count(), 1, "{listed:?}");
        assert!(ip(&ns, &["addr", "show", "dev", &link.name]).contains(cidr));

        nl.del_address(link.index, addr).await.unwrap();
        assert!(nl
            .addresses(link.index)
            .await
            .unwrap()
            .iter()
            .all(|a| a.address != addr));
        nl.del_address(link.index, addr)
            .await
            .expect("deleting a missing address is success");
    }
    nl.del_address(999_999, "10.20.0.5/24".parse().unwrap())
        .await
        .expect("missing link is success too");
}

#[tokio::test]
async fn ipv6_nodad_address_is_usable_at_once() {
    let ns = netns("nodad");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (link, _) = common::veth_pair_up(&nl).await;
    let opts = AddressOptions {
        nodad: true,
        ..Default::default()
    };
    let with = "fd00:21::5/64".parse().unwrap();
    let without = "fd00:22::5/64".parse().unwrap();
    nl.add_address_with(link.index, with, opts).await.unwrap();
    nl.add_address(link.index, without).await.unwrap();
    let listed = nl.addresses(link.index).await.unwrap();
    let find = |a: IpNetwork| listed.iter().find(|x| x.address == a).unwrap().clone();
    let (with, without) = (find(with), find(without));
    assert!(with.flags & 0x02 != 0 && !with.is_tentative(), "{with:?}");
    assert!(without.is_tentative(), "DAD runs on an up link: {without:?}");
}

#[tokio::test]
async fn ipv4_broadcast_and_no_prefix_route() {
    let ns = netns("addr4");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (link, _) = common::veth_pair_up(&nl).await;
    nl.add_address(link.index, "10.30.0.5/24".parse().unwrap())
        .await
        .unwrap();
    assert!(ip(&ns, &["addr", "show", "dev", &link.name]).contains("brd 10.30.0.255"));
    let opts = AddressOptions {
        no_prefix_route: true,
        ..Default::default()
    };
    nl.add_address_with(link.index, "10.31.0.5/24".parse().unwrap(), opts)
        .await
        .unwrap();
    let routes = ip(&ns, &["route", "show", "dev", &link.name]);
    assert!(
        routes.contains("10.30.0.0/24") && !routes.contains("10.31.0.0/24"),
        "{routes}"
    );
}
