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
//! - [`hostgw`]: plain routes via the other nodes' underlay addresses (flannel's `host-gw`).
//!
//! Every route a backend asks for carries [`TRELLISD_PROTO`]: the reconciler lists and removes
//! only routes with that protocol, so it never touches anyone else's and finds its own stale
//! ones after a restart.

pub mod hostgw;
pub mod kernel_watch;
mod notices;
pub mod vxlan;

pub use notices::Notices;

use crate::config::Backend as BackendConfig;
use crate::lease::{BackendData, Lease};
use crate::reconcile::Underlay;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use trellis_net::{MacAddr, Netlink, Route};

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

/// The configured backend, with its state (the VXLAN device).
pub enum Backend {
    Vxlan(vxlan::Vxlan),
    HostGw(hostgw::HostGw),
}

impl Backend {
    /// Sets the backend up in the namespace `nl` talks to (VXLAN: creates the device).
    pub async fn new(
        cfg: &BackendConfig,
        node: &str,
        underlay: &Underlay,
        nl: &Netlink,
        ethtool: trellis_net::ethtool::Ethtool,
    ) -> Result<Backend, crate::reconcile::DataplaneError> {
        Ok(match cfg {
            BackendConfig::Vxlan { .. } => Backend::Vxlan(vxlan::Vxlan::new(cfg, node, underlay, nl, ethtool).await?),
            BackendConfig::HostGw => Backend::HostGw(hostgw::HostGw),
        })
    }

    /// What this node publishes in its lease.
    pub fn backend_data(&self) -> BackendData {
        match self {
            Backend::Vxlan(v) => v.backend_data(),
            Backend::HostGw(_) => BackendData::HostGw,
        }
    }

    /// The link the backend's neighbours and FDB entries live on, if it has one.
    pub fn device_index(&self) -> Option<u32> {
        match self {
            Backend::Vxlan(v) => Some(v.index()),
            Backend::HostGw(_) => None,
        }
    }

    /// Makes the backend's device be there as configured (recreated if someone deleted or
    /// changed it), with this node's own addresses and up once `own` is known.
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), crate::reconcile::DataplaneError> {
        match self {
            Backend::Vxlan(v) => v.ensure(nl, underlay, own).await,
            Backend::HostGw(_) => Ok(()),
        }
    }

    /// Adds what one remote node's lease calls for to `out`; what cannot be done is noted in
    /// `notices` (logged once per node and reason by the reconciler).
    pub fn desired(&self, remote: &Lease, underlay: &Underlay, out: &mut Desired, notices: &mut Notices) {
        match self {
            Backend::Vxlan(v) => v.desired(remote, underlay, out, notices),
            Backend::HostGw(h) => h.desired(remote, underlay, out, notices),
        }
    }
}
