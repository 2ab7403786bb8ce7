//! NetworkPolicy compiled for one node: the state its nftables table must hold, still without
//! a word of netlink, so that it can be checked against [`super::semantics`] on every pod pair
//! ([`Compiled::allows`] runs it as the kernel will).
//!
//! # Shape, and why
//!
//! ```text
//!  forward-ish hook:  ct state established,related accept   (replies, and every later packet)
//!                     iifname vmap @egress   → jump eg-<rules>   (the source pod's side)
//!                     oifname vmap @ingress  → jump in-<rules>   (the destination pod's side)
//!  chain in-<rules>:  ip saddr @peer-<selector> tcp dport { 80-81 } return   comment "ns/policy"
//!                     …                                                 (one line per peer × port)
//!                     drop                                              (isolated, nothing matched)
//! ```
//!
//! - **Per packet, one map lookup per side**, whatever the number of pods and policies: the
//!   maps are keyed by the pod's host-side interface. Only a connection's first packet walks a
//!   chain; the rest are `established`.
//! - **Chains are shared** by every local pod with the same rules (the same policies select
//!   it, and its named ports resolve the same): chains grow with distinct policy combinations,
//!   not with pods.
//! - **Peers are sets, one per distinct peer** (namespace scope, pod selector, or ipBlock with
//!   its exceptions as intervals), shared by every rule that names the same peer, whichever the
//!   policy: a pod that appears or changes labels is an element added or removed, no rule
//!   changes.
//! - **Named ports**: for ingress, resolved against the local pod (part of its chain's key);
//!   for egress, the destination's port, so the peer set holds `address . port` pairs of the
//!   pods that have it (`ip daddr . th dport @peer-…-named-…`).
//! - Matching rules `return` (the other side may still have to allow it), the chain's end
//!   drops: a pod is checked for egress on its own node and for ingress on the destination's.

use super::model::{Peer, PodInfo, PortMatch, Proto, Rule};
use super::semantics::{Direction, View};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// What a rule's peer matches against the other end's address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerMatch {
    /// Any address (no `from`/`to`).
    Any,
    /// The address is in this set of [`Compiled::sets`].
    Set(String),
    /// `address . port` is in this set of [`Compiled::port_sets`] (an egress named port), for
    /// this protocol.
    AddrPort(String, Proto),
}

/// What a rule's ports match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortsMatch {
    Any,
    /// Any port of this protocol.
    Proto(Proto),
    /// These inclusive ranges of this protocol.
    Ranges(Proto, Vec<(u16, u16)>),
}

/// One line of a chain: on match, this side allows the connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Line {
    pub peer: PeerMatch,
    pub ports: PortsMatch,
    /// `namespace/name` of the policy it comes from (the nft comment, the counters' label).
    pub policy: String,
}

/// A chain: its lines in order; the end drops.
pub type Chain = Vec<Line>;

/// The desired nftables state of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Address sets (inclusive ranges, both families), by name.
    pub sets: BTreeMap<String, Vec<(IpAddr, IpAddr)>>,
    /// `address . port` sets, by name.
    pub port_sets: BTreeMap<String, BTreeSet<(IpAddr, u16)>>,
    /// Chains by name (`in-…`, `eg-…`).
    pub chains: BTreeMap<String, Chain>,
    /// Local pod interface → its ingress chain (absent: not isolated for ingress).
    pub ingress: BTreeMap<String, String>,
    /// Local pod interface → its egress chain.
    pub egress: BTreeMap<String, String>,
    /// Local pod interface → its addresses (bridge mode keys the maps by them).
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Local pods judged: found in the view (with or without policy), or in a namespace
    /// without policies (no policy can select them). Their start hold is released.
    pub covered: BTreeSet<String>,
    /// Local pods kept held: in a namespace with policies, their Pod object not seen yet.
    pub held: BTreeSet<String>,
}

/// A pod on this node: its host-side interface and addresses (from the plugin's records).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    /// `namespace/name`, when the runtime said (Kubernetes does): the Pod object is found by
    /// it before the API has the pod's address (kubelet reports it only after ADD).
    pub pod: Option<String>,
}

/// A stable, short name from `what` (FNV-1a, 64 bits, hex): the same peer or rule list gets the
/// same name in every run, so an update touches only what changed.
fn name(prefix: &str, what: &impl std::fmt::Debug) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{what:?}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{prefix}-{h:016x}")
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((v as u32).into())
    } else {
        IpAddr::V6(v.into())
    }
}

/// `cidr` less `except`, as sorted inclusive ranges.
fn block_ranges(cidr: &ipnetwork::IpNetwork, except: &[ipnetwork::IpNetwork]) -> Vec<(IpAddr, IpAddr)> {
    let bounds = |n: &ipnetwork::IpNetwork| {
        let bits = if n.is_ipv4() { 32 } else { 128 };
        let start = to_u128(n.network());
        let size_minus_one = if n.prefix() == 0 {
            if bits == 128 {
                u128::MAX
            } else {
                u128::from(u32::MAX)
            }
        } else {
            (1u128 << (bits - u32::from(n.prefix()))) - 1
        };
        (start, start + size_minus_one)
    };
    let v4 = cidr.is_ipv4();
    let mut ranges = vec![bounds(cidr)];
    for e in except {
        let (es, ee) = bounds(e);
        ranges = ranges
            .into_iter()
            .flat_map(|(s, t)| {
                let mut out = Vec::new();
                if ee < s || es > t {
                    out.push((s, t));
                } else {
                    if es > s {
                        out.push((s, es - 1));
                    }
                    if ee < t {
                        out.push((ee + 1, t));
                    }
                }
                out
            })
            .collect();
    }
    ranges
        .into_iter()
        .map(|(s, t)| (from_u128(s, v4), from_u128(t, v4)))
        .collect()
}

impl View {
    /// The pods a peer matches (for ipBlocks: the pods whose address is in it).
    fn peer_pods<'a>(&'a self, peer: &'a Peer) -> impl Iterator<Item = &'a PodInfo> {
        self.pods
            .iter()
            .filter(move |p| p.ips.iter().any(|ip| self.peer_matches(peer, *ip, Some(p))))
    }

    fn peer_addresses(&self, peer: &Peer) -> Vec<(IpAddr, IpAddr)> {
        match peer {
            Peer::Block { cidr, except } => block_ranges(cidr, except),
            Peer::Pods { .. } => {
                let mut ips: Vec<IpAddr> = self.peer_pods(peer).flat_map(|p| p.ips.iter().copied()).collect();
                ips.sort();
                ips.dedup();
                ips.into_iter().map(|ip| (ip, ip)).collect()
            }
        }
    }
}

/// Builds the sets and lines of one rule.
struct Builder<'a> {
    view: &'a View,
    out: Compiled,
}

impl Builder<'_> {
    /// The set for `peer` (made once, shared).
    fn peer_set(&mut self, peer: &Peer) -> String {
        let n = name("peer", peer);
        if !self.out.sets.contains_key(&n) {
            let addrs = self.view.peer_addresses(peer);
            self.out.sets.insert(n.clone(), addrs);
        }
        n
    }

    /// The `address . port` set of the pods `peer` matches (or every pod, `None`) that have the
    /// named port `port`/`proto`.
    fn named_set(&mut self, peer: Option<&Peer>, port: &str, proto: Proto) -> String {
        let n = name("named", &(peer, port, proto));
        if !self.out.port_sets.contains_key(&n) {
            let pods: Vec<&PodInfo> = match peer {
                Some(p) => self.view.peer_pods(p).collect(),
                None => self.view.pods.iter().collect(),
            };
            let mut elems = BTreeSet::new();
            for pod in pods {
                if let Some(number) = pod.named_port(port, proto) {
                    for ip in &pod.ips {
                        if peer.is_none_or(|p| self.view.peer_matches(p, *ip, Some(pod))) {
                            elems.insert((*ip, number));
                        }
                    }
                }
            }
            self.out.port_sets.insert(n.clone(), elems);
        }
        n
    }

    /// The lines of one rule of `policy` for a local pod `subject` in direction `dir`.
    fn rule_lines(&mut self, policy: &str, rule: &Rule, subject: &PodInfo, dir: Direction) -> Vec<Line> {
        let peers: Vec<Option<&Peer>> = match &rule.peers {
            None => vec![None],
            Some(ps) => ps.iter().map(Some).collect(),
        };
        let mut lines = Vec::new();
        for peer in peers {
            let set = peer.map(|p| self.peer_set(p));
            let peer_match = || set.clone().map_or(PeerMatch::Any, PeerMatch::Set);
            let Some(ports) = &rule.ports else {
                lines.push(Line {
                    peer: peer_match(),
                    ports: PortsMatch::Any,
                    policy: policy.to_string(),
                });
                continue;
            };
            // Numbered ports (and ingress named ports, resolved on the subject) per protocol.
            let mut ranges: BTreeMap<Proto, Vec<(u16, u16)>> = BTreeMap::new();
            let mut any: BTreeSet<Proto> = BTreeSet::new();
            for m in ports {
                match m {
                    PortMatch::Any(p) => {
                        any.insert(*p);
                    }
                    PortMatch::Range(p, a, b) => ranges.entry(*p).or_default().push((*a, *b)),
                    PortMatch::Named(p, n) => match dir {
                        Direction::Ingress => {
                            if let Some(number) = subject.named_port(n, *p) {
                                ranges.entry(*p).or_default().push((number, number));
                            }
                        }
                        Direction::Egress => {
                            let s = self.named_set(peer, n, *p);
                            lines.push(Line {
                                peer: PeerMatch::AddrPort(s, *p),
                                ports: PortsMatch::Proto(*p),
                                policy: policy.to_string(),
                            });
                        }
                    },
                }
            }
            for p in &any {
                lines.push(Line {
                    peer: peer_match(),
                    ports: PortsMatch::Proto(*p),
                    policy: policy.to_string(),
                });
            }
            for (p, mut rs) in ranges {
                if any.contains(&p) {
                    continue;
                }
                rs.sort();
                rs.dedup();
                lines.push(Line {
                    peer: peer_match(),
                    ports: PortsMatch::Ranges(p, rs),
                    policy: policy.to_string(),
                });
            }
        }
        lines
    }
}

/// Compiles `view` for the pods on this node.
pub fn compile(view: &View, local: &[LocalPod]) -> Compiled {
    let mut b = Builder {
        view,
        out: Compiled::default(),
    };
    for lp in local {
        b.out.addresses.insert(lp.ifname.clone(), lp.ips.clone());
        let ns_name = lp.pod.as_deref().and_then(|k| k.split_once('/'));
        let by_name = ns_name.and_then(|(ns, name)| view.pods.iter().find(|p| p.namespace == ns && p.name == name));
        let Some(pod) = by_name.or_else(|| lp.ips.iter().find_map(|ip| view.pod_by_ip(*ip))) else {
            // Not (yet) known to the API: held while a policy of its namespace might select
            // it (policies select pods of their own namespace only).
            match ns_name.map(|(ns, _)| ns) {
                Some(ns) if view.policies.iter().any(|p| p.namespace == ns) => b.out.held.insert(lp.ifname.clone()),
                _ => b.out.covered.insert(lp.ifname.clone()),
            };
            continue;
        };
        b.out.covered.insert(lp.ifname.clone());
        for dir in [Direction::Ingress, Direction::Egress] {
            let mut chain: Chain = Vec::new();
            let mut isolated = false;
            for (policy, rules) in view.selecting(pod, dir) {
                isolated = true;
                for r in rules {
                    chain.extend(b.rule_lines(&policy.key(), r, pod, dir));
                }
            }
            if !isolated {
                continue;
            }
            let prefix = match dir {
                Direction::Ingress => "in",
                Direction::Egress => "eg",
            };
            let chain_name = name(prefix, &chain);
            b.out.chains.entry(chain_name.clone()).or_insert(chain);
            let map = match dir {
                Direction::Ingress => &mut b.out.ingress,
                Direction::Egress => &mut b.out.egress,
            };
            map.insert(lp.ifname.clone(), chain_name);
        }
    }
    b.out
}

impl Compiled {
    fn in_set(&self, set: &str, ip: IpAddr) -> bool {
        self.sets.get(set).is_some_and(|ranges| {
            ranges
                .iter()
                .any(|(s, e)| s.is_ipv4() == ip.is_ipv4() && to_u128(*s) <= to_u128(ip) && to_u128(ip) <= to_u128(*e))
        })
    }

    /// Runs `chain` as the kernel will: does a line match the other end `peer_ip` and the
    /// destination port?
    fn chain_allows(&self, chain: &str, peer_ip: IpAddr, proto: Proto, port: u16) -> bool {
        self.chains[chain].iter().any(|l| {
            let peer_ok = match &l.peer {
                PeerMatch::Any => true,
                PeerMatch::Set(s) => self.in_set(s, peer_ip),
                PeerMatch::AddrPort(s, p) => *p == proto && self.port_sets[s].contains(&(peer_ip, port)),
            };
            let ports_ok = match &l.ports {
                PortsMatch::Any => true,
                PortsMatch::Proto(p) => *p == proto,
                PortsMatch::Ranges(p, rs) => *p == proto && rs.iter().any(|(a, b)| (*a..=*b).contains(&port)),
            };
            peer_ok && ports_ok
        })
    }

    /// This node's verdict on a new connection: its egress side when `src_if` is a local pod's
    /// interface, its ingress side when `dst_if` is.
    pub fn allows(
        &self,
        (src_if, src): (Option<&str>, IpAddr),
        (dst_if, dst): (Option<&str>, IpAddr),
        proto: Proto,
        port: u16,
    ) -> bool {
        let egress = src_if
            .and_then(|i| self.egress.get(i))
            .is_none_or(|c| self.chain_allows(c, dst, proto, port));
        let ingress = dst_if
            .and_then(|i| self.ingress.get(i))
            .is_none_or(|c| self.chain_allows(c, src, proto, port));
        egress && ingress
    }

    /// The state as the kernel table takes it ([`trellis_net::nft::PolicyTable::apply`]).
    pub fn to_nft(&self) -> trellis_net::nft::PolicyState {
        use trellis_net::nft::{LinePeer, LinePorts, PolicyChain, PolicyLine};
        let chains = self
            .chains
            .iter()
            .map(|(name, lines)| {
                let lines = lines
                    .iter()
                    .map(|l| PolicyLine {
                        peer: match &l.peer {
                            PeerMatch::Any => LinePeer::Any,
                            PeerMatch::Set(s) => LinePeer::Set(s.clone()),
                            PeerMatch::AddrPort(s, p) => LinePeer::AddrPort(s.clone(), p.number()),
                        },
                        ports: match &l.ports {
                            PortsMatch::Any => LinePorts::Any,
                            PortsMatch::Proto(p) => LinePorts::Proto(p.number()),
                            PortsMatch::Ranges(p, rs) => LinePorts::Ranges(p.number(), rs.clone()),
                        },
                        comment: l.policy.clone(),
                    })
                    .collect();
                let chain = PolicyChain {
                    peer_is_source: name.starts_with("in-"),
                    lines,
                };
                (name.clone(), chain)
            })
            .collect();
        trellis_net::nft::PolicyState {
            sets: self.sets.clone(),
            port_sets: self.port_sets.clone(),
            chains,
            ingress: self.ingress.clone(),
            egress: self.egress.clone(),
            addresses: self.addresses.clone(),
            covered: self.covered.clone(),
            held: self.held.clone(),
        }
    }

    /// Rules in all chains (the ruleset's size, for the growth tests and benches).
    pub fn lines(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::super::semantics::e2e_model::*;
    use super::*;
    use serde_json::json;

    /// The e2e model's pods on two nodes, compiled per node; every pod pair, protocol and port
    /// (80, 81, 82) decided by the compiled state must be what the API reference says.
    fn check_against_semantics(v: &View) {
        let ifname = |p: &PodInfo| format!("veth-{}-{}", p.namespace, p.name);
        let nodes: BTreeSet<&str> = v.pods.iter().map(|p| p.node.as_str()).collect();
        let compiled: BTreeMap<&str, Compiled> = nodes
            .iter()
            .map(|n| {
                let local: Vec<LocalPod> = v
                    .pods
                    .iter()
                    .filter(|p| p.node == *n)
                    .map(|p| LocalPod {
                        ifname: ifname(p),
                        ips: p.ips.clone(),
                        pod: Some(p.key()),
                    })
                    .collect();
                (*n, compile(v, &local))
            })
            .collect();
        for s in &v.pods {
            for d in &v.pods {
                for proto in Proto::ALL {
                    for port in [80, 81, 82] {
                        let (sif, dif) = (ifname(s), ifname(d));
                        let on_src = &compiled[s.node.as_str()];
                        let on_dst = &compiled[d.node.as_str()];
                        let (sip, dip) = (s.ips[0], d.ips[0]);
                        // Each node decides for its own pods only; a pod's traffic to
                        // itself never leaves it.
                        let got = s.key() == d.key()
                            || (on_src.allows((Some(&sif), sip), (None, dip), proto, port)
                                && on_dst.allows((None, sip), (Some(&dif), dip), proto, port));
                        let want = v.allowed(sip, dip, proto, port);
                        assert_eq!(got, want, "{} -> {} {proto:?}/{port}", s.key(), d.key());
                    }
                }
            }
        }
    }

    fn cases() -> Vec<Vec<serde_json::Value>> {
        let meta = |ns: &str, name: &str| json!({"namespace": ns, "name": name});
        vec![
            vec![],
            vec![json!({"metadata": meta("x", "deny-all"), "spec": {"podSelector": {}}})],
            vec![json!({"metadata": meta("x", "deny-egress"), "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})],
            vec![
                json!({"metadata": meta("x", "from-y"), "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}}),
            ],
            vec![
                json!({"metadata": meta("x", "from-y-b"), "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
            ],
            vec![json!({"metadata": meta("x", "named"), "spec": {"podSelector": {},
                "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": 80}]}]}})],
            vec![
                json!({"metadata": meta("y", "egress-named"), "spec": {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]},
                                                     {"ports": [{"port": "serve-81-sctp", "protocol": "SCTP"}]}]}}),
            ],
            vec![
                json!({"metadata": meta("z", "block"), "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24", "10.244.2.11/32"]}}]}],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.244.1.0/24"}}], "ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}]}]}}),
            ],
            // Two policies on one pod: the union.
            vec![
                json!({"metadata": meta("x", "p1"), "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                    "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}}),
                json!({"metadata": meta("x", "p2"), "spec": {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]},
                    "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["z"]}]}}]}]}}),
                json!({"metadata": meta("y", "egress-dns-only"), "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]}]}}),
            ],
        ]
    }

    #[test]
    fn compiled_state_decides_as_the_api_reference_on_the_e2e_model() {
        for policies in cases() {
            let mut v = view();
            v.policies = policies.into_iter().map(policy).collect();
            check_against_semantics(&v);
        }
    }

    #[test]
    fn pods_with_the_same_rules_share_one_chain_and_peers_share_one_set() {
        let mut v = view();
        v.policies = vec![
            policy(
                json!({"metadata": {"namespace": "x", "name": "p1"}, "spec": {"podSelector": {},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
            ),
            policy(
                json!({"metadata": {"namespace": "x", "name": "p2"}, "spec": {"podSelector": {},
                "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
            ),
        ];
        let local: Vec<LocalPod> = v
            .pods
            .iter()
            .filter(|p| p.namespace == "x")
            .map(|p| LocalPod {
                ifname: p.name.clone(),
                ips: p.ips.clone(),
                pod: None,
            })
            .collect();
        let c = compile(&v, &local);
        assert_eq!((c.ingress.len(), c.egress.len()), (3, 3));
        assert_eq!(c.chains.len(), 2, "one ingress and one egress chain for the three pods");
        assert_eq!(c.sets.len(), 1, "one set for the one peer both policies name");
        assert_eq!(c.sets.values().next().unwrap(), &vec![(ip(0, 0), ip(0, 0))]);
    }

    #[test]
    fn ip_block_exceptions_are_interval_differences() {
        let r = block_ranges(
            &"10.0.0.0/8".parse().unwrap(),
            &["10.1.0.0/16".parse().unwrap(), "10.255.255.255/32".parse().unwrap()],
        );
        let shown: Vec<String> = r.iter().map(|(a, b)| format!("{a}-{b}")).collect();
        assert_eq!(shown, ["10.0.0.0-10.0.255.255", "10.2.0.0-10.255.255.254"]);
        let all6 = block_ranges(&"::/0".parse().unwrap(), &[]);
        assert_eq!(
            all6[0].1,
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse::<IpAddr>().unwrap()
        );
    }
}
