//! One consistent read of everything under the prefix: the snapshot sent to the receiver, and
//! the revisions that the claiming transaction compares against.

use super::keys::{decode_lease, node_id, Key, Keys};
use super::{Conn, Error};
use crate::lease::Lease;
use etcd_client::GetOptions;
use ipnetwork::IpNetwork;
use std::collections::HashMap;

/// Keys per read: well under gRPC's 4 MiB reply limit (a lease is about 250 bytes).
const PAGE: i64 = 2000;

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where a key stands: for compare-and-swap, and to tell which etcd lease holds it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub mod_revision: i64,
    pub lease: i64,
}

#[derive(Clone, Debug)]
pub(super) struct Owner {
    pub node: String,
    pub meta: Meta,
}

#[derive(Debug, Default)]
pub(super) struct Listing {
    /// The store's revision at the read: watch from the next one.
    pub revision: i64,
    /// The well-formed node records.
    pub leases: Vec<Lease>,
    /// Every node key, well-formed or not.
    pub nodes: HashMap<String, Meta>,
    /// Every CIDR ownership key.
    pub cidrs: HashMap<IpNetwork, Owner>,
    /// The node ID in each node record that has one.
    pub ids: HashMap<String, String>,
}

impl Listing {
    /// Reads in pages of [`PAGE`] keys, all at the revision of the first page: one reply for the
    /// whole prefix passes gRPC's 4 MiB limit at about 16,800 nodes (bench/convergence).
    pub async fn read(conn: &mut Conn, keys: &Keys) -> Result<Listing, Error> {
        let mut client = conn.client().await?;
        let prefix = keys.prefix().as_bytes().to_vec();
        let end = prefix_end(&prefix);
        let mut from = prefix.clone();
        let mut l = Listing::default();
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if l.revision != 0 {
                opts = opts.with_revision(l.revision);
            }
            let resp = conn.call(client.get(from.clone(), Some(opts))).await?;
            if l.revision == 0 {
                l.revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let meta = Meta {
                    mod_revision: kv.mod_revision(),
                    lease: kv.lease(),
                };
                match keys.parse(kv.key()) {
                    Key::Node(name) => {
                        l.nodes.insert(name.to_string(), meta);
                        l.ids.extend(node_id(kv.value()).map(|id| (name.to_string(), id)));
                        l.leases.extend(decode_lease(name, kv.value()));
                    }
                    Key::Cidr(cidr) => {
                        let node = String::from_utf8_lossy(kv.value()).into_owned();
                        l.cidrs.insert(cidr, Owner { node, meta });
                    }
                    Key::Claim(_) | Key::Other => {}
                }
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    // The next key after the last one read.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(l),
            }
        }
    }

    /// The owner of `cidr` if it is a node other than `node`.
    pub fn other_owner(&self, cidr: &IpNetwork, node: &str) -> Option<&str> {
        self.cidrs.get(cidr).map(|o| o.node.as_str()).filter(|o| *o != node)
    }

    /// Whether `lease` is in the store as written, with its node record and every one of its
    /// CIDR keys attached to the etcd lease `lease_id` (which is therefore alive).
    pub fn holds(&self, lease: &Lease, lease_id: i64) -> bool {
        self.nodes.get(&lease.node).is_some_and(|m| m.lease == lease_id)
            && self.leases.contains(lease)
            && lease.pod_cidrs.iter().all(|c| {
                self.cidrs
                    .get(c)
                    .is_some_and(|o| o.node == lease.node && o.meta.lease == lease_id)
            })
    }
}
