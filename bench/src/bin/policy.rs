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
//! Run (as root): `cargo build --release -p trellis-bench && target/release/policy`.

use serde_json::json;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use trellis_bench::{cleanup, ms};
use trellis_net::nft::{PolicyTable, PortKind};
use trellis_tests::Netns;
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
    cleanup::on_panic(&[NS_PREFIX], &[]);
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
