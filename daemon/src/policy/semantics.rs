//! What NetworkPolicy allows, read straight off the API reference, one connection at a time:
//! the definition the compiled nftables state is checked against (`compile`'s tests compare
//! the two on every pod pair, protocol and port of a cluster).
//!
//! - A pod is isolated for ingress (egress) when any policy of that type selects it; a pod
//!   that is not isolated allows everything in that direction.
//! - An isolated pod allows what any rule of any policy selecting it allows (a union: policies
//!   never deny).
//! - A connection needs both: egress from the source (when it is a pod) and ingress to the
//!   destination (when it is a pod). Replies of an allowed connection always pass (conntrack:
//!   not a question asked here).
//! - A pod reaches itself whatever the policies (its own traffic never leaves it).
//! - `ipBlock` matches addresses, pods' included (the upstream e2e tests put pod addresses in
//!   ipBlocks); selectors match pods only.
//! - A named port is the destination pod's container port of that name and protocol: the
//!   selected pod's for ingress, the peer's for egress (so an egress rule with a named port
//!   never allows a destination that is not a pod).

use super::model::{Namespaces, Peer, PodInfo, Policy, PortMatch, Proto, Rule};
use super::selector::Labels;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Everything policy decisions depend on.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<Policy>,
}

/// Which way a policy looks at a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl View {
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.ips.contains(&ip))
    }

    /// The policies that select `pod` and are of type `dir`, with their rules.
    pub fn selecting<'a>(&'a self, pod: &'a PodInfo, dir: Direction) -> impl Iterator<Item = (&'a Policy, &'a [Rule])> {
        self.policies.iter().filter_map(move |p| {
            let rules = match dir {
                Direction::Ingress => p.ingress.as_deref(),
                Direction::Egress => p.egress.as_deref(),
            }?;
            (p.namespace == pod.namespace && p.pod_selector.matches(&pod.labels)).then_some((p, rules))
        })
    }

    /// Whether `peer` (written in a policy of namespace `policy_ns`) matches the endpoint at
    /// `ip` (a pod when `pod` is `Some`).
    pub fn peer_matches(&self, peer: &Peer, ip: IpAddr, pod: Option<&PodInfo>) -> bool {
        match peer {
            Peer::Block { cidr, except } => cidr.contains(ip) && !except.iter().any(|e| e.contains(ip)),
            Peer::Pods { namespaces, pods } => pod.is_some_and(|p| {
                let ns_ok = match namespaces {
                    Namespaces::Own(ns) => &p.namespace == ns,
                    Namespaces::Matching(sel) => self.namespaces.get(&p.namespace).is_some_and(|l| sel.matches(l)),
                };
                ns_ok && pods.matches(&p.labels)
            }),
        }
    }

    /// Whether `dir`'s side of a connection to `dst_pod` (or to an address that is no pod) on
    /// `proto`/`port` is allowed for `subject` (the pod the policies select), the other end being
    /// `other_ip` (`other_pod`).
    fn side_allows(
        &self,
        subject: &PodInfo,
        dir: Direction,
        other_ip: IpAddr,
        other_pod: Option<&PodInfo>,
        proto: Proto,
        port: u16,
    ) -> bool {
        let mut isolated = false;
        for (_, rules) in self.selecting(subject, dir) {
            isolated = true;
            for r in rules {
                let peer_ok = r
                    .peers
                    .as_ref()
                    .is_none_or(|peers| peers.iter().any(|p| self.peer_matches(p, other_ip, other_pod)));
                // The destination: the subject for ingress, the other end for egress.
                let dst = match dir {
                    Direction::Ingress => Some(subject),
                    Direction::Egress => other_pod,
                };
                let port_ok = r.ports.as_ref().is_none_or(|ports| {
                    ports.iter().any(|m| match m {
                        PortMatch::Any(p) => *p == proto,
                        PortMatch::Range(p, a, b) => *p == proto && (*a..=*b).contains(&port),
                        PortMatch::Named(p, name) => {
                            *p == proto && dst.and_then(|d| d.named_port(name, proto)) == Some(port)
                        }
                    })
                });
                if peer_ok && port_ok {
                    return true;
                }
            }
        }
        !isolated
    }

    /// Whether a new connection from `src` to `dst` on `proto`/`port` is allowed. A pod
    /// always reaches itself (the API reference: pods cannot block their own loopback; the
    /// upstream e2e tests' `AllowLoopback`).
    pub fn allowed(&self, src: IpAddr, dst: IpAddr, proto: Proto, port: u16) -> bool {
        let (sp, dp) = (self.pod_by_ip(src), self.pod_by_ip(dst));
        if let (Some(s), Some(d)) = (sp, dp) {
            if s.key() == d.key() {
                return true;
            }
        }
        let egress = sp.is_none_or(|s| self.side_allows(s, Direction::Egress, dst, dp, proto, port));
        let ingress = dp.is_none_or(|d| self.side_allows(d, Direction::Ingress, src, sp, proto, port));
        egress && ingress
    }
}

/// The upstream e2e model (`test/e2e/network/netpol`): namespaces x, y, z with pods a, b, c
/// each, labelled `pod=<name>` and `ns=<namespace>`, serving TCP, UDP and SCTP on 80 and 81
/// (container ports named `serve-80-tcp`, …); shared by the unit tests here and the traffic
/// tests (`daemon/tests/policy_enforcement.rs`).
pub mod e2e_model {
    use super::*;
    use crate::policy::model::NamedPort;

    pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
    pub const PODS: [&str; 3] = ["a", "b", "c"];
    pub const PORTS: [u16; 2] = [80, 81];

    /// Every model pod's named ports: `serve-<port>-<protocol>`.
    pub fn ports() -> Vec<NamedPort> {
        Proto::ALL
            .iter()
            .flat_map(|proto| {
                PORTS.iter().map(move |port| NamedPort {
                    name: format!("serve-{port}-{}", proto.name().to_lowercase()),
                    proto: *proto,
                    port: *port,
                })
            })
            .collect()
    }

    pub fn ip(ns: usize, pod: usize) -> IpAddr {
        format!("10.244.{}.{}", ns + 1, pod + 10).parse().unwrap()
    }

    pub fn view() -> View {
        let mut v = View::default();
        for (n, ns) in NAMESPACES.iter().enumerate() {
            v.namespaces
                .insert(ns.to_string(), [("ns".to_string(), ns.to_string())].into());
            for (p, pod) in PODS.iter().enumerate() {
                let ports = ports();
                v.pods.push(PodInfo {
                    namespace: ns.to_string(),
                    name: pod.to_string(),
                    labels: [("pod".to_string(), pod.to_string())].into(),
                    ips: vec![ip(n, p)],
                    node: format!("node{}", 1 + (n * 3 + p) % 2),
                    ports,
                });
            }
        }
        v
    }

    /// A policy from its YAML-as-JSON (`{"metadata": ..., "spec": ...}`).
    pub fn policy(json: serde_json::Value) -> Policy {
        let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(json).unwrap();
        Policy::from_k8s(&np).unwrap()
    }

    /// The reachability matrix of `proto`/`port` as the e2e tests print it: a row per source
    /// (`x/a`), `.` allowed, `X` blocked.
    pub fn matrix(v: &View, proto: Proto, port: u16) -> String {
        let mut out = String::new();
        for (sn, _) in NAMESPACES.iter().enumerate() {
            for (sp, _) in PODS.iter().enumerate() {
                for (dn, _) in NAMESPACES.iter().enumerate() {
                    for (dp, _) in PODS.iter().enumerate() {
                        let ok = v.allowed(ip(sn, sp), ip(dn, dp), proto, port);
                        out.push(if ok { '.' } else { 'X' });
                    }
                }
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::e2e_model::*;
    use super::*;
    use serde_json::json;

    fn with(policies: Vec<serde_json::Value>) -> View {
        let mut v = view();
        v.policies = policies.into_iter().map(policy).collect();
        v
    }

    /// Rows: sources x/a x/b x/c y/a … z/c; columns: destinations in the same order.
    fn rows(lines: [&str; 9]) -> String {
        lines.iter().map(|l| format!("{}\n", l.replace(' ', ""))).collect()
    }

    const ALL: [&str; 9] = ["... ... ..."; 9];

    #[test]
    fn no_policy_allows_everything() {
        let v = view();
        for proto in Proto::ALL {
            assert_eq!(matrix(&v, proto, 80), rows(ALL));
        }
    }

    #[test]
    fn deny_all_ingress_in_x() {
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "deny-all"},
                                 "spec": {"podSelector": {}}})]);
        let want = rows([
            ".XX ... ...",
            "X.X ... ...",
            "XX. ... ...",
            "XXX ... ...",
            "XXX ... ...",
            "XXX ... ...",
            "XXX ... ...",
            "XXX ... ...",
            "XXX ... ...",
        ]);
        assert_eq!(matrix(&v, Proto::Tcp, 80), want, "blocked but to itself");
        assert_eq!(matrix(&v, Proto::Udp, 81), want);
    }

    #[test]
    fn deny_all_egress_in_x_with_an_empty_egress_list() {
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "deny-egress"},
                                 "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})]);
        let all = "... ... ...";
        let want = rows([
            ".XX XXX XXX",
            "X.X XXX XXX",
            "XX. XXX XXX",
            all,
            all,
            all,
            all,
            all,
            all,
        ]);
        assert_eq!(matrix(&v, Proto::Tcp, 80), want);
    }

    #[test]
    fn allow_from_a_namespace_and_from_a_pod_in_a_namespace() {
        // x/a accepts from namespace y only.
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "from-y"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}})]);
        let m = matrix(&v, Proto::Tcp, 80);
        let cols: Vec<char> = m.lines().map(|l| l.chars().next().unwrap()).collect();
        assert_eq!(
            cols.iter().collect::<String>(),
            ".XX...XXX",
            "into x/a, by source (itself allowed)"
        );
        // Both selectors in one peer: only y/b.
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "from-y-b"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                             "podSelector": {"matchLabels": {"pod": "b"}}}]}]}})]);
        let m = matrix(&v, Proto::Tcp, 80);
        let cols: String = m.lines().map(|l| l.chars().next().unwrap()).collect();
        assert_eq!(cols, ".XXX.XXXX");
        // The same selectors as two peers: all of y, and every b in x.
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "or"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}})]);
        let cols: String = matrix(&v, Proto::Tcp, 80)
            .lines()
            .map(|l| l.chars().next().unwrap())
            .collect();
        assert_eq!(cols, "..X...XXX");
    }

    #[test]
    fn ports_numbers_ranges_named_and_protocols() {
        let p = |ports: serde_json::Value| {
            with(vec![json!({"metadata": {"namespace": "x", "name": "ports"},
                "spec": {"podSelector": {}, "ingress": [{"ports": ports}]}})])
        };
        let into_x = |v: &View, proto, port| v.allowed(ip(1, 0), ip(0, 0), proto, port);
        let v = p(json!([{"port": 80}]));
        assert!(into_x(&v, Proto::Tcp, 80) && !into_x(&v, Proto::Tcp, 81) && !into_x(&v, Proto::Udp, 80));
        let v = p(json!([{"port": 80, "endPort": 81, "protocol": "UDP"}]));
        assert!(into_x(&v, Proto::Udp, 80) && into_x(&v, Proto::Udp, 81) && !into_x(&v, Proto::Udp, 82));
        assert!(!into_x(&v, Proto::Tcp, 80));
        let v = p(json!([{"port": "serve-81-tcp"}]));
        assert!(into_x(&v, Proto::Tcp, 81) && !into_x(&v, Proto::Tcp, 80));
        let v = p(json!([{"protocol": "SCTP"}]));
        assert!(into_x(&v, Proto::Sctp, 80) && into_x(&v, Proto::Sctp, 81) && !into_x(&v, Proto::Tcp, 80));
    }

    #[test]
    fn egress_named_ports_are_the_destinations_and_ip_blocks_match_pod_addresses() {
        let v = with(vec![json!({"metadata": {"namespace": "x", "name": "egress"},
            "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                     "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-udp", "protocol": "UDP"}]},
                                {"to": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.3.0/24"]}}],
                                 "ports": [{"port": 81}]}]}})]);
        let from_xa = |dst, proto, port| v.allowed(ip(0, 0), dst, proto, port);
        assert!(from_xa(ip(2, 1), Proto::Udp, 80), "named port of the peer pod");
        assert!(!from_xa(ip(2, 1), Proto::Udp, 81));
        assert!(from_xa(ip(1, 1), Proto::Tcp, 81), "ipBlock holds y's pods");
        assert!(!from_xa(ip(2, 1), Proto::Tcp, 81), "z is the exception");
        assert!(
            !from_xa("192.0.2.1".parse().unwrap(), Proto::Udp, 80),
            "a named port needs a pod"
        );
        // Other pods of x are not selected: not isolated.
        assert!(v.allowed(ip(0, 1), "192.0.2.1".parse().unwrap(), Proto::Tcp, 443));
    }

    #[test]
    fn policy_types_default_as_the_api_server_does() {
        // Ingress rules only: isolated for ingress, not egress.
        let ing = policy(json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "ingress": [{}]}}));
        assert!(ing.ingress.is_some() && ing.egress.is_none());
        // Egress rules: both (an ingress list absent: deny all ingress).
        let both = policy(json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "egress": [{}]}}));
        assert_eq!(both.ingress.as_deref(), Some(&[][..]));
        assert_eq!(both.egress.as_ref().map(Vec::len), Some(1));
        // Explicit Egress only: ingress rules written are ignored.
        let e = policy(json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}}));
        assert!(e.ingress.is_none() && e.egress.as_deref() == Some(&[][..]));
        // An empty rule allows everything; empty lists inside it mean all.
        let all = policy(json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"podSelector": {}, "ingress": [{"from": [], "ports": []}]}}));
        assert_eq!(all.ingress.unwrap()[0], Rule::default());
    }

    #[test]
    fn policies_the_api_server_refuses_are_refused_whole() {
        for (spec, why) in [
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "ipBlock",
            ),
            (json!({"ingress": [{"from": [{}]}]}), "needs"),
            (
                json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
                "named",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "endPort",
            ),
            (json!({"ingress": [{"ports": [{"endPort": 80}]}]}), "without port"),
            (
                json!({"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
                "protocol",
            ),
            (json!({"ingress": [{"ports": [{"port": 0}]}]}), "1-65535"),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/24"]}}]}]}),
                "inside",
            ),
            (json!({"policyTypes": ["Sideways"]}), "unknown type"),
        ] {
            let np =
                serde_json::from_value(json!({"metadata": {"namespace": "x", "name": "bad"}, "spec": spec})).unwrap();
            let err = Policy::from_k8s(&np).unwrap_err();
            assert!(err.contains(why), "{spec}: {err}");
        }
    }
}
