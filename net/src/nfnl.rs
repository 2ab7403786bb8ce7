//! nfnetlink, the little of it that the conntrack and NFLOG modules share: one
//! NETLINK_NETFILTER socket in the calling thread's namespace, requests built attribute by
//! attribute, replies split and parsed. (nftables has its own, batch-shaped, in `nft::conn`.)

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
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNETLINK_V0: u8 = 0;
pub(crate) const RECV_BUF: usize = 64 * 1024;

pub(crate) fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An nfnetlink request: netlink header, nfgenmsg, attributes.
pub(crate) struct Msg {
    pub(crate) buf: Vec<u8>,
    open: Vec<usize>,
}

impl Msg {
    /// Message `msg` of subsystem `subsys`, for `family`, about resource `res_id` (NFLOG's group).
    pub(crate) fn new(subsys: u16, msg: u16, flags: u16, family: u8, res_id: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&((subsys << 8) | msg).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set in finish()
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[family, NFNETLINK_V0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf, open: Vec::new() }
    }

    pub(crate) fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

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

/// Splits a datagram into netlink messages.
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

pub(crate) fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// An NLMSG_ERROR payload: the errno (0 for an ack) and the extended-ack text, if any.
pub(crate) fn parse_error(reply: &Reply<'_>) -> Result<(i32, Option<String>), String> {
    let p = reply.payload;
    if p.len() < 4 + NLMSG_HDRLEN {
        return Err("truncated NLMSG_ERROR".into());
    }
    let errno = -i32::from_ne_bytes(p[0..4].try_into().unwrap());
    let mut msg = None;
    if reply.flags & NLM_F_ACK_TLVS != 0 {
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
    Ok((errno, msg))
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
                let (errno, msg) = parse_error(&reply).map_err(|d| unexpected(&what, d))?;
                return match errno {
                    0 => Ok(true),
                    libc::ENOENT => Ok(false),
                    errno => Err(kernel(&what, errno, msg)),
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
