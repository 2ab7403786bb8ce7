//! nfnetlink, what nftables (`nft`), conntrack and NFLOG share: messages built attribute by
//! attribute, replies split and parsed, dump replies gathered; and, for conntrack and NFLOG,
//! one request-and-answer NETLINK_NETFILTER socket in the calling thread's namespace
//! (nftables' own, batch-shaped, is `nft::conn`).

use std::io;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

use crate::NetError;

// netlink (include/uapi/linux/netlink.h)
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
/// In an NLMSG_ERROR reply: the kernel appended extended-ack attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// In an NLMSG_ERROR reply: the original message was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNETLINK_V0: u8 = 0;
pub(crate) const RECV_BUF: usize = 64 * 1024;
/// A dump interrupted by a concurrent change (NLM_F_DUMP_INTR) is retried this many times.
pub(crate) const DUMP_TRIES: u32 = 10;

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One nfnetlink message being built: netlink header, nfgenmsg, then attributes. The sequence
/// number is set by [`Msg::finish`].
pub(crate) struct Msg {
    pub(crate) buf: Vec<u8>,
    open: Vec<usize>,
}

impl Msg {
    /// Message `nlmsg_type` (subsystem in the high byte) for `family`, about resource `res_id`
    /// (NFLOG's group; nftables' subsystem in a batch delimiter).
    pub(crate) fn raw(nlmsg_type: u16, flags: u16, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&nlmsg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set in finish()
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[family, NFNETLINK_V0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf, open: Vec::new() }
    }

    /// Message `msg` of subsystem `subsys`.
    pub(crate) fn nfnl(subsys: u16, msg: u16, flags: u16, family: u8, res_id: u16) -> Self {
        Self::raw((subsys << 8) | msg, flags, family, res_id)
    }

    pub(crate) fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.bytes(ty, &data)
    }

    /// A 32-bit attribute in network byte order (nf_tables uses big-endian for all of them).
    pub(crate) fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// Opens a nested attribute; close it with [`Msg::end`].
    pub(crate) fn begin(&mut self, ty: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub(crate) fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("Msg::end without Msg::begin");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Sets the sequence number and length and returns the encoded message.
    pub(crate) fn finish(mut self, seq: u32) -> Vec<u8> {
        assert!(self.open.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A netlink message read from the socket.
pub(crate) struct Reply<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    /// Everything after the netlink header.
    pub(crate) payload: &'a [u8],
}

/// Splits a datagram into netlink messages; stops at the first malformed one.
pub(crate) fn replies(mut buf: &[u8]) -> impl Iterator<Item = Result<Reply<'_>, String>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        if buf.len() < NLMSG_HDRLEN {
            buf = &[];
            return Some(Err("truncated netlink header".into()));
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            buf = &[];
            return Some(Err(format!("bad netlink message length {len}")));
        }
        let reply = Reply {
            ty: u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(buf[8..12].try_into().unwrap()),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok(reply))
    })
}

/// The attributes in `buf` as (type without flag bits, value); stops at a malformed one.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, value))
    })
}

/// The first attribute of type `ty` in `buf`.
pub(crate) fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// An NLMSG_ERROR payload: the errno (0 for an ack) and the kernel's extended-ack text if any.
pub(crate) struct ErrorReply {
    pub(crate) errno: i32,
    pub(crate) msg: Option<String>,
}

pub(crate) fn parse_error(reply: &Reply<'_>) -> Result<ErrorReply, String> {
    let p = reply.payload;
    if p.len() < 4 + NLMSG_HDRLEN {
        return Err("truncated NLMSG_ERROR".into());
    }
    let error = i32::from_ne_bytes(p[0..4].try_into().unwrap());
    let mut msg = None;
    if reply.flags & NLM_F_ACK_TLVS != 0 {
        // The original message follows: only its header when capped, else all of it.
        let orig_len = if reply.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            u32::from_ne_bytes(p[4..8].try_into().unwrap()) as usize
        };
        let tlvs = p.get(4 + align4(orig_len)..).unwrap_or(&[]);
        msg = attr(tlvs, NLMSGERR_ATTR_MSG)
            .map(|m| String::from_utf8_lossy(m.split(|b| *b == 0).next().unwrap_or(&[])).into_owned())
            .filter(|m| !m.is_empty());
    }
    Ok(ErrorReply { errno: -error, msg })
}

/// What one datagram of a dump's replies did to the dump: the attributes (after the nfgenmsg
/// header) of each message of request `seq` are added to `out`.
pub(crate) enum DumpStep {
    /// More datagrams follow.
    More,
    /// NLMSG_DONE: complete; `interrupted` when a concurrent change cut it (NLM_F_DUMP_INTR).
    Done { interrupted: bool },
}

/// Why a dump failed: the kernel's errno (and extended-ack text), or a malformed reply.
pub(crate) enum DumpError {
    Kernel(i32, Option<String>),
    Protocol(String),
}

/// Reads one datagram `buf` of the replies to dump request `seq` (stale replies to earlier
/// requests are skipped); `interrupted` gathers NLM_F_DUMP_INTR across datagrams.
pub(crate) fn dump_step(
    buf: &[u8],
    seq: u32,
    out: &mut Vec<Vec<u8>>,
    interrupted: &mut bool,
) -> Result<DumpStep, DumpError> {
    for reply in replies(buf) {
        let reply = reply.map_err(DumpError::Protocol)?;
        if reply.seq != seq {
            continue;
        }
        *interrupted |= reply.flags & NLM_F_DUMP_INTR != 0;
        match reply.ty {
            NLMSG_DONE => {
                let errno = reply
                    .payload
                    .get(0..4)
                    .map_or(0, |b| -i32::from_ne_bytes(b.try_into().unwrap()));
                if errno > 0 {
                    return Err(DumpError::Kernel(errno, None));
                }
                return Ok(DumpStep::Done {
                    interrupted: *interrupted,
                });
            }
            NLMSG_ERROR => {
                let err = parse_error(&reply).map_err(DumpError::Protocol)?;
                if err.errno != 0 {
                    return Err(DumpError::Kernel(err.errno, err.msg));
                }
            }
            _ => out.push(reply.payload.get(4..).unwrap_or(&[]).to_vec()),
        }
    }
    Ok(DumpStep::More)
}

/// A NETLINK_NETFILTER socket in the calling thread's namespace.
pub(crate) struct Conn {
    pub(crate) sock: Socket,
    seq: u32,
    pub(crate) buf: Vec<u8>,
}

impl Conn {
    pub(crate) fn open() -> Result<Self, NetError> {
        let open = || -> io::Result<Socket> {
            let mut sock = Socket::new(NETLINK_NETFILTER)?;
            sock.bind_auto()?;
            sock.set_ext_ack(true)?;
            sock.set_cap_ack(true)?;
            Ok(sock)
        };
        let sock = open().map_err(|e| NetError::io("opening a netfilter netlink socket", e))?;
        Ok(Conn {
            sock,
            seq: 1,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    pub(crate) fn send(&mut self, msg: Msg, what: &str) -> Result<u32, NetError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let buf = msg.finish(seq);
        let sent = self.sock.send(&buf, 0).map_err(|e| NetError::io(what, e))?;
        if sent != buf.len() {
            return Err(unexpected(what, format!("short send ({sent} of {} bytes)", buf.len())));
        }
        Ok(seq)
    }

    /// Reads one datagram into `self.buf` (blocking).
    pub(crate) fn recv(&mut self, what: &str) -> Result<(), NetError> {
        loop {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(len) if len > RECV_BUF => {
                    return Err(unexpected(what, format!("reply of {len} bytes truncated")));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::io(what, e)),
            }
        }
    }

    /// Runs the dump request `build` makes; each reply's attributes. Retried when a
    /// concurrent change interrupts it.
    pub(crate) fn dump(&mut self, build: impl Fn() -> Msg, what: &str) -> Result<Vec<Vec<u8>>, NetError> {
        for _ in 0..DUMP_TRIES {
            let seq = self.send(build(), what)?;
            let (mut out, mut interrupted) = (Vec::new(), false);
            let interrupted = loop {
                self.recv(what)?;
                match dump_step(&self.buf, seq, &mut out, &mut interrupted) {
                    Ok(DumpStep::More) => {}
                    Ok(DumpStep::Done { interrupted }) => break interrupted,
                    Err(DumpError::Kernel(errno, msg)) => return Err(kernel(what, errno, msg)),
                    Err(DumpError::Protocol(d)) => return Err(unexpected(what, d)),
                }
            };
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NetError::DumpInterrupted {
            what: what.into(),
            attempts: DUMP_TRIES,
        })
    }

    /// Sends `msg` and waits for its acknowledgement: `Ok(false)` for ENOENT.
    pub(crate) fn ask(&mut self, msg: Msg, what: &str) -> Result<bool, NetError> {
        let what = what.to_string();
        let seq = self.send(msg, &what)?;
        loop {
            self.recv(&what)?;
            for reply in replies(&self.buf) {
                let reply = reply.map_err(|d| unexpected(&what, d))?;
                if reply.seq != seq || reply.ty != NLMSG_ERROR {
                    continue;
                }
                let err = parse_error(&reply).map_err(|d| unexpected(&what, d))?;
                return match err.errno {
                    0 => Ok(true),
                    libc::ENOENT => Ok(false),
                    errno => Err(kernel(&what, errno, err.msg)),
                };
            }
        }
    }
}

pub(crate) fn kernel(what: &str, errno: i32, extack: Option<String>) -> NetError {
    NetError::Netlink {
        what: what.into(),
        errno,
        extack,
    }
}

pub(crate) fn unexpected(what: &str, detail: impl Into<String>) -> NetError {
    NetError::UnexpectedReply {
        what: what.into(),
        detail: detail.into(),
    }
}
