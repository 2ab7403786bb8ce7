//! BIRD 2 on the test topology (`trellis_tests::topology`), for the BGP speaker's tests.
//!
//! ```text
//!   node ns N (ul0 192.168.77.1N/24, fd00:77::1N/64)  — a trellisd BGP speaker (in-process)
//!     │ veth ul0 <-> uN
//!   underlay ns (bridge ulbr0 192.168.77.1/24, fd00:77::1/64) — BIRD runs here
//! ```
//!
//! Every namespace is a guard (unique name, deleted on drop, also on panic); BIRD is killed
//! before its namespace goes. Nothing runs outside the namespaces the test made.
#![allow(dead_code, unused_imports)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
pub use trellis_tests::bird::{bird_has, Bird};
use trellis_tests::topology::{Spec, Topology};
use trellis_tests::{Netns, TempDir};
use trellisd::bgp::{BgpConfig, LearnedRoute, PeerConfig, Routes, Speaker};
use trellisd::metrics::Metrics;

pub const ASN: u32 = 64512;
pub const CLUSTER_V4: &str = "10.244.0.0/16";
pub const CLUSTER_V6: &str = "fd00:244::/48";
pub const BIRD_V4: &str = "192.168.77.1";
pub const BIRD_V6: &str = "fd00:77::1";

pub fn node_v4(i: usize) -> IpAddr {
    format!("192.168.77.{}", 10 + i).parse().unwrap()
}
pub fn node_v6(i: usize) -> IpAddr {
    format!("fd00:77::{}", 10 + i).parse().unwrap()
}
/// Node i's pod CIDRs.
pub fn pod_cidrs(i: usize) -> Vec<ipnetwork::IpNetwork> {
    vec![
        format!("10.244.{i}.0/24").parse().unwrap(),
        format!("fd00:244:0:{i}::/64").parse().unwrap(),
    ]
}

/// Logs to the test's output (shown when it fails, or with `--nocapture`).
pub fn log_to_test_output() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "trellisd=debug".into()))
            .init()
    });
}

pub struct Lab {
    /// First: BIRD is killed before the namespaces go.
    pub bird: Option<Bird>,
    pub net: Topology,
    pub dir: TempDir,
    /// Node i's metrics (index i - 1), shared by its speakers (as one daemon's across restarts).
    pub metrics: Vec<Metrics>,
}

impl Lab {
    /// The underlay (BIRD's addresses on its bridge) and `n` node namespaces (from 1), dual
    /// stack.
    pub fn new(n: usize) -> Lab {
        log_to_test_output();
        let dir = TempDir::new("bgp");
        let net = Topology::new("tbg", n, Spec::v4("192.168.77").dual_stack("fd00:77::"));
        assert_eq!(net.gateway4().to_string(), BIRD_V4);
        assert_eq!(net.node_ip6(1), Some(node_v6(1)));
        let metrics = (0..n).map(|_| Metrics::new()).collect();
        Lab {
            bird: None,
            net,
            dir,
            metrics,
        }
    }

    pub fn node(&self, i: usize) -> &Netns {
        self.net.node(i)
    }

    /// Starts BIRD in the underlay namespace with `conf`.
    pub fn start_bird(&mut self, conf: &BirdConf) {
        self.bird = Some(Bird::start(&self.net.underlay, self.dir.path(), "bird", &conf.render()));
    }

    /// Node i's metrics.
    pub fn metrics(&self, i: usize) -> &Metrics {
        &self.metrics[i - 1]
    }

    pub fn bird(&self) -> &Bird {
        self.bird.as_ref().expect("BIRD started")
    }

    /// A speaker for node i (AS 64512, fast timers, learning only the cluster CIDRs).
    pub fn config(&self, i: usize) -> BgpConfig {
        let IpAddr::V4(id) = node_v4(i) else { unreachable!() };
        let mut cfg = BgpConfig::new(ASN, id);
        cfg.hold_time = 9;
        cfg.connect_retry = Duration::from_secs(1);
        cfg.graceful_restart_secs = 30;
        cfg.import_within = vec![CLUSTER_V4.parse().unwrap(), CLUSTER_V6.parse().unwrap()];
        cfg.netns = Some(self.node(i).path().to_path_buf());
        cfg
    }

    /// Starts node i's speaker exporting its pod CIDRs, with `peers`.
    pub async fn speaker(&self, i: usize, peers: Vec<PeerConfig>) -> (Speaker, tokio::sync::watch::Receiver<Routes>) {
        self.speaker_with(self.config(i), i, peers).await
    }

    pub async fn speaker_with(
        &self,
        cfg: BgpConfig,
        i: usize,
        peers: Vec<PeerConfig>,
    ) -> (Speaker, tokio::sync::watch::Receiver<Routes>) {
        self.speaker_exporting(cfg, pod_cidrs(i), i, peers).await
    }

    /// Node i's speaker exporting `exports` (set before the peers, so the first UPDATEs carry
    /// them).
    pub async fn speaker_exporting(
        &self,
        cfg: BgpConfig,
        exports: Vec<ipnetwork::IpNetwork>,
        i: usize,
        peers: Vec<PeerConfig>,
    ) -> (Speaker, tokio::sync::watch::Receiver<Routes>) {
        // A speaker of the same node just dropped may still hold the port for a moment.
        let mut tries = 0;
        let (s, rx) = loop {
            match Speaker::start(cfg.clone(), self.metrics[i - 1].clone()).await {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("speaker {i}: {e}"),
            }
        };
        s.set_exports(exports, Some(node_v4(i)), Some(node_v6(i)));
        s.set_peers(peers);
        (s, rx)
    }
}

pub fn bird_peer() -> PeerConfig {
    PeerConfig {
        addr: BIRD_V4.parse().unwrap(),
        asn: ASN,
        rr_client: false,
    }
}

pub fn node_peer(i: usize) -> PeerConfig {
    PeerConfig {
        addr: node_v4(i),
        asn: ASN,
        rr_client: false,
    }
}

/// Waits until the routes satisfy `ok`; panics with them after `within`.
pub async fn wait_routes(
    rx: &mut tokio::sync::watch::Receiver<Routes>,
    within: Duration,
    what: &str,
    ok: impl Fn(&Routes) -> bool,
) -> Routes {
    let found = match tokio::time::timeout(within, rx.wait_for(|r| ok(r))).await {
        Ok(Ok(routes)) => Some(routes.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("{what}: not within {within:?}; routes: {:#?}", *rx.borrow()))
}

/// The route to `prefix` via `next_hop`, fresh.
pub fn has(routes: &Routes, prefix: &str, next_hop: &str) -> bool {
    routes
        .get(&prefix.parse().unwrap())
        .is_some_and(|r: &LearnedRoute| r.next_hop == next_hop.parse::<IpAddr>().unwrap() && !r.stale)
}

pub async fn wait_established(s: &Speaker, peers: &[IpAddr], within: Duration) {
    let t = Instant::now();
    loop {
        let up = s.established();
        if peers.iter().all(|p| up.contains(p)) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "sessions to {peers:?} not established within {within:?}; up: {up:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A BIRD neighbor.
pub struct Neighbor {
    pub addr: IpAddr,
    pub asn: u32,
    pub rr_client: bool,
}

/// A bird.conf: one router, static routes to export, BGP neighbors.
pub struct BirdConf {
    pub router_id: Ipv4Addr,
    /// Its addresses in the sessions (BIRD's in the underlay namespace by default).
    pub local_v4: IpAddr,
    pub local_v6: IpAddr,
    pub asn: u32,
    /// Static (blackhole) routes BIRD exports, IPv4 and IPv6.
    pub statics: Vec<String>,
    pub neighbors: Vec<Neighbor>,
    /// `graceful restart on` (else BIRD's default, `aware`).
    pub graceful_restart: bool,
    /// `password "..."` (TCP MD5) on every session.
    pub password: Option<String>,
    /// A session's own password (over [`BirdConf::password`]), by neighbor address.
    pub neighbor_passwords: std::collections::BTreeMap<IpAddr, String>,
}

impl BirdConf {
    pub fn new(asn: u32) -> BirdConf {
        BirdConf {
            router_id: BIRD_V4.parse().unwrap(),
            local_v4: BIRD_V4.parse().unwrap(),
            local_v6: BIRD_V6.parse().unwrap(),
            asn,
            statics: Vec::new(),
            neighbors: Vec::new(),
            graceful_restart: false,
            password: None,
            neighbor_passwords: Default::default(),
        }
    }

    pub fn neighbor(mut self, addr: IpAddr, asn: u32, rr_client: bool) -> BirdConf {
        self.neighbors.push(Neighbor { addr, asn, rr_client });
        self
    }

    pub fn render(&self) -> String {
        let mut c = format!(
            "log stderr all;\nrouter id {};\nprotocol device {{ }}\n",
            self.router_id
        );
        let (v4, v6): (Vec<&String>, Vec<&String>) = self.statics.iter().partition(|s| !s.contains(':'));
        for (name, channel, routes) in [("s4", "ipv4", v4), ("s6", "ipv6", v6)] {
            c += &format!("protocol static {name} {{\n  {channel};\n");
            for r in routes {
                c += &format!("  route {r} blackhole;\n");
            }
            c += "}\n";
        }
        for (n, nb) in self.neighbors.iter().enumerate() {
            let ibgp = nb.asn == self.asn;
            // An IPv6 neighbor: the session runs from BIRD's IPv6 address.
            let local = if nb.addr.is_ipv6() {
                self.local_v6
            } else {
                self.local_v4
            };
            c += &format!(
                "protocol bgp n{n} {{\n  local {} as {};\n  neighbor {} as {};\n",
                local, self.asn, nb.addr, nb.asn
            );
            if ibgp {
                // Directly connected iBGP peers: without this BIRD resolves next hops
                // recursively and marks our routes unreachable.
                c += "  direct;\n";
            }
            if let Some(p) = self.neighbor_passwords.get(&nb.addr).or(self.password.as_ref()) {
                c += &format!("  password \"{p}\";\n");
            }
            if nb.rr_client {
                c += "  rr client;\n";
            }
            if std::env::var_os("TRELLIS_BIRD_DEBUG").is_some() {
                c += "  debug { states, events, packets };\n";
            }
            c += "  hold time 9; keepalive time 3;\n";
            c += "  connect delay time 1; connect retry time 2; error wait time 1, 2;\n";
            if self.graceful_restart {
                c += "  graceful restart on; graceful restart time 30;\n";
            }
            // IPv4 routes over an IPv6 session need extended next hops (RFC 8950), which we
            // do not speak: an IPv6 session carries IPv6 only.
            if nb.addr.is_ipv4() {
                c += "  ipv4 { import all; export all; };\n";
            }
            c += &format!(
                "  ipv6 {{ import all; export all; next hop address {}; }};\n}}\n",
                self.local_v6
            );
        }
        c
    }
}

/// The value of `trellisd_bgp_peer_<name>` for `peer` in `m`'s encoding (`None`: no series).
pub fn peer_metric(m: &Metrics, name: &str, peer: &str) -> Option<f64> {
    let prefix = format!("trellisd_bgp_peer_{name}{{peer=\"{peer}\",");
    m.render()
        .lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until `ok` holds of the per-peer metrics of `peer` (read with [`peer_metric`]); panics
/// with the whole encoding after `within`.
pub async fn wait_peer_metrics(
    m: &Metrics,
    peer: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&dyn Fn(&str) -> Option<f64>) -> bool,
) {
    let t = Instant::now();
    loop {
        if ok(&|name| peer_metric(m, name, peer)) {
            return;
        }
        assert!(t.elapsed() < within, "{what}: not within {within:?}:\n{}", m.render());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
