//! BGP mode, the kernel side: install the routes the BGP speaker learned (Calico's BGP mode,
//! where BIRD learns and felix programs; here `crate::bgp` learns and this module programs).
//!
//! # Why this design
//!
//! Every node announces its pod CIDR(s) over BGP with its underlay address as next hop. The
//! routes to the other nodes' pods come from what the speaker *learned* ([`BgpRoute`], a route
//! source beside the leases: `reconcile::Sources::learned`), not from the leases: what the network says is what is
//! installed, so routes through route reflectors or top-of-rack routers, and pod CIDRs of nodes
//! outside this datastore, work the same way. The leases still allocate the CIDRs, name the
//! mesh peers and their AS numbers ([`peers`]), say which nodes are route reflectors (without
//! the mesh, the others peer with those: see [`peers`]) and carry the VTEP MACs for VXLAN
//! cross-subnet.
//!
//! The speaker never writes routes itself (BIRD's `kernel` protocol would): the reconciler stays
//! the one owner of protocol-117 routes, with its diffing, its kernel watch (a deleted route is
//! back within a second) and its metrics.
//!
//! How a learned route `prefix via next_hop` is installed:
//! - next hop on this node's L2 subnet: a plain route, as host-gw
//!   (`10.244.2.0/24 via 192.168.0.12 dev eth0 proto 117`); the subnets are those of all the
//!   underlay link's addresses ([`Underlay::on_link`]), so on an IPv4 underlay whose link has
//!   IPv6 addresses too, IPv6 routes via next hops on the link's IPv6 prefix are plain routes;
//! - next hop beyond it: the kernel only takes a directly reachable gateway, so per
//!   `CrossSubnet` (Calico's `CrossSubnet` modes):
//!   - `ipip` (default): through the IPIP device, onlink (see [`super::ipip`]);
//!   - `vxlan`: through a VXLAN device `trellis.1` (VNI [`CROSS_SUBNET_VNI`], port
//!     [`CROSS_SUBNET_PORT`]) via the remote's VTEP address, with a permanent neighbour and an FDB
//!     entry, as the vxlan backend — for next hops that are the underlay address of a node whose
//!     lease publishes a VTEP MAC; other next hops are noted, not routed;
//!   - `none`: not installed, and noted once (the underlay routers must route pod CIDRs then,
//!     and announce themselves as next hop).
//! - not installed either, each noted once: an IPv6 prefix via an IPv4 next hop (or the
//!   reverse), IPv6 through IPIP. A prefix overlapping this node's own pod CIDRs is skipped
//!   silently: whatever its source, the node's own pods are never routed away.
//!
//! What a peer may announce at all (only inside the cluster CIDRs, no default route, no next
//! hop of ours) is the speaker's import policy (`crate::bgp::policy`), applied once, as the
//! UPDATE arrives; what reaches this module has passed it. Only what the kernel can install is
//! decided here.
//!
//! IPv6 pods need IPv6 next hops: an IPv6 underlay, or IPv6 addresses on the IPv4 underlay's
//! link (dual stack); without either they are not routed across nodes (as with host-gw).
//!
//! # Start-up and graceful restart
//!
//! Until the speaker has synced (no learned routes yet), a reconcile leaves every route untouched: the routes a
//! previous run installed keep the pods talking while this run's sessions come up, instead of
//! being removed as "stale" and added back seconds later. Likewise the routes of a peer that is
//! restarting gracefully (RFC 4724) are still in the speaker's RIB, flagged stale: main passes
//! them on with the others, and they stay installed until the speaker drops them (a route in use
//! stays on the restarting peer's path even where another peer offers one: `crate::bgp::rib`).
//!
//! A kernel without the `ipip` module cannot have the cross-subnet tunnel: that is logged once
//! at start, routes on the subnet work as usual, and off-subnet ones are noted.

use super::ipip::{self, Ipip};
use super::tunnel::Tunnel;
use super::vxlan::Vxlan;
use super::{checksum, Desired, Notices, TRELLISD_PROTO};
use crate::config::{Backend as BackendConfig, ChecksumOffload, CrossSubnet};
use crate::error::DataplaneError;
use crate::lease::{BackendData, Lease, MacString};
use crate::underlay::Underlay;
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::IpAddr;
use trellis_net::{Netlink, Route};

/// The VNI of the cross-subnet VXLAN device (the vxlan backend's default: device `trellis.1`).
pub const CROSS_SUBNET_VNI: u32 = 1;
/// Its UDP port (flannel's and the vxlan backend's default).
pub const CROSS_SUBNET_PORT: u16 = 8472;

/// A route the BGP speaker learned: `prefix` via `next_hop` (a node's underlay address, or a
/// router's). Stale routes of a gracefully restarting peer are passed like the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BgpRoute {
    pub prefix: IpNetwork,
    pub next_hop: IpAddr,
}

/// A BGP neighbour this node should have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub addr: IpAddr,
    pub asn: u32,
    /// A route-reflector client of this node (this node is a reflector, the peer is not).
    pub rr_client: bool,
}

/// The peers of this node (`me`, at `own_ip`, a route reflector when `own_cluster_id`):
/// - with `Mesh`: every other node whose lease is a BGP one (in its AS), a full mesh; the
///   route-reflector nodes are plain members (no clients);
/// - without `Mesh`, when some leases are route-reflector nodes (`--bgp-route-reflector-cluster-id`,
///   [`BackendData::Bgp`]'s `rr_cluster_id`): a node that is none peers with every reflector
///   node; a reflector node peers with every other BGP node: the non-reflectors are its clients,
///   the other reflectors non-clients (as Calico's reflectors peer among themselves; with one
///   cluster ID, CLUSTER_LIST stops a route going round them);
/// - the configured `RouteReflectors` (in our AS) and `Peers`, never clients.
///
/// One per address (a configured peer wins over a node), never ourselves, sorted by address.
/// Empty when the backend is not BGP.
pub fn peers(
    cfg: &BackendConfig,
    me: &str,
    own_ip: IpAddr,
    own_cluster_id: Option<std::net::Ipv4Addr>,
    leases: &BTreeMap<String, Lease>,
) -> Vec<Peer> {
    let BackendConfig::Bgp {
        as_number,
        mesh,
        peers,
        route_reflectors,
        ..
    } = cfg
    else {
        return vec![];
    };
    let mut out: BTreeMap<IpAddr, (u32, bool)> = BTreeMap::new();
    let nodes = leases
        .values()
        .filter(|l| l.node != me)
        .filter_map(|l| match l.backend {
            BackendData::Bgp { asn, rr_cluster_id, .. } => Some((l.underlay_ip, asn, rr_cluster_id.is_some())),
            _ => None,
        });
    for (addr, asn, reflector) in nodes {
        if *mesh {
            out.insert(addr, (asn, false));
        } else if own_cluster_id.is_some() {
            out.insert(addr, (asn, !reflector));
        } else if reflector {
            out.insert(addr, (asn, false));
        }
    }
    for rr in route_reflectors {
        out.insert(*rr, (*as_number, false));
    }
    for p in peers {
        out.insert(p.ip, (p.as_number, false));
    }
    out.remove(&own_ip);
    out.into_iter()
        .map(|(addr, (asn, rr_client))| Peer { addr, asn, rr_client })
        .collect()
}

/// The configured peers' own password files (`PasswordFile`), by address.
pub fn password_files(cfg: &BackendConfig) -> BTreeMap<IpAddr, std::path::PathBuf> {
    match cfg {
        BackendConfig::Bgp { peers, .. } => peers
            .iter()
            .filter_map(|p| Some((p.ip, p.password_file.clone()?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// What this node announces (`Speaker::set_exports`): each pod CIDR with the node's underlay
/// address of its family as next hop (MP-BGP carries IPv6 prefixes over IPv4 sessions and IPv4
/// prefixes over IPv6 ones, each with a next hop of its own family).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exports {
    pub prefixes: Vec<IpNetwork>,
    /// The underlay address if IPv4, else the underlay link's first global IPv4 address.
    pub next_hop_v4: Option<IpAddr>,
    /// The underlay address if IPv6, else the underlay link's first global IPv6 address (a
    /// dual-stack underlay).
    pub next_hop_v6: Option<IpAddr>,
    /// Pod CIDRs left out, and why: no underlay address of their family to be reached by (no
    /// RFC 8950 extended next hop).
    pub unannounced: Vec<(IpNetwork, String)>,
}

/// See [`Exports`].
pub fn exports(own: &Lease, underlay: &Underlay) -> Exports {
    let of_family = |v4: bool| {
        std::iter::once(underlay.ip)
            .chain(underlay.link_prefixes.iter().map(|p| p.ip()))
            .find(|ip| ip.is_ipv4() == v4)
    };
    let (next_hop_v4, next_hop_v6) = (of_family(true), of_family(false));
    let mut out = Exports {
        prefixes: Vec::new(),
        next_hop_v4,
        next_hop_v6,
        unannounced: Vec::new(),
    };
    for c in &own.pod_cidrs {
        let c = IpNetwork::new(c.network(), c.prefix()).expect("same prefix length");
        let has_next_hop = if c.is_ipv4() { next_hop_v4 } else { next_hop_v6 }.is_some();
        if has_next_hop {
            out.prefixes.push(c);
        } else {
            let family = if c.is_ipv4() { "IPv4" } else { "IPv6" };
            out.unannounced.push((
                c,
                format!(
                    "the underlay link {} has no global {family} address to be its next hop (give it one for dual-stack \
                     BGP)",
                    underlay.name
                ),
            ));
        }
    }
    out
}

/// How routes to next hops off the L2 subnet go: through the cross-subnet tunnel, or not.
#[derive(Debug)]
pub enum CrossPath {
    /// Through this IPIP device.
    Ipip(Tunnel<Ipip>),
    /// Through this VXLAN device.
    Vxlan(Tunnel<Vxlan>),
    /// The configured tunnel cannot be had: why.
    Unavailable(String),
    /// `CrossSubnet: none`.
    Refused,
}

/// The BGP backend: the cross-subnet tunnel; the routes are the learned ones handed to
/// [`Bgp::desired`].
pub struct Bgp {
    asn: u32,
    cross: CrossPath,
}

impl Bgp {
    /// Sets up the cross-subnet tunnel; a kernel without IPIP support leaves it unavailable (logged
    /// once) rather than failing: routes on the subnet need no tunnel.
    pub async fn new(
        cfg: &BackendConfig,
        node: &str,
        underlay: &Underlay,
        nl: &Netlink,
        ethtool: trellis_net::ethtool::Ethtool,
    ) -> Result<Bgp, DataplaneError> {
        let BackendConfig::Bgp {
            as_number,
            cross_subnet,
            ..
        } = *cfg
        else {
            unreachable!("Bgp::new is only called for the bgp backend")
        };
        // `cfg`'s overhead, which makes the tunnel's MTU, is the cross-subnet tunnel's.
        let cross = match cross_subnet {
            CrossSubnet::None => CrossPath::Refused,
            CrossSubnet::Ipip => match Ipip::new(underlay) {
                Err(why) => CrossPath::Unavailable(why),
                Ok(ipip) => match Tunnel::new(ipip, cfg, underlay, nl).await {
                    Ok(tunnel) => CrossPath::Ipip(tunnel),
                    Err(DataplaneError::Unsupported(why)) => CrossPath::Unavailable(why),
                    Err(e) => return Err(e),
                },
            },
            CrossSubnet::Vxlan => {
                let tx_checksum = checksum::decide(ChecksumOffload::Auto);
                let vxlan = Vxlan::new(CROSS_SUBNET_VNI, CROSS_SUBNET_PORT, node, tx_checksum, ethtool)?;
                CrossPath::Vxlan(Tunnel::new(vxlan, cfg, underlay, nl).await?)
            }
        };
        if let CrossPath::Unavailable(why) = &cross {
            tracing::warn!(
                "bgp: no cross-subnet IPIP tunnel ({why}): routes to nodes off {} will not be installed",
                underlay.prefix
            );
        }
        Ok(Bgp { asn: as_number, cross })
    }

    /// The ASN and, with a VXLAN cross-subnet tunnel, its VTEP MAC.
    pub fn backend_data(&self) -> BackendData {
        let vtep_mac = match &self.cross {
            CrossPath::Vxlan(tunnel) => Some(MacString(tunnel.kind().mac())),
            _ => None,
        };
        BackendData::Bgp {
            asn: self.asn,
            vtep_mac,
            rr_cluster_id: None,
        }
    }

    /// The cross-subnet tunnel's device, if there is one.
    pub fn device_index(&self) -> Option<u32> {
        match &self.cross {
            CrossPath::Ipip(tunnel) => Some(tunnel.index()),
            CrossPath::Vxlan(tunnel) => Some(tunnel.index()),
            CrossPath::Unavailable(_) | CrossPath::Refused => None,
        }
    }

    /// Makes the tunnel device be there as configured (see [`Tunnel::ensure`]).
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), DataplaneError> {
        match &mut self.cross {
            CrossPath::Ipip(tunnel) => tunnel.ensure(nl, underlay, own).await,
            CrossPath::Vxlan(tunnel) => tunnel.ensure(nl, underlay, own).await,
            CrossPath::Unavailable(_) | CrossPath::Refused => Ok(()),
        }
    }

    /// Whether a learned route's kernel objects depend on that route alone (and on this node's
    /// lease and underlay), so that a change of a few learned routes can be applied without
    /// working out the others again (the reconciler's incremental runs). Not with VXLAN
    /// cross-subnet: its neighbours and FDB entries are per next hop, shared by routes, and come
    /// from the other nodes' leases.
    pub fn per_route(&self) -> bool {
        !matches!(self.cross, CrossPath::Vxlan(_))
    }

    /// What installing the one learned route `prefix via next_hop` takes, as [`Bgp::desired`]
    /// would add it; only where [`Bgp::per_route`].
    pub fn desired_one(
        &self,
        prefix: IpNetwork,
        next_hop: IpAddr,
        own: Option<&Lease>,
        underlay: &Underlay,
        out: &mut Desired,
        notices: &mut Notices,
    ) {
        let ctx = Context {
            cross: &self.cross,
            underlay,
            own,
            remotes: &[],
        };
        ctx.route(prefix, next_hop, out, notices);
    }

    /// Adds what installing `learned` takes (two routes to one prefix: the last one wins);
    /// `false` (nothing computed) while there are none yet: the speaker has not synced.
    pub fn desired(
        &self,
        learned: Option<&[BgpRoute]>,
        remotes: &[Lease],
        own: Option<&Lease>,
        underlay: &Underlay,
        out: &mut Desired,
        notices: &mut Notices,
    ) -> bool {
        let Some(learned) = learned else {
            tracing::debug!("bgp: the speaker has not synced yet: leaving the installed routes in place");
            return false;
        };
        let ctx = Context {
            cross: &self.cross,
            underlay,
            own,
            remotes,
        };
        let rib: BTreeMap<IpNetwork, IpAddr> = learned
            .iter()
            .map(|r| {
                let prefix = IpNetwork::new(r.prefix.network(), r.prefix.prefix()).expect("same prefix length");
                (prefix, r.next_hop)
            })
            .collect();
        for (prefix, next_hop) in rib {
            ctx.route(prefix, next_hop, out, notices);
        }
        true
    }
}

/// What installing a learned route depends on.
pub struct Context<'a> {
    pub cross: &'a CrossPath,
    pub underlay: &'a Underlay,
    /// This node's lease (its prefixes are never installed as remote ones).
    pub own: Option<&'a Lease>,
    /// The other nodes' leases (for VXLAN cross-subnet: their VTEP MACs).
    pub remotes: &'a [Lease],
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

impl Context<'_> {
    /// Adds to `out` what installing `prefix via next_hop` takes, or notes why it is not
    /// installed (keyed by prefix: logged once per prefix and reason).
    pub fn route(&self, prefix: IpNetwork, next_hop: IpAddr, out: &mut Desired, notices: &mut Notices) {
        // Formatted only for a notice: most routes have none.
        let key = || prefix.to_string();
        let underlay = self.underlay;
        if self
            .own
            .is_some_and(|o| o.pod_cidrs.iter().any(|c| overlaps(c, &prefix)))
        {
            return;
        }
        if prefix.is_ipv4() != next_hop.is_ipv4() {
            let msg = format!(
                "bgp: learned route {prefix} via {next_hop}: the next hop is of the other family: not installed"
            );
            return notices.note(&key(), "family", msg);
        }
        if underlay.on_link(next_hop) {
            let route = Route::new(prefix)
                .via(next_hop)
                .dev(underlay.index)
                .protocol(TRELLISD_PROTO);
            out.routes.insert(prefix, route);
            return;
        }
        let off = format!(
            "bgp: learned route {prefix} via {next_hop}: the next hop is off this node's subnet {}",
            underlay.prefix
        );
        match self.cross {
            CrossPath::Refused => notices.note(
                &key(),
                "subnet",
                format!("{off} and CrossSubnet is \"none\": not installed (the underlay routers must route pod CIDRs)"),
            ),
            CrossPath::Unavailable(why) => notices.note(
                &key(),
                "subnet",
                format!("{off} and the cross-subnet tunnel is unavailable ({why}): not installed"),
            ),
            CrossPath::Ipip(tunnel) => match (prefix, next_hop) {
                (IpNetwork::V4(_), IpAddr::V4(nh)) if underlay.ip.is_ipv4() => {
                    out.routes
                        .insert(prefix, ipip::tunnel_route(prefix, nh, tunnel.index()));
                }
                _ => notices.note(
                    &key(),
                    "subnet",
                    format!("{off} and IPIP carries IPv4 over IPv4 only: not installed"),
                ),
            },
            CrossPath::Vxlan(tunnel) => self.vxlan_route(prefix, next_hop, tunnel.index(), &off, out, notices),
        }
    }

    /// Through the VXLAN device, via the VTEP of the node whose underlay address is `next_hop`.
    fn vxlan_route(
        &self,
        prefix: IpNetwork,
        next_hop: IpAddr,
        index: u32,
        off: &str,
        out: &mut Desired,
        notices: &mut Notices,
    ) {
        let key = prefix.to_string();
        if next_hop.is_ipv4() != self.underlay.ip.is_ipv4() {
            let msg = format!("{off} and is not of the underlay's family: not installed");
            return notices.note(&key, "subnet", msg);
        }
        let remote = self.remotes.iter().find(|l| l.underlay_ip == next_hop);
        let found = remote.and_then(|l| match &l.backend {
            BackendData::Bgp {
                vtep_mac: Some(mac), ..
            } => l
                .pod_cidrs
                .iter()
                .find(|c| c.is_ipv4() == prefix.is_ipv4())
                .map(|c| (c.network(), mac.0)),
            _ => None,
        });
        let Some((vtep, mac)) = found else {
            let msg = format!(
                "{off} and no node lease at {next_hop} publishes a VTEP MAC and a pod CIDR of its family (CrossSubnet \
                 \"vxlan\"): not installed"
            );
            return notices.note(&key, "subnet", msg);
        };
        let route = Route::new(prefix)
            .via(vtep)
            .dev(index)
            .onlink()
            .protocol(TRELLISD_PROTO);
        out.routes.insert(prefix, route);
        out.neighbours.insert(vtep, mac);
        out.fdb.insert((mac, next_hop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fixtures::underlay;
    use crate::backend::vxlan::vtep_mac;
    use crate::config::BgpPeer;
    use trellis_net::ethtool::Ethtool;

    fn lease(node: &str, ip: &str, cidrs: &[&str], vtep: bool) -> Lease {
        let backend = BackendData::Bgp {
            asn: 64512,
            vtep_mac: vtep.then(|| MacString(vtep_mac(node))),
            rr_cluster_id: None,
        };
        crate::backend::fixtures::lease(node, ip, cidrs, backend)
    }

    /// Through an IPIP device at `index`.
    fn ipip_at(index: u32) -> CrossPath {
        CrossPath::Ipip(Tunnel::at(Ipip::new(&underlay()).unwrap(), index))
    }

    /// Through a VXLAN device at `index`.
    fn vxlan_at(index: u32) -> CrossPath {
        let ethtool = Ethtool::open().unwrap();
        let vxlan = Vxlan::new(CROSS_SUBNET_VNI, CROSS_SUBNET_PORT, "me", true, ethtool).unwrap();
        CrossPath::Vxlan(Tunnel::at(vxlan, index))
    }

    /// Runs `routes` through a context and returns what it wants and the notices.
    fn compute(cross: CrossPath, routes: &[(&str, &str)], remotes: &[Lease]) -> (Desired, Vec<String>) {
        let u = underlay();
        let own = lease("me", "192.168.0.11", &["10.244.1.0/24", "fd00:244:0:1::/64"], true);
        let ctx = Context {
            cross: &cross,
            underlay: &u,
            own: Some(&own),
            remotes,
        };
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        for (p, nh) in routes {
            ctx.route(p.parse().unwrap(), nh.parse().unwrap(), &mut out, &mut notices);
        }
        (out, notices.messages().map(str::to_string).collect())
    }

    fn shown(r: &Route) -> String {
        format!(
            "{} via {} dev {}{}",
            r.destination,
            r.gateway.unwrap(),
            r.oif.unwrap(),
            if r.onlink { " onlink" } else { "" }
        )
    }

    #[test]
    fn on_the_subnet_plain_routes_beyond_it_through_the_ipip_tunnel() {
        let (out, notices) = compute(
            ipip_at(9),
            &[
                ("10.244.2.0/24", "192.168.0.12"),
                ("10.244.3.0/24", "10.1.0.13"),
                ("10.244.4.0/26", "192.168.0.14"),
            ],
            &[],
        );
        assert_eq!(notices, Vec::<String>::new());
        let routes: Vec<_> = out.routes.values().map(shown).collect();
        assert_eq!(
            routes,
            [
                "10.244.2.0/24 via 192.168.0.12 dev 2",
                "10.244.3.0/24 via 10.1.0.13 dev 9 onlink",
                "10.244.4.0/26 via 192.168.0.14 dev 2"
            ]
        );
        assert!(out.routes.values().all(|r| r.protocol == Some(TRELLISD_PROTO)));
        assert!(out.neighbours.is_empty() && out.fdb.is_empty());
    }

    /// Issue 13, item 2: the underlay link's IPv6 prefix (the fixture's `fd00:77::11/64`) is on
    /// the link as much as its IPv4 subnet.
    #[test]
    fn ipv6_next_hops_on_the_links_ipv6_prefix_are_plain_routes() {
        let (out, notices) = compute(
            CrossPath::Refused,
            &[
                ("fd00:244:0:2::/64", "fd00:77::12"),
                ("fd00:244:0:3::/64", "fd00:78::13"),
            ],
            &[],
        );
        let routes: Vec<_> = out.routes.values().map(shown).collect();
        assert_eq!(routes, ["fd00:244:0:2::/64 via fd00:77::12 dev 2"]);
        assert!(
            notices.len() == 1
                && notices[0].contains("fd00:244:0:3::/64")
                && notices[0].contains("off this node's subnet"),
            "{notices:?}"
        );
    }

    #[test]
    fn beyond_the_subnet_through_vxlan_to_nodes_that_publish_a_vtep() {
        let remotes = [
            lease("far", "10.1.0.13", &["10.244.3.0/24"], true),
            lease("novtep", "10.1.0.14", &["10.244.4.0/24"], false),
        ];
        let (out, notices) = compute(
            vxlan_at(7),
            &[
                ("10.244.2.0/24", "192.168.0.12"),
                ("10.244.3.0/24", "10.1.0.13"),
                ("10.244.4.0/24", "10.1.0.14"),
                ("10.244.5.0/24", "10.1.0.15"),
            ],
            &remotes,
        );
        let routes: Vec<_> = out.routes.values().map(shown).collect();
        assert_eq!(
            routes,
            [
                "10.244.2.0/24 via 192.168.0.12 dev 2",
                "10.244.3.0/24 via 10.244.3.0 dev 7 onlink"
            ]
        );
        let mac = vtep_mac("far");
        assert_eq!(out.neighbours, [("10.244.3.0".parse().unwrap(), mac)].into());
        assert_eq!(out.fdb, [(mac, "10.1.0.13".parse().unwrap())].into());
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(notices.iter().all(|n| n.contains("VTEP MAC")), "{notices:?}");
    }

    #[test]
    fn beyond_the_subnet_refused_without_a_tunnel_once_per_prefix() {
        for (cross, why) in [
            (CrossPath::Refused, "CrossSubnet is \"none\""),
            (CrossPath::Unavailable("no ipip module".into()), "no ipip module"),
        ] {
            let (out, notices) = compute(
                cross,
                &[
                    ("10.244.2.0/24", "192.168.0.12"),
                    ("10.244.3.0/24", "10.1.0.13"),
                    ("10.244.3.0/24", "10.1.0.13"),
                ],
                &[],
            );
            assert_eq!(out.routes.len(), 1, "{why}");
            assert_eq!(notices.len(), 1, "{notices:?}");
            assert!(
                notices[0].contains("10.244.3.0/24 via 10.1.0.13") && notices[0].contains("off this node's subnet")
            );
            assert!(notices[0].contains(why), "{notices:?}");
        }
    }

    #[test]
    fn what_cannot_be_installed_is_skipped_or_noted() {
        // What the import policy drops (outside the cluster, default routes, next hop ours) is
        // tested in `crate::bgp::policy`: it never reaches this module.
        let (out, notices) = compute(
            ipip_at(9),
            &[
                ("10.244.1.0/24", "192.168.0.12"),     // ours, reflected back
                ("10.244.1.128/25", "192.168.0.12"),   // inside ours
                ("10.244.0.0/16", "192.168.0.12"),     // wider than ours: would swallow it
                ("fd00:244:0:2::/64", "192.168.0.12"), // family mismatch
                ("fd00:244:0:3::/64", "fd00::13"),     // IPv6 beyond an IPv4 underlay: not through IPIP
            ],
            &[],
        );
        assert!(out.routes.is_empty(), "{:?}", out.routes.keys().collect::<Vec<_>>());
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert!(notices
            .iter()
            .any(|n| n.contains("fd00:244:0:2::/64") && n.contains("other family")));
        assert!(notices
            .iter()
            .any(|n| n.contains("fd00:244:0:3::/64") && n.contains("IPv4 over IPv4 only")));
    }

    #[test]
    fn no_rib_no_desired_state_then_the_rib_is_the_desired_state() {
        let bgp = Bgp {
            asn: 64512,
            cross: CrossPath::Refused,
        };
        let u = underlay();
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        assert!(
            !bgp.desired(None, &[], None, &u, &mut out, &mut notices),
            "unknown before the speaker synced"
        );
        let rib = [
            BgpRoute {
                prefix: "10.244.2.7/24".parse().unwrap(),
                next_hop: "192.168.0.12".parse().unwrap(),
            },
            BgpRoute {
                prefix: "10.244.3.0/24".parse().unwrap(),
                next_hop: "10.1.0.13".parse().unwrap(),
            },
        ];
        assert!(bgp.desired(Some(&rib), &[], None, &u, &mut out, &mut notices));
        assert_eq!(
            out.routes.keys().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.244.2.0/24"],
            "host bits cleared"
        );
        assert_eq!(notices.messages().count(), 1, "CrossSubnet none");
        // An empty RIB is a known state: everything goes.
        let (mut out, mut notices) = (Desired::default(), Notices::default());
        assert!(bgp.desired(Some(&[]), &[], None, &u, &mut out, &mut notices));
        assert!(out.routes.is_empty());
        assert_eq!(
            bgp.backend_data(),
            BackendData::Bgp {
                asn: 64512,
                vtep_mac: None,
                rr_cluster_id: None
            }
        );
    }

    fn bgp_config(mesh: bool) -> BackendConfig {
        BackendConfig::Bgp {
            as_number: 64512,
            mesh,
            peers: vec![BgpPeer {
                ip: "192.168.0.1".parse().unwrap(),
                as_number: 65000,
                password_file: None,
            }],
            route_reflectors: vec!["192.168.0.2".parse().unwrap()],
            cross_subnet: CrossSubnet::Ipip,
            hold_time: 90,
            graceful_restart: 120,
        }
    }

    #[test]
    fn peers_are_the_mesh_the_reflectors_and_the_configured_ones() {
        let mut leases = BTreeMap::new();
        for l in [
            lease("me", "192.168.0.11", &["10.244.1.0/24"], false),
            lease("n2", "192.168.0.12", &["10.244.2.0/24"], false),
            Lease {
                backend: BackendData::Bgp {
                    asn: 65002,
                    vtep_mac: None,
                    rr_cluster_id: None,
                },
                ..lease("n3", "10.1.0.13", &["10.244.3.0/24"], false)
            },
            Lease {
                backend: BackendData::HostGw,
                ..lease("hg", "192.168.0.14", &["10.244.4.0/24"], false)
            },
            // A node that also peers as a configured peer: the configured ASN wins.
            lease("tor", "192.168.0.1", &["10.244.5.0/24"], false),
        ] {
            leases.insert(l.node.clone(), l);
        }
        let own_ip = "192.168.0.11".parse().unwrap();
        let show = |ps: Vec<Peer>| ps.iter().map(|p| format!("{} {}", p.addr, p.asn)).collect::<Vec<_>>();
        assert_eq!(
            show(peers(&bgp_config(true), "me", own_ip, None, &leases)),
            [
                "10.1.0.13 65002",
                "192.168.0.1 65000",
                "192.168.0.2 64512",
                "192.168.0.12 64512"
            ]
        );
        assert_eq!(
            show(peers(&bgp_config(false), "me", own_ip, None, &leases)),
            ["192.168.0.1 65000", "192.168.0.2 64512"]
        );
        assert!(peers(&BackendConfig::HostGw, "me", own_ip, None, &leases).is_empty());
    }

    /// `Mesh: false` with reflector nodes: clients peer with the reflectors only, reflectors
    /// with everyone (clients flagged, the other reflectors not); `Mesh: true` stays a mesh.
    #[test]
    fn reflector_nodes_make_the_topology_without_the_mesh() {
        let id: std::net::Ipv4Addr = "1.0.0.1".parse().unwrap();
        let reflector = |node: &str, ip: &str, cidr: &str| {
            let mut l = lease(node, ip, &[cidr], false);
            l.backend = BackendData::Bgp {
                asn: 64512,
                vtep_mac: None,
                rr_cluster_id: Some(id),
            };
            l
        };
        let mut leases = BTreeMap::new();
        for l in [
            reflector("rr1", "192.168.0.11", "10.244.1.0/24"),
            reflector("rr2", "192.168.0.12", "10.244.2.0/24"),
            lease("c3", "192.168.0.13", &["10.244.3.0/24"], false),
            lease("c4", "192.168.0.14", &["10.244.4.0/24"], false),
        ] {
            leases.insert(l.node.clone(), l);
        }
        let mut cfg = bgp_config(false);
        if let BackendConfig::Bgp {
            peers,
            route_reflectors,
            ..
        } = &mut cfg
        {
            peers.clear();
            route_reflectors.clear();
        }
        let show = |ps: Vec<Peer>| {
            ps.iter()
                .map(|p| format!("{}{}", p.addr, if p.rr_client { " client" } else { "" }))
                .collect::<Vec<_>>()
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            show(peers(&cfg, "rr1", ip("192.168.0.11"), Some(id), &leases)),
            ["192.168.0.12", "192.168.0.13 client", "192.168.0.14 client"]
        );
        assert_eq!(
            show(peers(&cfg, "c3", ip("192.168.0.13"), None, &leases)),
            ["192.168.0.11", "192.168.0.12"]
        );
        let mesh = bgp_config(true);
        assert!(peers(&mesh, "rr1", ip("192.168.0.11"), Some(id), &leases)
            .iter()
            .all(|p| !p.rr_client));
        assert_eq!(peers(&mesh, "c3", ip("192.168.0.13"), None, &leases).len(), 3 + 2);
    }

    #[test]
    fn exports_are_the_cidrs_with_a_next_hop_of_their_family() {
        let own = lease("me", "192.168.0.11", &["10.244.1.5/24", "fd00:244:1::/64"], false);
        let show = |e: &Exports| {
            let p: Vec<String> = e.prefixes.iter().map(ToString::to_string).collect();
            let nh = |a: Option<IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
            (p.join(" "), nh(e.next_hop_v4), nh(e.next_hop_v6), e.unannounced.len())
        };
        // Dual stack: the fixture's link also holds fd00:77::11/64.
        let dual = underlay();
        assert_eq!(
            show(&exports(&own, &dual)),
            (
                "10.244.1.0/24 fd00:244:1::/64".into(),
                "192.168.0.11".into(),
                "fd00:77::11".into(),
                0
            )
        );
        // IPv4 only: the IPv6 CIDR has no next hop, and says so.
        let v4_only = Underlay {
            link_prefixes: vec![],
            ..underlay()
        };
        let e = exports(&own, &v4_only);
        assert_eq!(
            show(&e),
            ("10.244.1.0/24".into(), "192.168.0.11".into(), String::new(), 1)
        );
        assert!(
            e.unannounced[0].1.contains("no global IPv6 address"),
            "{:?}",
            e.unannounced
        );
        // IPv6 only: the IPv4 CIDR has none.
        let v6_only = Underlay {
            ip: "fd00::11".parse().unwrap(),
            prefix: "fd00::11/64".parse().unwrap(),
            link_prefixes: vec![],
            ..underlay()
        };
        assert_eq!(
            show(&exports(&own, &v6_only)),
            ("fd00:244:1::/64".into(), String::new(), "fd00::11".into(), 1)
        );
    }
}
