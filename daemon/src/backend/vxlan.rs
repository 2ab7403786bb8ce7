//! VXLAN: an L3 overlay over one VXLAN device per node (flannel's `vxlan` backend).
//!
//! # Why this design
//!
//! Each node has one VXLAN device, `trellis.<VNI>` (flannel: `flannel.1`), with learning off and
//! no multicast group: nothing is ever flooded or learned. Instead, for every other node the
//! daemon programs three things from that node's lease:
//!
//! ```text
//! route  10.244.2.0/24 via 10.244.2.0 dev trellis.1 onlink proto 117   # remote pods behind its VTEP
//! neigh  10.244.2.0 lladdr 02:aa:.. dev trellis.1 nud permanent        # VTEP address -> VTEP MAC
//! fdb    02:aa:.. dev trellis.1 dst 192.168.0.12 self permanent        # VTEP MAC -> node
//! ```
//!
//! The route sends the packet to the remote VTEP; the permanent neighbour gives the inner
//! Ethernet header without ARP over the overlay; the FDB entry tells the device where to send the
//! encapsulated frame. Everything is known in advance from the leases, so the first packet to a
//! node is never delayed or dropped by resolution, and a node's whole state can be rebuilt from
//! the datastore at any time (restarts, someone deleting a route).
//!
//! - A node's *VTEP address* is its pod CIDR's network address (`10.244.2.0/32`, and the IPv6
//!   CIDR's first address as a /128; [`super::tunnel::tunnel_address`]): it needs no allocation
//!   and no extra lease field, and it is never a pod's address. Traffic the node itself sends to
//!   pods elsewhere leaves from it.
//! - The *VTEP MAC* is derived from the node name ([`vtep_mac`]), so the lease can be published
//!   before the device exists and a recreated device keeps its MAC: peers need no update.
//! - One device carries both inner families: IPv6 pods over an IPv4 underlay need nothing more
//!   than the IPv6 route and neighbour.
//! - `DirectRouting`: a node on our L2 subnet gets a plain route via its underlay address instead
//!   (see `hostgw`): no encapsulation where none is needed, the overlay everywhere else.
//!
//! The device is kept by [`super::tunnel`]; TX checksum offload on it is decided by
//! [`super::checksum`] (off on kernels that corrupt the outer UDP checksum of NATed packets).

use super::tunnel::{tunnel_address, Tunnel, TunnelKind};
use super::{direct_route, hostgw::backend_name, on_our_subnet, Desired, Notices, TRELLISD_PROTO};
use crate::error::DataplaneError;
use crate::lease::{BackendData, Lease, MacString};
use crate::underlay::Underlay;
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use trellis_net::ethtool::Ethtool;
use trellis_net::{LinkInfo, MacAddr, NetError, Netlink, Route, VxlanConfig, VxlanInfo};

/// The device's name: `trellis.<VNI>` like flannel's `flannel.<VNI>`, or `trellis<VNI>` when the
/// VNI is too long for the 15-byte interface name limit (VNIs of 8 digits).
pub fn device_name(vni: u32) -> String {
    let dotted = format!("trellis.{vni}");
    if dotted.len() <= 15 {
        dotted
    } else {
        format!("trellis{vni}")
    }
}

/// The VTEP MAC of a node: stable, derived from its name (FNV-1a), locally administered and
/// unicast. Known before the device exists, so it can go in the lease first.
pub fn vtep_mac(node: &str) -> MacAddr {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "trellis-vtep:".bytes().chain(node.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    MacAddr([(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]])
}

/// The VXLAN tunnel: what its device has that other tunnels' do not (how a tunnel device is
/// kept: [`super::tunnel`]).
#[derive(Debug)]
pub struct Vxlan {
    name: String,
    vni: u32,
    port: u16,
    /// The VTEP MAC, published in the lease.
    mac: MacAddr,
    ethtool: Ethtool,
    /// TX checksum offload on the device, as [`super::checksum::decide`] decided.
    tx_checksum: bool,
}

impl Vxlan {
    /// `node`'s VXLAN device for `vni` on UDP `port`, TX checksum offload on or off.
    pub fn new(vni: u32, port: u16, node: &str, tx_checksum: bool, ethtool: Ethtool) -> Result<Vxlan, DataplaneError> {
        if vni == 0 || vni >= 1 << 24 {
            return Err(DataplaneError::Invalid(format!("VNI {vni} is not in 1..16777215")));
        }
        Ok(Vxlan {
            name: device_name(vni),
            vni,
            port,
            mac: vtep_mac(node),
            ethtool,
            tx_checksum,
        })
    }

    /// What a node with this device publishes in its lease, with the `vxlan` backend.
    pub fn backend_data(&self) -> BackendData {
        BackendData::Vxlan {
            vtep_mac: MacString(self.mac),
            vni: self.vni,
        }
    }

    /// The VTEP MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    fn config(&self, underlay: &Underlay, mtu: u32) -> VxlanConfig<'_> {
        VxlanConfig {
            local: Some(underlay.ip),
            port: self.port,
            underlay_index: Some(underlay.index),
            learning: false,
            mtu: Some(mtu),
            mac: Some(self.mac),
            ..VxlanConfig::new(&self.name, self.vni)
        }
    }

    /// The settings the kernel reports for the device we create (the MAC aside).
    fn wanted(&self, underlay: &Underlay) -> VxlanInfo {
        VxlanInfo {
            vni: self.vni,
            port: self.port,
            local: Some(underlay.ip),
            underlay_index: Some(underlay.index),
            learning: false,
        }
    }
}

impl TunnelKind for Vxlan {
    const LINK_KIND: &'static str = "vxlan";
    const LABEL: &'static str = "VXLAN";

    fn name(&self) -> &str {
        &self.name
    }

    async fn create(&self, nl: &Netlink, underlay: &Underlay, mtu: u32) -> Result<LinkInfo, NetError> {
        nl.create_vxlan(&self.config(underlay, mtu)).await
    }

    /// The VXLAN settings, and the MAC: peers reach this node's VTEP by the MAC in its lease.
    fn differences(&self, link: &LinkInfo, underlay: &Underlay) -> Vec<String> {
        let want = self.wanted(underlay);
        let mut diff = Vec::new();
        match &link.vxlan {
            Some(have) if *have == want => {}
            have => diff.push(format!("{have:?}, want {want:?}")),
        }
        if link.mac != Some(self.mac) {
            diff.push(format!("mac {:?}, want {}", link.mac, self.mac));
        }
        diff
    }

    /// The VTEP addresses: one device carries both inner families.
    fn addresses(&self, own: &Lease) -> Vec<IpNetwork> {
        own.pod_cidrs.iter().map(tunnel_address).collect()
    }

    /// TX checksum offload, which someone (or a recreated device's default) may have turned.
    fn fix_in_place(&self) -> Result<(), NetError> {
        if self.ethtool.tx_checksum(&self.name)? != self.tx_checksum {
            self.ethtool.set_tx_checksum(&self.name, self.tx_checksum)?;
        }
        Ok(())
    }
}

/// What the per-lease objects depend on: the VNI, DirectRouting and the device's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub vni: u32,
    pub direct_routing: bool,
    /// The device's index (it changes when the device is recreated).
    pub index: u32,
}

impl Tunnel<Vxlan> {
    /// The overlay through this device, as it is now.
    pub fn overlay(&self, direct_routing: bool) -> Overlay {
        Overlay {
            vni: self.kind().vni,
            direct_routing,
            index: self.index(),
        }
    }
}

impl Overlay {
    /// Route + neighbour + FDB entry per remote pod CIDR, or a direct route (DirectRouting, same
    /// subnet, same family).
    pub fn desired(&self, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
        let mac = match &remote.backend {
            BackendData::Vxlan { vtep_mac, vni } if *vni == self.vni => vtep_mac.0,
            BackendData::Vxlan { vni, .. } => {
                let msg = format!(
                    "node {} uses VNI {vni}, this node {}: no route to its pods",
                    remote.node, self.vni
                );
                return notices.note(&remote.node, "vni", msg);
            }
            other => {
                let msg = format!(
                    "node {} publishes a {} lease but this node runs vxlan: no route to its pods",
                    remote.node,
                    backend_name(other)
                );
                return notices.note(&remote.node, "backend", msg);
            }
        };
        if remote.underlay_ip.is_ipv4() != underlay.ip.is_ipv4() {
            let msg = format!(
                "node {}'s underlay address {} is not of this node's underlay family ({}): no route to its pods",
                remote.node, remote.underlay_ip, underlay.ip
            );
            return notices.note(&remote.node, "family", msg);
        }
        if let Some((_, other)) = out
            .fdb
            .range((mac, IpAddr::from([0u8; 4]))..)
            .next()
            .filter(|(m, _)| *m == mac)
        {
            let msg = format!(
                "node {} publishes VTEP MAC {mac}, already used by the node at {other}: no route to its pods",
                remote.node
            );
            return notices.note(&remote.node, "mac", msg);
        }
        let direct = self.direct_routing && on_our_subnet(remote, underlay);
        let mut overlay = false;
        for cidr in &remote.pod_cidrs {
            if direct && cidr.is_ipv4() == underlay.ip.is_ipv4() {
                out.routes.insert(*cidr, direct_route(*cidr, remote, underlay));
                continue;
            }
            let vtep = cidr.network();
            let route = Route::new(*cidr)
                .via(vtep)
                .dev(self.index)
                .onlink()
                .protocol(TRELLISD_PROTO);
            out.routes.insert(*cidr, route);
            out.neighbours.insert(vtep, mac);
            overlay = true;
        }
        if overlay {
            out.fdb.insert((mac, remote.underlay_ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_fit_the_interface_name_limit() {
        assert_eq!(device_name(1), "trellis.1");
        assert_eq!(device_name(1_234_567), "trellis.1234567");
        assert_eq!(device_name(16_777_215), "trellis16777215");
    }

    #[test]
    fn vtep_macs_are_stable_unicast_and_local() {
        let a = vtep_mac("node-1");
        assert_eq!(a, vtep_mac("node-1"));
        assert_ne!(a, vtep_mac("node-2"));
        assert_eq!(a.0[0] & 0x03, 0x02, "{a}: locally administered, unicast");
        // Pinned: a MAC published in a lease must not change with a new build.
        assert_eq!(vtep_mac("node-1").to_string(), "fe:37:ff:e0:30:a7");
    }

    use crate::backend::fixtures::{link, underlay};

    #[test]
    fn the_device_we_want() {
        let (u, ethtool) = (underlay(), Ethtool::open().unwrap());
        let vx = Vxlan::new(1, 8472, "node-1", false, ethtool).unwrap();
        let cfg = vx.config(&u, 1450);
        assert_eq!(
            (
                cfg.name,
                cfg.vni,
                cfg.port,
                cfg.local,
                cfg.underlay_index,
                cfg.learning,
                cfg.mtu,
                cfg.mac
            ),
            (
                "trellis.1",
                1,
                8472,
                Some("192.168.0.11".parse().unwrap()),
                Some(2),
                false,
                Some(1450),
                Some(vtep_mac("node-1"))
            )
        );
        let mut link = LinkInfo {
            mac: Some(vtep_mac("node-1")),
            vxlan: Some(vx.wanted(&u)),
            ..link("trellis.1", "vxlan")
        };
        assert!(vx.differences(&link, &u).is_empty());
        link.vxlan.as_mut().unwrap().port = 4789;
        assert_eq!(vx.differences(&link, &u).len(), 1, "another port");
        link.mac = Some(vtep_mac("node-2"));
        assert_eq!(vx.differences(&link, &u).len(), 2, "and a MAC the peers do not know");
        assert!(Vxlan::new(1 << 24, 8472, "node-1", false, Ethtool::open().unwrap()).is_err());
    }

    fn lease(node: &str, ip: &str, cidrs: &[&str], vni: u32) -> Lease {
        let backend = BackendData::Vxlan {
            vtep_mac: MacString(vtep_mac(node)),
            vni,
        };
        crate::backend::fixtures::lease(node, ip, cidrs, backend)
    }

    #[test]
    fn each_remote_cidr_gets_a_route_via_its_vtep_a_neighbour_and_one_fdb_entry() {
        let overlay = Overlay {
            vni: 1,
            direct_routing: false,
            index: 7,
        };
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let n2 = lease("n2", "192.168.0.12", &["10.244.2.0/24", "fd00:244:2::/64"], 1);
        overlay.desired(&n2, &underlay(), &mut out, &mut notices);
        let r4 = &out.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (r4.gateway, r4.oif, r4.onlink, r4.protocol),
            (Some("10.244.2.0".parse().unwrap()), Some(7), true, Some(TRELLISD_PROTO))
        );
        let r6 = &out.routes[&"fd00:244:2::/64".parse().unwrap()];
        assert_eq!(
            r6.gateway,
            Some("fd00:244:2::".parse().unwrap()),
            "v6 via the v6 VTEP address"
        );
        let mac = vtep_mac("n2");
        assert_eq!(out.neighbours.len(), 2);
        assert_eq!(out.neighbours[&"fd00:244:2::".parse::<IpAddr>().unwrap()], mac);
        assert_eq!(
            out.fdb.iter().collect::<Vec<_>>(),
            [&(mac, "192.168.0.12".parse().unwrap())]
        );
        assert_eq!(notices.messages().count(), 0);
    }

    #[test]
    fn direct_routing_goes_direct_on_our_subnet_and_over_the_overlay_elsewhere() {
        let overlay = Overlay {
            vni: 1,
            direct_routing: true,
            index: 7,
        };
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let u = underlay();
        overlay.desired(
            &lease("near", "192.168.0.12", &["10.244.2.0/24", "fd00:244:2::/64"], 1),
            &u,
            &mut out,
            &mut notices,
        );
        overlay.desired(
            &lease("far", "10.1.0.13", &["10.244.3.0/24"], 1),
            &u,
            &mut out,
            &mut notices,
        );
        let near = &out.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (near.gateway, near.oif, near.onlink),
            (Some("192.168.0.12".parse().unwrap()), Some(2), false)
        );
        // IPv6 pods cannot be routed via an IPv4 underlay address: overlay for them.
        let near6 = &out.routes[&"fd00:244:2::/64".parse().unwrap()];
        assert_eq!(near6.oif, Some(7));
        let far = &out.routes[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!((far.gateway, far.oif), (Some("10.244.3.0".parse().unwrap()), Some(7)));
        assert_eq!(out.neighbours.len(), 2, "near's v6 VTEP and far's VTEP");
        assert_eq!(out.fdb.len(), 2);
    }

    #[test]
    fn remotes_that_cannot_work_are_noted_not_routed() {
        let overlay = Overlay {
            vni: 1,
            direct_routing: false,
            index: 7,
        };
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let u = underlay();
        overlay.desired(
            &lease("other-vni", "192.168.0.12", &["10.244.2.0/24"], 2),
            &u,
            &mut out,
            &mut notices,
        );
        overlay.desired(
            &lease("v6-underlay", "fd00::13", &["10.244.3.0/24"], 1),
            &u,
            &mut out,
            &mut notices,
        );
        let mut hostgw = lease("hostgw", "192.168.0.14", &["10.244.4.0/24"], 1);
        hostgw.backend = BackendData::HostGw;
        overlay.desired(&hostgw, &u, &mut out, &mut notices);
        let a = lease("a", "192.168.0.15", &["10.244.5.0/24"], 1);
        let mut b = lease("b", "192.168.0.16", &["10.244.6.0/24"], 1);
        b.backend = a.backend.clone();
        overlay.desired(&a, &u, &mut out, &mut notices);
        overlay.desired(&b, &u, &mut out, &mut notices);
        assert_eq!(
            out.routes.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.5.0/24"]
        );
        assert_eq!(
            notices.messages().count(),
            4,
            "{:?}",
            notices.messages().collect::<Vec<_>>()
        );
    }
}
