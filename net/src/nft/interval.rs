//! Addresses and prefixes as the kernel's sets hold them: an address is a key of 4 or 16
//! big-endian bytes; a prefix in an interval set is a start element and an end element whose
//! key is one past the last address (flagged INTERVAL_END), or no end element when the prefix
//! reaches the top of the address space.
//!
//! The kernel refuses overlapping intervals (EEXIST) and does not merge them; nft(8) merges in
//! user space and so do we: [`plan`] turns "make the set cover these prefixes" into the
//! elements to delete and to add, in one batch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub(super) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub(super) fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn max(self) -> u128 {
        low_mask(self.bits())
    }

    /// The set key of address `v` (big-endian, 4 or 16 bytes).
    pub(super) fn key(self, v: u128) -> Vec<u8> {
        match self {
            Family::V4 => (v as u32).to_be_bytes().to_vec(),
            Family::V6 => v.to_be_bytes().to_vec(),
        }
    }

    pub(super) fn parse_key(self, key: &[u8]) -> Option<u128> {
        match self {
            Family::V4 => Some(u32::from_be_bytes(key.try_into().ok()?) as u128),
            Family::V6 => Some(u128::from_be_bytes(key.try_into().ok()?)),
        }
    }

    pub(super) fn addr(self, v: u128) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
        }
    }
}

pub(super) fn addr_value(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The lowest `k` bits set.
fn low_mask(k: u32) -> u128 {
    if k >= 128 {
        u128::MAX
    } else {
        (1u128 << k) - 1
    }
}

/// Addresses `first..=last` of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Interval {
    pub(super) first: u128,
    pub(super) last: u128,
}

/// One element of an interval set: a start, or an end one past the last address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Bound {
    pub(super) key: u128,
    pub(super) end: bool,
}

impl Interval {
    /// The addresses of `net` (host bits ignored).
    pub(super) fn of(net: IpNetwork) -> (Family, Interval) {
        let fam = Family::of(net.ip());
        let host_bits = fam.bits() - u32::from(net.prefix());
        let first = addr_value(net.ip()) & !low_mask(host_bits);
        (
            fam,
            Interval {
                first,
                last: first | low_mask(host_bits),
            },
        )
    }

    fn overlaps(&self, o: &Interval) -> bool {
        self.first <= o.last && o.first <= self.last
    }

    fn covers(&self, o: &Interval) -> bool {
        self.first <= o.first && o.last <= self.last
    }

    fn union(&self, o: &Interval) -> Interval {
        Interval {
            first: self.first.min(o.first),
            last: self.last.max(o.last),
        }
    }

    /// The set elements of this interval.
    pub(super) fn bounds(&self, fam: Family) -> Vec<Bound> {
        let mut b = vec![Bound {
            key: self.first,
            end: false,
        }];
        if self.last < fam.max() {
            b.push(Bound {
                key: self.last + 1,
                end: true,
            });
        }
        b
    }

    /// The fewest prefixes that together are exactly this interval.
    pub(super) fn prefixes(&self, fam: Family) -> Vec<IpNetwork> {
        let mut out = Vec::new();
        let mut cur = self.first;
        loop {
            let mut k = cur.trailing_zeros().min(fam.bits());
            while cur | low_mask(k) > self.last {
                k -= 1;
            }
            let prefix = (fam.bits() - k) as u8;
            out.push(match fam.addr(cur) {
                IpAddr::V4(a) => IpNetwork::V4(Ipv4Network::new(a, prefix).expect("prefix <= 32")),
                IpAddr::V6(a) => IpNetwork::V6(Ipv6Network::new(a, prefix).expect("prefix <= 128")),
            });
            let block_last = cur | low_mask(k);
            if block_last >= self.last {
                return out;
            }
            cur = block_last + 1;
        }
    }

    /// For messages: `10.0.0.0/16`, or `a-b` when the interval is no single prefix.
    pub(super) fn describe(&self, fam: Family) -> String {
        match self.prefixes(fam).as_slice() {
            [one] => one.to_string(),
            _ => format!("{}-{}", fam.addr(self.first), fam.addr(self.last)),
        }
    }
}

/// Rebuilds the intervals of a set from its elements (in any order). Stray end elements
/// (nft(8) adds one at key 0) are ignored; a start without an end runs to the top.
pub(super) fn from_bounds(fam: Family, mut bounds: Vec<Bound>) -> Vec<Interval> {
    // At equal keys an end sorts first: it closes the interval before the adjacent one opens.
    bounds.sort_by_key(|b| (b.key, !b.end));
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for b in bounds {
        match (b.end, open) {
            (false, Some(first)) if b.key > first => {
                out.push(Interval { first, last: b.key - 1 });
                open = Some(b.key);
            }
            (false, _) => open = Some(b.key),
            (true, Some(first)) if b.key > first => {
                out.push(Interval { first, last: b.key - 1 });
                open = None;
            }
            (true, _) => {}
        }
    }
    if let Some(first) = open {
        out.push(Interval { first, last: fam.max() });
    }
    out
}

/// Sorts `ivs` and merges the overlapping ones.
pub(super) fn merge(mut ivs: Vec<Interval>) -> Vec<Interval> {
    ivs.sort();
    let mut out: Vec<Interval> = Vec::with_capacity(ivs.len());
    for iv in ivs {
        match out.last_mut() {
            Some(prev) if prev.overlaps(&iv) => *prev = prev.union(&iv),
            _ => out.push(iv),
        }
    }
    out
}

/// What to delete from and add to a set holding `existing` so that it covers `wanted`:
/// a wanted interval already covered is skipped; one overlapping existing intervals replaces
/// them with their union. Nothing already covered stops being covered.
pub(super) fn plan(existing: &[Interval], wanted: Vec<Interval>) -> (Vec<Interval>, Vec<Interval>) {
    // (interval, was it in the set already)
    let mut current: Vec<(Interval, bool)> = existing.iter().map(|e| (*e, true)).collect();
    let mut deletes = Vec::new();
    for w in merge(wanted) {
        if current.iter().any(|(e, _)| e.covers(&w)) {
            continue;
        }
        let mut u = w;
        loop {
            let before = current.len();
            current.retain(|(e, original)| {
                if !e.overlaps(&u) {
                    return true;
                }
                u = u.union(e);
                if *original {
                    deletes.push(*e);
                }
                false
            });
            if current.len() == before {
                break;
            }
        }
        current.push((u, false));
    }
    let adds = current
        .into_iter()
        .filter(|(_, original)| !original)
        .map(|(i, _)| i)
        .collect();
    (deletes, adds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(s: &str) -> Interval {
        Interval::of(s.parse().unwrap()).1
    }

    #[test]
    fn nft_interval_bounds_and_prefixes() {
        let i = iv("10.244.1.7/24");
        assert_eq!(
            i,
            Interval {
                first: 0x0af40100,
                last: 0x0af401ff
            }
        );
        assert_eq!(
            i.bounds(Family::V4),
            vec![
                Bound {
                    key: 0x0af40100,
                    end: false
                },
                Bound {
                    key: 0x0af40200,
                    end: true
                }
            ]
        );
        assert_eq!(iv("255.255.255.0/24").bounds(Family::V4).len(), 1);
        assert_eq!(iv("::/0").bounds(Family::V6).len(), 1);
        assert_eq!(
            i.prefixes(Family::V4),
            vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(iv("0.0.0.0/0").describe(Family::V4), "0.0.0.0/0");
        assert_eq!(iv("::/0").describe(Family::V6), "::/0");
        let odd = Interval { first: 1, last: 4 };
        let got: Vec<String> = odd.prefixes(Family::V4).iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["0.0.0.1/32", "0.0.0.2/31", "0.0.0.4/32"]);
        assert_eq!(odd.describe(Family::V4), "0.0.0.1-0.0.0.4");
    }

    #[test]
    fn nft_interval_from_bounds() {
        let fam = Family::V4;
        let mut b: Vec<Bound> = [iv("10.0.0.0/24"), iv("10.0.1.0/24"), iv("255.0.0.0/8")]
            .iter()
            .flat_map(|i| i.bounds(fam))
            .collect();
        b.push(Bound { key: 0, end: true }); // nft's marker
        b.reverse(); // the kernel lists in descending order
        assert_eq!(
            from_bounds(fam, b),
            vec![iv("10.0.0.0/24"), iv("10.0.1.0/24"), iv("255.0.0.0/8")]
        );
    }

    #[test]
    fn nft_interval_plan() {
        // Covered: nothing to do.
        assert_eq!(plan(&[iv("10.0.0.0/16")], vec![iv("10.0.1.0/24")]), (vec![], vec![]));
        // Covering: replaces what it covers.
        assert_eq!(
            plan(
                &[iv("10.0.1.0/24"), iv("10.0.2.0/24"), iv("10.1.0.0/24")],
                vec![iv("10.0.0.0/16")]
            ),
            (vec![iv("10.0.1.0/24"), iv("10.0.2.0/24")], vec![iv("10.0.0.0/16")])
        );
        // Disjoint and adjacent intervals stay apart; wanted ones merge among themselves.
        assert_eq!(
            plan(
                &[iv("10.0.0.0/24")],
                vec![iv("10.0.1.0/24"), iv("10.0.1.0/25"), iv("10.9.0.0/16")]
            ),
            (vec![], vec![iv("10.0.1.0/24"), iv("10.9.0.0/16")])
        );
        // A foreign range overlapping partially is merged into the union.
        let foreign = Interval { first: 5, last: 300 };
        assert_eq!(
            plan(&[foreign], vec![iv("0.0.1.0/24")]),
            (vec![foreign], vec![Interval { first: 5, last: 511 }])
        );
    }
}
