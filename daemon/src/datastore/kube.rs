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
//! watch stream ([`Translator`]) are plain functions, tested with recorded Node objects.

use super::{DatastoreError, Event, NodeInfo};
use crate::lease::{BackendData, Lease, MacString};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
pub const UNDERLAY_IP: &str = "trellis.dev/underlay-ip";

/// Every Kubernetes API call this datastore makes, as RBAC names it (resource, verb): `get` and
/// `patch` of its own Node in [`KubeStore::start`], `list` and `watch` of all Nodes by the
/// watcher. The manifest's ClusterRole must grant exactly these (a test checks it).
pub const API_CALLS: &[(&str, &str)] = &[
    ("nodes", "get"),
    ("nodes", "patch"),
    ("nodes", "list"),
    ("nodes", "watch"),
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
        BackendData::Bgp { asn, vtep_mac } => (
            "bgp",
            match vtep_mac {
                Some(mac) => serde_json::json!({"ASNumber": asn, "VtepMAC": mac.0.to_string()}),
                None => serde_json::json!({"ASNumber": asn}),
            }
            .to_string(),
        ),
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

/// The lease a Node object describes.
pub fn lease_from_node(node: &Node) -> Result<Lease, Skip> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let cidrs: Vec<String> = match (spec.pod_cidrs, spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list,
        (_, Some(one)) => vec![one],
        _ => return Err(Skip::NoPodCidr),
    };
    let pod_cidrs = cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNetwork>()
                .map_err(|e| Skip::Invalid(format!("podCIDR {c}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
            BackendData::Bgp { asn: d.asn, vtep_mac }
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

/// Turns the watch stream into lease events. Pure: tested with recorded streams.
#[derive(Default)]
pub struct Translator {
    /// Leases collected during a (re)list, sent as one snapshot at its end.
    initial: Option<Vec<Lease>>,
    /// Nodes skipped, with the reason last logged (to log a reason once, not on every update).
    skipped: BTreeMap<String, Skip>,
    known: BTreeMap<String, Lease>,
}

impl Translator {
    pub fn handle(&mut self, ev: watcher::Event<Node>) -> Vec<Event> {
        match ev {
            watcher::Event::Init => {
                self.initial = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(node) => {
                if let Some(lease) = self.lease(&node) {
                    self.initial.get_or_insert_with(Vec::new).push(lease);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let all = self.initial.take().unwrap_or_default();
                self.known = all.iter().map(|l| (l.node.clone(), l.clone())).collect();
                vec![Event::Snapshot(all)]
            }
            watcher::Event::Apply(node) => {
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
                self.skipped.remove(&name);
                self.known.remove(&name);
                vec![Event::Remove(name)]
            }
        }
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
    /// A kubeconfig file; in-cluster config (service account) when `None`.
    pub kubeconfig: Option<PathBuf>,
}

impl KubeStore {
    async fn client(&self) -> Result<kube::Client, DatastoreError> {
        let err = |e: &dyn std::fmt::Display| DatastoreError::Invalid(format!("kubernetes client: {e}"));
        match &self.kubeconfig {
            None => kube::Client::try_default().await.map_err(|e| err(&e)),
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
                let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| err(&e))?;
                kube::Client::try_from(cfg).map_err(|e| err(&e))
            }
        }
    }

    pub async fn start(
        self,
        me: NodeInfo,
        metrics: crate::metrics::Metrics,
    ) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        use kube::api::{Api, Patch, PatchParams};
        let client = self.client().await?;
        let nodes: Api<Node> = Api::all(client);
        let patch = serde_json::json!({"metadata": {"annotations": annotations(&me)}});
        // Publish our backend data, then wait for the controller manager's pod CIDR.
        let own = loop {
            let result = async {
                nodes
                    .patch(&me.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                nodes.get(&me.name).await
            }
            .await;
            match result {
                Ok(node) => match lease_from_node(&node) {
                    Ok(lease) => break lease,
                    Err(Skip::NoPodCidr) => info!(node = me.name, "waiting for the node's pod CIDR (spec.podCIDRs)"),
                    Err(e) => return Err(DatastoreError::Invalid(format!("own node {}: {e:?}", me.name))),
                },
                Err(e) => {
                    metrics.datastore_errors().inc();
                    warn!("kubernetes API: {e}; retrying");
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut t = Translator::default();
            // The watcher relists (Init … InitDone) after errors, which gives a fresh snapshot.
            let mut stream = std::pin::pin!(watcher(nodes, watcher::Config::default()));
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) => {
                        for out in t.handle(ev) {
                            if tx.send(out).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        metrics.datastore_errors().inc();
                        warn!("watching nodes: {e}");
                    }
                }
            }
        });
        Ok((own, rx))
    }
}
