//! Where NetworkPolicy's inputs come from: the Kubernetes API's Namespaces, Pods and
//! NetworkPolicies, each through its own watch (`kube::runtime::watcher`: lists from the watch
//! cache, a relist after 410, backoff and one log line per cause on failures, as the Node watch
//! in `datastore::kube`), folded into one [`View`].
//!
//! Nothing is published until all three have listed once: a view with the policies but not yet
//! the pods would compile peer sets that are empty, and enforce "deny" where the policies allow.
//! A policy the API server would have refused (from a stand-in or a datastore that lies) is left
//! out whole and logged once (see `model`); it never widens or narrows what the others allow.
//!
//! Which pods count (as Calico): those not on the host network (their address is the node's),
//! and not finished (`Succeeded`/`Failed`: their addresses may already belong to a new pod).
//! A pod is a peer once `status.podIPs` has its addresses; before that it is kept without any,
//! so that its own node finds it by `namespace/name` (`policy::enforce`).

use super::model::{NamedPort, PodInfo, Policy, Proto};
use super::selector::Labels;
use super::semantics::View;
use crate::datastore::retry::{chain, Backoff, FailureLog};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::watch;
use tracing::{info, warn};

/// A Pod as policy sees it; `None` for pods that have no address of their own (see the module
/// note). A pod whose address kubelet has not reported yet is kept, without addresses: it is
/// no peer yet, but its node finds it by name, with its labels, and judges it from its first
/// packet (the start window).
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    let ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone()?;
            let proto = Proto::parse(p.protocol.as_deref().unwrap_or("TCP"))?;
            let port = u16::try_from(p.container_port).ok()?;
            Some(NamedPort { name, proto, port })
        })
        .collect();
    Some(PodInfo {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        node: spec.node_name.clone().unwrap_or_default(),
        ports,
    })
}

/// What the three watches have told so far.
#[derive(Default)]
struct Inputs {
    namespaces: BTreeMap<String, Labels>,
    /// By `namespace/name`.
    pods: BTreeMap<String, PodInfo>,
    /// By `namespace/name`.
    policies: BTreeMap<String, Policy>,
    /// Policies left out, by `namespace/name`: why (logged once per reason).
    refused: BTreeMap<String, String>,
}

impl Inputs {
    fn view(&self) -> View {
        View {
            namespaces: self.namespaces.clone(),
            pods: self.pods.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
        }
    }

    fn put_policy(&mut self, np: &NetworkPolicy) {
        let key = format!(
            "{}/{}",
            np.metadata.namespace.as_deref().unwrap_or_default(),
            np.metadata.name.as_deref().unwrap_or_default()
        );
        match Policy::from_k8s(np) {
            Ok(p) => {
                self.refused.remove(&key);
                self.policies.insert(key, p);
            }
            Err(why) => {
                self.policies.remove(&key);
                if self.refused.get(&key) != Some(&why) {
                    warn!(
                        policy = key,
                        "NetworkPolicy left out (the API server would refuse it): {why}"
                    );
                    self.refused.insert(key, why);
                }
            }
        }
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// One resource's watch events folded into [`Inputs`]: a relist (`Init` … `InitDone`) replaces
/// that resource's objects whole, so that objects deleted while the watch was down go.
struct Relist<T> {
    pending: Option<Vec<T>>,
    listed: bool,
}

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Relist {
            pending: None,
            listed: false,
        }
    }
}

impl<T> Relist<T> {
    /// Hands `apply` what the event changes: everything when a relist completes, one object
    /// otherwise.
    fn event(&mut self, ev: watcher::Event<T>, apply: impl FnOnce(Change<T>)) {
        match ev {
            watcher::Event::Init => self.pending = Some(Vec::new()),
            watcher::Event::InitApply(o) => self.pending.get_or_insert_with(Vec::new).push(o),
            watcher::Event::InitDone => {
                self.listed = true;
                apply(Change::Replace(self.pending.take().unwrap_or_default()));
            }
            watcher::Event::Apply(o) => apply(Change::Upsert(o)),
            watcher::Event::Delete(o) => apply(Change::Delete(o)),
        }
    }
}

enum Change<T> {
    Replace(Vec<T>),
    Upsert(T),
    Delete(T),
}

/// Watches Namespaces, Pods and NetworkPolicies with `client`; the receiver holds `None` until
/// all three have listed once, then every new view. Ends when the receiver is dropped.
pub fn spawn(client: kube::Client, metrics: crate::metrics::Metrics) -> watch::Receiver<Option<Arc<View>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, metrics, tx));
    rx
}

async fn run(client: kube::Client, metrics: crate::metrics::Metrics, tx: watch::Sender<Option<Arc<View>>>) {
    use futures::StreamExt;
    // As the Node watch: lists from the watch cache, in one page.
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    let mut namespaces = std::pin::pin!(watcher(Api::<Namespace>::all(client.clone()), config.clone()));
    let mut pods = std::pin::pin!(watcher(Api::<Pod>::all(client.clone()), config.clone()));
    let mut policies = std::pin::pin!(watcher(Api::<NetworkPolicy>::all(client), config));
    let mut inputs = Inputs::default();
    let (mut ns_list, mut pod_list, mut np_list) = (Relist::default(), Relist::default(), Relist::default());
    let mut backoff = Backoff::default();
    let mut failures = FailureLog::new("watching Namespaces, Pods and NetworkPolicies", metrics);
    let mut announced = false;
    loop {
        let failed = tokio::select! {
            _ = tx.closed() => return,
            Some(ev) = namespaces.next() => ev.map(|ev| ns_list.event(ev, |c| match c {
                Change::Replace(all) => {
                    inputs.namespaces = all.iter().filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default()))).collect();
                }
                Change::Upsert(n) => {
                    if let Some(name) = n.metadata.name.clone() {
                        inputs.namespaces.insert(name, n.metadata.labels.clone().unwrap_or_default());
                    }
                }
                Change::Delete(n) => {
                    if let Some(name) = &n.metadata.name {
                        inputs.namespaces.remove(name);
                    }
                }
            })).err(),
            Some(ev) = pods.next() => ev.map(|ev| pod_list.event(ev, |c| match c {
                Change::Replace(all) => {
                    inputs.pods = all.iter().filter_map(|p| Some((key_of(&p.metadata), pod_info(p)?))).collect();
                }
                Change::Upsert(p) => match pod_info(&p) {
                    Some(info) => {
                        inputs.pods.insert(key_of(&p.metadata), info);
                    }
                    None => {
                        inputs.pods.remove(&key_of(&p.metadata));
                    }
                },
                Change::Delete(p) => {
                    inputs.pods.remove(&key_of(&p.metadata));
                }
            })).err(),
            Some(ev) = policies.next() => ev.map(|ev| np_list.event(ev, |c| match c {
                Change::Replace(all) => {
                    inputs.policies.clear();
                    for np in &all {
                        inputs.put_policy(np);
                    }
                }
                Change::Upsert(np) => inputs.put_policy(&np),
                Change::Delete(np) => {
                    inputs.policies.remove(&key_of(&np.metadata));
                }
            })).err(),
        };
        match failed {
            None => {
                backoff.reset();
                failures.succeeded();
            }
            Some(watcher::Error::WatchError(status)) if status.code == 410 => {
                info!("the API server expired a policy watch's resourceVersion; listing again");
                continue;
            }
            Some(e) => {
                let delay = backoff.next_delay();
                failures.failed(chain(&e), delay);
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        if ns_list.listed && pod_list.listed && np_list.listed {
            if !announced {
                info!(
                    namespaces = inputs.namespaces.len(),
                    pods = inputs.pods.len(),
                    policies = inputs.policies.len(),
                    "NetworkPolicy inputs listed"
                );
                announced = true;
            }
            tx.send_replace(Some(Arc::new(inputs.view())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn pods_with_addresses_of_their_own_their_labels_node_and_named_ports() {
        let p = pod(
            json!({"metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 80}, {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9000}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:244:1::5"}]}}),
        );
        let info = pod_info(&p).unwrap();
        assert_eq!(info.key(), "x/a");
        assert_eq!(info.node, "node1");
        assert_eq!(info.ips.len(), 2);
        assert_eq!(info.named_port("http", Proto::Tcp), Some(80));
        assert_eq!(info.named_port("dns", Proto::Udp), Some(53));
        assert_eq!(info.ports.len(), 2, "unnamed ports are no named ports");
        for (what, v) in [
            (
                "host network",
                json!({"metadata": {"namespace": "x", "name": "h"}, "spec": {"hostNetwork": true, "containers": []}, "status": {"podIPs": [{"ip": "192.168.0.1"}]}}),
            ),
            (
                "finished",
                json!({"metadata": {"namespace": "x", "name": "f"}, "spec": {"containers": []}, "status": {"phase": "Succeeded", "podIPs": [{"ip": "10.244.1.6"}]}}),
            ),
        ] {
            assert!(pod_info(&pod(v)).is_none(), "{what}");
        }
        // Scheduled, its sandbox being made: no peer yet, but its node finds it by name.
        for status in [json!({"phase": "Pending"}), serde_json::Value::Null] {
            let p = pod(
                json!({"metadata": {"namespace": "x", "name": "p", "labels": {"pod": "p"}},
                "spec": {"nodeName": "node1", "containers": []}, "status": status}),
            );
            let info = pod_info(&p).expect("a pod without an address yet is kept");
            assert!(info.ips.is_empty() && info.labels["pod"] == "p");
        }
    }

    #[test]
    fn a_policy_the_api_server_would_refuse_is_left_out_and_a_fixed_one_comes_back() {
        let mut inputs = Inputs::default();
        let bad: NetworkPolicy = serde_json::from_value(json!({"metadata": {"namespace": "x", "name": "p"},
            "spec": {"ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}}))
        .unwrap();
        inputs.put_policy(&bad);
        assert!(inputs.policies.is_empty() && inputs.refused.contains_key("x/p"));
        let good: NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"namespace": "x", "name": "p"}, "spec": {}})).unwrap();
        inputs.put_policy(&good);
        assert_eq!(inputs.view().policies.len(), 1);
        assert!(inputs.refused.is_empty());
    }
}
