//! Backends: how this node reaches the other nodes' pods.
//!
//! A backend turns the other nodes' leases into *kernel objects* ([`Desired`]): routes (always),
//! and for VXLAN the neighbour and FDB entries that let the kernel encapsulate without ever
//! resolving anything over the overlay. It never talks to the kernel about those objects itself:
//! the reconciler (`crate::reconcile`) reads what the kernel holds and applies the difference.
//! That keeps each backend a pure function of the leases (unit-tested without a kernel) and puts
//! the idempotence rules in one place.
//!
//! The backends are an enum with a `match` (no trait objects, no registration):
//! - [`vxlan`]: an L3 overlay over one VXLAN device (flannel's `vxlan` backend), optionally with
//!   direct routes to the nodes on the same L2 subnet (`DirectRouting`);
//! - [`hostgw`]: plain routes via the other nodes' underlay addresses (flannel's `host-gw`);
//! - [`ipip`]: IPv4-in-IPv4 through one tunnel device to every node (Calico's IPIP `Always`);
//! - [`bgp`]: the routes come from the BGP speaker's RIB instead of from the leases: plain routes
//!   on the L2 subnet, an IPIP or VXLAN tunnel (or nothing) beyond it (Calico's `CrossSubnet`).
//!
//! Whatever uses a tunnel device (VXLAN, IPIP: as a backend or as BGP's cross-subnet path) keeps
//! it with [`tunnel::Tunnel`], one algorithm for every kind of tunnel.
//!
//! Every route a backend asks for carries [`TRELLISD_PROTO`]: the reconciler lists and removes
//! only routes with that protocol, so it never touches anyone else's and finds its own stale
//! ones after a restart.

pub mod bgp;
pub mod checksum;
pub mod hostgw;
pub mod ipip;
mod notices;
pub mod tunnel;
pub mod vxlan;

pub use notices::Notices;

use crate::config::Backend as BackendConfig;
use crate::error::DataplaneError;
use crate::lease::{BackendData, Lease};
use crate::underlay::Underlay;
use ipip::Ipip;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use trellis_net::{LinkInfo, MacAddr, NetError, Netlink, Route};
use tunnel::{Tunnel, TunnelKind};
use vxlan::Vxlan;

/// The route protocol (`RTPROT_*`, `ip route ... proto 117`) of every route trellisd adds.
///
/// 117 is free in iproute2's `rt_protos` (which names 0-18, 42, 99, 186-192) and in the
/// protocols of the usual routing daemons (BIRD 12, Calico 80, Zebra 11, Babel 42). To see
/// ours: `ip route show proto 117`; `echo "117 trellisd" >> /etc/iproute2/rt_protos.d/trellisd.conf`
/// names it.
pub const TRELLISD_PROTO: u8 = 117;

/// The kernel objects the other nodes' leases call for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Routes by destination (one route per remote pod CIDR), all with [`TRELLISD_PROTO`] in the
    /// main table.
    pub routes: BTreeMap<IpNetwork, Route>,
    /// Permanent neighbours on the backend's device: remote VTEP address -> remote VTEP MAC.
    pub neighbours: BTreeMap<IpAddr, MacAddr>,
    /// FDB entries on the backend's device: remote VTEP MAC -> remote underlay address.
    pub fdb: BTreeSet<(MacAddr, IpAddr)>,
}

/// The route to a remote pod CIDR straight via the remote node's underlay address: host-gw's
/// only kind of route, and VXLAN's with `DirectRouting` for nodes on the same L2 subnet.
pub(crate) fn direct_route(cidr: IpNetwork, remote: &Lease, underlay: &Underlay) -> Route {
    Route::new(cidr)
        .via(remote.underlay_ip)
        .dev(underlay.index)
        .protocol(TRELLISD_PROTO)
}

/// Whether a direct route to `remote` can work: same family as our underlay, and on our L2
/// subnet (a gateway must be directly reachable).
pub(crate) fn on_our_subnet(remote: &Lease, underlay: &Underlay) -> bool {
    underlay.prefix.contains(remote.underlay_ip)
}

/// Whether a link is a backend device of trellisd's making: a VXLAN device `trellis.<VNI>` (or
/// `trellis<VNI>`) or the IPIP device `trellis.ipip`.
pub fn is_backend_device(link: &LinkInfo) -> bool {
    link.name.starts_with("trellis") && matches!(link.kind.as_deref(), Some(Vxlan::LINK_KIND | Ipip::LINK_KIND))
}

/// The configured backend, with its state (its device, the BGP routes).
pub enum Backend {
    Vxlan {
        tunnel: Tunnel<Vxlan>,
        /// Plain routes to the nodes on our L2 subnet.
        direct_routing: bool,
    },
    HostGw(hostgw::HostGw),
    Ipip(Tunnel<Ipip>),
    Bgp(bgp::Bgp),
}

impl Backend {
    /// The BGP backend, in BGP mode.
    pub fn bgp(&self) -> Option<&bgp::Bgp> {
        match self {
            Backend::Bgp(b) => Some(b),
            _ => None,
        }
    }

    /// Sets the backend up in the namespace `nl` talks to (VXLAN, IPIP: creates the device).
    pub async fn new(
        cfg: &BackendConfig,
        node: &str,
        underlay: &Underlay,
        nl: &Netlink,
        ethtool: trellis_net::ethtool::Ethtool,
    ) -> Result<Backend, DataplaneError> {
        Ok(match *cfg {
            BackendConfig::Vxlan {
                vni,
                port,
                direct_routing,
                checksum_offload,
            } => {
                let vxlan = Vxlan::new(vni, port, node, checksum::decide(checksum_offload), ethtool)?;
                Backend::Vxlan {
                    tunnel: Tunnel::new(vxlan, cfg, underlay, nl).await?,
                    direct_routing,
                }
            }
            BackendConfig::HostGw => Backend::HostGw(hostgw::HostGw),
            BackendConfig::Ipip => {
                let ipip = Ipip::new(underlay).map_err(DataplaneError::Invalid)?;
                Backend::Ipip(Tunnel::new(ipip, cfg, underlay, nl).await?)
            }
            BackendConfig::Bgp { .. } => Backend::Bgp(bgp::Bgp::new(cfg, node, underlay, nl, ethtool).await?),
        })
    }

    /// What this node publishes in its lease.
    pub fn backend_data(&self) -> BackendData {
        match self {
            Backend::Vxlan { tunnel, .. } => tunnel.kind().backend_data(),
            Backend::HostGw(_) => BackendData::HostGw,
            Backend::Ipip(_) => BackendData::Ipip,
            Backend::Bgp(b) => b.backend_data(),
        }
    }

    /// The backend's device (its neighbours and FDB entries are ours), if it has one.
    pub fn device_index(&self) -> Option<u32> {
        match self {
            Backend::Vxlan { tunnel, .. } => Some(tunnel.index()),
            Backend::HostGw(_) => None,
            Backend::Ipip(tunnel) => Some(tunnel.index()),
            Backend::Bgp(b) => b.device_index(),
        }
    }

    /// Deletes the backend devices an earlier configuration left and this one does not use
    /// (`trellis.1` after a switch to host-gw or to another VNI, `trellis.ipip` after a switch to
    /// vxlan); the kernel takes their addresses, routes, nexthops, neighbours and FDB entries with
    /// them. Returns their names. A device that cannot be deleted is logged and left: it stops
    /// nothing of this configuration.
    pub async fn remove_other_devices(&self, nl: &Netlink) -> Result<Vec<String>, NetError> {
        let mine = self.device_index();
        let mut removed = Vec::new();
        for link in nl.links().await? {
            if is_backend_device(&link) && Some(link.index) != mine {
                match nl.del_link(link.index).await {
                    Ok(()) => removed.push(link.name),
                    Err(e) => tracing::warn!(device = %link.name, "left by an earlier backend configuration: {e}"),
                }
            }
        }
        Ok(removed)
    }

    /// Makes the backend's device be there as configured (recreated if someone deleted or
    /// changed it), with this node's own addresses and up once `own` is known.
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), DataplaneError> {
        match self {
            Backend::Vxlan { tunnel, .. } => tunnel.ensure(nl, underlay, own).await,
            Backend::HostGw(_) => Ok(()),
            Backend::Ipip(tunnel) => tunnel.ensure(nl, underlay, own).await,
            Backend::Bgp(b) => b.ensure(nl, underlay, own).await,
        }
    }

    /// Adds what the other nodes call for to `out` — from their leases (`remotes`, this node's
    /// excluded), or for BGP from the routes learned — and notes in `notices` what cannot be
    /// done (logged once per node and reason by the reconciler). `false` when the desired state
    /// is not known yet (BGP before the speaker has synced): then nothing may be removed.
    pub fn desired(
        &self,
        remotes: &[Lease],
        learned: Option<&[bgp::BgpRoute]>,
        own: Option<&Lease>,
        underlay: &Underlay,
        out: &mut Desired,
        notices: &mut Notices,
    ) -> bool {
        if let Backend::Bgp(b) = self {
            return b.desired(learned, remotes, own, underlay, out, notices);
        }
        for remote in remotes {
            match self {
                Backend::Vxlan { tunnel, direct_routing } => {
                    tunnel.overlay(*direct_routing).desired(remote, underlay, out, notices)
                }
                Backend::HostGw(h) => h.desired(remote, underlay, out, notices),
                Backend::Ipip(tunnel) => ipip::desired(tunnel.index(), remote, underlay, out, notices),
                Backend::Bgp(_) => unreachable!("the routes of BGP mode come from its RIB"),
            }
        }
        true
    }
}

/// Test fixtures shared by the backends' unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::lease::{BackendData, Lease};
    use crate::underlay::Underlay;
    use trellis_net::LinkInfo;

    /// A node on 192.168.0.0/24 at .11, MTU 1500.
    pub fn underlay() -> Underlay {
        Underlay {
            index: 2,
            name: "eth0".into(),
            ip: "192.168.0.11".parse().unwrap(),
            prefix: "192.168.0.11/24".parse().unwrap(),
            link_prefixes: vec!["fd00:77::11/64".parse().unwrap()],
            mtu: 1500,
        }
    }

    pub fn lease(node: &str, ip: &str, cidrs: &[&str], backend: BackendData) -> Lease {
        Lease {
            node: node.into(),
            underlay_ip: ip.parse().unwrap(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            backend,
        }
    }

    /// A link `name` of `kind` as the kernel reports it, up, without settings of its kind.
    pub fn link(name: &str, kind: &str) -> LinkInfo {
        LinkInfo {
            index: 5,
            name: name.into(),
            mac: None,
            mtu: 1450,
            kind: Some(kind.into()),
            master: None,
            up: true,
            lower_up: true,
            promisc: false,
            link: None,
            link_netnsid: None,
            alias: None,
            vxlan: None,
            ipip: None,
        }
    }
}
