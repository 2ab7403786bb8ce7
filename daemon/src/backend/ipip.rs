//! IPIP: IPv4 pods over IPv4-in-IPv4 tunnels to every other node (Calico's `ipipMode: Always`).
//!
//! # Why this design
//!
//! IPIP puts the pod's IPv4 packet behind one more IPv4 header (IP protocol 4): 20 bytes per
//! packet against VXLAN's 50, no inner Ethernet header, so no neighbours and no FDB to program.
//! Each node has one tunnel device with no fixed remote, and per remote node one route:
//!
//! ```text
//! route  10.244.2.0/24 via 192.168.0.12 dev trellis.ipip onlink proto 117
//! ```
//!
//! A tunnel without a remote sends each packet to the *gateway of the route* that chose it (the
//! kernel's NBMA mode), so one device reaches every node, and the routes alone say where pods
//! live — rebuilt from the leases at any time, like VXLAN's. `onlink` because the remote's
//! underlay address is on no subnet of the tunnel. The outer packets are routed like any other
//! traffic of the node: IPIP crosses routed underlays (the routers see only node addresses).
//!
//! - **The device is ours, `trellis.ipip`, not the kernel's `tunl0`.** Loading the `ipip` module
//!   creates a fallback device `tunl0` in every namespace; Calico configures that one. We don't:
//!   `tunl0` cannot be created with our settings or deleted (it belongs to the module), so a
//!   changed setting could not be fixed by recreating it; it is shared with anyone else who uses
//!   IPIP on the node (an old Calico, kube-router, a hand-made tunnel), whose addresses and MTU we
//!   would fight over; and a restarted daemon could not tell our configuration from theirs. Our
//!   device has `local` = this node's underlay IP, so the kernel hands it every IPIP packet
//!   addressed to that IP (tunnels are matched by outer addresses before falling back to
//!   `tunl0`), and `dev` = the underlay, so the outer packets leave by the underlay. `tunl0`
//!   stays down and receives nothing of ours.
//! - **The tunnel address** is the node's pod CIDR's network address as a /32 (`10.244.1.0`),
//!   as the VXLAN VTEP address: traffic the node itself sends to remote pods (host-network pods,
//!   an API server calling a webhook) leaves from it, and the replies come back through the
//!   remote's route to our CIDR. It is never a pod's address and needs no allocation.
//! - **MTU** underlay − 20 (the outer header); the pods' MTU likewise. Outer headers carry DF
//!   (`pmtudisc`, so that path MTU discovery works across routers) and a fixed TTL of 64 (an
//!   inherited TTL would let a traceroute's TTL 1 expire in the underlay).
//! - **IPv4 only**: IPIP carries IPv4 (IPv6 in IPv4 is `sit`, protocol 41). The config refuses
//!   IPv6 pod networks with this backend; a remote IPv6 CIDR in a lease is noted, not routed. The
//!   underlay must be IPv4 too.
//! - Reverse-path filtering passes: decapsulated packets arrive on `trellis.ipip` from remote
//!   pods, and the route back to them is via `trellis.ipip`.
//! - Costs to know: the nodes must let IP protocol 4 through their firewalls (some clouds drop
//!   it: Azure does); without UDP ports, NICs that spread receive queues by L4 hash put all the
//!   traffic between two nodes on one queue; the kernel needs the `ipip` module (its absence is
//!   reported as [`crate::error::DataplaneError::Unsupported`] at start).

use super::tunnel::{tunnel_address, TunnelKind};
use super::{hostgw::backend_name, Desired, Notices, TRELLISD_PROTO};
use crate::lease::{BackendData, Lease};
use crate::underlay::Underlay;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr};
use trellis_net::{IpipConfig, IpipInfo, LinkInfo, NetError, Netlink, Route};

/// The tunnel device's name (15 bytes at most).
pub const DEVICE_NAME: &str = "trellis.ipip";

/// The outer header's TTL.
pub const TTL: u8 = 64;

/// The route to a remote pod CIDR through the tunnel at `index`: the gateway is the outer
/// destination.
pub fn tunnel_route(cidr: IpNetwork, remote: Ipv4Addr, index: u32) -> Route {
    Route::new(cidr)
        .via(IpAddr::V4(remote))
        .dev(index)
        .onlink()
        .protocol(TRELLISD_PROTO)
}

/// The IPIP tunnel: what its device has that other tunnels' do not (how a tunnel device is kept:
/// [`super::tunnel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipip {
    /// The underlay's address: the outer source, and what the device receives on.
    local: Ipv4Addr,
}

impl Ipip {
    /// IPIP over `underlay`, whose address must be IPv4 (the outer header is); else why not.
    pub fn new(underlay: &Underlay) -> Result<Ipip, String> {
        match underlay.ip {
            IpAddr::V4(local) => Ok(Ipip { local }),
            IpAddr::V6(ip) => Err(format!("IPIP needs an IPv4 underlay; {} has {ip}", underlay.name)),
        }
    }

    fn config(&self, underlay: &Underlay, mtu: u32) -> IpipConfig<'static> {
        IpipConfig {
            local: Some(self.local),
            underlay_index: Some(underlay.index),
            ttl: TTL,
            pmtudisc: true,
            mtu: Some(mtu),
            ..IpipConfig::new(DEVICE_NAME)
        }
    }

    /// The settings the kernel reports for the device we create.
    pub(crate) fn wanted(&self, underlay: &Underlay) -> IpipInfo {
        IpipInfo {
            local: Some(self.local),
            remote: None,
            underlay_index: Some(underlay.index),
            ttl: TTL,
            pmtudisc: true,
        }
    }
}

impl TunnelKind for Ipip {
    const LINK_KIND: &'static str = "ipip";
    const LABEL: &'static str = "IPIP";

    fn name(&self) -> &str {
        DEVICE_NAME
    }

    async fn create(&self, nl: &Netlink, underlay: &Underlay, mtu: u32) -> Result<LinkInfo, NetError> {
        nl.create_ipip(&self.config(underlay, mtu)).await
    }

    fn differences(&self, link: &LinkInfo, underlay: &Underlay) -> Vec<String> {
        let want = self.wanted(underlay);
        match &link.ipip {
            Some(have) if *have == want => vec![],
            have => vec![format!("{have:?}, want {want:?}")],
        }
    }

    /// The tunnel address of this node's IPv4 pod CIDR: IPIP carries nothing else.
    fn addresses(&self, own: &Lease) -> Vec<IpNetwork> {
        own.cidr_v4().iter().map(tunnel_address).collect()
    }
}

/// A route through the tunnel at `index` to each of `remote`'s IPv4 pod CIDRs, via its underlay
/// address; what cannot be carried is noted.
pub fn desired(index: u32, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
    if remote.backend != BackendData::Ipip {
        let msg = format!(
            "node {} publishes a {} lease but this node runs ipip: no route to its pods",
            remote.node,
            backend_name(&remote.backend)
        );
        return notices.note(&remote.node, "backend", msg);
    }
    let (IpAddr::V4(next_hop), true) = (remote.underlay_ip, underlay.ip.is_ipv4()) else {
        let msg = format!(
            "ipip: node {}'s underlay address {} is not IPv4 (IPIP's outer header is IPv4): no route to its pods",
            remote.node, remote.underlay_ip
        );
        return notices.note(&remote.node, "family", msg);
    };
    for cidr in &remote.pod_cidrs {
        if cidr.is_ipv4() {
            out.routes.insert(*cidr, tunnel_route(*cidr, next_hop, index));
        } else {
            notices.note(
                &remote.node,
                "family",
                format!(
                    "ipip: node {}'s pod CIDR {cidr} is IPv6 and IPIP carries IPv4 only: no route",
                    remote.node
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fixtures::{link, underlay};

    fn lease(node: &str, ip: &str, cidrs: &[&str]) -> Lease {
        crate::backend::fixtures::lease(node, ip, cidrs, BackendData::Ipip)
    }

    #[test]
    fn every_remote_gets_an_onlink_route_through_the_tunnel_on_or_off_our_subnet() {
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let u = underlay();
        desired(
            9,
            &lease("near", "192.168.0.12", &["10.244.2.0/24"]),
            &u,
            &mut out,
            &mut notices,
        );
        desired(
            9,
            &lease("far", "10.1.0.13", &["10.244.3.0/24"]),
            &u,
            &mut out,
            &mut notices,
        );
        assert_eq!(notices.messages().count(), 0);
        let near = &out.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (near.gateway, near.oif, near.onlink, near.protocol),
            (
                Some("192.168.0.12".parse().unwrap()),
                Some(9),
                true,
                Some(TRELLISD_PROTO)
            )
        );
        let far = &out.routes[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!((far.gateway, far.oif), (Some("10.1.0.13".parse().unwrap()), Some(9)));
        assert!(out.neighbours.is_empty() && out.fdb.is_empty(), "no L2 to program");
    }

    #[test]
    fn what_ipip_cannot_carry_is_noted_not_routed() {
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let u = underlay();
        desired(
            9,
            &lease("dual", "192.168.0.12", &["10.244.2.0/24", "fd00:244:2::/64"]),
            &u,
            &mut out,
            &mut notices,
        );
        desired(
            9,
            &lease("v6", "fd00::13", &["10.244.3.0/24"]),
            &u,
            &mut out,
            &mut notices,
        );
        let mut vx = lease("vx", "192.168.0.14", &["10.244.4.0/24"]);
        vx.backend = BackendData::HostGw;
        desired(9, &vx, &u, &mut out, &mut notices);
        assert_eq!(
            out.routes.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.2.0/24"],
            "the IPv4 CIDR of the dual-stack node only"
        );
        let msgs: Vec<_> = notices.messages().collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(msgs
            .iter()
            .any(|m| m.contains("fd00:244:2::/64") && m.contains("IPv4 only")));
        assert!(msgs.iter().any(|m| m.contains("fd00::13")));
        assert!(msgs.iter().any(|m| m.contains("host-gw lease")));
    }

    #[test]
    fn the_device_we_want() {
        let u = underlay();
        let ipip = Ipip::new(&u).unwrap();
        let cfg = ipip.config(&u, 1480);
        assert_eq!(
            (cfg.name, cfg.local, cfg.underlay_index, cfg.ttl, cfg.pmtudisc, cfg.mtu),
            (
                DEVICE_NAME,
                Some("192.168.0.11".parse().unwrap()),
                Some(2),
                64,
                true,
                Some(1480)
            )
        );
        assert!(DEVICE_NAME.len() <= 15);
        let mut link = LinkInfo {
            ipip: Some(IpipInfo {
                local: Some("192.168.0.11".parse().unwrap()),
                remote: None,
                underlay_index: Some(2),
                ttl: 64,
                pmtudisc: true,
            }),
            ..link(DEVICE_NAME, "ipip")
        };
        assert!(ipip.differences(&link, &u).is_empty());
        link.ipip.as_mut().unwrap().local = Some("192.168.0.99".parse().unwrap());
        assert_eq!(ipip.differences(&link, &u).len(), 1, "the underlay IP changed");
        link.ipip = None;
        assert_eq!(ipip.differences(&link, &u).len(), 1, "nothing reported");
    }

    #[test]
    fn ipip_needs_an_ipv4_underlay_and_carries_this_nodes_ipv4_cidr_only() {
        let v6 = Underlay {
            ip: "fd00::11".parse().unwrap(),
            ..underlay()
        };
        assert_eq!(
            Ipip::new(&v6).unwrap_err(),
            "IPIP needs an IPv4 underlay; eth0 has fd00::11"
        );
        let own = lease("me", "192.168.0.11", &["10.244.1.0/24", "fd00:244:1::/64"]);
        let addresses = Ipip::new(&underlay()).unwrap().addresses(&own);
        assert_eq!(addresses, ["10.244.1.0/32".parse::<IpNetwork>().unwrap()]);
    }
}
