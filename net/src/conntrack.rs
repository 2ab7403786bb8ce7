//! The conntrack table (ctnetlink) of the calling thread's network namespace: dump it, delete
//! entries.
//!
//! Why: `trellisd`'s NetworkPolicy enforcer accepts `ct state established,related` before it
//! looks at the policy, so a flow that a policy change now denies would stay alive for as long
//! as it keeps sending (a UDP stream never times out). After a policy change the enforcer dumps
//! the node namespace's table ([`dump`]) and marks the entries of flows that the new policy no
//! longer allows ([`set_mark`]), whose packets the policy table then drops. Marking, not
//! deleting ([`delete`]): after a delete, an answer already in flight makes a new entry the
//! other way round, which the policy may allow, and the flow goes on (trellisd's first tests
//! showed exactly that with a UDP echo).
//!
//! Everything is synchronous and happens in the namespace of the calling thread: wrap calls in
//! [`crate::netns::run_in`] for another namespace.
//!
//! Pitfalls met on the way:
//! - A delete request *without* a tuple is a flush: `IPCTNL_MSG_CT_DELETE` with no
//!   `CTA_TUPLE_ORIG`/`CTA_TUPLE_REPLY` empties the whole table of the nfgenmsg family
//!   (AF_UNSPEC: both). [`delete`] therefore always sends `CTA_TUPLE_ORIG`, never an empty one.
//! - The kernel parses the tuple's addresses by the nfgenmsg family of the delete request, so it
//!   must be the tuple's AF_INET/AF_INET6; only the dump takes AF_UNSPEC (both families).
//! - ICMP entries are keyed by ICMP id, type and code rather than by ports, and an entry can
//!   carry a directional zone (`CTA_TUPLE_ZONE`) inside its tuple. Rather than model all of
//!   that, a [`Flow`] keeps the kernel's own `CTA_TUPLE_ORIG` payload and [`delete`] sends it
//!   back verbatim, which identifies the entry exactly for every protocol.
//! - The table is filled only once something in the namespace uses conntrack (an nftables
//!   `ct` expression, NAT, ...): the kernel registers conntrack's hooks per namespace on
//!   demand. A namespace without such a user dumps an empty table, without error (checked on
//!   Linux 6.18 with `nf_conntrack` and `nf_conntrack_netlink` built in; where ctnetlink is a
//!   module, nfnetlink asks for it on the first request).
//! - The zone attribute (`CTA_ZONE`) is only in a dump when the zone is not the default zone 0;
//!   a delete must name the entry's zone, or it looks in zone 0 and answers ENOENT.
//! - The kernel answers a `IPCTNL_MSG_CT_GET` dump with `IPCTNL_MSG_CT_NEW` messages, and a
//!   large table spans many datagrams (the tests dump 600 entries).
//! - Deleting an entry that timed out or was deleted meanwhile answers ENOENT: [`delete`]
//!   returns `Ok(false)`, so that a concurrent expiry is not an error.
//! - A dump interrupted by a concurrent change of the table carries `NLM_F_DUMP_INTR`: it is
//!   retried a few times before giving up with [`NetError::DumpInterrupted`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::nfnl::{align4, attr, unexpected, Conn, Msg, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use crate::NetError;

// nfnetlink and ctnetlink (nfnetlink.h, nfnetlink_conntrack.h)
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One side of a connection as conntrack records it.
///
/// Ports are 0 where the protocol has none (ICMP, GRE, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number (`libc::IPPROTO_UDP`, ...).
    pub proto: u8,
    /// Source port (0 when the protocol has none).
    pub sport: u16,
    /// Destination port (0 when the protocol has none).
    pub dport: u16,
}

impl fmt::Display for Tuple {
    /// `udp 10.0.0.1:5000 -> 10.0.0.2:53`, `icmp 10.0.0.1 -> 10.0.0.2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match i32::from(self.proto) {
            libc::IPPROTO_TCP => "tcp".to_string(),
            libc::IPPROTO_UDP => "udp".to_string(),
            libc::IPPROTO_SCTP => "sctp".to_string(),
            libc::IPPROTO_ICMP => "icmp".to_string(),
            libc::IPPROTO_ICMPV6 => "icmpv6".to_string(),
            n => format!("proto {n}"),
        };
        if self.sport == 0 && self.dport == 0 {
            write!(f, "{name} {} -> {}", self.src, self.dst)
        } else {
            let (s, d) = (
                SocketAddr::new(self.src, self.sport),
                SocketAddr::new(self.dst, self.dport),
            );
            write!(f, "{name} {s} -> {d}")
        }
    }
}

/// One conntrack entry: its original and reply tuples and its zone.
///
/// Obtained from [`dump`] only: it also keeps the kernel's encoding of the original tuple,
/// which [`delete`] sends back to identify the entry exactly (ICMP id/type/code, directional
/// zones). Two flows are equal when the kernel described them identically.
#[derive(Clone, PartialEq, Eq)]
pub struct Flow {
    /// The direction of the first packet.
    pub orig: Tuple,
    /// The direction of the answers (addresses swapped, NAT applied).
    pub reply: Tuple,
    /// The conntrack zone (0: the default zone).
    pub zone: u16,
    /// The connection's mark (`ct mark`).
    pub mark: u32,
    /// The `CTA_TUPLE_ORIG` payload as the kernel dumped it.
    raw_orig: Vec<u8>,
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow")
            .field("orig", &self.orig)
            .field("reply", &self.reply)
            .field("zone", &self.zone)
            .field("mark", &self.mark)
            .finish()
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.orig)?;
        if self.zone != 0 {
            write!(f, " zone {}", self.zone)?;
        }
        Ok(())
    }
}

/// Every flow in the calling thread's namespace, both families.
pub fn dump() -> Result<Vec<Flow>, NetError> {
    Conn::open()?.dump_flows()
}

/// Deletes the entry whose original tuple (and zone) is `flow`'s; `Ok(false)` when it is
/// already gone (ENOENT).
///
/// The tuple sent is the kernel's own encoding kept from the dump (so ICMP ids and directional
/// zones match exactly), not a re-encoding of `flow.orig`; `flow.zone` is sent as it is.
pub fn delete(flow: &Flow) -> Result<bool, NetError> {
    Conn::open()?.delete(flow)
}

/// Sets the bits `mask` of the entry's mark to those of `value` (the other bits are kept);
/// `Ok(false)` when the entry is gone. The entry stays: unlike a delete, no packet in flight
/// can make it again (a reply arriving after a delete starts a new connection the other way).
pub fn set_mark(flow: &Flow, value: u32, mask: u32) -> Result<bool, NetError> {
    Conn::open()?.set_mark(flow, value, mask)
}

/// Deletes every flow for which `pred` is true; returns how many were deleted (entries that
/// expired between the dump and the delete are not counted).
pub fn delete_where(pred: impl Fn(&Flow) -> bool) -> Result<usize, NetError> {
    let mut conn = Conn::open()?;
    let mut deleted = 0;
    for flow in conn.dump_flows()?.iter().filter(|f| pred(f)) {
        if conn.delete(flow)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// A tuple (`CTA_TUPLE_ORIG`/`CTA_TUPLE_REPLY` payload).
fn parse_tuple(buf: &[u8]) -> Result<Tuple, String> {
    let ip = attr(buf, CTA_TUPLE_IP).ok_or("tuple without CTA_TUPLE_IP")?;
    let v4 = |b: &[u8]| -> Option<IpAddr> { Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))) };
    let v6 = |b: &[u8]| -> Option<IpAddr> { Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))) };
    let (src, dst) = match (attr(ip, CTA_IP_V4_SRC), attr(ip, CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (v4(s), v4(d)),
        _ => (
            attr(ip, CTA_IP_V6_SRC).and_then(v6),
            attr(ip, CTA_IP_V6_DST).and_then(v6),
        ),
    };
    let (Some(src), Some(dst)) = (src, dst) else {
        return Err("tuple without a pair of IPv4 or IPv6 addresses".into());
    };
    let proto = attr(buf, CTA_TUPLE_PROTO).ok_or("tuple without CTA_TUPLE_PROTO")?;
    let num = attr(proto, CTA_PROTO_NUM)
        .and_then(|b| b.first().copied())
        .ok_or("tuple without CTA_PROTO_NUM")?;
    let port = |ty| {
        attr(proto, ty)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map_or(0, u16::from_be_bytes)
    };
    Ok(Tuple {
        src,
        dst,
        proto: num,
        sport: port(CTA_PROTO_SRC_PORT),
        dport: port(CTA_PROTO_DST_PORT),
    })
}

/// One conntrack entry from a dump reply's attributes (after the nfgenmsg header).
fn parse_flow(buf: &[u8]) -> Result<Flow, String> {
    let orig = attr(buf, CTA_TUPLE_ORIG).ok_or("entry without CTA_TUPLE_ORIG")?;
    let reply = attr(buf, CTA_TUPLE_REPLY).ok_or("entry without CTA_TUPLE_REPLY")?;
    let zone = attr(buf, CTA_ZONE)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map_or(0, u16::from_be_bytes);
    Ok(Flow {
        orig: parse_tuple(orig)?,
        reply: parse_tuple(reply)?,
        zone,
        mark: attr(buf, CTA_MARK)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes),
        raw_orig: orig.to_vec(),
    })
}

/// Conntrack's requests on the shared nfnetlink socket.
impl Conn {
    fn dump_flows(&mut self) -> Result<Vec<Flow>, NetError> {
        const WHAT: &str = "dumping conntrack";
        // The kernel answers a GET dump with IPCTNL_MSG_CT_NEW messages.
        let request = || {
            Msg::nfnl(
                NFNL_SUBSYS_CTNETLINK,
                IPCTNL_MSG_CT_GET,
                NLM_F_REQUEST | NLM_F_DUMP,
                libc::AF_UNSPEC as u8,
                0,
            )
        };
        self.dump(request, WHAT)?
            .iter()
            .map(|attrs| parse_flow(attrs).map_err(|d| unexpected(WHAT, d)))
            .collect()
    }

    fn delete(&mut self, flow: &Flow) -> Result<bool, NetError> {
        let what = format!("deleting conntrack entry {flow}");
        let msg = self.entry_msg(flow, IPCTNL_MSG_CT_DELETE, &what)?;
        self.ask(msg, &what)
    }

    fn set_mark(&mut self, flow: &Flow, value: u32, mask: u32) -> Result<bool, NetError> {
        let what = format!("marking conntrack entry {flow}");
        // CT_NEW without NLM_F_CREATE changes an existing entry, and only that.
        let mut msg = self.entry_msg(flow, IPCTNL_MSG_CT_NEW, &what)?;
        msg.bytes(CTA_MARK, &(value & mask).to_be_bytes());
        msg.bytes(CTA_MARK_MASK, &mask.to_be_bytes());
        self.ask(msg, &what)
    }

    /// A request about `flow`'s entry: its original tuple and zone.
    fn entry_msg(&self, flow: &Flow, ty: u16, what: &str) -> Result<Msg, NetError> {
        let family = match flow.orig.src {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        } as u8;
        if flow.raw_orig.is_empty() {
            // Never send a delete without a tuple: that flushes the whole table.
            return Err(NetError::InvalidArgument(format!("{what}: no original tuple")));
        }
        let mut msg = Msg::nfnl(NFNL_SUBSYS_CTNETLINK, ty, NLM_F_REQUEST | NLM_F_ACK, family, 0);
        msg.begin(CTA_TUPLE_ORIG);
        msg.buf.extend_from_slice(&flow.raw_orig);
        msg.buf.resize(align4(msg.buf.len()), 0);
        msg.end();
        msg.bytes(CTA_ZONE, &flow.zone.to_be_bytes());
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnl::replies;

    /// A dumped entry as the kernel encodes it: orig udp 10.0.0.1:5000 -> 10.0.0.2:53, zone 7.
    fn entry() -> Vec<u8> {
        let mut m = Msg::nfnl(NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_NEW, 0, libc::AF_INET as u8, 0);
        for (ty, (s, d, sp, dp)) in [
            (CTA_TUPLE_ORIG, ([10, 0, 0, 1], [10, 0, 0, 2], 5000u16, 53u16)),
            (CTA_TUPLE_REPLY, ([10, 0, 0, 2], [10, 0, 0, 1], 53, 5000)),
        ] {
            m.begin(ty);
            m.begin(CTA_TUPLE_IP)
                .bytes(CTA_IP_V4_SRC, &s)
                .bytes(CTA_IP_V4_DST, &d)
                .end();
            m.begin(CTA_TUPLE_PROTO)
                .bytes(CTA_PROTO_NUM, &[17])
                .bytes(CTA_PROTO_SRC_PORT, &sp.to_be_bytes())
                .bytes(CTA_PROTO_DST_PORT, &dp.to_be_bytes())
                .end();
            m.end();
        }
        m.bytes(CTA_ZONE, &7u16.to_be_bytes());
        m.finish(1)
    }

    #[test]
    fn parses_a_dumped_entry() {
        let b = entry();
        let r = replies(&b).next().unwrap().unwrap();
        let flow = parse_flow(&r.payload[4..]).unwrap();
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            flow.orig,
            Tuple {
                src: a("10.0.0.1"),
                dst: a("10.0.0.2"),
                proto: 17,
                sport: 5000,
                dport: 53
            }
        );
        assert_eq!(flow.reply.sport, 53);
        assert_eq!(flow.reply.src, a("10.0.0.2"));
        assert_eq!(flow.zone, 7);
        assert_eq!(flow.to_string(), "udp 10.0.0.1:5000 -> 10.0.0.2:53 zone 7");
        let v6 = Tuple {
            src: a("::1"),
            dst: a("::1"),
            proto: 58,
            sport: 0,
            dport: 0,
        };
        assert_eq!(v6.to_string(), "icmpv6 ::1 -> ::1");
    }

    #[test]
    fn delete_sends_the_dumped_tuple_back() {
        let b = entry();
        let r = replies(&b).next().unwrap().unwrap();
        let flow = parse_flow(&r.payload[4..]).unwrap();
        let mut m = Msg::nfnl(
            NFNL_SUBSYS_CTNETLINK,
            IPCTNL_MSG_CT_DELETE,
            NLM_F_REQUEST | NLM_F_ACK,
            libc::AF_INET as u8,
            0,
        );
        m.begin(CTA_TUPLE_ORIG);
        m.buf.extend_from_slice(&flow.raw_orig);
        m.end();
        let out = m.finish(2);
        let r = replies(&out).next().unwrap().unwrap();
        let orig = attr(&r.payload[4..], CTA_TUPLE_ORIG).unwrap();
        assert_eq!(parse_tuple(orig).unwrap(), flow.orig);
    }
}
