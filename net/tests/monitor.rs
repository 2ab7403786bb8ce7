//! Change notifications and the ethtool TX checksum knob, in a namespace of their own.

mod common;

use std::time::Duration;

use common::{ifname, ip, netns};
use trellis_net::ethtool::Ethtool;
use trellis_net::monitor::{Change, Group, Monitor};
use trellis_net::{Netlink, Route, VxlanConfig};

/// The next change that `pred` accepts, within two seconds.
async fn expect(mon: &mut Monitor, what: &str, pred: impl Fn(&Change) -> bool) -> Change {
    let wait = async {
        loop {
            match mon.next().await {
                Some(c) if pred(&c) => return c,
                Some(_) => continue,
                None => panic!("monitor closed while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .unwrap_or_else(|_| panic!("no notification for {what}"))
}

#[tokio::test]
async fn route_neighbour_and_fdb_changes_are_reported_typed() {
    let ns = netns("mon");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let mut mon = Monitor::open_in(
        ns.path(),
        &[Group::Ipv4Route, Group::Ipv6Route, Group::Neighbour, Group::Link],
    )
    .unwrap();
    let (underlay, _) = common::veth_pair_up(&nl).await;
    nl.add_address(underlay.index, "192.168.9.1/24".parse().unwrap())
        .await
        .unwrap();
    let name = ifname("vx");
    let vx = nl
        .create_vxlan(&VxlanConfig {
            local: Some("192.168.9.1".parse().unwrap()),
            underlay_index: Some(underlay.index),
            ..VxlanConfig::new(&name, 7)
        })
        .await
        .unwrap();
    nl.set_link_up(vx.index).await.unwrap();
    expect(
        &mut mon,
        "the vxlan link",
        |c| matches!(c, Change::Link { deleted: false, link } if link.name == name),
    )
    .await;

    let route = Route::new("10.9.0.0/24".parse().unwrap())
        .via("10.9.9.9".parse().unwrap())
        .dev(vx.index)
        .onlink()
        .protocol(117);
    nl.replace_route(&route).await.unwrap();
    ip(&ns, &["route", "del", "10.9.0.0/24"]);
    let c = expect(&mut mon, "the route deletion", |c| {
        matches!(c, Change::Route { deleted: true, .. })
    })
    .await;
    let Change::Route { route: got, .. } = c else {
        unreachable!()
    };
    assert_eq!(
        (got.destination, got.protocol, got.oif, got.onlink),
        (route.destination, Some(117), Some(vx.index), true)
    );

    let mac = "02:00:00:00:09:02".parse().unwrap();
    nl.replace_neighbour(vx.index, "10.9.0.0".parse().unwrap(), mac)
        .await
        .unwrap();
    nl.replace_fdb(vx.index, mac, "192.168.9.2".parse().unwrap())
        .await
        .unwrap();
    ip(&ns, &["neigh", "del", "10.9.0.0", "dev", &name]);
    expect(
        &mut mon,
        "the neighbour deletion",
        |c| matches!(c, Change::Neighbour { deleted: true, neighbour } if neighbour.index == vx.index),
    )
    .await;
    let status = std::process::Command::new("bridge")
        .args(["-n", ns.name(), "fdb", "del", "02:00:00:00:09:02", "dev", &name])
        .args(["dst", "192.168.9.2", "self"])
        .status()
        .unwrap();
    assert!(status.success());
    expect(
        &mut mon,
        "the fdb deletion",
        |c| matches!(c, Change::Fdb { deleted: true, entry } if entry.index == vx.index && entry.mac == mac),
    )
    .await;

    // The monitor is bound to its namespace: a change in another one is not reported.
    let other = netns("mon2");
    let nl2 = Netlink::connect_in(other.path()).unwrap();
    common::veth_pair_up(&nl2).await;
    nl.del_link(vx.index).await.unwrap();
    let c = expect(&mut mon, "the vxlan deletion", |c| {
        matches!(c, Change::Link { deleted: true, .. })
    })
    .await;
    assert!(matches!(c, Change::Link { link, .. } if link.index == vx.index));
}

#[tokio::test]
async fn tx_checksum_offload_can_be_read_and_turned_off_and_on() {
    let ns = netns("csum");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let name = ifname("vx");
    nl.create_vxlan(&VxlanConfig::new(&name, 9)).await.unwrap();
    let ethtool = Ethtool::open_in(ns.path()).unwrap();
    assert!(ethtool.tx_checksum(&name).unwrap(), "on by default for vxlan");
    ethtool.set_tx_checksum(&name, false).unwrap();
    assert!(!ethtool.tx_checksum(&name).unwrap());
    ethtool.set_tx_checksum(&name, true).unwrap();
    assert!(ethtool.tx_checksum(&name).unwrap());
    let err = ethtool.tx_checksum("nope0").unwrap_err();
    assert!(err.is_not_found(), "{err}");
}
