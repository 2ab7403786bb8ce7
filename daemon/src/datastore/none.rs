//! The `none` datastore: one node, its pod CIDRs from a flag, no peers.

use super::{DatastoreError, Event, NodeInfo};
use crate::lease::Lease;
use ipnetwork::IpNetwork;
use tokio::sync::mpsc;

pub struct NoneStore {
    pub pod_cidrs: Vec<IpNetwork>,
}

impl NoneStore {
    pub async fn start(self, me: NodeInfo) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        if self.pod_cidrs.is_empty() {
            return Err(DatastoreError::Invalid("datastore none needs --pod-cidr".into()));
        }
        let lease = Lease {
            node: me.name,
            underlay_ip: me.underlay_ip,
            pod_cidrs: self.pod_cidrs,
            backend: me.backend,
        };
        let (tx, rx) = mpsc::channel(1);
        tx.send(Event::Snapshot(vec![lease.clone()]))
            .await
            .expect("receiver alive");
        // Keep the sender alive for the life of the process: the stream never ends.
        std::mem::forget(tx);
        Ok((lease, rx))
    }
}
