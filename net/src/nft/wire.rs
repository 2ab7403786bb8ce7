//! The nf_tables netlink wire format: the few constants we use, a message builder and a reader
//! for replies. Numbers come from `include/uapi/linux/netfilter/nf_tables.h` and
//! `nfnetlink.h`; only what the masquerade and the hostPorts need is here.

// netlink and the message builder and reader: shared with conntrack and NFLOG.
pub(super) use crate::nfnl::{
    attr, attrs, parse_error, replies, Msg, NLMSG_ERROR, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REQUEST,
};

// nfnetlink
const NFNL_SUBSYS_NFTABLES: u16 = 10;
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

/// One nf_tables message (the shared [`Msg`] with nf_tables' constructors).
impl Msg {
    pub(super) fn new(ty: MsgType, flags: u16) -> Self {
        Self::new_in(ty, flags, NFPROTO_INET)
    }

    /// A message about a table of `family` (`NFPROTO_INET`, `NFPROTO_BRIDGE`).
    pub(super) fn new_in(ty: MsgType, flags: u16, family: u8) -> Self {
        Self::raw(ty.nlmsg_type(), flags, family, NFNL_SUBSYS_NFTABLES)
    }

    /// A batch delimiter (BEGIN/END): `res_id` names the nf_tables subsystem.
    pub(super) fn batch_delimiter(ty: u16) -> Self {
        // Family AF_UNSPEC.
        Self::raw(ty, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES)
    }
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
