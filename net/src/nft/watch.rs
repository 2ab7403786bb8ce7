//! Noticing when someone undoes a table of ours: `nft flush ruleset` (what reloading Debian's
//! stock nftables service does), a deleted rule, chain or set, an emptied masquerade set.
//!
//! nf_tables announces every committed change on the `NFNLGRP_NFTABLES` multicast group, one
//! message per object, in the same format as our requests. [`TableWatch::changed`] returns when
//! a message says that something of the watched table went away (or that messages were lost), so
//! the owner can repair it at once rather than at its next periodic resync. Additions are not
//! reported: they are the owner's own repairs, or elements the plugins add for pods. Deleted
//! set elements count only in the sets named in [`TableWatch::new`] (the plugins delete their
//! own elements on every pod DEL; a repair for each would be waste).

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use tokio::io::unix::AsyncFd;

use super::wire::{self, attr, MsgType, NFPROTO_INET, NLMSG_ERROR};
use super::NftError;

/// `NFNLGRP_NFTABLES`: nf_tables' change notifications.
const NFNLGRP_NFTABLES: u32 = 7;
/// The table name is attribute 1 of every message that names one (table, chain, rule, set,
/// set element list); the set name is attribute 2 of a set element list.
const ATTR_TABLE: u16 = 1;
const ATTR_ELEM_SET: u16 = 2;

/// A subscription to one table's changes in the calling thread's network namespace. Made on any
/// thread (one that entered the namespace); waited on in a tokio runtime.
pub struct TableWatch {
    sock: Option<Socket>,
    fd: Option<AsyncFd<Socket>>,
    table: String,
    sets: Vec<String>,
    buf: Vec<u8>,
}

impl TableWatch {
    /// Subscribes now (changes from here on are seen); `sets`: the sets whose emptied elements
    /// matter.
    pub fn new(table: &str, sets: &[&str]) -> Result<Self, NftError> {
        let open = || -> io::Result<Socket> {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            sock.add_membership(NFNLGRP_NFTABLES)?;
            sock.set_rx_buf_sz(1 << 20)?;
            sock.set_non_blocking(true)?;
            Ok(sock)
        };
        Ok(TableWatch {
            sock: Some(open().map_err(|e| NftError::socket("subscribing to nftables changes", e))?),
            fd: None,
            table: table.to_string(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Returns when a change undoes something of the table, or notifications were lost
    /// (ENOBUFS: then anything may have happened). Must run inside a tokio runtime.
    pub async fn changed(&mut self) -> Result<(), NftError> {
        let err = |e| NftError::socket("receiving nftables changes", e);
        if self.fd.is_none() {
            let sock = self.sock.take().expect("a socket until it is registered");
            // SAFETY: the Socket owns its fd, keeps it open and returns that same fd from
            // as_raw_fd for as long as it lives, and the AsyncFd owns the Socket.
            let registered = unsafe { AsyncFd::register(sock) };
            self.fd = Some(registered.map_err(|e| err(io::Error::from(e)))?);
        }
        let fd = self.fd.as_ref().expect("registered above");
        loop {
            let mut guard = fd.readable().await.map_err(err)?;
            self.buf.clear();
            match guard.try_io(|s| s.get_ref().recv(&mut self.buf, 0)) {
                Err(_would_block) => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(err(e)),
            }
            for reply in wire::replies(&self.buf) {
                let Ok(reply) = reply else { return Ok(()) };
                if reply.ty != NLMSG_ERROR && self.undoes(reply.ty, reply.payload) {
                    return Ok(());
                }
            }
        }
    }

    /// Whether the message (type, payload after the netlink header) removes something of ours.
    fn undoes(&self, ty: u16, payload: &[u8]) -> bool {
        const SUBSYS: u16 = 10 << 8;
        let is = |t: MsgType| ty == SUBSYS | t as u16;
        if payload.first() != Some(&NFPROTO_INET) {
            return false;
        }
        let attrs = payload.get(4..).unwrap_or(&[]);
        let name = |a: u16| attr(attrs, a).map(|v| v.split(|b| *b == 0).next().unwrap_or(&[]));
        if name(ATTR_TABLE) != Some(self.table.as_bytes()) {
            return false;
        }
        if is(MsgType::DelSetElem) {
            let set = name(ATTR_ELEM_SET).unwrap_or(&[]);
            return self.sets.iter().any(|s| s.as_bytes() == set);
        }
        is(MsgType::DelTable) || is(MsgType::DelChain) || is(MsgType::DelRule) || is(MsgType::DelSet)
    }
}
