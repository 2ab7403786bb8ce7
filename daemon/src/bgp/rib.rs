//! What the peers told us (one Adj-RIB-In per peer, after import policy), the routes kept
//! stale for graceful restart, and the best route per prefix that the rest of the daemon sees.
//!
//! Best route, in order: a fresh route over a stale one; the higher LOCAL_PREF; the shorter
//! AS_PATH; eBGP over iBGP; the shorter CLUSTER_LIST (RFC 4456 §9); the lower peer address (so
//! that every run picks the same one).
//! Except that the route in use stays in use when its peer restarts (RFC 4724 §4.2: the
//! receiving speaker retains the forwarding state): stale, until the peer announces it again
//! (then the usual order decides), withdraws it, or its stale routes go (End-of-RIB without
//! it, the peer's restart time or the stale-path time over). Moving to another peer's path
//! meanwhile would move every route twice for nothing.
//! Prefixes this node exports itself are never in the result: a peer cannot take over this
//! node's own pod CIDR.

use super::wire::{AsPath, Family};
use super::LearnedRoute;
use ipnetwork::IpNetwork;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use tokio::time::Instant;

/// A route as a peer gave it, after import policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Path {
    pub next_hop: IpAddr,
    pub local_pref: u32,
    pub as_path_len: u32,
    pub ebgp: bool,
    /// What a route reflector passes on unchanged (RFC 4456 §8).
    pub attrs: PathAttrs,
}

/// The attributes of a learned route that only reflection needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathAttrs {
    pub origin: u8,
    pub as_path: AsPath,
    pub med: Option<u32>,
    /// The route's ORIGINATOR_ID, or the identifier of the peer it came from when it had none
    /// (what a reflector sets, RFC 4456 §8).
    pub originator_id: Ipv4Addr,
    pub cluster_list: Vec<u32>,
}

impl Default for PathAttrs {
    fn default() -> PathAttrs {
        PathAttrs {
            origin: 0,
            as_path: AsPath::default(),
            med: None,
            originator_id: Ipv4Addr::UNSPECIFIED,
            cluster_list: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    path: Path,
    stale: bool,
}

#[derive(Default)]
struct PeerState {
    prefixes: BTreeSet<IpNetwork>,
    /// Families with stale routes, and when those go.
    stale: BTreeMap<Family, Instant>,
}

#[derive(Default)]
pub struct Rib {
    by_prefix: BTreeMap<IpNetwork, BTreeMap<IpAddr, Entry>>,
    peers: HashMap<IpAddr, PeerState>,
    own: BTreeSet<IpNetwork>,
    best: BTreeMap<IpNetwork, LearnedRoute>,
    /// The path of each best route (a reflector passes it on).
    best_paths: BTreeMap<IpNetwork, Path>,
    changed: bool,
    /// A best route's path changed (its attributes, not only next hop or peer).
    paths_changed: bool,
}

impl Rib {
    pub fn announce(&mut self, peer: IpAddr, prefix: IpNetwork, path: Path) {
        self.by_prefix
            .entry(prefix)
            .or_default()
            .insert(peer, Entry { path, stale: false });
        self.peers.entry(peer).or_default().prefixes.insert(prefix);
        self.select(prefix);
    }

    pub fn withdraw(&mut self, peer: IpAddr, prefix: IpNetwork) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.prefixes.remove(&prefix) {
            if let Some(paths) = self.by_prefix.get_mut(&prefix) {
                paths.remove(&peer);
                if paths.is_empty() {
                    self.by_prefix.remove(&prefix);
                }
            }
            self.select(prefix);
        }
    }

    /// The peer's session went down. Routes of the families in `retain` are kept, marked stale,
    /// until `until` (graceful restart); the others go now.
    pub fn peer_down(&mut self, peer: IpAddr, retain: &[Family], until: Instant) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        for f in retain {
            state.stale.insert(*f, until);
        }
        let prefixes: Vec<IpNetwork> = state.prefixes.iter().copied().collect();
        for prefix in prefixes {
            if retain.contains(&Family::of(&prefix)) {
                if let Some(e) = self.by_prefix.get_mut(&prefix).and_then(|m| m.get_mut(&peer)) {
                    e.stale = true;
                }
                self.select(prefix);
            } else {
                self.withdraw(peer, prefix);
            }
        }
    }

    /// The peer's session is back. Its stale routes of the families in `keep` (the peer kept
    /// their forwarding state) stay until its End-of-RIB or `until`; the others go now.
    pub fn peer_up(&mut self, peer: IpAddr, keep: &[Family], until: Instant) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let families: Vec<Family> = state.stale.keys().copied().collect();
        for f in families {
            if keep.contains(&f) {
                self.peers.get_mut(&peer).expect("present").stale.insert(f, until);
            } else {
                self.drop_stale(peer, f);
            }
        }
    }

    /// End-of-RIB from the peer: what it did not send again is gone.
    pub fn end_of_rib(&mut self, peer: IpAddr, family: Family) {
        self.drop_stale(peer, family);
    }

    pub fn remove_peer(&mut self, peer: IpAddr) {
        if let Some(state) = self.peers.remove(&peer) {
            for prefix in state.prefixes {
                if let Some(paths) = self.by_prefix.get_mut(&prefix) {
                    paths.remove(&peer);
                    if paths.is_empty() {
                        self.by_prefix.remove(&prefix);
                    }
                }
                self.select(prefix);
            }
        }
    }

    /// When the next stale routes expire.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.peers.values().flat_map(|s| s.stale.values()).min().copied()
    }

    /// Drops the stale routes whose time is up.
    pub fn expire(&mut self, now: Instant) {
        let due: Vec<(IpAddr, Family)> = self
            .peers
            .iter()
            .flat_map(|(p, s)| s.stale.iter().filter(|(_, t)| **t <= now).map(|(f, _)| (*p, *f)))
            .collect();
        for (peer, family) in due {
            tracing::info!(%peer, ?family, "graceful restart: stale routes expired");
            self.drop_stale(peer, family);
        }
    }

    /// The prefixes this node exports: never learned.
    pub fn set_own(&mut self, own: BTreeSet<IpNetwork>) {
        let touched: Vec<IpNetwork> = own.symmetric_difference(&self.own).copied().collect();
        self.own = own;
        for prefix in touched {
            self.select(prefix);
        }
    }

    pub fn best(&self) -> &BTreeMap<IpNetwork, LearnedRoute> {
        &self.best
    }

    /// The path of the best route to each prefix.
    pub fn best_paths(&self) -> &BTreeMap<IpNetwork, Path> {
        &self.best_paths
    }

    /// Whether the best routes changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether the best routes or their paths' attributes changed since the last call.
    pub fn take_paths_changed(&mut self) -> bool {
        std::mem::take(&mut self.paths_changed)
    }

    fn drop_stale(&mut self, peer: IpAddr, family: Family) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.stale.remove(&family);
        let stale: Vec<IpNetwork> = state
            .prefixes
            .iter()
            .filter(|p| Family::of(p) == family)
            .filter(|p| {
                self.by_prefix
                    .get(p)
                    .and_then(|m| m.get(&peer))
                    .is_some_and(|e| e.stale)
            })
            .copied()
            .collect();
        for prefix in stale {
            self.withdraw(peer, prefix);
        }
    }

    fn select(&mut self, prefix: IpNetwork) {
        let best = if self.own.contains(&prefix) {
            None
        } else {
            self.by_prefix.get(&prefix).and_then(|paths| {
                // The route in use, gone stale: its peer is restarting; it stays in use.
                let kept = self
                    .best
                    .get(&prefix)
                    .and_then(|r| paths.get_key_value(&r.peer))
                    .filter(|(_, e)| e.stale);
                kept.or_else(|| {
                    paths.iter().max_by_key(|(peer, e)| {
                        let p = &e.path;
                        (
                            !e.stale,
                            p.local_pref,
                            Reverse(p.as_path_len),
                            p.ebgp,
                            Reverse(p.attrs.cluster_list.len()),
                            Reverse(**peer),
                        )
                    })
                })
                .map(|(peer, e)| {
                    let r = LearnedRoute {
                        prefix,
                        next_hop: e.path.next_hop,
                        peer: *peer,
                        stale: e.stale,
                    };
                    (r, e.path.clone())
                })
            })
        };
        let (best, path) = best.unzip();
        let old = match &best {
            Some(r) => self.best.insert(prefix, r.clone()),
            None => self.best.remove(&prefix),
        };
        if old != best {
            self.changed = true;
            self.paths_changed = true;
        }
        let old_path = match &path {
            Some(p) => self.best_paths.insert(prefix, p.clone()),
            None => self.best_paths.remove(&prefix),
        };
        if old_path != path {
            self.paths_changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }
    fn path(nh: &str, local_pref: u32, as_path_len: u32) -> Path {
        Path {
            next_hop: ip(nh),
            local_pref,
            as_path_len,
            ebgp: false,
            attrs: PathAttrs::default(),
        }
    }

    #[test]
    fn best_route_selection() {
        let mut rib = Rib::default();
        let p = net("10.244.1.0/24");
        rib.announce(ip("10.0.0.2"), p, path("10.0.0.2", 100, 1));
        assert!(rib.take_changed());
        rib.announce(ip("10.0.0.1"), p, path("10.0.0.1", 100, 1));
        assert_eq!(rib.best()[&p].peer, ip("10.0.0.1"), "ties go to the lower address");
        rib.announce(ip("10.0.0.3"), p, path("10.0.0.3", 100, 0));
        assert_eq!(rib.best()[&p].peer, ip("10.0.0.3"), "shorter AS path");
        rib.announce(ip("10.0.0.2"), p, path("10.0.0.2", 200, 3));
        assert_eq!(rib.best()[&p].next_hop, ip("10.0.0.2"), "higher LOCAL_PREF");
        rib.withdraw(ip("10.0.0.2"), p);
        assert_eq!(rib.best()[&p].peer, ip("10.0.0.3"));
        rib.remove_peer(ip("10.0.0.3"));
        rib.remove_peer(ip("10.0.0.1"));
        assert!(rib.best().is_empty());
        assert!(rib.take_changed());
        assert!(!rib.take_changed());
    }

    #[test]
    fn own_prefixes_are_never_learned() {
        let mut rib = Rib::default();
        let p = net("10.244.1.0/24");
        rib.announce(ip("10.0.0.2"), p, path("10.0.0.2", 100, 0));
        rib.set_own([p].into());
        assert!(rib.best().is_empty());
        rib.set_own(BTreeSet::new());
        assert_eq!(rib.best().len(), 1);
    }

    #[test]
    fn graceful_restart_keeps_stale_routes_until_end_of_rib() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(120);
        let peer = ip("10.0.0.2");
        let (a, b, v6) = (net("10.244.1.0/24"), net("10.244.2.0/24"), net("fd00:244:1::/64"));
        let mut rib = Rib::default();
        for p in [a, b, v6] {
            rib.announce(peer, p, path("10.0.0.2", 100, 0));
        }
        // Down: IPv4 kept stale, IPv6 (not in the peer's capability) gone.
        rib.peer_down(peer, &[Family::Ipv4Unicast], later);
        assert_eq!(rib.best().keys().copied().collect::<Vec<_>>(), [a, b]);
        assert!(rib.best().values().all(|r| r.stale));
        assert_eq!(rib.next_expiry(), Some(later));
        // Back, forwarding state kept: a refreshed, b still stale until End-of-RIB.
        rib.peer_up(peer, &[Family::Ipv4Unicast], later);
        rib.announce(peer, a, path("10.0.0.2", 100, 0));
        assert!(!rib.best()[&a].stale && rib.best()[&b].stale);
        rib.end_of_rib(peer, Family::Ipv4Unicast);
        assert_eq!(rib.best().keys().copied().collect::<Vec<_>>(), [a]);
        assert_eq!(rib.next_expiry(), None);
    }

    #[test]
    fn stale_routes_expire_or_go_when_the_peer_kept_nothing() {
        let t0 = Instant::now();
        let peer = ip("10.0.0.2");
        let mut rib = Rib::default();
        rib.announce(peer, net("10.244.1.0/24"), path("10.0.0.2", 100, 0));
        rib.peer_down(peer, &[Family::Ipv4Unicast], t0 + Duration::from_secs(5));
        rib.expire(t0 + Duration::from_secs(4));
        assert_eq!(rib.best().len(), 1);
        rib.expire(t0 + Duration::from_secs(5));
        assert!(rib.best().is_empty());

        rib.announce(peer, net("10.244.1.0/24"), path("10.0.0.2", 100, 0));
        rib.peer_down(peer, &[Family::Ipv4Unicast], t0 + Duration::from_secs(5));
        rib.peer_up(peer, &[], t0 + Duration::from_secs(5));
        assert!(
            rib.best().is_empty(),
            "no forwarding state kept: stale routes go at once"
        );
    }

    #[test]
    fn a_fresh_route_beats_a_stale_one_not_in_use() {
        let t0 = Instant::now();
        let p = net("10.244.1.0/24");
        let mut rib = Rib::default();
        rib.announce(ip("10.0.0.1"), p, path("10.0.0.1", 300, 0));
        rib.announce(ip("10.0.0.2"), p, path("10.0.0.2", 200, 0));
        rib.announce(ip("10.0.0.3"), p, path("10.0.0.3", 100, 0));
        rib.peer_down(ip("10.0.0.2"), &[Family::Ipv4Unicast], t0 + Duration::from_secs(60));
        assert_eq!(rib.best()[&p].peer, ip("10.0.0.1"));
        rib.withdraw(ip("10.0.0.1"), p);
        assert_eq!(
            rib.best()[&p].peer,
            ip("10.0.0.3"),
            "fresh over stale, whatever LOCAL_PREF"
        );
    }

    /// RFC 4724 §4.2: the receiving speaker keeps the restarting peer's routes and goes on
    /// forwarding along them; the other peer's equal path does not take over meanwhile.
    #[test]
    fn the_route_in_use_stays_while_its_peer_restarts() {
        let t0 = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let p = net("10.244.1.0/24");
        let mut rib = Rib::default();
        rib.announce(a, p, path("10.0.0.1", 100, 0));
        rib.announce(b, p, path("10.0.0.2", 100, 0));
        assert_eq!(rib.best()[&p].peer, a);
        rib.take_changed();

        rib.peer_down(a, &[Family::Ipv4Unicast], t0 + Duration::from_secs(120));
        assert_eq!((rib.best()[&p].peer, rib.best()[&p].stale), (a, true));
        rib.withdraw(b, p);
        rib.announce(b, p, path("10.0.0.2", 100, 0));
        assert_eq!(rib.best()[&p].peer, a, "changes of the other path do not move it");
        rib.peer_up(a, &[Family::Ipv4Unicast], t0 + Duration::from_secs(240));
        rib.announce(a, p, path("10.0.0.1", 100, 0));
        rib.end_of_rib(a, Family::Ipv4Unicast);
        assert_eq!((rib.best()[&p].peer, rib.best()[&p].stale), (a, false));

        // Not announced again: at End-of-RIB the other path takes over; likewise when the
        // stale time is over.
        rib.peer_down(a, &[Family::Ipv4Unicast], t0 + Duration::from_secs(120));
        rib.peer_up(a, &[Family::Ipv4Unicast], t0 + Duration::from_secs(240));
        assert_eq!(rib.best()[&p].peer, a);
        rib.end_of_rib(a, Family::Ipv4Unicast);
        assert_eq!((rib.best()[&p].peer, rib.best()[&p].stale), (b, false));
        rib.announce(a, p, path("10.0.0.1", 100, 0));
        rib.peer_down(a, &[Family::Ipv4Unicast], t0 + Duration::from_secs(120));
        rib.expire(t0 + Duration::from_secs(120));
        assert_eq!(rib.best()[&p].peer, b);
    }

    /// RFC 4456 §9: the shorter CLUSTER_LIST wins a tie; a change of attributes alone (same
    /// next hop, same peer) is a change of the paths a reflector passes on.
    #[test]
    fn shorter_cluster_list_wins_and_attribute_changes_are_seen() {
        let p = net("10.244.3.0/24");
        let mut rib = Rib::default();
        let mut long = path("10.0.0.3", 100, 0);
        long.attrs.cluster_list = vec![1, 2];
        let mut short = path("10.0.0.3", 100, 0);
        short.attrs.cluster_list = vec![1];
        rib.announce(ip("10.0.0.1"), p, long.clone());
        rib.announce(ip("10.0.0.2"), p, short.clone());
        assert_eq!(rib.best()[&p].peer, ip("10.0.0.2"));
        assert!(rib.take_changed() && rib.take_paths_changed());
        let mut again = short.clone();
        again.attrs.originator_id = "10.0.0.3".parse().unwrap();
        rib.announce(ip("10.0.0.2"), p, again.clone());
        assert!(!rib.take_changed(), "the route is the same");
        assert!(rib.take_paths_changed(), "its attributes are not");
        assert_eq!(rib.best_paths()[&p], again);
    }
}
