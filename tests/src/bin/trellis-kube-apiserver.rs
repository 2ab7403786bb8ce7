//! `trellis-kube-apiserver`: the stand-in Kubernetes API server of the test harness
//! (`trellis_tests::kube_apiserver`) as a process, to point `kubectl` or a hand-started
//! `trellisd` at (`./lab up --datastore kube` runs the same server in-process). It is not a
//! cluster: Nodes only, kept in memory, gone when it
//! exits.
//!
//! ```text
//! trellis-kube-apiserver --listen IP:PORT --dir DIR [--node NAME=CIDR[,CIDR][@INTERNAL_IP]]... [--verbose]
//! ```
//!
//! Creates the given Nodes with their pod CIDRs (what the controller manager's node IPAM would
//! have given them), writes `DIR/kubeconfig`, `DIR/ca.crt`, `DIR/token` and `DIR/namespace`,
//! prints one line saying where it listens, and serves until SIGTERM or SIGINT. `--verbose`
//! prints a line per request on stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use trellis_tests::kube_apiserver::{ApiServer, Options};

const USAGE: &str =
    "usage: trellis-kube-apiserver --listen IP:PORT --dir DIR [--node NAME=CIDR[,CIDR][@INTERNAL_IP]]... [--verbose]";

struct NodeSpec {
    name: String,
    cidrs: Vec<String>,
    internal_ip: Option<String>,
}

struct Args {
    listen: SocketAddr,
    dir: PathBuf,
    nodes: Vec<NodeSpec>,
    verbose: bool,
}

fn parse_node(spec: &str) -> Result<NodeSpec, String> {
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| format!("--node {spec}: expected NAME=CIDR[,CIDR][@IP]"))?;
    let (cidrs, internal_ip) = match rest.split_once('@') {
        Some((cidrs, ip)) => (cidrs, Some(ip.to_string())),
        None => (rest, None),
    };
    let cidrs: Vec<String> = cidrs.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
    if name.is_empty() || cidrs.is_empty() {
        return Err(format!("--node {spec}: expected NAME=CIDR[,CIDR][@IP]"));
    }
    Ok(NodeSpec {
        name: name.to_string(),
        cidrs,
        internal_ip,
    })
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut dir, mut nodes, mut verbose) = (None, None, Vec::new(), false);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--node" => nodes.push(parse_node(&value()?)?),
            "--verbose" => verbose = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        dir: dir.ok_or("--dir is required")?,
        nodes,
        verbose,
    })
}

fn main() {
    let args = parse(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("trellis-kube-apiserver: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let signals = trellis_tests::Signals::block();
    let server = ApiServer::start_with(
        None,
        args.listen,
        Options {
            verbose: args.verbose,
            ..Options::default()
        },
    );
    for node in &args.nodes {
        let cidrs: Vec<&str> = node.cidrs.iter().map(String::as_str).collect();
        server.create_node(&node.name, &cidrs, node.internal_ip.as_deref());
    }
    std::fs::create_dir_all(&args.dir).unwrap_or_else(|e| panic!("creating {}: {e}", args.dir.display()));
    server.write_incluster_files(&args.dir);
    // Whole or absent, for whoever waits for it to appear.
    let kubeconfig = args.dir.join("kubeconfig");
    let partial = args.dir.join("kubeconfig.partial");
    server.write_kubeconfig(&partial);
    std::fs::rename(&partial, &kubeconfig).unwrap_or_else(|e| panic!("renaming {}: {e}", partial.display()));
    println!(
        "trellis-kube-apiserver: a stand-in Kubernetes API server (not a cluster) serving {} Node(s) at {}; \
         kubeconfig {}",
        args.nodes.len(),
        server.url(),
        kubeconfig.display()
    );
    let sig = signals.wait();
    eprintln!("trellis-kube-apiserver: signal {sig}, stopping");
}
