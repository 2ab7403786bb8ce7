//! The underlay: the interface and address other nodes reach this node by ([`Underlay`], part of
//! the vocabulary every backend shares), and finding it: given by flag, or the interface of the
//! default route (as flannel does).

use ipnetwork::IpNetwork;
use std::net::IpAddr;
use trellis_net::{IpFamily, Netlink, RouteFilter};

/// The link this node's traffic to the other nodes leaves by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    /// This node's underlay address (the lease's `underlay_ip`).
    pub ip: IpAddr,
    /// The underlay's own subnet, address included (`192.168.50.11/24`): nodes in it are
    /// directly reachable.
    pub prefix: IpNetwork,
    /// The link's other subnets (its global addresses' ones, either family; link-local ones
    /// left out): on an IPv4 underlay with IPv6 addresses too, IPv6 next hops in them are
    /// directly reachable as well. See [`Underlay::on_link`].
    pub link_prefixes: Vec<IpNetwork>,
    pub mtu: u32,
}

impl Underlay {
    /// `ip` is on the underlay link: in [`Underlay::prefix`] or one of
    /// [`Underlay::link_prefixes`] (a next hop there needs no router).
    pub fn on_link(&self, ip: IpAddr) -> bool {
        self.prefix.contains(ip) || self.link_prefixes.iter().any(|p| p.contains(ip))
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    #[error("kernel: {0}")]
    Net(#[from] trellis_net::NetError),
    #[error("{0}")]
    NotFound(String),
}

/// The underlay from `--underlay-iface` and/or `--underlay-ip`, or from the default route.
pub async fn detect(nl: &Netlink, iface: Option<&str>, ip: Option<IpAddr>) -> Result<Underlay, UnderlayError> {
    let links = nl.links().await?;
    let link = if let Some(name) = iface {
        links
            .into_iter()
            .find(|l| l.name == name)
            .ok_or_else(|| UnderlayError::NotFound(format!("underlay interface {name} does not exist")))?
    } else if let Some(ip) = ip {
        let mut found = None;
        for l in links {
            if nl.addresses(l.index).await?.iter().any(|a| a.address.ip() == ip) {
                found = Some(l);
                break;
            }
        }
        found.ok_or_else(|| UnderlayError::NotFound(format!("no interface holds the underlay IP {ip}")))?
    } else {
        let mut oif = None;
        for family in [IpFamily::V4, IpFamily::V6] {
            let filter = RouteFilter {
                family: Some(family),
                table: Some(254),
                ..Default::default()
            };
            oif = nl
                .routes(&filter)
                .await?
                .into_iter()
                .find(|r| r.destination.prefix() == 0)
                .and_then(|r| r.oif);
            if oif.is_some() {
                break;
            }
        }
        let oif = oif.ok_or_else(|| {
            UnderlayError::NotFound(
                "no default route to find the underlay by; give --underlay-iface or --underlay-ip".into(),
            )
        })?;
        links
            .into_iter()
            .find(|l| l.index == oif)
            .ok_or_else(|| UnderlayError::NotFound(format!("the default route's interface {oif} vanished")))?
    };
    let addrs = nl.addresses(link.index).await?;
    let addr: IpNetwork = addrs
        .iter()
        .map(|a| a.address)
        .filter(|a| ip.is_none_or(|want| a.ip() == want))
        .find(|a| a.is_ipv4() || !is_link_local(a.ip()))
        .ok_or_else(|| UnderlayError::NotFound(format!("underlay interface {} has no usable address", link.name)))?;
    let link_prefixes = addrs
        .iter()
        .map(|a| a.address)
        .filter(|a| *a != addr && !is_link_local(a.ip()))
        .collect();
    Ok(Underlay {
        index: link.index,
        name: link.name,
        ip: addr.ip(),
        prefix: addr,
        link_prefixes,
        mtu: link.mtu,
    })
}
