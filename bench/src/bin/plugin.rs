//! The `trellis` plugin (+ trellis-ipam) next to the reference `bridge` (+ host-local), on the same
//! work, in one run, both with `ipMasq: true`: serial ADD and DEL latency (median, p95) with a
//! fresh pod namespace per iteration, the wall time of concurrent ADDs, and whether ADDs slow down
//! as pods pile up. trellis `mode: routed` is measured too, as an extra column.
//!
//! Everything happens in "node" namespaces made by the benchmark (one per side, so bridges,
//! veths and firewall rules never touch the root namespace); plugins run as
//! `ip netns exec NODE <plugin>`, whose cost is printed once so that readers can subtract it.
//!
//! Run (as root): `cargo build --release -p trellis -p trellis-ipam -p trellis-bench &&
//! target/release/plugin`
//! Options: `--iterations N` (default 100), `--concurrent N` (default 50), `--pods N` (default
//! 200), `--trellis PATH`, `--trellis-ipam PATH`, `--bridge PATH`, `--host-local PATH`.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_bench::{ms, ratio, Stats};
use trellis_tests::{CniCall, CniOutput, Netns, TempDir};

/// Name prefixes of what the benchmark creates (namespaces, temp dirs), for the panic clean-up.
const NODE: &str = "bnode";
const POD: &str = "bpod";
const DIR: &str = "bench";

struct Opts {
    iterations: usize,
    concurrent: usize,
    pods: usize,
    trellis: PathBuf,
    trellis_ipam: PathBuf,
    bridge: PathBuf,
    host_local: PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        iterations: 100,
        concurrent: 50,
        pods: 200,
        trellis: PathBuf::from("target/release/trellis"),
        trellis_ipam: PathBuf::from("target/release/trellis-ipam"),
        bridge: PathBuf::from("/usr/lib/cni/bridge"),
        host_local: PathBuf::from("/usr/lib/cni/host-local"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--iterations" => o.iterations = v.parse().expect("--iterations N"),
            "--concurrent" => o.concurrent = v.parse().expect("--concurrent N"),
            "--pods" => o.pods = v.parse().expect("--pods N"),
            "--trellis" => o.trellis = v.into(),
            "--trellis-ipam" => o.trellis_ipam = v.into(),
            "--bridge" => o.bridge = v.into(),
            "--host-local" => o.host_local = v.into(),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        o.iterations > 0 && o.concurrent > 0 && o.pods > 0,
        "counts must be positive"
    );
    for p in [&mut o.trellis, &mut o.trellis_ipam, &mut o.bridge, &mut o.host_local] {
        // Absolute, because the plugins run under `ip netns exec` and exec their IPAM by CNI_PATH.
        *p = p.canonicalize().unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo build --release -p trellis -p trellis-ipam; \
                 apt-get install containernetworking-plugins)",
                p.display()
            )
        });
    }
    // The IPAM plugin must sit next to the main plugin: CNI_PATH is the main plugin's folder.
    assert_eq!(
        o.trellis.parent(),
        o.trellis_ipam.parent(),
        "trellis-ipam must be next to trellis"
    );
    assert_eq!(
        o.bridge.parent(),
        o.host_local.parent(),
        "host-local must be next to bridge"
    );
    o
}

/// One plugin under test, in its own node namespace with its own store.
struct Side {
    plugin: PathBuf,
    conf: Value,
    // Dropped in this order: the namespace (bridge, veths, rules), then the store.
    node: Netns,
    _dir: TempDir,
}

impl Side {
    fn new(plugin: &Path, conf: Value, ipam_dir: TempDir) -> Side {
        Side {
            plugin: plugin.to_path_buf(),
            conf,
            node: Netns::new(NODE),
            _dir: ipam_dir,
        }
    }

    fn call(&self, verb: &str, pod: &Netns) -> CniCall {
        CniCall::new(&self.plugin, verb, self.conf.clone())
            .container(&pod.name)
            .netns(pod.path())
            .exec_in_netns(&self.node.name)
    }
}

fn trellis_side(o: &Opts, mode: &str, subnet: &str) -> Side {
    let dir = TempDir::new(DIR);
    let conf = json!({"cniVersion": "1.0.0", "name": "benchtr", "type": "trellis", "mode": mode,
        "bridge": "trbr0", "isGateway": true, "isDefaultGateway": true, "ipMasq": true, "mtu": 1450,
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": subnet}]], "dataDir": dir.path()}});
    Side::new(&o.trellis, conf, dir)
}

fn reference_side(o: &Opts) -> Side {
    let dir = TempDir::new(DIR);
    let conf = json!({"cniVersion": "1.0.0", "name": "benchref", "type": "bridge",
        "bridge": "refbr0", "isGateway": true, "isDefaultGateway": true, "ipMasq": true, "mtu": 1450,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.91.0.0/16"}]],
                 "dataDir": dir.path()}});
    Side::new(&o.bridge, conf, dir)
}

fn must(out: &CniOutput, what: &str) {
    assert_eq!(out.exit_code, 0, "{what} failed: {} {}", out.stdout, out.stderr);
}

fn timed(call: &CniCall, what: &str) -> Duration {
    let t = Instant::now();
    let out = call.run();
    let d = t.elapsed();
    must(&out, what);
    d
}

struct Figures {
    add: Stats,
    del: Stats,
    concurrent: Duration,
    /// `None` when every concurrent ADD succeeded with a distinct address, else what went wrong.
    concurrent_problem: Option<String>,
    first: Stats,
    last: Stats,
}

fn measure(side: &Side, o: &Opts) -> Figures {
    // Warm up: the first ADD creates the bridge and the masquerade rules, and fills page caches.
    let warm = Netns::new(POD);
    must(&side.call("ADD", &warm).run(), "warm-up ADD");
    must(&side.call("DEL", &warm).run(), "warm-up DEL");
    drop(warm);

    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for _ in 0..o.iterations {
        let pod = Netns::new(POD);
        adds.push(timed(&side.call("ADD", &pod), "ADD"));
        dels.push(timed(&side.call("DEL", &pod), "DEL"));
    }

    let pods: Vec<Netns> = (0..o.concurrent).map(|_| Netns::new(POD)).collect();
    let t = Instant::now();
    let children: Vec<_> = pods.iter().map(|p| side.call("ADD", p).spawn()).collect();
    let outs: Vec<CniOutput> = children.into_iter().map(CniOutput::from_child).collect();
    let concurrent = t.elapsed();
    let failed: Vec<&CniOutput> = outs.iter().filter(|out| out.exit_code != 0).collect();
    let concurrent_problem = if let Some(f) = failed.first() {
        Some(format!(
            "{} failed, e.g. {} {}",
            failed.len(),
            f.stdout.trim(),
            f.stderr.trim()
        ))
    } else {
        let ips: Vec<String> = outs.iter().flat_map(CniOutput::ips).collect();
        let distinct = ips.iter().collect::<HashSet<_>>().len();
        (distinct != o.concurrent || ips.len() != o.concurrent)
            .then(|| format!("{} addresses, {distinct} distinct", ips.len()))
    };
    for p in &pods {
        must(&side.call("DEL", p).run(), "DEL after the concurrent ADDs");
    }
    drop(pods);

    let mut pods = Vec::new();
    let mut pile = Vec::new();
    for _ in 0..o.pods {
        let pod = Netns::new(POD);
        pile.push(timed(&side.call("ADD", &pod), "ADD of a pod in a row"));
        pods.push(pod);
    }
    for p in &pods {
        must(&side.call("DEL", p).run(), "DEL after the pods in a row");
    }
    let k = pile.len().min(20);
    Figures {
        add: Stats::of(adds),
        del: Stats::of(dels),
        concurrent,
        concurrent_problem,
        first: Stats::of(pile[..k].to_vec()),
        last: Stats::of(pile[pile.len() - k..].to_vec()),
    }
}

/// Median time to start `argv` (waited for), `n` times.
fn spawn_cost(argv: &[&str], n: usize) -> Duration {
    let samples = (0..n)
        .map(|_| {
            let t = Instant::now();
            let ok = Command::new(argv[0])
                .args(&argv[1..])
                .status()
                .expect("spawn")
                .success();
            assert!(ok, "{argv:?} failed");
            t.elapsed()
        })
        .collect();
    Stats::of(samples).median
}

/// The release profile aborts on panic, so guards do not drop: delete this run's namespaces
/// (and with them every bridge, veth and rule the plugins made) and temp dirs from the hook.
fn clean_up_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let tag = format!("{:x}-", std::process::id() & 0xfffff);
        let ours = |name: &str, prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(&format!("{p}{tag}")));
        for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours(&name, &[POD, NODE]) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ours(&name, &[&format!("trellis-{DIR}-")]) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }));
}

fn main() {
    trellis_tests::require_root();
    let o = opts();
    clean_up_on_panic();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "trellis + trellis-ipam vs bridge + host-local (ipMasq) — {} serial ADD+DEL, {} concurrent \
         ADDs, {} pods in a row, {cpus} CPUs",
        o.iterations, o.concurrent, o.pods
    );

    let (exec_cost, true_cost) = {
        let node = Netns::new(NODE);
        (
            spawn_cost(&["ip", "netns", "exec", &node.name, "/bin/true"], 100),
            spawn_cost(&["/bin/true"], 100),
        )
    };
    let reference = reference_side(&o);
    let theirs = measure(&reference, &o);
    drop(reference);
    let bridged = trellis_side(&o, "bridge", "10.90.0.0/16");
    let ours = measure(&bridged, &o);
    drop(bridged);
    let routed_side = trellis_side(&o, "routed", "10.92.0.0/16");
    let routed = measure(&routed_side, &o);
    drop(routed_side);

    println!(
        "{:<30}{:>12}{:>12}{:>8}{:>16}",
        "", "trellis", "reference", "ratio", "trellis routed"
    );
    let row = |name: &str, a: Duration, b: Duration, r: Duration| {
        println!("{name:<30}{:>12}{:>12}{:>8}{:>16}", ms(a), ms(b), ratio(a, b), ms(r))
    };
    row("ADD median", ours.add.median, theirs.add.median, routed.add.median);
    row("ADD p95", ours.add.p95, theirs.add.p95, routed.add.p95);
    row("DEL median", ours.del.median, theirs.del.median, routed.del.median);
    row("DEL p95", ours.del.p95, theirs.del.p95, routed.del.p95);
    row(
        &format!("{} concurrent ADDs (wall)", o.concurrent),
        ours.concurrent,
        theirs.concurrent,
        routed.concurrent,
    );
    let verdict = |f: &Figures| if f.concurrent_problem.is_none() { "yes" } else { "NO" };
    println!(
        "{:<30}{:>12}{:>12}{:>8}{:>16}",
        "  all succeeded, distinct",
        verdict(&ours),
        verdict(&theirs),
        "",
        verdict(&routed)
    );
    let k = o.pods.min(20);
    row(
        &format!("ADD median, pods 1–{k}"),
        ours.first.median,
        theirs.first.median,
        routed.first.median,
    );
    row(
        &format!("ADD median, pods {}–{}", o.pods - k + 1, o.pods),
        ours.last.median,
        theirs.last.median,
        routed.last.median,
    );
    println!(
        "Every figure includes `ip netns exec NODE` (median {}; /bin/true alone {}) and the \
         plugin's own start.",
        ms(exec_cost),
        ms(true_cost)
    );
    for (name, f) in [("trellis", &ours), ("reference", &theirs), ("trellis routed", &routed)] {
        if let Some(p) = &f.concurrent_problem {
            println!("{name}, concurrent ADDs: {p}");
        }
    }
    assert!(ours.concurrent_problem.is_none(), "trellis failed the concurrent ADDs");
    assert!(
        routed.concurrent_problem.is_none(),
        "trellis routed failed the concurrent ADDs"
    );
}
