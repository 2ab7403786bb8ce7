//! A cluster on one machine: the test [`Topology`] (an underlay namespace with a bridge, N node
//! namespaces joined to it by veths) with an etcd server listening on the underlay (or the
//! stand-in Kubernetes API server: [`Options::kube`]), `trellisd` in each node, and pods wired by the `trellis` plugin with the CNI
//! config each daemon wrote. Everything is deleted (processes killed, namespaces removed) when
//! the [`Cluster`] drops, also when the test panics.
//!
//! Each cluster's addresses live in its own namespaces, so clusters of parallel tests can use
//! the same underlay subnet without colliding.

use crate::etcd::Etcd;
use crate::kube_apiserver::ApiServer;
use crate::topology::{Spec, Topology};
use crate::{CniCall, Netns, TempDir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The underlay subnet inside every cluster: the bridge is .1, node N is .(10 + N).
pub const UNDERLAY: &str = "192.168.200";
/// The underlay's IPv6 /64 ([`Stack::DualStack`], [`Stack::V6Only`]): the bridge is `::1`, node
/// N `::(10 + N)`.
pub const UNDERLAY6: &str = "fd00:200::";

/// The underlay's address families.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stack {
    /// Nodes at [`UNDERLAY`].(10+N), default route via .1.
    #[default]
    V4,
    /// Also at [`UNDERLAY6`](10+N) on the same link; the IPv4 default route (the daemon's
    /// underlay address stays IPv4).
    DualStack,
    /// At [`UNDERLAY6`](10+N) only, default route via `::1`; the datastore is reached over IPv6.
    V6Only,
}

/// The `trellisd` at `exe` (a test's `env!("CARGO_BIN_EXE_trellisd")`), checking that the
/// plugins the cluster's pods are wired with were built beside it.
pub fn trellisd_with_plugins(exe: &str) -> PathBuf {
    crate::cni::sibling_binary(exe, "trellis");
    crate::cni::sibling_binary(exe, "trellis-ipam");
    PathBuf::from(exe)
}

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

pub struct Node {
    /// First: the daemon is killed before its namespace is deleted.
    pub daemon: Option<Proc>,
    pub name: String,
    pub ns: Netns,
    pub dir: PathBuf,
    pub args: Vec<String>,
    /// Started as a DaemonSet pod with the in-cluster config: the service account's token and
    /// CA at `/var/run/secrets/kubernetes.io/serviceaccount/` (a tmpfs on `/run` in the
    /// daemon's own mount namespace) and `KUBERNETES_SERVICE_HOST`/`PORT`.
    pub in_cluster: bool,
}

/// How a [`Cluster`] is set up beyond its size and net-conf.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The Kubernetes datastore, served by the stand-in API server at [`UNDERLAY`].1:6443 (or
    /// `[`[`UNDERLAY6`]`1]:6443`) in
    /// the underlay namespace, with one Node per node (`nodeN`) holding these pod CIDRs (what
    /// the controller manager would have given it); etcd when `None`.
    pub kube: Option<Vec<Vec<String>>>,
    /// Nodes (0-based) whose daemon uses the in-cluster config instead of a kubeconfig.
    pub in_cluster: Vec<usize>,
    /// Run every daemon with only these capabilities (as `setpriv` names them: `net_admin`),
    /// as a container runtime would from the manifest's securityContext.
    pub capabilities: Option<Vec<String>>,
    /// Do not wait for the CNI configs (for daemons that are expected not to get there).
    pub no_wait: bool,
    /// The namespaces' name prefix (at most 3 characters): `{tag}u…` the underlay, `{tag}n…`
    /// the nodes, `{tag}p…` the pods; `tc` when `None`. The lab uses its own, so that
    /// `./lab down` finds what a crashed lab left.
    pub tag: Option<String>,
    /// The underlay's families (IPv4 unless set).
    pub underlay: Stack,
    /// Extra daemon arguments of some nodes (0-based index → arguments), after the common
    /// ones: a BGP route reflector's `--bgp-route-reflector-cluster-id`.
    pub node_args: std::collections::BTreeMap<usize, Vec<String>>,
}

/// The stand-in API server's port.
pub const API_PORT: u16 = 6443;

pub struct Pod {
    pub node: usize,
    pub id: String,
    pub ns: Netns,
    pub ips: Vec<String>,
    /// The plugin's ADD result.
    pub result: Value,
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
    pub etcd: Option<Etcd>,
    /// The stand-in Kubernetes API server ([`Options::kube`]).
    pub api: Option<ApiServer>,
    pub options: Options,
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
        Cluster::with_options(n, net_conf, trellisd, daemon_args, Options::default())
    }

    /// Like [`Cluster::new`], set up as `options` say.
    pub fn with_options(n: usize, net_conf: &str, trellisd: &Path, daemon_args: &[&str], options: Options) -> Cluster {
        crate::require_root();
        let slot = Slot::take();
        let dir = TempDir::new("cluster");
        let tag = options.tag.clone().unwrap_or_else(|| "tc".into());
        let spec = match options.underlay {
            Stack::V4 => Spec::v4(UNDERLAY),
            Stack::DualStack => Spec::v4(UNDERLAY).dual_stack(UNDERLAY6),
            Stack::V6Only => Spec::v4(UNDERLAY).v6_only(UNDERLAY6),
        };
        let Topology { underlay, nodes, .. } = Topology::new(&tag, n, spec.default_route());
        std::fs::write(dir.path().join("net-conf.json"), net_conf).expect("write net-conf");
        let mut c = Cluster {
            pods: Vec::new(),
            nodes: Vec::new(),
            etcd: None,
            api: None,
            options,
            underlay,
            dir,
            bin: trellisd.parent().expect("binary dir").to_path_buf(),
            slot,
        };
        match c.options.kube.clone() {
            None => c.start_etcd(),
            Some(cidrs) => {
                let addr = format!("{}:{API_PORT}", c.datastore_host()).parse().expect("address");
                let api = ApiServer::start(Some(&c.underlay), addr);
                api.write_kubeconfig(&c.dir.path().join("kubeconfig"));
                let sa = c.dir.path().join("serviceaccount");
                std::fs::create_dir_all(&sa).expect("service account folder");
                api.write_incluster_files(&sa);
                for (i, node_cidrs) in cidrs.iter().enumerate() {
                    let refs: Vec<&str> = node_cidrs.iter().map(String::as_str).collect();
                    let ip = c.node_underlay_ip(i);
                    api.create_node(&format!("node{}", i + 1), &refs, Some(&ip));
                }
                c.api = Some(api);
            }
        }
        for (i, ns) in (1..=n).zip(nodes) {
            let node_dir = c.dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let in_cluster = c.options.in_cluster.contains(&(i - 1));
            let store: Vec<String> = match (&c.options.kube, in_cluster) {
                (None, _) => vec!["--etcd-endpoints".into(), c.etcd_endpoint()],
                (Some(_), true) => vec!["--datastore".into(), "kube".into()],
                (Some(_), false) => vec![
                    "--datastore".into(),
                    "kube".into(),
                    "--kubeconfig".into(),
                    c.dir.path().join("kubeconfig").to_string_lossy().into_owned(),
                ],
            };
            let mut args: Vec<String> = vec![
                "--node-name".into(),
                format!("node{i}"),
                "--net-conf".into(),
                c.dir.path().join("net-conf.json").to_string_lossy().into_owned(),
            ];
            args.extend(store);
            args.extend([
                "--state-dir".into(),
                node_dir.join("state").to_string_lossy().into_owned(),
                "--cni-conf".into(),
                node_dir.join("10-trellis.conflist").to_string_lossy().into_owned(),
                "--ipam-data-dir".into(),
                node_dir.join("ipam").to_string_lossy().into_owned(),
            ]);
            args.extend(daemon_args.iter().map(|s| s.to_string()));
            args.extend(c.options.node_args.get(&(i - 1)).into_iter().flatten().cloned());
            c.nodes.push(Node {
                name: format!("node{i}"),
                ns,
                dir: node_dir,
                daemon: None,
                args,
                in_cluster,
            });
            c.start_daemon(i - 1);
        }
        if !c.options.no_wait {
            for i in 0..n {
                c.wait_for_cni_conf(i);
            }
        }
        c
    }

    /// The stand-in API server of a cluster made with [`Options::kube`].
    pub fn api(&self) -> &ApiServer {
        self.api
            .as_ref()
            .expect("a cluster with the Kubernetes datastore (Options::kube)")
    }

    pub fn etcd_endpoint(&self) -> String {
        format!("http://{}:2379", self.datastore_host())
    }

    /// Where etcd and the API server listen: the underlay bridge's address, in brackets on an
    /// IPv6-only underlay (as it goes into a URL).
    pub fn datastore_host(&self) -> String {
        match self.options.underlay {
            Stack::V6Only => format!("[{UNDERLAY6}1]"),
            _ => format!("{UNDERLAY}.1"),
        }
    }

    /// Node `i`'s (0-based) underlay address as its daemon picks it (the default route's
    /// family).
    pub fn node_underlay_ip(&self, i: usize) -> String {
        match self.options.underlay {
            Stack::V6Only => format!("{UNDERLAY6}{}", 11 + i),
            _ => format!("{UNDERLAY}.{}", 11 + i),
        }
    }

    /// Starts (or restarts, on the same data dir) etcd in the underlay namespace; returns once
    /// it answers.
    pub fn start_etcd(&mut self) {
        self.etcd = None;
        let ip = self.datastore_host();
        self.etcd = Some(Etcd::start_in(&self.underlay, &ip, self.dir.path()));
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
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("trellisd.log"))
            .expect("daemon log");
        // `ip netns exec` gives the daemon a mount namespace of its own (mounts made there stay
        // there); a shell prepares it as a container runtime would, then execs the daemon (same
        // pid, so signals and /proc/PID reach the daemon itself).
        let mut script = String::from("set -e\n");
        let mut cmd = Command::new("ip");
        if node.in_cluster {
            let sa = self.dir.path().join("serviceaccount");
            script.push_str(&format!(
                "mount -t tmpfs trellis-test-run /run\n\
                 mkdir -p /run/secrets/kubernetes.io/serviceaccount\n\
                 cp {sa}/token {sa}/ca.crt {sa}/namespace /run/secrets/kubernetes.io/serviceaccount/\n",
                sa = sa.display()
            ));
            // No kubeconfig to find first (KUBECONFIG, ~/.kube/config): in-cluster it is.
            cmd.env_remove("KUBECONFIG")
                .env("HOME", &sa)
                .env(
                    "KUBERNETES_SERVICE_HOST",
                    self.datastore_host().trim_matches(['[', ']']),
                )
                .env("KUBERNETES_SERVICE_PORT", API_PORT.to_string());
        }
        match &self.options.capabilities {
            Some(caps) => {
                let keep: String = caps.iter().map(|c| format!(",+{c}")).collect();
                script.push_str(&format!(
                    "exec setpriv --inh-caps=-all --ambient-caps=-all --bounding-set=-all{keep} -- \"$@\"\n"
                ));
            }
            None => script.push_str("exec \"$@\"\n"),
        }
        let child = cmd
            .args(["netns", "exec", &node.ns.name, "sh", "-c", &script, "trellisd"])
            .arg(self.bin.join("trellisd"))
            .args(&node.args)
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .expect("run trellisd");
        self.nodes[i].daemon = Some(Proc { child });
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

    /// Adds a pod on node `i` with the node's CNI config as a runtime on libcni 1.1 or older
    /// reads it (the conflist's `cniVersion`); returns its index in `pods`.
    pub fn add_pod(&mut self, i: usize) -> usize {
        let conf = self.cni_conf(i);
        self.add_pod_with(i, conf)
    }

    /// Adds a pod on node `i` with the plugin config `conf`; returns its index in `pods`.
    pub fn add_pod_with(&mut self, i: usize, conf: Value) -> usize {
        self.add_pod_as(i, conf, None)
    }

    /// Adds a pod on node `i` as kubelet does for Pod `namespace/name` (its `K8S_POD_*`
    /// CNI_ARGS); returns its index in `pods`.
    pub fn add_k8s_pod(&mut self, i: usize, namespace: &str, name: &str) -> usize {
        let conf = self.cni_conf(i);
        self.add_pod_as(
            i,
            conf,
            Some(format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
            )),
        )
    }

    /// CNI DEL of pod `p` (its namespace stays until the `Pod` is dropped).
    pub fn del_pod(&self, p: usize) {
        let pod = &self.pods[p];
        let mut call = CniCall::new(self.bin.join("trellis"), "DEL", self.cni_conf(pod.node))
            .container(&pod.id)
            .netns(pod.ns.path());
        call.exec_in_netns = Some(self.nodes[pod.node].ns.name.clone());
        let out = call.run();
        assert_eq!(out.exit_code, 0, "DEL of {}: {}", pod.id, out.stdout);
    }

    /// Sends `signal` to node `i`'s daemon (SIGSTOP: a daemon that lags; SIGCONT).
    pub fn signal_daemon(&self, i: usize, signal: i32) {
        if let Some(p) = &self.nodes[i].daemon {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(p.child.id() as i32, signal) };
        }
    }

    fn add_pod_as(&mut self, i: usize, conf: Value, args: Option<String>) -> usize {
        let ns = Netns::new(&format!("{}p", self.options.tag.as_deref().unwrap_or("tc")));
        let id = format!("{}-{}", self.nodes[i].name, ns.name);
        let mut call = CniCall::new(self.bin.join("trellis"), "ADD", conf)
            .container(&id)
            .netns(ns.path());
        call.args = args;
        call.exec_in_netns = Some(self.nodes[i].ns.name.clone());
        let result = call.run().ok();
        let ips = result["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|x| x["address"].as_str().unwrap().split('/').next().unwrap().to_string())
            .collect();
        self.pods.push(Pod {
            node: i,
            id,
            ns,
            ips,
            result,
        });
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

impl Cluster {
    /// The route to `cidr`'s network on node `i`, as `ip route` prints it (empty when none).
    pub fn route_to(&self, i: usize, cidr: &str) -> String {
        self.nodes[i].ns.exec_ok(&["ip", "route", "show", cidr])
    }

    /// BIRD in the underlay namespace at [`UNDERLAY`].1 as route reflector (AS 64512) for
    /// every node, over IPv4 sessions with the `channels` given (`["ipv4", "ipv6"]`), graceful
    /// restart on.
    pub fn start_bird_reflector(&self, channels: &[&str]) -> crate::bird::Bird {
        let mut conf = format!("log stderr all;\nrouter id {UNDERLAY}.1;\nprotocol device {{ }}\n");
        for i in 1..=self.nodes.len() {
            conf += &format!(
                "protocol bgp node{i} {{\n  local {UNDERLAY}.1 as 64512;\n  neighbor {UNDERLAY}.{} as 64512;\n  \
                 direct;\n  rr client;\n  hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 2;\n  \
                 graceful restart on;\n",
                10 + i
            );
            for ch in channels {
                conf += &format!("  {ch} {{ import all; export all; }};\n");
            }
            conf += "}\n";
        }
        crate::bird::Bird::start(&self.underlay, self.dir.path(), "bird", &conf)
    }

    /// The first pod CIDR in node `i`'s CNI config.
    pub fn node_cidr(&self, i: usize) -> String {
        self.node_cidr_of(i, 0)
    }

    /// The pod CIDR of range `range` in node `i`'s CNI config (dual stack: 0 IPv4, 1 IPv6).
    pub fn node_cidr_of(&self, i: usize, range: usize) -> String {
        self.cni_conf(i)["ipam"]["ranges"][range][0]["subnet"]
            .as_str()
            .expect("a range in the CNI config")
            .to_string()
    }

    /// GET `path` from the daemon's default listen address inside node `i`'s namespace:
    /// (status, body); status 0 when nothing answered.
    pub fn http_get(&self, i: usize, path: &str) -> (u16, String) {
        let script = format!(
            "import urllib.request, urllib.error\n\
             try:\n    r = urllib.request.urlopen('http://127.0.0.1:9909{path}', timeout=5); print(r.status); print(r.read().decode())\n\
             except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n\
             except OSError as e:\n    print(0); print(e)"
        );
        let out = self.nodes[i].ns.exec_ok(&["python3", "-c", &script]);
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        (status.trim().parse().unwrap_or(0), body.to_string())
    }

    /// One value of node `i`'s `/metrics` (-1 when absent).
    pub fn metric(&self, i: usize, name: &str) -> f64 {
        let (_, body) = self.http_get(i, "/metrics");
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }

    /// Pings from pod `from` to `to` every 50 ms for `seconds`, while `during` runs; returns
    /// (sent, received). Ping stops by itself after its count and waits for the last replies,
    /// so a packet in flight at the end is not counted as lost.
    pub fn ping_during(
        &mut self,
        from: usize,
        to: &str,
        seconds: u32,
        during: impl FnOnce(&mut Cluster),
    ) -> (u32, u32) {
        let count = (seconds * 20).to_string();
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pods[from].ns.name,
                "ping",
                "-i",
                "0.05",
                "-W",
                "2",
                "-c",
                &count,
                to,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ping");
        std::thread::sleep(Duration::from_millis(500));
        during(self);
        let out = ping.wait_with_output().expect("ping's output");
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping stats: {text}"));
        let nums: Vec<u32> = stats
            .split(|ch: char| !ch.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        (nums[0], nums[1])
    }

    /// CPU seconds (user + system) node `i`'s daemon has used so far.
    pub fn daemon_cpu_seconds(&self, i: usize) -> f64 {
        let pid = self.nodes[i].daemon.as_ref().expect("a running daemon").child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon's /proc stat");
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
        let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
