//! Encapsulated traffic (VXLAN's UDP port, IPIP) only between the cluster's nodes: a tunnel
//! device decapsulates whatever reaches its port and delivers the inner packet as if it came
//! from the overlay, so anyone who can send a UDP datagram to a node's underlay address — an
//! **unprivileged** pod, with a plain socket, whose datagram the node even masquerades to its
//! own, legitimate address — could inject packets with any inner source into that node's pods.
//!
//! ```text
//! table inet trellis {
//!   set nodes4 { type ipv4_addr; }   set nodes6 { type ipv6_addr; }   # the nodes' underlay addresses
//!   chain underlay_in { type filter hook input priority filter;       # arriving at this node
//!     udp dport 8472 ip saddr != @nodes4 counter drop   (and ip6, and IPIP: meta l4proto 4) }
//!   chain underlay_fwd { type filter hook forward priority filter;    # leaving a pod
//!     udp dport 8472 ip daddr @nodes4 counter drop      (and ip6, and IPIP) }
//! }
//! ```
//!
//! - Arriving: only from a known node's underlay address. A pod's own node sees the pod's
//!   address as source (input is before any masquerade), so a pod cannot reach its own node's
//!   tunnel either.
//! - Leaving: a pod's packet to any node's tunnel port is dropped where it is forwarded, before
//!   the masquerade would give it the node's address. The node's own encapsulated traffic is
//!   locally generated and never crosses `forward`.
//! - The daemon owns it: the sets are the nodes of the leases it routes, made to match on every
//!   reconcile that changed them and on every resync, in one batch with the rules when those
//!   are missing (so a first start never drops a peer's traffic between the two).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use super::conn::{Batch, Conn};
use super::interval::Family;
use super::objects::{expr, header};
use super::rules::{cmp_eq, lookup, match_family, meta, payload, verdict, Hook, Table};
use super::wire::*;
use super::NftError;

/// Which encapsulations this node's backend receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encapsulation {
    /// VXLAN's UDP port.
    pub vxlan_port: Option<u16>,
    /// IPIP (IP protocol 4).
    pub ipip: bool,
}

/// The node-only rules for the tunnels of one network namespace's table.
pub struct UnderlayGuard {
    table: String,
    encap: Encapsulation,
    conn: Mutex<Conn>,
}

const CHAIN_IN: &str = "underlay_in";
const CHAIN_FWD: &str = "underlay_fwd";
const VERSION: &str = "v1";
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_UDP: u8 = 17;

fn set_name(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "nodes4",
        Family::V6 => "nodes6",
    }
}

type RuleBuilder = Box<dyn Fn(&mut Msg)>;

impl UnderlayGuard {
    /// Opens a netlink socket in the calling thread's network namespace. Changes nothing.
    pub fn new(table: &str, encap: Encapsulation) -> Result<Self, NftError> {
        if table.is_empty() || table.len() > 255 || table.contains('\0') {
            return Err(NftError::InvalidInput(format!("invalid nftables table name {table:?}")));
        }
        Ok(UnderlayGuard {
            table: table.to_string(),
            encap,
            conn: Mutex::new(Conn::open()?),
        })
    }

    fn table(&self) -> Table<'_> {
        Table {
            family: NFPROTO_INET,
            name: &self.table,
        }
    }

    /// The node addresses the sets hold.
    pub fn nodes(&self) -> Result<BTreeSet<IpAddr>, NftError> {
        let conn = &mut self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        self.read_nodes(conn)
    }

    fn read_nodes(&self, conn: &mut Conn) -> Result<BTreeSet<IpAddr>, NftError> {
        let mut out = BTreeSet::new();
        for fam in Family::ALL {
            for (key, _, _) in self.table().dump_elems(conn, set_name(fam))? {
                if let Some(k) = fam.parse_key(&key) {
                    out.insert(match fam {
                        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(k as u32)),
                        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(k)),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Makes the rules be there and the sets hold exactly `nodes`, in one batch; commits
    /// nothing when all is in place. Returns how many elements changed. With no encapsulation
    /// to guard (host-gw) it does nothing.
    pub fn sync(&self, nodes: &BTreeSet<IpAddr>) -> Result<usize, NftError> {
        if self.encap == Encapsulation::default() {
            return Ok(0);
        }
        let conn = &mut self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table();
        let rules = self.rules();
        let comments: Vec<(&str, Vec<String>)> = rules
            .iter()
            .map(|(chain, rules)| (*chain, rules.iter().map(|(c, _)| c.clone()).collect()))
            .collect();
        let in_place = table.rules_in_place(conn, &comments)?;
        let have = if in_place {
            self.read_nodes(conn)?
        } else {
            BTreeSet::new()
        };
        let mut batch = Batch::default();
        let d = table.describe();
        if !in_place {
            batch.push(table.new_table(), format!("adding table {d}"));
            for (id, fam) in (300..).zip(Family::ALL) {
                let h = header(fam);
                batch.push(
                    table.new_set(set_name(fam), h.key_type, h.addr_len, None, id),
                    format!("adding set {d} {}", set_name(fam)),
                );
            }
            for (chain, num) in [(CHAIN_IN, NF_INET_LOCAL_IN), (CHAIN_FWD, NF_INET_FORWARD)] {
                let hook = Hook {
                    num,
                    priority: 0,
                    kind: "filter",
                };
                batch.push(table.new_chain(chain, Some(hook)), format!("adding chain {d} {chain}"));
                batch.push(table.flush_chain(chain), format!("flushing chain {d} {chain}"));
            }
            for (chain, rules) in &rules {
                for (comment, build) in rules {
                    let context = format!("adding rule to chain {d} {chain}: {comment}");
                    batch.push(table.new_rule(chain, comment, build.as_ref()), context);
                }
            }
        }
        let mut changed = 0;
        for fam in Family::ALL {
            let of_fam = |s: &BTreeSet<IpAddr>| -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
                s.iter()
                    .filter(|ip| Family::of(**ip) == fam)
                    .map(|ip| (addr_bytes(*ip), None))
                    .collect()
            };
            let add = of_fam(&nodes.difference(&have).copied().collect());
            let del = of_fam(&have.difference(nodes).copied().collect());
            changed += add.len() + del.len();
            if !add.is_empty() {
                batch.push(
                    table.elems(MsgType::NewSetElem, set_name(fam), &add, None),
                    format!("adding {} node(s) to set {d} {}", add.len(), set_name(fam)),
                );
            }
            if !del.is_empty() {
                batch.push(
                    table.elems(MsgType::DelSetElem, set_name(fam), &del, None),
                    format!("deleting {} node(s) from set {d} {}", del.len(), set_name(fam)),
                );
            }
        }
        if batch.len() == 0 {
            return Ok(0);
        }
        conn.commit(batch).map_err(|e| e.error)?;
        Ok(changed)
    }

    /// Each chain's rules: (comment, expressions).
    fn rules(&self) -> Vec<(&'static str, Vec<(String, RuleBuilder)>)> {
        let mut inbound: Vec<(String, RuleBuilder)> = Vec::new();
        let mut forward: Vec<(String, RuleBuilder)> = Vec::new();
        for fam in Family::ALL {
            if let Some(port) = self.encap.vxlan_port {
                inbound.push((
                    format!("trellis underlay {VERSION} vxlan{} from strangers", fam.bits()),
                    Box::new(move |m| {
                        udp_dport(m, fam, port);
                        drop_by_address(m, fam, true);
                    }),
                ));
                forward.push((
                    format!("trellis underlay {VERSION} vxlan{} from pods", fam.bits()),
                    Box::new(move |m| {
                        udp_dport(m, fam, port);
                        drop_by_address(m, fam, false);
                    }),
                ));
            }
        }
        if self.encap.ipip {
            let fam = Family::V4;
            inbound.push((
                format!("trellis underlay {VERSION} ipip from strangers"),
                Box::new(move |m| {
                    l4proto(m, fam, IPPROTO_IPIP);
                    drop_by_address(m, fam, true);
                }),
            ));
            forward.push((
                format!("trellis underlay {VERSION} ipip from pods"),
                Box::new(move |m| {
                    l4proto(m, fam, IPPROTO_IPIP);
                    drop_by_address(m, fam, false);
                }),
            ));
        }
        vec![(CHAIN_IN, inbound), (CHAIN_FWD, forward)]
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `meta nfproto F meta l4proto P`
fn l4proto(m: &mut Msg, fam: Family, proto: u8) {
    match_family(m, fam);
    meta(m, NFT_META_L4PROTO, NFT_REG_1);
    cmp_eq(m, NFT_REG_1, &[proto]);
}

/// `meta nfproto F udp dport PORT`
fn udp_dport(m: &mut Msg, fam: Family, port: u16) {
    l4proto(m, fam, IPPROTO_UDP);
    payload(m, NFT_REG_1, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
    cmp_eq(m, NFT_REG_1, &port.to_be_bytes());
}

/// `ip saddr != @nodesF counter drop` (`inbound`) or `ip daddr @nodesF counter drop`.
fn drop_by_address(m: &mut Msg, fam: Family, inbound: bool) {
    let h = header(fam);
    let offset = if inbound { h.saddr_offset } else { h.daddr_offset };
    payload(m, NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, offset, h.addr_len);
    lookup(m, set_name(fam), NFT_REG_1, inbound);
    expr(m, "counter", |_| {});
    verdict(m, NF_DROP, None);
}
