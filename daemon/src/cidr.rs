//! Cutting a cluster CIDR into node CIDRs, IPv4 and IPv6 alike (addresses as `u128`).

use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(n: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(n))
    }
}

/// How many /`len` subnets `net` holds (saturating at `u128::MAX`).
pub fn subnet_count(net: &IpNetwork, len: u8) -> u128 {
    let shift = (len - net.prefix()) as u32;
    1u128.checked_shl(shift).unwrap_or(u128::MAX)
}

/// The `n`-th /`len` subnet of `net`.
pub fn nth_subnet(net: &IpNetwork, len: u8, n: u128) -> Option<IpNetwork> {
    if n >= subnet_count(net, len) {
        return None;
    }
    let bits = if net.is_ipv4() { 32 } else { 128 };
    let size = 1u128.checked_shl(bits - len as u32)?;
    let base = to_u128(net.network()).checked_add(n.checked_mul(size)?)?;
    IpNetwork::new(from_u128(base, net.is_ipv4()), len).ok()
}

/// The index of `subnet` within `net`'s /`len` subnets.
pub fn subnet_index(net: &IpNetwork, len: u8, subnet: &IpNetwork) -> Option<u128> {
    if subnet.prefix() != len || !net.contains(subnet.network()) {
        return None;
    }
    let bits = if net.is_ipv4() { 32 } else { 128 };
    Some((to_u128(subnet.network()) - to_u128(net.network())) >> (bits - len as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_both_families() {
        let n: IpNetwork = "10.244.0.0/16".parse().unwrap();
        assert_eq!(subnet_count(&n, 24), 256);
        assert_eq!(nth_subnet(&n, 24, 3).unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(nth_subnet(&n, 24, 256), None);
        assert_eq!(subnet_index(&n, 24, &"10.244.7.0/24".parse().unwrap()), Some(7));
        let n6: IpNetwork = "fd00:244::/56".parse().unwrap();
        assert_eq!(nth_subnet(&n6, 64, 2).unwrap().to_string(), "fd00:244:0:2::/64");
    }
}
