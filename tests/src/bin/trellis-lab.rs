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
//!
//! With `--datastore kube` it also does what a cluster's control plane and kubelet would:
//! Namespaces `x`, `y`, `z` (and `default`), a Pod object per pod (`a`, `b`, … in those
//! namespaces in turn; `namespace` in `pods.json`) made before the pod's CNI ADD and given its
//! addresses after; every pod serves TCP and UDP on ports 80 and 81; and `./lab policy` talks
//! to it over `DIR/ctl.sock` (see [`control`]).
//! Its namespaces are named `trl…` so that `./lab down` can remove what a crashed lab left.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use trellis_tests::cluster::{Cluster, Options, Stack};
use trellis_tests::kube_apiserver as kube;
use trellis_tests::probe::{probe, Servers, Transport};

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
    if a.kube {
        for ns in ["default"].iter().chain(NAMESPACES.iter()) {
            c.api().create(
                &kube::NAMESPACES,
                json!({"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns, "ns": ns}}}),
            );
        }
    }
    let mut pods = Vec::new();
    for node in 0..a.nodes {
        for p in 1..=a.pods {
            let mut entry = json!({"node": c.nodes[node].name});
            let i = if a.kube {
                // As a cluster does it: the Pod is scheduled (Pending, no addresses) before
                // kubelet's CNI ADD, which names it in CNI_ARGS; then its status gets the
                // addresses and it runs.
                let k = c.pods.len();
                let (ns, name) = (NAMESPACES[k % NAMESPACES.len()], pod_name(k));
                c.api().create(&kube::PODS, pod_object(ns, &name, &c.nodes[node].name));
                let i = c.add_k8s_pod(node, ns, &name);
                let ips: Vec<Value> = c.pods[i].ips.iter().map(|ip| json!({"ip": ip})).collect();
                let first = c.pods[i].ips.first().cloned();
                c.api().update(&kube::PODS, &format!("{ns}/{name}"), |pod| {
                    pod["status"] = json!({"phase": "Running", "podIP": first, "podIPs": ips});
                });
                entry["namespace"] = json!(ns);
                entry["name"] = json!(name);
                i
            } else {
                entry["name"] = json!(format!("pod{p}"));
                c.add_pod(node)
            };
            let pod = &c.pods[i];
            entry["netns"] = json!(pod.ns.path());
            entry["ips"] = json!(pod.ips);
            pods.push(entry);
        }
    }
    // Every pod serves TCP and UDP on ports 80 and 81 (the Pods' `serve-80-tcp`… ports), for
    // the connection matrices of `./lab policy`.
    let servers: Vec<Servers> = if a.kube {
        c.pods.iter().map(|p| Servers::start(p.ns.path(), &PORTS)).collect()
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(&a.state).expect("state folder");
    std::fs::write(a.state.join("cluster"), c.dir.path().to_string_lossy().as_bytes()).expect("write cluster");
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        if a.kube {
            let sock = a.state.join("ctl.sock");
            let _ = std::fs::remove_file(&sock);
            let listener = UnixListener::bind(&sock).unwrap_or_else(|e| panic!("binding {}: {e}", sock.display()));
            listener.set_nonblocking(true).expect("nonblocking");
            let (c, pods, stop) = (&c, &pods, &stop);
            scope.spawn(move || control(listener, c, pods, stop));
        }
        std::fs::write(
            a.state.join("pods.json"),
            serde_json::to_string(&json!({ "pods": pods })).expect("JSON"),
        )
        .expect("write pods.json");
        let signal = signals.wait();
        eprintln!("trellis-lab: signal {signal}: taking the cluster down");
        stop.store(true, Ordering::Relaxed);
    });
    drop(servers);
    drop(c);
}

/// The lab's namespaces (labelled `ns: NAME`); pods are spread over them in turn.
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The ports every pod serves (TCP and UDP), named `serve-PORT-tcp` / `serve-PORT-udp`.
const PORTS: [u16; 2] = [80, 81];

/// Pods are `a`, `b`, … in the order they are made (then `pod27`, …).
fn pod_name(k: usize) -> String {
    if k < 26 {
        ((b'a' + k as u8) as char).to_string()
    } else {
        format!("pod{}", k + 1)
    }
}

/// A Pod as the scheduler leaves it: on its node, Pending, no addresses yet.
fn pod_object(ns: &str, name: &str, node: &str) -> Value {
    let ports: Vec<Value> = PORTS
        .iter()
        .flat_map(|p| {
            [
                json!({"name": format!("serve-{p}-tcp"), "containerPort": p, "protocol": "TCP"}),
                json!({"name": format!("serve-{p}-udp"), "containerPort": p, "protocol": "UDP"}),
            ]
        })
        .collect();
    json!({"metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
           "spec": {"nodeName": node, "containers": [{"name": "serve", "image": "trellis-lab", "ports": ports}]},
           "status": {"phase": "Pending"}})
}

/// `./lab policy`'s channel: one JSON request per connection on `STATE/ctl.sock`, one JSON
/// answer (`{"ok": true, ...}` or `{"ok": false, "error": "..."}`).
/// - `{"op": "apply", "object": NETWORKPOLICY}`: created, or updated when it exists;
/// - `{"op": "delete", "key": "NAMESPACE/NAME"}`;
/// - `{"op": "list"}`: every NetworkPolicy;
/// - `{"op": "matrix", "proto": "tcp"|"udp", "port": N}`: a new connection from every pod to
///   every address of every other pod.
fn control(listener: UnixListener, c: &Cluster, pods: &[Value], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = conn.set_nonblocking(false);
        let mut line = String::new();
        if BufReader::new(&conn).read_line(&mut line).is_err() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(req) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&req, c, pods))) {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => json!({"ok": false, "error": e}),
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "failed".into());
                    json!({"ok": false, "error": msg})
                }
            },
            Err(e) => json!({"ok": false, "error": format!("not a JSON request: {e}")}),
        };
        let _ = writeln!(conn, "{answer}");
    }
}

fn handle(req: &Value, c: &Cluster, pods: &[Value]) -> Result<Value, String> {
    let api = c.api();
    match req["op"].as_str().unwrap_or("") {
        "apply" => {
            let mut obj = req["object"].clone();
            let kind = obj["kind"].as_str().unwrap_or("");
            if kind != "NetworkPolicy" {
                return Err(format!("only NetworkPolicy objects are applied here, not {kind:?}"));
            }
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if name.is_empty() {
                return Err("a NetworkPolicy needs metadata.name".into());
            }
            if obj["metadata"]["namespace"].as_str().is_none_or(str::is_empty) {
                obj["metadata"]["namespace"] = json!("default");
            }
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
            if !api.all(&kube::NAMESPACES).iter().any(|n| n["metadata"]["name"] == ns) {
                return Err(format!("namespaces {ns:?} not found"));
            }
            obj["apiVersion"] = json!("networking.k8s.io/v1");
            let key = format!("{ns}/{name}");
            let exists = api
                .all(&kube::NETWORK_POLICIES)
                .iter()
                .any(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name);
            if exists {
                let before = api.update(&kube::NETWORK_POLICIES, &key, |_| {});
                let after = api.update(&kube::NETWORK_POLICIES, &key, |p| {
                    p["spec"] = obj["spec"].clone();
                    for field in ["labels", "annotations"] {
                        match obj["metadata"].get(field) {
                            Some(v) => p["metadata"][field] = v.clone(),
                            None => {
                                if let Some(m) = p["metadata"].as_object_mut() {
                                    m.remove(field);
                                }
                            }
                        }
                    }
                });
                let what = if before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"] {
                    "unchanged"
                } else {
                    "configured"
                };
                Ok(json!({"ok": true, "result": format!("networkpolicy {key} {what}")}))
            } else {
                api.create(&kube::NETWORK_POLICIES, obj);
                Ok(json!({"ok": true, "result": format!("networkpolicy {key} created")}))
            }
        }
        "delete" => {
            let key = req["key"].as_str().unwrap_or("");
            let exists = api.all(&kube::NETWORK_POLICIES).iter().any(|p| {
                format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap_or(""),
                    p["metadata"]["name"].as_str().unwrap_or("")
                ) == key
            });
            if !exists {
                return Err(format!("networkpolicy {key:?} not found"));
            }
            api.delete(&kube::NETWORK_POLICIES, key);
            Ok(json!({"ok": true, "result": format!("networkpolicy {key} deleted")}))
        }
        "list" => Ok(json!({"ok": true, "items": api.all(&kube::NETWORK_POLICIES)})),
        "matrix" => {
            let transport = match req["proto"].as_str().unwrap_or("tcp") {
                "tcp" => Transport::Tcp,
                "udp" => Transport::Udp,
                p => return Err(format!("unknown protocol {p:?} (tcp, udp)")),
            };
            let port = req["port"].as_u64().unwrap_or(80) as u16;
            Ok(json!({"ok": true, "text": matrix(pods, transport, port)}))
        }
        op => Err(format!("unknown op {op:?} (apply, delete, list, matrix)")),
    }
}

/// A table of new connections (all probes at once): `yes` when every address of the
/// destination answered, `NO` when none did, `part` otherwise; `-` a pod to itself.
fn matrix(pods: &[Value], transport: Transport, port: u16) -> String {
    let names: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    let mut jobs = Vec::new();
    for (si, s) in pods.iter().enumerate() {
        for (di, d) in pods.iter().enumerate() {
            if si == di {
                continue;
            }
            for ip in d["ips"].as_array().into_iter().flatten() {
                if let Some(ip) = ip.as_str().and_then(|i| i.parse::<IpAddr>().ok()) {
                    jobs.push((si, di, PathBuf::from(s["netns"].as_str().unwrap_or("")), ip));
                }
            }
        }
    }
    let outcomes: Vec<(usize, usize, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(si, di, from, ip)| scope.spawn(move || (si, di, probe(&from, SocketAddr::new(ip, port), transport))))
            .collect();
        handles.into_iter().map(|h| h.join().expect("a probe")).collect()
    });
    let n = pods.len();
    let mut cells = vec![vec![(0usize, 0usize); n]; n];
    for (si, di, ok) in outcomes {
        cells[si][di].0 += usize::from(ok);
        cells[si][di].1 += 1;
    }
    let w = names.iter().map(String::len).max().unwrap_or(0).max(4) + 2;
    let first = w.max("from \\ to".len() + 2);
    let mut out = format!("{:first$}", "from \\ to");
    for name in &names {
        out += &format!("{name:w$}");
    }
    out = out.trim_end().to_string();
    out.push('\n');
    for (si, row) in cells.iter().enumerate() {
        out += &format!("{:first$}", names[si]);
        for (di, (ok, all)) in row.iter().enumerate() {
            let cell = match (si == di, ok, all) {
                (true, _, _) => "-",
                (_, 0, _) => "NO",
                (_, ok, all) if ok == all => "yes",
                _ => "part",
            };
            out += &format!("{cell:w$}");
        }
        out = out.trim_end().to_string();
        out.push('\n');
    }
    out
}
