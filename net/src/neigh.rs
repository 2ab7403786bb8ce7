//! Neighbours (ARP and NDP entries): permanent IP -> MAC entries on a link.
//!
//! The daemon's VXLAN backend points each remote node's VTEP address at that node's VTEP MAC
//! with a permanent entry, so the kernel never has to resolve it over the overlay. One routine
//! serves IPv4 (ARP) and IPv6 (NDP).

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
pub use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{IpFamily, MacAddr, NetError, Netlink};

/// A neighbour entry as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Index of the link.
    pub index: u32,
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its MAC address, once known.
    pub mac: Option<MacAddr>,
    /// `NUD_*` state (`Permanent` for ours).
    pub state: NeighbourState,
}

impl Neighbour {
    pub(crate) fn from_message(msg: &NeighbourMessage) -> Option<Self> {
        IpFamily::from_netlink(msg.header.family)?;
        let (mut ip, mut mac) = (None, None);
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(a) => ip = neighbour_ip(a),
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = MacAddr::from_slice(bytes),
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.ifindex,
            ip: ip?,
            mac,
            state: msg.header.state,
        })
    }
}

/// The IP of an `NDA_DST`, whatever family the message had (bridge FDB entries carry the
/// remote's IP as raw bytes).
pub(crate) fn neighbour_ip(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(ip) => Some((*ip).into()),
        NeighbourAddress::Inet6(ip) => Some((*ip).into()),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn neighbour_message(index: u32, ip: IpAddr, mac: Option<MacAddr>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = IpFamily::of(ip).to_netlink();
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.attributes.push(NeighbourAttribute::Destination(ip.into()));
    if let Some(mac) = mac {
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    msg
}

impl Netlink {
    /// `ip neigh add IP lladdr MAC dev INDEX nud permanent`: an existing entry is EEXIST.
    pub async fn add_neighbour(&self, index: u32, ip: IpAddr, mac: MacAddr) -> Result<(), NetError> {
        self.new_neighbour(index, ip, mac, NLM_F_CREATE | NLM_F_EXCL, "adding")
            .await
    }

    /// `ip neigh replace IP lladdr MAC dev INDEX nud permanent`.
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: MacAddr) -> Result<(), NetError> {
        self.new_neighbour(index, ip, mac, NLM_F_CREATE | NLM_F_REPLACE, "replacing")
            .await
    }

    /// `ip neigh del IP dev INDEX`: a missing entry is success.
    pub async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::DelNeighbour(neighbour_message(index, ip, None));
        match self.ack(msg, 0).await {
            Err(f) if !f.is_not_found() => {
                Err(f.context(format!("deleting neighbour {ip} dev {}", self.link_label(index).await)))
            }
            _ => Ok(()),
        }
    }

    /// The ARP/NDP entries, optionally of one link and one family.
    pub async fn neighbours(&self, index: Option<u32>, family: Option<IpFamily>) -> Result<Vec<Neighbour>, NetError> {
        let mut req = NeighbourMessage::default();
        if let Some(family) = family {
            req.header.family = family.to_netlink();
        }
        let replies = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|f| f.context("listing neighbours"))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Neighbour::from_message(n),
                _ => None,
            })
            .filter(|n| index.is_none_or(|i| i == n.index) && family.is_none_or(|f| f == IpFamily::of(n.ip)))
            .collect())
    }

    async fn new_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: MacAddr,
        flags: u16,
        verb: &str,
    ) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::NewNeighbour(neighbour_message(index, ip, Some(mac)));
        match self.ack(msg, flags).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(format!(
                "{verb} neighbour {ip} lladdr {mac} dev {}",
                self.link_label(index).await
            ))),
        }
    }
}
