//! BGP mode: how fast `trellisd` gets BGP-learned routes into the kernel, next to BIRD 2 doing
//! the same between two namespaces, in one run.
//!
//! 1. Start: a 3-node `trellisd` full mesh (the `Cluster` harness: underlay namespace, etcd,
//!    node namespaces) until every node's kernel holds the other two pod CIDRs (`proto 117`).
//!    First start (from before `Cluster::new`, so it includes etcd and the namespaces), then
//!    restarts: stop the 3 daemons, flush their routes, start them, time until the routes are
//!    back. Next to it: two BIRDs on a veth pair, one static /24 each, iBGP, from starting both
//!    until each kernel holds the other's /24; BIRD's default timers and short ones.
//! 2. A change on established sessions: `trellisd` puts back a learned route deleted with
//!    `ip route del` (the kernel-notification path); BIRD: a static added with `birdc configure`
//!    until it is in the other BIRD's kernel (includes birdc and the reconfiguration).
//! 3. 10,000 prefixes from one peer: BIRD with 10,000 static /24s in 10.0.0.0/8 peers with a
//!    `trellisd` node (cluster CIDR 10.0.0.0/8, `Mesh: false`, BIRD as a `Peers` entry); from
//!    BIRD's start until the node's kernel holds all of them. Next to it BIRD → BIRD with the
//!    same routes. Then one more static added by `birdc configure` on top of the 10,000.
//! 4. Route-reflector fan-out to 100 clients: 100 client speakers (the speaker `trellisd` runs,
//!    in-process: 100 BIRDs would not fit in 2 cores) on 100 addresses of one namespace, each
//!    exporting a /24, all route-reflector clients of one reflector in another namespace: the
//!    speaker as `trellisd --bgp-route-reflector-cluster-id` runs it (in-process), then BIRD
//!    (`rr client` ×100), each with fresh clients. Times: the reflector's start until every
//!    client has the 99 others' routes (includes connection timers: 1 s retries on both
//!    sides); one client announcing a new /24 until all 99 others have it in their RIBs; its
//!    withdrawal until it is gone from all. Only this section: `--only reflector`.
//!
//! The kernels are polled every 10 ms for start-up figures and every 1 ms for changes, from a
//! thread inside the namespace: the FIB prefix count (`fib_triestat`, cheap), and a netlink dump
//! filtered by protocol when it may be complete.
//!
//! Run (as root): `cargo build --release -p trellisd -p trellis -p trellis-ipam -p trellis-bench
//! && target/release/bgp` (options: `--trellisd PATH`, `--runs R` (default 3), `--prefixes N`
//! (default 10000), `--only reflector`, `--clients N` (default 100)).

use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use trellis_bench::{cleanup, fib_prefixes, runtime};
use trellis_net::route::RT_TABLE_MAIN;
use trellis_net::{Netlink, RouteFilter};
use trellis_tests::bird::Bird;
use trellis_tests::cluster::{Cluster, UNDERLAY};
use trellis_tests::{Netns, TempDir};
use trellisd::bgp::{BgpConfig, PeerConfig, Routes, Speaker};
use trellisd::metrics::Metrics;

/// Name prefixes of what the benchmark creates, for the panic clean-up (the harness's too).
const PAIR_NS: &str = "bbp";
const DIR: &str = "bgpb";
const PROTO_TRELLIS: u8 = 117;
const PROTO_BIRD: u8 = 12;
const ASN: u32 = 64512;
const PA: &str = "172.30.0.1";
const PB: &str = "172.30.0.2";
const SLOW: Duration = Duration::from_millis(10);
const FAST: Duration = Duration::from_millis(1);

struct Opts {
    trellisd: PathBuf,
    runs: usize,
    prefixes: usize,
    /// Only the reflector fan-out.
    reflector_only: bool,
    clients: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        trellisd: PathBuf::from("target/release/trellisd"),
        runs: 3,
        prefixes: 10_000,
        reflector_only: false,
        clients: 100,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--trellisd" => o.trellisd = v.into(),
            "--runs" => o.runs = v.parse().expect("--runs R"),
            "--prefixes" => o.prefixes = v.parse().expect("--prefixes N"),
            "--only" if v == "reflector" => o.reflector_only = true,
            "--clients" => o.clients = v.parse().expect("--clients N"),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        o.runs > 0 && (1..=60_000).contains(&o.prefixes) && (2..=1000).contains(&o.clients),
        "bad --runs, --prefixes or --clients"
    );
    o.trellisd = o
        .trellisd
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --release -p trellisd)", o.trellisd.display()));
    o
}

// ---- Polling the kernel -----------------------------------------------------------------------

fn fib_prefixes_in(ns: &Path) -> usize {
    trellis_net::netns::run_in(ns, fib_prefixes).expect("entering the namespace")
}

/// Main-table routes of `proto` in the calling thread's namespace.
async fn count(nl: &Netlink, proto: u8) -> usize {
    let filter = RouteFilter {
        table: Some(RT_TABLE_MAIN),
        protocol: Some(proto),
        ..Default::default()
    };
    nl.routes(&filter).await.expect("listing routes").len()
}

fn count_in(ns: &Path, proto: u8) -> usize {
    trellis_net::netns::run_in(ns, || {
        runtime().block_on(async { count(&Netlink::connect().expect("netlink"), proto).await })
    })
    .expect("entering the namespace")
}

/// What to wait for in one namespace.
struct Wait<'a> {
    ns: &'a Path,
    proto: u8,
    /// Routes of `proto` expected.
    n: usize,
    /// FIB prefixes before the awaited routes arrived (for "first route"); `None`: not tracked.
    base: Option<usize>,
    /// FIB prefix count from which a netlink dump is worth it; `None`: dump at every poll.
    trie_at: Option<usize>,
    every: Duration,
    timeout: Duration,
}

/// Polls until the namespace holds `n` routes of `proto`; returns (first new prefix, all), both
/// since `t0`.
fn wait(w: &Wait, t0: Instant) -> Result<(Option<Duration>, Duration), String> {
    trellis_net::netns::run_in(w.ns, || {
        runtime().block_on(async {
            let nl = Netlink::connect().expect("netlink");
            let mut first = None;
            let mut checked = usize::MAX;
            loop {
                let p = fib_prefixes();
                let now = t0.elapsed();
                if first.is_none() && w.base.is_some_and(|b| p > b) {
                    first = Some(now);
                }
                let worth = w.trie_at.is_none_or(|at| p >= at && p != checked);
                if worth {
                    checked = p;
                    let got = count(&nl, w.proto).await;
                    if got >= w.n {
                        return Ok((first, now));
                    }
                }
                if now > w.timeout {
                    let got = count(&nl, w.proto).await;
                    return Err(format!("{got} of {} routes after {:?}", w.n, w.timeout));
                }
                std::thread::sleep(w.every);
            }
        })
    })
    .expect("entering the namespace")
}

// ---- BIRD -------------------------------------------------------------------------------------

const SHORT_TIMERS: &str =
    "connect delay time 1; connect retry time 1; error wait time 1,2; hold time 9; keepalive time 3;";

/// One BIRD: iBGP to `neighbor`, exporting `statics` (blackholes, next hop self); with `kernel`,
/// the BGP-learned routes go into the kernel's main table.
fn bird_conf(local: &str, neighbor: &str, statics: &[String], short: bool, kernel: bool) -> String {
    let scan = if short { "scan time 1;" } else { "" };
    let mut c = format!("log stderr all;\nrouter id {local};\nprotocol device {{ {scan} }}\n");
    if kernel {
        c += &format!("protocol kernel {{ {scan} ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n");
    }
    c += "protocol static {\n  ipv4;\n";
    for s in statics {
        c += &format!("  route {s} blackhole;\n");
    }
    c += "}\n";
    let timers = if short { SHORT_TIMERS } else { "" };
    c += &format!(
        "protocol bgp peer {{\n  local {local} as {ASN};\n  neighbor {neighbor} as {ASN};\n  direct;\n  {timers}\n  \
         ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }};\n}}\n"
    );
    c
}

/// Two namespaces on a veth pair (A `172.30.0.1/30`, B `.2`), a BIRD in each.
struct Pair {
    birds: Vec<Bird>,
    a: Netns,
    b: Netns,
    dir: TempDir,
}

impl Pair {
    fn new() -> Pair {
        let (a, b) = (Netns::new(PAIR_NS), Netns::new(PAIR_NS));
        a.exec_ok(&[
            "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
        ]);
        a.exec_ok(&["ip", "addr", "add", &format!("{PA}/30"), "dev", "va"]);
        b.exec_ok(&["ip", "addr", "add", &format!("{PB}/30"), "dev", "vb"]);
        a.exec_ok(&["ip", "link", "set", "va", "up"]);
        b.exec_ok(&["ip", "link", "set", "vb", "up"]);
        Pair {
            birds: Vec::new(),
            a,
            b,
            dir: TempDir::new(DIR),
        }
    }

    /// Writes both configs and starts both BIRDs; returns the instant before the first start.
    fn start(&mut self, a_statics: &[String], b_statics: &[String], short: bool) -> Instant {
        let d = self.dir.path();
        let (a, b) = (
            bird_conf(PA, PB, a_statics, short, true),
            bird_conf(PB, PA, b_statics, short, true),
        );
        let t0 = Instant::now();
        self.birds.push(Bird::launch(&self.a, d, "a", &a));
        self.birds.push(Bird::launch(&self.b, d, "b", &b));
        t0
    }

    /// Kills both BIRDs and flushes what they left in the kernels.
    fn stop(&mut self) {
        self.birds.clear();
        for ns in [&self.a, &self.b] {
            let _ = ns.exec(&["ip", "route", "flush", "proto", "bird"]);
        }
    }
}

// ---- Figures ----------------------------------------------------------------------------------

/// `median (min–max, n=…)` of the samples, or why there are none.
fn show(samples: &[Duration]) -> String {
    if samples.is_empty() {
        return "—".into();
    }
    let mut s = samples.to_vec();
    s.sort();
    let f = |d: Duration| {
        if d >= Duration::from_secs(1) {
            format!("{:.2} s", d.as_secs_f64())
        } else {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        }
    };
    if s.len() == 1 {
        return f(s[0]);
    }
    format!(
        "{} ({}–{}, n={})",
        f(s[s.len() / 2]),
        f(s[0]),
        f(s[s.len() - 1]),
        s.len()
    )
}

struct Row {
    what: String,
    trellisd: String,
    bird_short: String,
    bird_default: String,
    target: String,
}

fn ok(
    r: Result<(Option<Duration>, Duration), String>,
    what: &str,
    errors: &mut Vec<String>,
) -> Option<(Option<Duration>, Duration)> {
    r.map_err(|e| errors.push(format!("{what}: {e}"))).ok()
}

fn mesh_net_conf() -> String {
    format!(
        r#"{{"Network": "10.244.0.0/16", "Backend": {{"Type": "bgp", "ASNumber": {ASN}, "Mesh": true, "HoldTime": 9}}}}"#
    )
}

/// Waits until each of the cluster's nodes holds the other nodes' routes; the slowest node's time.
fn mesh_converged(c: &Cluster, t0: Instant, every: Duration) -> Result<Duration, String> {
    let n = c.nodes.len() - 1;
    let mut worst = Duration::ZERO;
    for node in &c.nodes {
        let w = Wait {
            ns: node.ns.path(),
            proto: PROTO_TRELLIS,
            n,
            base: None,
            trie_at: None,
            every,
            timeout: Duration::from_secs(30),
        };
        let (_, all) = wait(&w, t0).map_err(|e| format!("{}: {e}", node.name))?;
        worst = worst.max(all);
    }
    Ok(worst)
}

fn main() {
    trellis_tests::require_root();
    let o = opts();
    cleanup::on_panic(&["tcu", "tcn", "tcp", PAIR_NS, RR_NS], &[DIR, "cluster"]);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "trellisd BGP mode vs BIRD 2 — {cpus} CPUs, {} run(s) per figure",
        o.runs
    );
    if o.reflector_only {
        reflector_fanout(&o);
        return;
    }
    let mut errors = Vec::new();
    let mut rows = Vec::new();

    // 1. trellisd: 3-node full mesh.
    let t0 = Instant::now();
    let mut c = Cluster::new(3, &mesh_net_conf(), &o.trellisd, &[]);
    let cluster_up = t0.elapsed();
    let first = mesh_converged(&c, t0, SLOW)
        .map_err(|e| errors.push(format!("mesh first start: {e}")))
        .ok();
    let mut restarts = Vec::new();
    for _ in 0..o.runs {
        for i in 0..3 {
            c.stop_daemon(i);
        }
        for node in &c.nodes {
            let _ = node.ns.exec(&["ip", "route", "flush", "proto", "117"]);
        }
        let t0 = Instant::now();
        for i in 0..3 {
            c.start_daemon(i);
        }
        match mesh_converged(&c, t0, SLOW) {
            Ok(d) => restarts.push(d),
            Err(e) => errors.push(format!("mesh restart: {e}\nnode1 log tail:\n{}", tail(&c.log(0)))),
        }
    }
    // Change: a learned route deleted on node1, until trellisd puts it back.
    let mut repairs = Vec::new();
    let node1 = c.nodes[0].ns.path();
    for _ in 0..o.runs.max(5) {
        let shown = c.nodes[0].ns.exec_ok(&["ip", "route", "show", "proto", "117"]);
        let Some(prefix) = shown
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().next())
            .map(String::from)
        else {
            errors.push("mesh: node1 has no proto 117 route to delete".into());
            break;
        };
        std::thread::sleep(Duration::from_millis(200));
        c.nodes[0].ns.exec_ok(&["ip", "route", "del", &prefix, "proto", "117"]);
        let t0 = Instant::now();
        let w = Wait {
            ns: node1,
            proto: PROTO_TRELLIS,
            n: 2,
            base: None,
            trie_at: None,
            every: FAST,
            timeout: Duration::from_secs(60),
        };
        if let Some((_, d)) = ok(wait(&w, t0), "mesh route repair", &mut errors) {
            repairs.push(d);
        }
    }
    drop(c);

    // 1b. BIRD pair, one /24 each.
    let mut pair = Pair::new();
    let mut bird_start = [Vec::new(), Vec::new()]; // [short, default]
    for (k, short) in [(0, true), (1, false)] {
        for _ in 0..o.runs {
            let t0 = pair.start(&["10.201.0.0/24".into()], &["10.202.0.0/24".into()], short);
            let mut worst = Duration::ZERO;
            let mut good = true;
            for ns in [pair.a.path(), pair.b.path()] {
                let w = Wait {
                    ns,
                    proto: PROTO_BIRD,
                    n: 1,
                    base: None,
                    trie_at: None,
                    every: SLOW,
                    timeout: Duration::from_secs(60),
                };
                match ok(wait(&w, t0), "BIRD pair start", &mut errors) {
                    Some((_, d)) => worst = worst.max(d),
                    None => good = false,
                }
            }
            if good {
                bird_start[k].push(worst);
            }
            pair.stop();
        }
    }
    // Change: a static added to A by `birdc configure`, until B's kernel holds it.
    let mut bird_change = Vec::new();
    {
        let mut statics = vec!["10.201.0.0/24".to_string()];
        pair.start(&statics, &["10.202.0.0/24".into()], true);
        let bpath = pair.b.path();
        let w1 = Wait {
            ns: bpath,
            proto: PROTO_BIRD,
            n: 1,
            base: None,
            trie_at: None,
            every: SLOW,
            timeout: Duration::from_secs(30),
        };
        ok(wait(&w1, Instant::now()), "BIRD pair before change", &mut errors);
        for k in 0..o.runs.max(5) {
            statics.push(format!("10.203.{k}.0/24"));
            let conf = bird_conf(PA, PB, &statics, true, true);
            std::thread::sleep(Duration::from_millis(200));
            let t0 = Instant::now();
            pair.birds[0].reconfigure(&conf);
            let w = Wait {
                ns: bpath,
                proto: PROTO_BIRD,
                n: statics.len(),
                base: None,
                trie_at: None,
                every: FAST,
                timeout: Duration::from_secs(30),
            };
            if let Some((_, t)) = ok(wait(&w, t0), "BIRD change", &mut errors) {
                bird_change.push(t);
            }
        }
        pair.stop();
    }

    rows.push(Row {
        what: "start → routes in every kernel (first start, from before Cluster::new)".into(),
        // Polled only once Cluster::new returned: when the routes were already there, the figure
        // is an upper bound.
        trellisd: first
            .map(|d| {
                let bound = if d <= cluster_up + SLOW * 2 { "≤ " } else { "" };
                format!("{bound}{}", show(&[d]))
            })
            .unwrap_or("failed".into()),
        bird_short: "(as below)".into(),
        bird_default: "(as below)".into(),
        target: "1 s".into(),
    });
    rows.push(Row {
        what: "daemon (re)start → routes in every kernel".into(),
        trellisd: show(&restarts),
        bird_short: show(&bird_start[0]),
        bird_default: show(&bird_start[1]),
        target: "1 s".into(),
    });
    rows.push(Row {
        what:
            "change: trellisd = learned route `ip route del` → back; BIRD = static added, birdc configure → peer kernel"
                .into(),
        trellisd: show(&repairs),
        bird_short: show(&bird_change),
        bird_default: "".into(),
        target: "10 ms".into(),
    });

    // 3. 10,000 prefixes from one peer.
    let n = o.prefixes;
    let big: Vec<String> = (0..n + 1)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    let backend = format!(
        r#"{{"Network": "10.0.0.0/8", "Backend": {{"Type": "bgp", "ASNumber": {ASN}, "Mesh": false, "HoldTime": 9, "Peers": [{{"IP": "{UNDERLAY}.1", "ASNumber": {ASN}}}]}}}}"#
    );
    let c = Cluster::new(1, &backend, &o.trellisd, &[]);
    let own = c.cni_conf(0)["ipam"]["ranges"][0][0]["subnet"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut statics: Vec<String> = big.iter().filter(|s| **s != own).take(n).cloned().collect();
    let node = c.nodes[0].ns.path();
    let dir = TempDir::new(DIR);
    let rr = |statics: &[String]| {
        bird_conf(
            &format!("{UNDERLAY}.1"),
            &format!("{UNDERLAY}.11"),
            statics,
            true,
            false,
        )
    };
    let base = fib_prefixes_in(node);
    let before = count_in(node, PROTO_TRELLIS);
    let t0 = Instant::now();
    let bird = Bird::launch(&c.underlay, dir.path(), "r", &rr(&statics));
    let w = Wait {
        ns: node,
        proto: PROTO_TRELLIS,
        n: before + n,
        base: Some(base),
        trie_at: Some(base + n),
        every: SLOW,
        timeout: Duration::from_secs(180),
    };
    let t_big = ok(wait(&w, t0), "BIRD → trellisd 10k", &mut errors);
    if t_big.is_none() {
        errors.push(format!("trellisd log tail:\n{}", tail(&c.log(0))));
    }
    // One more on top. How long `birdc configure` takes to return is noted too: the sender's
    // share of the figure (BIRD re-reading 10,000 statics), the same for both receivers.
    let mut t_big_change = Vec::new();
    let mut t_big_configure = Vec::new();
    for k in 0..o.runs {
        statics.push(format!("10.250.{k}.0/24"));
        let conf = rr(&statics);
        std::thread::sleep(Duration::from_millis(300));
        let now = fib_prefixes_in(node);
        let t0 = Instant::now();
        bird.reconfigure(&conf);
        t_big_configure.push(t0.elapsed());
        let w = Wait {
            ns: node,
            proto: PROTO_TRELLIS,
            n: before + n + k + 1,
            base: None,
            trie_at: Some(now + 1),
            every: FAST,
            timeout: Duration::from_secs(30),
        };
        if let Some((_, d)) = ok(wait(&w, t0), "BIRD → trellisd change on 10k", &mut errors) {
            t_big_change.push(d);
        }
    }
    drop(bird);
    drop(c);
    statics.truncate(n);

    // BIRD → BIRD, same routes.
    let mut pair = Pair::new();
    let bpath = pair.b.path().to_path_buf();
    let base = fib_prefixes_in(&bpath);
    let t0 = pair.start(&statics, &[], true);
    let w = Wait {
        ns: &bpath,
        proto: PROTO_BIRD,
        n,
        base: Some(base),
        trie_at: Some(base + n),
        every: SLOW,
        timeout: Duration::from_secs(180),
    };
    let b_big = ok(wait(&w, t0), "BIRD → BIRD 10k", &mut errors);
    let mut b_big_change = Vec::new();
    let mut b_big_configure = Vec::new();
    for k in 0..o.runs {
        statics.push(format!("10.250.{k}.0/24"));
        let conf = bird_conf(PA, PB, &statics, true, true);
        std::thread::sleep(Duration::from_millis(300));
        let now = fib_prefixes_in(&bpath);
        let t0 = Instant::now();
        pair.birds[0].reconfigure(&conf);
        b_big_configure.push(t0.elapsed());
        let w = Wait {
            ns: &bpath,
            proto: PROTO_BIRD,
            n: n + k + 1,
            base: None,
            trie_at: Some(now + 1),
            every: FAST,
            timeout: Duration::from_secs(30),
        };
        if let Some((_, d)) = ok(wait(&w, t0), "BIRD → BIRD change on 10k", &mut errors) {
            b_big_change.push(d);
        }
    }
    pair.stop();
    drop(pair);

    let first_of =
        |r: &Option<(Option<Duration>, Duration)>| r.and_then(|(f, _)| f).map(|d| show(&[d])).unwrap_or("—".into());
    let all_of = |r: &Option<(Option<Duration>, Duration)>| r.map(|(_, d)| show(&[d])).unwrap_or("failed".into());
    let spread =
        |r: &Option<(Option<Duration>, Duration)>| r.and_then(|(f, a)| f.map(|f| show(&[a - f]))).unwrap_or("—".into());
    rows.push(Row {
        what: format!("{n} prefixes: peer BIRD start → first route in the kernel (≈ session up)"),
        trellisd: first_of(&t_big),
        bird_short: first_of(&b_big),
        bird_default: "".into(),
        target: "".into(),
    });
    rows.push(Row {
        what: format!("{n} prefixes: peer BIRD start → all in the kernel"),
        trellisd: all_of(&t_big),
        bird_short: all_of(&b_big),
        bird_default: "".into(),
        target: "".into(),
    });
    rows.push(Row {
        what: format!("{n} prefixes: first → last route in the kernel"),
        trellisd: spread(&t_big),
        bird_short: spread(&b_big),
        bird_default: "".into(),
        target: "".into(),
    });
    rows.push(Row {
        what: format!("change on top of {n}: static added, birdc configure → in the receiver's kernel"),
        trellisd: show(&t_big_change),
        bird_short: show(&b_big_change),
        bird_default: "".into(),
        target: "10 ms".into(),
    });
    rows.push(Row {
        what: "  of which the sender's `birdc configure`, until it returned".into(),
        trellisd: show(&t_big_configure),
        bird_short: show(&b_big_configure),
        bird_default: "".into(),
        target: "".into(),
    });

    println!(
        "cluster up (Cluster::new: etcd, namespaces, 3 daemons, CNI configs written): {}",
        show(&[cluster_up])
    );
    println!(
        "{:<100} | {:<28} | {:<28} | {:<28} | target",
        "figure (receiver's kernel polled every 10 ms for starts, 1 ms for changes)",
        "trellisd",
        "BIRD→BIRD short timers",
        "BIRD→BIRD default timers"
    );
    for r in &rows {
        println!(
            "{:<100} | {:<28} | {:<28} | {:<28} | {}",
            r.what, r.trellisd, r.bird_short, r.bird_default, r.target
        );
    }
    if !errors.is_empty() {
        println!("\nerrors:");
        for e in &errors {
            println!("- {e}");
        }
    }
    println!();
    reflector_fanout(&o);
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

// ---- Route-reflector fan-out --------------------------------------------------------------------

const RR_NS: &str = "bbr";
const RR_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// Announce/withdraw samples per reflector.
const FANOUT_SAMPLES: usize = 10;

fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 1 + (i / 250) as u8, (i % 250 + 1) as u8)
}

fn client_prefix(i: usize) -> IpNetwork {
    format!("10.{}.{}.0/24", 200 + i / 256, i % 256)
        .parse()
        .expect("prefix")
}

/// The reflector's namespace (`172.31.0.1/16`) and the clients' (100 addresses from
/// `172.31.1.1/16`), on a veth pair.
struct FanoutNet {
    r: Netns,
    c: Netns,
    dir: TempDir,
}

impl FanoutNet {
    fn new(clients: usize) -> FanoutNet {
        let (r, c) = (Netns::new(RR_NS), Netns::new(RR_NS));
        r.exec_ok(&[
            "ip", "link", "add", "rr0", "type", "veth", "peer", "name", "cl0", "netns", &c.name,
        ]);
        r.exec_ok(&["ip", "addr", "add", &format!("{RR_ADDR}/16"), "dev", "rr0"]);
        let mut batch = String::new();
        for i in 0..clients {
            batch += &format!("addr add {}/16 dev cl0\n", client_addr(i));
        }
        let file = TempDir::new(DIR);
        let path = file.path().join("addrs");
        std::fs::write(&path, batch).expect("ip batch file");
        c.exec_ok(&["ip", "-batch", &path.to_string_lossy()]);
        r.exec_ok(&["ip", "link", "set", "rr0", "up"]);
        c.exec_ok(&["ip", "link", "set", "cl0", "up"]);
        FanoutNet { r, c, dir: file }
    }
}

type Client = (Speaker, watch::Receiver<Routes>);

async fn start_clients(net: &FanoutNet, n: usize) -> Vec<Client> {
    let mut out = Vec::new();
    for i in 0..n {
        let addr = client_addr(i);
        let mut cfg = BgpConfig::new(ASN, addr);
        cfg.listen = SocketAddr::new(addr.into(), 179);
        cfg.connect_retry = Duration::from_secs(1);
        cfg.import_within = vec!["10.0.0.0/8".parse().expect("cidr")];
        cfg.netns = Some(net.c.path().to_path_buf());
        let (s, rx) = Speaker::start(cfg, Metrics::new()).await.expect("client speaker");
        s.set_exports(vec![client_prefix(i)], Some(addr.into()), None);
        s.set_peers(vec![PeerConfig::new(RR_ADDR.into(), ASN)]);
        out.push((s, rx));
    }
    out
}

/// How long until every client but `skip` satisfies `ok`.
async fn all_clients(
    clients: &[Client],
    skip: Option<usize>,
    t0: Instant,
    ok: impl Fn(&Routes) -> bool + Copy,
) -> Result<Duration, String> {
    let rxs: Vec<watch::Receiver<Routes>> = clients
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, (s, _))| s.routes())
        .collect();
    // Each wait ends with its guard dropped: a held one would block that speaker's publisher.
    let waits = futures::future::join_all(
        rxs.into_iter()
            .map(|mut rx| async move { rx.wait_for(move |r| ok(r)).await.is_ok() }),
    );
    match tokio::time::timeout(Duration::from_secs(60), waits).await {
        Ok(_) => Ok(t0.elapsed()),
        Err(_) => {
            let behind = clients.iter().filter(|(s, _)| !ok(&s.routes().borrow())).count();
            Err(format!("{behind} clients not there after 60 s"))
        }
    }
}

/// Fan-out figures with one kind of reflector (started by `start`): (all up, announce samples,
/// withdraw samples).
async fn fanout_round<R>(
    net: &FanoutNet,
    n: usize,
    start: impl FnOnce() -> R,
) -> Result<(Duration, Vec<Duration>, Vec<Duration>), String> {
    let clients = start_clients(net, n).await;
    let t0 = Instant::now();
    let reflector = start();
    let up = all_clients(&clients, None, t0, move |r| r.len() == n - 1).await?;
    let (mut add, mut del) = (Vec::new(), Vec::new());
    let origin = &clients[0].0;
    let addr = IpAddr::V4(client_addr(0));
    for k in 0..FANOUT_SAMPLES {
        let extra: IpNetwork = format!("10.250.{k}.0/24").parse().expect("prefix");
        let t0 = Instant::now();
        origin.set_exports(vec![client_prefix(0), extra], Some(addr), None);
        add.push(all_clients(&clients, Some(0), t0, move |r| r.contains_key(&extra)).await?);
        let t0 = Instant::now();
        origin.set_exports(vec![client_prefix(0)], Some(addr), None);
        del.push(all_clients(&clients, Some(0), t0, move |r| !r.contains_key(&extra)).await?);
    }
    drop(reflector);
    Ok((up, add, del))
}

fn bird_reflector_conf(n: usize) -> String {
    let mut c = format!(
        "log stderr {{ warning, error, fatal }};\nrouter id {RR_ADDR};\nprotocol device {{ }}\n\
         template bgp rrc {{\n  local {RR_ADDR} as {ASN};\n  direct;\n  rr client;\n  {SHORT_TIMERS}\n  \
         ipv4 {{ import all; export all; }};\n}}\n"
    );
    for i in 0..n {
        c += &format!(
            "protocol bgp c{i} from rrc {{ neighbor {} as {ASN}; }}\n",
            client_addr(i)
        );
    }
    c
}

/// Section 4: the speaker as reflector, then BIRD, for the same number of clients.
fn reflector_fanout(o: &Opts) {
    let n = o.clients;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut errors = Vec::new();
    let ours = {
        let net = FanoutNet::new(n);
        rt.block_on(async {
            let peers: Vec<PeerConfig> = (0..n)
                .map(|i| PeerConfig {
                    rr_client: true,
                    ..PeerConfig::new(client_addr(i).into(), ASN)
                })
                .collect();
            let mut cfg = BgpConfig::new(ASN, RR_ADDR);
            cfg.listen = SocketAddr::new(RR_ADDR.into(), 179);
            cfg.connect_retry = Duration::from_secs(1);
            cfg.import_within = vec!["10.0.0.0/8".parse().expect("cidr")];
            cfg.netns = Some(net.r.path().to_path_buf());
            cfg.rr_cluster_id = Some(RR_ADDR);
            let (rr, _) = Speaker::start(cfg, Metrics::new()).await.expect("reflector");
            fanout_round(&net, n, move || {
                rr.set_peers(peers);
                rr
            })
            .await
        })
        .map_err(|e| errors.push(format!("trellisd reflector: {e}")))
        .ok()
    };
    let bird = {
        let net = FanoutNet::new(n);
        let conf = bird_reflector_conf(n);
        rt.block_on(fanout_round(&net, n, || {
            Bird::start(&net.r, net.dir.path(), "rr", &conf)
        }))
        .map_err(|e| errors.push(format!("BIRD reflector: {e}")))
        .ok()
    };
    let up = |r: &Option<(Duration, Vec<Duration>, Vec<Duration>)>| {
        r.as_ref().map(|x| show(&[x.0])).unwrap_or("failed".into())
    };
    let add = |r: &Option<(Duration, Vec<Duration>, Vec<Duration>)>| {
        r.as_ref().map(|x| show(&x.1)).unwrap_or("failed".into())
    };
    let del = |r: &Option<(Duration, Vec<Duration>, Vec<Duration>)>| {
        r.as_ref().map(|x| show(&x.2)).unwrap_or("failed".into())
    };
    println!("route-reflector fan-out: {n} clients (in-process speakers), one reflector; times until the clients' RIBs have it");
    println!(
        "{:<78} | {:<30} | {:<30}",
        "figure", "trellisd reflector", "BIRD reflector"
    );
    let rows = [
        (
            format!("reflector start → every client has the {} others' routes", n - 1),
            up(&ours),
            up(&bird),
        ),
        (
            format!("a client announces a /24 → all {} others have it", n - 1),
            add(&ours),
            add(&bird),
        ),
        (
            format!("it withdraws the /24 → gone from all {} others", n - 1),
            del(&ours),
            del(&bird),
        ),
    ];
    for (what, a, b) in rows {
        println!("{what:<78} | {a:<30} | {b:<30}");
    }
    if !errors.is_empty() {
        println!("\nerrors:");
        for e in &errors {
            println!("- {e}");
        }
    }
}
