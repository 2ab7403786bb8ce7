//! What travels on our routing-netlink sockets: the messages netlink-packet-route types, plus the
//! nexthop messages it does not (`RTM_*NEXTHOP`, see [`crate::nexthop`]).
//!
//! netlink-packet-route 0.34 has no nexthop message and its `RouteNetlinkMessage` has no variant
//! for unknown types: a reply or notification of type 104/105 fails to parse, and netlink-proto
//! drops such a message with a log line. So the connection ([`crate::Netlink`]) and the monitor
//! are typed with [`RtMessage`], which hands nexthop messages to our own wire code and
//! everything else to netlink-packet-route.

use futures::channel::mpsc::UnboundedReceiver;
use netlink_packet_core::{
    DecodeError, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_proto::{Connection, ConnectionHandle, NetlinkCodec};
use netlink_sys::{SocketAddr, TokioSocket};

use crate::nexthop::{NexthopMessage, RTM_DELNEXTHOP, RTM_GETNEXTHOP, RTM_NEWNEXTHOP};

/// A netlink-proto connection over `socket` typed with [`RtMessage`]: the connection future (to
/// spawn), the handle for requests, and the receiver of unsolicited messages (notifications).
#[allow(clippy::type_complexity)]
pub(crate) fn connection(
    socket: TokioSocket,
) -> (
    Connection<RtMessage, TokioSocket, NetlinkCodec>,
    ConnectionHandle<RtMessage>,
    UnboundedReceiver<(NetlinkMessage<RtMessage>, SocketAddr)>,
) {
    netlink_proto::from_socket_with_codec(socket)
}

/// A routing-netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RtMessage {
    /// Everything netlink-packet-route knows.
    Route(RouteNetlinkMessage),
    /// `RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP` or `RTM_GETNEXTHOP` (the message type).
    Nexthop(u16, NexthopMessage),
}

impl From<RouteNetlinkMessage> for RtMessage {
    fn from(msg: RouteNetlinkMessage) -> Self {
        RtMessage::Route(msg)
    }
}

impl From<RtMessage> for NetlinkPayload<RtMessage> {
    fn from(msg: RtMessage) -> Self {
        NetlinkPayload::InnerMessage(msg)
    }
}

impl NetlinkSerializable for RtMessage {
    fn message_type(&self) -> u16 {
        match self {
            RtMessage::Route(m) => NetlinkSerializable::message_type(m),
            RtMessage::Nexthop(ty, _) => *ty,
        }
    }

    fn buffer_len(&self) -> usize {
        match self {
            RtMessage::Route(m) => NetlinkSerializable::buffer_len(m),
            RtMessage::Nexthop(_, m) => m.buffer_len(),
        }
    }

    fn serialize(&self, buffer: &mut [u8]) {
        match self {
            RtMessage::Route(m) => NetlinkSerializable::serialize(m, buffer),
            RtMessage::Nexthop(_, m) => m.emit(buffer),
        }
    }
}

impl NetlinkDeserializable for RtMessage {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        match header.message_type {
            ty @ (RTM_NEWNEXTHOP | RTM_DELNEXTHOP | RTM_GETNEXTHOP) => {
                Ok(RtMessage::Nexthop(ty, NexthopMessage::parse(payload)?))
            }
            _ => RouteNetlinkMessage::deserialize(header, payload).map(RtMessage::Route),
        }
    }
}
