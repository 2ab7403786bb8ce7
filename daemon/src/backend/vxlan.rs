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
//!   CIDR's first address as a /128): it needs no allocation and no extra lease field, and it is
//!   never a pod's address. Traffic the node itself sends to pods elsewhere leaves from it.
//! - The *VTEP MAC* is derived from the node name ([`vtep_mac`]), so the lease can be published
//!   before the device exists and a recreated device keeps its MAC: peers need no update.
//! - One device carries both inner families: IPv6 pods over an IPv4 underlay need nothing more
//!   than the IPv6 route and neighbour.
//! - `DirectRouting`: a node on our L2 subnet gets a plain route via its underlay address instead
//!   (see `hostgw`): no encapsulation where none is needed, the overlay everywhere else.
//!
//! # TX checksum offload
//!
//! On kernels without "netfilter: nat: never update the UDP checksum when it's 0" (mainline
//! 5.7-rc5, commit ea64d8d6c675; stable 5.4.41, 4.19.123, 4.14.181), a VXLAN packet whose outer
//! UDP header gets NATed (kube-proxy's `MASQUERADE --random-fully` on traffic to a service)
//! leaves with a corrupted outer checksum when the device offloads the inner checksum: the
//! receiver drops it ("UDP: bad checksum"), and TCP connections stall for 63 seconds (SYN
//! retries) — flannel#1279, calico#3145. The workaround is to turn TX checksum offload off on the
//! VXLAN device (`ethtool -K flannel.1 tx-checksum-ip-generic off`), at a CPU cost. With
//! `ChecksumOffload: auto` we turn it off only on kernels that predate the fix
//! ([`tx_checksum_offload`]), as Calico's felix did ("ChecksumOffloadBroken" below v5.7); `on`
//! and `off` force it.

use super::{
    direct_route, ensure_device_addresses, hostgw::backend_name, on_our_subnet, Desired, Notices, TRELLISD_PROTO,
};
use crate::config::{Backend as BackendConfig, ChecksumOffload};
use crate::lease::{BackendData, Lease, MacString};
use crate::reconcile::{DataplaneError, Underlay};
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use trellis_net::ethtool::Ethtool;
use trellis_net::{LinkInfo, MacAddr, Netlink, Route, VxlanConfig, VxlanInfo};

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

/// A node's VTEP address for one of its pod CIDRs: the CIDR's network address, as a host prefix.
pub fn vtep_address(cidr: &IpNetwork) -> IpNetwork {
    let bits = if cidr.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(cidr.network(), bits).expect("a host prefix is valid")
}

/// A kernel release's version numbers (`6.1.0-18-amd64` -> 6.1.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl KernelVersion {
    /// Parses the leading `MAJOR.MINOR[.PATCH]` of a release string (`uname -r`).
    pub fn parse(release: &str) -> Option<KernelVersion> {
        let head: String = release
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = head.split('.').filter(|p| !p.is_empty()).map(str::parse::<u32>);
        let major = parts.next()?.ok()?;
        let minor = parts.next()?.ok()?;
        let patch = parts.next().and_then(Result::ok).unwrap_or(0);
        Some(KernelVersion(major, minor, patch))
    }

    /// Whether this kernel carries "netfilter: nat: never update the UDP checksum when it's 0":
    /// mainline from 5.7 (merged for 5.7-rc5), and the stable backports 5.4.41, 4.19.123 and
    /// 4.14.181. Other branches (5.6, 4.9 and older) are counted as unfixed, as are distribution
    /// kernels that number their backports differently (Ubuntu 5.4.0-N, RHEL 4.18.0-N): the safe
    /// side, which only costs some CPU.
    pub fn has_udp_checksum_fix(self) -> bool {
        let KernelVersion(major, minor, patch) = self;
        match (major, minor) {
            (m, _) if m > 5 => true,
            (5, n) if n >= 7 => true,
            (5, 4) => patch >= 41,
            (4, 19) => patch >= 123,
            (4, 14) => patch >= 181,
            _ => false,
        }
    }
}

/// Whether TX checksum offload should be on for the VXLAN device, and why (for the log).
/// `release` is the running kernel's (`uname -r`), `None` when it could not be read.
pub fn tx_checksum_offload(setting: ChecksumOffload, release: Option<&str>) -> (bool, String) {
    match setting {
        ChecksumOffload::On => (true, "ChecksumOffload is \"on\" in net-conf.json".into()),
        ChecksumOffload::Off => (false, "ChecksumOffload is \"off\" in net-conf.json".into()),
        ChecksumOffload::Auto => match release.map(|r| (r, KernelVersion::parse(r))) {
            Some((r, Some(v))) if v.has_udp_checksum_fix() => (
                true,
                format!(
                    "kernel {r} carries the VXLAN/NAT UDP checksum fix (mainline 5.7; stable 5.4.41, \
                     4.19.123, 4.14.181)"
                ),
            ),
            Some((r, Some(_))) => (
                false,
                format!(
                    "kernel {r} predates the VXLAN/NAT UDP checksum fix (mainline 5.7; stable 5.4.41, \
                     4.19.123, 4.14.181): NATed VXLAN packets would leave with bad checksums \
                     (flannel#1279); set ChecksumOffload \"on\" if your distribution backported it"
                ),
            ),
            Some((r, None)) => (false, format!("kernel release {r:?} not understood: off to be safe")),
            None => (false, "kernel release unknown: off to be safe".into()),
        },
    }
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// What the per-lease objects depend on: the VNI, DirectRouting and the device's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub vni: u32,
    pub direct_routing: bool,
    /// The device's index (it changes when the device is recreated).
    pub index: u32,
}

/// The VXLAN backend: its device and settings.
pub struct Vxlan {
    name: String,
    overlay: Overlay,
    port: u16,
    mac: MacAddr,
    mtu: u32,
    ethtool: Ethtool,
    tx_checksum: bool,
}

impl Vxlan {
    /// Creates the device (or keeps the one that is there when its settings are right) and
    /// decides TX checksum offload.
    pub async fn new(
        cfg: &BackendConfig,
        node: &str,
        underlay: &Underlay,
        nl: &Netlink,
        ethtool: Ethtool,
    ) -> Result<Vxlan, DataplaneError> {
        let BackendConfig::Vxlan {
            vni,
            port,
            direct_routing,
            checksum_offload,
        } = *cfg
        else {
            unreachable!("Vxlan::new is only called for the vxlan backend")
        };
        if vni == 0 || vni >= 1 << 24 {
            return Err(DataplaneError::Invalid(format!("VNI {vni} is not in 1..16777215")));
        }
        let overhead = cfg.overhead(underlay.ip.is_ipv6());
        let mtu = underlay
            .mtu
            .checked_sub(overhead)
            .filter(|m| *m >= 576)
            .ok_or_else(|| {
                DataplaneError::Invalid(format!(
                    "underlay {} MTU {} leaves no room for VXLAN's {overhead} bytes",
                    underlay.name, underlay.mtu
                ))
            })?;
        let release = kernel_release();
        let (tx_checksum, reason) = tx_checksum_offload(checksum_offload, release.as_deref());
        tracing::info!(
            kernel = release.as_deref().unwrap_or("unknown"),
            tx_checksum_offload = if tx_checksum { "on" } else { "off" },
            "VXLAN TX checksum offload: {reason}"
        );
        let mut vx = Vxlan {
            name: device_name(vni),
            overlay: Overlay {
                vni,
                direct_routing,
                index: 0,
            },
            port,
            mac: vtep_mac(node),
            mtu,
            ethtool,
            tx_checksum,
        };
        vx.ensure(nl, underlay, None).await?;
        Ok(vx)
    }

    pub fn backend_data(&self) -> BackendData {
        BackendData::Vxlan {
            vtep_mac: MacString(self.mac),
            vni: self.overlay.vni,
        }
    }

    pub fn index(&self) -> u32 {
        self.overlay.index
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn config<'a>(&'a self, underlay: &Underlay) -> VxlanConfig<'a> {
        VxlanConfig {
            local: Some(underlay.ip),
            port: self.port,
            underlay_index: Some(underlay.index),
            learning: false,
            mtu: Some(self.mtu),
            mac: Some(self.mac),
            ..VxlanConfig::new(&self.name, self.overlay.vni)
        }
    }

    /// What differs between the device that is there and the one we want (empty if nothing
    /// that needs a new device; the MTU is fixed in place).
    fn differences(&self, link: &LinkInfo, underlay: &Underlay) -> Vec<String> {
        let want = VxlanInfo {
            vni: self.overlay.vni,
            port: self.port,
            local: Some(underlay.ip),
            underlay_index: Some(underlay.index),
            learning: false,
        };
        let mut diff = Vec::new();
        match &link.vxlan {
            None => diff.push(format!("kind {:?}", link.kind.as_deref().unwrap_or("none"))),
            Some(have) if *have != want => diff.push(format!("{have:?}, want {want:?}")),
            Some(_) => {}
        }
        if link.mac != Some(self.mac) {
            diff.push(format!("mac {:?}, want {}", link.mac, self.mac));
        }
        diff
    }

    /// Makes the device be there as configured: created if missing, recreated if its settings
    /// differ, MTU and TX checksum offload fixed in place; with `own`, this node's VTEP
    /// addresses (and no others) on it and the device up.
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), DataplaneError> {
        let link = match nl.link_by_name(&self.name).await? {
            Some(link) => {
                let diff = self.differences(&link, underlay);
                if diff.is_empty() {
                    if link.mtu != self.mtu {
                        nl.set_link_mtu(link.index, self.mtu).await?;
                    }
                    Some(link)
                } else {
                    tracing::info!(device = %self.name, "recreating the VXLAN device: {}", diff.join("; "));
                    nl.del_link(link.index).await?;
                    None
                }
            }
            None => None,
        };
        let link = match link {
            Some(link) => link,
            None => {
                let link = nl.create_vxlan(&self.config(underlay)).await?;
                tracing::info!(device = %self.name, index = link.index, vni = self.overlay.vni, port = self.port,
                    mtu = self.mtu, mac = %self.mac, "created the VXLAN device");
                link
            }
        };
        self.overlay.index = link.index;
        if self.ethtool.tx_checksum(&self.name)? != self.tx_checksum {
            self.ethtool.set_tx_checksum(&self.name, self.tx_checksum)?;
        }
        if let Some(own) = own {
            let want: Vec<IpNetwork> = own.pod_cidrs.iter().map(vtep_address).collect();
            ensure_device_addresses(nl, self.overlay.index, &want).await?;
            if !link.up {
                nl.set_link_up(link.index).await?;
            }
        }
        Ok(())
    }

    /// What one remote node's lease calls for (see [`Overlay::desired`]).
    pub fn desired(&self, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
        self.overlay.desired(remote, underlay, out, notices)
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
        assert_eq!(
            vtep_address(&"10.244.3.0/24".parse().unwrap()).to_string(),
            "10.244.3.0/32"
        );
        assert_eq!(
            vtep_address(&"fd00:244:3::/64".parse().unwrap()).to_string(),
            "fd00:244:3::/128"
        );
    }

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        for (release, want) in [
            ("6.18.44-fc-v595", Some(KernelVersion(6, 18, 44))),
            ("5.4.0-42-generic", Some(KernelVersion(5, 4, 0))),
            ("4.18.0-348.el8.x86_64", Some(KernelVersion(4, 18, 0))),
            ("3.10", Some(KernelVersion(3, 10, 0))),
            ("6.9-rc1", Some(KernelVersion(6, 9, 0))),
            ("garbage", None),
            ("6", None),
        ] {
            assert_eq!(KernelVersion::parse(release), want, "{release}");
        }
    }

    #[test]
    fn offload_goes_off_only_on_kernels_without_the_fix() {
        let auto = |r: &str| tx_checksum_offload(ChecksumOffload::Auto, Some(r)).0;
        for fixed in [
            "5.7.0",
            "5.10.0-28-amd64",
            "6.1.0-18-amd64",
            "6.18.44-fc-v595",
            "5.4.41",
            "4.19.123",
            "4.14.181",
        ] {
            assert!(auto(fixed), "{fixed} has the fix");
        }
        for broken in [
            "5.6.19",
            "5.4.40",
            "5.4.0-107-generic",
            "4.19.122",
            "4.14.180",
            "4.18.0-348.el8",
            "4.9.337",
            "3.10.0-1160.el7",
        ] {
            assert!(!auto(broken), "{broken} predates the fix");
        }
        assert!(!tx_checksum_offload(ChecksumOffload::Auto, None).0);
        assert!(!tx_checksum_offload(ChecksumOffload::Auto, Some("weird")).0);
        assert!(tx_checksum_offload(ChecksumOffload::On, Some("3.10.0")).0);
        assert!(!tx_checksum_offload(ChecksumOffload::Off, Some("6.18.0")).0);
        let (_, why) = tx_checksum_offload(ChecksumOffload::Auto, Some("5.4.0-42-generic"));
        assert!(
            why.contains("5.4.0-42-generic") && why.contains("flannel#1279"),
            "{why}"
        );
    }

    use crate::backend::fixtures::underlay;

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
