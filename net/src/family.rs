//! IPv4 or IPv6: the one place that maps an address to its netlink family, so that the address,
//! route and neighbour code can stay generic over the family.

use std::net::IpAddr;

use netlink_packet_route::AddressFamily;

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4 (`AF_INET`).
    V4,
    /// IPv6 (`AF_INET6`).
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The family as netlink spells it.
    pub fn to_netlink(self) -> AddressFamily {
        match self {
            Self::V4 => AddressFamily::Inet,
            Self::V6 => AddressFamily::Inet6,
        }
    }

    /// The family of a netlink message, if it is IPv4 or IPv6.
    pub fn from_netlink(af: AddressFamily) -> Option<Self> {
        match af {
            AddressFamily::Inet => Some(Self::V4),
            AddressFamily::Inet6 => Some(Self::V6),
            _ => None,
        }
    }

    /// `0.0.0.0` or `::`.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Self::V4 => IpAddr::from([0u8; 4]),
            Self::V6 => IpAddr::from([0u8; 16]),
        }
    }

    /// 32 or 128.
    pub fn max_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}
