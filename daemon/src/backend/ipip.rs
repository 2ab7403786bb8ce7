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
//!   reported as [`DataplaneError::Unsupported`] at start).

use super::{ensure_device_addresses, hostgw::backend_name, vxlan::vtep_address, Desired, Notices, TRELLISD_PROTO};
use crate::config::IPIP_OVERHEAD;
use crate::lease::{BackendData, Lease};
use crate::reconcile::{DataplaneError, Underlay};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr};
use trellis_net::{IpipConfig, IpipInfo, LinkInfo, Netlink, Route};

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

/// The IPIP backend: its device.
pub struct Ipip {
    index: u32,
    mtu: u32,
}

impl Ipip {
    /// Creates the device (or keeps the one that is there when its settings are right).
    pub async fn new(underlay: &Underlay, nl: &Netlink) -> Result<Ipip, DataplaneError> {
        if !underlay.ip.is_ipv4() {
            return Err(DataplaneError::Invalid(format!(
                "IPIP needs an IPv4 underlay; {} has {}",
                underlay.name, underlay.ip
            )));
        }
        let mtu = underlay
            .mtu
            .checked_sub(IPIP_OVERHEAD)
            .filter(|m| *m >= 576)
            .ok_or_else(|| {
                DataplaneError::Invalid(format!(
                    "underlay {} MTU {} leaves no room for IPIP's {IPIP_OVERHEAD} bytes",
                    underlay.name, underlay.mtu
                ))
            })?;
        let mut ipip = Ipip { index: 0, mtu };
        ipip.ensure(nl, underlay, None).await?;
        Ok(ipip)
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn name(&self) -> &'static str {
        DEVICE_NAME
    }

    fn local(underlay: &Underlay) -> Option<Ipv4Addr> {
        match underlay.ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        }
    }

    fn config(&self, underlay: &Underlay) -> IpipConfig<'static> {
        IpipConfig {
            local: Self::local(underlay),
            underlay_index: Some(underlay.index),
            ttl: TTL,
            pmtudisc: true,
            mtu: Some(self.mtu),
            ..IpipConfig::new(DEVICE_NAME)
        }
    }

    /// What differs between the device that is there and the one we want (empty if nothing
    /// that needs a new device; the MTU is fixed in place).
    fn differences(&self, link: &LinkInfo, underlay: &Underlay) -> Vec<String> {
        let want = IpipInfo {
            local: Self::local(underlay),
            remote: None,
            underlay_index: Some(underlay.index),
            ttl: TTL,
            pmtudisc: true,
        };
        match (&link.kind, &link.ipip) {
            (Some(kind), Some(have)) if kind == "ipip" => {
                if *have == want {
                    vec![]
                } else {
                    vec![format!("{have:?}, want {want:?}")]
                }
            }
            (kind, _) => vec![format!("kind {:?}", kind.as_deref().unwrap_or("none"))],
        }
    }

    /// Makes the device be there as configured: created if missing, recreated if its settings
    /// differ, MTU fixed in place; with `own`, this node's tunnel address (and no other) on it
    /// and the device up.
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), DataplaneError> {
        let link = match nl.link_by_name(DEVICE_NAME).await? {
            Some(link) => {
                let diff = self.differences(&link, underlay);
                if diff.is_empty() {
                    if link.mtu != self.mtu {
                        nl.set_link_mtu(link.index, self.mtu).await?;
                    }
                    Some(link)
                } else {
                    tracing::info!(device = DEVICE_NAME, "recreating the IPIP device: {}", diff.join("; "));
                    nl.del_link(link.index).await?;
                    None
                }
            }
            None => None,
        };
        let link = match link {
            Some(link) => link,
            None => {
                let link = nl.create_ipip(&self.config(underlay)).await.map_err(|e| {
                    if e.is_not_supported() {
                        DataplaneError::Unsupported(format!(
                            "this kernel has no IPIP support (load the ipip module: modprobe ipip): {e}"
                        ))
                    } else {
                        e.into()
                    }
                })?;
                tracing::info!(device = DEVICE_NAME, index = link.index, local = %underlay.ip, mtu = self.mtu,
                    "created the IPIP device");
                link
            }
        };
        self.index = link.index;
        if let Some(own) = own {
            let want: Vec<IpNetwork> = own.cidr_v4().iter().map(vtep_address).collect();
            ensure_device_addresses(nl, self.index, &want).await?;
            if !link.up {
                nl.set_link_up(link.index).await?;
            }
        }
        Ok(())
    }

    /// What one remote node's lease calls for (see [`desired`]).
    pub fn desired(&self, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
        desired(self.index, remote, underlay, out, notices)
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

    use crate::backend::fixtures::underlay;

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
        let ipip = Ipip { index: 0, mtu: 1480 };
        let cfg = ipip.config(&underlay());
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
            index: 5,
            name: DEVICE_NAME.into(),
            mac: None,
            mtu: 1480,
            kind: Some("ipip".into()),
            master: None,
            up: true,
            lower_up: true,
            promisc: false,
            link: None,
            link_netnsid: None,
            alias: None,
            vxlan: None,
            ipip: Some(IpipInfo {
                local: Some("192.168.0.11".parse().unwrap()),
                remote: None,
                underlay_index: Some(2),
                ttl: 64,
                pmtudisc: true,
            }),
        };
        assert!(ipip.differences(&link, &underlay()).is_empty());
        link.ipip.as_mut().unwrap().local = Some("192.168.0.99".parse().unwrap());
        assert_eq!(ipip.differences(&link, &underlay()).len(), 1, "the underlay IP changed");
        link.kind = Some("dummy".into());
        link.ipip = None;
        assert_eq!(ipip.differences(&link, &underlay()), ["kind \"dummy\""]);
    }
}
