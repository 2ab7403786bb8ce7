//! The Kubernetes-API datastore: the node's pod CIDRs come from its Node object
//! (`spec.podCIDRs`, allocated by the controller manager when the cluster was started with
//! `--pod-network-cidr`), and each node publishes its backend data as annotations on its Node.
//!
//! The annotation names are flannel's where the meaning is the same, so a cluster can move from
//! flannel to Trellis node by node: a Trellis node reads a flannel node's VTEP MAC and public IP
//! and the other way round (same VXLAN design, same VNI and port by default).
//! - `flannel.alpha.coreos.com/backend-type`: `vxlan` or `host-gw`;
//! - `flannel.alpha.coreos.com/backend-data`: `{"VNI": 1, "VtepMAC": "..."}` (VXLAN), `null`;
//! - `flannel.alpha.coreos.com/public-ip` (`public-ipv6`): the underlay address;
//! - `flannel.alpha.coreos.com/kube-subnet-manager`: `true`;
//! - `trellis.dev/underlay-ip`: Trellis's own, preferred when present.
//!
//! The translation from Node objects to leases ([`lease_from_node`]) and the handling of the
//! watch stream ([`Translator`]) are plain functions, tested with recorded Node objects; the
//! client side (TLS, watch, outages, 403s, 410s) is tested against a stand-in API server that
//! speaks the real protocol (`daemon/tests/kube_standin_*.rs`).
//!
//! Talking to the API server like a good citizen:
//! - lists are served from the API server's watch cache (`resourceVersion=0`, as client-go's
//!   informers do), so a restart of every node does not turn into quorum reads of etcd;
//! - failures back off (250 ms doubling to 5 s, jittered: [`super::retry`]) and are logged once
//!   per cause with the whole `source()` chain;
//! - every request says `User-Agent: trellisd/VERSION` and every patch `fieldManager=trellisd`.
//!
//! This node's own Node is watched like the others: annotations someone removed (or a Node
//! deleted and registered again) are published again, rate-limited; while the Node is missing
//! `/healthz` fails; a Node back with *another* pod CIDR ends the daemon (see [`OwnNode`]).

use super::retry::{chain, Backoff, FailureLog};
use super::{DatastoreError, Event, NodeInfo};
use crate::lease::{BackendData, Lease, MacString};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The User-Agent of every request (the API server's audit log and metrics name clients by it).
pub const USER_AGENT: &str = concat!("trellisd/", env!("CARGO_PKG_VERSION"));
/// The field manager of every patch. Without the version: a manager's name is kept in every
/// object's managedFields, and a new name per release would leave one entry per upgrade.
pub const FIELD_MANAGER: &str = "trellisd";

pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const UNDERLAY_IP: &str = "trellis.dev/underlay-ip";

/// Every Kubernetes API call trellisd makes, as RBAC names it (API group, resource, verb):
/// `patch` of its own Node (whose answer is the Node: no `get` needed), `list` and `watch` of
/// all Nodes by the watcher, and `list` and `watch` of Namespaces, Pods and NetworkPolicies for
/// NetworkPolicy (`policy::source`). The manifest's ClusterRole must grant exactly these (a test
/// checks it).
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("", "nodes", "patch"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
];

/// Why a Node gives no lease (yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The controller manager has not given it a pod CIDR yet.
    NoPodCidr,
    /// Neither Trellis nor flannel runs there yet (no backend annotations).
    NoBackend,
    /// Annotations present but unreadable.
    Invalid(String),
}

/// The annotations this node publishes.
pub fn annotations(me: &NodeInfo) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let (ty, data) = match &me.backend {
        BackendData::Vxlan { vtep_mac, vni } => (
            "vxlan",
            serde_json::json!({"VNI": vni, "VtepMAC": vtep_mac.0.to_string()}).to_string(),
        ),
        BackendData::HostGw => ("host-gw", "null".to_string()),
        BackendData::Ipip => ("ipip", "null".to_string()),
        BackendData::Bgp {
            asn,
            vtep_mac,
            rr_cluster_id,
        } => {
            let mut d = serde_json::json!({"ASNumber": asn});
            if let Some(mac) = vtep_mac {
                d["VtepMAC"] = mac.0.to_string().into();
            }
            if let Some(id) = rr_cluster_id {
                d["RouteReflectorClusterID"] = id.to_string().into();
            }
            ("bgp", d.to_string())
        }
    };
    a.insert(BACKEND_TYPE.into(), ty.into());
    a.insert(BACKEND_DATA.into(), data);
    let public = if me.underlay_ip.is_ipv4() {
        PUBLIC_IP
    } else {
        PUBLIC_IPV6
    };
    a.insert(public.into(), me.underlay_ip.to_string());
    a.insert(SUBNET_MANAGER.into(), "true".into());
    a.insert(UNDERLAY_IP.into(), me.underlay_ip.to_string());
    a
}

/// The pod CIDRs in a Node's spec (`podCIDRs`, else the older `podCIDR`).
fn pod_cidrs(node: &Node) -> Result<Vec<IpNetwork>, Skip> {
    let spec = node.spec.clone().unwrap_or_default();
    let cidrs: Vec<String> = match (spec.pod_cidrs, spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list,
        (_, Some(one)) => vec![one],
        _ => return Err(Skip::NoPodCidr),
    };
    cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNetwork>()
                .map_err(|e| Skip::Invalid(format!("podCIDR {c}: {e}")))
        })
        .collect()
}

/// The lease a Node object describes.
pub fn lease_from_node(node: &Node) -> Result<Lease, Skip> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let pod_cidrs = pod_cidrs(node)?;
    let ann = node.metadata.annotations.clone().unwrap_or_default();
    let backend = match ann.get(BACKEND_TYPE).map(String::as_str) {
        None => return Err(Skip::NoBackend),
        Some("host-gw") => BackendData::HostGw,
        Some("ipip") => BackendData::Ipip,
        Some("bgp") => {
            #[derive(serde::Deserialize)]
            struct Data {
                #[serde(rename = "ASNumber")]
                asn: u32,
                #[serde(rename = "VtepMAC")]
                vtep_mac: Option<String>,
                #[serde(rename = "RouteReflectorClusterID", default)]
                rr_cluster_id: Option<std::net::Ipv4Addr>,
            }
            let raw = ann
                .get(BACKEND_DATA)
                .ok_or_else(|| Skip::Invalid(format!("{BACKEND_DATA} missing")))?;
            let d: Data = serde_json::from_str(raw).map_err(|e| Skip::Invalid(format!("{BACKEND_DATA}: {e}")))?;
            let vtep_mac = d
                .vtep_mac
                .map(|m| {
                    m.parse()
                        .map(MacString)
                        .map_err(|e| Skip::Invalid(format!("VtepMAC {m}: {e}")))
                })
                .transpose()?;
            BackendData::Bgp {
                asn: d.asn,
                vtep_mac,
                rr_cluster_id: d.rr_cluster_id,
            }
        }
        Some("vxlan") => {
            #[derive(serde::Deserialize)]
            struct Data {
                #[serde(rename = "VNI")]
                vni: u32,
                #[serde(rename = "VtepMAC")]
                vtep_mac: String,
            }
            let raw = ann
                .get(BACKEND_DATA)
                .ok_or_else(|| Skip::Invalid(format!("{BACKEND_DATA} missing")))?;
            let d: Data = serde_json::from_str(raw).map_err(|e| Skip::Invalid(format!("{BACKEND_DATA}: {e}")))?;
            let mac = d
                .vtep_mac
                .parse()
                .map_err(|e| Skip::Invalid(format!("VtepMAC {}: {e}", d.vtep_mac)))?;
            BackendData::Vxlan {
                vtep_mac: MacString(mac),
                vni: d.vni,
            }
        }
        Some(other) => {
            return Err(Skip::Invalid(format!(
                "backend type {other:?} is not one Trellis speaks"
            )))
        }
    };
    let internal = || {
        node.status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<IpAddr>().ok())
    };
    let underlay_ip = [UNDERLAY_IP, PUBLIC_IP, PUBLIC_IPV6]
        .iter()
        .find_map(|k| ann.get(*k).and_then(|v| v.parse().ok()))
        .or_else(internal)
        .ok_or_else(|| Skip::Invalid("no underlay address: no annotation and no InternalIP".into()))?;
    Ok(Lease {
        node: name,
        underlay_ip,
        pod_cidrs,
        backend,
    })
}

/// What this node's own Node object says, seen from the process that holds its lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnNode {
    /// Not seen by the watch yet.
    Unknown,
    /// It carries this node's pod CIDRs and every annotation this node publishes.
    Matches,
    /// This node's pod CIDRs, but an annotation is missing or differs (someone removed it, or
    /// the Node was deleted and registered again): publish again.
    NeedsPublish,
    /// The Node object is gone (deleted; a kubelet registers it again when it restarts).
    Missing,
    /// The Node is there but has no pod CIDR (registered again, not yet given one).
    AwaitingCidr,
    /// The Node carries other pod CIDRs than this process holds (registered again and given
    /// another one). Pods already have addresses from the old one and the CNI config names it:
    /// nothing can be kept, so the daemon exits and starts over.
    CidrChanged(Vec<IpNetwork>),
}

/// This node, as the translator checks its Node against it.
struct Own {
    name: String,
    cidrs: Vec<IpNetwork>,
    annotations: BTreeMap<String, String>,
}

/// Turns the watch stream into lease events, and follows this node's own Node. Pure: tested
/// with recorded streams.
#[derive(Default)]
pub struct Translator {
    /// Leases collected during a (re)list, sent as one snapshot at its end.
    initial: Option<Vec<Lease>>,
    /// Nodes skipped, with the reason last logged (to log a reason once, not on every update).
    skipped: BTreeMap<String, Skip>,
    known: BTreeMap<String, Lease>,
    own: Option<Own>,
    own_state: Option<OwnNode>,
    /// Whether the (re)list in progress had this node's Node.
    own_listed: bool,
}

impl Translator {
    /// A translator that also checks `own`'s Node against the lease and the annotations this
    /// process holds ([`Translator::own_state`]).
    pub fn for_node(own: &Lease, annotations: BTreeMap<String, String>) -> Translator {
        let mut cidrs = own.pod_cidrs.clone();
        cidrs.sort();
        Translator {
            own: Some(Own {
                name: own.node.clone(),
                cidrs,
                annotations,
            }),
            ..Default::default()
        }
    }

    /// This node's Node as last seen ([`OwnNode::Unknown`] without [`Translator::for_node`]).
    pub fn own_state(&self) -> OwnNode {
        self.own_state.clone().unwrap_or(OwnNode::Unknown)
    }

    pub fn handle(&mut self, ev: watcher::Event<Node>) -> Vec<Event> {
        match ev {
            watcher::Event::Init => {
                self.initial = Some(Vec::new());
                self.own_listed = false;
                Vec::new()
            }
            watcher::Event::InitApply(node) => {
                self.check_own(Some(&node));
                if let Some(lease) = self.lease(&node) {
                    self.initial.get_or_insert_with(Vec::new).push(lease);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                if !self.own_listed {
                    self.check_own(None);
                }
                let all = self.initial.take().unwrap_or_default();
                self.known = all.iter().map(|l| (l.node.clone(), l.clone())).collect();
                vec![Event::Snapshot(all)]
            }
            watcher::Event::Apply(node) => {
                self.check_own(Some(&node));
                let name = node.metadata.name.clone().unwrap_or_default();
                match self.lease(&node) {
                    Some(lease) if self.known.get(&name) == Some(&lease) => Vec::new(),
                    Some(lease) => {
                        self.known.insert(name, lease.clone());
                        vec![Event::Upsert(lease)]
                    }
                    // A node that lost its lease data (annotations removed) leaves.
                    None => self
                        .known
                        .remove(&name)
                        .map(|_| vec![Event::Remove(name)])
                        .unwrap_or_default(),
                }
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                if self.own.as_ref().is_some_and(|o| o.name == name) {
                    self.check_own(None);
                }
                self.skipped.remove(&name);
                self.known.remove(&name);
                vec![Event::Remove(name)]
            }
        }
    }

    /// Updates [`Translator::own_state`] from `node` when it is this node's (`None`: gone).
    fn check_own(&mut self, node: Option<&Node>) {
        let Some(own) = &self.own else { return };
        let state = match node {
            Some(n) if n.metadata.name.as_deref() != Some(own.name.as_str()) => return,
            None => OwnNode::Missing,
            Some(n) => {
                self.own_listed = true;
                match pod_cidrs(n) {
                    Err(_) => OwnNode::AwaitingCidr,
                    Ok(mut cidrs) => {
                        cidrs.sort();
                        let ann = n.metadata.annotations.clone().unwrap_or_default();
                        if cidrs != own.cidrs {
                            OwnNode::CidrChanged(cidrs)
                        } else if own.annotations.iter().all(|(k, v)| ann.get(k) == Some(v)) {
                            OwnNode::Matches
                        } else {
                            OwnNode::NeedsPublish
                        }
                    }
                }
            }
        };
        self.own_state = Some(state);
    }

    fn lease(&mut self, node: &Node) -> Option<Lease> {
        let name = node.metadata.name.clone().unwrap_or_default();
        match lease_from_node(node) {
            Ok(l) => {
                self.skipped.remove(&name);
                Some(l)
            }
            Err(why) => {
                if self.skipped.get(&name) != Some(&why) {
                    match &why {
                        Skip::NoPodCidr => info!(node = name, "waiting for the node's pod CIDR (spec.podCIDRs)"),
                        Skip::NoBackend => info!(node = name, "node has no Trellis/flannel backend data yet"),
                        Skip::Invalid(e) => warn!(node = name, "ignoring the node: {e}"),
                    }
                    self.skipped.insert(name, why);
                }
                None
            }
        }
    }
}

/// The datastore: the daemon's own Node, and a watch of all Nodes.
pub struct KubeStore {
    /// A kubeconfig file; `KUBECONFIG` or the in-cluster config (service account token and CA,
    /// `KUBERNETES_SERVICE_HOST`/`PORT`) when `None`.
    pub kubeconfig: Option<PathBuf>,
}

impl KubeStore {
    /// A client from the kubeconfig given, or the in-cluster config.
    pub async fn client(&self) -> Result<kube::Client, DatastoreError> {
        use http::header::{HeaderValue, USER_AGENT as UA};
        let err =
            |e: &(dyn std::error::Error + 'static)| DatastoreError::Invalid(format!("kubernetes client: {}", chain(e)));
        let mut cfg = match &self.kubeconfig {
            None => kube::Config::infer().await.map_err(|e| err(&e))?,
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| err(&e))?
            }
        };
        cfg.headers.push((UA, HeaderValue::from_static(USER_AGENT)));
        kube::Client::try_from(cfg).map_err(|e| err(&e))
    }

    pub async fn start(
        self,
        me: NodeInfo,
        metrics: crate::metrics::Metrics,
    ) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client);
        // Publish our backend data, then wait for the controller manager's pod CIDR (the patch
        // answers with the Node as it is now).
        let mut publisher = Publisher::new(nodes.clone(), &me, metrics.clone());
        let mut waiting_logged = false;
        let own = loop {
            publisher.due().await;
            let Some(node) = publisher.try_publish().await else {
                continue;
            };
            match lease_from_node(&node) {
                Ok(lease) => break lease,
                Err(Skip::NoPodCidr) => {
                    if !waiting_logged {
                        info!(node = me.name, "waiting for the node's pod CIDR (spec.podCIDRs)");
                        waiting_logged = true;
                    }
                    publisher.next = Instant::now() + Duration::from_secs(5);
                }
                Err(e) => return Err(DatastoreError::Invalid(format!("own node {}: {e:?}", me.name))),
            }
        };
        let translator = Translator::for_node(&own, annotations(&me));
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch_nodes(nodes, translator, publisher, tx, metrics));
        Ok((own, rx))
    }
}

use kube::api::{Api, Patch, PatchParams};

/// Publishes this node's annotations on its Node: at start, and again whenever the watch shows
/// them missing or changed, at most once per [`Publisher::interval`], which doubles (to a
/// minute) while someone keeps removing them, so two writers never fight at full speed.
struct Publisher {
    nodes: Api<Node>,
    name: String,
    patch: serde_json::Value,
    /// Earliest time of the next republish.
    next: Instant,
    interval: Duration,
    last: Option<Instant>,
    failures: FailureLog,
    backoff: Backoff,
}

const REPUBLISH_FIRST: Duration = Duration::from_secs(1);
const REPUBLISH_MAX: Duration = Duration::from_secs(60);

impl Publisher {
    fn new(nodes: Api<Node>, me: &NodeInfo, metrics: crate::metrics::Metrics) -> Publisher {
        Publisher {
            nodes,
            name: me.name.clone(),
            patch: serde_json::json!({"metadata": {"annotations": annotations(me)}}),
            next: Instant::now(),
            interval: REPUBLISH_FIRST,
            last: None,
            failures: FailureLog::new("publishing this node's annotations on its Node", metrics),
            backoff: Backoff::default(),
        }
    }

    async fn publish(&self) -> Result<Node, kube::Error> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        self.nodes.patch(&self.name, &params, &Patch::Merge(&self.patch)).await
    }

    /// Waits until a republish is allowed.
    async fn due(&self) {
        tokio::time::sleep_until(self.next.into()).await
    }

    /// One attempt; a failure is logged (once per cause) and puts the next attempt after a
    /// backoff.
    async fn try_publish(&mut self) -> Option<Node> {
        match self.publish().await {
            Ok(node) => {
                self.failures.succeeded();
                self.backoff.reset();
                Some(node)
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                self.failures.failed(chain(&e), delay);
                self.next = Instant::now() + delay;
                None
            }
        }
    }

    /// Publishes again (the watch showed them missing and [`Publisher::due`] returned).
    async fn republish(&mut self) {
        if self.try_publish().await.is_none() {
            return;
        }
        if self.last.is_some_and(|t| t.elapsed() > REPUBLISH_MAX) {
            self.interval = REPUBLISH_FIRST;
        }
        info!(
            node = self.name,
            "published this node's annotations again (they were missing or changed on its Node)"
        );
        self.last = Some(Instant::now());
        self.next = Instant::now() + self.interval;
        self.interval = (self.interval * 2).min(REPUBLISH_MAX);
    }
}

/// Follows every Node for as long as the process runs: lease events to the daemon, this node's
/// own Node checked (and its annotations put back) on every change. Failures back off; a 410
/// (our resourceVersion expired) is the ordinary way a watch ends and relists at once.
async fn watch_nodes(
    nodes: Api<Node>,
    mut t: Translator,
    mut publisher: Publisher,
    tx: mpsc::Sender<Event>,
    metrics: crate::metrics::Metrics,
) {
    use futures::StreamExt;
    // Lists from the watch cache (`resourceVersion=0`). kube leaves the resourceVersion out of
    // a list that has a `limit` (its default page size is 500), which makes every relist a
    // quorum read of etcd: no page size, as client-go's informers do (the API server ignores
    // `limit` for cache reads anyway).
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    let mut stream = std::pin::pin!(watcher(nodes, config));
    let mut backoff = Backoff::default();
    let mut failures = FailureLog::new("watching Nodes", metrics.clone());
    let mut reported = OwnNode::Unknown;
    loop {
        let needs_publish = reported == OwnNode::NeedsPublish;
        let item = tokio::select! {
            item = stream.next() => item,
            _ = publisher.due(), if needs_publish => {
                publisher.republish().await;
                continue;
            }
        };
        match item {
            None => return,
            Some(Ok(ev)) => {
                backoff.reset();
                failures.succeeded();
                for out in t.handle(ev) {
                    if tx.send(out).await.is_err() {
                        return;
                    }
                }
                let state = t.own_state();
                if state != reported {
                    report_own(&publisher.name, &state, &metrics);
                    if let OwnNode::CidrChanged(now) = &state {
                        let list = |c: &[IpNetwork]| c.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ");
                        let held = t.own.as_ref().map(|o| list(&o.cidrs)).unwrap_or_default();
                        let why = format!(
                            "this node's Node ({}) now has pod CIDRs {}, not the {held} this process holds \
                             (deleted and registered again?); exiting so that a restart starts over with them",
                            publisher.name,
                            list(now),
                        );
                        let _ = tx.send(Event::Lost(why)).await;
                        return;
                    }
                    reported = state;
                }
            }
            Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                info!("the API server expired the Node watch's resourceVersion; listing Nodes again");
            }
            Some(Err(e)) => {
                let delay = backoff.next_delay();
                failures.failed(chain(&e), delay);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One log line and the health verdict for a change of this node's own Node.
fn report_own(name: &str, state: &OwnNode, metrics: &crate::metrics::Metrics) {
    let problem = match state {
        OwnNode::Unknown | OwnNode::Matches => None,
        OwnNode::NeedsPublish => {
            warn!(node = name, "this node's annotations are missing or changed on its Node: publishing them again");
            None
        }
        OwnNode::Missing => Some(format!(
            "this node's Node object {name} is gone (deleted); other nodes stop routing to its pods until it is registered again"
        )),
        OwnNode::AwaitingCidr => Some(format!(
            "this node's Node object {name} has no pod CIDR (registered again?); waiting for one"
        )),
        OwnNode::CidrChanged(_) => Some(format!("this node's Node object {name} has another pod CIDR")),
    };
    match &problem {
        Some(p) => warn!("{p}"),
        None => info!(node = name, "this node's Node carries its pod CIDRs and annotations"),
    }
    metrics.set_lease_problem(problem);
}
