//! Shared by the benchmarks: timing statistics, table printing, and measuring between pods.

use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;
use trellis_tests::cluster::Proc;
use trellis_tests::Netns;

/// Median and 95th percentile of a set of samples.
pub struct Stats {
    pub median: Duration,
    pub p95: Duration,
    pub n: usize,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Stats {
            median: at(0.5),
            p95: at(0.95),
            n: samples.len(),
        }
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// `ours / theirs` as a percentage, for "at most half" style targets.
pub fn ratio(ours: Duration, theirs: Duration) -> String {
    format!("{:.0}%", 100.0 * ours.as_secs_f64() / theirs.as_secs_f64())
}

/// Clean-up for benchmarks that start processes inside namespaces they make.
///
/// The release profile aborts on panic, so guards do not drop. The hook installed here kills
/// every process living in one of this run's namespaces (etcd, trellisd, iperf3: found by their
/// network namespace, not by name), then deletes those namespaces and this run's temp dirs.
/// "This run's" means named by [`trellis_tests::unique_name`] in this process: `<prefix><tag>`.
pub mod cleanup {
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::Command;

    /// What `unique_name` puts after the prefix in this process: its PID in hex and a dash.
    pub fn tag() -> String {
        format!("{:x}-", std::process::id() & 0xfffff)
    }

    /// This run's namespaces (names under `/run/netns` with one of `prefixes` followed by the tag).
    pub fn our_namespaces(prefixes: &[&str]) -> Vec<String> {
        let tag = tag();
        std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| prefixes.iter().any(|p| n.starts_with(&format!("{p}{tag}"))))
            .collect()
    }

    /// SIGKILLs every process whose network namespace is one of `names` (under `/run/netns`).
    pub fn kill_processes_in(names: &[String]) {
        let inodes: Vec<u64> = names
            .iter()
            .filter_map(|n| std::fs::metadata(Path::new("/run/netns").join(n)).ok())
            .map(|m| m.ino())
            .collect();
        let me = std::process::id();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(link) = std::fs::read_link(e.path().join("ns/net")) else {
                continue;
            };
            // "net:[4026532890]"
            let ino = link
                .to_string_lossy()
                .trim_start_matches("net:[")
                .trim_end_matches(']')
                .parse::<u64>();
            if ino.is_ok_and(|i| inodes.contains(&i)) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }

    /// Installs the hook: processes in this run's namespaces with `ns_prefixes`, the namespaces,
    /// then the temp dirs `trellis-<dir_prefix><tag>…` are removed after the panic is reported.
    pub fn on_panic(ns_prefixes: &'static [&'static str], dir_prefixes: &'static [&'static str]) {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            let names = our_namespaces(ns_prefixes);
            kill_processes_in(&names);
            // Let the killed processes go before their namespaces and files.
            std::thread::sleep(std::time::Duration::from_millis(200));
            for n in &names {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
            let tag = tag();
            let tmp = std::env::temp_dir();
            for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dir_prefixes
                    .iter()
                    .any(|p| name.starts_with(&format!("trellis-{p}-{tag}")))
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }));
    }
}

/// The middle value (the upper one of the two middles for an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    assert!(!xs.is_empty(), "no samples");
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A `current_thread` runtime with IO and timers, for the benchmarks' netlink work.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The calling thread's namespace's main-table prefix count (cheap: no dump).
pub fn fib_prefixes() -> usize {
    let text = std::fs::read_to_string("/proc/thread-self/net/fib_triestat").expect("fib_triestat");
    let main = text.split("Main:").nth(1).unwrap_or_default();
    main.lines()
        .find_map(|l| l.trim().strip_prefix("Prefixes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Pings `to` from `from` until it answers (up to 10 s).
pub fn reachable(from: &Netns, to: &str) -> bool {
    (0..20).any(|_| from.exec(&["ping", "-c", "1", "-W", "1", to]).status.success())
}

/// One iperf3 measurement from `client` to `server` (at `ip`), in Gbit/s (receiver side).
pub fn iperf(client: &Netns, server: &Netns, ip: &str, seconds: u32) -> f64 {
    let _server = Proc {
        child: Command::new("ip")
            .args(["netns", "exec", &server.name, "iperf3", "-s", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)"),
    };
    let t = seconds.to_string();
    let mut last = String::new();
    for _ in 0..50 {
        let out = client.exec(&["iperf3", "-c", ip, "-t", &t, "-J"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        // The server may not listen yet.
        last = format!("{} {}", v["error"], String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("iperf3 to {ip} failed: {last}");
}
