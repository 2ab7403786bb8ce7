//! Neighbours and VXLAN FDB entries.

mod common;

use std::net::IpAddr;

use common::{ifname, ip, netns};
use trellis_net::{IpFamily, MacAddr, NeighbourState, Netlink, VxlanConfig};

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn permanent_neighbours_in_both_families() {
    let ns = netns("neigh");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (link, _) = common::veth_pair_up(&nl).await;
    for (family, addr) in [(IpFamily::V4, "10.0.0.9"), (IpFamily::V6, "fd00::9")] {
        let ip_addr: IpAddr = addr.parse().unwrap();
        nl.add_neighbour(link.index, ip_addr, mac("02:00:00:00:00:09"))
            .await
            .unwrap();
        let err = nl
            .add_neighbour(link.index, ip_addr, mac("02:00:00:00:00:09"))
            .await
            .unwrap_err();
        assert!(err.is_exists(), "{err}");
        nl.replace_neighbour(link.index, ip_addr, mac("02:00:00:00:00:0a"))
            .await
            .unwrap();

        let listed = nl.neighbours(Some(link.index), Some(family)).await.unwrap();
        let entry = listed.iter().find(|n| n.ip == ip_addr).expect("listed");
        assert_eq!(
            (entry.mac, entry.state),
            (Some(mac("02:00:00:00:00:0a")), NeighbourState::Permanent)
        );
        assert!(ip(&ns, &["neigh", "show", "dev", &link.name])
            .contains(&format!("{addr} lladdr 02:00:00:00:00:0a PERMANENT")));

        nl.del_neighbour(link.index, ip_addr).await.unwrap();
        assert!(nl
            .neighbours(Some(link.index), None)
            .await
            .unwrap()
            .iter()
            .all(|n| n.ip != ip_addr));
        nl.del_neighbour(link.index, ip_addr)
            .await
            .expect("deleting a missing neighbour is success");
    }
}

#[tokio::test]
async fn vxlan_fdb_entries_and_neighbours() {
    let ns = netns("fdb");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (underlay, _) = common::veth_pair_up(&nl).await;
    nl.add_address(underlay.index, "192.168.50.1/24".parse().unwrap())
        .await
        .unwrap();
    let name = ifname("vx");
    let cfg = VxlanConfig {
        local: Some("192.168.50.1".parse().unwrap()),
        underlay_index: Some(underlay.index),
        ..VxlanConfig::new(&name, 7)
    };
    let vx = nl.create_vxlan(&cfg).await.unwrap();
    nl.set_link_up(vx.index).await.unwrap();

    let remote = |s: &str| -> IpAddr { s.parse().unwrap() };
    nl.append_fdb(vx.index, MacAddr::ZERO, remote("192.168.50.2"))
        .await
        .unwrap();
    nl.append_fdb(vx.index, MacAddr::ZERO, remote("192.168.50.3"))
        .await
        .unwrap();
    let vtep = mac("02:00:00:00:50:04");
    nl.replace_fdb(vx.index, vtep, remote("192.168.50.4")).await.unwrap();
    nl.replace_fdb(vx.index, vtep, remote("192.168.50.5"))
        .await
        .expect("replace moves the MAC");

    let entries = nl.fdb(vx.index).await.unwrap();
    let dsts = |m: MacAddr| {
        let mut d: Vec<_> = entries.iter().filter(|e| e.mac == m).filter_map(|e| e.dst).collect();
        d.sort();
        d
    };
    assert_eq!(dsts(MacAddr::ZERO), [remote("192.168.50.2"), remote("192.168.50.3")]);
    assert_eq!(dsts(vtep), [remote("192.168.50.5")]);
    assert!(
        entries
            .iter()
            .filter(|e| e.dst.is_some())
            .all(|e| e.permanent && e.ntf_self),
        "{entries:?}"
    );
    let shown = ip(&ns, &["-d", "link", "show", "dev", &name]);
    assert!(shown.contains("vxlan id 7"), "{shown}");

    // flannel's pattern: the remote VTEP IP resolves to its MAC without ARP.
    nl.replace_neighbour(vx.index, remote("10.244.1.0"), vtep)
        .await
        .unwrap();
    assert!(nl
        .neighbours(Some(vx.index), Some(IpFamily::V4))
        .await
        .unwrap()
        .iter()
        .any(|n| n.mac == Some(vtep)));

    nl.del_fdb(vx.index, MacAddr::ZERO, Some(remote("192.168.50.2")))
        .await
        .unwrap();
    nl.del_fdb(vx.index, vtep, None).await.unwrap();
    let entries = nl.fdb(vx.index).await.unwrap();
    let left: Vec<_> = entries
        .iter()
        .filter(|e| e.dst.is_some())
        .map(|e| (e.mac, e.dst))
        .collect();
    assert_eq!(left, [(MacAddr::ZERO, Some(remote("192.168.50.3")))]);
    nl.del_fdb(vx.index, vtep, None)
        .await
        .expect("deleting a missing entry is success");
    nl.del_fdb(vx.index, MacAddr::ZERO, Some(remote("192.168.50.9")))
        .await
        .expect("missing remote too");
}
