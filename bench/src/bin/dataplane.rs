//! Pod-to-pod TCP throughput across two nodes over trellis's VXLAN, next to VXLANs set up by
//! hand with iproute2 on an identical topology, in one run.
//!
//! - trellis, bridge mode and routed mode: the test harness's cluster
//!   (`trellis_tests::cluster::Cluster`): an underlay namespace with a bridge and etcd, two node
//!   namespaces running `trellisd` (VXLAN, VNI 1, port 8472; `--cni-mode bridge` or `routed`),
//!   one pod per node wired by the `trellis` plugin with the CNI config trellisd wrote.
//! - by hand: the same underlay (`trellis_tests::topology`, `192.168.200.0/24`), per node a VXLAN device
//!   with the same VNI, port, MTU (1450) and `nolearning`, a veth "pod" (MTU 1450) routed by the
//!   node, and per remote node the same three objects trellisd programs: an onlink route via the
//!   remote VTEP, a permanent neighbour and an FDB entry. No bridge on the pod side: the plain
//!   VXLAN path, what trellis's routed mode builds.
//! - by hand + masquerade: the same again, with trellisd's nftables table (`inet trellis`, its
//!   `nat` postrouting chain: node masquerade) copied from the trellis nodes into each node. A NAT
//!   hook makes the kernel track every forwarded packet (conntrack), pod to pod included: what
//!   every Kubernetes node pays anyway (kube-proxy's NAT).
//! - by hand + bridge + masquerade: flannel's shape, what trellis's bridge mode builds: the pod's
//!   veth is a port of a bridge holding the gateway address (`cni0`). A bridge also brings
//!   br_netfilter's IP hooks for the frames entering it (`net.bridge.bridge-nf-call-iptables`,
//!   on by default and required by kube-proxy for bridge-based pod networks).
//! - trellis without anti-spoofing: the same two trellis clusters with their pods' anti-spoofing
//!   chain deleted before the measurement (and put back before the next with it): the per-packet
//!   cost of the source checks alone (docs/security.md).
//!
//! `iperf3 -s -1` in the pod of node 2, `iperf3 -c <pod> -t 5 -J` in the pod of node 1; the
//! figure is the receiver's `bits_per_second`. The setups take turns, in a rotating order, 5
//! rounds (`--rounds`); medians are printed, with each trellis mode next to the hand-made path
//! of the same shape and next to the bare hand-made path.
//!
//! Run (as root): `cargo build --release -p trellisd -p trellis -p trellis-ipam -p trellis-bench
//! && target/release/dataplane`
//! Options: `--rounds R` (default 5), `--seconds S` (default 5), `--trellisd PATH` (trellis and
//! trellis-ipam must sit next to it).

use std::path::PathBuf;
use trellis_bench::{cleanup, iperf, median, reachable};
use trellis_net::nft::{AntiSpoof, PortKind, DEFAULT_TABLE};
use trellis_tests::cluster::{Cluster, UNDERLAY};
use trellis_tests::topology::{Spec, Topology};
use trellis_tests::{sh, Netns};

/// Name prefixes of what this benchmark creates (the cluster harness's, and ours), for the
/// panic clean-up.
const NAMESPACES: &[&str] = &["tcu", "tcn", "tcp", "bdu", "bdn", "bdp"];
const DIRS: &[&str] = &["cluster", "bench"];

const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}"#;
const DEVICE: &str = "trellis.1";

struct Opts {
    rounds: usize,
    seconds: u32,
    trellisd: PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        rounds: 5,
        seconds: 5,
        trellisd: PathBuf::from("target/release/trellisd"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--rounds" => o.rounds = v.parse().expect("--rounds R"),
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--trellisd" => o.trellisd = v.into(),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(o.rounds > 0 && o.seconds > 0, "counts must be positive");
    o.trellisd = o.trellisd.canonicalize().unwrap_or_else(|e| {
        panic!(
            "{}: {e} (cargo build --release -p trellisd -p trellis -p trellis-ipam)",
            o.trellisd.display()
        )
    });
    o
}

/// How a hand-made pod is attached to its node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attach {
    /// The node routes to the pod's veth (trellis routed mode, Calico).
    Routed,
    /// The pod's veth is a port of a bridge holding the gateway (trellis bridge mode, flannel).
    Bridge,
}

/// The VXLAN by hand: dropped pods first, then nodes, then the underlay.
struct Manual {
    pods: Vec<Netns>,
    nodes: Vec<Netns>,
    /// Held only to be dropped last.
    _underlay: Netns,
}

/// Node i's (1, 2) pod subnet `10.245.i.0/24`: VTEP `.0`, node side of the pod's veth `.1`,
/// pod `.2`.
fn manual_subnet(i: usize) -> String {
    format!("10.245.{i}")
}

fn manual_mac(i: usize) -> String {
    format!("0e:b1:00:00:00:{i:02x}")
}

fn manual(attach: Attach) -> Manual {
    let Topology { underlay, nodes, .. } = Topology::new("bd", 2, Spec::v4(UNDERLAY));
    let mut m = Manual {
        pods: Vec::new(),
        nodes: Vec::new(),
        _underlay: underlay,
    };
    for (i, node) in (1..=2).zip(nodes) {
        let pod = Netns::new("bdp");
        let (n, p) = (&node.name, &pod.name);
        let s = manual_subnet(i);
        sh(&format!(
            "ip netns exec {n} sysctl -qw net.ipv4.ip_forward=1 && \
             ip -n {n} link add {DEVICE} mtu 1450 address {mac} type vxlan id 1 local {UNDERLAY}.{ip} \
             dev ul0 dstport 8472 nolearning && \
             ip -n {n} addr add {s}.0/32 dev {DEVICE} noprefixroute && ip -n {n} link set {DEVICE} up && \
             ip -n {n} link add veth0 mtu 1450 type veth peer name eth0 mtu 1450 netns {p} && \
             {gateway} && ip -n {n} link set veth0 up && \
             ip -n {p} addr add {s}.2/24 dev eth0 && ip -n {p} link set eth0 up && \
             ip -n {p} route add default via {s}.1",
            ip = 10 + i,
            mac = manual_mac(i),
            gateway = match attach {
                Attach::Routed => format!("ip -n {n} addr add {s}.1/24 dev veth0"),
                Attach::Bridge => format!(
                    "ip -n {n} link add br0 type bridge && ip -n {n} addr add {s}.1/24 dev br0 && \
                     ip -n {n} link set br0 up && ip -n {n} link set veth0 master br0"
                ),
            }
        ));
        m.nodes.push(node);
        m.pods.push(pod);
    }
    for (i, j) in [(1, 2), (2, 1)] {
        let n = &m.nodes[i - 1].name;
        let s = manual_subnet(j);
        sh(&format!(
            "bridge -n {n} fdb add {mac} dev {DEVICE} dst {UNDERLAY}.{ip} self permanent && \
             ip -n {n} neigh add {s}.0 lladdr {mac} dev {DEVICE} nud permanent && \
             ip -n {n} route add {s}.0/24 via {s}.0 dev {DEVICE} onlink",
            mac = manual_mac(j),
            ip = 10 + j
        ));
    }
    m
}

/// One setup measured: its name and the client and server pods (namespace, server address).
struct Setup<'a> {
    name: &'static str,
    client: &'a Netns,
    server: &'a Netns,
    ip: String,
    /// A trellis cluster measured with its pods' anti-spoofing chain present or not (the same
    /// cluster both ways, switched before each measurement).
    anti_spoofing: Option<(&'a Cluster, PortKind, bool)>,
}

/// Puts the anti-spoofing chain of `kind` on every node of `c` back (`on`) or deletes it: the
/// pods' elements stay, so the two differ by the per-packet checks alone.
fn switch_anti_spoofing(c: &Cluster, kind: PortKind, on: bool) {
    let family = match kind {
        PortKind::Bridged => "bridge",
        PortKind::Routed => "inet",
    };
    for node in &c.nodes {
        if on {
            trellis_net::netns::run_in(node.ns.path(), || AntiSpoof::new(DEFAULT_TABLE)?.ensure(kind))
                .expect("enter the node")
                .expect("anti-spoofing chain");
        } else {
            node.ns
                .exec(&["nft", "delete", "chain", family, DEFAULT_TABLE, "antispoof"]);
        }
    }
}

/// trellisd's `inet trellis` table from each trellis node, loaded into each hand-made node.
fn copy_masquerade(from: &Cluster, to: &Manual) {
    for (node, theirs) in from.nodes.iter().zip(&to.nodes) {
        let table = node.ns.exec_ok(&["nft", "list", "table", "inet", "trellis"]);
        let file = from.dir.path().join(format!("{}.nft", theirs.name));
        std::fs::write(&file, table).expect("write nft table");
        theirs.exec_ok(&["nft", "-f", file.to_str().expect("UTF-8 path")]);
    }
}

/// A two-node trellis cluster writing `mode` into its CNI config, with a pod on each node.
fn trellis_cluster(o: &Opts, mode: &str) -> Cluster {
    let mut c = Cluster::new(2, NET_CONF, &o.trellisd, &["--cni-mode", mode]);
    let (a, b) = (c.add_pod(0), c.add_pod(1));
    let ip = c.pods[b].ips[0].clone();
    assert!(
        reachable(&c.pods[a].ns, &ip),
        "trellis ({mode}): pod {ip} unreachable; node1 log:\n{}",
        c.log(0)
    );
    c
}

fn main() {
    trellis_tests::require_root();
    let o = opts();
    cleanup::on_panic(NAMESPACES, DIRS);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let bridge = trellis_cluster(&o, "bridge");
    let routed = trellis_cluster(&o, "routed");
    let m_ip = format!("{}.2", manual_subnet(2));
    let plain = manual(Attach::Routed);
    let masq = manual(Attach::Routed);
    copy_masquerade(&bridge, &masq);
    let flannel = manual(Attach::Bridge);
    copy_masquerade(&bridge, &flannel);
    for (what, m) in [
        ("by hand", &plain),
        ("by hand + masquerade", &masq),
        ("by hand + bridge", &flannel),
    ] {
        assert!(reachable(&m.pods[0], &m_ip), "{what}: pod {m_ip} unreachable");
    }
    fn trellis<'a>(c: &'a Cluster, name: &'static str, guard: Option<(PortKind, bool)>) -> Setup<'a> {
        Setup {
            name,
            client: &c.pods[0].ns,
            server: &c.pods[1].ns,
            ip: c.pods[1].ips[0].clone(),
            anti_spoofing: guard.map(|(kind, on)| (c, kind, on)),
        }
    }
    fn by_hand<'a>(m: &'a Manual, name: &'static str) -> Setup<'a> {
        Setup {
            name,
            client: &m.pods[0],
            server: &m.pods[1],
            ip: format!("{}.2", manual_subnet(2)),
            anti_spoofing: None,
        }
    }
    let setups = [
        trellis(&bridge, "trellis bridge", Some((PortKind::Bridged, true))),
        by_hand(&flannel, "by hand + bridge + masquerade"),
        trellis(&routed, "trellis routed", Some((PortKind::Routed, true))),
        by_hand(&masq, "by hand + masquerade"),
        by_hand(&plain, "by hand"),
        trellis(
            &bridge,
            "trellis bridge, no anti-spoof",
            Some((PortKind::Bridged, false)),
        ),
        trellis(
            &routed,
            "trellis routed, no anti-spoof",
            Some((PortKind::Routed, false)),
        ),
    ];
    let mtu = |ns: &Netns| ns.exec_ok(&["cat", "/sys/class/net/eth0/mtu"]).trim().to_string();
    println!(
        "pod-to-pod TCP over VXLAN across two nodes: trellis vs by hand (iproute2) — iperf3 -t {}, \
         {} rounds of every setup in rotating order, {cpus} CPUs; pod MTU {} (trellis) / {} (by hand)",
        o.seconds,
        o.rounds,
        mtu(setups[0].client),
        mtu(setups[4].client)
    );

    let mut results: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..o.rounds {
        let mut line = format!("  round {}:", round + 1);
        for k in 0..setups.len() {
            let i = (round + k) % setups.len();
            let s = &setups[i];
            if let Some((c, kind, on)) = s.anti_spoofing {
                switch_anti_spoofing(c, kind, on);
            }
            let gbit = iperf(s.client, s.server, &s.ip, o.seconds);
            results[i].push(gbit);
            line.push_str(&format!(" {} {gbit:.2};", s.name));
        }
        println!("{line}");
    }
    let med: Vec<f64> = results.into_iter().map(median).collect();
    println!("{:<32}{:>14}", "median", "Gbit/s");
    for (s, m) in setups.iter().zip(&med) {
        println!("{:<32}{:>14.2}", s.name, m);
    }
    let pct = |a: usize, b: usize| 100.0 * med[a] / med[b];
    println!(
        "trellis bridge: {:.0}% of by hand + bridge + masquerade (its shape), {:.0}% of bare by hand",
        pct(0, 1),
        pct(0, 4)
    );
    println!(
        "trellis routed: {:.0}% of by hand + masquerade (its shape), {:.0}% of bare by hand",
        pct(2, 3),
        pct(2, 4)
    );
    println!(
        "anti-spoofing's cost: bridge mode {:.1}%, routed mode {:.1}% (trellis with it vs the same cluster without)",
        100.0 - pct(0, 5),
        100.0 - pct(2, 6)
    );
    println!(
        "what the shape costs by hand: masquerade (conntrack) {:.0}%, bridge (+ br_netfilter) {:.0}%",
        100.0 - pct(3, 4),
        100.0 - 100.0 * med[1] / med[3]
    );
}
