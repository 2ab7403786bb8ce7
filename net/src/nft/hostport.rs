//! hostPort (CNI `portMappings`) in the node's nftables table, without the reference `portmap`
//! plugin: a node running Trellis needs nothing but Trellis's binaries.
//!
//! # Why this design
//!
//! `portmap` adds an iptables chain per pod and rewrites the nat table on every ADD and DEL
//! (the same costs as the reference bridge's `ipMasq`: see [`super`]). Here the rules never
//! change with pods; a pod's mappings are elements of two maps:
//!
//! ```text
//! table inet trellis {
//!   map hostport4 { type inet_proto . inet_service : ipv4_addr . inet_service; }
//!   map hostport6 { type inet_proto . inet_service : ipv6_addr . inet_service; }
//!   set hairpin4  { type ipv4_addr . ipv4_addr; }       # pod . pod, for pods with mappings
//!   set hairpin6  { type ipv6_addr . ipv6_addr; }
//!   chain hostport_prerouting { type nat hook prerouting priority dstnat;
//!     fib daddr type local jump hostports }              # from other nodes and from pods
//!   chain hostport_output { type nat hook output priority dstnat;
//!     ip daddr 127.0.0.0/8 return; ip6 daddr ::1 return
//!     fib daddr type local jump hostports }              # from the node itself
//!   chain hostports {
//!     meta nfproto ipv4 dnat ip to meta l4proto . th dport map @hostport4
//!     meta nfproto ipv6 dnat ip6 to meta l4proto . th dport map @hostport6 }
//!   chain hostport_postrouting { type nat hook postrouting priority srcnat;
//!     ip saddr . ip daddr @hairpin4 masquerade; ip6 ... @hairpin6 masquerade }
//! }
//! ```
//!
//! - Only traffic addressed to one of the node's own addresses (`fib daddr type local`) is
//!   translated: a pod connecting to port 8080 somewhere else is left alone.
//! - The hairpin (a pod reaching its own hostPort through the node's address) is masqueraded,
//!   or the pod would answer itself directly and drop the reply; everyone else keeps their
//!   source address, as with `portmap`.
//! - Loopback destinations are not translated: a DNAT from 127.0.0.1 to a pod is a martian the
//!   kernel drops (`portmap` needs `route_localnet` for that, which exposes the node's loopback
//!   services to its neighbours). hostPort on a specific `hostIP` is not served either.
//! - Each element carries its owner (`trellis/<network>/<container>/<ifname>`, the host end's
//!   alias) as a comment, so DEL and GC find a pod's elements without any state file.
//! - A host port another pod holds is refused (the kernel answers EEXIST for a map key with
//!   other data), where `portmap` would silently let the first rule win.
//!
//! The rules are checked by their comments and repaired in one atomic batch, as the
//! masquerade's are ([`super::Masquerade::ensure`]).

use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use super::conn::{Batch, Conn};
use super::interval::Family;
use super::objects::{expr, header};
use super::rules::{cmp_eq, concat_type, match_family, payload, verdict, Hook, Table};
use super::wire::*;
use super::NftError;

/// What a port mapping forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    fn from_number(n: u8) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One hostPort: traffic to `host_port` on any of the node's addresses goes to the pod's
/// `container_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub host_port: u16,
    pub container_port: u16,
}

/// A mapping as the table holds it: to which pod address, for whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedPort {
    pub mapping: PortMapping,
    pub pod_ip: IpAddr,
    pub owner: String,
}

/// The hostPort maps and rules of one network namespace's table.
pub struct HostPorts {
    table: String,
    conn: Mutex<Conn>,
}

const CHAIN_PRE: &str = "hostport_prerouting";
const CHAIN_OUT: &str = "hostport_output";
const CHAIN_DNAT: &str = "hostports";
const CHAIN_POST: &str = "hostport_postrouting";
/// Bump when the rules change, so that an upgrade replaces them.
const VERSION: &str = "v1";

fn map_name(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "hostport4",
        Family::V6 => "hostport6",
    }
}

fn hairpin_name(fam: Family) -> &'static str {
    match fam {
        Family::V4 => "hairpin4",
        Family::V6 => "hairpin6",
    }
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// `meta l4proto . th dport` as the registers hold it: each field padded to 4 bytes.
fn port_key(protocol: Protocol, port: u16) -> [u8; 8] {
    let p = port.to_be_bytes();
    [protocol.number(), 0, 0, 0, p[0], p[1], 0, 0]
}

/// `ADDR . inet_service`: the address, then the port padded to 4 bytes.
fn target_data(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut d = addr_bytes(ip);
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d
}

/// The rules, per chain, as (comment, message builder).
fn rule_comment(chain: &str, what: &str) -> String {
    format!("trellis hostport {VERSION} {chain} {what}")
}

impl HostPorts {
    /// Opens a netlink socket in the calling thread's network namespace. Changes nothing.
    pub fn new(table: &str) -> Result<Self, NftError> {
        if table.is_empty() || table.len() > 255 || table.contains('\0') {
            return Err(NftError::InvalidInput(format!("invalid nftables table name {table:?}")));
        }
        Ok(HostPorts {
            table: table.to_string(),
            conn: Mutex::new(Conn::open()?),
        })
    }

    fn table(&self) -> Table<'_> {
        Table {
            family: NFPROTO_INET,
            name: &self.table,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the maps, sets, chains and rules be there (elements are kept); commits nothing
    /// when all is in place.
    pub fn ensure(&self) -> Result<(), NftError> {
        let conn = &mut self.conn();
        if self.rules_in_place(conn)? {
            return Ok(());
        }
        let mut batch = Batch::default();
        self.push_skeleton(&mut batch);
        conn.commit(batch).map_err(|e| e.error)
    }

    /// Adds `owner`'s mappings to each of `pod_ips` (per family), and the hairpin pairs. One
    /// batch: all of them or none. A host port held by another pod fails with EEXIST
    /// ([`NftError::is_exists`]); adding the same mappings again succeeds.
    pub fn add(&self, owner: &str, mappings: &[PortMapping], pod_ips: &[IpAddr]) -> Result<(), NftError> {
        if mappings.is_empty() {
            return Ok(());
        }
        self.ensure()?;
        let (t, table) = (&self.table, self.table());
        let mut batch = Batch::default();
        for ip in pod_ips {
            let fam = Family::of(*ip);
            let elems: Vec<(Vec<u8>, Option<Vec<u8>>)> = mappings
                .iter()
                .map(|m| {
                    (
                        port_key(m.protocol, m.host_port).to_vec(),
                        Some(target_data(*ip, m.container_port)),
                    )
                })
                .collect();
            let what: Vec<String> = mappings
                .iter()
                .map(|m| format!("{}/{} -> {ip}:{}", m.host_port, m.protocol.name(), m.container_port))
                .collect();
            batch.push(
                table.elems(MsgType::NewSetElem, map_name(fam), &elems, Some(owner)),
                format!("adding hostPort {} to map {t} {}", what.join(", "), map_name(fam)),
            );
            let mut pair = addr_bytes(*ip);
            pair.extend(addr_bytes(*ip));
            batch.push(
                table.elems(MsgType::NewSetElem, hairpin_name(fam), &[(pair, None)], Some(owner)),
                format!("adding {ip} . {ip} to set {t} {}", hairpin_name(fam)),
            );
        }
        self.conn().commit(batch).map_err(|e| e.error)
    }

    /// Every mapping in the table.
    pub fn list(&self) -> Result<Vec<MappedPort>, NftError> {
        let conn = &mut self.conn();
        let mut out = Vec::new();
        for fam in Family::ALL {
            for (key, data, owner) in self.table().dump_elems(conn, map_name(fam))? {
                let (Some(proto), Some(data)) = (key.first().and_then(|p| Protocol::from_number(*p)), data) else {
                    continue;
                };
                let alen = header(fam).addr_len as usize;
                if key.len() < 6 || data.len() < alen + 2 {
                    continue;
                }
                let pod_ip = match fam {
                    Family::V4 => IpAddr::from(<[u8; 4]>::try_from(&data[..4]).expect("4 bytes")),
                    Family::V6 => IpAddr::from(<[u8; 16]>::try_from(&data[..16]).expect("16 bytes")),
                };
                out.push(MappedPort {
                    mapping: PortMapping {
                        protocol: proto,
                        host_port: u16::from_be_bytes([key[4], key[5]]),
                        container_port: u16::from_be_bytes([data[alen], data[alen + 1]]),
                    },
                    pod_ip,
                    owner: owner.unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// Removes every element (mappings and hairpin pairs) whose owner `keep` refuses; returns
    /// the owners removed. Nothing to do (no table, no maps) is success.
    pub fn remove_where(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, NftError> {
        let table = self.table();
        let sets: Vec<(Table, &str)> = Family::ALL
            .into_iter()
            .flat_map(|fam| [(table, map_name(fam)), (table, hairpin_name(fam))])
            .collect();
        super::rules::remove_owned(&mut self.conn(), &sets, keep)
    }

    /// Removes `owner`'s mappings and hairpin pairs.
    pub fn remove(&self, owner: &str) -> Result<(), NftError> {
        self.remove_where(|o| o != owner).map(|_| ())
    }

    /// Whether every chain holds exactly our rules (told by their comments), in order.
    fn rules_in_place(&self, conn: &mut Conn) -> Result<bool, NftError> {
        let chains: Vec<(&str, Vec<String>)> = self
            .rules()
            .into_iter()
            .map(|(chain, rules)| (chain, rules.into_iter().map(|(c, _)| c).collect()))
            .collect();
        self.table().rules_in_place(conn, &chains)
    }

    /// The rules of each chain: (comment, expressions builder).
    #[allow(clippy::type_complexity)]
    fn rules(&self) -> Vec<(&'static str, Vec<(String, Box<dyn Fn(&mut Msg)>)>)> {
        let mut dnat: Vec<(String, Box<dyn Fn(&mut Msg)>)> = Vec::new();
        let mut post: Vec<(String, Box<dyn Fn(&mut Msg)>)> = Vec::new();
        let mut out_rules: Vec<(String, Box<dyn Fn(&mut Msg)>)> = Vec::new();
        for fam in Family::ALL {
            out_rules.push((
                rule_comment(CHAIN_OUT, &format!("loopback{}", fam.bits())),
                Box::new(move |m| loopback_return(m, fam)),
            ));
            dnat.push((
                rule_comment(CHAIN_DNAT, map_name(fam)),
                Box::new(move |m| dnat_by_map(m, fam)),
            ));
            post.push((
                rule_comment(CHAIN_POST, hairpin_name(fam)),
                Box::new(move |m| hairpin_masquerade(m, fam)),
            ));
        }
        out_rules.push((rule_comment(CHAIN_OUT, "local"), Box::new(jump_if_local)));
        vec![
            (
                CHAIN_PRE,
                vec![(rule_comment(CHAIN_PRE, "local"), Box::new(jump_if_local))],
            ),
            (CHAIN_OUT, out_rules),
            (CHAIN_DNAT, dnat),
            (CHAIN_POST, post),
        ]
    }

    /// Table, maps, sets, chains, and each chain's rules replaced by ours.
    fn push_skeleton(&self, batch: &mut Batch) {
        let (t, table) = (&self.table, self.table());
        batch.push(table.new_table(), format!("adding table inet {t}"));
        let mut id = 100;
        for fam in Family::ALL {
            id += 1;
            batch.push(
                new_map(table, fam, id),
                format!("adding map inet {t} {}", map_name(fam)),
            );
            id += 1;
            batch.push(
                new_hairpin_set(table, fam, id),
                format!("adding set inet {t} {}", hairpin_name(fam)),
            );
        }
        let nat = |num, priority| {
            Some(Hook {
                num,
                priority,
                kind: "nat",
            })
        };
        let hooks = [
            (CHAIN_PRE, nat(NF_INET_PRE_ROUTING, NF_PRI_NAT_DST)),
            (CHAIN_OUT, nat(NF_INET_LOCAL_OUT, NF_PRI_NAT_DST)),
            (CHAIN_DNAT, None),
            (CHAIN_POST, nat(NF_INET_POST_ROUTING, NF_PRI_NAT_SRC)),
        ];
        for (chain, hook) in hooks {
            batch.push(table.new_chain(chain, hook), format!("adding chain inet {t} {chain}"));
        }
        for (chain, rules) in self.rules() {
            batch.push(table.flush_chain(chain), format!("flushing chain inet {t} {chain}"));
            for (comment, build) in rules {
                let context = format!("adding rule to chain inet {t} {chain}: {comment}");
                batch.push(table.new_rule(chain, &comment, build.as_ref()), context);
            }
        }
    }
}

/// `map hostportN { type inet_proto . inet_service : ADDR . inet_service; }`
fn new_map(table: Table, fam: Family, id: u32) -> Msg {
    let addr_type = header(fam).key_type;
    table.new_set(
        map_name(fam),
        concat_type(&[NFT_TYPE_INET_PROTOCOL, NFT_TYPE_INET_SERVICE]),
        8,
        Some((
            concat_type(&[addr_type, NFT_TYPE_INET_SERVICE]),
            header(fam).addr_len + 4,
        )),
        id,
    )
}

/// `set hairpinN { type ADDR . ADDR; }`
fn new_hairpin_set(table: Table, fam: Family, id: u32) -> Msg {
    let addr_type = header(fam).key_type;
    table.new_set(
        hairpin_name(fam),
        concat_type(&[addr_type, addr_type]),
        2 * header(fam).addr_len,
        None,
        id,
    )
}

/// `fib daddr type local jump hostports`
fn jump_if_local(m: &mut Msg) {
    expr(m, "fib", |m| {
        m.u32(NFTA_FIB_DREG, NFT_REG_1)
            .u32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE)
            .u32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR);
    });
    cmp_eq(m, NFT_REG_1, &RTN_LOCAL.to_ne_bytes());
    verdict(m, NFT_JUMP, Some(CHAIN_DNAT));
}

/// `ip daddr 127.0.0.0/8 return` (first byte 127) or `ip6 daddr ::1 return`.
fn loopback_return(m: &mut Msg, fam: Family) {
    match_family(m, fam);
    match fam {
        Family::V4 => {
            payload(m, NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, header(fam).daddr_offset, 1);
            cmp_eq(m, NFT_REG_1, &[127]);
        }
        Family::V6 => {
            payload(m, NFT_REG_1, NFT_PAYLOAD_NETWORK_HEADER, header(fam).daddr_offset, 16);
            cmp_eq(m, NFT_REG_1, &std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    verdict(m, NFT_RETURN, None);
}

/// `meta nfproto F dnat ip|ip6 to meta l4proto . th dport map @hostportN`. The key goes in
/// two 32-bit registers (each field padded to 4 bytes); the map's data (address . port) comes
/// back in the registers after it.
fn dnat_by_map(m: &mut Msg, fam: Family) {
    match_family(m, fam);
    expr(m, "meta", |m| {
        m.u32(NFTA_META_KEY, NFT_META_L4PROTO).u32(NFTA_META_DREG, NFT_REG32_00);
    });
    payload(m, NFT_REG32_00 + 1, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2);
    let data_reg = NFT_REG32_00 + 2;
    expr(m, "lookup", |m| {
        m.str(NFTA_LOOKUP_SET, map_name(fam))
            .u32(NFTA_LOOKUP_SREG, NFT_REG32_00)
            .u32(NFTA_LOOKUP_DREG, data_reg);
    });
    let port_reg = data_reg + header(fam).addr_len / 4;
    expr(m, "counter", |_| {});
    expr(m, "nat", |m| {
        m.u32(NFTA_NAT_TYPE, NFT_NAT_DNAT)
            .u32(NFTA_NAT_FAMILY, header(fam).nfproto as u32)
            .u32(NFTA_NAT_REG_ADDR_MIN, data_reg)
            .u32(NFTA_NAT_REG_PROTO_MIN, port_reg)
            .u32(NFTA_NAT_FLAGS, NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED);
    });
}

/// `ip saddr . ip daddr @hairpinN counter masquerade` (or `ip6`).
fn hairpin_masquerade(m: &mut Msg, fam: Family) {
    match_family(m, fam);
    let len = header(fam).addr_len;
    payload(
        m,
        NFT_REG32_00,
        NFT_PAYLOAD_NETWORK_HEADER,
        header(fam).saddr_offset,
        len,
    );
    payload(
        m,
        NFT_REG32_00 + len / 4,
        NFT_PAYLOAD_NETWORK_HEADER,
        header(fam).daddr_offset,
        len,
    );
    expr(m, "lookup", |m| {
        m.str(NFTA_LOOKUP_SET, hairpin_name(fam))
            .u32(NFTA_LOOKUP_SREG, NFT_REG32_00);
    });
    expr(m, "counter", |_| {});
    expr(m, "masq", |_| {});
}
