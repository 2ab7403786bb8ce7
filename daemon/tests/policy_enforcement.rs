//! NetworkPolicy enforced by the kernel, without the daemon: the upstream e2e model's nine pods
//! (namespaces x, y, z; pods a, b, c) wired by the real `trellis` plugin on one node, in routed
//! and in bridge mode, each serving TCP and UDP on ports 80 and 81; policies compiled
//! (`trellisd::policy::compile`), written by `PolicyTable` and the flows they deny cut
//! (`policy::enforce::revoke_denied_flows`), as trellisd does; then every pod connects to every
//! pod, both families, both protocols, both ports, and the matrix must be what the API
//! reference says (`policy::semantics`), at once — no waiting for anything.
//!
//! The cases run one after another on one table, so each is also an update of the last; a UDP
//! probe of a case can reuse the source port of an allowed probe of the one before, and passes
//! only if that flow's conntrack entry was revoked. Two nodes and the daemon:
//! `cluster_policy.rs`. SCTP traffic: none (no SCTP in this kernel; the rules for it are
//! generated all the same).

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use trellis_net::nft::{PolicyTable, PortKind};
use trellis_tests::probe::{Servers, Transport};
use trellis_tests::{CniCall, Netns, TempDir};
use trellisd::policy::compile::{compile, LocalPod};
use trellisd::policy::model::{PodInfo, Policy, Proto};
use trellisd::policy::semantics::{e2e_model, View};

use e2e_model::{NAMESPACES, PODS, PORTS};
fn plugin() -> std::path::PathBuf {
    trellis_tests::cni::sibling_binary(env!("CARGO_BIN_EXE_trellisd"), "trellis-ipam");
    trellis_tests::cni::sibling_binary(env!("CARGO_BIN_EXE_trellisd"), "trellis")
}

fn probe(from: &std::path::Path, to: SocketAddr, proto: Proto) -> bool {
    let t = match proto {
        Proto::Tcp => Transport::Tcp,
        Proto::Udp => Transport::Udp,
        Proto::Sctp => unreachable!("no SCTP traffic on this kernel"),
    };
    trellis_tests::probe::probe(from, to, t)
}

struct Pod {
    ns: Netns,
    info: PodInfo,
    host_end: String,
    _servers: Servers,
}

/// One node, nine pods wired by the plugin in `mode`, dual stack.
struct Lab {
    node: Netns,
    pods: Vec<Pod>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    _data: TempDir,
}

impl Lab {
    fn new(mode: &str) -> Lab {
        trellis_tests::require_root();
        let node = Netns::new("tpe");
        let data = TempDir::new("policy");
        let conf = json!({
            "cniVersion": "1.1.0", "name": "tpol", "type": "trellis", "mode": mode, "bridge": "tpbr0",
            "isGateway": true, "isDefaultGateway": true, "ipMasq": false, "mtu": 1400,
            "ipam": {"type": "trellis-ipam", "dataDir": data.path(),
                     "ranges": [[{"subnet": "10.89.0.0/24"}], [{"subnet": "fd00:89::/64"}]]},
        });
        let mut pods = Vec::new();
        let mut namespaces = BTreeMap::new();
        for ns_name in NAMESPACES {
            namespaces.insert(ns_name.to_string(), [("ns".to_string(), ns_name.to_string())].into());
            for pod_name in PODS {
                let ns = Netns::new("tpp");
                let mut call = CniCall::new(plugin(), "ADD", conf.clone())
                    .container(&format!("{ns_name}-{pod_name}-{}", ns.name))
                    .netns(ns.path());
                call.exec_in_netns = Some(node.name.clone());
                let out = call.run();
                let ips: Vec<IpAddr> = out.ips().iter().map(|ip| ip.parse().unwrap()).collect();
                let result: Value = out.ok();
                let host_end = result["interfaces"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i.get("sandbox").is_none() && i["name"] != "tpbr0")
                    .and_then(|i| i["name"].as_str())
                    .expect("the host end in the ADD result")
                    .to_string();
                let ports = e2e_model::ports();
                let info = PodInfo {
                    namespace: ns_name.into(),
                    name: pod_name.into(),
                    labels: [("pod".to_string(), pod_name.to_string())].into(),
                    ips,
                    node: "node1".into(),
                    ports,
                };
                let servers = Servers::start(ns.path(), &PORTS);
                pods.push(Pod {
                    ns,
                    info,
                    host_end,
                    _servers: servers,
                });
            }
        }
        Lab {
            node,
            pods,
            namespaces,
            _data: data,
        }
    }

    fn view(&self, policies: &[Value]) -> View {
        View {
            namespaces: self.namespaces.clone(),
            pods: self.pods.iter().map(|p| p.info.clone()).collect(),
            policies: policies
                .iter()
                .map(|p| Policy::from_k8s(&serde_json::from_value(p.clone()).unwrap()).unwrap())
                .collect(),
        }
    }

    /// Every (source, destination, family, protocol, port) whose outcome differs from `view`.
    fn mismatches(&self, view: &View) -> Vec<String> {
        let mut jobs = Vec::new();
        for s in &self.pods {
            for d in &self.pods {
                for dip in &d.info.ips {
                    for proto in [Proto::Tcp, Proto::Udp] {
                        for port in PORTS {
                            let sip = *s.info.ips.iter().find(|i| i.is_ipv4() == dip.is_ipv4()).unwrap();
                            let want = view.allowed(sip, *dip, proto, port);
                            let what = format!("{} -> {} {dip} {proto:?}/{port}", s.info.key(), d.info.key());
                            jobs.push((
                                s.ns.path().to_path_buf(),
                                SocketAddr::new(*dip, port),
                                proto,
                                want,
                                what,
                            ));
                        }
                    }
                }
            }
        }
        // All at once: blocked probes wait out their timeout together.
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(from, to, proto, want, what)| {
                std::thread::spawn(move || {
                    let got = probe(&from, to, proto);
                    (got != want).then(|| format!("{what}: {} (want {})", verdict(got), verdict(want)))
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "allowed"
    } else {
        "blocked"
    }
}

fn meta(ns: &str, name: &str) -> Value {
    json!({"namespace": ns, "name": name})
}

/// The cases, each a list of policies (the upstream e2e names where there is one).
fn cases() -> Vec<(&'static str, Vec<Value>)> {
    vec![
        ("no policy", vec![]),
        (
            "deny all ingress in x",
            vec![json!({"metadata": meta("x", "deny-all"), "spec": {"podSelector": {}}})],
        ),
        (
            "deny all egress in x",
            vec![json!({"metadata": meta("x", "deny-egress"), "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})],
        ),
        (
            "allow ingress to x/a from namespace y",
            vec![
                json!({"metadata": meta("x", "from-y"), "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}}),
            ],
        ),
        (
            "allow ingress to x/a from y/b only (both selectors in one peer)",
            vec![
                json!({"metadata": meta("x", "from-y-b"), "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
            ],
        ),
        (
            "named ports: ingress to x on serve-81-udp and TCP 80",
            vec![json!({"metadata": meta("x", "named"), "spec": {"podSelector": {},
                "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": 80}]}]}})],
        ),
        (
            "egress from y (not c) to named serve-80-tcp anywhere",
            vec![
                json!({"metadata": meta("y", "egress-named"), "spec": {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]}}),
            ],
        ),
        (
            "endPort: ingress to z on UDP 80-81, TCP 81",
            vec![json!({"metadata": meta("z", "range"), "spec": {"podSelector": {},
                "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}, {"port": 81, "endPort": 81}]}]}})],
        ),
        (
            "two policies on x/b: the union",
            vec![
                json!({"metadata": meta("x", "p1"), "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                    "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}}),
                json!({"metadata": meta("x", "p2"), "spec": {"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]},
                    "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["z"]}]}}]}]}}),
            ],
        ),
    ]
}

/// ipBlock cases need the pods' real addresses: x/b's own, and the IPv4 range minus it.
fn ip_block_case(lab: &Lab) -> (&'static str, Vec<Value>) {
    let xb = &lab.pods[1].info.ips;
    let except: Vec<String> = xb
        .iter()
        .map(|ip| {
            if ip.is_ipv4() {
                format!("{ip}/32")
            } else {
                format!("{ip}/128")
            }
        })
        .collect();
    (
        "ipBlock with except: ingress to y from 10.89.0.0/24 but x/b, and fd00:89::/64 but x/b",
        vec![json!({"metadata": meta("y", "block"), "spec": {"podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.89.0.0/24", "except": [except[0]]}},
                                  {"ipBlock": {"cidr": "fd00:89::/64", "except": [except[1]]}}]}]}})],
    )
}

fn run(mode: &str) {
    println!("SCTP: this kernel has no SCTP; SCTP traffic is not probed (its rules are generated the same way)");
    let lab = Lab::new(mode);
    let kind = if mode == "routed" {
        PortKind::Routed
    } else {
        PortKind::Bridged
    };
    let table = trellis_net::netns::run_in(lab.node.path(), || {
        trellisd::policy::enforce::prepare(kind).unwrap();
        PolicyTable::new("trellis-policy", kind).unwrap()
    })
    .unwrap();
    let local: Vec<LocalPod> = lab
        .pods
        .iter()
        .map(|p| LocalPod {
            ifname: p.host_end.clone(),
            ips: p.info.ips.clone(),
            pod: Some(p.info.key()),
        })
        .collect();
    let mut all = cases();
    all.push(ip_block_case(&lab));
    let mut failures = Vec::new();
    for (name, policies) in all {
        let view = lab.view(&policies);
        let compiled = compile(&view, &local);
        table
            .apply(&compiled.to_nft())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        trellis_net::netns::run_in(lab.node.path(), || {
            trellisd::policy::enforce::revoke_denied_flows(&compiled, &local)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: revoking flows: {e}"));
        let wrong = lab.mismatches(&view);
        if !wrong.is_empty() {
            let ruleset = lab.node.exec_ok(&["nft", "list", "table", "inet", "trellis-policy"]);
            failures.push(format!("{name}:\n  {}\nruleset:\n{ruleset}", wrong.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn routed_mode_every_pod_pair_both_families_as_the_api_reference_says() {
    run("routed");
}

#[test]
fn bridge_mode_every_pod_pair_both_families_as_the_api_reference_says() {
    run("bridge");
}
