//! Claiming pod CIDRs: choose one per pool from a [`Listing`], then write the node record and
//! the CIDR keys in one transaction that succeeds only if none of them changed since the read.

use super::keys::{encode_record, Keys};
use super::listing::{Listing, Meta};
use super::{Conn, Error, NodeInfo};
use crate::cidr::{nth_subnet, subnet_index};
use crate::config::Pool;
use crate::lease::Lease;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipnetwork::IpNetwork;
use std::collections::HashSet;

pub(super) enum Want<'a> {
    /// One CIDR per pool: `hint`, then this node's CIDRs in etcd, first if they are free; else
    /// any free one.
    Fresh { pools: &'a [Pool], hint: &'a [IpNetwork] },
    /// Exactly these CIDRs: the daemon already uses them (re-creating lost records).
    Exact(&'a [IpNetwork]),
    /// Exactly these CIDRs, whoever their records name now: someone rewrote this node's records
    /// while its etcd lease was alive (see `session`), so they are this node's still.
    Restore(&'a [IpNetwork]),
}

/// Claims the CIDRs, attached to a new etcd lease, writing the node ID `id` into the record;
/// returns the node record written and the etcd lease's ID. [`Error::Raced`] means another
/// node wrote first: read again and retry.
pub(super) async fn acquire(
    conn: &mut Conn,
    keys: &Keys,
    me: &NodeInfo,
    id: Option<&str>,
    want: Want<'_>,
) -> Result<(Lease, i64), Error> {
    let listing = Listing::read(conn, keys).await?;
    let cidrs = match want {
        Want::Fresh { pools, hint } => {
            // The node's own CIDRs: a restarted daemon whose records have not expired yet gets
            // them back (and re-attaches them to its new etcd lease).
            let mut preferred: Vec<IpNetwork> = hint.to_vec();
            let own = listing.leases.iter().filter(|l| l.node == me.name);
            preferred.extend(own.flat_map(|l| l.pod_cidrs.iter().copied()));
            let owned = listing.cidrs.iter().filter(|(_, o)| o.node == me.name);
            preferred.extend(owned.map(|(c, _)| *c));
            let taken: HashSet<IpNetwork> = listing
                .cidrs
                .iter()
                .filter(|(_, o)| o.node != me.name)
                .map(|(c, _)| *c)
                .collect();
            pools
                .iter()
                .map(|p| choose(p, &me.name, &preferred, &taken).ok_or_else(|| Error::Exhausted(describe(p))))
                .collect::<Result<Vec<_>, _>>()?
        }
        Want::Exact(cidrs) => {
            if let Some((c, o)) = cidrs.iter().find_map(|c| Some((c, listing.other_owner(c, &me.name)?))) {
                return Err(Error::Taken {
                    cidr: *c,
                    owner: o.to_string(),
                });
            }
            cidrs.to_vec()
        }
        Want::Restore(cidrs) => cidrs.to_vec(),
    };
    let lease = Lease {
        node: me.name.clone(),
        underlay_ip: me.underlay_ip,
        pod_cidrs: cidrs,
        backend: me.backend.clone(),
    };
    let json = encode_record(&lease, id);

    let mut client = conn.client().await?;
    let lease_id = conn
        .call(client.lease_grant(conn.ttl.as_secs() as i64, None))
        .await?
        .id();
    let on_lease = || Some(PutOptions::new().with_lease(lease_id));
    // Each key must be as we read it: absent, or (ours) unchanged since the read.
    let unchanged = |key: &str, meta: Option<&Meta>| match meta {
        Some(m) => Compare::mod_revision(key, CompareOp::Equal, m.mod_revision),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    };
    let node_key = keys.node(&me.name);
    let mut when = vec![unchanged(&node_key, listing.nodes.get(&me.name))];
    let mut then = vec![TxnOp::put(node_key, json, on_lease())];
    for c in &lease.pod_cidrs {
        let key = keys.cidr(c);
        when.push(unchanged(&key, listing.cidrs.get(c).map(|o| &o.meta)));
        then.push(TxnOp::put(key, me.name.as_str(), on_lease()));
    }
    // CIDRs this node held but no longer wants (its pools changed): free them now rather than
    // when its old etcd lease expires.
    for (c, o) in listing
        .cidrs
        .iter()
        .filter(|(c, o)| o.node == me.name && !lease.pod_cidrs.contains(c))
    {
        let key = keys.cidr(c);
        when.push(unchanged(&key, Some(&o.meta)));
        then.push(TxnOp::delete(key, None));
    }
    let resp = conn.call(client.txn(Txn::new().when(when).and_then(then))).await?;
    if !resp.succeeded() {
        // Nothing is attached to the new etcd lease: give it back rather than wait for its TTL.
        if let Err(e) = conn.call(client.lease_revoke(lease_id)).await {
            tracing::debug!("etcd: revoking unused lease {lease_id:x}: {e}");
        }
        return Err(Error::Raced);
    }
    Ok((lease, lease_id))
}

/// "10.244.0.0/16 (10.244.1.0/24..10.244.255.0/24)", for logs.
fn describe(p: &Pool) -> String {
    format!("{} ({}..{})", p.network, p.min, p.max)
}

/// The first of `preferred` that is in `pool` and not `taken`; else the first CIDR not `taken`
/// scanning the pool (wrapping) from a start derived from the node's name, so that nodes joining
/// together start far apart instead of all racing for the lowest free CIDR.
fn choose(pool: &Pool, node: &str, preferred: &[IpNetwork], taken: &HashSet<IpNetwork>) -> Option<IpNetwork> {
    let (net, len) = (&pool.network, pool.subnet_len);
    let (lo, hi) = (subnet_index(net, len, &pool.min)?, subnet_index(net, len, &pool.max)?);
    if lo > hi {
        return None;
    }
    let in_pool =
        |c: &IpNetwork| c.ip() == c.network() && subnet_index(net, len, c).is_some_and(|i| (lo..=hi).contains(&i));
    if let Some(c) = preferred.iter().find(|c| in_pool(c) && !taken.contains(c)) {
        return Some(*c);
    }
    let count = hi - lo + 1;
    let start = fnv1a(node.as_bytes()) as u128 % count;
    // A large IPv6 pool holds more CIDRs than could ever be scanned, but among any n + 1 of them
    // one is free when only n are taken.
    let steps = count.min(taken.len() as u128 + 1);
    (0..steps)
        .filter_map(|i| nth_subnet(net, len, lo + (start + i) % count))
        .find(|c| !taken.contains(c))
}

/// FNV-1a: a stable hash (std's `DefaultHasher` may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(net: &str, len: u8, min: &str, max: &str) -> Pool {
        Pool {
            network: net.parse().unwrap(),
            subnet_len: len,
            min: min.parse().unwrap(),
            max: max.parse().unwrap(),
        }
    }

    fn nets(s: &[&str]) -> Vec<IpNetwork> {
        s.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn prefers_its_own_cidr_then_any_free_one_in_range() {
        let p = pool("10.244.0.0/16", 24, "10.244.10.0/24", "10.244.12.0/24");
        let none = HashSet::new();
        let mine = nets(&["10.244.11.0/24"]);
        assert_eq!(choose(&p, "n1", &mine, &none), Some(mine[0]));
        // Out of range, wrong length or another family: not a candidate.
        for bad in ["10.244.20.0/24", "10.244.11.0/25", "fd00::/64"] {
            let c = choose(&p, "n1", &nets(&[bad]), &none).unwrap();
            assert!(p.min <= c && c <= p.max && c.prefix() == 24, "{c}");
        }
        let taken: HashSet<_> = nets(&["10.244.10.0/24", "10.244.11.0/24"]).into_iter().collect();
        assert_eq!(choose(&p, "n1", &mine, &taken), Some("10.244.12.0/24".parse().unwrap()));
        let taken: HashSet<_> = nets(&["10.244.10.0/24", "10.244.11.0/24", "10.244.12.0/24"])
            .into_iter()
            .collect();
        assert_eq!(choose(&p, "n1", &mine, &taken), None);
    }

    #[test]
    fn nodes_start_apart_and_large_pools_stay_cheap() {
        let p = pool("10.244.0.0/16", 24, "10.244.1.0/24", "10.244.255.0/24");
        let picks: HashSet<_> = (0..20)
            .map(|i| choose(&p, &format!("node-{i}"), &[], &HashSet::new()))
            .collect();
        assert!(picks.len() > 15, "{picks:?}");
        let p6 = pool("fd00::/32", 64, "fd00:0:0:1::/64", "fd00:0:ffff:ffff::/64");
        let c = choose(&p6, "n1", &[], &HashSet::new()).unwrap();
        assert_eq!(c.prefix(), 64);
    }
}
