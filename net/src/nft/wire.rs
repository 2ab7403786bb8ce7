//! The nf_tables netlink wire format: the few constants we use, a message builder and a reader
//! for replies. Numbers come from `include/uapi/linux/netfilter/nf_tables.h` and
//! `nfnetlink.h`; only what the masquerade and the hostPorts need is here.

// netlink (include/uapi/linux/netlink.h)
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
pub(super) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_CREATE: u16 = 0x400;
pub(super) const NLM_F_APPEND: u16 = 0x800;
/// In an NLMSG_ERROR reply: the kernel appended extended-ack attributes.
pub(super) const NLM_F_ACK_TLVS: u16 = 0x200;
/// In an NLMSG_ERROR reply: the original message was cut to its header.
pub(super) const NLM_F_CAPPED: u16 = 0x100;
pub(super) const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// nfnetlink
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNETLINK_V0: u8 = 0;
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
/// Table family `inet` (IPv4 and IPv6 in one table).
pub(super) const NFPROTO_INET: u8 = 1;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;
/// Table family `bridge` (frames crossing a bridge, per port).
pub(super) const NFPROTO_BRIDGE: u8 = 7;

/// nf_tables message types (`enum nf_tables_msg_types`).
#[derive(Clone, Copy, Debug)]
#[repr(u16)]
pub(super) enum MsgType {
    NewTable = 0,
    DelTable = 2,
    NewChain = 3,
    DelChain = 5,
    NewRule = 6,
    GetRule = 7,
    DelRule = 8,
    NewSet = 9,
    DelSet = 11,
    NewSetElem = 12,
    GetSetElem = 13,
    DelSetElem = 14,
}

impl MsgType {
    /// The nlmsg_type: subsystem in the high byte, message in the low byte.
    fn nlmsg_type(self) -> u16 {
        (NFNL_SUBSYS_NFTABLES << 8) | self as u16
    }
}

// NFTA_TABLE_*
pub(super) const NFTA_TABLE_NAME: u16 = 1;
// NFTA_CHAIN_*
pub(super) const NFTA_CHAIN_TABLE: u16 = 1;
pub(super) const NFTA_CHAIN_NAME: u16 = 3;
pub(super) const NFTA_CHAIN_HOOK: u16 = 4;
pub(super) const NFTA_CHAIN_TYPE: u16 = 7;
pub(super) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(super) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(super) const NF_INET_PRE_ROUTING: u32 = 0;
pub(super) const NF_INET_LOCAL_IN: u32 = 1;
pub(super) const NF_INET_FORWARD: u32 = 2;
/// Verdicts (`NF_DROP`, `NF_ACCEPT`).
pub(super) const NF_DROP: i32 = 0;
pub(super) const NF_ACCEPT: i32 = 1;
pub(super) const NF_INET_LOCAL_OUT: u32 = 3;
pub(super) const NF_INET_POST_ROUTING: u32 = 4;
/// `priority dstnat` (NF_IP_PRI_NAT_DST).
pub(super) const NF_PRI_NAT_DST: i32 = -100;
/// `priority srcnat` (NF_IP_PRI_NAT_SRC).
pub(super) const NF_PRI_NAT_SRC: i32 = 100;
// NFTA_RULE_*
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_RULE_USERDATA: u16 = 7;
/// libnftnl's rule user-data tag for a comment (`NFTNL_UDATA_RULE_COMMENT`).
pub(super) const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;
pub(super) const NFTA_DATA_VALUE: u16 = 1;
// expressions
pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFT_REG_1: u32 = 1;
/// The first 32-bit register: concatenations take one 32-bit register per field.
pub(super) const NFT_REG32_00: u32 = 8;
pub(super) const NFT_META_L4PROTO: u32 = 16;
pub(super) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub(super) const NFTA_LOOKUP_DREG: u16 = 3;
pub(super) const NFTA_IMMEDIATE_DREG: u16 = 1;
pub(super) const NFTA_IMMEDIATE_DATA: u16 = 2;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;
pub(super) const NFT_JUMP: i32 = -3;
pub(super) const NFT_RETURN: i32 = -5;
pub(super) const NFTA_FIB_DREG: u16 = 1;
pub(super) const NFTA_FIB_RESULT: u16 = 2;
pub(super) const NFTA_FIB_FLAGS: u16 = 3;
pub(super) const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub(super) const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// The route type of a local address, as `fib ... type` stores it (u32, host byte order).
pub(super) const RTN_LOCAL: u32 = 2;
pub(super) const NFTA_NAT_TYPE: u16 = 1;
pub(super) const NFTA_NAT_FAMILY: u16 = 2;
pub(super) const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
pub(super) const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
pub(super) const NFTA_NAT_FLAGS: u16 = 7;
pub(super) const NFT_NAT_DNAT: u32 = 1;
pub(super) const NF_NAT_RANGE_MAP_IPS: u32 = 1;
pub(super) const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
pub(super) const NFTA_META_DREG: u16 = 1;
pub(super) const NFTA_META_KEY: u16 = 2;
pub(super) const NFT_META_NFPROTO: u32 = 15;
pub(super) const NFTA_CMP_SREG: u16 = 1;
pub(super) const NFTA_CMP_OP: u16 = 2;
pub(super) const NFTA_CMP_DATA: u16 = 3;
pub(super) const NFT_CMP_EQ: u32 = 0;
pub(super) const NFTA_PAYLOAD_DREG: u16 = 1;
pub(super) const NFTA_PAYLOAD_BASE: u16 = 2;
pub(super) const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub(super) const NFTA_PAYLOAD_LEN: u16 = 4;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(super) const NFTA_LOOKUP_SET: u16 = 1;
pub(super) const NFTA_LOOKUP_SREG: u16 = 2;
pub(super) const NFTA_LOOKUP_FLAGS: u16 = 5;
pub(super) const NFT_LOOKUP_F_INV: u32 = 1;
// NFTA_SET_*
pub(super) const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
pub(super) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(super) const NFTA_SET_KEY_LEN: u16 = 5;
pub(super) const NFTA_SET_DATA_TYPE: u16 = 6;
pub(super) const NFTA_SET_DATA_LEN: u16 = 7;
pub(super) const NFTA_SET_ID: u16 = 10;
pub(super) const NFTA_SET_USERDATA: u16 = 13;
pub(super) const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_MAP: u32 = 0x8;
/// nft's datatype numbers, so that `nft list` prints the keys as addresses.
pub(super) const NFT_TYPE_IPADDR: u32 = 7;
pub(super) const NFT_TYPE_IP6ADDR: u32 = 8;
pub(super) const NFT_TYPE_INET_PROTOCOL: u32 = 12;
pub(super) const NFT_TYPE_INET_SERVICE: u32 = 13;
// NFTA_SET_ELEM_LIST_* and NFTA_SET_ELEM_*
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub(super) const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One nf_tables message being built: netlink header, nfgenmsg, then attributes.
/// The sequence number is filled in when the message is put into a batch.
pub(super) struct Msg {
    buf: Vec<u8>,
    open: Vec<usize>,
}

impl Msg {
    pub(super) fn new(ty: MsgType, flags: u16) -> Self {
        Self::raw(ty.nlmsg_type(), flags, NFPROTO_INET)
    }

    /// A message about a table of `family` (`NFPROTO_INET`, `NFPROTO_BRIDGE`).
    pub(super) fn new_in(ty: MsgType, flags: u16, family: u8) -> Self {
        Self::raw(ty.nlmsg_type(), flags, family)
    }

    /// A batch delimiter (BEGIN/END): `res_id` names the nf_tables subsystem.
    pub(super) fn batch_delimiter(ty: u16) -> Self {
        // Family AF_UNSPEC.
        Self::raw(ty, NLM_F_REQUEST, 0)
    }

    fn raw(nlmsg_type: u16, flags: u16, family: u8) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        buf.extend_from_slice(&nlmsg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[family, NFNETLINK_V0]);
        buf.extend_from_slice(&NFNL_SUBSYS_NFTABLES.to_be_bytes());
        Msg { buf, open: Vec::new() }
    }

    pub(super) fn bytes(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// A NUL-terminated string attribute.
    pub(super) fn str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.bytes(ty, &data)
    }

    /// A 32-bit attribute in network byte order (nf_tables uses big-endian for all of them).
    pub(super) fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.bytes(ty, &v.to_be_bytes())
    }

    /// Opens a nested attribute; close it with [`Msg::end`].
    pub(super) fn begin(&mut self, ty: u16) -> &mut Self {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub(super) fn end(&mut self) -> &mut Self {
        let start = self.open.pop().expect("Msg::end without Msg::begin");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Sets the sequence number and length and returns the encoded message.
    pub(super) fn finish(mut self, seq: u32) -> Vec<u8> {
        assert!(self.open.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A netlink message read from the socket.
pub(super) struct Reply<'a> {
    pub(super) ty: u16,
    pub(super) flags: u16,
    pub(super) seq: u32,
    /// Everything after the netlink header.
    pub(super) payload: &'a [u8],
}

/// Splits a datagram into netlink messages; stops at the first malformed one.
pub(super) fn replies(mut buf: &[u8]) -> impl Iterator<Item = Result<Reply<'_>, String>> {
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
pub(super) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
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
pub(super) fn attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

/// An NLMSG_ERROR payload: the errno (0 for an ack) and the kernel's extended-ack text if any.
pub(super) struct ErrorReply {
    pub(super) errno: i32,
    pub(super) msg: Option<String>,
}

pub(super) fn parse_error(reply: &Reply<'_>) -> Result<ErrorReply, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_wire_message_layout() {
        let mut m = Msg::new(MsgType::NewTable, NLM_F_REQUEST | NLM_F_ACK);
        m.str(NFTA_TABLE_NAME, "abc");
        m.begin(NFTA_CHAIN_HOOK).u32(NFTA_HOOK_HOOKNUM, 4).end();
        let b = m.finish(7);
        assert_eq!(b.len(), 16 + 4 + 8 + 12);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize, b.len());
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 10 << 8);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        assert_eq!(&b[16..20], &[NFPROTO_INET, 0, 0, 10]);
        let r = replies(&b).next().unwrap().unwrap();
        let got: Vec<_> = attrs(&r.payload[4..]).collect();
        assert_eq!(got[0], (NFTA_TABLE_NAME, &b"abc\0"[..]));
        assert_eq!(got[1].0, NFTA_CHAIN_HOOK);
        assert_eq!(attr(got[1].1, NFTA_HOOK_HOOKNUM), Some(&4u32.to_be_bytes()[..]));
    }
}
