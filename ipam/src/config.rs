//! The IPAM config, compatible with the reference host-local plugin:
//!
//! ```json
//! "ipam": {
//!   "type": "trellis-ipam",
//!   "ranges": [[{"subnet": "10.244.1.0/24", "rangeStart": "10.244.1.10", "gateway": "10.244.1.1"}],
//!              [{"subnet": "fd00:1::/64"}]],
//!   "routes": [{"dst": "0.0.0.0/0"}],
//!   "dataDir": "/var/lib/cni/networks"
//! }
//! ```
//! The legacy form (`subnet`, `rangeStart`, `rangeEnd`, `gateway` directly under `ipam`) is one
//! range set of one range.

use crate::range::{from_u128, to_u128, Range, RangeSet};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::{Component, PathBuf};
use trellis_cni::config::decode;
use trellis_cni::{CniError, Dns, Route};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: String,
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

#[derive(Deserialize, Debug)]
struct RawRoute {
    dst: IpNetwork,
    #[serde(default)]
    gw: Option<IpAddr>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct RawIpam {
    #[serde(rename = "type")]
    _type: String,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    data_dir: Option<String>,
    #[serde(default)]
    dns: Option<Dns>,
}

/// The validated IPAM config.
#[derive(Clone, Debug)]
pub struct IpamConfig {
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub dns: Option<Dns>,
}

impl IpamConfig {
    /// Validates the `ipam` section of a network config.
    pub fn from_value(ipam: Option<&serde_json::Value>) -> Result<IpamConfig, CniError> {
        let ipam = ipam.ok_or_else(|| {
            CniError::invalid_config("the network config has no \"ipam\" section").with_details(
                "add \"ipam\": {\"type\": \"trellis-ipam\", \"ranges\": [[{\"subnet\": \"10.244.1.0/24\"}]]}",
            )
        })?;
        let raw: RawIpam = decode(&serde_json::to_vec(ipam).expect("JSON"), "ipam config")?;
        let mut raw_sets = raw.ranges;
        if let Some(subnet) = raw.subnet {
            if !raw_sets.is_empty() {
                return Err(CniError::invalid_config("ipam has both \"subnet\" and \"ranges\"")
                    .with_details("use \"ranges\" only; the legacy \"subnet\" form is one range set of one range"));
            }
            raw_sets.push(vec![RawRange {
                subnet,
                range_start: raw.range_start,
                range_end: raw.range_end,
                gateway: raw.gateway,
            }]);
        }
        if raw_sets.is_empty() {
            return Err(CniError::invalid_config("ipam has no ranges")
                .with_details("give \"ranges\": [[{\"subnet\": \"...\"}]] (one inner list per address family)"));
        }
        let range_sets = raw_sets
            .into_iter()
            .enumerate()
            .map(|(i, set)| build_set(i, set))
            .collect::<Result<Vec<_>, _>>()?;
        check_overlaps(&range_sets)?;
        Ok(IpamConfig {
            range_sets,
            routes: raw.routes.into_iter().map(|r| Route::new(r.dst, r.gw)).collect(),
            data_dir: validate_data_dir(raw.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR))?,
            dns: raw.dns,
        })
    }
}

fn build_set(index: usize, raw: Vec<RawRange>) -> Result<RangeSet, CniError> {
    if raw.is_empty() {
        return Err(CniError::invalid_config(format!("range set {index} is empty"))
            .with_details("each inner list of \"ranges\" needs at least one {\"subnet\": ...}"));
    }
    let ranges = raw.into_iter().map(build_range).collect::<Result<Vec<_>, _>>()?;
    if ranges.iter().any(|r| r.start.is_ipv4() != ranges[0].start.is_ipv4()) {
        return Err(
            CniError::invalid_config(format!("range set {index} mixes IPv4 and IPv6"))
                .with_details("put IPv4 and IPv6 subnets in separate range sets: one address is given per set"),
        );
    }
    Ok(RangeSet { ranges })
}

fn build_range(raw: RawRange) -> Result<Range, CniError> {
    let subnet: IpNetwork = raw.subnet.parse().map_err(|e| {
        CniError::invalid_config(format!("invalid subnet {:?}", raw.subnet))
            .with_details(format!("{e}; expected CIDR notation like 10.244.1.0/24"))
    })?;
    if subnet.ip() != subnet.network() {
        return Err(
            CniError::invalid_config(format!("subnet {} has host bits set", raw.subnet)).with_details(format!(
                "did you mean {}/{}?",
                subnet.network(),
                subnet.prefix()
            )),
        );
    }
    if subnet.prefix() == 0 {
        return Err(
            CniError::invalid_config(format!("subnet {subnet} covers every address")).with_details(
                "a pod subnet is the node's pod CIDR (like 10.244.1.0/24 or fd00:10:244:1::/64); a /0 would \
                 put every destination on the pod network and take over the node's default route",
            ),
        );
    }
    let bits = if subnet.is_ipv4() { 32 } else { 128 };
    if subnet.prefix() > bits - 2 {
        return Err(
            CniError::invalid_config(format!("subnet {subnet} is too small to allocate from"))
                .with_details("use a prefix of at most /30 (IPv4) or /126 (IPv6)"),
        );
    }
    let net = to_u128(subnet.network());
    let last = to_u128(subnet.broadcast());
    let like = subnet.network();
    let start = raw.range_start.unwrap_or(from_u128(net + 1, like));
    // IPv4 has a broadcast address; IPv6 does not.
    let end = raw
        .range_end
        .unwrap_or(from_u128(if subnet.is_ipv4() { last - 1 } else { last }, like));
    let gateway = Some(raw.gateway.unwrap_or(from_u128(net + 1, like)));
    for (what, ip) in [
        ("rangeStart", Some(start)),
        ("rangeEnd", Some(end)),
        ("gateway", gateway),
    ] {
        let ip = ip.expect("set above");
        if !subnet.contains(ip) || ip.is_ipv4() != subnet.is_ipv4() {
            return Err(
                CniError::invalid_config(format!("{what} {ip} is outside subnet {subnet}"))
                    .with_details(format!("{what} must be an address of {subnet}")),
            );
        }
    }
    if to_u128(start) > to_u128(end) {
        return Err(CniError::invalid_config(format!(
            "rangeStart {start} is after rangeEnd {end}"
        )));
    }
    let range = Range {
        subnet,
        start,
        end,
        gateway,
    };
    if range.capacity() == 0 {
        return Err(
            CniError::invalid_config(format!("range {} has no address for a pod", range.describe())).with_details(
                "rangeStart..rangeEnd holds only the network, broadcast or gateway address; widen the range",
            ),
        );
    }
    Ok(range)
}

fn check_overlaps(sets: &[RangeSet]) -> Result<(), CniError> {
    let all: Vec<&Range> = sets.iter().flat_map(|s| &s.ranges).collect();
    for (i, a) in all.iter().enumerate() {
        if let Some(b) = all[i + 1..].iter().find(|b| a.overlaps(b)) {
            return Err(CniError::invalid_config("ranges overlap").with_details(format!(
                "{} overlaps {}; an address must belong to one range only",
                a.describe(),
                b.describe()
            )));
        }
    }
    Ok(())
}

/// `dataDir` must be an absolute path without `..`, so a config cannot send the store elsewhere.
fn validate_data_dir(dir: &str) -> Result<PathBuf, CniError> {
    let path = PathBuf::from(dir);
    let bad = !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir));
    if bad {
        return Err(CniError::invalid_config(format!("invalid dataDir {dir:?}"))
            .with_details("dataDir must be an absolute path without '..'"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use trellis_cni::code;

    fn parse(v: serde_json::Value) -> Result<IpamConfig, CniError> {
        IpamConfig::from_value(Some(&v))
    }

    #[test]
    fn defaults_follow_host_local() {
        let c = parse(json!({"type": "trellis-ipam", "subnet": "10.1.0.0/24"})).unwrap();
        let r = &c.range_sets[0].ranges[0];
        assert_eq!(r.start.to_string(), "10.1.0.1");
        assert_eq!(r.end.to_string(), "10.1.0.254");
        assert_eq!(r.gateway.unwrap().to_string(), "10.1.0.1");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let c = parse(json!({"type": "x", "ranges": [[{"subnet": "fd00::/64"}]]})).unwrap();
        assert_eq!(c.range_sets[0].ranges[0].end.to_string(), "fd00::ffff:ffff:ffff:ffff");
    }

    #[test]
    fn the_smallest_subnets_hold_a_gateway_and_one_pod() {
        for subnet in ["10.1.0.0/30", "fd00::/126"] {
            let c = parse(json!({"type": "x", "subnet": subnet})).unwrap();
            assert!(crate::allocator::capacity(&c.range_sets[0]) >= 1, "{subnet}");
        }
    }

    #[test]
    fn bad_configs_are_code_7_with_a_reason() {
        for (v, needle) in [
            (json!({"type": "x"}), "no ranges"),
            (json!({"type": "x", "subnet": "10.1.0.0/33"}), "invalid subnet"),
            (json!({"type": "x", "subnet": "banana"}), "invalid subnet"),
            (json!({"type": "x", "subnet": "10.1.0.5/24"}), "host bits"),
            (json!({"type": "x", "subnet": "10.1.0.0/31"}), "too small"),
            (json!({"type": "x", "subnet": "10.1.0.0/32"}), "too small"),
            (json!({"type": "x", "subnet": "fd00::/127"}), "too small"),
            (json!({"type": "x", "subnet": "0.0.0.0/0"}), "covers every address"),
            (
                json!({"type": "x", "ranges": [[{"subnet": "::/0"}]]}),
                "covers every address",
            ),
            (
                json!({"type": "x", "subnet": "10.1.0.0/30", "rangeStart": "10.1.0.1", "rangeEnd": "10.1.0.1"}),
                "no address for a pod",
            ),
            (
                json!({"type": "x", "subnet": "fd00::/126", "rangeStart": "fd00::1", "rangeEnd": "fd00::1"}),
                "no address for a pod",
            ),
            (
                json!({"type": "x", "subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}),
                "outside",
            ),
            (
                json!({"type": "x", "subnet": "10.1.0.0/24", "rangeStart": "10.1.0.9", "rangeEnd": "10.1.0.3"}),
                "after",
            ),
            (
                json!({"type": "x", "subnet": "10.1.0.0/24", "gateway": "fd00::1"}),
                "outside",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]}),
                "overlap",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.1.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "mixes",
            ),
            (json!({"type": "x", "ranges": [[]]}), "empty"),
            (
                json!({"type": "x", "subnet": "10.1.0.0/24", "dataDir": "relative/dir"}),
                "dataDir",
            ),
            (
                json!({"type": "x", "subnet": "10.1.0.0/24", "dataDir": "/var/lib/../../etc"}),
                "dataDir",
            ),
            (json!({"type": "x", "ranges": "10.1.0.0/24"}), "ipam config"),
            (json!({"type": "x", "subnet": 10}), "ipam config"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.code, code::INVALID_NETWORK_CONFIG, "{v}: {e}");
            assert!(e.to_string().contains(needle), "{v}: {e}");
        }
        assert_eq!(
            IpamConfig::from_value(None).unwrap_err().code,
            code::INVALID_NETWORK_CONFIG
        );
    }
}
