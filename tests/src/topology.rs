//! The one test topology: an underlay and node namespaces on it. The daemon's dataplane and BGP
//! tests, [`crate::cluster`] (and through it the benches and `./lab up`) all build on it, so a
//! node is at the same address, behind the same links, whoever made it.
//!
//! ```text
//!   node ns N   ul0  SUBNET.(10+N)/LEN  [V6::(10+N)/64]   default route via SUBNET.1 (if asked)
//!               (IPv6-only underlay, `Spec::v6_only`: V6::(10+N)/64 only, default via V6::1)
//!     │ veth ul0 <-> uN
//!   underlay ns   bridge ulbr0  SUBNET.1/LEN  [V6::1/64]  (etcd, the API server, BIRD run here)
//!                 [bridge ulbr1 SUBNET'.1/24: the far side of a router, `put_last_node_behind_a_router`]
//! ```
//!
//! Nodes are numbered from 1. Every namespace is a [`Netns`] guard (deleted on drop, also on
//! panic); nothing is done in the caller's namespace. IPv6 duplicate address detection is off
//! in every namespace here, so addresses are usable at once.

use crate::Netns;
use std::net::IpAddr;

/// How the underlay is addressed.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The first three octets of the IPv4 underlay (`"192.168.77"`): the bridge is `.1`, node N
    /// `.(10+N)`.
    pub v4: String,
    /// Its prefix length (24; a bench with thousands of made-up remote nodes uses 16).
    pub v4_len: u8,
    /// The IPv6 /64's prefix with its trailing `::` (`"fd00:77::"`), for a dual-stack underlay.
    pub v6: Option<String>,
    /// Nodes get a default route via the bridge's address (`SUBNET.1`; `V6::1` when
    /// [`Spec::v6_only`]).
    pub default_route: bool,
    /// Nodes get IPv6 underlay addresses only (the bridge keeps its IPv4 one, unused).
    pub v6_only: bool,
}

impl Spec {
    /// An IPv4 underlay on `v4`.0/24.
    pub fn v4(v4: &str) -> Spec {
        Spec {
            v4: v4.into(),
            v4_len: 24,
            v6: None,
            default_route: false,
            v6_only: false,
        }
    }

    /// Also an IPv6 /64 (`"fd00:77::"`).
    pub fn dual_stack(mut self, v6: &str) -> Spec {
        self.v6 = Some(v6.into());
        self
    }

    /// The IPv4 underlay's prefix length (24 unless set).
    pub fn v4_len(mut self, len: u8) -> Spec {
        self.v4_len = len;
        self
    }

    /// Nodes with IPv6 underlay addresses only (`V6::(10+N)`): an IPv6-only underlay.
    pub fn v6_only(mut self, v6: &str) -> Spec {
        self.v6 = Some(v6.into());
        self.v6_only = true;
        self
    }

    pub fn default_route(mut self) -> Spec {
        self.default_route = true;
        self
    }
}

pub struct Topology {
    /// Dropped before the underlay: its veth peers go with it.
    pub nodes: Vec<Netns>,
    pub underlay: Netns,
    pub spec: Spec,
    /// Node addresses that moved behind the router (node number, new IPv4 address).
    moved: Option<(usize, IpAddr)>,
}

/// The bridge in the underlay namespace.
pub const BRIDGE: &str = "ulbr0";
/// Each node's underlay link.
pub const NODE_LINK: &str = "ul0";

impl Topology {
    /// The underlay (`{tag}u…`) and `n` nodes (`{tag}n…`); `tag` at most 3 characters.
    pub fn new(tag: &str, n: usize, spec: Spec) -> Topology {
        crate::require_root();
        let underlay = Netns::new(&format!("{tag}u"));
        no_dad(&underlay);
        underlay.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        underlay.ip(&["addr", "add", &format!("{}.1/{}", spec.v4, spec.v4_len), "dev", BRIDGE]);
        if let Some(v6) = &spec.v6 {
            underlay.ip(&["-6", "addr", "add", &format!("{v6}1/64"), "dev", BRIDGE, "nodad"]);
        }
        underlay.ip(&["link", "set", BRIDGE, "up"]);
        let mut t = Topology {
            nodes: Vec::new(),
            underlay,
            spec,
            moved: None,
        };
        for i in 1..=n {
            t.add_node(tag, i);
        }
        t
    }

    fn add_node(&mut self, tag: &str, i: usize) {
        let ns = Netns::new(&format!("{tag}n"));
        no_dad(&ns);
        crate::run(
            "ip",
            &[
                "link",
                "add",
                &format!("u{i}"),
                "netns",
                &self.underlay.name,
                "type",
                "veth",
                "peer",
                "name",
                NODE_LINK,
                "netns",
                &ns.name,
            ],
        );
        self.underlay
            .ip(&["link", "set", &format!("u{i}"), "master", BRIDGE, "up"]);
        if !self.spec.v6_only {
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/{}", self.node_ip4(i), self.spec.v4_len),
                "dev",
                NODE_LINK,
            ]);
        }
        if let Some(ip6) = self.node_ip6(i) {
            ns.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", NODE_LINK, "nodad"]);
        }
        ns.ip(&["link", "set", NODE_LINK, "up"]);
        match (self.spec.default_route, self.gateway6()) {
            (false, _) => {}
            (true, Some(gw6)) if self.spec.v6_only => {
                ns.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()]);
            }
            (true, _) => {
                ns.ip(&["route", "add", "default", "via", &self.gateway4().to_string()]);
            }
        }
        self.nodes.push(ns);
    }

    /// Node `i`'s namespace (from 1).
    pub fn node(&self, i: usize) -> &Netns {
        &self.nodes[i - 1]
    }

    /// Node `i`'s IPv4 underlay address: `SUBNET.(10+i)`, or its address behind the router.
    pub fn node_ip4(&self, i: usize) -> IpAddr {
        match self.moved {
            Some((m, ip)) if m == i => ip,
            _ => format!("{}.{}", self.spec.v4, 10 + i).parse().expect("IPv4 address"),
        }
    }

    /// Node `i`'s IPv6 underlay address (dual stack): `V6::(10+i)`.
    pub fn node_ip6(&self, i: usize) -> Option<IpAddr> {
        self.spec
            .v6
            .as_ref()
            .map(|v6| format!("{v6}{}", 10 + i).parse().expect("IPv6 address"))
    }

    /// The bridge's IPv4 address, `SUBNET.1`.
    pub fn gateway4(&self) -> IpAddr {
        format!("{}.1", self.spec.v4).parse().expect("IPv4 address")
    }

    /// The bridge's IPv6 address (dual stack), `V6::1`.
    pub fn gateway6(&self) -> Option<IpAddr> {
        self.spec
            .v6
            .as_ref()
            .map(|v6| format!("{v6}1").parse().expect("IPv6 address"))
    }

    /// Moves the last node onto a second IPv4 subnet (third octet + 1, bridge `ulbr1`) and makes
    /// the underlay namespace the router between the two (`.1` on each; every node's default
    /// route): that node is then off the others' L2 subnet and reachable only through a router
    /// that knows nothing of pod addresses. Returns its new address with its prefix length
    /// (`192.168.78.13/24`).
    pub fn put_last_node_behind_a_router(&mut self) -> String {
        let last = self.nodes.len();
        let (a, b, c) = {
            let mut it = self.spec.v4.split('.').map(|o| o.parse::<u8>().expect("octet"));
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
        };
        let far = format!("{a}.{b}.{}", c + 1);
        let u = &self.underlay;
        u.ip(&["link", "add", "ulbr1", "type", "bridge"]);
        u.ip(&["addr", "add", &format!("{far}.1/24"), "dev", "ulbr1"]);
        u.ip(&["link", "set", "ulbr1", "up"]);
        u.ip(&["link", "set", &format!("u{last}"), "master", "ulbr1"]);
        u.sysctl("net.ipv4.ip_forward=1");
        let gw = self.gateway4().to_string();
        for ns in &self.nodes[..last - 1] {
            ns.ip(&["route", "replace", "default", "via", &gw]);
        }
        let old = format!("{}/{}", self.node_ip4(last), self.spec.v4_len);
        let new: IpAddr = format!("{far}.{}", 10 + last).parse().expect("IPv4 address");
        let ns = &self.nodes[last - 1];
        ns.ip(&["addr", "del", &old, "dev", NODE_LINK]);
        ns.ip(&["addr", "add", &format!("{new}/24"), "dev", NODE_LINK]);
        ns.ip(&["route", "replace", "default", "via", &format!("{far}.1")]);
        self.moved = Some((last, new));
        format!("{new}/24")
    }
}

/// IPv6 addresses (link-local ones too) usable at once, without a second of DAD.
fn no_dad(ns: &Netns) {
    ns.sysctl("net.ipv6.conf.all.accept_dad=0");
    ns.sysctl("net.ipv6.conf.default.accept_dad=0");
}
