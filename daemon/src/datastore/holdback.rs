//! Holding back lease removals after a datastore stall: a bulk expiry is not evidence that
//! nodes died.
//!
//! Why: etcd expires leases by its own clock. A hung etcd (SIGSTOP, a disk stall, a paused VM)
//! that resumes after more than the TTL expires every lease at once, the live nodes' included;
//! each node re-registers as soon as it gets through, but its peers, told that it is gone,
//! remove its routes meanwhile (57–66 of 1,176 pings lost, up to 4.4 s per flow, before this).
//! So after a gap in what the datastore told us (a reconnect after a failure), removals are
//! held for a grace period: the leases stay as they were, a node that re-registers meanwhile
//! cancels its removal, and when the period ends the datastore's word is taken again from a
//! fresh listing, which removes whoever is still gone. A node that really died in the stall
//! keeps its routes for the grace period longer: traffic to it was lost anyway.
//!
//! [`Holdback`] is pure (no clock of its own, no I/O): the datastore opens it after a gap, passes
//! every event through it, and closes it at [`Holdback::due`] before sending a fresh snapshot.

use super::Event;
use crate::lease::Lease;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use tokio::time::Instant;

/// What the receiver was told, and the removals held back from it.
#[derive(Debug, Default)]
pub struct Holdback {
    /// The leases and ownership records as the receiver knows them (held removals included).
    leases: BTreeMap<String, Lease>,
    owners: BTreeMap<IpNetwork, String>,
    /// While open: until when removals are held.
    until: Option<Instant>,
    held_nodes: BTreeSet<String>,
    held_cidrs: BTreeSet<IpNetwork>,
}

impl Holdback {
    /// After a gap: hold removals until `until` (a later one if already open).
    pub fn open(&mut self, until: Instant) {
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// When the grace period ends, while one is open.
    pub fn due(&self) -> Option<Instant> {
        self.until
    }

    /// Node removals held back now.
    pub fn held(&self) -> usize {
        self.held_nodes.len()
    }

    /// Ends the grace period: returns the nodes whose removal was still held. The caller then
    /// passes a fresh snapshot, which the receiver takes as it is.
    pub fn close(&mut self) -> BTreeSet<String> {
        self.until = None;
        self.held_cidrs.clear();
        std::mem::take(&mut self.held_nodes)
    }

    /// The event to send for `ev`, if any: while open, a removal of something the receiver
    /// knows is held (`None`) and a snapshot keeps what it lacks; anything written cancels a
    /// held removal of it.
    pub fn pass(&mut self, ev: Event) -> Option<Event> {
        let open = self.until.is_some();
        match ev {
            Event::Snapshot(all) => {
                let fresh: BTreeMap<String, Lease> = all.into_iter().map(|l| (l.node.clone(), l)).collect();
                self.held_nodes.retain(|n| !fresh.contains_key(n));
                let mut keep = BTreeMap::new();
                if open {
                    for (n, l) in std::mem::take(&mut self.leases) {
                        if !fresh.contains_key(&n) {
                            self.held_nodes.insert(n.clone());
                            keep.insert(n, l);
                        }
                    }
                }
                keep.extend(fresh);
                self.leases = keep;
                Some(Event::Snapshot(self.leases.values().cloned().collect()))
            }
            Event::Owners(all) => {
                self.held_cidrs.retain(|c| !all.contains_key(c));
                let mut keep = BTreeMap::new();
                if open {
                    for (c, n) in std::mem::take(&mut self.owners) {
                        if !all.contains_key(&c) {
                            self.held_cidrs.insert(c);
                            keep.insert(c, n);
                        }
                    }
                }
                keep.extend(all);
                self.owners = keep;
                Some(Event::Owners(self.owners.clone()))
            }
            Event::Upsert(l) => {
                self.held_nodes.remove(&l.node);
                self.leases.insert(l.node.clone(), l.clone());
                Some(Event::Upsert(l))
            }
            Event::Remove(n) if open && self.leases.contains_key(&n) => {
                self.held_nodes.insert(n);
                None
            }
            Event::Remove(n) => {
                self.leases.remove(&n);
                Some(Event::Remove(n))
            }
            Event::Owner { cidr, node: Some(n) } => {
                self.held_cidrs.remove(&cidr);
                self.owners.insert(cidr, n.clone());
                Some(Event::Owner { cidr, node: Some(n) })
            }
            Event::Owner { cidr, node: None } if open && self.owners.contains_key(&cidr) => {
                self.held_cidrs.insert(cidr);
                None
            }
            Event::Owner { cidr, node: None } => {
                self.owners.remove(&cidr);
                Some(Event::Owner { cidr, node: None })
            }
            ev @ Event::Lost(_) => Some(ev),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::BackendData;
    use std::time::Duration;

    fn lease(node: &str, i: u8) -> Lease {
        Lease {
            node: node.into(),
            underlay_ip: format!("192.168.1.{i}").parse().unwrap(),
            pod_cidrs: vec![cidr(i)],
            backend: BackendData::HostGw,
        }
    }

    fn cidr(i: u8) -> IpNetwork {
        format!("10.244.{i}.0/24").parse().unwrap()
    }

    fn owners(of: &[(u8, &str)]) -> BTreeMap<IpNetwork, String> {
        of.iter().map(|(i, n)| (cidr(*i), n.to_string())).collect()
    }

    fn nodes(ev: Option<Event>) -> Vec<String> {
        match ev {
            Some(Event::Snapshot(all)) => all.into_iter().map(|l| l.node).collect(),
            ev => panic!("not a snapshot: {ev:?}"),
        }
    }

    #[test]
    fn closed_it_passes_everything() {
        let mut h = Holdback::default();
        assert_eq!(
            nodes(h.pass(Event::Snapshot(vec![lease("a", 1), lease("b", 2)]))),
            ["a", "b"]
        );
        assert_eq!(h.pass(Event::Remove("b".into())), Some(Event::Remove("b".into())));
        let gone = Event::Owner {
            cidr: cidr(2),
            node: None,
        };
        assert_eq!(h.pass(gone.clone()), Some(gone));
        assert_eq!(nodes(h.pass(Event::Snapshot(vec![lease("a", 1)]))), ["a"]);
        assert_eq!(h.held(), 0);
    }

    #[test]
    fn after_a_gap_removals_wait_and_a_return_cancels_them() {
        let mut h = Holdback::default();
        h.pass(Event::Snapshot(vec![lease("a", 1), lease("b", 2), lease("c", 3)]));
        h.pass(Event::Owners(owners(&[(1, "a"), (2, "b"), (3, "c")])));
        h.open(Instant::now() + Duration::from_secs(10));
        // The first listing after the stall: every lease expired but a's, which re-registered.
        assert_eq!(nodes(h.pass(Event::Snapshot(vec![lease("a", 1)]))), ["a", "b", "c"]);
        match h.pass(Event::Owners(owners(&[(1, "a")]))) {
            Some(Event::Owners(o)) => assert_eq!(o, owners(&[(1, "a"), (2, "b"), (3, "c")])),
            ev => panic!("{ev:?}"),
        }
        assert_eq!(h.held(), 2);
        // Removals seen on the watch are held as well; b comes back.
        assert_eq!(h.pass(Event::Remove("b".into())), None);
        let owner_gone = Event::Owner {
            cidr: cidr(2),
            node: None,
        };
        assert_eq!(h.pass(owner_gone), None);
        assert!(h.pass(Event::Upsert(lease("b", 2))).is_some());
        assert_eq!(h.held(), 1);
        // A removal of something never told passes (nothing to hold).
        assert!(h.pass(Event::Remove("zz".into())).is_some());
        // The period ends: c is still held; the fresh listing decides.
        assert_eq!(h.close().into_iter().collect::<Vec<_>>(), ["c"]);
        assert_eq!(
            nodes(h.pass(Event::Snapshot(vec![lease("a", 1), lease("b", 2)]))),
            ["a", "b"]
        );
        assert_eq!(h.due(), None);
    }

    #[test]
    fn a_second_gap_extends_the_period() {
        let mut h = Holdback::default();
        let t = Instant::now();
        h.open(t + Duration::from_secs(10));
        h.open(t + Duration::from_secs(5));
        assert_eq!(h.due(), Some(t + Duration::from_secs(10)));
        h.open(t + Duration::from_secs(12));
        assert_eq!(h.due(), Some(t + Duration::from_secs(12)));
    }
}
