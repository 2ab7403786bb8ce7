//! NetworkPolicy's inputs through the real `kube::Client` (HTTPS, kubeconfig, list and watch)
//! against the tests' **stand-in** API server — not a cluster (`tests/src/kube_apiserver/`):
//! Namespaces, Pods and NetworkPolicies fold into one view, and the view follows every kind of
//! change the upstream e2e tests make (a policy updated and deleted, namespace and pod labels
//! changed, a pod re-created with a new address), decided by `policy::semantics`.

use serde_json::json;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use trellis_tests::kube_apiserver::{ApiServer, NAMESPACES, NETWORK_POLICIES, PODS};
use trellis_tests::TempDir;
use trellisd::policy::model::Proto;
use trellisd::policy::semantics::View;

fn pod(ns: &str, name: &str, ip: &str) -> serde_json::Value {
    json!({"metadata": {"namespace": ns, "name": name, "labels": {"pod": name}},
           "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
           "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Waits (at most 10 s) for a published view that satisfies `ok`.
async fn until(rx: &mut watch::Receiver<Option<Arc<View>>>, what: &str, ok: impl Fn(&View) -> bool) -> Arc<View> {
    let got = {
        let wait = rx.wait_for(|v| v.as_ref().is_some_and(|v| ok(v)));
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    };
    got.unwrap_or_else(|| {
        let last = rx.borrow().as_ref().map(|v| (v.pods.len(), v.policies.len()));
        panic!("{what}: not within 10 s; last view (pods, policies): {last:?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standin_api_objects_fold_into_one_view_that_follows_every_change() {
    let server = ApiServer::start(None, "127.0.0.1:0".parse().unwrap());
    let dir = TempDir::new("polsrc");
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig);
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(cfg).unwrap();

    for ns in ["x", "y"] {
        server.create(&NAMESPACES, json!({"metadata": {"name": ns, "labels": {"ns": ns}}}));
    }
    server.create(&PODS, pod("x", "a", "10.244.1.5"));
    server.create(&PODS, pod("y", "b", "10.244.2.7"));
    // Not a peer: on the host network.
    server.create(
        &PODS,
        json!({"metadata": {"namespace": "y", "name": "h"}, "spec": {"hostNetwork": true, "containers": []},
               "status": {"podIPs": [{"ip": "192.168.200.11"}]}}),
    );
    server.create(
        &NETWORK_POLICIES,
        json!({"metadata": {"namespace": "x", "name": "from-y"},
               "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                                                       "ports": [{"port": "http"}]}]}}),
    );

    let mut rx = trellisd::policy::source::spawn(client, trellisd::metrics::Metrics::new());
    let (a, b) = (ip("10.244.1.5"), ip("10.244.2.7"));
    let v = until(&mut rx, "the first view", |v| {
        v.pods.len() == 2 && v.policies.len() == 1
    })
    .await;
    assert!(v.allowed(b, a, Proto::Tcp, 80), "y/b to x/a's named port");
    assert!(!v.allowed(b, a, Proto::Tcp, 81));

    // Namespace y's label changes: y is no peer any more.
    server.update(&NAMESPACES, "y", |n| n["metadata"]["labels"]["ns"] = json!("other"));
    until(&mut rx, "y relabelled", |v| !v.allowed(b, a, Proto::Tcp, 80)).await;
    server.update(&NAMESPACES, "y", |n| n["metadata"]["labels"]["ns"] = json!("y"));
    until(&mut rx, "y back", |v| v.allowed(b, a, Proto::Tcp, 80)).await;

    // The policy is updated to port 81 only, then deleted.
    server.update(&NETWORK_POLICIES, "x/from-y", |p| {
        p["spec"]["ingress"][0]["ports"] = json!([{"port": 81}]);
    });
    until(&mut rx, "policy updated", |v| {
        !v.allowed(b, a, Proto::Tcp, 80) && v.allowed(b, a, Proto::Tcp, 81)
    })
    .await;
    server.delete(&NETWORK_POLICIES, "x/from-y");
    until(&mut rx, "policy deleted", |v| {
        v.policies.is_empty() && v.allowed(b, a, Proto::Tcp, 80)
    })
    .await;

    // A pod re-created with a new address: the old one is nobody's any more.
    server.create(
        &NETWORK_POLICIES,
        json!({"metadata": {"namespace": "x", "name": "from-b"},
               "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
    );
    until(&mut rx, "from-b in", |v| {
        v.policies.len() == 1 && v.allowed(b, a, Proto::Udp, 53)
    })
    .await;
    server.delete(&PODS, "y/b");
    server.create(&PODS, pod("y", "b", "10.244.2.9"));
    let v = until(&mut rx, "b re-created", |v| v.pod_by_ip(ip("10.244.2.9")).is_some()).await;
    assert!(v.allowed(ip("10.244.2.9"), a, Proto::Tcp, 80));
    assert!(
        !v.allowed(b, a, Proto::Tcp, 80),
        "the old address is no pod: not allowed"
    );
    // Its label changes: no longer a peer.
    server.update(&PODS, "y/b", |p| p["metadata"]["labels"]["pod"] = json!("c"));
    until(&mut rx, "b relabelled", |v| {
        !v.allowed(ip("10.244.2.9"), a, Proto::Tcp, 80)
    })
    .await;
}
