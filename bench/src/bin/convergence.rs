//! How fast `trellisd` programs a large cluster: N remote nodes' VXLAN leases are in etcd before
//! the daemon starts; the figure is the time from starting it until the kernel holds every
//! route (protocol 117), permanent neighbour and FDB entry for the N remotes. The daemon runs
//! twice per N: as it comes (routes by kernel nexthop object, where the kernel has them) and with
//! `--no-nexthop-objects` (plain routes, a gateway each). Next to them, in the same run, the same
//! objects written by `bridge -batch` + `ip -batch` into a namespace with an identical VXLAN
//! device, both ways: the near-kernel limits.
//!
//! Per N, each in fresh namespaces: an underlay namespace (bridge `172.31.0.1/16`, etcd), a node
//! namespace joined to it (`172.31.0.2/16`) that runs `trellisd` with `Network 10.0.0.0/8`,
//! `SubnetLen 24`, VXLAN VNI 1. Remote node i has underlay address `172.31.x.y`, pod CIDR
//! `10.(i/256).(i%256).0/24` and VTEP MAC `0e:b0:00:..`; its two keys (lease JSON and CIDR
//! owner) are written with etcd transactions of 128 operations before the daemon starts.
//!
//! Convergence is polled every 2 ms, cheaply: the node namespace's FIB prefix count
//! (`/proc/thread-self/net/fib_triestat` from a thread inside it) until it has grown by N, then
//! exact netlink counts of the three tables. The daemon's peak RSS is its `VmHWM`; its own log
//! (timestamps) and `/metrics` split the time into start-up, claiming the lease and reconciling.
//!
//! Run (as root): `cargo build --release -p trellisd -p trellis -p trellis-ipam -p trellis-bench
//! && target/release/convergence --nodes-list 1000,10000`
//! Options: `--nodes-list N,N,…` (default 1000,10000), `--runs R` (default 1; medians),
//! `--trellisd PATH`, `--timeout-s S` (default 300), `--keep-logs DIR` (copies each daemon log
//! there), `--wrap 'CMD ARGS --'` (runs the daemon under CMD, e.g. `perf record -g -o F --`),
//! `--daemon-args 'ARGS'` (more trellisd flags, e.g. `--resync 1`), `--settle-s S` (default 2: how
//! long the daemon keeps running after convergence before its RSS and metrics are read),
//! `--then-add K` (K more nodes written to etcd after convergence), `--modes nexthops,plain`
//! (which trellisd modes to run).

use etcd_client::{Client, GetOptions, Txn, TxnOp};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use trellis_bench::{cleanup, fib_prefixes, median, runtime};
use trellis_net::route::RT_TABLE_MAIN;
use trellis_net::{NeighbourState, Netlink, RouteFilter};
use trellis_tests::etcd::Etcd;
use trellis_tests::topology::{Spec, Topology};
use trellis_tests::{sh, Netns, TempDir};

/// Name prefixes of what the benchmark creates, for the panic clean-up.
/// The test topology's tag: its namespaces are `bcu…` (underlay) and `bcn…` (the node).
const TOPOLOGY_TAG: &str = "bc";
const UNDERLAY_NS: &str = "bcu";
const NODE_NS: &str = "bcn";
const BATCH_NS: &str = "bcb";
const DIR: &str = "bench";

const ETCD_IP: &str = "172.31.0.1";
/// The node's address in the test topology (node 1: `.11`).
const NODE_IP: &str = "172.31.0.11";
const PREFIX: &str = "/trellis/leases/";
const DEVICE: &str = "trellis.1";
const PROTO: u8 = 117;
const NET_CONF: &str =
    r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}"#;
const POLL: Duration = Duration::from_millis(2);

struct Opts {
    nodes: Vec<usize>,
    runs: usize,
    trellisd: PathBuf,
    timeout: Duration,
    keep_logs: Option<PathBuf>,
    wrap: Vec<String>,
    daemon_args: Vec<String>,
    settle: Duration,
    then_add: usize,
    modes: Vec<Mode>,
}

/// How trellisd (and the matching `ip -batch`) programs the routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Routes by kernel nexthop object (trellisd's default).
    Nexthops,
    /// `--no-nexthop-objects`: a gateway per route.
    Plain,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Nexthops => "nexthops",
            Mode::Plain => "plain",
        }
    }
}

fn opts() -> Opts {
    let mut o = Opts {
        nodes: vec![1000, 10000],
        runs: 1,
        trellisd: PathBuf::from("target/release/trellisd"),
        timeout: Duration::from_secs(300),
        keep_logs: None,
        wrap: Vec::new(),
        daemon_args: Vec::new(),
        settle: Duration::from_secs(2),
        then_add: 0,
        modes: vec![Mode::Nexthops, Mode::Plain],
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--nodes-list" => {
                o.nodes = v
                    .split(',')
                    .map(|n| n.trim().parse().expect("--nodes-list N,N,…"))
                    .collect()
            }
            "--runs" => o.runs = v.parse().expect("--runs R"),
            "--trellisd" => o.trellisd = v.into(),
            "--timeout-s" => o.timeout = Duration::from_secs(v.parse().expect("--timeout-s S")),
            "--keep-logs" => o.keep_logs = Some(v.into()),
            "--wrap" => o.wrap = v.split_whitespace().map(String::from).collect(),
            "--then-add" => o.then_add = v.parse().expect("--then-add K"),
            "--settle-s" => o.settle = Duration::from_secs(v.parse().expect("--settle-s S")),
            "--daemon-args" => o.daemon_args = v.split_whitespace().map(String::from).collect(),
            "--modes" => {
                o.modes = v
                    .split(',')
                    .map(|m| match m.trim() {
                        "nexthops" => Mode::Nexthops,
                        "plain" => Mode::Plain,
                        other => panic!("--modes: {other:?} is not nexthops or plain"),
                    })
                    .collect()
            }
            other => panic!("unknown option {other}"),
        }
    }
    assert!(o.runs > 0, "--runs must be positive");
    assert!(
        o.nodes.iter().all(|n| (1..=60_000).contains(n)),
        "node counts must be in 1..=60000 (one /24 of 10.0.0.0/8 each, underlay addresses in a /16)"
    );
    o.trellisd = o
        .trellisd
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build --release -p trellisd)", o.trellisd.display()));
    o
}

/// A simulated remote node (i from 1).
struct Remote {
    name: String,
    underlay: Ipv4Addr,
    /// The pod CIDR's network address (a /24); also its VTEP address.
    cidr: Ipv4Addr,
    mac: String,
}

fn remote(i: usize) -> Remote {
    let j = i - 1;
    Remote {
        name: format!("remote-{i:05}"),
        underlay: Ipv4Addr::new(172, 31, 1 + (j / 254) as u8, (j % 254) as u8 + 1),
        cidr: Ipv4Addr::new(10, (i >> 8) as u8, i as u8, 0),
        mac: format!(
            "0e:b0:00:{:02x}:{:02x}:{:02x}",
            (i >> 16) as u8,
            (i >> 8) as u8,
            i as u8
        ),
    }
}

/// The kernel objects a namespace holds for the remotes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    routes: usize,
    neighbours: usize,
    fdb: usize,
}

impl Counts {
    fn all(n: usize) -> Counts {
        Counts {
            routes: n,
            neighbours: n,
            fdb: n,
        }
    }
}

/// Exact counts, over netlink: our routes in the main table, permanent neighbours and FDB
/// entries with a remote on the device.
async fn counts(nl: &Netlink) -> Counts {
    let Some(dev) = nl.link_by_name(DEVICE).await.expect("looking up the device") else {
        return Counts::default();
    };
    let filter = RouteFilter {
        table: Some(RT_TABLE_MAIN),
        protocol: Some(PROTO),
        ..Default::default()
    };
    let routes = nl.routes(&filter).await.expect("listing routes").len();
    let neighbours = nl
        .neighbours(Some(dev.index), None)
        .await
        .expect("listing neighbours")
        .iter()
        .filter(|n| n.state == NeighbourState::Permanent)
        .count();
    // Not `permanent`: `bridge fdb add … permanent` gives NUD_PERMANENT | NUD_NOARP, which
    // trellis-net reads as not permanent (trellisd's own entries are NUD_PERMANENT alone). The
    // device does no learning, so every entry with a remote was programmed.
    let fdb = nl
        .fdb(dev.index)
        .await
        .expect("listing the FDB")
        .iter()
        .filter(|e| e.ntf_self && e.master.is_none() && e.dst.is_some())
        .count();
    Counts {
        routes,
        neighbours,
        fdb,
    }
}

/// Exact counts in the namespace `ns`.
fn counts_in(ns: &Netns) -> Counts {
    trellis_net::netns::run_in(ns.path(), || {
        let rt = runtime();
        rt.block_on(async { counts(&Netlink::connect().expect("netlink")).await })
    })
    .expect("entering the namespace")
}

/// The near-kernel limit: the same objects with `bridge -batch` and `ip -batch` in a fresh
/// namespace holding a VXLAN device like trellisd's, routes by nexthop object (IDs as trellisd's)
/// or plain. Returns the wall time of both commands.
fn ip_batch(remotes: &[Remote], dir: &Path, mode: Mode) -> Duration {
    let ns = Netns::new(BATCH_NS);
    let n = &ns.name;
    sh(&format!(
        "ip -n {n} link add ul0 mtu 1500 type veth peer name ul0p && ip -n {n} link set ul0p up && ip -n {n} addr add {NODE_IP}/16 dev ul0 && \
         ip -n {n} link set ul0 up && \
         ip -n {n} link add {DEVICE} mtu 1450 address 0e:b0:ff:ff:ff:01 type vxlan id 1 local {NODE_IP} \
         dev ul0 dstport 8472 nolearning && \
         ip -n {n} addr add 10.255.255.0/32 dev {DEVICE} noprefixroute && ip -n {n} link set {DEVICE} up"
    ));
    let (mut fdb, mut ip) = (String::new(), String::new());
    for r in remotes {
        writeln!(fdb, "fdb add {} dev {DEVICE} dst {} self permanent", r.mac, r.underlay).unwrap();
        writeln!(ip, "neigh add {} lladdr {} dev {DEVICE} nud permanent", r.cidr, r.mac).unwrap();
    }
    for (i, r) in remotes.iter().enumerate() {
        match mode {
            Mode::Plain => writeln!(ip, "route add {0}/24 via {0} dev {DEVICE} onlink proto {PROTO}", r.cidr),
            Mode::Nexthops => {
                let id = (u32::from(PROTO) << 24) + i as u32;
                writeln!(
                    ip,
                    "nexthop add id {id} via {} dev {DEVICE} onlink proto {PROTO}",
                    r.cidr
                )
                .and_then(|()| writeln!(ip, "route add {}/24 nhid {id} proto {PROTO}", r.cidr))
            }
        }
        .unwrap();
    }
    let (fdb_file, ip_file) = (dir.join("fdb.batch"), dir.join("ip.batch"));
    std::fs::write(&fdb_file, fdb).expect("write fdb batch");
    std::fs::write(&ip_file, ip).expect("write ip batch");
    let run = |argv: &[&str]| {
        let out = Command::new(argv[0]).args(&argv[1..]).output().expect("run batch");
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let t = Instant::now();
    run(&["bridge", "-n", n, "-batch", fdb_file.to_str().unwrap()]);
    run(&["ip", "-n", n, "-batch", ip_file.to_str().unwrap()]);
    let took = t.elapsed();
    let got = counts_in(&ns);
    assert_eq!(got, Counts::all(remotes.len()), "ip -batch programmed {got:?}");
    took
}

/// Writes the remotes' records (lease + CIDR owner) with etcd transactions of 128 operations,
/// 16 in flight; returns how long it took.
fn load_etcd(underlay: &Netns, remotes: &[Remote]) -> Duration {
    // The client's sockets must be made inside the underlay namespace: the whole runtime lives
    // on a thread that entered it.
    trellis_net::netns::run_in(underlay.path(), || {
        runtime().block_on(async {
            let endpoint = format!("http://{ETCD_IP}:2379");
            let t = Instant::now();
            let client = loop {
                if let Ok(mut c) = Client::connect([endpoint.as_str()], None).await {
                    if c.status().await.is_ok() {
                        break c;
                    }
                }
                assert!(t.elapsed() < Duration::from_secs(20), "etcd did not answer in 20 s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let t = Instant::now();
            let txns: Vec<Txn> = remotes
                .chunks(64)
                .map(|chunk| {
                    let ops: Vec<TxnOp> = chunk
                        .iter()
                        .flat_map(|r| {
                            let lease = json!({"node": r.name, "underlayIp": r.underlay.to_string(),
                                "podCidrs": [format!("{}/24", r.cidr)],
                                "backend": {"type": "vxlan", "vtepMAC": r.mac, "vni": 1}});
                            [
                                TxnOp::put(format!("{PREFIX}{}", r.name), lease.to_string(), None),
                                TxnOp::put(format!("{PREFIX}cidrs/{}_24", r.cidr), r.name.as_str(), None),
                            ]
                        })
                        .collect();
                    Txn::new().and_then(ops)
                })
                .collect();
            futures::stream::iter(txns)
                .map(|txn| {
                    let mut c = client.clone();
                    async move { c.txn(txn).await }
                })
                .buffer_unordered(16)
                .try_for_each(|_| async { Ok(()) })
                .await
                .expect("etcd txn");
            let took = t.elapsed();
            let mut c = client.clone();
            let stored = c
                .get(PREFIX, Some(GetOptions::new().with_prefix().with_count_only()))
                .await
                .expect("etcd count")
                .count();
            assert!(stored as usize >= 2 * remotes.len(), "{stored} keys in etcd");
            took
        })
    })
    .expect("entering the underlay namespace")
}

/// The trellisd process (under `ip netns exec`, which execs it in place, or a `--wrap` command
/// that forks it): SIGTERM when dropped, SIGKILL if it lingers.
struct Daemon {
    child: Child,
    pid: u32,
}

impl Daemon {
    fn spawn(node: &Netns, o: &Opts, args: &[String], log: &Path) -> Daemon {
        let log = std::fs::File::create(log).expect("daemon log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.name]);
        if let Some((prog, rest)) = o.wrap.split_first() {
            cmd.arg(prog).args(rest);
        }
        let mut child = cmd
            .arg(&o.trellisd)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            // tracing's fmt subscriber writes to stdout.
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .expect("run trellisd");
        let t = Instant::now();
        let pid = loop {
            if let Some(pid) = find_named(child.id(), "trellisd") {
                break pid;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("trellisd exited at once: {status}");
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no trellisd process after 10 s");
            std::thread::sleep(Duration::from_millis(1));
        };
        Daemon { child, pid }
    }

    /// A field of `/proc/PID/status` in kB (`VmHWM`, `VmRSS`).
    fn status_kb(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// CPU time in user and kernel mode.
    fn cpu(&self) -> (Duration, Duration) {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let t = |i: usize| Duration::from_secs_f64(f.get(i).copied().unwrap_or(0) as f64 / hz);
        (t(11), t(12))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process this benchmark started.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid` or a descendant of it whose command name is `name`.
fn find_named(pid: u32, name: &str) -> Option<u32> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() == name {
        return Some(pid);
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .find_map(|c| find_named(c, name))
}

/// `/metrics` of the daemon in the node namespace.
fn metrics(node: &Netns) -> String {
    trellis_net::netns::run_in(node.path(), || {
        let mut s = TcpStream::connect("127.0.0.1:9909").ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// When a log line was written (tracing's `2025-11-23T12:33:00.123456Z`).
fn log_time(line: &str) -> Option<SystemTime> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min, s) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days as u64 * 86_400 + h * 3600 + min * 60;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_secs_f64(s))
}

/// The time of the first log line containing `what`, from `t0`.
fn mark(log: &str, t0: SystemTime, what: &str) -> Option<Duration> {
    let line = log.lines().find(|l| l.contains(what))?;
    log_time(line)?.duration_since(t0).ok()
}

/// Runs `work` and times it from its start until the node namespace holds `target` of each
/// object (polled from a thread inside it, so that `/proc/thread-self/net` and the netlink
/// socket are the node's); `Err` with the counts reached when `timeout` passes first. The FIB
/// must first grow by `grow` prefixes: that cheap read gates the exact netlink counts.
fn timed<T>(
    node: &Netns,
    grow: usize,
    target: usize,
    timeout: Duration,
    work: impl FnOnce() -> T,
) -> (Result<Duration, Counts>, T) {
    std::thread::scope(|scope| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<Instant>();
        let poller = scope.spawn(move || {
            trellis_net::netns::run_in(node.path(), move || {
                let base = fib_prefixes();
                let rt = runtime();
                let nl = rt.block_on(async { Netlink::connect() }).expect("netlink");
                ready_tx.send(()).expect("ready");
                let t0 = go_rx.recv().expect("start signal");
                loop {
                    let now = t0.elapsed();
                    if now > timeout {
                        return Err(rt.block_on(counts(&nl)));
                    }
                    if fib_prefixes() >= base + grow && rt.block_on(counts(&nl)) == Counts::all(target) {
                        return Ok(now);
                    }
                    std::thread::sleep(POLL);
                }
            })
            .expect("entering the node namespace")
        });
        ready_rx.recv().expect("poller ready");
        let t0 = Instant::now();
        let _ = go_tx.send(t0);
        let out = work();
        (poller.join().expect("poller"), out)
    })
}

/// One trellisd trial.
struct Trial {
    converged: Duration,
    hwm_kb: u64,
    cpu_user: Duration,
    cpu_sys: Duration,
    load: Duration,
    /// From the log: process up, lease claimed, lease in place, first reconcile that added objects.
    started: Option<Duration>,
    claimed: Option<Duration>,
    own: Option<Duration>,
    reconciled: Option<Duration>,
    reconcile_runs: f64,
    reconcile_seconds: f64,
    /// `--then-add`: from writing the new records until the kernel held them.
    joined: Option<Duration>,
}

fn trellisd_trial(o: &Opts, remotes: &[Remote], run: usize, mode: Mode) -> Trial {
    let n = remotes.len();
    // Dropped in this order: the daemon and etcd before the namespaces they run in.
    let dir = TempDir::new(DIR);
    let Topology { underlay, nodes, .. } =
        Topology::new(TOPOLOGY_TAG, 1, Spec::v4("172.31.0").v4_len(16).default_route());
    let node = nodes.into_iter().next().expect("one node");
    assert_eq!(node_address(&node), NODE_IP);
    let etcd = Etcd::start_in(&underlay, ETCD_IP, dir.path());
    let load = load_etcd(&underlay, remotes);

    let conf = dir.path().join("net-conf.json");
    std::fs::write(&conf, NET_CONF).expect("write net-conf");
    let path = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let args: Vec<String> = [
        "--node-name",
        "bench-node",
        "--net-conf",
        &path("net-conf.json"),
        "--etcd-endpoints",
        &format!("http://{ETCD_IP}:2379"),
        "--state-dir",
        &path("state"),
        "--cni-conf",
        &path("10-trellis.conflist"),
        "--ipam-data-dir",
        &path("ipam"),
        "--no-hostport",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((mode == Mode::Plain).then(|| "--no-nexthop-objects".to_string()))
    .chain(o.daemon_args.iter().cloned())
    .collect();
    let log_path = dir.path().join("trellisd.log");

    let wall0 = SystemTime::now();
    let (converged, daemon) = timed(&node, n, n, o.timeout, || Daemon::spawn(&node, o, &args, &log_path));
    let converged = converged.unwrap_or_else(|got| {
        panic!(
            "trellisd did not converge in {:?} (the kernel holds {got:?} of {n} each); its log:\n{}",
            o.timeout,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    });
    let t0 = wall0;
    let (cpu_user, cpu_sys) = daemon.cpu();
    // Nodes joining a converged cluster: more records while the daemon runs.
    let joined = (o.then_add > 0).then(|| {
        let more: Vec<Remote> = (n + 1..=n + o.then_add).map(remote).collect();
        let (took, _) = timed(&node, o.then_add, n + o.then_add, o.timeout, || {
            load_etcd(&underlay, &more)
        });
        took.unwrap_or_else(|got| {
            panic!(
                "trellisd did not program {} joining nodes in {:?} (the kernel holds {got:?}); its log:\n{}",
                o.then_add,
                o.timeout,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })
    });
    // Let any follow-up reconcile run (kernel notifications, the first resync) before reading
    // the peak RSS and the metrics.
    std::thread::sleep(o.settle);
    let hwm_kb = daemon.status_kb("VmHWM").unwrap_or(0);
    let m = metrics(&node);
    drop(daemon);
    drop(etcd);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    if let Some(keep) = &o.keep_logs {
        std::fs::create_dir_all(keep).expect("--keep-logs dir");
        let tag = format!("{n}-{}-{run}", mode.name());
        std::fs::write(keep.join(format!("trellisd-{tag}.log")), &log).expect("keep log");
        std::fs::write(keep.join(format!("metrics-{tag}.txt")), &m).expect("keep metrics");
    }
    let reconciled = log
        .lines()
        .find(|l| l.contains("reconciled the dataplane") && !l.contains("added=0"))
        .and_then(log_time)
        .and_then(|t| t.duration_since(t0).ok());
    Trial {
        converged,
        hwm_kb,
        cpu_user,
        cpu_sys,
        load,
        started: mark(&log, t0, "starting"),
        claimed: mark(&log, t0, "etcd: holding pod CIDRs"),
        own: mark(&log, t0, "this node's lease is in place"),
        reconciled,
        reconcile_runs: metric(&m, "trellisd_reconcile_runs_total").unwrap_or(f64::NAN),
        reconcile_seconds: metric(&m, "trellisd_reconcile_seconds_sum").unwrap_or(f64::NAN),
        joined,
    }
}

/// The node's IPv4 underlay address, as the topology gave it.
fn node_address(node: &Netns) -> String {
    let out = node.ip(&["-4", "-o", "addr", "show", "dev", "ul0"]);
    let word = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_default();
    word.split('/').next().unwrap_or_default().to_string()
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "—".into(), secs)
}

fn med(xs: impl Iterator<Item = Duration>) -> Duration {
    Duration::from_secs_f64(median(xs.map(|d| d.as_secs_f64()).collect()))
}

fn med_opt(xs: impl Iterator<Item = Option<Duration>>) -> Option<Duration> {
    let v: Option<Vec<Duration>> = xs.collect();
    v.map(|v| med(v.into_iter()))
}

/// One N's figures: per mode, the `ip -batch` median and the trellisd trials.
struct Row {
    n: usize,
    modes: Vec<(Mode, Duration, Vec<Trial>)>,
}

fn main() {
    trellis_tests::require_root();
    let o = opts();
    cleanup::on_panic(&[UNDERLAY_NS, NODE_NS, BATCH_NS], &[DIR]);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "trellisd convergence vs ip -batch — VXLAN, N remote nodes in etcd before the daemon starts, \
         {} run(s) per N, {cpus} CPUs; routes by nexthop object (trellisd's default) and plain",
        o.runs
    );
    let mut rows = Vec::new();
    for &n in &o.nodes {
        let remotes: Vec<Remote> = (1..=n).map(remote).collect();
        let mut row = Row { n, modes: Vec::new() };
        for &mode in &o.modes {
            let mut batch = Vec::new();
            let mut trials = Vec::new();
            for run in 0..o.runs {
                let dir = TempDir::new(DIR);
                batch.push(ip_batch(&remotes, dir.path(), mode));
                drop(dir);
                trials.push(trellisd_trial(&o, &remotes, run, mode));
            }
            row.modes.push((mode, med(batch.into_iter()), trials));
        }
        rows.push(row);
    }

    println!(
        "{:>7}  {:<9}{:>11}{:>12}{:>8}{:>10}{:>12}{:>12}",
        "N", "routes", "trellisd", "ip -batch", "ratio", "µs/node", "batch µs/n", "peak RSS"
    );
    for row in &rows {
        for (mode, batch, trials) in &row.modes {
            let conv = med(trials.iter().map(|t| t.converged));
            let hwm = median(trials.iter().map(|t| t.hwm_kb as f64).collect());
            println!(
                "{:>7}  {:<9}{:>11}{:>12}{:>7.1}×{:>10.1}{:>12.1}{:>8.1} MiB",
                row.n,
                mode.name(),
                secs(conv),
                secs(*batch),
                conv.as_secs_f64() / batch.as_secs_f64(),
                conv.as_secs_f64() * 1e6 / row.n as f64,
                batch.as_secs_f64() * 1e6 / row.n as f64,
                hwm / 1024.0
            );
        }
        let conv = |m| {
            row.modes
                .iter()
                .find(|(mode, ..)| *mode == m)
                .map(|(_, batch, t)| (med(t.iter().map(|t| t.converged)), *batch))
        };
        if let (Some((nh, _)), Some((_, plain_batch))) = (conv(Mode::Nexthops), conv(Mode::Plain)) {
            println!(
                "{:>7}  trellisd with nexthops / ip -batch with plain routes: {:.2}×",
                row.n,
                nh.as_secs_f64() / plain_batch.as_secs_f64()
            );
        }
    }
    println!("\nWhere trellisd's time goes (from its start; medians; log timestamps, /metrics, /proc):");
    println!(
        "{:>7}  {:<9}{:>9}{:>10}{:>10}{:>12}{:>11}{:>10}{:>10}{:>7}{:>10}{:>12}",
        "N",
        "routes",
        "up",
        "claimed",
        "own set",
        "reconciled",
        "converged",
        "CPU usr",
        "CPU sys",
        "runs",
        "recon. s",
        format!("+{} join", o.then_add)
    );
    for row in &rows {
        for (mode, _, trials) in &row.modes {
            println!(
                "{:>7}  {:<9}{:>9}{:>10}{:>10}{:>12}{:>11}{:>10}{:>10}{:>7}{:>10.3}{:>12}",
                row.n,
                mode.name(),
                opt_secs(med_opt(trials.iter().map(|t| t.started))),
                opt_secs(med_opt(trials.iter().map(|t| t.claimed))),
                opt_secs(med_opt(trials.iter().map(|t| t.own))),
                opt_secs(med_opt(trials.iter().map(|t| t.reconciled))),
                secs(med(trials.iter().map(|t| t.converged))),
                secs(med(trials.iter().map(|t| t.cpu_user))),
                secs(med(trials.iter().map(|t| t.cpu_sys))),
                median(trials.iter().map(|t| t.reconcile_runs).collect()),
                median(trials.iter().map(|t| t.reconcile_seconds).collect()),
                opt_secs(med_opt(trials.iter().map(|t| t.joined))),
            );
        }
    }
    println!(
        "up: process running (underlay found); claimed: its own CIDR claimed in etcd (reads every \
         record); own set: VTEP address, masquerade; reconciled: the reconcile that programmed the \
         remotes logged; CPU: the daemon's at convergence; runs / recon. s: reconcile runs and \
         their total seconds from /metrics at the end ({} s after convergence and joins); +K join: \
         K more nodes written to etcd after convergence, until the kernel held them \
         (--then-add K). Loading etcd took {} for the largest N (not counted).",
        o.settle.as_secs(),
        rows.last()
            .and_then(|r| r.modes.first())
            .map_or_else(|| "—".into(), |(_, _, t)| secs(med(t.iter().map(|t| t.load))))
    );
}
