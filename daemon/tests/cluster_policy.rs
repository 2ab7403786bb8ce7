//! NetworkPolicy end to end on two nodes, the upstream e2e model's truth tables: real `trellisd`
//! processes on the Kubernetes datastore — the tests' **stand-in** API server
//! (`tests/src/kube_apiserver/`), not a cluster — in routed and in bridge mode, dual stack.
//!
//! Namespaces x, y, z with pods a, b, c each (labels `ns` and `pod`, as upstream's model),
//! spread over the two nodes and wired by the real plugin as kubelet calls it; every pod serves
//! TCP and UDP on ports 80 and 81. After each change to the API objects — policies created,
//! updated and deleted, namespace and pod labels changed, a pod re-created with a new address —
//! every pod connects to every pod over IPv4 and IPv6, TCP and UDP, both ports, and the
//! matrix must become what the API reference says (`policy::semantics`) within seconds.
//!
//! SCTP: this kernel has no SCTP, so SCTP traffic is not probed; the cases with SCTP ports
//! check that they open nothing else, and `policy::compile`'s tests check the SCTP rules.
//!
//! Also here: the start window (a new pod sends the instant ADD returns, while its node's
//! trellisd is stopped: not one packet against policy gets through), and existing flows cut
//! when a policy change denies them.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_tests::cluster::{Cluster, Options, Stack};
use trellis_tests::kube_apiserver::{NAMESPACES, NETWORK_POLICIES, PODS};
use trellis_tests::probe::{probe, Servers, Transport};
use trellisd::policy::model::{Policy, Proto};
use trellisd::policy::semantics::e2e_model;
use trellisd::policy::semantics::View;
use trellisd::policy::source::pod_info;

const PORTS: [u16; 2] = e2e_model::PORTS;
/// How long the daemons get to follow a change (they take well under a second).
const CONVERGE: Duration = Duration::from_secs(20);

fn trellisd() -> std::path::PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

fn pod_object(ns: &str, name: &str, node: usize, ips: &[String]) -> Value {
    let ports: Vec<Value> = e2e_model::ports()
        .iter()
        .map(|p| json!({"name": p.name, "containerPort": p.port, "protocol": p.proto.name()}))
        .collect();
    let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let status = if ips.is_empty() {
        json!({"phase": "Pending"})
    } else {
        json!({"phase": "Running", "podIPs": ips})
    };
    json!({"metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
           "spec": {"nodeName": format!("node{}", node + 1), "containers": [{"name": "c", "ports": ports}]},
           "status": status})
}

fn meta(ns: &str, name: &str) -> Value {
    json!({"namespace": ns, "name": name})
}

/// Two nodes, the model's pods, the API objects, and the view the matrix is checked against.
struct Lab {
    c: Cluster,
    view: View,
    /// `namespace/name` → index in `c.pods`.
    pods: BTreeMap<String, usize>,
    servers: BTreeMap<usize, Servers>,
    /// Policies in the API: `namespace/name` → object.
    policies: BTreeMap<String, Value>,
}

impl Lab {
    /// `pods`: (namespace, name, node).
    fn new(mode: &'static str, pods: &[(&str, &str, usize)]) -> Lab {
        Lab::with_args(mode, pods, &[])
    }

    /// [`Lab::new`] with more trellisd flags.
    fn with_args(mode: &'static str, pods: &[(&str, &str, usize)], more: &[&str]) -> Lab {
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
        let c = Cluster::with_options(
            2,
            net_conf,
            &trellisd(),
            &[&["--lease-ttl", "10", "--resync", "5", "--cni-mode", mode], more].concat(),
            options,
        );
        let mut lab = Lab {
            c,
            view: View::default(),
            pods: BTreeMap::new(),
            servers: BTreeMap::new(),
            policies: BTreeMap::new(),
        };
        for ns in e2e_model::NAMESPACES {
            lab.c
                .api()
                .create(&NAMESPACES, json!({"metadata": {"name": ns, "labels": {"ns": ns}}}));
        }
        for (ns, name, node) in pods {
            lab.add_pod(ns, name, *node);
        }
        lab.refresh_view();
        lab
    }

    /// As the scheduler, kubelet and the runtime do: the Pod object, ADD, the addresses
    /// reported, the servers started.
    fn add_pod(&mut self, ns: &str, name: &str, node: usize) -> usize {
        self.c.api().create(&PODS, pod_object(ns, name, node, &[]));
        let i = self.c.add_k8s_pod(node, ns, name);
        let ips = self.c.pods[i].ips.clone();
        self.c.api().update(&PODS, &format!("{ns}/{name}"), |o| {
            *o = pod_object(ns, name, node, &ips)
        });
        self.servers.insert(i, Servers::start(self.c.pods[i].ns.path(), &PORTS));
        self.pods.insert(format!("{ns}/{name}"), i);
        i
    }

    /// The view from the API's objects, as trellisd folds them.
    fn refresh_view(&mut self) {
        let store = self.c.api();
        let mut v = View::default();
        for ns in store.all(&NAMESPACES) {
            let labels = serde_json::from_value(ns["metadata"]["labels"].clone()).unwrap_or_default();
            v.namespaces
                .insert(ns["metadata"]["name"].as_str().unwrap().to_string(), labels);
        }
        for p in store.all(&PODS) {
            v.pods
                .extend(pod_info(&serde_json::from_value(p).unwrap()).filter(|p| !p.ips.is_empty()));
        }
        for p in store.all(&NETWORK_POLICIES) {
            v.policies
                .push(Policy::from_k8s(&serde_json::from_value(p).unwrap()).unwrap());
        }
        self.view = v;
    }

    /// Makes the API hold exactly `policies`: deleted, updated in place, created.
    fn set_policies(&mut self, policies: &[Value]) {
        let api = self.c.api();
        let want: BTreeMap<String, Value> = policies
            .iter()
            .map(|p| {
                let key = format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap(),
                    p["metadata"]["name"].as_str().unwrap()
                );
                (key, p.clone())
            })
            .collect();
        for key in self.policies.keys().filter(|k| !want.contains_key(*k)) {
            api.delete(&NETWORK_POLICIES, key);
        }
        for (key, p) in &want {
            match self.policies.get(key) {
                Some(old) if old == p => {}
                Some(_) => {
                    let spec = p["spec"].clone();
                    api.update(&NETWORK_POLICIES, key, |o| o["spec"] = spec);
                }
                None => {
                    api.create(&NETWORK_POLICIES, p.clone());
                }
            }
        }
        self.policies = want;
        self.refresh_view();
    }

    fn ips(&self, key: &str) -> Vec<IpAddr> {
        self.c.pods[self.pods[key]]
            .ips
            .iter()
            .map(|i| i.parse().unwrap())
            .collect()
    }

    /// Every (source, destination address, transport, port) whose outcome is not what the
    /// view says; probes run all at once.
    fn mismatches(&self) -> Vec<String> {
        let mut jobs = Vec::new();
        for (skey, &si) in &self.pods {
            for (dkey, &di) in &self.pods {
                for dip in self.ips(dkey) {
                    let sip = *self.ips(skey).iter().find(|i| i.is_ipv4() == dip.is_ipv4()).unwrap();
                    for (t, proto) in [(Transport::Tcp, Proto::Tcp), (Transport::Udp, Proto::Udp)] {
                        for port in PORTS {
                            let want = self.view.allowed(sip, dip, proto, port);
                            let what = format!("{skey} -> {dkey} {dip} {proto:?}/{port}");
                            let from = self.c.pods[si].ns.path().to_path_buf();
                            jobs.push((from, SocketAddr::new(dip, port), t, want, what));
                        }
                    }
                }
                let _ = di;
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
        let mut out: Vec<String> = handles.into_iter().filter_map(|h| h.join().unwrap()).collect();
        out.sort();
        out
    }

    /// Waits for the matrix to be the view's; the mismatches left after [`CONVERGE`].
    fn converge(&self) -> Vec<String> {
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        loop {
            let wrong = self.mismatches();
            if wrong.is_empty() || t.elapsed() > CONVERGE {
                return wrong;
            }
        }
    }

    fn tables(&self) -> String {
        (0..2)
            .map(|i| {
                format!(
                    "node{}:\n{}",
                    i + 1,
                    self.c.nodes[i]
                        .ns
                        .exec_ok(&["nft", "list", "table", "inet", "trellis-policy"])
                )
            })
            .collect()
    }
}

/// Waits (the enforcer reads its counters every second) for node `i`'s metric `name` to
/// satisfy `ok`; its last value.
fn metric_until(c: &Cluster, i: usize, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let t = Instant::now();
    loop {
        let v = c.metric(i, name);
        if ok(v) || t.elapsed() > Duration::from_secs(10) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The model's nine pods, alternating over the two nodes.
fn model_layout() -> Vec<(&'static str, &'static str, usize)> {
    let mut out = Vec::new();
    for (n, ns) in e2e_model::NAMESPACES.iter().enumerate() {
        for (p, pod) in e2e_model::PODS.iter().enumerate() {
            out.push((*ns, *pod, (n * 3 + p) % 2));
        }
    }
    out
}

/// One step of the truth tables: a change to the API objects.
enum Change {
    Policies(Vec<Value>),
    NamespaceLabels(&'static str, Value),
    PodLabels(&'static str, Value),
    Recreate(&'static str),
    /// Someone deletes the policy table on both nodes (`nft delete table`, a flush).
    DeleteTables,
}

fn host(ip: IpAddr) -> String {
    if ip.is_ipv4() {
        format!("{ip}/32")
    } else {
        format!("{ip}/128")
    }
}

/// The cases: (name, change). Policies not named in a `Policies` change are deleted.
fn cases(lab: &Lab) -> Vec<(String, Change)> {
    use Change::*;
    let p = |ns: &str, name: &str, spec: Value| json!({"metadata": meta(ns, name), "spec": spec});
    let ya = lab.ips("y/a");
    let xb = lab.ips("x/b");
    let z: Vec<Value> = ["z/a", "z/b", "z/c"]
        .iter()
        .flat_map(|k| lab.ips(k))
        .map(|ip| json!({"ipBlock": {"cidr": host(ip)}}))
        .collect();
    let from_y = p(
        "x",
        "from-y",
        json!({"podSelector": {"matchLabels": {"pod": "a"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    );
    let mut v: Vec<(&str, Change)> = vec![
        ("no policy", Policies(vec![])),
        (
            "deny all ingress in x",
            Policies(vec![p("x", "deny", json!({"podSelector": {}}))]),
        ),
        (
            "deny all egress in x",
            Policies(vec![p(
                "x",
                "deny-egress",
                json!({"podSelector": {}, "policyTypes": ["Egress"]}),
            )]),
        ),
        (
            "deny all ingress and egress in x",
            Policies(vec![p(
                "x",
                "deny-both",
                json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
            )]),
        ),
        (
            "empty ingress list in y is deny all",
            Policies(vec![p(
                "y",
                "empty",
                json!({"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}),
            )]),
        ),
        (
            "allow all ingress in x ({} rule) next to deny all",
            Policies(vec![
                p("x", "deny", json!({"podSelector": {}})),
                p("x", "allow-all", json!({"podSelector": {}, "ingress": [{}]})),
            ]),
        ),
        (
            "allow all egress in x next to deny all egress",
            Policies(vec![
                p(
                    "x",
                    "deny-egress",
                    json!({"podSelector": {}, "policyTypes": ["Egress"]}),
                ),
                p(
                    "x",
                    "allow-egress",
                    json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
                ),
            ]),
        ),
        ("allow ingress to x/a from namespace y", Policies(vec![from_y.clone()])),
        (
            "policy updated: x/a from namespace z instead",
            Policies(vec![p(
                "x",
                "from-y",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
            )]),
        ),
        ("policy updated back: from namespace y", Policies(vec![from_y.clone()])),
        (
            "namespace y relabelled ns=y2: x/a closed to it",
            NamespaceLabels("y", json!({"ns": "y2"})),
        ),
        ("namespace y labelled back", NamespaceLabels("y", json!({"ns": "y"}))),
        (
            "allow ingress to x/a from y/b only (both selectors in one peer)",
            Policies(vec![p(
                "x",
                "from-y-b",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                              "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )]),
        ),
        (
            "pod y/b relabelled pod=bb: no longer allowed",
            PodLabels("y/b", json!({"pod": "bb"})),
        ),
        ("pod y/b labelled back", PodLabels("y/b", json!({"pod": "b"}))),
        (
            "ingress to x/a from namespace y or pod b of x (two peers)",
            Policies(vec![p(
                "x",
                "two-peers",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                             {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )]),
        ),
        (
            "ingress to x from pods b of every namespace",
            Policies(vec![p(
                "x",
                "from-any-b",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            )]),
        ),
        (
            "ingress to x from every namespace (namespaceSelector {})",
            Policies(vec![p(
                "x",
                "from-all-ns",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
            )]),
        ),
        (
            "ingress to x from its own namespace only",
            Policies(vec![p(
                "x",
                "same-ns",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
            )]),
        ),
        (
            "ingress to x from namespaces NotIn [y]",
            Policies(vec![p(
                "x",
                "not-y",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {
                    "matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}]}),
            )]),
        ),
        (
            "ingress to z/c (In [c]) from pods where pod Exists in y",
            Policies(vec![p(
                "z",
                "exists",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["c"]}]},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                              "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}}]}]}),
            )]),
        ),
        (
            "ingress to z from pods without a label app (DoesNotExist) of x",
            Policies(vec![p(
                "z",
                "no-app",
                json!({"podSelector": {},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                              "podSelector": {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}}]}]}),
            )]),
        ),
        (
            "ingress to x on TCP 80 only",
            Policies(vec![p(
                "x",
                "tcp80",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
            )]),
        ),
        (
            "policy updated: UDP 81 only",
            Policies(vec![p(
                "x",
                "tcp80",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
            )]),
        ),
        (
            "named port: ingress to x on serve-80-tcp",
            Policies(vec![p(
                "x",
                "named",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
            )]),
        ),
        (
            "named ports: ingress to x on serve-81-udp and TCP 80",
            Policies(vec![p(
                "x",
                "named2",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}, {"port": 80}]}]}),
            )]),
        ),
        (
            "endPort: ingress to z on TCP 80-81",
            Policies(vec![p(
                "z",
                "range",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 81}]}]}),
            )]),
        ),
        (
            "endPort: ingress to z on UDP 80-81 and TCP 81-81",
            Policies(vec![p(
                "z",
                "range2",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 81, "protocol": "UDP"}, {"port": 81, "endPort": 81}]}]}),
            )]),
        ),
        (
            "SCTP only: ingress to y on SCTP 80 (TCP and UDP blocked)",
            Policies(vec![p(
                "y",
                "sctp",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
            )]),
        ),
        (
            "SCTP named port serve-81-sctp and TCP 81 into y",
            Policies(vec![p(
                "y",
                "sctp-named",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-sctp", "protocol": "SCTP"}, {"port": 81}]}]}),
            )]),
        ),
        (
            "egress from x to namespace y only",
            Policies(vec![p(
                "x",
                "to-y",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
            )]),
        ),
        (
            "egress from y (not c) to named serve-80-tcp anywhere",
            Policies(vec![p(
                "y",
                "egress-named",
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
                       "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-80-tcp"}]}]}),
            )]),
        ),
        (
            "egress from x to DNS only (UDP and TCP 53)",
            Policies(vec![p(
                "x",
                "dns-only",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                       "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}),
            )]),
        ),
        (
            "egress from x to z's pods by ipBlock",
            Policies(vec![p(
                "x",
                "to-z-blocks",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": z}]}),
            )]),
        ),
        (
            "ipBlock: ingress to x from y/a's addresses",
            Policies(vec![p(
                "x",
                "from-ya",
                json!({"podSelector": {}, "ingress": [{"from": ya.iter().map(|ip| json!({"ipBlock": {"cidr": host(*ip)}})).collect::<Vec<_>>()}]}),
            )]),
        ),
        (
            "ipBlock with except: ingress to y from the pod networks but x/b",
            Policies(vec![p(
                "y",
                "block",
                json!({"podSelector": {}, "ingress": [{"from": [
                    {"ipBlock": {"cidr": "10.244.0.0/16", "except": [host(xb[0])]}},
                    {"ipBlock": {"cidr": "fd00:244::/56", "except": [host(xb[1])]}}]}]}),
            )]),
        ),
        (
            "two policies on x/b: the union",
            Policies(vec![
                p(
                    "x",
                    "p1",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}},
                           "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}),
                ),
                p(
                    "x",
                    "p2",
                    json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]},
                           "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["z"]}]}}]}]}),
                ),
            ]),
        ),
        (
            "one of the two deleted: the union shrinks",
            Policies(vec![p(
                "x",
                "p1",
                json!({"podSelector": {"matchLabels": {"pod": "b"}},
                       "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80}]}]}),
            )]),
        ),
        (
            "ingress and egress together: x/a from y, y sends only to x",
            Policies(vec![
                from_y.clone(),
                p(
                    "y",
                    "only-to-x",
                    json!({"podSelector": {}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "x"}}}]}]}),
                ),
            ]),
        ),
        (
            "deny all ingress in every namespace",
            Policies(
                e2e_model::NAMESPACES
                    .iter()
                    .map(|ns| p(ns, "deny", json!({"podSelector": {}})))
                    .collect(),
            ),
        ),
        (
            "the policy tables deleted on both nodes: rebuilt as they were",
            DeleteTables,
        ),
        (
            "a policy selecting no pod changes nothing",
            Policies(vec![p(
                "x",
                "nobody",
                json!({"podSelector": {"matchLabels": {"pod": "nobody"}}, "policyTypes": ["Ingress", "Egress"]}),
            )]),
        ),
        (
            "pod label change makes a policy select x/c",
            Policies(vec![p(
                "x",
                "select-web",
                json!({"podSelector": {"matchLabels": {"app": "web"}}}),
            )]),
        ),
        (
            "x/c labelled app=web: now isolated",
            PodLabels("x/c", json!({"pod": "c", "app": "web"})),
        ),
        ("x/c label app removed", PodLabels("x/c", json!({"pod": "c"}))),
        ("ingress to x/a from namespace y, again", Policies(vec![from_y.clone()])),
        ("y/a re-created with a new address: still allowed", Recreate("y/a")),
        (
            "ipBlock of y/a's new address",
            Policies(vec![p(
                "x",
                "from-new-ya",
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16"}}, {"ipBlock": {"cidr": "fd00:244::/56"}}]}]}),
            )]),
        ),
        ("all policies deleted", Policies(vec![])),
    ];
    v.drain(..).map(|(n, c)| (n.to_string(), c)).collect()
}

fn truth_tables(mode: &'static str) {
    println!("SCTP: this kernel has no SCTP; SCTP traffic is not probed (its rules are generated and checked in policy::compile's tests)");
    let mut lab = Lab::new(mode, &model_layout());
    let all = cases(&lab);
    assert!(all.len() >= 40, "{} cases", all.len());
    let mut failures = Vec::new();
    for (name, change) in all {
        let api = lab.c.api();
        match change {
            Change::Policies(ps) => lab.set_policies(&ps),
            Change::NamespaceLabels(ns, labels) => {
                api.update(&NAMESPACES, ns, |o| o["metadata"]["labels"] = labels);
                lab.refresh_view();
            }
            Change::PodLabels(key, labels) => {
                api.update(&PODS, key, |o| o["metadata"]["labels"] = labels);
                lab.refresh_view();
            }
            Change::DeleteTables => {
                for n in &lab.c.nodes {
                    n.ns.exec_ok(&["nft", "delete", "table", "inet", "trellis-policy"]);
                }
            }
            Change::Recreate(key) => {
                let old = lab.pods[key];
                let (old_ips, node) = (lab.c.pods[old].ips.clone(), lab.c.pods[old].node);
                lab.servers.remove(&old);
                lab.c.del_pod(old);
                api.delete(&PODS, key);
                let (ns, name) = key.split_once('/').unwrap();
                let new = lab.add_pod(ns, name, node);
                assert_ne!(lab.c.pods[new].ips, old_ips, "{key} got its old addresses back");
                lab.refresh_view();
            }
        }
        let wrong = lab.converge();
        println!(
            "{mode}: {name}: {}",
            if wrong.is_empty() {
                "as the API reference says"
            } else {
                "WRONG"
            }
        );
        if !wrong.is_empty() {
            failures.push(format!(
                "{name}:\n  {}\n{}\nnode1 log:\n{}",
                wrong.join("\n  "),
                lab.tables(),
                lab.c.log(0)
            ));
        }
    }
    assert!(failures.is_empty(), "{mode} mode:\n{}", failures.join("\n\n"));
}

#[test]
fn policy_truth_tables_two_nodes_routed_mode_both_families() {
    truth_tables("routed");
}

#[test]
fn policy_truth_tables_two_nodes_bridge_mode_both_families() {
    truth_tables("bridge");
}

/// A UDP sender in `from` that sends to `to` every 10 ms from one socket until stopped;
/// counts the answers.
struct Flow {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flow {
    fn start(from: &std::path::Path, to: SocketAddr) -> Flow {
        let sock = trellis_net::netns::run_in(from, || {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            UdpSocket::bind(any).unwrap()
        })
        .unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let (stop, answers) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (s, a) = (Arc::clone(&stop), Arc::clone(&answers));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !s.load(Ordering::Relaxed) {
                let _ = sock.send_to(b"ping", to);
                if sock.recv_from(&mut buf).is_ok() {
                    a.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Flow {
            stop,
            answers,
            thread: Some(thread),
        }
    }

    fn answers(&self) -> usize {
        self.answers.load(Ordering::Relaxed)
    }

    /// Waits until no answer came for `quiet`; false if answers still come at `within`.
    fn goes_quiet(&self, quiet: Duration, within: Duration) -> bool {
        let t = Instant::now();
        let (mut last, mut since) = (self.answers(), Instant::now());
        while t.elapsed() < within {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.answers();
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP flow that policy allowed keeps its conntrack entry: without the enforcer revoking the
/// entries a change denies, `ct state established` would keep it going (and a new socket
/// reusing its ports would pass too). Both families, both modes, on one node and across the
/// two; then the policy goes and the same flows are answered again.
fn existing_flows_cut(mode: &'static str) {
    let mut lab = Lab::new(mode, &[("x", "a", 0), ("y", "b", 1), ("y", "c", 0)]);
    let flows: Vec<(String, Flow)> = ["y/b", "y/c"]
        .iter()
        .flat_map(|src| {
            let from = lab.c.pods[lab.pods[*src]].ns.path().to_path_buf();
            lab.ips("x/a").into_iter().map(move |ip| {
                (
                    format!("{src} -> x/a {ip}"),
                    Flow::start(&from, SocketAddr::new(ip, 81)),
                )
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for (what, f) in &flows {
        assert!(f.answers() > 0, "{what}: no answers before any policy");
    }
    // Allow only y/b: y/c's flows must stop, y/b's go on.
    lab.set_policies(&[json!({"metadata": meta("x", "only-y-b"), "spec": {"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}})]);
    for (what, f) in &flows {
        if what.starts_with("y/c") {
            assert!(
                f.goes_quiet(Duration::from_secs(1), CONVERGE),
                "{mode}: {what}: the flow policy now denies still gets answers\n{}\nnode1 log:\n{}",
                lab.tables(),
                lab.c.log(0)
            );
        }
    }
    for (what, f) in &flows {
        if what.starts_with("y/b") {
            let before = f.answers();
            std::thread::sleep(Duration::from_millis(500));
            assert!(f.answers() > before, "{mode}: {what}: the allowed flow was cut");
        }
    }
    assert!(
        lab.c
            .log(0)
            .contains("existing connections follow the new NetworkPolicy"),
        "{}",
        lab.c.log(0)
    );
    // y/c is on node1, with x/a: its two flows revoked there, their packets counted.
    let revoked = metric_until(&lab.c, 0, "trellisd_policy_flows_revoked_total", |v| v >= 2.0);
    assert!(revoked >= 2.0, "{mode}: flows revoked: {revoked}");
    let dropped = metric_until(
        &lab.c,
        0,
        "trellisd_policy_dropped_packets_total{reason=\"revoked\"}",
        |v| v > 0.0,
    );
    assert!(dropped > 0.0, "{mode}: packets of revoked flows dropped: {dropped}");
    // The policy gone, the revoked flows (the same sockets, the same conntrack entries) are
    // allowed again.
    lab.set_policies(&[]);
    for (what, f) in &flows {
        let (before, t) = (f.answers(), Instant::now());
        while f.answers() == before && t.elapsed() < CONVERGE {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            f.answers() > before,
            "{mode}: {what}: not allowed again once the policy went\n{}",
            lab.c.log(0)
        );
    }
}

#[test]
fn policy_change_cuts_existing_flows_it_denies_routed_mode() {
    existing_flows_cut("routed");
}

#[test]
fn policy_change_cuts_existing_flows_it_denies_bridge_mode() {
    existing_flows_cut("bridge");
}

/// The start window: a pod that a policy selects sends the instant ADD returns — while its
/// node's trellisd is stopped (SIGSTOP), the worst lag there is — and not one packet against
/// policy passes: the plugin holds the pod until trellisd has written its rules. Once trellisd
/// runs again, what the policy allows flows and what it denies still does not.
fn start_window(mode: &'static str) {
    let mut lab = Lab::with_args(mode, &[("y", "a", 1), ("y", "b", 0)], &["--policy-log-drops"]);
    // x/new may receive from y/b on TCP 80 only, and send to y/a only.
    lab.set_policies(&[
        json!({"metadata": meta("x", "new-in"), "spec": {"podSelector": {"matchLabels": {"pod": "new"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]}}),
        json!({"metadata": meta("x", "new-out"), "spec": {"podSelector": {"matchLabels": {"pod": "new"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let node = 0;
    lab.c.signal_daemon(node, libc::SIGSTOP);
    lab.c.api().create(&PODS, pod_object("x", "new", node, &[]));
    let i = lab.c.add_k8s_pod(node, "x", "new");
    // The instant ADD returns: y/b's UDP 81 (denied) from the new pod, and y/b's flow to the
    // new pod's UDP 81 (denied), in both families.
    let new_ns = lab.c.pods[i].ns.path().to_path_buf();
    let yb = lab.c.pods[lab.pods["y/b"]].ns.path().to_path_buf();
    let _servers = Servers::start(&new_ns, &PORTS);
    let mut denied = Vec::new();
    for (v4, ip) in lab.ips("y/b").into_iter().enumerate() {
        denied.push((
            format!("x/new -> y/b {ip} UDP/81"),
            Flow::start(&new_ns, SocketAddr::new(ip, 81)),
        ));
        let _ = v4;
    }
    let new_ips: Vec<IpAddr> = lab.c.pods[i].ips.iter().map(|s| s.parse().unwrap()).collect();
    for ip in &new_ips {
        denied.push((
            format!("y/b -> x/new {ip} UDP/81"),
            Flow::start(&yb, SocketAddr::new(*ip, 81)),
        ));
    }
    // While trellisd is stopped, even what the policy allows waits: the pod is held.
    let ya_ip = lab.ips("y/a")[0];
    assert!(
        !probe(&new_ns, SocketAddr::new(ya_ip, 80), Transport::Tcp),
        "{mode}: a held pod reached y/a before its rules were written"
    );
    lab.c.signal_daemon(node, libc::SIGCONT);
    // kubelet reports the addresses some time later; trellisd does not wait for them.
    let t = Instant::now();
    let mut ok = false;
    while t.elapsed() < CONVERGE {
        let yb_ip = new_ips[0];
        if probe(&new_ns, SocketAddr::new(ya_ip, 80), Transport::Tcp)
            && probe(&yb, SocketAddr::new(yb_ip, 80), Transport::Tcp)
        {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "{mode}: the allowed connections never opened\n{}\n{}",
        lab.tables(),
        lab.c.log(0)
    );
    std::thread::sleep(Duration::from_millis(500));
    for (what, f) in &denied {
        assert_eq!(f.answers(), 0, "{mode}: {what}: denied, yet answered");
    }
    let ips = lab.c.pods[i].ips.clone();
    lab.c
        .api()
        .update(&PODS, "x/new", |o| *o = pod_object("x", "new", node, &ips));
    std::thread::sleep(Duration::from_millis(500));
    for (what, f) in &denied {
        assert_eq!(f.answers(), 0, "{mode}: {what}: denied, yet answered");
    }
    // What happened shows in /metrics: packets dropped while held, then by x/new's ingress
    // and egress rules; connections its policy allowed; the pod isolated both ways.
    for (name, ok) in [
        ("trellisd_policy_dropped_packets_total{reason=\"held\"}", 1.0),
        ("trellisd_policy_dropped_packets_total{reason=\"ingress\"}", 1.0),
        ("trellisd_policy_dropped_packets_total{reason=\"egress\"}", 1.0),
        (
            "trellisd_policy_allowed_connections_total{policy=\"x/new-in\",direction=\"ingress\"}",
            1.0,
        ),
        ("trellisd_policy_pods{state=\"isolated_ingress\"}", 1.0),
        ("trellisd_policy_pods{state=\"isolated_egress\"}", 1.0),
    ] {
        let v = metric_until(&lab.c, node, name, |v| v >= ok);
        assert!(v >= ok, "{mode}: {name} = {v}, want at least {ok}");
    }
    assert_eq!(lab.c.metric(node, "trellisd_policy_pods{state=\"held\"}"), 0.0);
    // --policy-log-drops: the drops by x/new's rules, each side, named.
    let log = lab.c.log(node);
    for (pod, peer, side) in [("x/new", "y/b", "ingress"), ("x/new", "y/b", "egress")] {
        let found = log.lines().any(|l| {
            l.contains(&format!("no {side} policy of the pod allows it"))
                && l.contains(&format!("pod=\"{pod}\""))
                && l.contains(&format!("peer=\"{peer}\""))
                && l.contains("port=81")
        });
        assert!(
            found,
            "{mode}: no drop log line for {pod} {side} with {peer}:\n{log}\n{}",
            lab.tables()
        );
    }
}

#[test]
fn policy_start_window_pod_sends_the_instant_add_returns_routed_mode() {
    start_window("routed");
}

#[test]
fn policy_start_window_pod_sends_the_instant_add_returns_bridge_mode() {
    start_window("bridge");
}

/// A hostile pod that takes another pod's address to get that pod's verdict: x/a accepts only
/// y/b; y/c (on x/a's node: bridged, in bridge mode) and z/c (across the nodes) add y/b's
/// addresses to their own interface and send from them. Anti-spoofing drops those packets on
/// their node, so neither the address-keyed maps of bridge mode nor the peer sets of either
/// mode ever see a forged source; y/b itself gets through (the control).
fn forged_source(mode: &'static str) {
    const PORT: u16 = 82;
    let mut lab = Lab::new(mode, &[("x", "a", 0), ("y", "b", 1), ("y", "c", 0), ("z", "c", 1)]);
    lab.set_policies(&[json!({"metadata": meta("x", "only-y-b"), "spec": {"podSelector": {},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}})]);
    // What reaches x/a on PORT, by source address.
    let xa = lab.c.pods[lab.pods["x/a"]].ns.path().to_path_buf();
    let sock = trellis_net::netns::run_in(&xa, || UdpSocket::bind("[::]:82").unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let got: Arc<std::sync::Mutex<Vec<IpAddr>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
    let listener = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !s.load(Ordering::Relaxed) {
            if let Ok((_, from)) = sock.recv_from(&mut buf) {
                let ip = match from.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                g.lock().unwrap().push(ip);
            }
        }
    });
    let yb = lab.ips("y/b");
    let send_from = |pod: &str, forge: bool| {
        let ns = lab.c.pods[lab.pods[pod]].ns.path().to_path_buf();
        for (i, src) in yb.iter().enumerate() {
            if forge {
                let plen = if src.is_ipv4() { 32 } else { 128 };
                let addr = format!("{src}/{plen}");
                let mut args = vec!["ip", "addr", "add", &addr, "dev", "eth0"];
                if !src.is_ipv4() {
                    args.push("nodad");
                }
                lab.c.pods[lab.pods[pod]].ns.exec_ok(&args);
            }
            let dst = SocketAddr::new(lab.ips("x/a")[i], PORT);
            trellis_net::netns::run_in(&ns, || {
                let s = UdpSocket::bind(SocketAddr::new(*src, 0)).unwrap();
                for _ in 0..20 {
                    let _ = s.send_to(b"forged?", dst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .unwrap();
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    send_from("y/c", true);
    send_from("z/c", true);
    std::thread::sleep(Duration::from_millis(500));
    let forged = got.lock().unwrap().len();
    send_from("y/b", false);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    listener.join().unwrap();
    let all = got.lock().unwrap().clone();
    assert_eq!(forged, 0, "{mode}: forged datagrams reached x/a: {all:?}");
    for ip in &yb {
        assert!(
            all.contains(ip),
            "{mode}: y/b's own datagrams from {ip} did not reach x/a: {all:?}"
        );
    }
}

#[test]
fn policy_forged_source_gets_no_other_pods_verdict_routed_mode() {
    forged_source("routed");
}

#[test]
fn policy_forged_source_gets_no_other_pods_verdict_bridge_mode() {
    forged_source("bridge");
}
