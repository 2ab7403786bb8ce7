//! Allocation: one address per range set, round-robin after the last reserved one.

use crate::config::IpamConfig;
use crate::range::{to_u128, RangeSet};
use crate::store::Locked;
use ipnetwork::IpNetwork;
use std::net::IpAddr;
use trellis_cni::{code, CniError, IpConfig};

/// The addresses of one attachment, one per range set, reserving what it does not hold yet.
/// An attachment that already holds addresses gets the same ones back (runtimes retry ADD).
pub fn allocate(
    store: &mut Locked<'_>,
    conf: &IpamConfig,
    container_id: &str,
    ifname: &str,
) -> Result<Vec<IpConfig>, CniError> {
    let held = store.get(container_id, ifname);
    let mut chosen = Vec::with_capacity(conf.range_sets.len());
    let mut new = Vec::new();
    for (i, set) in conf.range_sets.iter().enumerate() {
        if let Some(&ip) = held.iter().find(|&&ip| set.contains(ip)) {
            chosen.push(ip);
            continue;
        }
        let last = store.last_reserved(i);
        let (_, ip) = set
            .candidates(last)
            .find(|&(_, ip)| store.is_free(ip))
            .ok_or_else(|| exhausted(set))?;
        chosen.push(ip);
        new.push((i, ip));
    }
    if !new.is_empty() {
        let kept: Vec<IpAddr> = chosen.iter().copied().filter(|ip| held.contains(ip)).collect();
        store.reserve(container_id, ifname, &kept, &new)?;
    }
    Ok(conf
        .range_sets
        .iter()
        .zip(chosen)
        .map(|(set, ip)| {
            let range = set.range_of(ip).expect("chosen from this set");
            IpConfig {
                address: IpNetwork::new(ip, range.subnet.prefix()).expect("prefix of a valid subnet"),
                gateway: range.gateway,
                interface: None,
            }
        })
        .collect())
}

pub fn exhausted(set: &RangeSet) -> CniError {
    CniError::new(
        code::NO_ADDRESS_AVAILABLE,
        format!("no IP addresses available in range set {}", set.describe()),
    )
    .with_details("every address is reserved: delete unused pods, run CNI GC, or give the node a larger range")
}

/// How many addresses of `set` a pod can get in all.
pub fn capacity(set: &RangeSet) -> u128 {
    set.ranges
        .iter()
        .map(|r| r.capacity())
        .fold(0u128, u128::saturating_add)
}

/// How many addresses of `set` are still free, given every reserved address.
pub fn free(set: &RangeSet, reserved: &[IpAddr]) -> u128 {
    let used = reserved
        .iter()
        .filter(|&&ip| set.range_of(ip).is_some_and(|r| r.is_assignable(ip)))
        .count() as u128;
    capacity(set).saturating_sub(used)
}

/// Orders addresses as numbers (for tests and messages).
pub fn sort_ips(ips: &mut [IpAddr]) {
    ips.sort_by_key(|&ip| (ip.is_ipv6(), to_u128(ip)));
}
