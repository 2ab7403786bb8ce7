//! Address ranges and range sets. Addresses are handled as `u128` so that one routine serves
//! IPv4 and IPv6.

use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address as a number, with its family kept alongside.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `n` in the family of `like`.
pub fn from_u128(n: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// One contiguous range inside a subnet: `start..=end`, never the network address, the IPv4
/// broadcast address or the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The subnet, with host bits zero.
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4() && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    /// Whether `ip` may be handed to a pod (inside the range and not a reserved address).
    pub fn is_assignable(&self, ip: IpAddr) -> bool {
        self.contains(ip)
            && ip != self.subnet.network()
            && Some(ip) != self.gateway
            && !(ip.is_ipv4() && ip == self.subnet.broadcast())
    }

    /// The number of addresses between start and end (saturating for huge IPv6 ranges).
    pub fn len(&self) -> u128 {
        (to_u128(self.end) - to_u128(self.start)).saturating_add(1)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// How many addresses of the range a pod can get: all but the network address, the IPv4
    /// broadcast address and the gateway, where they fall inside it.
    pub fn capacity(&self) -> u128 {
        let mut special: Vec<IpAddr> = vec![self.subnet.network()];
        if self.subnet.is_ipv4() {
            special.push(self.subnet.broadcast());
        }
        special.extend(self.gateway);
        special.sort();
        special.dedup();
        let inside = special.iter().filter(|&&ip| self.contains(ip)).count() as u128;
        self.len().saturating_sub(inside)
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv4() == other.start.is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }

    /// How an operator would write the range in a message.
    pub fn describe(&self) -> String {
        format!("{} ({}-{})", self.subnet, self.start, self.end)
    }
}

/// A range set: one address per set is given to each attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet {
    pub ranges: Vec<Range>,
}

impl RangeSet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    pub fn range_of(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }

    pub fn describe(&self) -> String {
        self.ranges.iter().map(Range::describe).collect::<Vec<_>>().join(", ")
    }

    /// Every assignable address once, starting right after `last` (round-robin, as host-local
    /// does) and wrapping around; from the first range's start when `last` is not in the set.
    pub fn candidates(&self, last: Option<IpAddr>) -> impl Iterator<Item = (usize, IpAddr)> + '_ {
        let start = last
            .and_then(|l| self.ranges.iter().position(|r| r.contains(l)).map(|i| (i, l)))
            .map(|(i, l)| self.step(i, to_u128(l)))
            .unwrap_or((0, to_u128(self.ranges[0].start)));
        let mut cur = Some(start);
        std::iter::from_fn(move || {
            let (i, n) = cur?;
            let next = self.step(i, n);
            cur = (next != start).then_some(next);
            Some((i, from_u128(n, self.ranges[i].start)))
        })
        .filter(|&(i, ip)| self.ranges[i].is_assignable(ip))
    }

    /// The position after `n` in range `i`, moving to the next range (and wrapping) at the end.
    fn step(&self, i: usize, n: u128) -> (usize, u128) {
        if n < to_u128(self.ranges[i].end) {
            (i, n + 1)
        } else {
            let j = (i + 1) % self.ranges.len();
            (j, to_u128(self.ranges[j].start))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(subnet: &str, start: &str, end: &str, gw: Option<&str>) -> Range {
        Range {
            subnet: subnet.parse().unwrap(),
            start: start.parse().unwrap(),
            end: end.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
        }
    }

    #[test]
    fn candidates_go_round_robin_and_skip_reserved_addresses() {
        let set = RangeSet {
            ranges: vec![range("10.0.0.0/29", "10.0.0.0", "10.0.0.7", Some("10.0.0.1"))],
        };
        let all: Vec<String> = set.candidates(None).map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(all, ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]);
        let after: Vec<String> = set
            .candidates(Some("10.0.0.4".parse().unwrap()))
            .map(|(_, ip)| ip.to_string())
            .collect();
        assert_eq!(after, ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
    }

    #[test]
    fn candidates_cross_ranges_of_a_set() {
        let set = RangeSet {
            ranges: vec![
                range("10.0.0.0/24", "10.0.0.10", "10.0.0.11", None),
                range("10.0.1.0/24", "10.0.1.10", "10.0.1.11", None),
            ],
        };
        let v: Vec<String> = set
            .candidates(Some("10.0.0.11".parse().unwrap()))
            .map(|(_, ip)| ip.to_string())
            .collect();
        assert_eq!(v, ["10.0.1.10", "10.0.1.11", "10.0.0.10", "10.0.0.11"]);
    }

    #[test]
    fn ipv6_ranges_work_the_same() {
        let set = RangeSet {
            ranges: vec![range("fd00::/120", "fd00::1", "fd00::ff", Some("fd00::1"))],
        };
        let first: Vec<String> = set.candidates(None).take(2).map(|(_, ip)| ip.to_string()).collect();
        assert_eq!(first, ["fd00::2", "fd00::3"]);
        assert_eq!(set.candidates(None).count(), 254);
    }
}
