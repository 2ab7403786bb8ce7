//! The nf_tables objects of the masquerade, as netlink messages: the table, its chain, its
//! sets, its rules and set elements.

use super::interval::{Bound, Family};
use super::wire::*;

pub(super) const CHAIN: &str = "postrouting";

/// What a set of the masquerade holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SetKind {
    /// Single pod addresses to masquerade (hash set: O(1) add, delete and lookup).
    Sources,
    /// Source prefixes to masquerade, e.g. a node's pod CIDR (interval set).
    SourcePrefixes,
    /// Destinations never masqueraded: the pod subnet, the cluster CIDR (interval set).
    ExemptDestinations,
}

impl SetKind {
    pub(super) const ALL: [SetKind; 3] = [SetKind::Sources, SetKind::SourcePrefixes, SetKind::ExemptDestinations];

    pub(super) fn name(self, fam: Family) -> &'static str {
        match (self, fam) {
            (SetKind::Sources, Family::V4) => "masq4",
            (SetKind::Sources, Family::V6) => "masq6",
            (SetKind::SourcePrefixes, Family::V4) => "masq_net4",
            (SetKind::SourcePrefixes, Family::V6) => "masq_net6",
            (SetKind::ExemptDestinations, Family::V4) => "nomasq_dst4",
            (SetKind::ExemptDestinations, Family::V6) => "nomasq_dst6",
        }
    }

    pub(super) fn is_interval(self) -> bool {
        self != SetKind::Sources
    }
}

/// Geometry of one family's network header.
pub(super) struct Header {
    pub(super) nfproto: u8,
    pub(super) saddr_offset: u32,
    pub(super) daddr_offset: u32,
    pub(super) addr_len: u32,
    pub(super) key_type: u32,
}

pub(super) fn header(fam: Family) -> Header {
    match fam {
        Family::V4 => Header {
            nfproto: NFPROTO_IPV4,
            saddr_offset: 12,
            daddr_offset: 16,
            addr_len: 4,
            key_type: NFT_TYPE_IPADDR,
        },
        Family::V6 => Header {
            nfproto: NFPROTO_IPV6,
            saddr_offset: 8,
            daddr_offset: 24,
            addr_len: 16,
            key_type: NFT_TYPE_IP6ADDR,
        },
    }
}

const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
const DELETE: u16 = NLM_F_REQUEST | NLM_F_ACK;

pub(super) fn new_table(table: &str) -> Msg {
    let mut m = Msg::new(MsgType::NewTable, CREATE);
    m.str(NFTA_TABLE_NAME, table);
    m
}

pub(super) fn del_table(table: &str) -> Msg {
    let mut m = Msg::new(MsgType::DelTable, DELETE);
    m.str(NFTA_TABLE_NAME, table);
    m
}

/// `chain postrouting { type nat hook postrouting priority srcnat; }`
pub(super) fn new_chain(table: &str) -> Msg {
    let mut m = Msg::new(MsgType::NewChain, CREATE);
    m.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, CHAIN);
    m.begin(NFTA_CHAIN_HOOK)
        .u32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING)
        .u32(NFTA_HOOK_PRIORITY, NF_PRI_NAT_SRC as u32)
        .end();
    m.str(NFTA_CHAIN_TYPE, "nat");
    m
}

/// Deletes every rule of the chain (`flush chain`).
pub(super) fn flush_chain(table: &str) -> Msg {
    let mut m = Msg::new(MsgType::DelRule, DELETE);
    m.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, CHAIN);
    m
}

/// `set NAME { type ipv4_addr; [flags interval;] }`; `id` is unique within the batch.
pub(super) fn new_set(table: &str, kind: SetKind, fam: Family, id: u32) -> Msg {
    let h = header(fam);
    let mut m = Msg::new(MsgType::NewSet, CREATE);
    m.str(NFTA_SET_TABLE, table)
        .str(NFTA_SET_NAME, kind.name(fam))
        .u32(NFTA_SET_FLAGS, if kind.is_interval() { NFT_SET_INTERVAL } else { 0 })
        .u32(NFTA_SET_KEY_TYPE, h.key_type)
        .u32(NFTA_SET_KEY_LEN, h.addr_len)
        .u32(NFTA_SET_ID, id);
    m
}

/// The comment that tags each of our rules. [`Masquerade::ensure`] leaves the chain alone
/// when it holds exactly the rules with these comments, in this order; bump the version when
/// the rules change, so that an upgrade replaces them.
///
/// [`Masquerade::ensure`]: super::Masquerade::ensure
pub(super) fn rule_comment(fam: Family, sources: SetKind) -> String {
    format!("trellis masquerade v1 {}", sources.name(fam))
}

/// `ip saddr @SOURCES ip daddr != @EXEMPT counter masquerade comment "..."` (or `ip6`).
/// In an inet table the family test (`meta nfproto`) comes first, as nft(8) makes it.
pub(super) fn new_rule(table: &str, fam: Family, sources: SetKind) -> Msg {
    let h = header(fam);
    let mut m = Msg::new(MsgType::NewRule, CREATE | NLM_F_APPEND);
    m.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, CHAIN);
    m.begin(NFTA_RULE_EXPRESSIONS);
    expr(&mut m, "meta", |m| {
        m.u32(NFTA_META_KEY, NFT_META_NFPROTO).u32(NFTA_META_DREG, NFT_REG_1);
    });
    expr(&mut m, "cmp", |m| {
        m.u32(NFTA_CMP_SREG, NFT_REG_1).u32(NFTA_CMP_OP, NFT_CMP_EQ);
        m.begin(NFTA_CMP_DATA).bytes(NFTA_DATA_VALUE, &[h.nfproto]).end();
    });
    for (offset, set, inverted) in [
        (h.saddr_offset, sources, false),
        (h.daddr_offset, SetKind::ExemptDestinations, true),
    ] {
        expr(&mut m, "payload", |m| {
            m.u32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                .u32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
                .u32(NFTA_PAYLOAD_OFFSET, offset)
                .u32(NFTA_PAYLOAD_LEN, h.addr_len);
        });
        expr(&mut m, "lookup", |m| {
            m.str(NFTA_LOOKUP_SET, set.name(fam)).u32(NFTA_LOOKUP_SREG, NFT_REG_1);
            if inverted {
                m.u32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
            }
        });
    }
    expr(&mut m, "counter", |_| {});
    expr(&mut m, "masq", |_| {});
    m.end();
    // A comment in libnftnl's user-data format, for whoever reads `nft list ruleset`.
    let comment = rule_comment(fam, sources);
    let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, comment.len() as u8 + 1];
    udata.extend_from_slice(comment.as_bytes());
    udata.push(0);
    m.bytes(NFTA_RULE_USERDATA, &udata);
    m
}

/// A dump request for the rules of our chain.
pub(super) fn get_rules(table: &str) -> Msg {
    let mut m = Msg::new(MsgType::GetRule, NLM_F_REQUEST | NLM_F_DUMP);
    m.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, CHAIN);
    m
}

/// The comment of a rule in a dump reply (its attributes), if it has one.
pub(super) fn parse_rule_comment(attrs_buf: &[u8]) -> Option<String> {
    let mut udata = attr(attrs_buf, NFTA_RULE_USERDATA)?;
    // libnftnl TLVs: type (u8), length (u8), value.
    while let [ty, len, rest @ ..] = udata {
        let value = rest.get(..*len as usize)?;
        if *ty == NFTNL_UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or(&[]);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &rest[*len as usize..];
    }
    None
}

pub(super) fn expr(m: &mut Msg, name: &str, data: impl FnOnce(&mut Msg)) {
    m.begin(NFTA_LIST_ELEM).str(NFTA_EXPR_NAME, name).begin(NFTA_EXPR_DATA);
    data(m);
    m.end().end();
}

/// NEWSETELEM or DELSETELEM of `bounds` in set `set`.
pub(super) fn set_elems(ty: MsgType, table: &str, set: &str, fam: Family, bounds: &[Bound]) -> Msg {
    let mut m = Msg::new(
        ty,
        if matches!(ty, MsgType::NewSetElem) {
            CREATE
        } else {
            DELETE
        },
    );
    m.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    for b in bounds {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY).bytes(NFTA_DATA_VALUE, &fam.key(b.key)).end();
        if b.end {
            m.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
        m.end();
    }
    m.end();
    m
}

/// A dump request for the elements of `set`.
pub(super) fn get_set_elems(table: &str, set: &str) -> Msg {
    let mut m = Msg::new(MsgType::GetSetElem, NLM_F_REQUEST | NLM_F_DUMP);
    m.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set);
    m
}

/// The elements in one NEWSETELEM dump reply (its attributes).
pub(super) fn parse_set_elems(fam: Family, attrs_buf: &[u8]) -> Result<Vec<Bound>, String> {
    let Some(list) = attr(attrs_buf, NFTA_SET_ELEM_LIST_ELEMENTS) else {
        return Ok(Vec::new());
    };
    attrs(list)
        .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
        .map(|(_, elem)| {
            let key = attr(elem, NFTA_SET_ELEM_KEY)
                .and_then(|k| attr(k, NFTA_DATA_VALUE))
                .and_then(|k| fam.parse_key(k))
                .ok_or("set element without a valid key")?;
            let flags = attr(elem, NFTA_SET_ELEM_FLAGS)
                .and_then(|f| f.try_into().ok())
                .map_or(0, u32::from_be_bytes);
            Ok(Bound {
                key,
                end: flags & NFT_SET_ELEM_INTERVAL_END != 0,
            })
        })
        .collect()
}
