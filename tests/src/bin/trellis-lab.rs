//! `./lab up`'s engine: the test harness's own cluster (`trellis_tests::cluster`, on the one
//! test topology), held up until SIGTERM or SIGINT, then taken down by the same guards that
//! clean up after a test. `./lab` is a thin shell script over it.
//!
//! ```text
//! trellis-lab up --state DIR --net-conf FILE [--nodes N] [--pods P] [--datastore etcd|kube]
//!                [--underlay v4|dual|v6] [--bin DIR] [-- TRELLISD_ARGS...]
//! ```
//!
//! Once every pod is wired it writes `DIR/pods.json` (`{"pods": [{name, node, netns, ips}]}`)
//! and `DIR/cluster` (the folder with each node's `trellisd.log` and CNI config), and waits.
//! Its namespaces are named `trl…` so that `./lab down` can remove what a crashed lab left.

use serde_json::{json, Value};
use std::path::PathBuf;
use trellis_tests::cluster::{Cluster, Options, Stack};

/// The namespaces' prefix (see `./lab down`).
const TAG: &str = "trl";

struct Args {
    state: PathBuf,
    net_conf: PathBuf,
    nodes: usize,
    pods: usize,
    kube: bool,
    underlay: Stack,
    bin: PathBuf,
    daemon_args: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: trellis-lab up --state DIR --net-conf FILE [--nodes N] [--pods P] [--datastore etcd|kube] \
         [--underlay v4|dual|v6] [--bin DIR] [-- TRELLISD_ARGS...]"
    );
    std::process::exit(2)
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    if it.next().as_deref() != Some("up") {
        usage();
    }
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let mut a = Args {
        state: PathBuf::new(),
        net_conf: PathBuf::new(),
        nodes: 3,
        pods: 2,
        kube: false,
        underlay: Stack::DualStack,
        bin: here,
        daemon_args: Vec::new(),
    };
    while let Some(flag) = it.next() {
        if flag == "--" {
            a.daemon_args = it.by_ref().collect();
            break;
        }
        let Some(value) = it.next() else { usage() };
        match flag.as_str() {
            "--state" => a.state = value.into(),
            "--net-conf" => a.net_conf = value.into(),
            "--nodes" => a.nodes = value.parse().unwrap_or_else(|_| usage()),
            "--pods" => a.pods = value.parse().unwrap_or_else(|_| usage()),
            "--bin" => a.bin = value.into(),
            "--underlay" => {
                a.underlay = match value.as_str() {
                    "v4" => Stack::V4,
                    "dual" => Stack::DualStack,
                    "v6" => Stack::V6Only,
                    _ => usage(),
                }
            }
            "--datastore" => {
                a.kube = match value.as_str() {
                    "etcd" => false,
                    "kube" => true,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    if a.state.as_os_str().is_empty() || a.net_conf.as_os_str().is_empty() || a.nodes == 0 {
        usage();
    }
    a
}

fn main() {
    let a = parse();
    let signals = trellis_tests::Signals::block();
    let net_conf =
        std::fs::read_to_string(&a.net_conf).unwrap_or_else(|e| panic!("reading {}: {e}", a.net_conf.display()));
    let conf: Value = serde_json::from_str(&net_conf).expect("net-conf is JSON");
    let v6 = conf["EnableIPv6"].as_bool().unwrap_or(false);
    // The Node objects as kube-controller-manager would have made them: one /24 (and /64) each.
    let v4 = conf["EnableIPv4"].as_bool().unwrap_or(true);
    let kube = a.kube.then(|| {
        (1..=a.nodes)
            .map(|n| {
                let mut cidrs = Vec::new();
                if v4 {
                    cidrs.push(format!("10.244.{n}.0/24"));
                }
                if v6 {
                    cidrs.push(format!("fd00:244:0:{n}::/64"));
                }
                cidrs
            })
            .collect()
    });
    let options = Options {
        kube,
        tag: Some(TAG.into()),
        underlay: a.underlay,
        ..Options::default()
    };
    let daemon_args: Vec<&str> = a.daemon_args.iter().map(String::as_str).collect();
    let trellisd = trellis_tests::cluster::trellisd_with_plugins(&a.bin.join("trellisd").to_string_lossy());
    let mut c = Cluster::with_options(a.nodes, &net_conf, &trellisd, &daemon_args, options);
    let mut pods = Vec::new();
    for node in 0..a.nodes {
        for p in 1..=a.pods {
            let i = c.add_pod(node);
            let pod = &c.pods[i];
            pods.push(json!({
                "name": format!("pod{p}"),
                "node": c.nodes[node].name,
                "netns": pod.ns.path(),
                "ips": pod.ips,
            }));
        }
    }
    std::fs::create_dir_all(&a.state).expect("state folder");
    std::fs::write(a.state.join("cluster"), c.dir.path().to_string_lossy().as_bytes()).expect("write cluster");
    std::fs::write(
        a.state.join("pods.json"),
        serde_json::to_string(&json!({ "pods": pods })).expect("JSON"),
    )
    .expect("write pods.json");
    let signal = signals.wait();
    eprintln!("trellis-lab: signal {signal}: taking the cluster down");
    drop(c);
}
