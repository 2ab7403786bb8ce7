//! Routes by kernel nexthop object: each desired route's gateway and device become a nexthop
//! object of ours, and the route names it (`10.244.2.0/24 nhid 1962934273`).
//!
//! # Why
//!
//! A route with its own gateway gets a `fib_info` of its own, which the kernel dedups by
//! scanning a hash chain that every such route shares (same device, protocol, metric): at
//! 10,000 remote nodes each insert costs about 130 µs and the whole table about 1.4 s. A route
//! that names a nexthop object hashes by the object's ID, and the same 10,000 routes go in in
//! about 0.2 s (bench/src/bin/convergence.rs prints both, next to `ip -batch`).
//!
//! # How
//!
//! The backends still say what they want as plain routes (gateway, device, onlink): they stay
//! pure and know nothing of this. [`assign`] turns them into routes by nexthop ID and the
//! nexthop objects those need:
//!
//! - a nexthop is identified by what it does, its [`Key`] (family, gateway, device, onlink),
//!   so routes that go the same way share one (in BGP mode, the CIDRs of one node);
//! - ours carry [`TRELLISD_PROTO`] and an ID in [`ID_RANGE`]; the ones the kernel holds are
//!   adopted by key, so a restarted daemon reuses them and changes nothing;
//! - a new one gets the lowest free ID of the range, free meaning unused by *anyone* (IDs are
//!   one space per namespace, shared with FRR and others): it is added without replace, so an
//!   ID someone takes between our dump and our add is never overwritten;
//! - ours that no route wants any more are deleted, after the routes moved off them (deleting
//!   a nexthop deletes the routes using it).
//!
//! Kernels before 5.3 have no nexthop objects: the reconciler then programs the plain routes as
//! they are (see `Dataplane::new`).

use crate::backend::TRELLISD_PROTO;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Range;
use trellis_net::{IpFamily, Nexthop, Route};

/// The nexthop IDs trellisd uses: `117 << 24` on, after its route protocol. Far above the IDs
/// FRR's zebra hands out (below `1 << 28`), and recognisable in `ip nexthop` output.
pub const ID_RANGE: Range<u32> = (TRELLISD_PROTO as u32) << 24..(TRELLISD_PROTO as u32 + 1) << 24;

/// What a nexthop does: the part of a route that a nexthop object takes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    family: IpFamily,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    onlink: bool,
}

impl Key {
    /// The way `route` goes; `None` for a route no nexthop object can carry (neither gateway
    /// nor device: a blackhole, say), which stays a plain route.
    pub fn of_route(route: &Route) -> Option<Key> {
        (route.gateway.is_some() || route.oif.is_some()).then(|| Key {
            family: route.family(),
            gateway: route.gateway,
            oif: route.oif,
            onlink: route.onlink,
        })
    }

    /// What a plain nexthop does; `None` for groups and blackholes.
    pub fn of_nexthop(nh: &Nexthop) -> Option<Key> {
        if !nh.group.is_empty() || nh.blackhole {
            return None;
        }
        Some(Key {
            family: nh.family?,
            gateway: nh.gateway,
            oif: nh.oif,
            onlink: nh.onlink,
        })
    }

    pub fn nexthop(&self, id: u32) -> Nexthop {
        let mut nh = Nexthop::new(id, self.family).protocol(TRELLISD_PROTO);
        nh.gateway = self.gateway;
        nh.oif = self.oif;
        nh.onlink = self.onlink;
        nh
    }
}

/// Whether a nexthop the kernel holds is one of ours.
pub fn is_ours(nh: &Nexthop) -> bool {
    nh.protocol == Some(TRELLISD_PROTO) && ID_RANGE.contains(&nh.id)
}

/// The routes to program, and the changes to our nexthop objects they need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// The desired routes, each with its nexthop ID (gateway and device kept, for the log);
    /// as they are with plain routes.
    pub routes: BTreeMap<IpNetwork, Route>,
    /// Nexthops to add (new IDs, free when the kernel was read).
    pub add: Vec<Nexthop>,
    /// Our nexthops no route wants (and duplicates): delete after the routes are in place.
    pub del: Vec<u32>,
}

/// Gives every desired route a nexthop of ours: the one the kernel holds for its [`Key`], or a
/// new one. `ours` are the nexthops of ours the kernel holds, `taken` every ID in use (ours
/// included).
pub fn assign(desired: &BTreeMap<IpNetwork, Route>, ours: &[Nexthop], taken: &BTreeSet<u32>) -> Assignment {
    let mut by_key: HashMap<Key, u32> = HashMap::with_capacity(ours.len());
    let mut out = Assignment::default();
    for nh in ours {
        match Key::of_nexthop(nh) {
            Some(key) if !by_key.contains_key(&key) => {
                by_key.insert(key, nh.id);
            }
            // A second one that does the same (a crash between add and delete), or one that is
            // not a plain nexthop: not used.
            _ => out.del.push(nh.id),
        }
    }
    let mut free = ID_RANGE.filter(|id| !taken.contains(id));
    let mut used = BTreeSet::new();
    for (dst, route) in desired {
        let mut route = route.clone();
        if let Some(key) = Key::of_route(&route) {
            let id = match by_key.get(&key) {
                Some(id) => *id,
                None => {
                    let Some(id) = free.next() else {
                        // 16 million IDs in use: leave the route plain rather than fail it.
                        out.routes.insert(*dst, route);
                        continue;
                    };
                    by_key.insert(key, id);
                    out.add.push(key.nexthop(id));
                    id
                }
            };
            used.insert(id);
            route.nexthop_id = Some(id);
        }
        out.routes.insert(*dst, route);
    }
    out.del.extend(by_key.values().filter(|id| !used.contains(id)));
    out.del.sort_unstable();
    out.del.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::tests::route;

    fn desired(routes: &[Route]) -> BTreeMap<IpNetwork, Route> {
        routes.iter().map(|r| (r.destination, r.clone())).collect()
    }

    const FIRST: u32 = ID_RANGE.start;

    #[test]
    fn new_routes_get_new_nexthops_from_the_free_ids_of_our_range() {
        let want = desired(&[
            route("10.244.2.0/24", "10.244.2.0", 7),
            route("10.244.3.0/24", "10.244.3.0", 7),
            route("fd00:2::/64", "fd00:2::", 7),
        ]);
        // Someone else holds our first ID already.
        let a = assign(&want, &[], &[FIRST, 5].into());
        assert_eq!(
            a.add.iter().map(|n| n.id).collect::<Vec<_>>(),
            [FIRST + 1, FIRST + 2, FIRST + 3]
        );
        assert!(a.add.iter().all(is_ours));
        let r = &a.routes[&"10.244.3.0/24".parse().unwrap()];
        assert_eq!(r.nexthop_id, Some(FIRST + 2));
        let nh = a.add.iter().find(|n| n.id == FIRST + 2).unwrap();
        assert_eq!(
            (nh.gateway, nh.oif, nh.onlink, nh.family),
            (r.gateway, Some(7), true, Some(IpFamily::V4))
        );
        assert!(a.del.is_empty());
    }

    #[test]
    fn the_kernels_nexthops_are_adopted_and_the_unwanted_deleted() {
        let want = desired(&[
            route("10.244.2.0/24", "10.244.2.0", 7),
            // Moved to another VTEP address: a new nexthop, the old one goes.
            route("10.244.3.0/24", "10.244.3.9", 7),
        ]);
        let held = |id, via: &str| Key::of_route(&route("10.0.0.0/8", via, 7)).unwrap().nexthop(id);
        let ours = [
            held(FIRST + 4, "10.244.2.0"),
            held(FIRST + 5, "10.244.3.0"),
            // A duplicate of FIRST + 4 (a crash between an add and a delete).
            held(FIRST + 6, "10.244.2.0"),
        ];
        let taken = ours.iter().map(|n| n.id).collect();
        let a = assign(&want, &ours, &taken);
        assert_eq!(
            a.routes[&"10.244.2.0/24".parse().unwrap()].nexthop_id,
            Some(FIRST + 4),
            "adopted"
        );
        assert_eq!(a.add.iter().map(|n| n.id).collect::<Vec<_>>(), [FIRST]);
        assert_eq!(a.del, [FIRST + 5, FIRST + 6]);
    }

    #[test]
    fn routes_that_go_the_same_way_share_one_nexthop() {
        // BGP: one node announces two CIDRs with its underlay address as next hop.
        let mut a = route("10.244.2.0/24", "192.168.0.12", 2);
        let mut b = route("10.245.2.0/24", "192.168.0.12", 2);
        a.onlink = false;
        b.onlink = false;
        let got = assign(&desired(&[a, b]), &[], &BTreeSet::new());
        assert_eq!(got.add.len(), 1);
        assert!(got.routes.values().all(|r| r.nexthop_id == Some(FIRST)));
    }

    #[test]
    fn nothing_changes_when_the_kernel_holds_what_is_wanted() {
        let want = desired(&[route("10.244.2.0/24", "10.244.2.0", 7)]);
        let first = assign(&want, &[], &BTreeSet::new());
        let again = assign(&want, &first.add, &first.add.iter().map(|n| n.id).collect());
        assert_eq!((again.add.len(), again.del.len()), (0, 0));
        assert_eq!(again.routes, first.routes);
    }
}
