//! Import and export policy, and the UPDATEs that carry our exports.
//!
//! - Import: a prefix is accepted only inside one of the cluster CIDRs (`import_within`), never
//!   a default route, with a usable next hop that is not this node, and no loop (our AS in the
//!   path from an external peer, our own route reflected back). Everything else is dropped: a
//!   peer cannot hijack 0.0.0.0/0 or anything outside the pod network. Every drop is counted by
//!   [`Rejected::label`] in `trellisd_bgp_routes_dropped_total{reason}`, and logged per peer
//!   and reason at most once per 10 s (warning; loops, normal with a ToR or a reflector, as
//!   information), naming the peer, the reason, the prefixes of that UPDATE and how many
//!   drops were held back since the last line.
//! - Export: the node's pod CIDRs, next hop = the node's underlay address (per family),
//!   ORIGIN IGP, an empty AS_PATH to iBGP peers (with LOCAL_PREF 100) and our AS to eBGP peers.
//!   A node that is not a route reflector never re-advertises what it learned. A route
//!   reflector ([`super::BgpConfig::rr_cluster_id`]) also passes on the best route to each
//!   prefix learned over iBGP ([`Reflected`], RFC 4456 §8): from a client to every other iBGP
//!   peer, from a non-client to the clients only, never back to the peer it came from (nor to
//!   its originator), never to eBGP peers; its attributes unchanged (NEXT_HOP included) but
//!   ORIGINATOR_ID (set to the originator's identifier when absent) and CLUSTER_LIST (our
//!   cluster ID prepended). Unknown optional transitive attributes (communities) are not
//!   carried. eBGP-learned routes are not re-advertised at all: RFC 4456 concerns the iBGP
//!   mesh, and a cluster's external routers peer with every node that needs their routes.

use super::rib::PathAttrs;
use super::session::Negotiated;
use super::wire::{AsPath, AsSegment, Attr, Family, MpReach, MpUnreach, Update, AS_SEQUENCE};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Why an announced prefix was not imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rejected {
    OutsideClusterCidrs,
    DefaultRoute,
    NextHopIsThisNode,
    NextHopUnusable,
    /// From an external peer with our AS in its AS_PATH (or AS4_PATH).
    AsLoop,
    /// Our own route reflected back to us (ORIGINATOR_ID is our identifier, RFC 4456 §8).
    OriginatorIsUs,
    /// A route reflector's: our cluster ID in the CLUSTER_LIST (RFC 4456 §8), the route went
    /// round the reflectors of our cluster.
    ClusterListLoop,
}

impl Rejected {
    pub const ALL: [Rejected; 7] = [
        Rejected::OutsideClusterCidrs,
        Rejected::DefaultRoute,
        Rejected::NextHopIsThisNode,
        Rejected::NextHopUnusable,
        Rejected::AsLoop,
        Rejected::OriginatorIsUs,
        Rejected::ClusterListLoop,
    ];

    /// The `reason` label of `trellisd_bgp_routes_dropped_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::OutsideClusterCidrs => "outside_cluster_cidrs",
            Rejected::DefaultRoute => "default_route",
            Rejected::NextHopIsThisNode => "next_hop_is_this_node",
            Rejected::NextHopUnusable => "next_hop_unusable",
            Rejected::AsLoop => "as_loop",
            Rejected::OriginatorIsUs => "originator_is_us",
            Rejected::ClusterListLoop => "cluster_list_loop",
        }
    }

    /// A loop: expected where routes come back around (a ToR that sends every node's routes to
    /// every node, a route reflector), so logged as information, not as a warning.
    pub fn is_loop(self) -> bool {
        matches!(
            self,
            Rejected::AsLoop | Rejected::OriginatorIsUs | Rejected::ClusterListLoop
        )
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rejected::OutsideClusterCidrs => "outside the cluster CIDRs",
            Rejected::DefaultRoute => "a default route",
            Rejected::NextHopIsThisNode => "next hop is this node",
            Rejected::NextHopUnusable => "next hop unusable (link-local or unspecified)",
            Rejected::AsLoop => "our AS in the AS path (a loop)",
            Rejected::OriginatorIsUs => "our own route reflected back (ORIGINATOR_ID is us)",
            Rejected::ClusterListLoop => "our cluster ID in the CLUSTER_LIST (a reflection loop)",
        })
    }
}

/// Whether `prefix` lies inside one of `within` (same family, at least as long).
pub fn inside(prefix: &IpNetwork, within: &[IpNetwork]) -> bool {
    within
        .iter()
        .any(|c| Family::of(c) == Family::of(prefix) && c.prefix() <= prefix.prefix() && c.contains(prefix.network()))
}

/// The next hop as the kernel will use it: an IPv4-mapped IPv6 address is the IPv4 address.
pub fn normalize_next_hop(nh: IpAddr) -> IpAddr {
    nh.to_canonical()
}

/// Import policy for one announced prefix with next hop `next_hop` (normalized).
pub fn check_import(
    prefix: &IpNetwork,
    next_hop: IpAddr,
    within: &[IpNetwork],
    ours: &[IpAddr],
) -> Result<(), Rejected> {
    if prefix.prefix() == 0 {
        return Err(Rejected::DefaultRoute);
    }
    if !inside(prefix, within) {
        return Err(Rejected::OutsideClusterCidrs);
    }
    if ours.contains(&next_hop) {
        return Err(Rejected::NextHopIsThisNode);
    }
    let unusable = match next_hop {
        IpAddr::V4(a) => a.is_unspecified(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_unicast_link_local(),
    };
    if unusable {
        return Err(Rejected::NextHopUnusable);
    }
    Ok(())
}

/// At most one log line per period; counts what it held back.
pub struct Throttle {
    period: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)`: log now, mentioning the `n` events held back since the last line.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        self.allow_n(now, 1)
    }

    /// [`Throttle::allow`] for `events` events at once (held back together).
    pub fn allow_n(&mut self, now: Instant, events: u64) -> Option<u64> {
        match self.last {
            Some(t) if now < t + self.period => {
                self.held_back += events;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

/// What this node exports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exports {
    pub prefixes: Vec<IpNetwork>,
    pub next_hop_v4: Option<IpAddr>,
    pub next_hop_v6: Option<IpAddr>,
}

impl Exports {
    /// Host bits cleared, sorted, without duplicates.
    pub fn new(prefixes: Vec<IpNetwork>, next_hop_v4: Option<IpAddr>, next_hop_v6: Option<IpAddr>) -> Exports {
        let mut prefixes: Vec<IpNetwork> = prefixes
            .into_iter()
            .map(|p| IpNetwork::new(p.network(), p.prefix()).expect("same length"))
            .collect();
        prefixes.sort();
        prefixes.dedup();
        Exports {
            prefixes,
            next_hop_v4,
            next_hop_v6,
        }
    }

    /// Prefix → next hop for a session: families it carries, next hop of the family, or the
    /// session's own address when none is given and it is of the family.
    pub fn for_session(&self, families: &[Family], session_addr: IpAddr) -> BTreeMap<IpNetwork, IpAddr> {
        let mut out = BTreeMap::new();
        for p in &self.prefixes {
            let family = Family::of(p);
            if !families.contains(&family) {
                continue;
            }
            let next_hop = match family {
                Family::Ipv4Unicast => self.next_hop_v4.or(session_addr.is_ipv4().then_some(session_addr)),
                Family::Ipv6Unicast => self.next_hop_v6.or(session_addr.is_ipv6().then_some(session_addr)),
            };
            if let Some(nh) = next_hop {
                out.insert(*p, nh);
            }
        }
        out
    }
}

/// A learned route a route reflector passes on (the best one to its prefix, learned over iBGP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reflected {
    pub next_hop: IpAddr,
    /// The peer it was learned from: never sent back there.
    pub peer: IpAddr,
    /// That peer is a route-reflector client of ours.
    pub from_client: bool,
    pub local_pref: u32,
    pub attrs: PathAttrs,
}

/// What a reflector reflects, per prefix.
pub type ReflectedRoutes = BTreeMap<IpNetwork, Arc<Reflected>>;

/// One route of an Adj-RIB-Out: one of our exports (next hop), or a reflected route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Advert {
    Own(IpAddr),
    Reflected(Arc<Reflected>),
}

impl Advert {
    pub fn next_hop(&self) -> IpAddr {
        match self {
            Advert::Own(nh) => *nh,
            Advert::Reflected(r) => r.next_hop,
        }
    }
}

/// The peer a reflected route may go to, as [`reflect_to`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct ReflectTarget {
    pub addr: IpAddr,
    /// Its BGP identifier.
    pub router_id: Ipv4Addr,
    pub ebgp: bool,
    pub rr_client: bool,
}

/// RFC 4456 §6: whether a reflector passes `r` on to `to`. From a client: to every other iBGP
/// peer; from a non-client: to the clients only; never to the peer it came from, nor to its
/// originator (who would drop it), never to an eBGP peer.
pub fn reflect_to(r: &Reflected, to: &ReflectTarget) -> bool {
    !to.ebgp && r.peer != to.addr && r.attrs.originator_id != to.router_id && (r.from_client || to.rr_client)
}

/// Prefixes per UPDATE, so that one stays well under 4096 bytes (5 bytes per IPv4 prefix,
/// 17 per IPv6 one, plus at most about 100 bytes of attributes).
const V4_PER_UPDATE: usize = 700;
const V6_PER_UPDATE: usize = 200;

/// The UPDATEs that withdraw `withdraw` and announce `announce` (prefix → next hop) to a peer.
pub fn updates(
    announce: &BTreeMap<IpNetwork, IpAddr>,
    withdraw: &[IpNetwork],
    local_asn: u32,
    session: &Negotiated,
) -> Vec<Update> {
    let adverts: BTreeMap<IpNetwork, Advert> = announce.iter().map(|(p, nh)| (*p, Advert::Own(*nh))).collect();
    updates_for(&adverts, withdraw, local_asn, session, None)
}

/// The attributes (but the next hop) of a reflected route: as learned, ORIGINATOR_ID set,
/// `cluster_id` prepended to CLUSTER_LIST (RFC 4456 §8).
fn reflected_attrs(r: &Reflected, cluster_id: Option<Ipv4Addr>, session: &Negotiated) -> Vec<Attr> {
    let a = &r.attrs;
    let mut attrs = vec![Attr::Origin(a.origin), Attr::AsPath(a.as_path.clone())];
    let wide = a
        .as_path
        .0
        .iter()
        .any(|s| s.asns.iter().any(|x| *x > u32::from(u16::MAX)));
    if !session.four_octet_as && wide {
        attrs.push(Attr::As4Path(a.as_path.clone()));
    }
    if let Some(med) = a.med {
        attrs.push(Attr::Med(med));
    }
    attrs.push(Attr::LocalPref(r.local_pref));
    attrs.push(Attr::OriginatorId(a.originator_id));
    let mut list: Vec<u32> = cluster_id.map(u32::from).into_iter().collect();
    list.extend(&a.cluster_list);
    attrs.push(Attr::ClusterList(list));
    attrs
}

/// The UPDATEs that withdraw `withdraw` and announce `announce` to a peer; reflected routes
/// get `cluster_id` in their CLUSTER_LIST.
pub fn updates_for(
    announce: &BTreeMap<IpNetwork, Advert>,
    withdraw: &[IpNetwork],
    local_asn: u32,
    session: &Negotiated,
    cluster_id: Option<Ipv4Addr>,
) -> Vec<Update> {
    let mut out = Vec::new();
    let (w4, w6): (Vec<IpNetwork>, Vec<IpNetwork>) = withdraw.iter().partition(|p| p.is_ipv4());
    for chunk in w4.chunks(V4_PER_UPDATE) {
        out.push(Update {
            withdrawn: chunk.to_vec(),
            ..Default::default()
        });
    }
    for chunk in w6.chunks(V6_PER_UPDATE) {
        out.push(Update {
            attrs: vec![Attr::MpUnreach(MpUnreach {
                family: Family::Ipv6Unicast,
                withdrawn: chunk.to_vec(),
            })],
            ..Default::default()
        });
    }

    let mut common = vec![Attr::Origin(0)];
    if session.ebgp {
        let segment = AsSegment {
            kind: AS_SEQUENCE,
            asns: vec![local_asn],
        };
        common.push(Attr::AsPath(AsPath(vec![segment.clone()])));
        if !session.four_octet_as && local_asn > u32::from(u16::MAX) {
            common.push(Attr::As4Path(AsPath(vec![segment])));
        }
    } else {
        common.push(Attr::AsPath(AsPath::default()));
        common.push(Attr::LocalPref(100));
    }
    let common = Arc::new(common);
    // Prefixes with the same family, next hop and attributes go together. Per next hop, the
    // attribute sets are searched linearly: a next hop is one node's, with one set, mostly.
    type Groups = BTreeMap<(Family, IpAddr), Vec<(Arc<Vec<Attr>>, Vec<IpNetwork>)>>;
    let mut groups: Groups = BTreeMap::new();
    let mut last_reflected: Option<(&Arc<Reflected>, Arc<Vec<Attr>>)> = None;
    for (p, advert) in announce {
        let attrs = match advert {
            Advert::Own(_) => Arc::clone(&common),
            Advert::Reflected(r) => match &last_reflected {
                Some((prev, a)) if Arc::ptr_eq(prev, r) => Arc::clone(a),
                _ => {
                    let a = Arc::new(reflected_attrs(r, cluster_id, session));
                    last_reflected = Some((r, Arc::clone(&a)));
                    a
                }
            },
        };
        let sets = groups.entry((Family::of(p), advert.next_hop())).or_default();
        match sets.iter_mut().find(|(a, _)| *a == attrs) {
            Some((_, v)) => v.push(*p),
            None => sets.push((attrs, vec![*p])),
        }
    }
    let groups = groups.into_iter().flat_map(|((family, nh), sets)| {
        sets.into_iter()
            .map(move |(attrs, prefixes)| ((family, nh, attrs), prefixes))
    });
    for ((family, nh, attrs), prefixes) in groups {
        match (family, nh) {
            (Family::Ipv4Unicast, IpAddr::V4(nh)) => {
                for chunk in prefixes.chunks(V4_PER_UPDATE) {
                    let mut attrs = Vec::clone(&attrs);
                    attrs.push(Attr::NextHop(nh));
                    out.push(Update {
                        attrs,
                        nlri: chunk.to_vec(),
                        ..Default::default()
                    });
                }
            }
            (Family::Ipv4Unicast, IpAddr::V6(_)) => {
                tracing::warn!(%nh, "an IPv4 prefix with an IPv6 next hop is not exported (RFC 8950 is not supported)");
            }
            (Family::Ipv6Unicast, nh) => {
                let next_hop = match nh {
                    IpAddr::V6(a) => a,
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                };
                for chunk in prefixes.chunks(V6_PER_UPDATE) {
                    let mut attrs = Vec::clone(&attrs);
                    attrs.push(Attr::MpReach(MpReach {
                        family,
                        next_hop: IpAddr::V6(next_hop),
                        link_local: None::<Ipv6Addr>,
                        nlri: chunk.to_vec(),
                    }));
                    out.push(Update {
                        attrs,
                        ..Default::default()
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::wire::{attr, decode_update, Message, HEADER_LEN, MAX_MESSAGE_LEN};
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn import_policy() {
        let within = [net("10.244.0.0/16"), net("fd00:244::/48")];
        let ours = [ip("192.168.77.11")];
        let nh = ip("192.168.77.12");
        assert_eq!(check_import(&net("10.244.3.0/24"), nh, &within, &ours), Ok(()));
        assert_eq!(check_import(&net("10.244.0.0/16"), nh, &within, &ours), Ok(()));
        assert_eq!(check_import(&net("fd00:244:0:3::/64"), nh, &within, &ours), Ok(()));
        assert_eq!(
            check_import(&net("0.0.0.0/0"), nh, &within, &ours),
            Err(Rejected::DefaultRoute)
        );
        for p in ["10.0.0.0/8", "10.245.0.0/24", "172.16.0.0/24", "fd00::/16"] {
            assert_eq!(
                check_import(&net(p), nh, &within, &ours),
                Err(Rejected::OutsideClusterCidrs),
                "{p}"
            );
        }
        assert_eq!(
            check_import(&net("10.244.3.0/24"), ours[0], &within, &ours),
            Err(Rejected::NextHopIsThisNode)
        );
        assert_eq!(
            check_import(&net("fd00:244:0:3::/64"), ip("fe80::1"), &within, &ours),
            Err(Rejected::NextHopUnusable)
        );
        assert_eq!(normalize_next_hop(ip("::ffff:192.168.77.12")), nh);
    }

    #[test]
    fn throttle() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(10));
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(t.allow_n(t0 + Duration::from_secs(11), 5), None);
        assert_eq!(t.allow_n(t0 + Duration::from_secs(20), 3), Some(5));
    }

    fn session(ebgp: bool, four_octet_as: bool) -> Negotiated {
        Negotiated {
            remote_id: "192.168.77.1".parse().unwrap(),
            remote_asn: if ebgp { 65001 } else { 64512 },
            ebgp,
            hold_time: 90,
            four_octet_as,
            families: Family::ALL.to_vec(),
            peer_graceful_restart: None,
        }
    }

    #[test]
    fn exports_per_session() {
        let e = Exports::new(
            vec![net("10.244.1.7/24"), net("fd00:244:1::/64"), net("10.244.1.0/24")],
            None,
            Some(ip("fd00:77::11")),
        );
        assert_eq!(e.prefixes, [net("10.244.1.0/24"), net("fd00:244:1::/64")]);
        let m = e.for_session(&Family::ALL, ip("192.168.77.11"));
        assert_eq!(m[&net("10.244.1.0/24")], ip("192.168.77.11"), "the session's address");
        assert_eq!(m[&net("fd00:244:1::/64")], ip("fd00:77::11"));
        assert_eq!(e.for_session(&[Family::Ipv4Unicast], ip("192.168.77.11")).len(), 1);
    }

    #[test]
    fn updates_fit_in_messages_and_carry_the_right_attributes() {
        let mut announce = BTreeMap::new();
        for i in 0..2000u32 {
            let a = std::net::Ipv4Addr::from(0x0af4_0000 + (i << 8));
            announce.insert(IpNetwork::new(IpAddr::V4(a), 24).unwrap(), ip("192.168.77.11"));
            let b = Ipv6Addr::from((0xfd00_0244u128 << 96) | (u128::from(i) << 64));
            announce.insert(IpNetwork::new(IpAddr::V6(b), 64).unwrap(), ip("fd00:77::11"));
        }
        let withdraw: Vec<IpNetwork> = announce.keys().copied().collect();
        for (ebgp, four) in [(false, true), (true, true), (true, false)] {
            let s = session(ebgp, four);
            let ups = updates(&announce, &withdraw, 4_200_000_001, &s);
            let (mut announced, mut withdrawn) = (0, 0);
            for u in &ups {
                let bytes = Message::Update(u.clone()).encode(four);
                assert!(bytes.len() <= MAX_MESSAGE_LEN, "{} bytes", bytes.len());
                let d = decode_update(&bytes[HEADER_LEN..], four).unwrap();
                withdrawn += d.withdrawn.len();
                announced += d.nlri.len();
                for a in &d.attrs {
                    match a {
                        Attr::MpReach(r) => announced += r.nlri.len(),
                        Attr::MpUnreach(r) => withdrawn += r.withdrawn.len(),
                        Attr::LocalPref(_) => assert!(!ebgp),
                        Attr::AsPath(p) => assert_eq!(p.len(), usize::from(ebgp)),
                        Attr::As4Path(_) => assert!(!four),
                        _ => {}
                    }
                }
            }
            assert_eq!((announced, withdrawn), (4000, 4000));
        }
    }

    fn reflected(peer: &str, from_client: bool, originator: &str) -> Reflected {
        Reflected {
            next_hop: ip(originator),
            peer: ip(peer),
            from_client,
            local_pref: 150,
            attrs: PathAttrs {
                origin: 0,
                as_path: AsPath::default(),
                med: Some(7),
                originator_id: originator.parse().unwrap(),
                cluster_list: vec![0x0200_0002],
            },
        }
    }

    fn target(addr: &str, ebgp: bool, rr_client: bool) -> ReflectTarget {
        ReflectTarget {
            addr: ip(addr),
            router_id: addr.parse().unwrap(),
            ebgp,
            rr_client,
        }
    }

    /// RFC 4456 §6: client routes to every other iBGP peer, non-client routes to clients
    /// only; never back to where it came from or to its originator, never to eBGP peers.
    #[test]
    fn reflection_rules() {
        let from_client = reflected("10.0.0.3", true, "10.0.0.3");
        let from_non_client = reflected("10.0.0.2", false, "10.0.0.2");
        let client = target("10.0.0.4", false, true);
        let non_client = target("10.0.0.5", false, false);
        let external = target("10.0.0.6", true, true);
        assert!(reflect_to(&from_client, &client));
        assert!(reflect_to(&from_client, &non_client));
        assert!(!reflect_to(&from_client, &external));
        assert!(
            !reflect_to(&from_client, &target("10.0.0.3", false, true)),
            "back to its peer"
        );
        assert!(reflect_to(&from_non_client, &client));
        assert!(!reflect_to(&from_non_client, &non_client));
        assert!(!reflect_to(&from_non_client, &external));
        // Learned from another reflector, originated by a client: not back to the originator.
        let via_rr = reflected("10.0.0.2", false, "10.0.0.4");
        assert!(!reflect_to(&via_rr, &client));
        assert!(reflect_to(&via_rr, &target("10.0.0.7", false, true)));
    }

    #[test]
    fn reflected_routes_keep_their_attributes_and_get_originator_and_cluster_list() {
        let cluster: std::net::Ipv4Addr = "1.0.0.1".parse().unwrap();
        let r = Arc::new(reflected("10.0.0.3", true, "10.0.0.3"));
        let mut announce = BTreeMap::new();
        announce.insert(net("10.244.3.0/24"), Advert::Reflected(Arc::clone(&r)));
        announce.insert(net("10.244.33.0/24"), Advert::Reflected(r));
        announce.insert(net("10.244.1.0/24"), Advert::Own(ip("10.0.0.1")));
        let s = session(false, true);
        let ups = updates_for(&announce, &[], 64512, &s, Some(cluster));
        assert_eq!(ups.len(), 2, "one UPDATE per attribute set: {ups:#?}");
        let own = ups.iter().find(|u| u.nlri == [net("10.244.1.0/24")]).unwrap();
        assert!(own.get(attr::ORIGINATOR_ID).is_none() && own.get(attr::CLUSTER_LIST).is_none());
        let refl = ups.iter().find(|u| u.nlri.len() == 2).unwrap();
        assert_eq!(refl.nlri, [net("10.244.3.0/24"), net("10.244.33.0/24")]);
        let bytes = Message::Update(refl.clone()).encode(true);
        let d = decode_update(&bytes[HEADER_LEN..], true).unwrap();
        assert_eq!(
            d.get(attr::NEXT_HOP),
            Some(&Attr::NextHop("10.0.0.3".parse().unwrap())),
            "next hop unchanged"
        );
        assert_eq!(d.get(attr::LOCAL_PREF), Some(&Attr::LocalPref(150)));
        assert_eq!(d.get(attr::MED), Some(&Attr::Med(7)));
        assert_eq!(
            d.get(attr::ORIGINATOR_ID),
            Some(&Attr::OriginatorId("10.0.0.3".parse().unwrap()))
        );
        assert_eq!(
            d.get(attr::CLUSTER_LIST),
            Some(&Attr::ClusterList(vec![u32::from(cluster), 0x0200_0002])),
            "our cluster ID first"
        );
    }
}
