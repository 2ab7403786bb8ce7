//! One NETLINK_NETFILTER socket: atomic batches with one acknowledgement per message, and dumps.
//!
//! The kernel handles a batch inside our `send` call (netlink delivery to the kernel is
//! synchronous), so by the time `send` returns every reply is queued on the socket: we read
//! them without blocking, as nft(8) does, and a missing acknowledgement is an error rather
//! than a hang. Dumps are different (the kernel fills later parts as we read), so they block
//! until NLMSG_DONE.

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use super::error::NftError;
use super::wire::{self, Msg, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NLMSG_ERROR};
use crate::nfnl::{dump_step, DumpError, DumpStep};

const RECV_BUF: usize = 64 * 1024;
use crate::nfnl::DUMP_TRIES;

/// Messages committed together: all of them take effect, or none.
#[derive(Default)]
pub(super) struct Batch {
    msgs: Vec<(Msg, String)>,
}

impl Batch {
    /// Appends a message; `context` names it in errors ("adding set trellis masq4").
    pub(super) fn push(&mut self, msg: Msg, context: impl Into<String>) {
        self.msgs.push((msg, context.into()));
    }

    pub(super) fn len(&self) -> usize {
        self.msgs.len()
    }
}

/// A batch that the kernel refused: `index` is the first failing message, `None` when the
/// batch as a whole failed (commit error, or a socket error).
#[derive(Debug)]
pub(super) struct BatchError {
    pub(super) index: Option<usize>,
    pub(super) error: NftError,
}

impl From<NftError> for BatchError {
    fn from(error: NftError) -> Self {
        BatchError { index: None, error }
    }
}

pub(super) struct Conn {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Conn {
    /// Opens a socket in the network namespace of the calling thread.
    pub(super) fn open() -> Result<Self, NftError> {
        let open = || -> io::Result<Socket> {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            // Extended acks give the kernel's own words on a failure; capped acks keep every
            // acknowledgement small (just the header of the message it answers).
            sock.set_ext_ack(true)?;
            sock.set_cap_ack(true)?;
            // Room for one acknowledgement per message of a large batch (capped by rmem_max).
            sock.set_rx_buf_sz(1 << 20)?;
            Ok(sock)
        };
        let sock = open().map_err(|e| NftError::socket("opening nftables netlink socket", e))?;
        Ok(Conn {
            sock,
            seq: 1,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Reserves `n` consecutive sequence numbers and returns the first.
    fn next_seq(&mut self, n: u32) -> u32 {
        let first = self.seq;
        self.seq = self.seq.wrapping_add(n);
        first
    }

    /// Room for a batch of `bytes` in one send, and for its `messages` acknowledgements, which
    /// the kernel queues before `send` returns (as nft(8) does: a batch larger than the send
    /// buffer is refused with EMSGSIZE, acknowledgements beyond the receive buffer are lost).
    /// The `FORCE` options pass `net.core.[rw]mem_max` with CAP_NET_ADMIN; without it the
    /// plain ones get what the limits allow.
    fn fit_buffers(&self, bytes: usize, messages: usize) {
        use std::os::fd::AsRawFd;
        let fd = self.sock.as_raw_fd();
        let want = [
            (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, bytes + 4096),
            // An acknowledgement's share of the receive buffer, with its socket buffer.
            (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, messages * 1024),
        ];
        for (get, force, size) in want {
            let mut have: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt/setsockopt on our own socket with a c_int of the right size.
            unsafe {
                if libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    get,
                    (&mut have as *mut libc::c_int).cast(),
                    &mut len,
                ) != 0
                    || have as usize >= size
                {
                    continue;
                }
                let v = size.min(i32::MAX as usize) as libc::c_int;
                let p = (&v as *const libc::c_int).cast();
                let l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, l) != 0 {
                    libc::setsockopt(fd, libc::SOL_SOCKET, get, p, l);
                }
            }
        }
    }

    fn send(&self, buf: &[u8], context: &str) -> Result<(), NftError> {
        let sent = self.sock.send(buf, 0).map_err(|e| NftError::socket(context, e))?;
        if sent != buf.len() {
            return Err(NftError::Protocol(format!(
                "{context}: short send ({sent} of {} bytes)",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Reads one datagram into `self.buf`; `Ok(false)` when nothing is queued and `nonblocking`.
    fn recv(&mut self, nonblocking: bool) -> Result<bool, NftError> {
        self.buf.clear();
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        match self.sock.recv(&mut self.buf, flags) {
            Ok(len) if len > RECV_BUF => Err(NftError::Protocol(format!("reply of {len} bytes truncated"))),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.recv(nonblocking),
            Err(e) => Err(NftError::socket("receiving nftables reply", e)),
        }
    }

    /// Sends `batch` as one transaction and checks every message's acknowledgement.
    pub(super) fn commit(&mut self, batch: Batch) -> Result<(), BatchError> {
        let n = batch.msgs.len();
        if n == 0 {
            return Ok(());
        }
        let begin = self.next_seq(n as u32 + 2);
        let end = begin.wrapping_add(n as u32 + 1);
        let mut out = Msg::batch_delimiter(NFNL_MSG_BATCH_BEGIN).finish(begin);
        let mut contexts = Vec::with_capacity(n);
        for (i, (msg, context)) in batch.msgs.into_iter().enumerate() {
            out.extend_from_slice(&msg.finish(begin.wrapping_add(1 + i as u32)));
            contexts.push(context);
        }
        out.extend_from_slice(&Msg::batch_delimiter(NFNL_MSG_BATCH_END).finish(end));
        self.fit_buffers(out.len(), n);
        self.send(&out, "sending nftables batch")?;

        let mut acked = vec![false; n];
        // (index, errno, detail) of every failing message; the first one is the cause, the
        // later ones are usually its consequences.
        let mut failed: Option<(usize, i32, Option<String>)> = None;
        let mut batch_failed: Option<(i32, Option<String>)> = None;
        while self.recv(true)? {
            for reply in wire::replies(&self.buf) {
                let reply = reply.map_err(NftError::Protocol)?;
                if reply.ty != NLMSG_ERROR {
                    continue;
                }
                let err = wire::parse_error(&reply).map_err(NftError::Protocol)?;
                let index = reply.seq.wrapping_sub(begin).wrapping_sub(1) as usize;
                if index < n {
                    acked[index] = true;
                    if err.errno != 0 && failed.as_ref().is_none_or(|(i, _, _)| index < *i) {
                        failed = Some((index, err.errno, err.msg));
                    }
                } else if (reply.seq == begin || reply.seq == end) && err.errno != 0 {
                    batch_failed = Some((err.errno, err.msg));
                }
            }
        }
        if let Some((index, errno, detail)) = failed {
            let context = contexts.swap_remove(index);
            return Err(BatchError {
                index: Some(index),
                error: NftError::Kernel { context, errno, detail },
            });
        }
        if let Some((errno, detail)) = batch_failed {
            let context = "committing nftables batch".to_string();
            return Err(NftError::Kernel { context, errno, detail }.into());
        }
        if let Some(i) = acked.iter().position(|a| !a) {
            return Err(NftError::Protocol(format!("no acknowledgement for {}", contexts[i])).into());
        }
        Ok(())
    }

    /// Runs a dump request built by `build` and returns each reply's attributes (the bytes
    /// after the nfgenmsg header). Retried when a concurrent change interrupts it.
    pub(super) fn dump(&mut self, build: impl Fn() -> Msg, context: &str) -> Result<Vec<Vec<u8>>, NftError> {
        for _ in 0..DUMP_TRIES {
            let seq = self.next_seq(1);
            self.send(&build().finish(seq), context)?;
            let (mut out, mut interrupted) = (Vec::new(), false);
            let interrupted = loop {
                self.recv(false)?;
                match dump_step(&self.buf, seq, &mut out, &mut interrupted) {
                    Ok(DumpStep::More) => {}
                    Ok(DumpStep::Done { interrupted }) => break interrupted,
                    Err(DumpError::Kernel(errno, detail)) => {
                        let context = context.to_string();
                        return Err(NftError::Kernel { context, errno, detail });
                    }
                    Err(DumpError::Protocol(d)) => return Err(NftError::Protocol(d)),
                }
            };
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NftError::Protocol(format!(
            "{context}: dump interrupted {DUMP_TRIES} times by concurrent changes"
        )))
    }
}
