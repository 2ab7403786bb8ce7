//! NetworkPolicy enforcement: the table that holds a node's compiled policy
//! ([`PolicyState`], made by trellisd's `policy::compile`) and the one transaction that moves
//! the kernel from what it holds to what is wanted.
//!
//! ```text
//! table inet trellis-policy {
//!   map egress  { type ifname : verdict; }             # routed mode: keyed by the host end;
//!   map ingress { type ifname : verdict; }             #  bridge mode: egress-4/-6, ingress-4/-6
//!   set held { type ifname; }                          #  keyed by the pod's address
//!   set peer-…-4 { type ipv4_addr; flags interval; }   # one per distinct peer, per family
//!   set named-…-4 { type ipv4_addr . inet_service; }  # egress named ports: address . port
//!   chain forward { type filter hook forward priority filter;
//!     ct mark & 0x01000000 != 0 counter drop          # a flow a policy change revoked
//!     ct state established,related accept
//!     iifname @held drop                               # a new pod trellisd does not know yet
//!     oifname @held drop
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
//! - **Bridge mode** is decided in the same `inet` forward hook: bridged packets reach it
//!   through `br_netfilter` (`bridge-nf-call-iptables`/`-ip6tables`, per namespace since Linux
//!   5.3, which trellisd sets), with the IP layer's conntrack, so `ct state` works — the
//!   `bridge` family's own `ct` needs `nf_conntrack_bridge`, which many kernels (this
//!   project's CI kernel included) lack. There the input device is the bridge, not the port,
//!   so the maps are keyed by the pod's **address**: trustworthy because anti-spoofing (in the
//!   bridge family, before `br_netfilter`) drops any packet whose source is not its port's pod.
//!   Neighbour discovery is let through first (bridged ICMPv6 ND crosses the hook too; a pod
//!   isolated for ingress must still be resolvable, as Calico always allows NDP).
//! - **The start window**: the plugin puts a new pod in `held` (every packet dropped) before
//!   it writes the record trellisd learns the pod from, and trellisd releases it in the
//!   transaction that adds the pod's map elements ([`PolicyState::covered`]): a pod never
//!   sends or receives a packet that its policy has not judged, however late trellisd is.
//! - The node's own traffic to its pods (kubelet probes) goes out through `output`, which has
//!   no policy hook: it is allowed, as Calico and Cilium allow the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use super::antispoof::{host_endian_key, ifname_key, PortKind};
use super::conn::{Batch, Conn};
use super::interval::{Family, Interval};
use super::objects::expr;
use super::rules::{
    cmp, cmp_eq, concat_type, lookup, match_family, meta, payload, verdict, Hook, Table, CREATE, DELETE,
};
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
    /// Pod interface → its addresses: the maps' keys in bridge mode.
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// The pods (interfaces) this state has judged, whether a policy selects them or not: a
    /// pod's hold is released in the transaction that first covers it.
    pub covered: BTreeSet<String>,
    /// Pods kept held (every packet dropped): known to be on this node but not yet to the
    /// compiler (their Pod object not seen while policies exist in their namespace).
    pub held: BTreeSet<String>,
}

/// One rule's `counter`, as the kernel holds it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub chain: String,
    /// The rule's comment: the policy (`namespace/name #line.rule`) or the base rule's name.
    pub comment: String,
    pub packets: u64,
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
const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_MARK: u32 = 3;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LOG_GROUP: u16 = 1;
const NFTA_LOG_PREFIX: u16 = 2;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
/// `IP_CT_ESTABLISHED` and `IP_CT_RELATED` as `ct state` bits.
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
/// ICMPv6 router solicitation .. neighbour advertisement.
const ND_TYPES: (u8, u8) = (133, 136);
const IPPROTO_ICMPV6: u8 = 58;
/// Bump when the base chain's rules change.
const VERSION: &str = "v3";

/// The `ct mark` bit of a connection a policy change revoked: trellisd sets it on the
/// conntrack entries the new policy denies, and the base chain drops their packets, both ways,
/// before `established` accepts them. (Deleting the entries instead is racy: an answer in
/// flight makes a new entry the other way, which the policy may allow, and the flow lives on.)
pub const REVOKED_MARK: u32 = 0x0100_0000;
const INGRESS_MAP: &str = "ingress";
const HELD_SET: &str = "held";
/// Elements per NEWSETELEM/DELSETELEM: their list is one netlink attribute, whose length is 16
/// bits, so a message must stay under 64 KiB (a map element with its chain name is about 100
/// bytes).
const ELEMS_PER_MESSAGE: usize = 256;
const EGRESS_MAP: &str = "egress";

/// The table trellisd keeps a node's NetworkPolicy in (and the plugin holds new pods in).
pub const POLICY_TABLE: &str = "trellis-policy";

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

/// The policy table of one network namespace; `kind` decides what its maps are keyed by.
pub struct PolicyTable {
    name: String,
    kind: PortKind,
    conn: Mutex<Conn>,
    /// What the last successful [`PolicyTable::apply`] left in the kernel.
    applied: Mutex<Option<PolicyState>>,
    /// NFLOG group the chains' drops are logged to ([`PolicyTable::with_drop_log`]).
    drop_log: Option<u16>,
}

/// The prefix of a drop logged by a policy chain: then the chain's name.
pub const DROP_LOG_PREFIX: &str = "trellis-policy drop ";
/// At most this many drops a second per chain are logged (the rest still drop).
const DROP_LOG_RATE: u64 = 50;

/// (map or set, key) of one element.
type ElemKey = (String, Vec<u8>);

/// A pod's keys in `base` (a map or the held set): its host end in routed mode; in bridge mode
/// each of its addresses, in the `base-4` or `base-6` of its family.
fn pod_keys(kind: PortKind, base: &str, port: &str, ips: &[IpAddr]) -> Vec<ElemKey> {
    match kind {
        PortKind::Routed => vec![(base.to_string(), ifname_key(port))],
        PortKind::Bridged => ips
            .iter()
            .map(|ip| (format!("{base}-{}", family_suffix(Family::of(*ip))), addr_bytes(*ip)))
            .collect(),
    }
}

/// The maps and sets the base chain consults, for `kind`: (name, key type, key length).
fn containers(kind: PortKind) -> Vec<(String, u32, u32, bool)> {
    let mut out = Vec::new();
    for (base, is_map) in [(INGRESS_MAP, true), (EGRESS_MAP, true), (HELD_SET, false)] {
        match kind {
            PortKind::Routed => out.push((base.to_string(), NFT_TYPE_IFNAME, IFNAMSIZ as u32, is_map)),
            PortKind::Bridged => {
                for fam in [Family::V4, Family::V6] {
                    out.push((
                        format!("{base}-{}", family_suffix(fam)),
                        header_key_type(fam),
                        fam.bits() / 8,
                        is_map,
                    ));
                }
            }
        }
    }
    out
}

/// The base chain's rules, in order: (comment, expressions).
fn base_rules(kind: PortKind) -> Vec<(String, RuleBuilder)> {
    let mut out: Vec<(String, RuleBuilder)> = vec![
        (
            format!("trellis policy {VERSION} revoked"),
            Box::new(|m: &mut Msg| {
                ct_bits(m, NFT_CT_MARK, REVOKED_MARK);
                expr(m, "counter", |_| {});
                verdict(m, NF_DROP, None);
            }),
        ),
        (
            format!("trellis policy {VERSION} established"),
            Box::new(|m: &mut Msg| {
                established(m);
                verdict(m, NF_ACCEPT, None);
            }),
        ),
    ];
    match kind {
        PortKind::Routed => {
            for (key, what) in [(NFT_META_IIFNAME, "source"), (NFT_META_OIFNAME, "destination")] {
                out.push((
                    format!("trellis policy {VERSION} held {what}"),
                    Box::new(move |m: &mut Msg| {
                        meta(m, key, NFT_REG_1);
                        lookup(m, HELD_SET, NFT_REG_1, false);
                        expr(m, "counter", |_| {});
                        verdict(m, NF_DROP, None);
                    }),
                ));
            }
            for (key, map) in [(NFT_META_IIFNAME, EGRESS_MAP), (NFT_META_OIFNAME, INGRESS_MAP)] {
                out.push((
                    format!("trellis policy {VERSION} {map}"),
                    Box::new(move |m: &mut Msg| {
                        meta(m, key, NFT_REG32_00);
                        vmap(m, map, NFT_REG32_00);
                    }),
                ));
            }
        }
        PortKind::Bridged => {
            out.push((
                format!("trellis policy {VERSION} neighbour discovery"),
                Box::new(|m: &mut Msg| {
                    match_family(m, Family::V6);
                    meta(m, NFT_META_L4PROTO, NFT_REG_1);
                    cmp_eq(m, NFT_REG_1, &[IPPROTO_ICMPV6]);
                    payload(m, NFT_REG_1, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1);
                    cmp(m, NFT_REG_1, NFT_CMP_GTE, &[ND_TYPES.0]);
                    cmp(m, NFT_REG_1, NFT_CMP_LTE, &[ND_TYPES.1]);
                    verdict(m, NF_ACCEPT, None);
                }),
            ));
            for fam in [Family::V4, Family::V6] {
                let h = super::objects::header(fam);
                let sfx = family_suffix(fam);
                for (offset, what) in [(h.saddr_offset, "source"), (h.daddr_offset, "destination")] {
                    out.push((
                        format!("trellis policy {VERSION} held {what} {sfx}"),
                        Box::new(move |m: &mut Msg| {
                            match_family(m, fam);
                            payload(m, NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, offset, h.addr_len);
                            lookup(m, &format!("{HELD_SET}-{sfx}"), NFT_REG_1, false);
                            expr(m, "counter", |_| {});
                            verdict(m, NF_DROP, None);
                        }),
                    ));
                }
                for (offset, map) in [(h.saddr_offset, EGRESS_MAP), (h.daddr_offset, INGRESS_MAP)] {
                    out.push((
                        format!("trellis policy {VERSION} {map} {sfx}"),
                        Box::new(move |m: &mut Msg| {
                            match_family(m, fam);
                            payload(m, NFT_REG32_00, NFT_PAYLOAD_NETWORK_HEADER, offset, h.addr_len);
                            vmap(m, &format!("{map}-{sfx}"), NFT_REG32_00);
                        }),
                    ));
                }
            }
        }
    }
    out
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
            drop_log: None,
        })
    }

    /// Every policy chain logs the new connections it drops to NFLOG `group` (at most
    /// [`DROP_LOG_RATE`] a second per chain), prefixed [`DROP_LOG_PREFIX`] and the chain's name.
    /// Chains made from now on: set it before the first [`PolicyTable::apply`].
    pub fn with_drop_log(mut self, group: u16) -> PolicyTable {
        self.drop_log = Some(group);
        self
    }

    fn table(&self) -> Table<'_> {
        Table {
            family: NFPROTO_INET,
            name: &self.name,
        }
    }

    fn base_comments(&self) -> Vec<(&'static str, Vec<String>)> {
        vec![("forward", base_rules(self.kind).into_iter().map(|(c, _)| c).collect())]
    }

    /// The plugin's part of the start window: holds a new pod (every packet to or from it
    /// dropped) until trellisd releases it with its rules. `Ok(false)`: there is no policy
    /// table, this node does not enforce NetworkPolicy.
    pub fn hold(&self, port: &str, ips: &[IpAddr]) -> Result<bool, NftError> {
        let t = self.table();
        let mut batch = Batch::default();
        for (set, key) in pod_keys(self.kind, HELD_SET, port, ips) {
            batch.push(
                elems_msg(&t, MsgType::NewSetElem, &set, &[(key, 0)]),
                format!("holding {port} in set {} {set}", t.describe()),
            );
        }
        match self.commit(batch) {
            Ok(()) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes a pod out of the held set, if it is there (the plugin's DEL; a pod deleted before
    /// trellisd knew it must not leave its address or interface name held for the next one).
    pub fn release(&self, port: &str, ips: &[IpAddr]) -> Result<(), NftError> {
        let t = self.table();
        let mut batch = Batch::default();
        push_release(&mut batch, &t, pod_keys(self.kind, HELD_SET, port, ips));
        match self.commit(batch) {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Every rule's counter in the table (policy lines count the connections they allowed;
    /// the chains' final drops, the held and revoked rules count the packets they dropped).
    /// Empty when there is no table.
    pub fn counters(&self) -> Result<Vec<RuleCounter>, NftError> {
        let t = self.table();
        let context = format!("listing the counters of {}", t.describe());
        let replies = match self.conn.lock().unwrap_or_else(PoisonError::into_inner).dump(
            || {
                let mut m = Msg::new_in(MsgType::GetRule, NLM_F_REQUEST | NLM_F_DUMP, t.family);
                m.str(NFTA_RULE_TABLE, t.name);
                m
            },
            &context,
        ) {
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            r => r?,
        };
        let mut out = Vec::new();
        for r in &replies {
            let (Some(chain), Some(comment)) = (attr(r, NFTA_RULE_CHAIN), super::objects::parse_rule_comment(r)) else {
                continue;
            };
            let chain = String::from_utf8_lossy(chain.split(|b| *b == 0).next().unwrap_or(&[])).into_owned();
            let packets = attr(r, NFTA_RULE_EXPRESSIONS).and_then(|exprs| {
                attrs(exprs).find_map(|(_, e)| {
                    let name = attr(e, NFTA_EXPR_NAME)?;
                    if !name.starts_with(b"counter\0") {
                        return None;
                    }
                    let data = attr(e, NFTA_EXPR_DATA)?;
                    let packets = attr(data, NFTA_COUNTER_PACKETS)?;
                    Some(u64::from_be_bytes(packets.try_into().ok()?))
                })
            });
            if let Some(packets) = packets {
                out.push(RuleCounter {
                    chain,
                    comment,
                    packets,
                });
            }
        }
        Ok(out)
    }

    fn commit(&self, batch: Batch) -> Result<(), NftError> {
        if batch.len() == 0 {
            return Ok(());
        }
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commit(batch)
            .map_err(|e| e.error)
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
        for (name, key_type, key_len, is_map) in containers(self.kind) {
            let data = is_map.then_some((NFT_DATA_VERDICT, 0));
            let mut m = t.new_set(&name, key_type, key_len, data, id);
            if key_type == NFT_TYPE_IFNAME {
                host_endian_key(&mut m);
            }
            batch.push(m, format!("adding {} {d} {name}", if is_map { "map" } else { "set" }));
            id += 1;
        }
        let empty = PolicyState::default();
        self.push_changes_from(batch, &empty, want, &mut id, true);
        // The base chain last: it goes live with everything it reaches in place (the batch is
        // atomic anyway; this keeps each message valid on its own).
        let h = Hook {
            num: NF_INET_FORWARD,
            priority: 0,
            kind: "filter",
        };
        batch.push(t.new_chain("forward", Some(h)), format!("adding chain {d} forward"));
        for (comment, build) in base_rules(self.kind) {
            batch.push(
                t.new_rule("forward", &comment, build.as_ref()),
                format!("adding rule {comment:?} to {d} forward"),
            );
        }
    }

    fn push_changes(&self, batch: &mut Batch, have: &PolicyState, want: &PolicyState) {
        let mut id = 1000;
        self.push_changes_from(batch, have, want, &mut id, false);
    }

    /// Every map element of `state` (map, key) → chain.
    fn map_elems(&self, state: &PolicyState) -> BTreeMap<ElemKey, String> {
        let mut out = BTreeMap::new();
        for (map, pods) in [(INGRESS_MAP, &state.ingress), (EGRESS_MAP, &state.egress)] {
            for (port, chain) in pods {
                let ips = state.addresses.get(port).map(Vec::as_slice).unwrap_or_default();
                for k in pod_keys(self.kind, map, port, ips) {
                    out.insert(k, chain.clone());
                }
            }
        }
        out
    }

    fn held_elems<'a>(&self, state: &PolicyState, pods: impl Iterator<Item = &'a String>) -> BTreeSet<ElemKey> {
        pods.flat_map(|port| {
            let ips = state.addresses.get(port).map(Vec::as_slice).unwrap_or_default();
            pod_keys(self.kind, HELD_SET, port, ips)
        })
        .collect()
    }

    /// Sets made or refilled, chains made, map elements moved, then what nothing references
    /// any more deleted.
    fn push_changes_from(&self, batch: &mut Batch, have: &PolicyState, want: &PolicyState, id: &mut u32, fresh: bool) {
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
                for (j, build) in line_rules(line, chain.peer_is_source).into_iter().enumerate() {
                    let comment = format!("{} #{i}.{j}", line.comment);
                    batch.push(
                        t.new_rule(name, &comment, build.as_ref()),
                        format!("adding rule {comment} to chain {d} {name}"),
                    );
                }
            }
            if let Some(group) = self.drop_log {
                let prefix = format!("{DROP_LOG_PREFIX}{name}");
                batch.push(
                    t.new_rule(name, "log: dropped below", &|m| {
                        expr(m, "limit", |m| {
                            m.bytes(NFTA_LIMIT_RATE, &DROP_LOG_RATE.to_be_bytes())
                                .bytes(NFTA_LIMIT_UNIT, &1u64.to_be_bytes())
                                .bytes(NFTA_LIMIT_BURST, &(DROP_LOG_RATE as u32).to_be_bytes());
                        });
                        expr(m, "log", |m| {
                            m.bytes(NFTA_LOG_GROUP, &group.to_be_bytes())
                                .str(NFTA_LOG_PREFIX, &prefix);
                        });
                    }),
                    format!("adding the drop log to chain {d} {name}"),
                );
            }
            batch.push(
                t.new_rule(name, "isolated: no policy allows it", &|m| {
                    expr(m, "counter", |_| {});
                    verdict(m, NF_DROP, None);
                }),
                format!("adding the final drop to chain {d} {name}"),
            );
        }
        let (old, new) = (self.map_elems(have), self.map_elems(want));
        let gone: BTreeMap<&str, Vec<KeyFlags>> =
            old.iter()
                .filter(|(k, v)| new.get(*k) != Some(*v))
                .fold(BTreeMap::new(), |mut acc, ((map, key), _)| {
                    acc.entry(map.as_str()).or_default().push((key.clone(), 0));
                    acc
                });
        for (map, keys) in &gone {
            for chunk in keys.chunks(ELEMS_PER_MESSAGE) {
                batch.push(
                    elems_msg(&t, MsgType::DelSetElem, map, chunk),
                    format!("deleting {} element(s) from map {d} {map}", chunk.len()),
                );
            }
        }
        let added: BTreeMap<&str, Vec<(&[u8], &str)>> = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).fold(
            BTreeMap::new(),
            |mut acc, ((map, key), chain)| {
                acc.entry(map.as_str())
                    .or_default()
                    .push((key.as_slice(), chain.as_str()));
                acc
            },
        );
        for (map, elems) in &added {
            for chunk in elems.chunks(ELEMS_PER_MESSAGE) {
                batch.push(
                    jump_elems(&t, map, chunk),
                    format!("adding {} element(s) to map {d} {map}", chunk.len()),
                );
            }
        }
        // Held pods: those still unknown stay held (the rebuild of a lost table holds them
        // again); the rest are released in this same transaction as their map elements.
        let held_new = self.held_elems(want, want.held.iter());
        let held_old = self.held_elems(have, have.held.iter());
        for (set, key) in held_new.difference(&held_old) {
            batch.push(
                elems_msg(&t, MsgType::NewSetElem, set, &[(key.clone(), 0)]),
                format!("holding an element in set {d} {set}"),
            );
        }
        if !fresh {
            let newly_covered = want.covered.difference(&have.covered);
            let mut release = self.held_elems(want, newly_covered);
            release.extend(held_old.difference(&held_new).cloned());
            let release: Vec<ElemKey> = release.difference(&held_new).cloned().collect();
            push_release(batch, &t, release);
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

/// Map elements `key : jump chain`.
fn jump_elems(t: &Table<'_>, map: &str, elems: &[(&[u8], &str)]) -> Msg {
    let mut m = Msg::new_in(MsgType::NewSetElem, CREATE, t.family);
    m.str(NFTA_SET_ELEM_LIST_TABLE, t.name).str(NFTA_SET_ELEM_LIST_SET, map);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (key, chain) in elems {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY).bytes(NFTA_DATA_VALUE, key).end();
        m.begin(NFTA_SET_ELEM_DATA).begin(NFTA_DATA_VERDICT);
        m.u32(NFTA_VERDICT_CODE, NFT_JUMP as u32).str(NFTA_VERDICT_CHAIN, chain);
        m.end().end();
        m.end();
    }
    m.end();
    m
}

/// Takes elements out of held sets whether or not they are there: added (no NLM_F_EXCL, so
/// an element already there is no error) then deleted, in the caller's transaction — the
/// plugin adds elements trellisd never recorded.
fn push_release(batch: &mut Batch, t: &Table<'_>, elems: Vec<ElemKey>) {
    for (set, key) in elems {
        let d = t.describe();
        batch.push(
            elems_msg(t, MsgType::NewSetElem, &set, &[(key.clone(), 0)]),
            format!("releasing an element of set {d} {set} (adding it first)"),
        );
        batch.push(
            elems_msg(t, MsgType::DelSetElem, &set, &[(key, 0)]),
            format!("releasing an element of set {d} {set}"),
        );
    }
}

/// `ct state established,related` (then the caller's verdict).
fn established(m: &mut Msg) {
    ct_bits(m, NFT_CT_STATE, CT_ESTABLISHED_RELATED);
}

/// `ct KEY & bits != 0` (`ct state` and `ct mark` are host-endian 32-bit values).
fn ct_bits(m: &mut Msg, key: u32, bits: u32) {
    expr(m, "ct", |m| {
        m.u32(NFTA_CT_KEY, key).u32(NFTA_CT_DREG, NFT_REG_1);
    });
    expr(m, "bitwise", |m| {
        m.u32(NFTA_BITWISE_SREG, NFT_REG_1)
            .u32(NFTA_BITWISE_DREG, NFT_REG_1)
            .u32(NFTA_BITWISE_LEN, 4);
        m.begin(NFTA_BITWISE_MASK)
            .bytes(NFTA_DATA_VALUE, &bits.to_ne_bytes())
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

type RuleBuilder = Box<dyn Fn(&mut Msg)>;

/// A rule's port test: none, or an IP protocol with (or without) one port range.
type PortSpec = Option<(u8, Option<(u16, u16)>)>;

/// The rules of one line: one per family where it names a set, one per port range.
fn line_rules(line: &PolicyLine, peer_is_source: bool) -> Vec<RuleBuilder> {
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
                    match_family(m, f);
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
                expr(m, "counter", |_| {});
                verdict(m, NFT_RETURN, None);
            }));
        }
    }
    out
}
