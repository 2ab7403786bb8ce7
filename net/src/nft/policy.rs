//! NetworkPolicy enforcement: the table that holds a node's compiled policy
//! ([`PolicyState`], made by trellisd's `policy::compile`) and the one transaction that moves
//! the kernel from what it holds to what is wanted.
//!
//! ```text
//! table inet trellis-policy {                          # routed mode (bridge mode: table bridge,
//!   map egress  { type ifname : verdict; }             #  chains forward, input and output)
//!   map ingress { type ifname : verdict; }
//!   set peer-…-4 { type ipv4_addr; flags interval; }   # one per distinct peer, per family
//!   set named-…-4 { type ipv4_addr . inet_service; }  # egress named ports: address . port
//!   chain forward { type filter hook forward priority filter;
//!     ct state established,related accept
//!     iifname vmap @egress                             # the source pod's side
//!     oifname vmap @ingress }                          # the destination pod's side
//!   chain in-… {                                       # one per distinct rule list
//!     meta nfproto ipv4 meta l4proto tcp th dport 80-81 ip saddr @peer-…-4 return comment "x/allow"
//!     counter drop comment "isolated" }
//! }
//! ```
//!
//! # Why this design
//!
//! - Per packet: `established` first, so only a connection's first packet reaches a map; one
//!   lookup per side, whatever the number of pods and policies.
//! - Chains are named by their content (the compiler hashes their lines), so a chain never
//!   changes: a pod whose rules change points its map element to another chain. An update is
//!   then only what changed — sets created, refilled or deleted, chains created or deleted, map
//!   elements replaced — in **one** transaction: the kernel switches from the old state to the
//!   new at once, and a packet sees one or the other, never a half.
//! - Bridge mode needs the `bridge` family for the same reason as anti-spoofing (the port is
//!   visible only there): `forward` (pod to pod on the bridge), `input` (a pod to the node and
//!   beyond: its egress) and `output` (the node and beyond to a pod: its ingress), with the
//!   bridge's own conntrack (`nf_conntrack_bridge`) for `ct state`.
//! - The node's own traffic to its pods (kubelet probes) goes out through `output` in routed
//!   mode, which has no policy hook: it is allowed, as Calico and Cilium allow the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use super::antispoof::{host_endian_key, ifname_key, PortKind};
use super::conn::{Batch, Conn};
use super::interval::{Family, Interval};
use super::objects::expr;
use super::rules::{cmp, cmp_eq, concat_type, lookup, meta, payload, verdict, Hook, Table, CREATE, DELETE};
use super::wire::*;
use super::NftError;

/// What a line's peer matches (the other end of the connection).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinePeer {
    Any,
    /// The address is in this set of [`PolicyState::sets`].
    Set(String),
    /// `address . destination port` is in this set of [`PolicyState::port_sets`], for this IP
    /// protocol.
    AddrPort(String, u8),
}

/// What a line's destination ports match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LinePorts {
    Any,
    /// Any port of this IP protocol.
    Proto(u8),
    /// These inclusive ranges of this IP protocol.
    Ranges(u8, Vec<(u16, u16)>),
}

/// One line of a policy chain: when it matches, this side allows the connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyLine {
    pub peer: LinePeer,
    pub ports: LinePorts,
    /// The rules' comment: the policy's `namespace/name`.
    pub comment: String,
}

/// A policy chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChain {
    /// Ingress (the peer is the source) or egress (the destination).
    pub peer_is_source: bool,
    pub lines: Vec<PolicyLine>,
}

/// Everything the policy table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Address sets: inclusive ranges, either family.
    pub sets: BTreeMap<String, Vec<(IpAddr, IpAddr)>>,
    pub port_sets: BTreeMap<String, BTreeSet<(IpAddr, u16)>>,
    /// Chain names start with a letter and fit nft's 255 bytes.
    pub chains: BTreeMap<String, PolicyChain>,
    /// Pod interface → its ingress chain.
    pub ingress: BTreeMap<String, String>,
    /// Pod interface → its egress chain.
    pub egress: BTreeMap<String, String>,
}

/// What one [`PolicyTable::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The whole table was (re)built: first run, or the kernel lost it.
    pub rebuilt: bool,
    /// Messages in the transaction (0: nothing to do).
    pub messages: usize,
}

const IFNAMSIZ: usize = 16;
const NFT_TYPE_IFNAME: u32 = 41;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_PAYLOAD_LL_HEADER: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
/// `IP_CT_ESTABLISHED` and `IP_CT_RELATED` as `ct state` bits.
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
const NF_BR_LOCAL_IN: u32 = 1;
const NF_BR_FORWARD: u32 = 2;
const NF_BR_LOCAL_OUT: u32 = 3;
/// Bump when the base chains' rules change.
const VERSION: &str = "v1";
const INGRESS_MAP: &str = "ingress";
/// Elements per NEWSETELEM/DELSETELEM: their list is one netlink attribute, whose length is 16
/// bits, so a message must stay under 64 KiB (a map element with its chain name is about 100
/// bytes).
const ELEMS_PER_MESSAGE: usize = 256;
const EGRESS_MAP: &str = "egress";

fn family_suffix(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The policy table of one network namespace, in the family `kind` decides.
pub struct PolicyTable {
    name: String,
    kind: PortKind,
    conn: Mutex<Conn>,
    /// What the last successful [`PolicyTable::apply`] left in the kernel.
    applied: Mutex<Option<PolicyState>>,
}

/// The base chains of `kind`: (name, hook, which maps it consults).
fn base_chains(kind: PortKind) -> Vec<(&'static str, u32, bool, bool)> {
    match kind {
        PortKind::Routed => vec![("forward", NF_INET_FORWARD, true, true)],
        PortKind::Bridged => vec![
            ("forward", NF_BR_FORWARD, true, true),
            ("input", NF_BR_LOCAL_IN, true, false),
            ("output", NF_BR_LOCAL_OUT, false, true),
        ],
    }
}

impl PolicyTable {
    /// Opens a netlink socket in the calling thread's namespace; changes nothing.
    pub fn new(name: &str, kind: PortKind) -> Result<PolicyTable, NftError> {
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            return Err(NftError::InvalidInput(format!("invalid nftables table name {name:?}")));
        }
        Ok(PolicyTable {
            name: name.into(),
            kind,
            conn: Mutex::new(Conn::open()?),
            applied: Mutex::new(None),
        })
    }

    fn table(&self) -> Table<'_> {
        Table {
            family: match self.kind {
                PortKind::Bridged => NFPROTO_BRIDGE,
                PortKind::Routed => NFPROTO_INET,
            },
            name: &self.name,
        }
    }

    fn base_comments(&self) -> Vec<(&'static str, Vec<String>)> {
        base_chains(self.kind)
            .into_iter()
            .map(|(chain, _, egress, ingress)| {
                let mut c = vec![format!("trellis policy {VERSION} established")];
                if egress {
                    c.push(format!("trellis policy {VERSION} egress"));
                }
                if ingress {
                    c.push(format!("trellis policy {VERSION} ingress"));
                }
                (chain, c)
            })
            .collect()
    }

    /// Whether the kernel still holds the table's base chains as we made them (an `nft flush
    /// ruleset` takes them; the next [`PolicyTable::apply`] then rebuilds).
    pub fn in_place(&self) -> Result<bool, NftError> {
        let comments = self.base_comments();
        let refs: Vec<(&str, Vec<String>)> = comments.iter().map(|(c, v)| (*c, v.clone())).collect();
        self.table()
            .rules_in_place(&mut self.conn.lock().unwrap_or_else(PoisonError::into_inner), &refs)
    }

    /// Makes the kernel hold `want`, in one transaction: only what differs from the last
    /// applied state, or the whole table when it is new or was lost.
    pub fn apply(&self, want: &PolicyState) -> Result<Applied, NftError> {
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        let intact = applied.is_some() && self.in_place()?;
        let mut batch = Batch::default();
        let rebuilt = !intact;
        if rebuilt {
            self.push_rebuild(&mut batch, want);
        } else {
            let have = applied.as_ref().expect("intact");
            if have == want {
                return Ok(Applied::default());
            }
            self.push_changes(&mut batch, have, want);
        }
        let messages = batch.len();
        let result = self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commit(batch)
            .map_err(|e| e.error);
        match result {
            Ok(()) => {
                *applied = Some(want.clone());
                Ok(Applied { rebuilt, messages })
            }
            Err(e) => {
                // Unknown now: the next apply rebuilds.
                *applied = None;
                Err(e)
            }
        }
    }

    /// Removes the table (trellisd stopping with policy off, tests).
    pub fn remove(&self) -> Result<(), NftError> {
        *self.applied.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let t = self.table();
        let mut batch = Batch::default();
        batch.push(t.new_table(), format!("adding table {}", t.describe()));
        batch.push(del_table(&t), format!("deleting table {}", t.describe()));
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commit(batch)
            .map_err(|e| e.error)
    }

    /// The table replaced whole, atomically: made if missing, deleted, made again with all.
    fn push_rebuild(&self, batch: &mut Batch, want: &PolicyState) {
        let t = self.table();
        let d = t.describe();
        batch.push(t.new_table(), format!("adding table {d}"));
        batch.push(del_table(&t), format!("deleting table {d} to rebuild it"));
        batch.push(t.new_table(), format!("adding table {d}"));
        let mut id = 1000;
        for map in [INGRESS_MAP, EGRESS_MAP] {
            let mut m = t.new_set(map, NFT_TYPE_IFNAME, IFNAMSIZ as u32, Some((NFT_DATA_VERDICT, 0)), id);
            host_endian_key(&mut m);
            batch.push(m, format!("adding map {d} {map}"));
            id += 1;
        }
        let empty = PolicyState::default();
        self.push_changes_from(batch, &empty, want, &mut id);
        // Base chains last: they go live with everything they reach in place (the batch is
        // atomic anyway; this keeps each message valid on its own).
        for (chain, hook, egress, ingress) in base_chains(self.kind) {
            let h = Hook {
                num: hook,
                priority: 0,
                kind: "filter",
            };
            batch.push(t.new_chain(chain, Some(h)), format!("adding chain {d} {chain}"));
            batch.push(
                t.new_rule(chain, &format!("trellis policy {VERSION} established"), &|m| {
                    established(m);
                    verdict(m, NF_ACCEPT, None);
                }),
                format!("adding the established rule to {d} {chain}"),
            );
            for (on, key, map, what) in [
                (egress, NFT_META_IIFNAME, EGRESS_MAP, "egress"),
                (ingress, NFT_META_OIFNAME, INGRESS_MAP, "ingress"),
            ] {
                if on {
                    batch.push(
                        t.new_rule(chain, &format!("trellis policy {VERSION} {what}"), &|m| {
                            meta(m, key, NFT_REG32_00);
                            vmap(m, map, NFT_REG32_00);
                        }),
                        format!("adding the {what} map rule to {d} {chain}"),
                    );
                }
            }
        }
    }

    fn push_changes(&self, batch: &mut Batch, have: &PolicyState, want: &PolicyState) {
        let mut id = 1000;
        self.push_changes_from(batch, have, want, &mut id);
    }

    /// Sets made or refilled, chains made, map elements moved, then what nothing references
    /// any more deleted.
    fn push_changes_from(&self, batch: &mut Batch, have: &PolicyState, want: &PolicyState, id: &mut u32) {
        let t = self.table();
        let d = t.describe();
        for (name, ranges) in &want.sets {
            let old = have.sets.get(name);
            if old == Some(ranges) {
                continue;
            }
            for fam in [Family::V4, Family::V6] {
                let set = format!("{name}-{}", family_suffix(fam));
                if old.is_none() {
                    let m = interval_set(&t, &set, fam, *id);
                    *id += 1;
                    batch.push(m, format!("adding set {d} {set}"));
                } else {
                    batch.push(flush_set(&t, &set), format!("flushing set {d} {set}"));
                }
                let ivs: Vec<Interval> = ranges
                    .iter()
                    .filter(|(a, _)| Family::of(*a) == fam)
                    .map(|(a, b)| Interval {
                        first: super::interval::addr_value(*a),
                        last: super::interval::addr_value(*b),
                    })
                    .collect();
                let ivs = super::interval::merge(ivs);
                if !ivs.is_empty() {
                    let bounds: Vec<_> = ivs.iter().flat_map(|iv| iv.bounds(fam)).collect();
                    let elems: Vec<KeyFlags> = bounds
                        .iter()
                        .map(|b| {
                            let flags = if b.end { NFT_SET_ELEM_INTERVAL_END } else { 0 };
                            (fam.key(b.key), flags)
                        })
                        .collect();
                    for chunk in elems.chunks(ELEMS_PER_MESSAGE) {
                        batch.push(
                            elems_msg(&t, MsgType::NewSetElem, &set, chunk),
                            format!("adding {} element(s) to set {d} {set}", chunk.len()),
                        );
                    }
                }
            }
        }
        for (name, pairs) in &want.port_sets {
            let old = have.port_sets.get(name);
            if old == Some(pairs) {
                continue;
            }
            for fam in [Family::V4, Family::V6] {
                let set = format!("{name}-{}", family_suffix(fam));
                if old.is_none() {
                    let ty = concat_type(&[header_key_type(fam), NFT_TYPE_INET_SERVICE]);
                    let m = t.new_set(&set, ty, fam.bits() / 8 + 4, None, *id);
                    *id += 1;
                    batch.push(m, format!("adding set {d} {set}"));
                } else {
                    batch.push(flush_set(&t, &set), format!("flushing set {d} {set}"));
                }
                let elems: Vec<KeyFlags> = pairs
                    .iter()
                    .filter(|(a, _)| Family::of(*a) == fam)
                    .map(|(a, port)| {
                        let mut k = addr_bytes(*a);
                        k.extend_from_slice(&port.to_be_bytes());
                        k.extend_from_slice(&[0, 0]);
                        (k, 0)
                    })
                    .collect();
                if !elems.is_empty() {
                    for chunk in elems.chunks(ELEMS_PER_MESSAGE) {
                        batch.push(
                            elems_msg(&t, MsgType::NewSetElem, &set, chunk),
                            format!("adding {} element(s) to set {d} {set}", chunk.len()),
                        );
                    }
                }
            }
        }
        for (name, chain) in &want.chains {
            if have.chains.contains_key(name) {
                continue; // named by content: the same name is the same chain
            }
            batch.push(t.new_chain(name, None), format!("adding chain {d} {name}"));
            for (i, line) in chain.lines.iter().enumerate() {
                for (j, build) in line_rules(line, chain.peer_is_source, self.kind)
                    .into_iter()
                    .enumerate()
                {
                    let comment = format!("{} #{i}.{j}", line.comment);
                    batch.push(
                        t.new_rule(name, &comment, build.as_ref()),
                        format!("adding rule {comment} to chain {d} {name}"),
                    );
                }
            }
            batch.push(
                t.new_rule(name, "isolated: no policy allows it", &|m| {
                    expr(m, "counter", |_| {});
                    verdict(m, NF_DROP, None);
                }),
                format!("adding the final drop to chain {d} {name}"),
            );
        }
        for (map, old, new) in [
            (INGRESS_MAP, &have.ingress, &want.ingress),
            (EGRESS_MAP, &have.egress, &want.egress),
        ] {
            let gone: Vec<KeyFlags> = old
                .iter()
                .filter(|(k, v)| new.get(*k) != Some(*v))
                .map(|(k, _)| (ifname_key(k), 0))
                .collect();
            if !gone.is_empty() {
                for chunk in gone.chunks(ELEMS_PER_MESSAGE) {
                    batch.push(
                        elems_msg(&t, MsgType::DelSetElem, map, chunk),
                        format!("deleting {} element(s) from map {d} {map}", chunk.len()),
                    );
                }
            }
            let added: Vec<(&String, &String)> = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).collect();
            if !added.is_empty() {
                for chunk in added.chunks(ELEMS_PER_MESSAGE) {
                    batch.push(
                        jump_elems(&t, map, chunk),
                        format!("adding {} element(s) to map {d} {map}", chunk.len()),
                    );
                }
            }
        }
        for name in have.chains.keys().filter(|n| !want.chains.contains_key(*n)) {
            batch.push(del_chain(&t, name), format!("deleting chain {d} {name}"));
        }
        let gone_sets = have
            .sets
            .keys()
            .filter(|n| !want.sets.contains_key(*n))
            .chain(have.port_sets.keys().filter(|n| !want.port_sets.contains_key(*n)));
        for name in gone_sets {
            for fam in [Family::V4, Family::V6] {
                let set = format!("{name}-{}", family_suffix(fam));
                batch.push(del_set(&t, &set), format!("deleting set {d} {set}"));
            }
        }
    }
}

fn header_key_type(fam: Family) -> u32 {
    super::objects::header(fam).key_type
}

/// `set NAME { type ipv4_addr; flags interval; }` (or IPv6).
fn interval_set(t: &Table<'_>, set: &str, fam: Family, id: u32) -> Msg {
    let mut m = Msg::new_in(MsgType::NewSet, CREATE, t.family);
    m.str(NFTA_SET_TABLE, t.name)
        .str(NFTA_SET_NAME, set)
        .u32(NFTA_SET_FLAGS, NFT_SET_INTERVAL)
        .u32(NFTA_SET_KEY_TYPE, header_key_type(fam))
        .u32(NFTA_SET_KEY_LEN, fam.bits() / 8)
        .u32(NFTA_SET_ID, id);
    m
}

fn del_table(t: &Table<'_>) -> Msg {
    let mut m = Msg::new_in(MsgType::DelTable, DELETE, t.family);
    m.str(NFTA_TABLE_NAME, t.name);
    m
}

fn del_chain(t: &Table<'_>, chain: &str) -> Msg {
    let mut m = Msg::new_in(MsgType::DelChain, DELETE, t.family);
    m.str(NFTA_CHAIN_TABLE, t.name).str(NFTA_CHAIN_NAME, chain);
    m
}

fn del_set(t: &Table<'_>, set: &str) -> Msg {
    let mut m = Msg::new_in(MsgType::DelSet, DELETE, t.family);
    m.str(NFTA_SET_TABLE, t.name).str(NFTA_SET_NAME, set);
    m
}

/// DELSETELEM without elements: every element goes.
fn flush_set(t: &Table<'_>, set: &str) -> Msg {
    let mut m = Msg::new_in(MsgType::DelSetElem, DELETE, t.family);
    m.str(NFTA_SET_ELEM_LIST_TABLE, t.name).str(NFTA_SET_ELEM_LIST_SET, set);
    m
}

/// A set element's key and flags (`NFT_SET_ELEM_INTERVAL_END`).
type KeyFlags = (Vec<u8>, u32);

/// NEWSETELEM / DELSETELEM of (key, flags).
fn elems_msg(t: &Table<'_>, ty: MsgType, set: &str, elems: &[KeyFlags]) -> Msg {
    let flags = if matches!(ty, MsgType::NewSetElem) {
        CREATE
    } else {
        DELETE
    };
    let mut m = Msg::new_in(ty, flags, t.family);
    m.str(NFTA_SET_ELEM_LIST_TABLE, t.name).str(NFTA_SET_ELEM_LIST_SET, set);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (key, f) in elems {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY).bytes(NFTA_DATA_VALUE, key).end();
        if *f != 0 {
            m.u32(NFTA_SET_ELEM_FLAGS, *f);
        }
        m.end();
    }
    m.end();
    m
}

/// Map elements `ifname : jump chain`.
fn jump_elems(t: &Table<'_>, map: &str, elems: &[(&String, &String)]) -> Msg {
    let mut m = Msg::new_in(MsgType::NewSetElem, CREATE, t.family);
    m.str(NFTA_SET_ELEM_LIST_TABLE, t.name).str(NFTA_SET_ELEM_LIST_SET, map);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (ifname, chain) in elems {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY)
            .bytes(NFTA_DATA_VALUE, &ifname_key(ifname))
            .end();
        m.begin(NFTA_SET_ELEM_DATA).begin(NFTA_DATA_VERDICT);
        m.u32(NFTA_VERDICT_CODE, NFT_JUMP as u32).str(NFTA_VERDICT_CHAIN, chain);
        m.end().end();
        m.end();
    }
    m.end();
    m
}

/// `ct state established,related` (then the caller's verdict).
fn established(m: &mut Msg) {
    expr(m, "ct", |m| {
        m.u32(NFTA_CT_KEY, NFT_CT_STATE).u32(NFTA_CT_DREG, NFT_REG_1);
    });
    expr(m, "bitwise", |m| {
        m.u32(NFTA_BITWISE_SREG, NFT_REG_1)
            .u32(NFTA_BITWISE_DREG, NFT_REG_1)
            .u32(NFTA_BITWISE_LEN, 4);
        m.begin(NFTA_BITWISE_MASK)
            .bytes(NFTA_DATA_VALUE, &CT_ESTABLISHED_RELATED.to_ne_bytes())
            .end();
        m.begin(NFTA_BITWISE_XOR).bytes(NFTA_DATA_VALUE, &[0; 4]).end();
    });
    cmp(m, NFT_REG_1, NFT_CMP_NEQ, &[0; 4]);
}

/// `REG vmap @map`.
fn vmap(m: &mut Msg, map: &str, reg: u32) {
    expr(m, "lookup", |m| {
        m.str(NFTA_LOOKUP_SET, map)
            .u32(NFTA_LOOKUP_SREG, reg)
            .u32(NFTA_LOOKUP_DREG, NFT_REG_VERDICT);
    });
}

/// The packet is of family `fam`: `meta nfproto` in an inet table, the ethertype in a bridge
/// one (where nfproto is always "bridge").
fn match_l3(m: &mut Msg, fam: Family, kind: PortKind) {
    match kind {
        PortKind::Routed => super::rules::match_family(m, fam),
        PortKind::Bridged => {
            payload(m, NFT_REG_1, NFT_PAYLOAD_LL_HEADER, 12, 2);
            let ethertype: [u8; 2] = match fam {
                Family::V4 => [0x08, 0x00],
                Family::V6 => [0x86, 0xdd],
            };
            cmp_eq(m, NFT_REG_1, &ethertype);
        }
    }
}

type RuleBuilder = Box<dyn Fn(&mut Msg)>;

/// A rule's port test: none, or an IP protocol with (or without) one port range.
type PortSpec = Option<(u8, Option<(u16, u16)>)>;

/// The rules of one line: one per family where it names a set, one per port range.
fn line_rules(line: &PolicyLine, peer_is_source: bool, kind: PortKind) -> Vec<RuleBuilder> {
    let ranges: Vec<PortSpec> = match &line.ports {
        LinePorts::Any => vec![None],
        LinePorts::Proto(p) => vec![Some((*p, None))],
        LinePorts::Ranges(p, rs) => rs.iter().map(|r| Some((*p, Some(*r)))).collect(),
    };
    let families: Vec<Option<Family>> = match line.peer {
        LinePeer::Any => vec![None],
        _ => vec![Some(Family::V4), Some(Family::V6)],
    };
    let mut out: Vec<RuleBuilder> = Vec::new();
    for fam in families {
        for port in &ranges {
            let (peer, port) = (line.peer.clone(), *port);
            out.push(Box::new(move |m| {
                if let Some(f) = fam {
                    match_l3(m, f, kind);
                }
                if let LinePeer::AddrPort(_, p) = &peer {
                    meta(m, NFT_META_L4PROTO, NFT_REG_1);
                    cmp_eq(m, NFT_REG_1, &[*p]);
                }
                if let Some((proto, range)) = port {
                    meta(m, NFT_META_L4PROTO, NFT_REG_1);
                    cmp_eq(m, NFT_REG_1, &[proto]);
                    if let Some((a, b)) = range {
                        payload(m, NFT_REG_1, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                        if a == b {
                            cmp_eq(m, NFT_REG_1, &a.to_be_bytes());
                        } else {
                            cmp(m, NFT_REG_1, NFT_CMP_GTE, &a.to_be_bytes());
                            cmp(m, NFT_REG_1, NFT_CMP_LTE, &b.to_be_bytes());
                        }
                    }
                }
                if let Some(f) = fam {
                    let h = super::objects::header(f);
                    let offset = if peer_is_source { h.saddr_offset } else { h.daddr_offset };
                    let suffix = family_suffix(f);
                    match &peer {
                        LinePeer::Any => {}
                        LinePeer::Set(s) => {
                            payload(m, NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, offset, h.addr_len);
                            lookup(m, &format!("{s}-{suffix}"), NFT_REG_1, false);
                        }
                        LinePeer::AddrPort(s, _) => {
                            payload(m, NFT_REG32_00, NFT_PAYLOAD_NETWORK_HEADER, offset, h.addr_len);
                            let port_reg = NFT_REG32_00 + h.addr_len / 4;
                            payload(m, port_reg, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
                            lookup(m, &format!("{s}-{suffix}"), NFT_REG32_00, false);
                        }
                    }
                }
                verdict(m, NFT_RETURN, None);
            }));
        }
    }
    out
}
