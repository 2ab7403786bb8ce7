//! Bridge forwarding database entries on VXLAN devices: MAC -> remote VTEP IP.
//!
//! These are `AF_BRIDGE` neighbour messages with `NTF_SELF`, which puts the entry in the VXLAN
//! device's own table (`bridge fdb add MAC dev vxlan0 dst IP self permanent`), not in the table
//! of a bridge the device might be a port of. The all-zero MAC is the flood list: BUM traffic
//! goes to every remote listed under it, so those entries are *appended*, not replaced.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::neigh::neighbour_ip;
use crate::{MacAddr, NetError, Netlink};

/// An FDB entry as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// Index of the device (the VXLAN device, or a bridge port).
    pub index: u32,
    /// The MAC address.
    pub mac: MacAddr,
    /// Remote VTEP address (VXLAN entries).
    pub dst: Option<IpAddr>,
    /// Index of the bridge, for entries of a bridge port's master table.
    pub master: Option<u32>,
    /// `NUD_PERMANENT`: programmed, not learned.
    pub permanent: bool,
    /// `NTF_SELF`: the entry lives in the device's own table.
    pub ntf_self: bool,
}

impl FdbEntry {
    pub(crate) fn from_message(msg: &NeighbourMessage) -> Option<Self> {
        let (mut mac, mut dst, mut master) = (None, None, None);
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(bytes) => mac = MacAddr::from_slice(bytes),
                NeighbourAttribute::Destination(a) => dst = neighbour_ip(a),
                NeighbourAttribute::Controller(m) => master = Some(*m),
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.ifindex,
            mac: mac?,
            dst,
            master,
            permanent: msg.header.state == NeighbourState::Permanent,
            ntf_self: msg.header.flags.contains(NeighbourFlags::Own),
        })
    }
}

fn fdb_message(index: u32, mac: MacAddr, dst: Option<IpAddr>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    if let Some(dst) = dst {
        msg.attributes.push(NeighbourAttribute::Destination(dst.into()));
    }
    msg
}

impl Netlink {
    /// `bridge fdb replace MAC dev INDEX dst DST self permanent`: one remote per MAC.
    pub async fn replace_fdb(&self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), NetError> {
        self.new_fdb(index, mac, dst, NLM_F_CREATE | NLM_F_REPLACE, "replacing")
            .await
    }

    /// `bridge fdb append MAC dev INDEX dst DST self permanent`: add one more remote (for the
    /// all-zero flood MAC).
    pub async fn append_fdb(&self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), NetError> {
        self.new_fdb(index, mac, dst, NLM_F_CREATE | NLM_F_APPEND, "appending")
            .await
    }

    /// `bridge fdb del MAC dev INDEX [dst DST] self`: without `dst`, every remote of the MAC.
    /// A missing entry is success.
    pub async fn del_fdb(&self, index: u32, mac: MacAddr, dst: Option<IpAddr>) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::DelNeighbour(fdb_message(index, mac, dst));
        match self.ack(msg, 0).await {
            Err(f) if !f.is_not_found() => {
                let dst = dst.map(|d| format!(" dst {d}")).unwrap_or_default();
                Err(f.context(format!(
                    "deleting fdb entry {mac}{dst} dev {}",
                    self.link_label(index).await
                )))
            }
            _ => Ok(()),
        }
    }

    /// The FDB entries of one device (its own and, for a bridge port, its master's).
    pub async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetError> {
        let mut req = NeighbourMessage::default();
        req.header.family = AddressFamily::Bridge;
        let replies = self
            .dump(RouteNetlinkMessage::GetNeighbour(req))
            .await
            .map_err(|f| f.context(format!("listing fdb entries of link #{index}")))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == index => FdbEntry::from_message(n),
                _ => None,
            })
            .collect())
    }

    async fn new_fdb(&self, index: u32, mac: MacAddr, dst: IpAddr, flags: u16, verb: &str) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::NewNeighbour(fdb_message(index, mac, Some(dst)));
        match self.ack(msg, flags).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(format!(
                "{verb} fdb entry {mac} dst {dst} dev {}",
                self.link_label(index).await
            ))),
        }
    }
}
