//! A cluster on one machine: an underlay namespace with a bridge (and an etcd server listening
//! on it), N node namespaces joined to it by veths, `trellisd` in each node, and pods wired by
//! the `trellis` plugin with the CNI config each daemon wrote. Everything is deleted (processes
//! killed, namespaces removed) when the [`Cluster`] drops, also when the test panics.
//!
//! Each cluster's addresses live in its own namespaces, so clusters of parallel tests can use
//! the same underlay subnet without colliding.

use crate::{CniCall, Netns, TempDir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The underlay subnet inside every cluster: the bridge is .1, node N is .(10 + N).
pub const UNDERLAY: &str = "192.168.200";

/// A process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A single-member etcd listening on `ip` (ports 2379 and 2380) inside `ns`, its data in
/// `dir/etcd` (kept across restarts) and its log in `dir/etcd.log`.
pub fn spawn_etcd(ns: &Netns, ip: &str, name: &str, dir: &Path) -> Proc {
    let url = |port: u16| format!("http://{ip}:{port}");
    let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "etcd", "--name", name, "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url(2379),
            "--advertise-client-urls",
            &url(2379),
        ])
        .args([
            "--listen-peer-urls",
            &url(2380),
            "--initial-advertise-peer-urls",
            &url(2380),
        ])
        .args(["--initial-cluster", &format!("{name}={}", url(2380))])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    Proc { child }
}

pub struct Node {
    /// First: the daemon is killed before its namespace is deleted.
    pub daemon: Option<Proc>,
    pub name: String,
    pub ns: Netns,
    pub dir: PathBuf,
    pub args: Vec<String>,
}

pub struct Pod {
    pub node: usize,
    pub id: String,
    pub ns: Netns,
    pub ips: Vec<String>,
}

/// At most this many clusters at once in one test process: each runs etcd and several daemons,
/// and on a 2-core machine more of them starve each other past the tests' time limits.
const MAX_CLUSTERS: usize = 2;

static RUNNING: (std::sync::Mutex<usize>, std::sync::Condvar) = (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// A slot among the [`MAX_CLUSTERS`], given back on drop.
pub struct Slot;

impl Slot {
    fn take() -> Slot {
        let (lock, cv) = &RUNNING;
        let mut n = lock.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_CLUSTERS {
            n = cv.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (lock, cv) = &RUNNING;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        cv.notify_one();
    }
}

pub struct Cluster {
    /// Dropped in field order: pods, daemons and etcd before the namespaces they run in.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub etcd: Option<Proc>,
    pub underlay: Netns,
    pub dir: TempDir,
    pub bin: PathBuf,
    /// Last: the slot is given back once everything else is gone.
    pub slot: Slot,
}

impl Cluster {
    /// `n` nodes with `net_conf` (flannel's net-conf.json), each running the `trellisd` at
    /// `trellisd` with the extra `daemon_args`; waits until every node wrote its CNI config.
    pub fn new(n: usize, net_conf: &str, trellisd: &Path, daemon_args: &[&str]) -> Cluster {
        crate::require_root();
        let slot = Slot::take();
        let dir = TempDir::new("cluster");
        let underlay = Netns::new("tcu");
        underlay.exec_ok(&["ip", "link", "add", "ulbr0", "type", "bridge"]);
        underlay.exec_ok(&["ip", "addr", "add", &format!("{UNDERLAY}.1/24"), "dev", "ulbr0"]);
        underlay.exec_ok(&["ip", "link", "set", "ulbr0", "up"]);
        std::fs::write(dir.path().join("net-conf.json"), net_conf).expect("write net-conf");
        let mut c = Cluster {
            pods: Vec::new(),
            nodes: Vec::new(),
            etcd: None,
            underlay,
            dir,
            bin: trellisd.parent().expect("binary dir").to_path_buf(),
            slot,
        };
        c.start_etcd();
        for i in 1..=n {
            let ns = Netns::new("tcn");
            let peer = format!("ul{i}x{}", &ns.name[3..]);
            let peer: String = peer.chars().take(15).collect();
            crate::sh(&format!(
                "ip link add {peer} netns {u} type veth peer name ul0 netns {n}",
                u = c.underlay.name,
                n = ns.name
            ));
            c.underlay
                .exec_ok(&["ip", "link", "set", &peer, "master", "ulbr0", "up"]);
            ns.exec_ok(&["ip", "addr", "add", &format!("{UNDERLAY}.{}/24", 10 + i), "dev", "ul0"]);
            ns.exec_ok(&["ip", "link", "set", "ul0", "up"]);
            ns.exec_ok(&["ip", "route", "add", "default", "via", &format!("{UNDERLAY}.1")]);
            let node_dir = c.dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut args: Vec<String> = vec![
                "--node-name".into(),
                format!("node{i}"),
                "--net-conf".into(),
                c.dir.path().join("net-conf.json").to_string_lossy().into_owned(),
                "--etcd-endpoints".into(),
                c.etcd_endpoint(),
                "--cni-conf".into(),
                node_dir.join("10-trellis.conflist").to_string_lossy().into_owned(),
                "--ipam-data-dir".into(),
                node_dir.join("ipam").to_string_lossy().into_owned(),
                "--no-portmap".into(),
            ];
            args.extend(daemon_args.iter().map(|s| s.to_string()));
            c.nodes.push(Node {
                name: format!("node{i}"),
                ns,
                dir: node_dir,
                daemon: None,
                args,
            });
            c.start_daemon(i - 1);
        }
        for i in 0..n {
            c.wait_for_cni_conf(i);
        }
        c
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("http://{UNDERLAY}.1:2379")
    }

    /// Starts (or restarts, on the same data dir) etcd in the underlay namespace.
    pub fn start_etcd(&mut self) {
        let ip = format!("{UNDERLAY}.1");
        self.etcd = Some(spawn_etcd(&self.underlay, &ip, "tc", self.dir.path()));
    }

    pub fn stop_etcd(&mut self) {
        self.etcd = None;
    }

    /// `etcdctl` against the cluster's etcd, from the underlay namespace.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let endpoint = self.etcd_endpoint();
        let mut argv = vec!["etcdctl", "--endpoints", &endpoint];
        argv.extend_from_slice(args);
        self.underlay.exec(&argv)
    }

    pub fn start_daemon(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("trellisd.log"))
            .expect("daemon log");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name])
            .arg(self.bin.join("trellisd"))
            .args(&node.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run trellisd");
        node.daemon = Some(Proc { child });
    }

    /// SIGTERM to a node's daemon, as a rolling update does; waits for it to exit.
    pub fn stop_daemon(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].daemon.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
            let _ = p.child.wait();
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("trellisd.log")).unwrap_or_default()
    }

    fn wait_for_cni_conf(&self, i: usize) {
        let path = self.nodes[i].dir.join("10-trellis.conflist");
        let t = Instant::now();
        while !path.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "node{} wrote no CNI config in 60 s; its log:\n{}",
                i + 1,
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node's CNI config (the trellis plugin's entry, with cniVersion and name).
    pub fn cni_conf(&self, i: usize) -> Value {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("10-trellis.conflist")).expect("conflist");
        let list: Value = serde_json::from_str(&text).expect("conflist JSON");
        let mut p = list["plugins"][0].clone();
        p["cniVersion"] = list["cniVersion"].clone();
        p["name"] = list["name"].clone();
        p
    }

    /// Adds a pod on node `i` with the node's CNI config; returns its index in `pods`.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let ns = Netns::new("tcp");
        let id = format!("{}-{}", self.nodes[i].name, ns.name);
        let mut call = CniCall::new(self.bin.join("trellis"), "ADD", self.cni_conf(i))
            .container(&id)
            .netns(ns.path());
        call.exec_in_netns = Some(self.nodes[i].ns.name.clone());
        let res = call.run().ok();
        let ips = res["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|x| x["address"].as_str().unwrap().split('/').next().unwrap().to_string())
            .collect();
        self.pods.push(Pod { node: i, id, ns, ips });
        self.pods.len() - 1
    }

    /// Pings `to` from pod `from` (one packet, 2 s); true when answered.
    pub fn ping(&self, from: usize, to: &str) -> bool {
        let bin = if to.contains(':') { "ping6" } else { "ping" };
        self.pods[from]
            .ns
            .exec(&[bin, "-c", "1", "-W", "2", to])
            .status
            .success()
    }

    /// Every pod reaches every address of every other pod; retries for up to `within`.
    pub fn all_reach_all(&self, within: Duration) -> Result<(), String> {
        let t = Instant::now();
        loop {
            let mut missing = Vec::new();
            for (a, pa) in self.pods.iter().enumerate() {
                for pb in &self.pods {
                    for ip in &pb.ips {
                        if !self.ping(a, ip) {
                            missing.push(format!("{} -> {} ({ip})", pa.id, pb.id));
                        }
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if t.elapsed() > within {
                return Err(missing.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
