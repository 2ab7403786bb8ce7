//! The key layout under the prefix (default `/trellis/leases/`):
//!
//! - `<prefix><node>`: the node's [`Lease`] as JSON (what the other nodes read);
//! - `<prefix>cidrs/<ip>_<len>`: the name of the node that owns that pod CIDR;
//! - `<prefix>claims/<node>`: the last attempt of a second daemon to start under a live node's
//!   name (its node ID and underlay address), for the holder to log (see `identity`).
//!
//! Why a second key per CIDR: etcd can only compare-and-swap on whole keys, and the node records
//! are keyed by node name, so "is 10.244.3.0/24 free?" cannot be asked of them atomically. One
//! key per CIDR, created only if absent (`create_revision == 0`), makes the CIDR the unit of
//! mutual exclusion. Both kinds of key are written in one transaction and attached to the same
//! etcd lease, so they appear together and expire together: they cannot diverge.
//!
//! Node names are Kubernetes names and never contain `/`, so `cidrs/…` cannot be a node key.

use crate::lease::Lease;
use ipnetwork::IpNetwork;

/// What a key under the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Key<'a> {
    Node(&'a str),
    Cidr(IpNetwork),
    /// A second daemon's attempt to take a node's name.
    Claim(&'a str),
    /// Anything else under the prefix (someone else's data, or a malformed CIDR key).
    Other,
}

#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` gets a trailing `/` if it lacks one.
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn cidr(&self, cidr: &IpNetwork) -> String {
        format!("{}cidrs/{}_{}", self.prefix, cidr.network(), cidr.prefix())
    }

    pub fn claim(&self, name: &str) -> String {
        format!("{}claims/{name}", self.prefix)
    }

    pub fn parse<'a>(&self, key: &'a [u8]) -> Key<'a> {
        let Some(rest) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(&self.prefix)) else {
            return Key::Other;
        };
        if let Some(c) = rest.strip_prefix("cidrs/") {
            return c
                .rsplit_once('_')
                .and_then(|(ip, len)| IpNetwork::new(ip.parse().ok()?, len.parse().ok()?).ok())
                .filter(|n| n.ip() == n.network())
                .map_or(Key::Other, Key::Cidr);
        }
        if let Some(n) = rest
            .strip_prefix("claims/")
            .filter(|n| !n.is_empty() && !n.contains('/'))
        {
            return Key::Claim(n);
        }
        if rest.is_empty() || rest.contains('/') {
            return Key::Other;
        }
        Key::Node(rest)
    }
}

/// The node ID in a node record (`nodeId`, beside the lease's fields), if it has one.
pub(super) fn node_id(value: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        #[serde(rename = "nodeId")]
        node_id: Option<String>,
    }
    serde_json::from_slice::<Id>(value).ok()?.node_id
}

/// A node record: the lease, and the node ID of the daemon that wrote it.
pub(super) fn encode_record(lease: &Lease, id: Option<&str>) -> String {
    let mut v = serde_json::to_value(lease).expect("a lease serializes");
    if let (Some(id), Some(o)) = (id, v.as_object_mut()) {
        o.insert("nodeId".into(), id.into());
    }
    v.to_string()
}

/// A node record's value, or `None` (logged) when it is not a lease for `node`: a bad value
/// under the prefix must never take the daemon down, nor be taken for a peer.
pub(super) fn decode_lease(node: &str, value: &[u8]) -> Option<Lease> {
    match serde_json::from_slice::<Lease>(value) {
        Ok(l) if l.node == node => Some(l),
        Ok(l) => {
            tracing::warn!(
                key = node,
                "etcd: ignoring a lease for node {} under another node's key",
                l.node
            );
            None
        }
        Err(e) => {
            tracing::warn!(key = node, "etcd: ignoring a malformed lease: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("/trellis/leases");
        assert_eq!(k.node("node-1"), "/trellis/leases/node-1");
        for c in ["10.244.3.0/24", "fd00:244:0:2::/64"] {
            let c: IpNetwork = c.parse().unwrap();
            assert_eq!(k.parse(k.cidr(&c).as_bytes()), Key::Cidr(c));
        }
        assert_eq!(k.parse(b"/trellis/leases/node-1"), Key::Node("node-1"));
        assert_eq!(k.parse(b"/trellis/leases/cidrs/junk"), Key::Other);
        assert_eq!(k.parse(b"/trellis/leases/cidrs/10.244.3.1_24"), Key::Other);
        assert_eq!(k.parse(b"/trellis/leases/a/b"), Key::Other);
        assert_eq!(k.parse(k.claim("node-1").as_bytes()), Key::Claim("node-1"));
        assert_eq!(k.parse(b"/elsewhere/node-1"), Key::Other);
    }

    #[test]
    fn bad_values_are_skipped() {
        assert_eq!(decode_lease("n1", b"{not json"), None);
        let l = r#"{"node":"n2","underlayIp":"192.168.0.2","podCidrs":["10.244.2.0/24"],"backend":{"type":"host-gw"}}"#;
        assert_eq!(decode_lease("n1", l.as_bytes()), None);
        assert!(decode_lease("n2", l.as_bytes()).is_some());
        let lease = decode_lease("n2", l.as_bytes()).unwrap();
        let rec = encode_record(&lease, Some("abc"));
        assert_eq!(
            decode_lease("n2", rec.as_bytes()),
            Some(lease),
            "the ID is beside the lease"
        );
        assert_eq!(node_id(rec.as_bytes()).as_deref(), Some("abc"));
        assert_eq!(node_id(l.as_bytes()), None);
    }
}
