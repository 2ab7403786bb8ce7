//! NetworkPolicy at scale (issue 14, the parts that exist: compiling and writing the node's
//! table; trellisd does not watch the objects yet): a cluster of P pods in 50 namespaces and N
//! policies, 100 of the pods on this node, in a namespace of its own.
//!
//! 1. Full: compile everything, then write the table from nothing (one transaction); next to
//!    it the kernel's own floor for the same ruleset, `nft -f` of its text (`nft list table`
//!    of ours) into a fresh namespace.
//! 2. One policy changed (its port): compile again and apply; the transaction holds only what
//!    changed.
//! 3. One pod added to the cluster (a peer of many policies): compile and apply.
//! 4. The ruleset's size (rules, set elements) as pods and policies grow: it must grow with
//!    pods + policies, not with their product.
//!
//! The workload: namespace `ns-K` (K < 50) holds pods `app=aJ`, `role=server|client`; policy I
//! in `ns-(I mod 50)` selects `app=a(I mod 20)` and allows ingress from `role=client` pods of its
//! namespace and from namespaces `team=t(I mod 5)` on TCP `8000 + I mod 100`.
//!
//! 5. With `--dataplane`, instead: the cost on the wire. Two pods on one node namespace, wired
//!    by the real `trellis` plugin, and 0, 100 and 1,000 policies that all select both pods
//!    (`pair=yes` in namespace `bench`), each allowing ingress on TCP 5201 (iperf3's port) from
//!    a peer of its own: a decoy pod elsewhere, except the last policy, whose peer is the
//!    client. So the server's ingress chain holds N rules, every one matching the port and
//!    looking its peer set up, and the only one matching the client is the LAST: a new
//!    connection's first packet walks the whole chain. Per setup, in rotating order, `--runs`
//!    times: iperf3 TCP throughput (`-t --seconds`) and the rate of short TCP connections
//!    (`--connects` connect + RST in a row: only a connection's first packet walks the chain).
//!    Next to it: no policy table at all, 1,000 policies with egress too (the client's egress
//!    chain walked as well), and 1,000 with the matching rule first (nothing walked). Routed mode, then bridge mode (through
//!    `br_netfilter`, as trellisd enforces it there).
//!
//! Run (as root): `cargo build --release -p trellis-bench && target/release/policy`;
//! `cargo build --release -p trellis -p trellis-ipam -p trellis-bench &&
//! target/release/policy --dataplane` (options: `--runs R` (default 5), `--seconds S`
//! (default 3), `--connects N` (default 3000), `--modes routed,bridge`, `--trellis PATH`
//! (trellis-ipam next to it)).

use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use trellis_bench::{cleanup, iperf, median, ms, reachable};
use trellis_net::netns::run_in;
use trellis_net::nft::{PolicyState, PolicyTable, PortKind};
use trellis_tests::{CniCall, Netns, TempDir};
use trellisd::policy::compile::{compile, LocalPod};
use trellisd::policy::model::{PodInfo, Policy};
use trellisd::policy::semantics::View;

const NS_PREFIX: &str = "bpol";
const NAMESPACES: usize = 50;
const LOCAL: usize = 100;

fn pod_ip(i: usize) -> IpAddr {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
        .parse()
        .unwrap()
}

fn view(pods: usize, policies: usize, port_shift: u16) -> View {
    let mut v = View::default();
    for k in 0..NAMESPACES {
        v.namespaces
            .insert(format!("ns-{k}"), [("team".to_string(), format!("t{}", k % 5))].into());
    }
    for i in 0..pods {
        v.pods.push(PodInfo {
            namespace: format!("ns-{}", i % NAMESPACES),
            name: format!("pod-{i}"),
            labels: [
                ("app".to_string(), format!("a{}", i % 20)),
                (
                    "role".to_string(),
                    if i % 3 == 0 { "client" } else { "server" }.to_string(),
                ),
            ]
            .into(),
            ips: vec![pod_ip(i)],
            node: if i < LOCAL {
                "here".into()
            } else {
                format!("n{}", i % 50)
            },
            ports: vec![],
        });
    }
    for i in 0..policies {
        let port = 8000 + (i % 100) as u16 + if i == 0 { port_shift } else { 0 };
        let np = json!({"metadata": {"namespace": format!("ns-{}", i % NAMESPACES), "name": format!("p{i}")},
            "spec": {"podSelector": {"matchLabels": {"app": format!("a{}", i % 20)}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                                           {"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 5)}}}],
                                  "ports": [{"port": port}]}]}});
        v.policies
            .push(Policy::from_k8s(&serde_json::from_value(np).unwrap()).unwrap());
    }
    v
}

fn local(v: &View) -> Vec<LocalPod> {
    v.pods
        .iter()
        .filter(|p| p.node == "here")
        .enumerate()
        .map(|(i, p)| LocalPod {
            ifname: format!("tp{i:05}"),
            ips: p.ips.clone(),
            pod: Some(p.key()),
        })
        .collect()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn main() {
    trellis_tests::require_root();
    cleanup::on_panic(&[NS_PREFIX, POD_PREFIX], &[DIR]);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--dataplane") {
        return dataplane(&opts(&args[1..]));
    }
    assert!(
        args.is_empty(),
        "options: --dataplane [--runs R] [--seconds S] [--connects N] [--modes M,M] [--trellis PATH]"
    );
    let (pods, policies) = (5000, 1000);
    println!("NetworkPolicy: {pods} pods in {NAMESPACES} namespaces, {policies} policies, {LOCAL} pods on this node\n");

    let node = Netns::new(NS_PREFIX);
    let table = trellis_net::netns::run_in(node.path(), || {
        PolicyTable::new("trellis-policy", PortKind::Routed).unwrap()
    })
    .unwrap();
    let v = view(pods, policies, 0);
    let l = local(&v);
    let (compiled, t_compile) = timed(|| compile(&v, &l));
    let state = compiled.to_nft();
    let (applied, t_apply) = timed(|| table.apply(&state).unwrap());
    let elements: usize = compiled.sets.values().map(Vec::len).sum();
    println!("| step | time | note |\n|---|---|---|");
    println!(
        "| compile, everything | {} | {} chains, {} rules, {} sets, {elements} elements |",
        ms(t_compile),
        compiled.chains.len(),
        compiled.lines(),
        compiled.sets.len()
    );
    println!(
        "| write the table from nothing (one transaction) | {} | {} messages |",
        ms(t_apply),
        applied.messages
    );

    // The kernel's floor: the same ruleset as text through nft(8) into a fresh namespace.
    let text = node.exec_ok(&["nft", "list", "table", "inet", "trellis-policy"]);
    let other = Netns::new(NS_PREFIX);
    let file = std::env::temp_dir().join(format!("trellis-policy-bench-{}.nft", std::process::id()));
    std::fs::write(&file, format!("table inet trellis-policy\n{text}")).unwrap();
    let (_, t_nft) = timed(|| other.exec_ok(&["nft", "-f", &file.to_string_lossy()]));
    let _ = std::fs::remove_file(&file);
    println!(
        "| reference: `nft -f` of the same table | {} | the kernel plus nft's own parsing |",
        ms(t_nft)
    );

    // One policy's port changed.
    let mut samples = Vec::new();
    for round in 1..=5u16 {
        let (total, t) = timed(|| {
            let v2 = view(pods, policies, round);
            let c2 = compile(&v2, &l);
            table.apply(&c2.to_nft()).unwrap()
        });
        samples.push((t, total.messages));
    }
    let med = trellis_bench::median(samples.iter().map(|(t, _)| t.as_secs_f64()).collect());
    println!(
        "| one policy's port changed: rebuild the view, compile, apply | {} | {} messages (median of 5) |",
        ms(Duration::from_secs_f64(med)),
        samples[0].1
    );
    let (_, t_view) = timed(|| view(pods, policies, 9));
    println!(
        "| of which: making the view from JSON (stands for the watch) | {} | |",
        ms(t_view)
    );

    // One more client pod in ns-0: a peer of every ns-0 policy and of every team-t0 one.
    let mut v3 = view(pods, policies, 0);
    let (_, t_pod) = timed(|| {
        v3.pods.push(PodInfo {
            namespace: "ns-0".into(),
            name: "new".into(),
            labels: [("role".to_string(), "client".to_string())].into(),
            ips: vec![pod_ip(pods + 1)],
            node: "elsewhere".into(),
            ports: vec![],
        });
        let c3 = compile(&v3, &l);
        table.apply(&c3.to_nft()).unwrap()
    });
    println!(
        "| a pod added (a peer of ~40 policies): compile, apply | {} | |",
        ms(t_pod)
    );

    println!("\nRuleset size as the cluster grows (compiled for this node's {LOCAL} pods):\n");
    println!("| pods | policies | chains | rules | sets | set elements |\n|---|---|---|---|---|---|");
    for (p, n) in [(1000, 100), (5000, 100), (5000, 1000), (10000, 1000), (10000, 2000)] {
        let v = view(p, n, 0);
        let c = compile(&v, &local(&v));
        let elements: usize = c.sets.values().map(Vec::len).sum();
        println!(
            "| {p} | {n} | {} | {} | {} | {elements} |",
            c.chains.len(),
            c.lines(),
            c.sets.len()
        );
    }
    table.remove().unwrap();
}

// ---- `--dataplane`: the rules' cost on the wire -------------------------------------------

const POD_PREFIX: &str = "bpop";
const DIR: &str = "bench";
/// iperf3's port, and the one every policy allows.
const PORT: u16 = 5201;
/// The bridge of bridge mode.
const BRIDGE: &str = "bpbr0";

struct Opts {
    runs: usize,
    seconds: u32,
    connects: usize,
    modes: Vec<String>,
    trellis: PathBuf,
}

fn opts(args: &[String]) -> Opts {
    let mut o = Opts {
        runs: 5,
        seconds: 3,
        connects: 3000,
        modes: vec!["routed".into(), "bridge".into()],
        trellis: PathBuf::from("target/release/trellis"),
    };
    for pair in args.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--runs" => o.runs = v.parse().expect("--runs R"),
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--connects" => o.connects = v.parse().expect("--connects N"),
            "--modes" => o.modes = v.split(',').map(str::to_string).collect(),
            "--trellis" => o.trellis = v.into(),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(o.runs > 0 && o.seconds > 0 && o.connects > 0, "counts must be positive");
    // Absolute: the plugin runs under `ip netns exec` and finds trellis-ipam by CNI_PATH.
    o.trellis = o.trellis.canonicalize().unwrap_or_else(|e| {
        panic!(
            "{}: {e} (cargo build --release -p trellis -p trellis-ipam)",
            o.trellis.display()
        )
    });
    o
}

/// A pod wired by the plugin: its namespace, host-side interface and address.
struct Pod {
    ns: Netns,
    host_end: String,
    ip: IpAddr,
}

/// One node namespace with a client and a server pod wired by the `trellis` plugin in `mode`.
struct Pair {
    // Dropped in this order: the pods, the node (veths, bridge, rules), then the IPAM store.
    client: Pod,
    server: Pod,
    node: Netns,
    _dir: TempDir,
}

fn pair(o: &Opts, mode: &str) -> Pair {
    let node = Netns::new(NS_PREFIX);
    let dir = TempDir::new(DIR);
    let conf = json!({"cniVersion": "1.0.0", "name": "bpol", "type": "trellis", "mode": mode,
        "bridge": BRIDGE, "isGateway": true, "isDefaultGateway": true, "ipMasq": false, "mtu": 1450,
        "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.93.0.0/24"}]], "dataDir": dir.path()}});
    let wire = || {
        let ns = Netns::new(POD_PREFIX);
        let out = CniCall::new(&o.trellis, "ADD", conf.clone())
            .container(&ns.name)
            .netns(ns.path())
            .exec_in_netns(&node.name)
            .run();
        let result = out.ok();
        // The host end: the interface of the result outside the pod that is not the bridge.
        let host_end = result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i.get("sandbox").is_none())
            .filter_map(|i| i["name"].as_str())
            .find(|name| *name != BRIDGE)
            .unwrap_or_else(|| panic!("no host end in the ADD result {result}"))
            .to_string();
        let ip = out.ips()[0].parse().expect("pod address");
        Pod { ns, host_end, ip }
    };
    let (client, server) = (wire(), wire());
    assert!(
        reachable(&client.ns, &server.ip.to_string()),
        "{mode}: the server pod {} does not answer the client",
        server.ip
    );
    Pair {
        client,
        server,
        node,
        _dir: dir,
    }
}

/// Decoy pod `i`'s address (on another node; a peer set of its own).
fn decoy_ip(i: usize) -> IpAddr {
    format!("10.94.{}.{}", i / 250, 1 + i % 250).parse().unwrap()
}

/// `n` policies in namespace `bench`, all selecting both pods (`pair=yes`): policy `matching`
/// allows ingress on TCP `port` from the client, every other one (`i`) from decoy `i` only (and
/// with `egress`, egress likewise: to the server, to decoy `i`).
fn pair_view(p: &Pair, n: usize, egress: bool, port: u16, matching: usize) -> View {
    let mut v = View::default();
    v.namespaces.insert("bench".into(), Default::default());
    let pod = |name: &str, labels: &[(&str, &str)], ip: IpAddr, node: &str| PodInfo {
        namespace: "bench".into(),
        name: name.into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ips: vec![ip],
        node: node.into(),
        ports: vec![],
    };
    v.pods.push(pod(
        "client",
        &[("app", "client"), ("pair", "yes")],
        p.client.ip,
        "here",
    ));
    v.pods.push(pod(
        "server",
        &[("app", "server"), ("pair", "yes")],
        p.server.ip,
        "here",
    ));
    for i in (0..n).filter(|i| *i != matching) {
        v.pods.push(pod(
            &format!("decoy-{i}"),
            &[("decoy", &format!("d{i}"))],
            decoy_ip(i),
            "elsewhere",
        ));
    }
    for i in 0..n {
        let (from, to) = if i == matching {
            (json!({"app": "client"}), json!({"app": "server"}))
        } else {
            (json!({"decoy": format!("d{i}")}), json!({"decoy": format!("d{i}")}))
        };
        let mut spec = json!({"podSelector": {"matchLabels": {"pair": "yes"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": from}}], "ports": [{"port": port}]}]});
        if egress {
            spec["policyTypes"] = json!(["Ingress", "Egress"]);
            spec["egress"] = json!([{"to": [{"podSelector": {"matchLabels": to}}], "ports": [{"port": port}]}]);
        }
        let np: Value = json!({"metadata": {"namespace": "bench", "name": format!("p{i}")}, "spec": spec});
        v.policies
            .push(Policy::from_k8s(&serde_json::from_value(np).unwrap()).unwrap());
    }
    v
}

fn pair_local(p: &Pair) -> Vec<LocalPod> {
    [&p.client, &p.server]
        .iter()
        .map(|pod| LocalPod {
            ifname: pod.host_end.clone(),
            ips: vec![pod.ip],
            pod: None,
        })
        .collect()
}

/// One setup: a name, the state written (`None`: no policy table), the server's ingress chain
/// length, the client's egress chain length.
struct Setup {
    name: String,
    state: Option<PolicyState>,
    ingress_rules: usize,
    egress_rules: usize,
}

/// `n` policies (`egress`: both directions), the one matching the pair the last (else the first).
fn setup(p: &Pair, name: &str, n: usize, egress: bool, last: bool) -> Setup {
    let matching = if last { n.saturating_sub(1) } else { 0 };
    let c = compile(&pair_view(p, n, egress, PORT, matching), &pair_local(p));
    let rules = |map: &std::collections::BTreeMap<String, String>, pod: &Pod| {
        map.get(&pod.host_end).map_or(0, |chain| {
            let lines = &c.chains[chain];
            // The workload's promise: the line that lets the client in (out) is the last (first).
            let at = if last { lines.last() } else { lines.first() };
            assert_eq!(at.map(|l| l.policy.as_str()), Some(&*format!("bench/p{matching}")));
            assert_eq!(lines.len(), n, "one rule per policy");
            lines.len()
        })
    };
    Setup {
        name: name.into(),
        ingress_rules: rules(&c.ingress, &p.server),
        egress_rules: rules(&c.egress, &p.client),
        state: Some(c.to_nft()),
    }
}

/// A listener on the server's `PORT`, with a long accept queue (a full one drops SYNs: a 1 s
/// retransmit that would dwarf the rules' cost).
fn listen(server: &Pod) -> TcpListener {
    let l = run_in(server.ns.path(), || TcpListener::bind(("0.0.0.0", PORT)))
        .expect("enter the server pod")
        .expect("listen");
    // SAFETY: listen(2) on a socket we own; Linux takes a new backlog on a listening socket.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 4096) }, 0, "listen backlog");
    l
}

/// `n` TCP connections from `client` to `server`'s `PORT`, one after the other, each closed
/// with an RST (no TIME_WAIT to run out of ports): connections per second, and how many took
/// over 200 ms (a SYN lost and sent again).
fn connect_rate(client: &Pod, server: &Pod, n: usize) -> (f64, usize) {
    let listener = listen(server);
    let acceptor = std::thread::spawn(move || {
        for _ in 0..n {
            let _ = listener.accept();
        }
    });
    let to = SocketAddr::new(server.ip, PORT);
    let (elapsed, slow) = run_in(client.ns.path(), || {
        let t = Instant::now();
        let mut slow = 0;
        for _ in 0..n {
            let one = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(3)).expect("connect");
            if one.elapsed() > Duration::from_millis(200) {
                slow += 1;
            }
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a `linger` of the size given.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
        (t.elapsed(), slow)
    })
    .expect("enter the client pod");
    acceptor.join().expect("acceptor");
    (n as f64 / elapsed.as_secs_f64(), slow)
}

/// Whether the client can open a connection to the server's `PORT` (within 1 s).
fn connects(p: &Pair) -> bool {
    let _listener = listen(&p.server);
    let to = SocketAddr::new(p.server.ip, PORT);
    run_in(p.client.ns.path(), || {
        TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok()
    })
    .expect("enter the client pod")
}

fn dataplane_mode(o: &Opts, mode: &str) {
    let kind = match mode {
        "routed" => PortKind::Routed,
        "bridge" => PortKind::Bridged,
        other => panic!("unknown mode {other} (routed, bridge)"),
    };
    let p = pair(o, mode);
    let table = run_in(p.node.path(), || {
        // Bridge mode: bridged packets through the inet hooks (br_netfilter), as trellisd does.
        trellisd::policy::enforce::prepare(kind).unwrap();
        PolicyTable::new("trellis-policy", kind).unwrap()
    })
    .unwrap();
    let mut setups = vec![Setup {
        name: "no policy table".into(),
        state: None,
        ingress_rules: 0,
        egress_rules: 0,
    }];
    for n in [0, 100, 1000] {
        setups.push(setup(&p, &format!("{n} policies"), n, false, true));
    }
    setups.push(setup(&p, "1000 policies, ingress + egress", 1000, true, true));
    setups.push(setup(&p, "1000 policies, the matching rule first", 1000, false, false));

    // Is it real? With the last policy's port moved, nothing lets the client in.
    let closed = compile(&pair_view(&p, 1000, false, PORT + 1, 999), &pair_local(&p)).to_nft();
    if let Err(e) = table.apply(&closed) {
        println!("\n{mode} mode: not measured: writing the policy table failed: {e}\n");
        return;
    }
    assert!(
        !connects(&p),
        "{mode}: 1000 policies none of which allows the client, yet it connects"
    );
    table.apply(setups[3].state.as_ref().unwrap()).unwrap();
    assert!(
        connects(&p),
        "{mode}: the last of 1000 policies allows the client, yet it cannot connect"
    );

    println!(
        "\n{mode} mode: iperf3 -t {} and {} connections in a row, client pod to server pod on one node, \
         {} runs of every setup in rotating order (checked first: with the last rule's port moved the \
         client cannot connect)",
        o.seconds, o.connects, o.runs
    );
    let mut gbit: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for run in 0..o.runs {
        let mut line = format!("  run {}:", run + 1);
        for k in 0..setups.len() {
            let i = (run + k) % setups.len();
            match &setups[i].state {
                Some(s) => drop(table.apply(s).unwrap()),
                None => table.remove().unwrap(),
            }
            let g = iperf(&p.client.ns, &p.server.ns, &p.server.ip.to_string(), o.seconds);
            let (r, slow) = connect_rate(&p.client, &p.server, o.connects);
            gbit[i].push(g);
            rate[i].push(r);
            line.push_str(&format!(" {} {g:.2} Gbit/s {r:.0}/s", setups[i].name));
            if slow > 0 {
                line.push_str(&format!(" ({slow} connects over 200 ms)"));
            }
            line.push(';');
        }
        println!("{line}");
    }
    // The no-policy figure: the table as every enforcing node has it, nothing selecting the pods.
    // Percentages are the median of each run's ratio to it (the machine's load drifts between
    // runs far more than within one).
    let base = 1;
    let pct = |xs: &[Vec<f64>], i: usize| median((0..o.runs).map(|k| 100.0 * xs[i][k] / xs[base][k]).collect());
    println!(
        "\n| {mode} mode | server's ingress rules | client's egress rules | TCP throughput (median) | % of 0 policies | connections/s (median) | % of 0 policies |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (i, s) in setups.iter().enumerate() {
        println!(
            "| {} | {} | {} | {:.2} Gbit/s | {:.1}% | {:.0} | {:.1}% |",
            s.name,
            s.ingress_rules,
            s.egress_rules,
            median(gbit[i].clone()),
            pct(&gbit, i),
            median(rate[i].clone()),
            pct(&rate, i)
        );
    }
    println!("(%: the median over runs of the ratio to 0 policies in the same run)");
    table.remove().unwrap();
}

fn dataplane(o: &Opts) {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "NetworkPolicy on the wire: N policies select both pods, each allows TCP {PORT} from a peer of its \
         own; only the LAST rule of the server's chain (N rules) matches the client (unless said \
         \"first\"), so a new connection's first packet walks all N; {cpus} CPUs"
    );
    for mode in &o.modes {
        dataplane_mode(o, mode);
    }
}
