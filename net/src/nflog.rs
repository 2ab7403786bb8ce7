//! NFLOG (nfnetlink_log): the packets an nftables `log group N` rule copies to user space, read
//! from the calling thread's network namespace.
//!
//! Why: trellisd's NetworkPolicy table can log the new connections it drops (off by default).
//! The kernel's own `log` (to the kernel log) is useless in a pod network: outside the first
//! network namespace it logs nothing unless `nf_log_all_netns` is set on the host, and it
//! cannot say which pod or policy. NFLOG hands the packet's first bytes and the rule's prefix
//! to trellisd, which knows the pods and writes one rate-limited line.
//!
//! Pitfalls: a group has one listener per namespace (a second bind answers EBUSY); the socket's
//! queue overflowing shows as ENOBUFS on the next receive, which [`Subscription::recv`] reports
//! as packets lost rather than an error; Linux older than 3.17 also wanted a "PF_BIND" per
//! family, which modern kernels ignore, so it is not sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nfnl::{attr, replies, unexpected, Conn, Msg, NLM_F_ACK, NLM_F_REQUEST};
use crate::NetError;

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;

/// One logged packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    /// The rule's `prefix`.
    pub prefix: String,
    /// The packet from its IP header on, cut at the copy range.
    pub packet: Vec<u8>,
}

/// What [`Subscription::recv`] got.
#[derive(Debug, Default)]
pub struct Received {
    pub packets: Vec<Logged>,
    /// The kernel dropped log messages: the socket's queue was full (ENOBUFS).
    pub lost: bool,
}

/// A listener on one NFLOG group.
pub struct Subscription {
    conn: Conn,
}

impl Subscription {
    /// Binds `group` in the calling thread's namespace, copying `copy` bytes of each packet
    /// (enough for the IP and transport headers: 80).
    pub fn bind(group: u16, copy: u32) -> Result<Subscription, NetError> {
        let mut conn = Conn::open()?;
        let config = |attr: u16, data: &[u8]| {
            let mut m = Msg::nfnl(
                NFNL_SUBSYS_ULOG,
                NFULNL_MSG_CONFIG,
                NLM_F_REQUEST | NLM_F_ACK,
                libc::AF_UNSPEC as u8,
                group,
            );
            m.bytes(attr, data);
            m
        };
        let what = format!("binding NFLOG group {group}");
        if !conn.ask(config(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND]), &what)? {
            return Err(unexpected(&what, "the kernel has no NFLOG (nfnetlink_log)"));
        }
        let mut mode = copy.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        conn.ask(
            config(NFULA_CFG_MODE, &mode),
            &format!("setting NFLOG group {group}'s copy mode"),
        )?;
        Ok(Subscription { conn })
    }

    /// Waits for the next datagram of log messages (blocking).
    pub fn recv(&mut self) -> Result<Received, NetError> {
        const WHAT: &str = "reading NFLOG";
        let mut out = Received::default();
        if let Err(e) = self.conn.recv(WHAT) {
            if e.errno() == Some(libc::ENOBUFS) {
                out.lost = true;
                return Ok(out);
            }
            return Err(e);
        }
        for reply in replies(&self.conn.buf) {
            let reply = reply.map_err(|d| unexpected(WHAT, d))?;
            if reply.ty != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET {
                continue;
            }
            let attrs = reply.payload.get(4..).unwrap_or(&[]);
            let prefix = attr(attrs, NFULA_PREFIX)
                .map(|p| String::from_utf8_lossy(p.split(|b| *b == 0).next().unwrap_or(&[])).into_owned())
                .unwrap_or_default();
            let packet = attr(attrs, NFULA_PAYLOAD).unwrap_or(&[]).to_vec();
            out.packets.push(Logged { prefix, packet });
        }
        Ok(out)
    }
}

/// A packet's addresses, IP protocol and ports (0 where it has none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// The addresses, protocol and ports of an IPv4 or IPv6 packet (IPv6 extension headers are not
/// followed: such a packet's ports read 0).
pub fn summarize(p: &[u8]) -> Option<Summary> {
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            (
                Ipv4Addr::from(src).into(),
                Ipv4Addr::from(dst).into(),
                *p.get(9)?,
                p.get(ihl..).unwrap_or(&[]),
            )
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            (
                Ipv6Addr::from(src).into(),
                Ipv6Addr::from(dst).into(),
                *p.get(6)?,
                p.get(40..).unwrap_or(&[]),
            )
        }
        _ => return None,
    };
    let ports = matches!(proto, 6 | 17 | 132)
        .then(|| {
            Some((
                u16::from_be_bytes(l4.get(0..2)?.try_into().ok()?),
                u16::from_be_bytes(l4.get(2..4)?.try_into().ok()?),
            ))
        })
        .flatten()
        .unwrap_or((0, 0));
    Some(Summary {
        src,
        dst,
        proto,
        sport: ports.0,
        dport: ports.1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarizes_ipv4_tcp_and_ipv6_udp_headers() {
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3];
        v4.extend_from_slice(&[0xc3, 0x50, 0, 80]);
        let s = summarize(&v4).unwrap();
        assert_eq!(
            (s.src.to_string(), s.dst.to_string()),
            ("10.244.1.2".into(), "10.244.2.3".into())
        );
        assert_eq!((s.proto, s.sport, s.dport), (6, 50000, 80));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x13, 0x88, 0, 81]);
        let s = summarize(&v6).unwrap();
        assert_eq!(
            (s.proto, s.sport, s.dport, s.dst.to_string()),
            (17, 5000, 81, "fd00::2".into())
        );
        assert_eq!(summarize(&[0x45, 0, 0]), None, "truncated");
    }
}
