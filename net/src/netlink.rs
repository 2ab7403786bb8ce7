//! The [`Netlink`] handle: one rtnetlink connection, bound to one network namespace.
//!
//! A netlink socket talks to the namespace it was *created* in, whatever thread uses it later.
//! So the socket is opened on a throw-away thread that has entered the target namespace
//! ([`crate::netns::run_in`]), and the connection future is spawned on the caller's tokio
//! runtime (a `current_thread` runtime in the plugins). The caller never changes namespace.
//!
//! Requests go through three primitives ([`Netlink::ack`], [`Netlink::single`] and
//! [`Netlink::dump`]) that read the kernel's answer headers included (see [`crate::reply`]).
//! The typed verbs (links, addresses, routes, neighbours, nexthops) live in their own modules.
//!
//! The connection is netlink-proto's, typed with our [`RtMessage`] rather than rtnetlink's
//! `RouteNetlinkMessage`, so that nexthop messages (which netlink-packet-route lacks) travel on
//! it too.

use std::path::Path;

use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_proto::ConnectionHandle;
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, SocketAddr, TokioSocket};

use crate::message::RtMessage;
use crate::netns::{run_in, THREAD_NETNS};
use crate::reply::{self, Failure, Msg};
use crate::NetError;

/// How long to wait for the kernel's answer to one request.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many times a dump is tried when the kernel says it was interrupted.
const DUMP_ATTEMPTS: u32 = 10;

/// A connection to the kernel's routing netlink in one network namespace.
///
/// Cheap to clone; the connection closes when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: ConnectionHandle<RtMessage>,
}

impl Netlink {
    /// Connect to the calling thread's network namespace. Must be called inside a tokio runtime
    /// with IO enabled; the connection task is spawned on it.
    pub fn connect() -> Result<Self, NetError> {
        Self::connect_in(Path::new(THREAD_NETNS))
    }

    /// Connect to the network namespace at `ns` (`/run/netns/NAME`, `/proc/PID/ns/net`).
    /// Must be called inside a tokio runtime with IO enabled.
    pub fn connect_in(ns: &Path) -> Result<Self, NetError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        let rt = runtime.clone();
        let socket = run_in(ns, move || {
            // Registering the fd with the runtime's reactor needs the runtime's context.
            let _entered = rt.enter();
            open_socket()
        })?
        .map_err(|e| NetError::io(format!("opening a netlink socket in {}", ns.display()), e))?;
        let (mut connection, handle, _unsolicited) = crate::message::connection(socket);
        // Needed to see NLM_F_DUMP_INTR on NLMSG_DONE, and to tell an ACK from a lost connection.
        connection.set_forward_done(true);
        connection.set_forward_ack(true);
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    async fn exchange(&self, msg: RtMessage, flags: u16) -> Result<Vec<Msg>, Failure> {
        let request = request(msg, flags);
        let replies = self
            .handle
            .request(request, SocketAddr::new(0, 0))
            .map_err(|_| Failure::Closed)?;
        // The kernel always answers; a reply that never comes (a lost message, a wedged
        // connection) must become an error the caller can retry, not a hang.
        tokio::time::timeout(REPLY_TIMEOUT, replies.collect())
            .await
            .map_err(|_| Failure::Unexpected(format!("no answer from the kernel within {REPLY_TIMEOUT:?}")))
    }

    /// Send a request that changes something (`extra_flags`: `NLM_F_CREATE`, `NLM_F_EXCL`,
    /// `NLM_F_REPLACE`, ...) and wait for the kernel's ACK.
    pub(crate) async fn ack(&self, msg: impl Into<RtMessage>, extra_flags: u16) -> Result<(), Failure> {
        reply::ack(self.exchange(msg.into(), ACK_FLAGS | extra_flags).await?)
    }

    /// Send a non-dump `RTM_GET*` request and return the one answer.
    pub(crate) async fn single(&self, msg: RouteNetlinkMessage) -> Result<RouteNetlinkMessage, Failure> {
        match reply::single(self.exchange(msg.into(), NLM_F_REQUEST).await?)? {
            RtMessage::Route(m) => Ok(m),
            other => Err(Failure::Unexpected(format!("{other:?}"))),
        }
    }

    /// Dump a table, retrying when the kernel flags the dump as interrupted.
    pub(crate) async fn dump(&self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        Ok(self
            .dump_rt(msg.into())
            .await?
            .into_iter()
            .filter_map(|m| match m {
                RtMessage::Route(m) => Some(m),
                RtMessage::Nexthop(..) => None,
            })
            .collect())
    }

    /// [`Netlink::dump`] for any message, nexthops included.
    pub(crate) async fn dump_rt(&self, msg: RtMessage) -> Result<Vec<RtMessage>, Failure> {
        for attempt in 1.. {
            match reply::dump(self.exchange(msg.clone(), NLM_F_REQUEST | NLM_F_DUMP).await?) {
                Err(Failure::Interrupted { .. }) if attempt < DUMP_ATTEMPTS => continue,
                Err(Failure::Interrupted { .. }) => return Err(Failure::Interrupted { attempts: attempt }),
                other => return other,
            }
        }
        unreachable!("the loop above always returns")
    }
}

/// The flags of a request that changes something and waits for the kernel's ACK.
pub(crate) const ACK_FLAGS: u16 = NLM_F_REQUEST | NLM_F_ACK;

/// The netlink message sent for `msg` with these header flags (the sequence number is set when
/// it is sent); unit tests encode it to check the bytes the kernel gets.
pub(crate) fn request(msg: RtMessage, flags: u16) -> NetlinkMessage<RtMessage> {
    let mut request = NetlinkMessage::from(msg);
    request.header.flags = flags;
    request
}

/// A non-blocking rtnetlink socket in the calling thread's namespace, with extended ACKs
/// (kernel error messages) on and the echoed request capped to its header.
fn open_socket() -> std::io::Result<TokioSocket> {
    let socket = TokioSocket::new(NETLINK_ROUTE)?;
    socket.socket_ref().set_ext_ack(true)?;
    socket.socket_ref().set_cap_ack(true)?;
    Ok(socket)
}
