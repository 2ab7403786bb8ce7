//! What the datastore says is checked before it is believed: [`admit`] decides which leases
//! become desired state, and every datastore's leases pass through it where they enter the node
//! ([`crate::node::Node`]), so no datastore can forget it.
//!
//! Why here and not in each datastore: every node holds the datastore's credentials (etcd) or
//! may patch Nodes (kube), so any one node, or anyone with its credentials, can write a lease.
//! A lease is a route in every node's kernel; unchecked, one record could route `8.0.0.0/5` of
//! every node into a tunnel, shadow half of a node's own pod CIDR on that very node, or send the
//! underlay subnet (and with it the etcd and API-server traffic) into the overlay. The rules:
//! - every CIDR has its host bits clear, at most one per family, and lies inside the cluster
//!   network (net-conf `Network` / `IPv6Network`);
//! - the datastore's ownership records name the lease's node as every CIDR's owner (etcd's
//!   `cidrs/` keys; kube sends none: a Node's `spec.podCIDRs` is set by the controller manager
//!   and immutable once set, so the lease itself is the record);
//! - no CIDR overlaps this node's own, the underlay subnet, or another admitted node's. Between
//!   two nodes claiming one range the incumbent keeps it (a node whose CIDRs were admitted
//!   before, unchanged), then the first by name: a newcomer cannot evict anyone;
//! - the tunnel endpoint is plausible: an underlay address that is not unspecified, loopback,
//!   multicast, broadcast, IPv4 link-local, this node's own, or inside the cluster network; a
//!   VTEP MAC that is unicast and not zero.
//!
//! A refused lease is left out of the desired state (its node is unreachable, which is what a
//! lying record deserves) and reported by the node: counted in
//! `trellisd_leases_refused_total{reason}` and logged once per node and reason.

use crate::lease::{BackendData, Lease};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a lease is checked against: this node's cluster network and underlay.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// The cluster networks (net-conf `Network`, `IPv6Network`).
    pub cluster: Vec<IpNetwork>,
    /// This node's underlay subnet, its own address included (`192.168.50.11/24`).
    pub underlay: IpNetwork,
}

/// Why a lease was refused; [`Refusal::label`] is the metric's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No pod CIDR, two of one family, or host bits set.
    MalformedCidrs,
    OutsideCluster,
    NotOwner,
    OverlapsOwn,
    OverlapsPeer,
    OverlapsUnderlay,
    BadEndpoint,
    BadVtepMac,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::MalformedCidrs,
        Refusal::OutsideCluster,
        Refusal::NotOwner,
        Refusal::OverlapsOwn,
        Refusal::OverlapsPeer,
        Refusal::OverlapsUnderlay,
        Refusal::BadEndpoint,
        Refusal::BadVtepMac,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::MalformedCidrs => "malformed_cidrs",
            Refusal::OutsideCluster => "outside_cluster_network",
            Refusal::NotOwner => "not_owner",
            Refusal::OverlapsOwn => "overlaps_own_cidr",
            Refusal::OverlapsPeer => "overlaps_other_node",
            Refusal::OverlapsUnderlay => "overlaps_underlay",
            Refusal::BadEndpoint => "bad_endpoint",
            Refusal::BadVtepMac => "bad_vtep_mac",
        }
    }
}

/// A refused lease: why, in a word ([`Refusal`]) and in a sentence for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub lease: Lease,
    pub reason: Refusal,
    pub detail: String,
}

/// The leases to believe, and the others with the reason.
#[derive(Debug, Default)]
pub struct Verdict {
    pub admitted: BTreeMap<String, Lease>,
    pub refused: BTreeMap<String, Refused>,
}

/// Decides which of `leases` (the datastore's, by node) to believe; see the module docs. `own`
/// is always admitted as it is (the datastore's record of this node is never read back);
/// `owners`: the datastore's ownership records (`None`: it keeps none); `before`: the leases
/// admitted last time, whose CIDRs, unchanged, win over a newcomer's.
pub fn admit(
    leases: &BTreeMap<String, Lease>,
    owners: Option<&BTreeMap<IpNetwork, String>>,
    own: &Lease,
    before: &BTreeMap<String, Lease>,
    bounds: &Bounds,
) -> Verdict {
    let mut taken = Taken::default();
    for c in &own.pod_cidrs {
        taken.insert(c, &own.node);
    }
    let mut v = Verdict::default();
    v.admitted.insert(own.node.clone(), own.clone());
    let incumbent = |l: &Lease| before.get(&l.node).is_some_and(|b| b.pod_cidrs == l.pod_cidrs);
    let others = leases.values().filter(|l| l.node != own.node);
    let (first, then): (Vec<&Lease>, Vec<&Lease>) = others.partition(|l| incumbent(l));
    let first_count = first.len();
    for (i, l) in first.into_iter().chain(then).enumerate() {
        match check(l, owners, own, &taken, bounds) {
            Ok(()) => {
                for c in &l.pod_cidrs {
                    taken.insert(c, &l.node);
                }
                v.admitted.insert(l.node.clone(), l.clone());
            }
            Err((reason, detail)) => {
                // An incumbent whose ownership record was rewritten under it is refused, but
                // its CIDRs stay its own: whoever rewrote the record does not get them (the
                // owner notices and restores the record).
                if i < first_count && reason == Refusal::NotOwner {
                    for c in &l.pod_cidrs {
                        taken.insert(c, &l.node);
                    }
                }
                let refused = Refused {
                    lease: l.clone(),
                    reason,
                    detail,
                };
                v.refused.insert(l.node.clone(), refused);
            }
        }
    }
    v
}

/// One lease against the rules, given what is taken already.
fn check(
    l: &Lease,
    owners: Option<&BTreeMap<IpNetwork, String>>,
    own: &Lease,
    taken: &Taken,
    bounds: &Bounds,
) -> Result<(), (Refusal, String)> {
    let v4 = l.pod_cidrs.iter().filter(|c| c.is_ipv4()).count();
    if l.pod_cidrs.is_empty() || v4 > 1 || l.pod_cidrs.len() - v4 > 1 {
        return Err((
            Refusal::MalformedCidrs,
            format!("pod CIDRs {:?}: need one or two, at most one per family", l.pod_cidrs),
        ));
    }
    for c in &l.pod_cidrs {
        if c.ip() != c.network() {
            return Err((Refusal::MalformedCidrs, format!("pod CIDR {c} has host bits set")));
        }
        if !bounds.cluster.iter().any(|n| within(c, n)) {
            return Err((
                Refusal::OutsideCluster,
                format!("pod CIDR {c} is outside the cluster network {}", show(&bounds.cluster)),
            ));
        }
        if let Some(owners) = owners {
            let owner = owners.get(c).map_or("nobody", String::as_str);
            if owner != l.node {
                return Err((
                    Refusal::NotOwner,
                    format!("pod CIDR {c} is owned by {owner} in the datastore"),
                ));
            }
        }
        if overlaps(c, &bounds.underlay) {
            return Err((
                Refusal::OverlapsUnderlay,
                format!("pod CIDR {c} overlaps the underlay subnet {}", bounds.underlay),
            ));
        }
        if let Some(holder) = taken.holder(c) {
            return Err(if holder == own.node {
                (Refusal::OverlapsOwn, format!("pod CIDR {c} overlaps this node's own"))
            } else {
                (
                    Refusal::OverlapsPeer,
                    format!("pod CIDR {c} overlaps node {holder}'s, which holds it"),
                )
            });
        }
    }
    let ip = l.underlay_ip.to_canonical();
    if let Some(why) = bad_endpoint(ip, own.underlay_ip.to_canonical(), &bounds.cluster) {
        return Err((Refusal::BadEndpoint, format!("underlay address {ip} is {why}")));
    }
    let mac = match &l.backend {
        BackendData::Vxlan { vtep_mac, .. } => Some(vtep_mac.0),
        BackendData::Bgp { vtep_mac, .. } => vtep_mac.map(|m| m.0),
        BackendData::HostGw | BackendData::Ipip => None,
    };
    if let Some(m) = mac.filter(|m| m.0 == [0; 6] || m.0[0] & 1 == 1) {
        return Err((Refusal::BadVtepMac, format!("VTEP MAC {m} is not a unicast address")));
    }
    Ok(())
}

/// Why `ip` cannot be a tunnel endpoint, if it cannot.
fn bad_endpoint(ip: IpAddr, mine: IpAddr, cluster: &[IpNetwork]) -> Option<&'static str> {
    let bad = match ip {
        IpAddr::V4(a) => {
            a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() || a.is_link_local()
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
    };
    if bad {
        Some("not a unicast address another node can be reached at")
    } else if ip == mine {
        Some("this node's own")
    } else if cluster.iter().any(|n| n.contains(ip)) {
        Some("inside the cluster network")
    } else {
        None
    }
}

/// Whether `c` lies inside `n` (same family, at least as long).
fn within(c: &IpNetwork, n: &IpNetwork) -> bool {
    c.is_ipv4() == n.is_ipv4() && c.prefix() >= n.prefix() && n.contains(c.network())
}

/// Whether two networks share an address.
fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

fn show(nets: &[IpNetwork]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The ranges admitted so far, by (family, first address): overlap is found in log time.
#[derive(Default)]
struct Taken {
    ranges: BTreeMap<(bool, u128), (u128, String)>,
}

/// (is IPv6, first address, last address).
fn span(c: &IpNetwork) -> (bool, u128, u128) {
    match c {
        IpNetwork::V4(n) => (false, u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128),
        IpNetwork::V6(n) => {
            let first = u128::from(n.network());
            let host = u128::MAX.checked_shr(n.prefix() as u32).unwrap_or(0);
            (true, first, first | host)
        }
    }
}

impl Taken {
    fn insert(&mut self, c: &IpNetwork, node: &str) {
        let (v6, first, last) = span(c);
        self.ranges.insert((v6, first), (last, node.to_string()));
    }

    /// The node holding a range that overlaps `c`. The ranges held never overlap each other, so
    /// only the last one starting at or before `c` can reach into it, and any other overlapping
    /// one starts inside it.
    fn holder(&self, c: &IpNetwork) -> Option<&str> {
        let (v6, first, last) = span(c);
        let before = self.ranges.range(..=(v6, first)).next_back();
        if let Some(((f6, _), (end, node))) = before {
            if *f6 == v6 && *end >= first {
                return Some(node);
            }
        }
        self.ranges
            .range((v6, first)..=(v6, last))
            .next()
            .map(|(_, (_, n))| n.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::MacString;

    fn bounds() -> Bounds {
        Bounds {
            cluster: vec!["10.244.0.0/16".parse().unwrap(), "fd00:244::/56".parse().unwrap()],
            underlay: "192.168.0.1/24".parse().unwrap(),
        }
    }

    fn lease(node: &str, ip: &str, cidrs: &[&str]) -> Lease {
        Lease {
            node: node.into(),
            underlay_ip: ip.parse().unwrap(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            backend: BackendData::Vxlan {
                vtep_mac: MacString("02:00:00:00:00:02".parse().unwrap()),
                vni: 1,
            },
        }
    }

    fn own() -> Lease {
        lease("me", "192.168.0.1", &["10.244.1.0/24", "fd00:244:0:1::/64"])
    }

    fn by_node(ls: Vec<Lease>) -> BTreeMap<String, Lease> {
        ls.into_iter().map(|l| (l.node.clone(), l)).collect()
    }

    fn owners(pairs: &[(&str, &str)]) -> BTreeMap<IpNetwork, String> {
        pairs.iter().map(|(c, n)| (c.parse().unwrap(), n.to_string())).collect()
    }

    /// The reason `l` is refused alone (no owners, nothing admitted before), if it is.
    fn alone(l: Lease) -> Option<Refusal> {
        let v = admit(&by_node(vec![l.clone()]), None, &own(), &BTreeMap::new(), &bounds());
        v.refused.get(&l.node).map(|r| r.reason)
    }

    #[test]
    fn a_well_formed_lease_is_admitted_and_own_always() {
        let good = lease("b", "192.168.0.2", &["10.244.2.0/24", "fd00:244:0:2::/64"]);
        let forged_me = lease("me", "192.168.0.66", &["10.244.66.0/24"]);
        let v = admit(
            &by_node(vec![good.clone(), forged_me]),
            None,
            &own(),
            &BTreeMap::new(),
            &bounds(),
        );
        assert_eq!(v.admitted, by_node(vec![good, own()]));
        assert!(v.refused.is_empty(), "{:?}", v.refused);
    }

    #[test]
    fn every_lie_is_refused_with_its_reason() {
        use Refusal::*;
        let ip = "192.168.0.2";
        let cases = [
            (lease("b", ip, &[]), MalformedCidrs),
            (lease("b", ip, &["10.244.2.0/24", "10.244.3.0/24"]), MalformedCidrs),
            (lease("b", ip, &["10.244.2.1/24"]), MalformedCidrs),
            (lease("b", ip, &["8.0.0.0/5"]), OutsideCluster),
            (lease("b", ip, &["10.0.0.0/8"]), OutsideCluster),
            (lease("b", ip, &["fd00:1::/64"]), OutsideCluster),
            (lease("b", ip, &["10.244.1.128/25"]), OverlapsOwn),
            (lease("b", ip, &["10.244.0.0/23"]), OverlapsOwn),
            (lease("b", ip, &["fd00:244:0:1::/80"]), OverlapsOwn),
            (lease("b", "0.0.0.0", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "127.0.0.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "224.0.0.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "169.254.1.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "10.244.9.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "192.168.0.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "::ffff:127.0.0.1", &["10.244.2.0/24"]), BadEndpoint),
            (lease("b", "ff02::1", &["10.244.2.0/24"]), BadEndpoint),
        ];
        for (l, want) in cases {
            assert_eq!(alone(l.clone()), Some(want), "{l:?}");
        }
        for mac in ["00:00:00:00:00:00", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff"] {
            let mut l = lease("b", ip, &["10.244.2.0/24"]);
            l.backend = BackendData::Vxlan {
                vtep_mac: MacString(mac.parse().unwrap()),
                vni: 1,
            };
            assert_eq!(alone(l), Some(BadVtepMac), "{mac}");
        }
    }

    #[test]
    fn the_underlay_subnet_is_never_a_pod_cidr() {
        let b = Bounds {
            cluster: vec!["10.0.0.0/8".parse().unwrap()],
            underlay: "10.10.0.5/16".parse().unwrap(),
        };
        let own = lease("me", "10.10.0.5", &["10.244.1.0/24"]);
        for c in ["10.10.3.0/24", "10.8.0.0/13"] {
            let l = lease("b", "10.10.0.6", &[c]);
            let v = admit(&by_node(vec![l]), None, &own, &BTreeMap::new(), &b);
            assert_eq!(v.refused["b"].reason, Refusal::OverlapsUnderlay, "{c}");
        }
    }

    #[test]
    fn ownership_records_decide_and_the_incumbent_keeps_its_cidr() {
        let a = lease("a", "192.168.0.2", &["10.244.2.0/24"]);
        let thief = lease("thief", "192.168.0.9", &["10.244.2.0/24"]);
        let all = by_node(vec![a.clone(), thief.clone()]);
        let recs = owners(&[("10.244.2.0/24", "a")]);
        let v = admit(&all, Some(&recs), &own(), &BTreeMap::new(), &bounds());
        assert_eq!(v.admitted.get("a"), Some(&a));
        assert_eq!(v.refused["thief"].reason, Refusal::NotOwner);
        // The thief rewrote the ownership record too: a, admitted before, is refused for
        // ownership, and the thief still gets nothing.
        let recs = owners(&[("10.244.2.0/24", "thief")]);
        let v = admit(&all, Some(&recs), &own(), &v.admitted, &bounds());
        assert_eq!(v.refused["a"].reason, Refusal::NotOwner);
        assert_eq!(v.refused["thief"].reason, Refusal::OverlapsPeer);
        // A newcomer the records name gets it once nobody else holds it.
        let v = admit(
            &by_node(vec![thief.clone()]),
            Some(&recs),
            &own(),
            &BTreeMap::new(),
            &bounds(),
        );
        assert_eq!(v.admitted.get("thief"), Some(&thief));
        // Without records (kube), the incumbent wins over a newcomer whatever the names.
        let early = lease("zz", "192.168.0.3", &["10.244.3.0/24"]);
        let late = lease("aa", "192.168.0.4", &["10.244.3.0/25"]);
        let before = by_node(vec![early.clone()]);
        let v = admit(&by_node(vec![early.clone(), late]), None, &own(), &before, &bounds());
        assert_eq!(v.admitted.get("zz"), Some(&early));
        assert_eq!(v.refused["aa"].reason, Refusal::OverlapsPeer);
        assert!(v.refused["aa"].detail.contains("zz"), "{}", v.refused["aa"].detail);
        // A CIDR nobody owns is not anyone's.
        let v = admit(
            &by_node(vec![a]),
            Some(&BTreeMap::new()),
            &own(),
            &BTreeMap::new(),
            &bounds(),
        );
        assert!(v.refused["a"].detail.contains("nobody"));
    }

    #[test]
    fn overlap_is_found_whichever_range_is_larger() {
        let mut t = Taken::default();
        t.insert(&"10.244.4.0/24".parse().unwrap(), "x");
        t.insert(&"fd00:244:0:4::/64".parse().unwrap(), "y");
        for (c, holder) in [
            ("10.244.4.128/25", Some("x")),
            ("10.244.0.0/16", Some("x")),
            ("10.244.5.0/24", None),
            ("10.244.3.0/24", None),
            ("fd00:244::/56", Some("y")),
            ("fd00:244:0:5::/64", None),
            ("::/0", Some("y")),
        ] {
            assert_eq!(t.holder(&c.parse().unwrap()), holder, "{c}");
        }
    }
}
