//! host-gw: a route to every other node's pod CIDR via that node's underlay address.
//!
//! # Why this design (flannel's `host-gw`)
//!
//! When every node sits on one L2 segment, the underlay can carry pod traffic as it is: a node
//! is the gateway to its own pods, so `10.244.2.0/24 via 192.168.0.12 dev eth0` is all another
//! node needs. No encapsulation, no device, no per-packet overhead (pod MTU = underlay MTU), and
//! a packet capture on the wire shows pod addresses.
//!
//! The price is the L2 requirement: the kernel only takes a gateway it can reach directly, and
//! a router between two nodes would drop (or misroute) packets addressed to pod CIDRs it knows
//! nothing about. So a node whose underlay address is off our subnet is *refused*: it gets no
//! route, and one warning per node (not one per reconcile run). Use `vxlan` with
//! `DirectRouting` to mix: direct routes where possible, the overlay elsewhere.
//!
//! A pod CIDR of the other family than the underlay (IPv6 pods on an IPv4 underlay) cannot be
//! routed via an underlay address either, and is refused the same way.

use super::{direct_route, on_our_subnet, Desired, Notices};
use crate::lease::{BackendData, Lease};
use crate::underlay::Underlay;

/// The host-gw backend (it has no state: no device, nothing learned).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostGw;

impl HostGw {
    /// Routes via `remote`'s underlay address for its pod CIDRs, when it is on our subnet.
    pub fn desired(&self, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
        if remote.backend != BackendData::HostGw {
            notices.note(
                &remote.node,
                "backend",
                format!(
                    "node {} publishes a {} lease but this node runs host-gw: no route to its pods",
                    remote.node,
                    backend_name(&remote.backend)
                ),
            );
            return;
        }
        if !on_our_subnet(remote, underlay) {
            notices.note(
                &remote.node,
                "subnet",
                format!(
                    "host-gw: node {} (underlay {}) is not on this node's subnet {}: no route to its pods {:?} \
                     (host-gw needs every node on one L2 segment; use vxlan with DirectRouting to mix)",
                    remote.node,
                    remote.underlay_ip,
                    underlay.prefix,
                    remote.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>()
                ),
            );
            return;
        }
        for cidr in &remote.pod_cidrs {
            if cidr.is_ipv4() == underlay.ip.is_ipv4() {
                out.routes.insert(*cidr, direct_route(*cidr, remote, underlay));
            } else {
                notices.note(
                    &remote.node,
                    "family",
                    format!(
                        "host-gw: node {}'s pod CIDR {cidr} cannot be routed via its underlay address {} \
                         (other address family): no route",
                        remote.node, remote.underlay_ip
                    ),
                );
            }
        }
    }
}

pub(crate) fn backend_name(b: &BackendData) -> &'static str {
    match b {
        BackendData::Vxlan { .. } => "vxlan",
        BackendData::HostGw => "host-gw",
        BackendData::Ipip => "ipip",
        BackendData::Bgp { .. } => "bgp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TRELLISD_PROTO;

    use crate::backend::fixtures::underlay;

    fn lease(node: &str, ip: &str, cidrs: &[&str]) -> Lease {
        crate::backend::fixtures::lease(node, ip, cidrs, BackendData::HostGw)
    }

    #[test]
    fn routes_via_the_underlay_on_our_subnet_only() {
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        let u = underlay();
        HostGw.desired(
            &lease("n2", "192.168.0.12", &["10.244.2.0/24", "fd00:2::/64"]),
            &u,
            &mut out,
            &mut notices,
        );
        HostGw.desired(
            &lease("n3", "10.9.0.13", &["10.244.3.0/24"]),
            &u,
            &mut out,
            &mut notices,
        );
        assert_eq!(out.routes.len(), 1);
        let r = &out.routes[&"10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            (r.gateway, r.oif, r.protocol, r.onlink),
            (
                Some("192.168.0.12".parse().unwrap()),
                Some(2),
                Some(TRELLISD_PROTO),
                false
            )
        );
        assert!(out.neighbours.is_empty() && out.fdb.is_empty());
        let msgs: Vec<_> = notices.messages().collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs
            .iter()
            .any(|m| m.contains("n3") && m.contains("not on this node's subnet")));
        assert!(msgs.iter().any(|m| m.contains("fd00:2::/64")));
    }
}
