//! trellis-ipam next to the reference host-local, on the same work, in one run:
//! serial ADD and DEL latency (median, p95) and the wall time of concurrent ADDs.
//!
//! Run: `cargo build --release -p trellis-ipam && cargo run --release -p trellis-bench --bin ipam`
//! Options: `--iterations N` (default 200), `--concurrent N` (default 100),
//! `--trellis PATH`, `--host-local PATH`.

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trellis_bench::{ms, ratio, Stats};
use trellis_tests::{CniCall, CniOutput, TempDir};

struct Opts {
    iterations: usize,
    concurrent: usize,
    trellis: PathBuf,
    host_local: PathBuf,
}

fn opts() -> Opts {
    let mut o = Opts {
        iterations: 200,
        concurrent: 100,
        trellis: PathBuf::from("target/release/trellis-ipam"),
        host_local: PathBuf::from("/usr/lib/cni/host-local"),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--iterations" => o.iterations = v.parse().expect("--iterations N"),
            "--concurrent" => o.concurrent = v.parse().expect("--concurrent N"),
            "--trellis" => o.trellis = v.into(),
            "--host-local" => o.host_local = v.into(),
            other => panic!("unknown option {other}"),
        }
    }
    for p in [&o.trellis, &o.host_local] {
        assert!(
            p.exists(),
            "{} is missing (build with --release; apt-get install containernetworking-plugins)",
            p.display()
        );
    }
    o
}

fn conf(ty: &str, dir: &Path) -> Value {
    json!({"cniVersion": "0.4.0", "name": "bench", "type": "bridge",
           "ipam": {"type": ty, "dataDir": dir, "ranges": [[{"subnet": "10.128.0.0/16"}]]}})
}

fn timed(call: &CniCall) -> Duration {
    let t = Instant::now();
    let out = call.run();
    let d = t.elapsed();
    out.ok();
    d
}

struct Figures {
    add: Stats,
    del: Stats,
    concurrent: Duration,
    distinct: bool,
}

fn measure(plugin: &Path, ty: &str, o: &Opts) -> Figures {
    let dir = TempDir::new("bench");
    let conf = conf(ty, dir.path());
    // Warm the page cache and the store.
    CniCall::new(plugin, "ADD", conf.clone())
        .container("warm")
        .netns("/x")
        .run()
        .ok();
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..o.iterations {
        let id = format!("serial{i}");
        adds.push(timed(
            &CniCall::new(plugin, "ADD", conf.clone()).container(&id).netns("/x"),
        ));
        dels.push(timed(
            &CniCall::new(plugin, "DEL", conf.clone()).container(&id).netns("/x"),
        ));
    }
    let t = Instant::now();
    let children: Vec<_> = (0..o.concurrent)
        .map(|i| {
            CniCall::new(plugin, "ADD", conf.clone())
                .container(&format!("conc{i}"))
                .netns("/x")
                .spawn()
        })
        .collect();
    let outs: Vec<CniOutput> = children.into_iter().map(CniOutput::from_child).collect();
    let concurrent = t.elapsed();
    let ips: Vec<String> = outs.iter().flat_map(|o| o.ips()).collect();
    let distinct = ips.iter().collect::<HashSet<_>>().len() == o.concurrent && ips.len() == o.concurrent;
    Figures {
        add: Stats::of(adds),
        del: Stats::of(dels),
        concurrent,
        distinct,
    }
}

fn main() {
    let o = opts();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "trellis-ipam vs host-local — {} serial ADD+DEL, {} concurrent ADDs, {cpus} CPUs",
        o.iterations, o.concurrent
    );
    let theirs = measure(&o.host_local, "host-local", &o);
    let ours = measure(&o.trellis, "trellis-ipam", &o);
    println!("{:<28}{:>14}{:>14}{:>10}", "", "trellis-ipam", "host-local", "ratio");
    let row =
        |name: &str, a: Duration, b: Duration| println!("{name:<28}{:>14}{:>14}{:>10}", ms(a), ms(b), ratio(a, b));
    row("ADD median", ours.add.median, theirs.add.median);
    row("ADD p95", ours.add.p95, theirs.add.p95);
    row("DEL median", ours.del.median, theirs.del.median);
    row("DEL p95", ours.del.p95, theirs.del.p95);
    row(
        &format!("{} concurrent ADDs (wall)", o.concurrent),
        ours.concurrent,
        theirs.concurrent,
    );
    println!(
        "{:<28}{:>14}{:>14}",
        "all addresses distinct",
        if ours.distinct { "yes" } else { "NO" },
        if theirs.distinct { "yes" } else { "NO" }
    );
    assert!(ours.distinct, "trellis-ipam handed out a duplicate address");
    let _ = (ours.add.n, theirs.del.n);
}
