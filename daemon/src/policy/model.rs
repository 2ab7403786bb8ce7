//! What policy enforcement reads, normalized once from the API objects: pods (addresses, labels,
//! named ports, node), namespaces (labels), and each `networking.k8s.io/v1` NetworkPolicy as a
//! [`Policy`] whose every default is spelled out (`policyTypes`, TCP, "empty means all").
//!
//! A policy the API server would have refused (a peer with an ipBlock and a selector, `endPort`
//! with a named port, an unknown protocol...) never reaches a real cluster; from a stand-in or a
//! datastore that lies it is refused whole with the reason ([`Policy::from_k8s`]), never
//! half-applied.

use super::selector::{Labels, Selector};
use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::net::IpAddr;

/// The protocols a NetworkPolicy port names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// As the API spells it (`TCP`, `UDP`, `SCTP`).
    pub fn parse(s: &str) -> Option<Proto> {
        match s {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            "SCTP" => Some(Proto::Sctp),
            _ => None,
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// A container port with a name (the target of a named port in a policy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
}

/// A pod, as policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: String,
    /// Every container's named ports.
    pub ports: Vec<NamedPort>,
}

impl PodInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port named `name` for `proto`, if a container has one.
    pub fn named_port(&self, name: &str, proto: Proto) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.proto == proto)
            .map(|p| p.port)
    }
}

/// Where a peer's pods are: the policy's own namespace, or every namespace a selector matches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Namespaces {
    Own(String),
    Matching(Selector),
}

/// One `from`/`to` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Pods matching `pods` in `namespaces` (a `podSelector`, a `namespaceSelector`, or both in
    /// one entry: the pods that match both).
    Pods { namespaces: Namespaces, pods: Selector },
    /// Addresses in `cidr` but in none of `except`.
    Block { cidr: IpNetwork, except: Vec<IpNetwork> },
}

/// One `ports` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortMatch {
    /// Every port of the protocol (`port` absent).
    Any(Proto),
    /// `port` to `endPort` (one port: both the same).
    Range(Proto, u16, u16),
    /// The destination pod's container port of that name and protocol.
    Named(Proto, String),
}

/// One ingress or egress rule: `None` means all (the field empty or absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortMatch>>,
}

/// A NetworkPolicy, normalized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// The pods of `namespace` it applies to.
    pub pod_selector: Selector,
    /// `Some` when the policy is of type Ingress (the pods it selects are isolated for ingress):
    /// the rules, any of which allows (none: nothing is allowed by this policy).
    pub ingress: Option<Vec<Rule>>,
    /// The same for Egress.
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    /// `namespace/name`, as the nft comments and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn from_k8s(np: &NetworkPolicy) -> Result<Policy, String> {
        let namespace = np.metadata.namespace.clone().ok_or("no metadata.namespace")?;
        let name = np.metadata.name.clone().ok_or("no metadata.name")?;
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = Selector::parse(&spec.pod_selector.clone().unwrap_or_default())?;
        // policyTypes as the API server defaults it: Ingress always, Egress when there are
        // egress rules.
        let types: Vec<String> = match spec.policy_types.as_deref() {
            Some(t) if !t.is_empty() => t.to_vec(),
            _ => {
                let mut t = vec!["Ingress".to_string()];
                if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                    t.push("Egress".into());
                }
                t
            }
        };
        if let Some(bad) = types.iter().find(|t| *t != "Ingress" && *t != "Egress") {
            return Err(format!("policyTypes: unknown type {bad:?}"));
        }
        let ingress = if types.iter().any(|t| t == "Ingress") {
            let rules = spec.ingress.iter().flatten();
            Some(
                rules
                    .map(|r| rule(&namespace, r.from.as_deref(), r.ports.as_deref()))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        let egress = if types.iter().any(|t| t == "Egress") {
            let rules = spec.egress.iter().flatten();
            Some(
                rules
                    .map(|r| rule(&namespace, r.to.as_deref(), r.ports.as_deref()))
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        };
        Ok(Policy {
            namespace,
            name,
            pod_selector,
            ingress,
            egress,
        })
    }
}

fn rule(
    namespace: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, String> {
    let peers = match peers {
        None | Some([]) => None,
        Some(list) => Some(list.iter().map(|p| peer(namespace, p)).collect::<Result<_, _>>()?),
    };
    let ports = match ports {
        None | Some([]) => None,
        Some(list) => Some(list.iter().map(port).collect::<Result<_, _>>()?),
    };
    Ok(Rule { peers, ports })
}

fn peer(namespace: &str, p: &NetworkPolicyPeer) -> Result<Peer, String> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => {
            let cidr: IpNetwork = b.cidr.parse().map_err(|e| format!("ipBlock cidr {:?}: {e}", b.cidr))?;
            let cidr = IpNetwork::new(cidr.network(), cidr.prefix()).expect("same length");
            let mut except = Vec::new();
            for e in b.except.iter().flatten() {
                let x: IpNetwork = e.parse().map_err(|err| format!("ipBlock except {e:?}: {err}"))?;
                if x.is_ipv4() != cidr.is_ipv4() || x.prefix() < cidr.prefix() || !cidr.contains(x.network()) {
                    return Err(format!("ipBlock except {e} is not inside {cidr}"));
                }
                except.push(IpNetwork::new(x.network(), x.prefix()).expect("same length"));
            }
            except.sort();
            except.dedup();
            Ok(Peer::Block { cidr, except })
        }
        (Some(_), _, _) => Err("a peer with an ipBlock cannot also have a selector".into()),
        (None, None, None) => Err("a peer needs an ipBlock, a podSelector or a namespaceSelector".into()),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: match ns {
                Some(s) => Namespaces::Matching(Selector::parse(s)?),
                None => Namespaces::Own(namespace.to_string()),
            },
            pods: match pods {
                Some(s) => Selector::parse(s)?,
                None => Selector::everything(),
            },
        }),
    }
}

fn port(p: &NetworkPolicyPort) -> Result<PortMatch, String> {
    let proto_name = p.protocol.as_deref().unwrap_or("TCP");
    let proto = Proto::parse(proto_name).ok_or_else(|| format!("unknown protocol {proto_name:?}"))?;
    let number = |n: i32| u16::try_from(n).ok().filter(|n| *n > 0);
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortMatch::Any(proto)),
        (None, Some(_)) => Err("endPort without port".into()),
        (Some(IntOrString::String(name)), None) => {
            if name.is_empty() {
                return Err("an empty port name".into());
            }
            Ok(PortMatch::Named(proto, name.clone()))
        }
        (Some(IntOrString::String(name)), Some(_)) => Err(format!("endPort with the named port {name:?}")),
        (Some(IntOrString::Int(n)), end) => {
            let from = number(*n).ok_or_else(|| format!("port {n} is not 1-65535"))?;
            let to = match end {
                None => from,
                Some(e) => number(e)
                    .filter(|e| *e >= from)
                    .ok_or_else(|| format!("endPort {e} is not {from}-65535"))?,
            };
            Ok(PortMatch::Range(proto, from, to))
        }
    }
}
