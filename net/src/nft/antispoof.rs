//! Anti-spoofing: what leaves a pod through its host end must carry that pod's own addresses
//! (and, on a bridge, its own MAC), so that a pod with CAP_NET_RAW (the default in containerd
//! and CRI-O) can neither send as another pod or any other address nor poison neighbours' ARP
//! and NDP caches to sit in the middle of their traffic.
//!
//! # Why this design
//!
//! Like the hostPorts ([`super::HostPorts`]), the rules never change with pods; a pod is a few
//! set elements keyed by its host end's name, each carrying its owner (the host end's alias) as
//! a comment, so DEL and GC find them without state:
//!
//! ```text
//! table bridge trellis {                              # bridge mode: checked per bridge port
//!   set ports { type ifname; }                        # host ends under protection
//!   set macs  { type ifname . ether_addr; }           # port . pod MAC
//!   set ip4   { type ifname . ipv4_addr; }            # port . pod address (and 0.0.0.0: ARP probes)
//!   set ip6   { type ifname . ipv6_addr; }            # port . pod address, link-local, :: (DAD)
//!   chain antispoof { type filter hook prerouting priority -200;
//!     iifname != @ports accept
//!     iifname . ether saddr != @macs counter drop
//!     ether type arp iifname . arp saddr ether != @macs counter drop
//!     ether type arp iifname . arp saddr ip != @ip4 counter drop
//!     ether type ip iifname . ip saddr != @ip4 counter drop
//!     ether type ip6 iifname . ip6 saddr != @ip6 counter drop
//!     ether type ip6 icmpv6 type nd-neighbor-advert iifname . <target> != @ip6 counter drop
//!     ether type { ip, ip6, arp } accept; counter drop }
//! }
//! table inet trellis {                                # routed mode: the host end is L3
//!   set spoof_ports { type ifname; }  set spoof_ip4 {...}  set spoof_ip6 {...}
//!   chain antispoof { type filter hook prerouting priority raw;
//!     iifname != @spoof_ports accept
//!     meta nfproto ipv4 iifname . ip saddr != @spoof_ip4 counter drop
//!     meta nfproto ipv6 iifname . ip6 saddr != @spoof_ip6 counter drop }
//! }
//! ```
//!
//! - **Bridge mode needs the `bridge` family.** Frames between two pods on one bridge never
//!   reach the IP hooks (without `br_netfilter`, which costs every bridged frame and is not ours
//!   to load), and at the IP layer every pod arrives on the bridge itself, so the port — the
//!   only thing that says *which* pod sent it — is visible only in the bridge family's hooks.
//!   Its prerouting hook sees every frame a pod sends, bridged or routed, before the bridge
//!   learns its MAC, ARP and NDP included.
//! - **Routed mode** checks at the IP layer, at priority raw, before conntrack and the hostPort
//!   DNAT: the host end is a point-to-point link, so ARP and NDP there reach only the node.
//!   A reverse-path check (`fib saddr . iif oif missing drop`) would need no elements, but it
//!   drops everything on a host end that is a bridge port once `br_netfilter` is loaded (as
//!   kube-proxy does), so the sets it is.
//! - One hash lookup per check whatever the number of pods; a port not in `ports` (the node's
//!   own traffic, uplinks, pods of a network that turned protection off) is accepted at once.
//! - After `nft flush ruleset` the daemon puts the chains back, but the elements are gone until
//!   their pods are re-created (as with hostPorts: only the runtime knows its pods). With the
//!   ports set empty that fails open — traffic flows unchecked — rather than cutting pods off.

use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use super::conn::{Batch, Conn};
use super::interval::Family;
use super::objects::expr;
use super::rules::{cmp, cmp_eq, concat_type, lookup, match_family, meta, payload, verdict, Hook, Table};
use super::wire::*;
use super::NftError;

/// How a pod's host end is attached, which decides where it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A port of a bridge: `bridge` table, MAC, ARP and NDP checked too.
    Bridged,
    /// A routed veth: `inet` table, addresses checked.
    Routed,
}

/// What a pod may send as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// The host end's name.
    pub port: String,
    pub kind: PortKind,
    /// The pod interface's MAC (bridge mode).
    pub mac: [u8; 6],
    /// Its addresses, link-local ones included (the unspecified addresses, for ARP probes and
    /// duplicate address detection, are added by [`AntiSpoof::protect`]).
    pub ips: Vec<IpAddr>,
    /// The Kubernetes pod, `namespace/name` (from the runtime's `K8S_POD_*` CNI_ARGS): how
    /// trellisd's NetworkPolicy finds the pod's Pod object before the API has its address.
    pub pod: Option<String>,
}

impl PodIdentity {
    /// A text record of `owner`'s identity, for the file the plugin leaves where trellisd can
    /// put the elements back after a flushed ruleset ([`PodIdentity::parse_record`]).
    pub fn record(&self, owner: &str) -> String {
        let kind = match self.kind {
            PortKind::Bridged => "bridged",
            PortKind::Routed => "routed",
        };
        let mut out = format!(
            "owner {owner}\nport {}\nkind {kind}\nmac {}\n",
            self.port,
            mac_text(&self.mac)
        );
        for ip in &self.ips {
            out.push_str(&format!("ip {ip}\n"));
        }
        if let Some(pod) = &self.pod {
            out.push_str(&format!("pod {pod}\n"));
        }
        out
    }

    /// (owner, identity) from a [`PodIdentity::record`]; `None` when it is not one.
    pub fn parse_record(text: &str) -> Option<(String, PodIdentity)> {
        let (mut owner, mut port, mut kind, mut mac, mut ips, mut pod) = (None, None, None, None, Vec::new(), None);
        for line in text.lines() {
            let (key, value) = line.split_once(' ')?;
            match key {
                "owner" => owner = Some(value.to_string()),
                "port" => port = Some(value.to_string()),
                "kind" => {
                    kind = Some(match value {
                        "bridged" => PortKind::Bridged,
                        "routed" => PortKind::Routed,
                        _ => return None,
                    })
                }
                "mac" => {
                    let mut m = [0u8; 6];
                    let parts: Vec<&str> = value.split(':').collect();
                    if parts.len() != 6 {
                        return None;
                    }
                    for (b, p) in m.iter_mut().zip(parts) {
                        *b = u8::from_str_radix(p, 16).ok()?;
                    }
                    mac = Some(m);
                }
                "ip" => ips.push(value.parse().ok()?),
                "pod" => pod = Some(value.to_string()),
                _ => return None,
            }
        }
        Some((
            owner?,
            PodIdentity {
                port: port?,
                kind: kind?,
                mac: mac?,
                ips,
                pod,
            },
        ))
    }
}

/// The anti-spoofing sets and rules of one network namespace's `trellis` tables.
pub struct AntiSpoof {
    table: String,
    conn: Mutex<Conn>,
}

const CHAIN: &str = "antispoof";
/// Bump when the rules change, so that an upgrade replaces them.
const VERSION: &str = "v1";
const NFT_META_IIFNAME: u32 = 6;
const NFT_PAYLOAD_LL_HEADER: u32 = 0;
const NFT_TYPE_ETHERADDR: u32 = 9;
const NFT_TYPE_IFNAME: u32 = 41;
const IFNAMSIZ: usize = 16;
const NF_PRI_RAW: i32 = -300;
const NF_BR_PRI_FILTER_BRIDGED: i32 = -200;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_ARP: [u8; 2] = [0x08, 0x06];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];

/// The names of one table's sets: (ports, macs, ip4, ip6).
struct Sets {
    ports: &'static str,
    macs: Option<&'static str>,
    ip4: &'static str,
    ip6: &'static str,
}

fn sets(kind: PortKind) -> Sets {
    match kind {
        PortKind::Bridged => Sets {
            ports: "ports",
            macs: Some("macs"),
            ip4: "ip4",
            ip6: "ip6",
        },
        PortKind::Routed => Sets {
            ports: "spoof_ports",
            macs: None,
            ip4: "spoof_ip4",
            ip6: "spoof_ip6",
        },
    }
}

/// nft(8) reads a plain string key as host-endian only when told so (libnftnl's
/// NFTNL_UDATA_SET_KEYBYTEORDER = BYTEORDER_HOST_ENDIAN); otherwise it prints the names
/// reversed, as "".
pub(super) fn host_endian_key(m: &mut Msg) {
    let mut udata = vec![0u8, 4];
    udata.extend_from_slice(&1u32.to_ne_bytes());
    m.bytes(NFTA_SET_USERDATA, &udata);
}

/// An interface name as an nft `ifname` key (NUL-padded to IFNAMSIZ).
pub(super) fn ifname_key(name: &str) -> Vec<u8> {
    let mut k = name.as_bytes()[..name.len().min(IFNAMSIZ - 1)].to_vec();
    k.resize(IFNAMSIZ, 0);
    k
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn rule_comment(what: &str) -> String {
    format!("trellis antispoof {VERSION} {what}")
}

/// The registers a concatenation `iifname . FIELD` is loaded into: the name fills four 32-bit
/// registers, the field starts after it.
const FIELD_REG: u32 = NFT_REG32_00 + (IFNAMSIZ as u32) / 4;

type RuleBuilder = Box<dyn Fn(&mut Msg)>;

impl AntiSpoof {
    /// Opens a netlink socket in the calling thread's network namespace. Changes nothing.
    pub fn new(table: &str) -> Result<Self, NftError> {
        if table.is_empty() || table.len() > 255 || table.contains('\0') {
            return Err(NftError::InvalidInput(format!("invalid nftables table name {table:?}")));
        }
        Ok(AntiSpoof {
            table: table.to_string(),
            conn: Mutex::new(Conn::open()?),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn table(&self, kind: PortKind) -> Table<'_> {
        Table {
            family: match kind {
                PortKind::Bridged => NFPROTO_BRIDGE,
                PortKind::Routed => NFPROTO_INET,
            },
            name: &self.table,
        }
    }

    /// Makes the sets, the chain and its rules for `kind` be there (elements are kept); commits
    /// nothing when all is in place. The daemon calls it on every resync: a flushed ruleset
    /// gets its chain back within a second.
    pub fn ensure(&self, kind: PortKind) -> Result<(), NftError> {
        let conn = &mut self.conn();
        let rules = rules(kind);
        let comments = vec![(CHAIN, rules.iter().map(|(c, _)| c.clone()).collect())];
        if self.table(kind).rules_in_place(conn, &comments)? {
            return Ok(());
        }
        let mut batch = Batch::default();
        self.push_skeleton(&mut batch, kind, rules);
        conn.commit(batch).map_err(|e| e.error)
    }

    /// From now on `pod` may send only as itself; `owner` (the host end's alias) tags its
    /// elements. One batch: all of them or none. Adding the same again succeeds.
    pub fn protect(&self, owner: &str, pod: &PodIdentity) -> Result<(), NftError> {
        self.ensure(pod.kind)?;
        let table = self.table(pod.kind);
        let s = sets(pod.kind);
        let port = ifname_key(&pod.port);
        let pair = |tail: Vec<u8>| {
            let mut k = port.clone();
            k.extend(tail);
            (k, None)
        };
        let mut ip4 = vec![pair(vec![0; 4])];
        let mut ip6 = vec![pair(vec![0; 16])];
        for ip in &pod.ips {
            match ip {
                IpAddr::V4(_) => ip4.push(pair(ip_bytes(*ip))),
                IpAddr::V6(_) => ip6.push(pair(ip_bytes(*ip))),
            }
        }
        let mut batch = Batch::default();
        let d = table.describe();
        if let Some(macs) = s.macs {
            let mut mac = pod.mac.to_vec();
            mac.resize(8, 0);
            batch.push(
                table.elems(MsgType::NewSetElem, macs, &[pair(mac)], Some(owner)),
                format!("adding {} . {} to set {d} {macs}", pod.port, mac_text(&pod.mac)),
            );
        }
        batch.push(
            table.elems(MsgType::NewSetElem, s.ip4, &ip4, Some(owner)),
            format!("adding {}'s IPv4 addresses to set {d} {}", pod.port, s.ip4),
        );
        batch.push(
            table.elems(MsgType::NewSetElem, s.ip6, &ip6, Some(owner)),
            format!("adding {}'s IPv6 addresses to set {d} {}", pod.port, s.ip6),
        );
        // The port last: it turns the checks on, and the batch is atomic anyway.
        batch.push(
            table.elems(MsgType::NewSetElem, s.ports, &[(port.clone(), None)], Some(owner)),
            format!("adding {} to set {d} {}", pod.port, s.ports),
        );
        self.conn().commit(batch).map_err(|e| e.error)
    }

    /// The owners of the ports under protection, with their kind.
    pub fn owners(&self) -> Result<Vec<(String, PortKind)>, NftError> {
        let conn = &mut self.conn();
        let mut out = Vec::new();
        for kind in [PortKind::Bridged, PortKind::Routed] {
            for (_, _, owner) in self.table(kind).dump_elems(conn, sets(kind).ports)? {
                out.push((owner.unwrap_or_default(), kind));
            }
        }
        Ok(out)
    }

    /// Removes every element whose owner `keep` refuses, in both tables; returns the owners
    /// removed. Nothing to do (no table, no sets) is success.
    pub fn remove_where(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<String>, NftError> {
        let mut all = Vec::new();
        for kind in [PortKind::Bridged, PortKind::Routed] {
            let s = sets(kind);
            for set in [Some(s.ports), s.macs, Some(s.ip4), Some(s.ip6)].into_iter().flatten() {
                all.push((self.table(kind), set));
            }
        }
        super::rules::remove_owned(&mut self.conn(), &all, keep)
    }

    /// Removes `owner`'s elements.
    pub fn remove(&self, owner: &str) -> Result<(), NftError> {
        self.remove_where(|o| o != owner).map(|_| ())
    }

    /// Table, sets, chain, and the chain's rules replaced by ours.
    fn push_skeleton(&self, batch: &mut Batch, kind: PortKind, rules: Vec<(String, RuleBuilder)>) {
        let table = self.table(kind);
        let d = table.describe();
        let s = sets(kind);
        batch.push(table.new_table(), format!("adding table {d}"));
        let pair = |t: u32| concat_type(&[NFT_TYPE_IFNAME, t]);
        let mut new_sets = vec![
            (s.ports, NFT_TYPE_IFNAME, IFNAMSIZ as u32),
            (s.ip4, pair(NFT_TYPE_IPADDR), IFNAMSIZ as u32 + 4),
            (s.ip6, pair(NFT_TYPE_IP6ADDR), IFNAMSIZ as u32 + 16),
        ];
        if let Some(macs) = s.macs {
            new_sets.push((macs, pair(NFT_TYPE_ETHERADDR), IFNAMSIZ as u32 + 8));
        }
        for (id, (set, ty, len)) in (200..).zip(new_sets) {
            let mut m = table.new_set(set, ty, len, None, id);
            if ty == NFT_TYPE_IFNAME {
                host_endian_key(&mut m);
            }
            batch.push(m, format!("adding set {d} {set}"));
        }
        // The bridge family numbers its hooks as inet does: prerouting is 0 in both.
        let hook = match kind {
            PortKind::Bridged => Hook {
                num: NF_INET_PRE_ROUTING,
                priority: NF_BR_PRI_FILTER_BRIDGED,
                kind: "filter",
            },
            PortKind::Routed => Hook {
                num: NF_INET_PRE_ROUTING,
                priority: NF_PRI_RAW,
                kind: "filter",
            },
        };
        batch.push(table.new_chain(CHAIN, Some(hook)), format!("adding chain {d} {CHAIN}"));
        batch.push(table.flush_chain(CHAIN), format!("flushing chain {d} {CHAIN}"));
        for (comment, build) in rules {
            let context = format!("adding rule to chain {d} {CHAIN}: {comment}");
            batch.push(table.new_rule(CHAIN, &comment, build.as_ref()), context);
        }
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The chain's rules for `kind`: (comment, expressions).
fn rules(kind: PortKind) -> Vec<(String, RuleBuilder)> {
    let s = sets(kind);
    let (ports, ip4, ip6) = (s.ports, s.ip4, s.ip6);
    let mut out: Vec<(String, RuleBuilder)> = vec![(
        rule_comment("unprotected ports"),
        Box::new(move |m| {
            meta(m, NFT_META_IIFNAME, NFT_REG32_00);
            lookup(m, ports, NFT_REG32_00, true);
            verdict(m, NF_ACCEPT, None);
        }),
    )];
    match kind {
        PortKind::Routed => {
            for (fam, set) in [(Family::V4, ip4), (Family::V6, ip6)] {
                let h = super::objects::header(fam);
                out.push((
                    rule_comment(&format!("source{}", fam.bits())),
                    Box::new(move |m| {
                        match_family(m, fam);
                        port_dot(m, NFT_PAYLOAD_NETWORK_HEADER, h.saddr_offset, h.addr_len);
                        drop_unless_in(m, set);
                    }),
                ));
            }
        }
        PortKind::Bridged => {
            let macs = s.macs.expect("bridge tables have a MAC set");
            out.push((
                rule_comment("ether source"),
                Box::new(move |m| {
                    port_dot(m, NFT_PAYLOAD_LL_HEADER, 6, 6);
                    drop_unless_in(m, macs);
                }),
            ));
            // (what, ethertype, offset and length in the network header, set): ARP for
            // Ethernet and IPv4 has the sender's hardware address at 8 and its IP at 14.
            for (what, ty, offset, len, set) in [
                ("arp sender mac", ETH_P_ARP, 8, 6, macs),
                ("arp sender ip", ETH_P_ARP, 14, 4, ip4),
                ("source4", ETH_P_IP, 12, 4, ip4),
                ("source6", ETH_P_IPV6, 8, 16, ip6),
            ] {
                out.push((
                    rule_comment(what),
                    Box::new(move |m| {
                        ether_type(m, ty);
                        port_dot(m, NFT_PAYLOAD_NETWORK_HEADER, offset, len);
                        drop_unless_in(m, set);
                    }),
                ));
            }
            // A neighbour advertisement's target (ICMPv6 type 136, target at offset 8).
            out.push((
                rule_comment("nd target"),
                Box::new(move |m| {
                    ether_type(m, ETH_P_IPV6);
                    meta(m, NFT_META_L4PROTO, NFT_REG_1);
                    cmp_eq(m, NFT_REG_1, &[58]);
                    payload(m, NFT_REG_1, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1);
                    cmp_eq(m, NFT_REG_1, &[136]);
                    port_dot(m, NFT_PAYLOAD_TRANSPORT_HEADER, 8, 16);
                    drop_unless_in(m, ip6);
                }),
            ));
            for (what, ty) in [("ip", ETH_P_IP), ("ip6", ETH_P_IPV6), ("arp", ETH_P_ARP)] {
                out.push((
                    rule_comment(&format!("accept {what}")),
                    Box::new(move |m| {
                        ether_type(m, ty);
                        verdict(m, NF_ACCEPT, None);
                    }),
                ));
            }
            out.push((
                rule_comment("other ethertypes"),
                Box::new(|m| {
                    expr(m, "counter", |_| {});
                    verdict(m, NF_DROP, None);
                }),
            ));
        }
    }
    out
}

/// `ether type T`: the ethertype at offset 12 of the link-layer header.
fn ether_type(m: &mut Msg, ty: [u8; 2]) {
    payload(m, NFT_REG_1, NFT_PAYLOAD_LL_HEADER, 12, 2);
    cmp(m, NFT_REG_1, NFT_CMP_EQ, &ty);
}

/// Loads `iifname . FIELD` (FIELD: `len` bytes at `offset` of header `base`).
fn port_dot(m: &mut Msg, base: u32, offset: u32, len: u32) {
    meta(m, NFT_META_IIFNAME, NFT_REG32_00);
    payload(m, FIELD_REG, base, offset, len);
}

/// `... != @set counter drop` on the loaded concatenation.
fn drop_unless_in(m: &mut Msg, set: &str) {
    lookup(m, set, NFT_REG32_00, true);
    expr(m, "counter", |_| {});
    verdict(m, NF_DROP, None);
}
