//! Links: veth into a namespace, bridge and ports, vxlan, ipip, setters, deletes.

mod common;

use common::{ifname, ip, netns};
use trellis_net::netns::NetnsRef;
use trellis_net::{BridgeConfig, IpipConfig, IpipInfo, MacAddr, Netlink, VethConfig, VxlanConfig, VxlanInfo};

#[tokio::test]
async fn veth_peer_is_born_in_the_pod_namespace_under_its_final_name() {
    let (host_ns, pod_ns) = (netns("host"), netns("pod"));
    let host = Netlink::connect_in(host_ns.path()).unwrap();
    let pod = Netlink::connect_in(pod_ns.path()).unwrap();
    // An `eth0` on the host side too: the pod's eth0 must not clash with it.
    host.create_bridge(&BridgeConfig::new("eth0")).await.unwrap();

    let name = ifname("v");
    let peer_mac: MacAddr = "02:00:00:00:00:42".parse().unwrap();
    let cfg = VethConfig::new(&name, "eth0")
        .peer_netns(NetnsRef::Path(pod_ns.path()))
        .mtu(1400)
        .peer_mac(peer_mac);
    let veth = host.create_veth(&cfg).await.unwrap();
    assert_eq!(
        (veth.name.as_str(), veth.kind.as_deref(), veth.mtu),
        (name.as_str(), Some("veth"), 1400)
    );
    assert!(veth.link_netnsid.is_some(), "peer lives in another namespace");

    let eth0 = pod.link_by_name("eth0").await.unwrap().expect("eth0 in the pod");
    assert_eq!(
        (eth0.kind.as_deref(), eth0.mac, eth0.mtu),
        (Some("veth"), Some(peer_mac), 1400)
    );
    assert_eq!(
        veth.link,
        Some(eth0.index),
        "IFLA_LINK of the host end is the pod end's index"
    );
    assert!(ip(&pod_ns, &["link", "show", "eth0"]).contains("02:00:00:00:00:42"));

    // Creating it again is EEXIST, and says what failed.
    let err = host.create_veth(&cfg).await.unwrap_err();
    assert!(err.is_exists(), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("creating veth {name} with peer eth0 in ")),
        "{err}"
    );

    // Deleting one end deletes both; deleting again is success.
    host.del_link(veth.index).await.unwrap();
    assert!(pod.link_by_name("eth0").await.unwrap().is_none());
    host.del_link(veth.index).await.unwrap();
    host.del_link_by_name(&name).await.unwrap();
}

#[tokio::test]
async fn bridge_ports_master_hairpin_promisc_and_friends() {
    let ns = netns("bridge");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let br_name = ifname("br");
    let br = nl
        .create_bridge(&BridgeConfig {
            name: &br_name,
            mtu: Some(1450),
            mac: None,
        })
        .await
        .unwrap();
    assert_eq!(
        (br.kind.as_deref(), br.mtu, br.up),
        (Some("bridge"), 1450, false),
        "created down"
    );

    let (port, _other) = common::veth_pair_up(&nl).await;
    nl.set_link_master(port.index, br.index).await.unwrap();
    nl.set_link_up(br.index).await.unwrap();
    nl.set_bridge_port_hairpin(port.index, true).await.unwrap();
    nl.set_link_promisc(br.index, true).await.unwrap();

    let port = nl.link_by_index(port.index).await.unwrap().unwrap();
    assert_eq!(port.master, Some(br.index));
    assert!(ip(&ns, &["-d", "link", "show", "dev", &port.name]).contains("hairpin on"));
    let br = nl.link_by_index(br.index).await.unwrap().unwrap();
    assert!(br.up && br.promisc);

    nl.set_bridge_port_hairpin(port.index, false).await.unwrap();
    assert!(ip(&ns, &["-d", "link", "show", "dev", &port.name]).contains("hairpin off"));
    nl.set_link_nomaster(port.index).await.unwrap();
    assert_eq!(nl.link_by_index(port.index).await.unwrap().unwrap().master, None);
    nl.set_link_promisc(br.index, false).await.unwrap();
    assert!(!nl.link_by_index(br.index).await.unwrap().unwrap().promisc);
}

#[tokio::test]
async fn mtu_mac_name_state_and_namespace_can_be_changed() {
    let (a_ns, b_ns) = (netns("seta"), netns("setb"));
    let nl = Netlink::connect_in(a_ns.path()).unwrap();
    let (x, y) = common::veth_pair_up(&nl).await;

    nl.set_link_mtu(x.index, 1300).await.unwrap();
    let mac: MacAddr = "02:aa:bb:cc:dd:ee".parse().unwrap();
    nl.set_link_mac(x.index, mac).await.unwrap();
    nl.set_link_down(x.index).await.unwrap();
    let renamed = ifname("r");
    nl.set_link_name(x.index, &renamed).await.unwrap();
    let x2 = nl.link_by_name(&renamed).await.unwrap().unwrap();
    assert_eq!((x2.index, x2.mtu, x2.mac, x2.up), (x.index, 1300, Some(mac), false));
    assert!(nl.link_by_name(&x.name).await.unwrap().is_none());

    // Move y to the other namespace, renamed on the way.
    nl.set_link_netns(y.index, NetnsRef::Path(b_ns.path()), Some("eth1"))
        .await
        .unwrap();
    assert!(nl.link_by_name(&y.name).await.unwrap().is_none());
    let b = Netlink::connect_in(b_ns.path()).unwrap();
    let moved = b.link_by_name("eth1").await.unwrap().expect("moved and renamed");
    assert_eq!(moved.kind.as_deref(), Some("veth"));

    // Errors name the object and keep the errno.
    let err = nl.set_link_mtu(x.index, 10).await.unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("setting mtu 10 on link {renamed}: Invalid argument (EINVAL)")),
        "{err}"
    );
}

#[tokio::test]
async fn vxlan_device_for_the_overlay() {
    let ns = netns("vxlan");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (underlay, _) = common::veth_pair_up(&nl).await;
    nl.add_address(underlay.index, "192.168.77.1/24".parse().unwrap())
        .await
        .unwrap();
    let name = ifname("vx");
    let mac: MacAddr = "02:00:00:00:77:01".parse().unwrap();
    let cfg = VxlanConfig {
        local: Some("192.168.77.1".parse().unwrap()),
        port: 8472,
        underlay_index: Some(underlay.index),
        mtu: Some(1450),
        mac: Some(mac),
        ..VxlanConfig::new(&name, 42)
    };
    let vx = nl.create_vxlan(&cfg).await.unwrap();
    assert_eq!((vx.kind.as_deref(), vx.mtu, vx.mac), (Some("vxlan"), 1450, Some(mac)));
    assert_eq!(
        vx.vxlan,
        Some(VxlanInfo {
            vni: 42,
            port: 8472,
            local: Some("192.168.77.1".parse().unwrap()),
            underlay_index: Some(underlay.index),
            learning: false,
        })
    );
    nl.set_link_up(vx.index).await.unwrap();
    let details = ip(&ns, &["-d", "link", "show", "dev", &name]);
    for want in [
        "vxlan id 42",
        "local 192.168.77.1",
        &format!("dev {}", underlay.name),
        "dstport 8472",
        "nolearning",
    ] {
        assert!(details.contains(want), "{want:?} not in {details}");
    }
}

#[tokio::test]
async fn ipip_device_for_the_overlay_or_a_clear_skip() {
    let ns = netns("ipip");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (underlay, _) = common::veth_pair_up(&nl).await;
    nl.add_address(underlay.index, "192.168.77.1/24".parse().unwrap())
        .await
        .unwrap();
    let name = ifname("ip");
    let cfg = IpipConfig {
        local: Some("192.168.77.1".parse().unwrap()),
        underlay_index: Some(underlay.index),
        ttl: 64,
        pmtudisc: true,
        mtu: Some(1480),
        ..IpipConfig::new(&name)
    };
    let tun = match nl.create_ipip(&cfg).await {
        Ok(tun) => tun,
        Err(e) if e.is_not_supported() => {
            eprintln!("SKIPPED ipip_device_for_the_overlay: this kernel has no IPIP support (modprobe ipip): {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!((tun.kind.as_deref(), tun.mtu), (Some("ipip"), 1480));
    assert_eq!(
        tun.ipip,
        Some(IpipInfo {
            local: Some("192.168.77.1".parse().unwrap()),
            remote: None,
            underlay_index: Some(underlay.index),
            ttl: 64,
            pmtudisc: true,
        })
    );
    let details = ip(&ns, &["-d", "link", "show", "dev", &name]);
    for want in [
        "ipip",
        "local 192.168.77.1",
        &format!("dev {}", underlay.name),
        "ttl 64",
        "mtu 1480",
    ] {
        assert!(details.contains(want), "{want:?} not in {details}");
    }
    let err = nl.create_ipip(&cfg).await.unwrap_err();
    assert!(err.is_exists(), "{err}");
    nl.del_link(tun.index).await.unwrap();
}

#[tokio::test]
async fn lookups_of_missing_links_are_none_and_deletes_succeed() {
    let ns = netns("missing");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    assert!(nl.link_by_name("nope0").await.unwrap().is_none());
    assert!(nl.link_by_index(999_999).await.unwrap().is_none());
    let err = nl.link_index("nope0").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    nl.del_link(999_999).await.unwrap();
    nl.del_link_by_name("nope0").await.unwrap();
    let err = nl.set_link_up(999_999).await.unwrap_err();
    assert!(err.is_not_found() && err.to_string().contains("#999999"), "{err}");
    assert!(nl.link_by_name("bad/name").await.is_err());
    assert!(nl
        .create_bridge(&BridgeConfig::new("much-too-long-name"))
        .await
        .is_err());
}
