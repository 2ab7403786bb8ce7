//! Taking a node's name at start: refused while another live daemon holds it (see
//! `datastore::identity` for why and what happens on reboot and reinstall).

use super::keys::{node_id, Keys};
use super::{Conn, Error, NodeInfo};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// How a name check ended.
pub(super) enum Name {
    /// Free, ours, or written before node IDs existed: go on.
    Ours,
    /// Held by a live daemon with another ID: why, for the operator.
    Held(String),
}

/// Waits until the name `me.name` is free or ours, for at most a TTL and a second; reports a
/// holder that kept renewing its record all along, after recording the attempt where the
/// holder watches.
pub(super) async fn check(conn: &mut Conn, keys: &Keys, me: &NodeInfo, id: &str) -> Result<Name, Error> {
    let key = keys.node(&me.name);
    let mut client = conn.client().await?;
    let mut deadline = None;
    loop {
        let resp = conn.call(client.get(key.as_str(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(Name::Ours);
        };
        let holder = match node_id(kv.value()) {
            Some(h) if h != id => h,
            _ => return Ok(Name::Ours),
        };
        let record = String::from_utf8_lossy(kv.value()).into_owned();
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + conn.ttl + Duration::from_secs(1));
        if Instant::now() >= deadline {
            let attempt = serde_json::json!({"nodeId": id, "underlayIp": me.underlay_ip}).to_string();
            conn.call(client.put(keys.claim(&me.name), attempt, None)).await?;
            return Ok(Name::Held(format!(
                "node name {} is held by another live trellisd (node ID {holder}; its record: {record}); \
                 is this machine a clone, or NODE_NAME wrong? Refusing to start",
                me.name
            )));
        }
        tracing::info!(
            node = %me.name,
            "etcd: this node's name is held by node ID {holder}, not this daemon's {id}; waiting up to {:?} for that record to expire",
            deadline - Instant::now()
        );
        sleep(Duration::from_secs(1).min(conn.ttl / 3)).await;
    }
}
