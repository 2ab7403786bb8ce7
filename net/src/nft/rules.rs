//! Builders shared by the parts of Trellis's tables whose rules never change with pods and whose
//! per-pod state is set elements carrying their owner ([`super::HostPorts`],
//! [`super::AntiSpoof`]): chains, rules told apart by their comments, sets, and elements with an
//! owner comment, in any table family (`inet`, `bridge`).

use super::conn::Conn;
use super::interval::Family;
use super::objects::{expr, header};
use super::wire::*;
use super::NftError;

pub(super) const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
pub(super) const DELETE: u16 = NLM_F_REQUEST | NLM_F_ACK;

/// libnftnl's set-element user-data tag for a comment.
const UDATA_SET_ELEM_COMMENT: u8 = 0;

/// A base chain's hook: number, priority and chain type (`"nat"`, `"filter"`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Hook {
    pub(super) num: u32,
    pub(super) priority: i32,
    pub(super) kind: &'static str,
}

/// One set element as a dump returns it: key, data (maps), owner comment.
pub(super) type Elem = (Vec<u8>, Option<Vec<u8>>, Option<String>);

/// A table of one family, the messages about its objects.
#[derive(Clone, Copy, Debug)]
pub(super) struct Table<'a> {
    pub(super) family: u8,
    pub(super) name: &'a str,
}

impl Table<'_> {
    fn msg(&self, ty: MsgType, flags: u16) -> Msg {
        Msg::new_in(ty, flags, self.family)
    }

    /// `inet trellis`, `bridge trellis`: for error contexts.
    pub(super) fn describe(&self) -> String {
        let family = match self.family {
            NFPROTO_BRIDGE => "bridge",
            _ => "inet",
        };
        format!("{family} {}", self.name)
    }

    pub(super) fn new_table(&self) -> Msg {
        let mut m = self.msg(MsgType::NewTable, CREATE);
        m.str(NFTA_TABLE_NAME, self.name);
        m
    }

    /// A base chain (`hook`) or a regular one.
    pub(super) fn new_chain(&self, chain: &str, hook: Option<Hook>) -> Msg {
        let mut m = self.msg(MsgType::NewChain, CREATE);
        m.str(NFTA_CHAIN_TABLE, self.name).str(NFTA_CHAIN_NAME, chain);
        if let Some(h) = hook {
            m.begin(NFTA_CHAIN_HOOK)
                .u32(NFTA_HOOK_HOOKNUM, h.num)
                .u32(NFTA_HOOK_PRIORITY, h.priority as u32)
                .end();
            m.str(NFTA_CHAIN_TYPE, h.kind);
        }
        m
    }

    pub(super) fn flush_chain(&self, chain: &str) -> Msg {
        let mut m = self.msg(MsgType::DelRule, DELETE);
        m.str(NFTA_RULE_TABLE, self.name).str(NFTA_RULE_CHAIN, chain);
        m
    }

    pub(super) fn get_rules(&self, chain: &str) -> Msg {
        let mut m = self.msg(MsgType::GetRule, NLM_F_REQUEST | NLM_F_DUMP);
        m.str(NFTA_RULE_TABLE, self.name).str(NFTA_RULE_CHAIN, chain);
        m
    }

    /// A rule appended to `chain`, tagged with `comment` (how [`Table::rules_in_place`] knows it).
    pub(super) fn new_rule(&self, chain: &str, comment: &str, build: &dyn Fn(&mut Msg)) -> Msg {
        let mut m = self.msg(MsgType::NewRule, CREATE | NLM_F_APPEND);
        m.str(NFTA_RULE_TABLE, self.name).str(NFTA_RULE_CHAIN, chain);
        m.begin(NFTA_RULE_EXPRESSIONS);
        build(&mut m);
        m.end();
        let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, comment.len() as u8 + 1];
        udata.extend_from_slice(comment.as_bytes());
        udata.push(0);
        m.bytes(NFTA_RULE_USERDATA, &udata);
        m
    }

    /// A hash set (or map, with `data`) keyed by `key_type` of `key_len` bytes.
    pub(super) fn new_set(&self, set: &str, key_type: u32, key_len: u32, data: Option<(u32, u32)>, id: u32) -> Msg {
        let mut m = self.msg(MsgType::NewSet, CREATE);
        m.str(NFTA_SET_TABLE, self.name)
            .str(NFTA_SET_NAME, set)
            .u32(NFTA_SET_FLAGS, if data.is_some() { NFT_SET_MAP } else { 0 })
            .u32(NFTA_SET_KEY_TYPE, key_type)
            .u32(NFTA_SET_KEY_LEN, key_len);
        if let Some((ty, len)) = data {
            m.u32(NFTA_SET_DATA_TYPE, ty).u32(NFTA_SET_DATA_LEN, len);
        }
        m.u32(NFTA_SET_ID, id);
        m
    }

    /// NEWSETELEM or DELSETELEM of (key, data) elements, each with `owner` as its comment.
    pub(super) fn elems(
        &self,
        ty: MsgType,
        set: &str,
        elems: &[(Vec<u8>, Option<Vec<u8>>)],
        owner: Option<&str>,
    ) -> Msg {
        let mut m = self.msg(
            ty,
            if matches!(ty, MsgType::NewSetElem) {
                CREATE
            } else {
                DELETE
            },
        );
        m.str(NFTA_SET_ELEM_LIST_TABLE, self.name)
            .str(NFTA_SET_ELEM_LIST_SET, set);
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (key, data) in elems {
            m.begin(NFTA_LIST_ELEM);
            m.begin(NFTA_SET_ELEM_KEY).bytes(NFTA_DATA_VALUE, key).end();
            if let Some(d) = data {
                m.begin(NFTA_SET_ELEM_DATA).bytes(NFTA_DATA_VALUE, d).end();
            }
            if let Some(o) = owner {
                m.bytes(NFTA_SET_ELEM_USERDATA, &comment_udata(o));
            }
            m.end();
        }
        m.end();
        m
    }

    /// Every element of `set`; none when it (or the table) does not exist.
    pub(super) fn dump_elems(&self, conn: &mut Conn, set: &str) -> Result<Vec<Elem>, NftError> {
        let context = format!("listing set {} {set}", self.describe());
        let request = || {
            let mut m = self.msg(MsgType::GetSetElem, NLM_F_REQUEST | NLM_F_DUMP);
            m.str(NFTA_SET_ELEM_LIST_TABLE, self.name)
                .str(NFTA_SET_ELEM_LIST_SET, set);
            m
        };
        let replies = match conn.dump(request, &context) {
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            r => r?,
        };
        let mut out = Vec::new();
        for r in &replies {
            let Some(list) = attr(r, NFTA_SET_ELEM_LIST_ELEMENTS) else {
                continue;
            };
            for (_, elem) in attrs(list).filter(|(ty, _)| *ty == NFTA_LIST_ELEM) {
                let value = |ty| {
                    attr(elem, ty)
                        .and_then(|k| attr(k, NFTA_DATA_VALUE))
                        .map(<[u8]>::to_vec)
                };
                let Some(key) = value(NFTA_SET_ELEM_KEY) else { continue };
                let owner = attr(elem, NFTA_SET_ELEM_USERDATA).and_then(parse_comment);
                out.push((key, value(NFTA_SET_ELEM_DATA), owner));
            }
        }
        Ok(out)
    }

    /// Whether every chain holds exactly the rules with these comments, in this order.
    pub(super) fn rules_in_place(&self, conn: &mut Conn, chains: &[(&str, Vec<String>)]) -> Result<bool, NftError> {
        for (chain, comments) in chains {
            let context = format!("listing chain {} {chain}", self.describe());
            let replies = match conn.dump(|| self.get_rules(chain), &context) {
                Err(e) if e.is_not_found() => return Ok(false),
                r => r?,
            };
            let have: Vec<Option<String>> = replies.iter().map(|r| super::objects::parse_rule_comment(r)).collect();
            let want: Vec<Option<String>> = comments.iter().map(|c| Some(c.clone())).collect();
            if have != want {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Removes, in one batch, every element of `sets` whose owner `keep` refuses; returns the
/// owners removed. Missing sets or tables are nothing to do, and elements someone removed
/// first (a concurrent DEL of the same pod) are not an error.
pub(super) fn remove_owned(
    conn: &mut Conn,
    sets: &[(Table<'_>, &str)],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<String>, NftError> {
    let mut batch = super::conn::Batch::default();
    let mut removed = Vec::new();
    for (table, set) in sets {
        let gone: Vec<(Vec<u8>, Option<Vec<u8>>)> = table
            .dump_elems(conn, set)?
            .into_iter()
            .filter(|(_, _, owner)| !keep(owner.as_deref().unwrap_or("")))
            .map(|(key, _, owner)| {
                removed.push(owner.unwrap_or_default());
                (key, None)
            })
            .collect();
        if !gone.is_empty() {
            batch.push(
                table.elems(MsgType::DelSetElem, set, &gone, None),
                format!("deleting {} element(s) from {} {set}", gone.len(), table.describe()),
            );
        }
    }
    removed.sort();
    removed.dedup();
    if batch.len() == 0 {
        return Ok(removed);
    }
    match conn.commit(batch).map_err(|e| e.error) {
        Err(e) if e.is_not_found() => Ok(removed),
        r => r.map(|()| removed),
    }
}

/// The comment in libnftnl's element user data (type, length, NUL-terminated text).
pub(super) fn parse_comment(mut udata: &[u8]) -> Option<String> {
    while let [ty, len, rest @ ..] = udata {
        let value = rest.get(..*len as usize)?;
        if *ty == UDATA_SET_ELEM_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or(&[]);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &rest[*len as usize..];
    }
    None
}

fn comment_udata(text: &str) -> Vec<u8> {
    // The length is one byte: a longer comment is cut (owners are far shorter).
    let text = &text.as_bytes()[..text.len().min(254)];
    let mut u = vec![UDATA_SET_ELEM_COMMENT, text.len() as u8 + 1];
    u.extend_from_slice(text);
    u.push(0);
    u
}

/// nft's type number of a concatenation (`TYPE_BITS` = 6 per field), so `nft list` prints it.
pub(super) fn concat_type(types: &[u32]) -> u32 {
    types.iter().fold(0, |acc, t| (acc << 6) | t)
}

pub(super) fn cmp(m: &mut Msg, reg: u32, op: u32, value: &[u8]) {
    expr(m, "cmp", |m| {
        m.u32(NFTA_CMP_SREG, reg).u32(NFTA_CMP_OP, op);
        m.begin(NFTA_CMP_DATA).bytes(NFTA_DATA_VALUE, value).end();
    });
}

pub(super) fn cmp_eq(m: &mut Msg, reg: u32, value: &[u8]) {
    cmp(m, reg, NFT_CMP_EQ, value);
}

pub(super) fn meta(m: &mut Msg, key: u32, reg: u32) {
    expr(m, "meta", |m| {
        m.u32(NFTA_META_KEY, key).u32(NFTA_META_DREG, reg);
    });
}

/// `meta nfproto ipv4|ipv6` (inet tables).
pub(super) fn match_family(m: &mut Msg, fam: Family) {
    meta(m, NFT_META_NFPROTO, NFT_REG_1);
    cmp_eq(m, NFT_REG_1, &[header(fam).nfproto]);
}

pub(super) fn payload(m: &mut Msg, reg: u32, base: u32, offset: u32, len: u32) {
    expr(m, "payload", |m| {
        m.u32(NFTA_PAYLOAD_DREG, reg)
            .u32(NFTA_PAYLOAD_BASE, base)
            .u32(NFTA_PAYLOAD_OFFSET, offset)
            .u32(NFTA_PAYLOAD_LEN, len);
    });
}

/// `REG @set` (or `!= @set` with `inverted`).
pub(super) fn lookup(m: &mut Msg, set: &str, reg: u32, inverted: bool) {
    expr(m, "lookup", |m| {
        m.str(NFTA_LOOKUP_SET, set).u32(NFTA_LOOKUP_SREG, reg);
        if inverted {
            m.u32(NFTA_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
        }
    });
}

pub(super) fn verdict(m: &mut Msg, code: i32, chain: Option<&str>) {
    expr(m, "immediate", |m| {
        m.u32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        m.begin(NFTA_IMMEDIATE_DATA).begin(NFTA_DATA_VERDICT);
        m.u32(NFTA_VERDICT_CODE, code as u32);
        if let Some(c) = chain {
            m.str(NFTA_VERDICT_CHAIN, c);
        }
        m.end().end();
    });
}
