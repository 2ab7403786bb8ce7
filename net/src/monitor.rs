//! Kernel change notifications (`ip monitor`): links, addresses, routes, nexthop objects,
//! neighbours and FDB entries as they change, typed with the same structs the dumps return.
//!
//! Why: a daemon that keeps routes in place must learn within a second that someone deleted one,
//! not at its next periodic resync. The kernel multicasts every change on the `RTNLGRP_*`
//! groups of the routing netlink family; a [`Monitor`] is a socket that has joined some of them.
//!
//! - Like [`Netlink`](crate::Netlink), the socket belongs to the namespace it was opened in
//!   ([`Monitor::open_in`] opens it on a thread inside the target namespace).
//! - The kernel does not wait for a slow reader: when the socket buffer is full it drops
//!   notifications and the next read fails with `ENOBUFS`. That is reported as
//!   [`Change::Overrun`], which means "you missed something: read the tables again".
//! - Changes made through any socket are reported, ours included.

use std::path::Path;

use futures::channel::mpsc::UnboundedReceiver;
use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::RouteFlags;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, SocketAddr, TokioSocket};

use crate::message::RtMessage;
use crate::netns::{run_in, THREAD_NETNS};
use crate::nexthop::RTM_DELNEXTHOP;
use crate::{AddressInfo, FdbEntry, LinkInfo, Neighbour, NetError, Nexthop, Route};

/// Receive buffer asked for (the kernel caps it at `net.core.rmem_max` without CAP_NET_ADMIN).
const RECEIVE_BUFFER: usize = 4 << 20;

/// A notification group (`RTNLGRP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Links created, changed (up/down, MTU...), deleted.
    Link,
    /// ARP/NDP entries and bridge/VXLAN FDB entries.
    Neighbour,
    /// IPv4 addresses.
    Ipv4Address,
    /// IPv4 routes.
    Ipv4Route,
    /// IPv6 addresses.
    Ipv6Address,
    /// IPv6 routes.
    Ipv6Route,
    /// Nexthop objects (Linux 5.3+; joining it fails on older kernels).
    Nexthop,
}

impl Group {
    /// The `RTNLGRP_*` number (`linux/rtnetlink.h`).
    pub fn number(self) -> u32 {
        match self {
            Group::Link => 1,
            Group::Neighbour => 3,
            Group::Ipv4Address => 5,
            Group::Ipv4Route => 7,
            Group::Ipv6Address => 9,
            Group::Ipv6Route => 11,
            Group::Nexthop => 32,
        }
    }
}

/// One change the kernel reported. `deleted` is false for additions and changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Link {
        deleted: bool,
        link: LinkInfo,
    },
    Address {
        deleted: bool,
        address: AddressInfo,
    },
    /// A route (cached/cloned entries, such as learned path MTUs, are not reported).
    Route {
        deleted: bool,
        route: Route,
    },
    /// An IPv4 or IPv6 neighbour.
    Neighbour {
        deleted: bool,
        neighbour: Neighbour,
    },
    /// A bridge or VXLAN FDB entry (an `AF_BRIDGE` neighbour).
    Fdb {
        deleted: bool,
        entry: FdbEntry,
    },
    /// A nexthop object. When one is deleted, the routes using it go too, and IPv4 ones
    /// without a notification of their own.
    Nexthop {
        deleted: bool,
        nexthop: Nexthop,
    },
    /// Notifications were lost (the socket buffer overflowed): read the state again.
    Overrun,
}

impl Change {
    /// The typed change in a notification; `None` for messages this crate does not type.
    pub(crate) fn from_message(msg: NetlinkMessage<RtMessage>) -> Option<Change> {
        let inner = match msg.payload {
            NetlinkPayload::Overrun(_) => return Some(Change::Overrun),
            NetlinkPayload::InnerMessage(RtMessage::Route(inner)) => inner,
            NetlinkPayload::InnerMessage(RtMessage::Nexthop(ty, nh)) => {
                return Some(Change::Nexthop {
                    deleted: ty == RTM_DELNEXTHOP,
                    nexthop: Nexthop::from_message(&nh)?,
                })
            }
            _ => return None,
        };
        use RouteNetlinkMessage as M;
        match inner {
            M::NewLink(l) | M::DelLink(l) => Some(Change::Link {
                deleted: matches!(inner_kind(&msg.header), Kind::Del),
                link: LinkInfo::from_message(&l),
            }),
            M::NewAddress(a) | M::DelAddress(a) => Some(Change::Address {
                deleted: matches!(inner_kind(&msg.header), Kind::Del),
                address: AddressInfo::from_message(&a)?,
            }),
            M::NewRoute(r) | M::DelRoute(r) if !r.header.flags.contains(RouteFlags::Cloned) => Some(Change::Route {
                deleted: matches!(inner_kind(&msg.header), Kind::Del),
                route: Route::from_message(&r)?,
            }),
            M::NewNeighbour(n) | M::DelNeighbour(n) => {
                let deleted = matches!(inner_kind(&msg.header), Kind::Del);
                if n.header.family == AddressFamily::Bridge {
                    Some(Change::Fdb {
                        deleted,
                        entry: FdbEntry::from_message(&n)?,
                    })
                } else {
                    Some(Change::Neighbour {
                        deleted,
                        neighbour: Neighbour::from_message(&n)?,
                    })
                }
            }
            _ => None,
        }
    }
}

enum Kind {
    New,
    Del,
}

/// Whether a notification announces an object (`RTM_NEW*`) or its removal (`RTM_DEL*`): the
/// message types alternate NEW, DEL, GET, SET from `RTM_BASE` (16) in groups of four.
fn inner_kind(header: &netlink_packet_core::NetlinkHeader) -> Kind {
    if header.message_type >= 16 && (header.message_type - 16) % 4 == 1 {
        Kind::Del
    } else {
        Kind::New
    }
}

/// A socket subscribed to some notification groups of one namespace.
#[derive(Debug)]
pub struct Monitor {
    messages: UnboundedReceiver<(NetlinkMessage<RtMessage>, SocketAddr)>,
}

impl Monitor {
    /// Subscribes in the calling thread's namespace. Must be called inside a tokio runtime with
    /// IO enabled; the socket's task is spawned on it and ends when the monitor is dropped.
    pub fn open(groups: &[Group]) -> Result<Self, NetError> {
        Self::open_in(Path::new(THREAD_NETNS), groups)
    }

    /// Subscribes in the namespace at `ns` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn open_in(ns: &Path, groups: &[Group]) -> Result<Self, NetError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        let rt = runtime.clone();
        let groups = groups.to_vec();
        let socket = run_in(ns, move || {
            let _entered = rt.enter();
            open_socket(&groups)
        })?
        .map_err(|e| NetError::io(format!("opening a netlink monitor socket in {}", ns.display()), e))?;
        let (connection, _handle, messages) = crate::message::connection(socket);
        runtime.spawn(connection);
        Ok(Self { messages })
    }

    /// The next change; `None` once the socket has failed (open a new monitor and read the state
    /// again). Notifications this crate does not type are skipped.
    pub async fn next(&mut self) -> Option<Change> {
        while let Some((msg, _)) = self.messages.next().await {
            if let Some(change) = Change::from_message(msg) {
                return Some(change);
            }
        }
        None
    }
}

fn open_socket(groups: &[Group]) -> std::io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    let s = socket.socket_mut();
    s.bind_auto()?;
    // Best effort: a bigger buffer makes overruns rarer; a refusal is not fatal.
    let _ = s.set_rx_buf_sz(RECEIVE_BUFFER);
    for group in groups {
        s.add_membership(group.number())?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

    fn notification(msg: impl Into<RtMessage>) -> NetlinkMessage<RtMessage> {
        let mut m = NetlinkMessage::from(msg.into());
        m.finalize();
        m
    }

    #[test]
    fn notifications_are_typed_by_kind_and_family() {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.destination_prefix_length = 24;
        r.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(
            "10.1.2.0".parse().unwrap(),
        )));
        match Change::from_message(notification(RouteNetlinkMessage::DelRoute(r.clone()))) {
            Some(Change::Route { deleted: true, route }) => {
                assert_eq!(route.destination.to_string(), "10.1.2.0/24")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Change::from_message(notification(RouteNetlinkMessage::NewRoute(r))),
            Some(Change::Route { deleted: false, .. })
        ));

        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Bridge;
        n.attributes
            .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
        n.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Other(vec![
                192, 168, 0, 1,
            ])));
        assert!(matches!(
            Change::from_message(notification(RouteNetlinkMessage::DelNeighbour(n.clone()))),
            Some(Change::Fdb { deleted: true, .. })
        ));
        n.header.family = AddressFamily::Inet;
        n.attributes[1] = NeighbourAttribute::Destination(NeighbourAddress::Inet("10.1.0.0".parse().unwrap()));
        assert!(matches!(
            Change::from_message(notification(RouteNetlinkMessage::NewNeighbour(n))),
            Some(Change::Neighbour { deleted: false, .. })
        ));

        let nh = crate::nexthop::NexthopMessage {
            family: libc::AF_INET as u8,
            attributes: vec![crate::nexthop::NexthopAttribute::Id(9)],
            ..Default::default()
        };
        match Change::from_message(notification(RtMessage::Nexthop(RTM_DELNEXTHOP, nh))) {
            Some(Change::Nexthop { deleted: true, nexthop }) => assert_eq!(nexthop.id, 9),
            other => panic!("{other:?}"),
        }

        let overrun = NetlinkMessage::<RtMessage>::new(NetlinkHeader::default(), NetlinkPayload::Overrun(vec![]));
        assert_eq!(Change::from_message(overrun), Some(Change::Overrun));
    }
}
