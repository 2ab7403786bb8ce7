//! NetworkPolicy end to end on two nodes: real `trellisd` processes on the Kubernetes datastore
//! — the tests' **stand-in** API server (`tests/src/kube_apiserver/`), not a cluster — in routed
//! mode, with Namespace, Pod and NetworkPolicy objects describing the real pods the plugin
//! wired; every pod connects to every pod (IPv4 and IPv6, TCP and UDP, ports 80 and 81) across
//! the nodes, and the matrix must become what the API reference says (`policy::semantics`) after
//! each policy change, within a few seconds.

use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use trellis_tests::cluster::{Cluster, Options, Stack};
use trellis_tests::kube_apiserver::{NAMESPACES, NETWORK_POLICIES, PODS};
use trellis_tests::probe::{probe, Servers, Transport};
use trellisd::policy::model::{Policy, Proto};
use trellisd::policy::semantics::View;
use trellisd::policy::source::pod_info;

const PORTS: [u16; 2] = [80, 81];
/// (namespace, pod, node index).
const LAYOUT: [(&str, &str, usize); 4] = [("x", "a", 0), ("x", "b", 1), ("y", "c", 0), ("y", "d", 1)];

fn trellisd() -> std::path::PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

fn pod_object(ns: &str, name: &str, node: usize, ips: &[String]) -> Value {
    let ports: Vec<Value> = PORTS
        .iter()
        .flat_map(|p| {
            [
                json!({"name": format!("serve-{p}-tcp"), "containerPort": p}),
                json!({"name": format!("serve-{p}-udp"), "containerPort": p, "protocol": "UDP"}),
            ]
        })
        .collect();
    let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({"metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
           "spec": {"nodeName": format!("node{}", node + 1), "containers": [{"name": "c", "ports": ports}]},
           "status": {"phase": "Running", "podIPs": ips}})
}

/// Every (source, destination address, transport, port) whose outcome is not what `view`
/// says; probes run all at once.
fn mismatches(c: &Cluster, view: &View) -> Vec<String> {
    let mut jobs = Vec::new();
    for (si, s) in c.pods.iter().enumerate() {
        for (di, d) in c.pods.iter().enumerate() {
            for dip in &d.ips {
                let dip: IpAddr = dip.parse().unwrap();
                let sip: IpAddr = s
                    .ips
                    .iter()
                    .map(|i| i.parse::<IpAddr>().unwrap())
                    .find(|i| i.is_ipv4() == dip.is_ipv4())
                    .unwrap();
                for (t, proto) in [(Transport::Tcp, Proto::Tcp), (Transport::Udp, Proto::Udp)] {
                    for port in PORTS {
                        let want = view.allowed(sip, dip, proto, port);
                        let what = format!("{} -> {} {dip} {proto:?}/{port}", LAYOUT[si].1, LAYOUT[di].1);
                        jobs.push((s.ns.path().to_path_buf(), SocketAddr::new(dip, port), t, want, what));
                    }
                }
            }
        }
    }
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(from, to, t, want, what)| {
            std::thread::spawn(move || {
                let got = probe(&from, to, t);
                (got != want).then(|| format!("{what}: got {got}, want {want}"))
            })
        })
        .collect();
    handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
}

#[test]
fn network_policy_across_two_nodes_routed_mode_both_families() {
    let net_conf = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56",
                       "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}"#;
    let options = Options {
        kube: Some(vec![
            vec!["10.244.1.0/24".into(), "fd00:244:0:1::/64".into()],
            vec!["10.244.2.0/24".into(), "fd00:244:0:2::/64".into()],
        ]),
        underlay: Stack::V4,
        ..Options::default()
    };
    let mut c = Cluster::with_options(
        2,
        net_conf,
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5", "--cni-mode", "routed"],
        options,
    );
    for (_, _, node) in LAYOUT {
        c.add_pod(node);
    }
    let _servers: Vec<Servers> = c.pods.iter().map(|p| Servers::start(p.ns.path(), &PORTS)).collect();
    let api = c.api();
    let mut view = View::default();
    for ns in ["x", "y"] {
        api.create(&NAMESPACES, json!({"metadata": {"name": ns, "labels": {"ns": ns}}}));
        view.namespaces
            .insert(ns.into(), [("ns".to_string(), ns.to_string())].into());
    }
    for (i, (ns, name, node)) in LAYOUT.iter().enumerate() {
        let obj = api.create(&PODS, pod_object(ns, name, *node, &c.pods[i].ips));
        view.pods.push(pod_info(&serde_json::from_value(obj).unwrap()).unwrap());
    }

    let meta = |name: &str, ns: &str| json!({"namespace": ns, "name": name});
    let cases: Vec<(&str, Vec<Value>)> = vec![
        ("no policy", vec![]),
        (
            "deny all ingress in x",
            vec![json!({"metadata": meta("deny", "x"), "spec": {"podSelector": {}}})],
        ),
        (
            "x accepts namespace y on serve-80-tcp only",
            vec![json!({"metadata": meta("from-y", "x"), "spec": {"podSelector": {},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"port": "serve-80-tcp"}]}]}})],
        ),
        (
            "y/d sends nowhere but UDP 81",
            vec![
                json!({"metadata": meta("egress", "y"), "spec": {"podSelector": {"matchLabels": {"pod": "d"}}, "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}}),
            ],
        ),
    ];
    let mut applied: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    for (name, policies) in cases {
        for key in applied.drain(..) {
            api.delete(&NETWORK_POLICIES, &key);
        }
        view.policies.clear();
        for p in &policies {
            let obj = api.create(&NETWORK_POLICIES, p.clone());
            applied.push(format!(
                "{}/{}",
                obj["metadata"]["namespace"].as_str().unwrap(),
                obj["metadata"]["name"].as_str().unwrap()
            ));
            view.policies
                .push(Policy::from_k8s(&serde_json::from_value(obj).unwrap()).unwrap());
        }
        // The daemons follow within a second or two: the matrix must get there.
        let t = Instant::now();
        let wrong = loop {
            let wrong = mismatches(&c, &view);
            if wrong.is_empty() || t.elapsed() > Duration::from_secs(15) {
                break wrong;
            }
        };
        if !wrong.is_empty() {
            let tables: String = (0..2)
                .map(|i| {
                    c.nodes[i]
                        .ns
                        .exec_ok(&["nft", "list", "table", "inet", "trellis-policy"])
                })
                .collect();
            failures.push(format!(
                "{name}:\n  {}\n{tables}\nnode1 log:\n{}",
                wrong.join("\n  "),
                c.log(0)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
