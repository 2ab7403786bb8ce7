//! Datastores: where node leases live. An enum with one variant per datastore (no trait
//! objects, no registration by side effect):
//! - [`etcd`]: leases under one key prefix, created by compare-and-swap, kept alive by an etcd
//!   lease (TTL) the daemon renews, watched for the other nodes' changes;
//! - [`kube`]: the Kubernetes API: pod CIDRs from the Node objects, backend data in annotations;
//! - [`none`]: a single node whose pod CIDR comes from a flag; no peers.
//!
//! The rest of the daemon sees only [`Datastore::start`]: this node's lease, then a stream of
//! [`Event`]s about every node's lease (this node's included).

pub mod etcd;
pub mod holdback;
pub mod identity;
pub mod kube;
pub mod none;
pub mod retry;
pub mod trust;

use crate::config::Pool;
use crate::lease::{BackendData, Lease};
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tokio::sync::mpsc;

/// What this node asks for.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub underlay_ip: IpAddr,
    pub backend: BackendData,
}

/// A change in the set of leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Every lease as the datastore holds it now (at start, and after a resync following a
    /// lost connection): the receiver replaces what it knew.
    Snapshot(Vec<Lease>),
    /// A lease was created or changed.
    Upsert(Lease),
    /// A node's lease was deleted or expired.
    Remove(String),
    /// Who owns each pod CIDR, as the datastore's own ownership records say (etcd's `cidrs/`
    /// keys), all of them: sent with every snapshot by a datastore that keeps such records, and
    /// from then on every lease is checked against them ([`trust`]).
    Owners(BTreeMap<IpNetwork, String>),
    /// One ownership record written (`Some(node)`) or deleted.
    Owner { cidr: IpNetwork, node: Option<String> },
    /// This node's own lease is no longer what the datastore says (its Node came back with
    /// another pod CIDR): the daemon must start over, so it exits non-zero and the DaemonSet
    /// restarts it onto a clean state. The text says why, for the operator.
    Lost(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("no free pod CIDR in {0}")]
    Exhausted(String),
    #[error("{0}")]
    Invalid(String),
    /// Another live daemon holds this node's name (see [`identity`]).
    #[error("{0}")]
    NameHeld(String),
}

pub enum Datastore {
    Etcd(Box<etcd::EtcdStore>),
    Kube(kube::KubeStore),
    None(none::NoneStore),
}

impl Datastore {
    /// Acquires this node's lease (its own CIDR back after a restart, else a free one; waits and
    /// retries, logging, while none is free or the datastore is unreachable), then keeps it
    /// alive and sends lease events on the returned channel for as long as the process runs.
    pub async fn start(
        self,
        me: NodeInfo,
        pools: Vec<Pool>,
        metrics: crate::metrics::Metrics,
    ) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        match self {
            Datastore::Etcd(s) => (*s).start(me, pools, metrics).await,
            Datastore::Kube(s) => s.start(me, metrics).await,
            Datastore::None(s) => s.start(me).await,
        }
    }
}
