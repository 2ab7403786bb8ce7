//! A three-node cluster in namespaces for the dataplane tests, on the test topology
//! (`trellis_tests::topology`) with a pod per node wired by hand:
//!
//! ```text
//!   pod ns (eth0 10.244.N.2/24, fd00:244:N::2/64)
//!     │ veth
//!   node ns "node-N" (vp0 10.244.N.1/24; ul0 192.168.77.1N/24; trellis.1 made by the Dataplane)
//!     │ veth ul0 <-> uN
//!   underlay ns (bridge ulbr0 192.168.77.1 joining u1, u2, u3)
//! ```
//!
//! Every namespace is a `trellis_tests::Netns` (unique name, deleted on drop, also on panic);
//! nothing is done in the caller's namespace.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use trellis_net::netns::{run_in, NetnsRef};
use trellis_net::{sysctl, AddressOptions, Netlink, Route, VethConfig};
use trellis_tests::topology::{Spec, Topology, NODE_LINK};
use trellis_tests::Netns;
use trellisd::config::{Backend, ChecksumOffload};
use trellisd::lease::Lease;
use trellisd::metrics::Metrics;
use trellisd::reconcile::{Dataplane, DataplaneConfig, Underlay};

pub const CLUSTER_V4: &str = "10.244.0.0/16";
pub const CLUSTER_V6: &str = "fd00:244::/48";

pub fn vxlan(direct_routing: bool) -> Backend {
    Backend::Vxlan {
        vni: 1,
        port: 8472,
        direct_routing,
        checksum_offload: ChecksumOffload::Auto,
    }
}

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub pod: Netns,
    pub nl: Netlink,
    pub underlay: Underlay,
    pub pod_ip4: IpAddr,
    pub pod_ip6: Option<IpAddr>,
    pub cidrs: Vec<ipnetwork::IpNetwork>,
    /// `DataplaneConfig::nexthop_objects` (the daemon's default: true).
    pub nexthop_objects: bool,
}

impl Node {
    /// `ip -n NODE ARGS...`, stdout; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        run("ip", &[&["-n", self.ns.name()], args].concat())
    }

    /// `ip -n NODE ARGS...` listing routes, with the `nhid N` of routes by nexthop object taken
    /// out: `10.244.2.0/24 via 10.244.2.0 dev trellis.1 onlink` whichever way it is programmed.
    pub fn routes(&self, args: &[&str]) -> String {
        without_nhid(&self.ip(args))
    }

    /// Our nexthop objects, as `ip nexthop show` prints them (none with plain routes).
    pub fn our_nexthops(&self) -> Vec<String> {
        self.ip(&["nexthop", "show", "proto", "117"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn config(&self, backend: &Backend) -> DataplaneConfig {
        DataplaneConfig {
            node: self.name.clone(),
            backend: backend.clone(),
            underlay: self.underlay.clone(),
            cluster_cidrs: vec![CLUSTER_V4.parse().unwrap(), CLUSTER_V6.parse().unwrap()],
            nexthop_objects: self.nexthop_objects,
        }
    }

    pub async fn dataplane(&self, backend: &Backend) -> Dataplane {
        Dataplane::new_in(self.config(backend), Metrics::new(), self.ns.path())
            .await
            .unwrap_or_else(|e| panic!("dataplane of {}: {e}", self.name))
    }

    pub fn lease(&self, dp: &Dataplane) -> Lease {
        Lease {
            node: self.name.clone(),
            underlay_ip: self.underlay.ip,
            pod_cidrs: self.cidrs.clone(),
            backend: dp.backend_data(),
        }
    }

    /// Routes with trellisd's protocol in the node, as `(destination, gateway, device)` text.
    pub async fn our_routes(&self) -> Vec<Route> {
        let filter = trellis_net::RouteFilter {
            protocol: Some(trellisd::backend::TRELLISD_PROTO),
            ..Default::default()
        };
        self.nl.routes(&filter).await.unwrap()
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub underlay: Netns,
}

/// Three nodes (`node-1..3`) with a pod each; IPv6 pod CIDRs too when `dual_stack`.
pub async fn cluster(dual_stack: bool) -> Cluster {
    build(dual_stack, false).await
}

/// [`cluster`], with the last node moved onto a second underlay subnet (`192.168.78.0/24`) behind
/// the underlay namespace as router (`192.168.77.1`, `192.168.78.1`, every node's default
/// route): that node is then off the others' L2 subnet and reachable only through a router that
/// knows nothing of pod addresses (`Topology::put_last_node_behind_a_router`).
pub async fn cluster_behind_router(dual_stack: bool) -> Cluster {
    build(dual_stack, true).await
}

async fn build(dual_stack: bool, behind_router: bool) -> Cluster {
    let mut net = Topology::new("tdp", 3, Spec::v4("192.168.77"));
    if behind_router {
        net.put_last_node_behind_a_router();
    }
    let addresses: Vec<IpAddr> = (1..=3).map(|i| net.node_ip4(i)).collect();
    let Topology {
        underlay, nodes: nss, ..
    } = net;
    let mut nodes = Vec::new();
    for ((i, ns), ip) in (1..=3u8).zip(nss).zip(addresses) {
        let pod = Netns::new("tdpp");
        // IPv6 addresses (link-local ones too) usable at once, without a second of DAD.
        pod.sysctl("net.ipv6.conf.all.accept_dad=0");
        pod.sysctl("net.ipv6.conf.default.accept_dad=0");
        let nl = Netlink::connect_in(ns.path()).unwrap();
        let pnl = Netlink::connect_in(pod.path()).unwrap();
        let ul0 = nl.link_by_name(NODE_LINK).await.unwrap().unwrap();
        let prefix = ipnetwork::IpNetwork::new(ip, 24).unwrap();

        // The pod: eth0 in its namespace, vp0 in the node as its gateway.
        let mut cidrs: Vec<ipnetwork::IpNetwork> = vec![format!("10.244.{i}.0/24").parse().unwrap()];
        if dual_stack {
            cidrs.push(format!("fd00:244:{i}::/64").parse().unwrap());
        }
        let vp0 = nl
            .create_veth(&VethConfig::new("vp0", "eth0").peer_netns(NetnsRef::Path(pod.path())))
            .await
            .unwrap();
        let eth0 = pnl.link_by_name("eth0").await.unwrap().unwrap();
        let plo = pnl.link_by_name("lo").await.unwrap().unwrap();
        let nodad = AddressOptions {
            nodad: true,
            ..Default::default()
        };
        for (n, cidr) in cidrs.iter().enumerate() {
            let gw = if n == 0 {
                format!("10.244.{i}.1")
            } else {
                format!("fd00:244:{i}::1")
            };
            let me = if n == 0 {
                format!("10.244.{i}.2")
            } else {
                format!("fd00:244:{i}::2")
            };
            let (gw, me): (IpAddr, IpAddr) = (gw.parse().unwrap(), me.parse().unwrap());
            nl.add_address_with(vp0.index, ipnetwork::IpNetwork::new(gw, cidr.prefix()).unwrap(), nodad)
                .await
                .unwrap();
            pnl.add_address_with(eth0.index, ipnetwork::IpNetwork::new(me, cidr.prefix()).unwrap(), nodad)
                .await
                .unwrap();
        }
        nl.set_link_up(vp0.index).await.unwrap();
        pnl.set_link_up(eth0.index).await.unwrap();
        pnl.set_link_up(plo.index).await.unwrap();
        for (n, _) in cidrs.iter().enumerate() {
            let (default, gw) = if n == 0 {
                ("0.0.0.0/0", format!("10.244.{i}.1"))
            } else {
                ("::/0", format!("fd00:244:{i}::1"))
            };
            pnl.replace_route(&Route::new(default.parse().unwrap()).via(gw.parse().unwrap()))
                .await
                .unwrap();
        }
        run_in(ns.path(), || {
            sysctl::set_ipv4_forwarding(true).unwrap();
            sysctl::set_ipv6_forwarding(true).unwrap();
        })
        .unwrap();

        nodes.push(Node {
            name: format!("node-{i}"),
            underlay: Underlay {
                index: ul0.index,
                name: NODE_LINK.into(),
                ip: prefix.ip(),
                prefix,
                link_prefixes: Vec::new(),
                mtu: ul0.mtu,
            },
            pod_ip4: format!("10.244.{i}.2").parse().unwrap(),
            pod_ip6: dual_stack.then(|| format!("fd00:244:{i}::2").parse().unwrap()),
            cidrs,
            ns,
            pod,
            nl,
            nexthop_objects: true,
        });
    }
    Cluster { nodes, underlay }
}

impl Cluster {
    /// Every node programs plain routes (`--no-nexthop-objects`) instead of routes by nexthop
    /// object. Call before creating dataplanes.
    pub fn plain_routes(&mut self) {
        for node in &mut self.nodes {
            node.nexthop_objects = false;
        }
    }
}

/// `ip route` output without the `nhid N ` of routes by nexthop object.
pub fn without_nhid(text: &str) -> String {
    let line = |l: &str| match l.split_once(" nhid ") {
        Some((head, rest)) => match rest.split_once(' ') {
            Some((id, tail)) if id.parse::<u32>().is_ok() => format!("{head} {tail}"),
            _ => l.to_string(),
        },
        None => l.to_string(),
    };
    text.lines().map(line).collect::<Vec<_>>().join("\n")
}

/// Creates each node's dataplane, sets its own lease, and reconciles everyone once.
pub async fn start(cluster: &Cluster, backend: &Backend) -> (Vec<Dataplane>, BTreeMap<String, Lease>) {
    let mut dps = Vec::new();
    let mut leases = BTreeMap::new();
    for node in &cluster.nodes {
        let mut dp = node.dataplane(backend).await;
        let lease = node.lease(&dp);
        dp.set_own(&lease).await.unwrap();
        leases.insert(node.name.clone(), lease);
        dps.push(dp);
    }
    for dp in &mut dps {
        dp.reconcile(&leases).await.unwrap();
    }
    (dps, leases)
}

pub use trellis_tests::run;

/// Whether `from`'s pod reaches `to` within about three seconds (the first packets may wait
/// for neighbour resolution on the way).
pub async fn pings(from: &Node, to: IpAddr) -> bool {
    let (ns, to) = (from.pod.name().to_string(), to.to_string());
    tokio::task::spawn_blocking(move || {
        (0..3).any(|_| {
            std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "ping", "-c", "1", "-W", "1", &to])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
    })
    .await
    .unwrap()
}

/// Asserts that every pod reaches every other pod, IPv4 and (if any) IPv6.
pub async fn assert_full_mesh(cluster: &Cluster) {
    for from in &cluster.nodes {
        for to in cluster.nodes.iter().filter(|n| n.name != from.name) {
            for ip in [Some(to.pod_ip4), to.pod_ip6].into_iter().flatten() {
                assert!(
                    pings(from, ip).await,
                    "pod of {} cannot reach {ip} (pod of {})",
                    from.name,
                    to.name
                );
            }
        }
    }
}

/// Waits up to `secs` for a wake-up on `rx`.
pub async fn fired(rx: &mut tokio::sync::mpsc::Receiver<()>, secs: u64) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(secs), rx.recv()).await,
        Ok(Some(()))
    )
}

/// Whether this kernel can make IPIP devices (tried in a throw-away namespace); `Err` says why
/// not, for the skip message.
pub async fn ipip_support() -> Result<(), String> {
    let ns = Netns::new("tdpi");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    match nl.create_ipip(&trellis_net::IpipConfig::new("probe0")).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_supported() => Err(format!("this kernel has no IPIP support (modprobe ipip): {e}")),
        Err(e) => panic!("probing IPIP support: {e}"),
    }
}
