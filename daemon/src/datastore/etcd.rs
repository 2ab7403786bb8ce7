//! The etcd datastore (written for issue 4).

use super::{DatastoreError, Event, NodeInfo};
use crate::config::Pool;
use crate::lease::Lease;
use tokio::sync::mpsc;

pub struct EtcdStore {}

impl EtcdStore {
    pub async fn start(
        self,
        _me: NodeInfo,
        _pools: Vec<Pool>,
        _metrics: crate::metrics::Metrics,
    ) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        Err(DatastoreError::Invalid("the etcd datastore is not written yet".into()))
    }
}
