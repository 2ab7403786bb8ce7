//! `net-conf.json`, in flannel's shape so that a flannel user can switch:
//!
//! ```json
//! {"Network": "10.244.0.0/16", "IPv6Network": "fd00:244::/56", "EnableIPv4": true,
//!  "EnableIPv6": true, "SubnetLen": 24, "IPv6SubnetLen": 64,
//!  "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": false}}
//! ```

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("net-conf.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("net-conf.json: {0}")]
    Invalid(String),
}

/// When to turn off TX checksum offload on the VXLAN device (see `backend::vxlan`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumOffload {
    /// Off only on kernels known to corrupt UDP checksums of VXLAN-encapsulated traffic.
    #[default]
    Auto,
    /// Always leave it on.
    On,
    /// Always turn it off.
    Off,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "Type")]
pub enum Backend {
    #[serde(rename = "vxlan")]
    Vxlan {
        #[serde(rename = "VNI", default = "default_vni")]
        vni: u32,
        #[serde(rename = "Port", default = "default_port")]
        port: u16,
        #[serde(rename = "DirectRouting", default)]
        direct_routing: bool,
        #[serde(rename = "ChecksumOffload", default)]
        checksum_offload: ChecksumOffload,
    },
    #[serde(rename = "host-gw")]
    HostGw,
}

fn default_vni() -> u32 {
    1
}

/// flannel's default VXLAN port (the kernel's legacy one); IANA's is 4789.
fn default_port() -> u16 {
    8472
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Vxlan { .. } => "vxlan",
            Backend::HostGw => "host-gw",
        }
    }

    /// Bytes the backend adds to each packet on an underlay of the given family (the pod MTU is
    /// the underlay MTU less this).
    pub fn overhead(&self, underlay_v6: bool) -> u32 {
        match self {
            // outer IP (20 or 40) + UDP 8 + VXLAN 8 + inner Ethernet 14
            Backend::Vxlan { .. } => {
                if underlay_v6 {
                    70
                } else {
                    50
                }
            }
            Backend::HostGw => 0,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
struct Raw {
    #[serde(rename = "Network")]
    network: Option<Ipv4Network>,
    #[serde(rename = "IPv6Network")]
    ipv6_network: Option<Ipv6Network>,
    #[serde(rename = "EnableIPv4", default = "yes")]
    enable_ipv4: bool,
    #[serde(rename = "EnableIPv6", default)]
    enable_ipv6: bool,
    #[serde(rename = "SubnetLen")]
    subnet_len: Option<u8>,
    #[serde(rename = "IPv6SubnetLen")]
    ipv6_subnet_len: Option<u8>,
    #[serde(rename = "SubnetMin")]
    subnet_min: Option<Ipv4Addr>,
    #[serde(rename = "SubnetMax")]
    subnet_max: Option<Ipv4Addr>,
    #[serde(rename = "IPv6SubnetMin")]
    ipv6_subnet_min: Option<Ipv6Addr>,
    #[serde(rename = "IPv6SubnetMax")]
    ipv6_subnet_max: Option<Ipv6Addr>,
    #[serde(rename = "Backend")]
    backend: Backend,
}

/// One family's address plan: the cluster CIDR and how it is cut into node CIDRs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub network: IpNetwork,
    pub subnet_len: u8,
    /// The first and last node CIDR's network address that may be leased.
    pub min: IpNetwork,
    pub max: IpNetwork,
}

impl Pool {
    fn new(
        network: IpNetwork,
        subnet_len: u8,
        min: Option<std::net::IpAddr>,
        max: Option<std::net::IpAddr>,
    ) -> Result<Pool, ConfigError> {
        let bits = if network.is_ipv4() { 32 } else { 128 };
        if subnet_len <= network.prefix() || subnet_len > bits - 2 {
            return Err(ConfigError::Invalid(format!(
                "subnet length /{subnet_len} must be longer than the network's /{} and leave room for pods",
                network.prefix()
            )));
        }
        if network.ip() != network.network() {
            return Err(ConfigError::Invalid(format!("network {network} has host bits set")));
        }
        let subnet = |ip: std::net::IpAddr, what: &str| -> Result<IpNetwork, ConfigError> {
            let n = IpNetwork::new(ip, subnet_len).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !network.contains(ip) || n.network() != ip {
                return Err(ConfigError::Invalid(format!(
                    "{what} {ip} is not a /{subnet_len} of {network}"
                )));
            }
            Ok(n)
        };
        let first = IpNetwork::new(network.network(), subnet_len).expect("valid");
        // flannel skips the first subnet by default (its address would be the network's own).
        let default_min = crate::cidr::nth_subnet(&network, subnet_len, 1).unwrap_or(first);
        let last = crate::cidr::nth_subnet(
            &network,
            subnet_len,
            crate::cidr::subnet_count(&network, subnet_len) - 1,
        )
        .expect("non-empty");
        let min = min.map(|m| subnet(m, "SubnetMin")).transpose()?.unwrap_or(default_min);
        let max = max.map(|m| subnet(m, "SubnetMax")).transpose()?.unwrap_or(last);
        Ok(Pool {
            network,
            subnet_len,
            min,
            max,
        })
    }
}

/// The validated `net-conf.json`.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub pools: Vec<Pool>,
    pub backend: Backend,
}

impl NetConf {
    pub fn parse(text: &str) -> Result<NetConf, ConfigError> {
        let raw: Raw = serde_json::from_str(text)?;
        let mut pools = Vec::new();
        if raw.enable_ipv4 {
            let net = raw
                .network
                .ok_or_else(|| ConfigError::Invalid("EnableIPv4 is true but Network is missing".into()))?;
            pools.push(Pool::new(
                IpNetwork::V4(net),
                raw.subnet_len.unwrap_or(24),
                raw.subnet_min.map(Into::into),
                raw.subnet_max.map(Into::into),
            )?);
        }
        if raw.enable_ipv6 {
            let net = raw
                .ipv6_network
                .ok_or_else(|| ConfigError::Invalid("EnableIPv6 is true but IPv6Network is missing".into()))?;
            pools.push(Pool::new(
                IpNetwork::V6(net),
                raw.ipv6_subnet_len.unwrap_or(64),
                raw.ipv6_subnet_min.map(Into::into),
                raw.ipv6_subnet_max.map(Into::into),
            )?);
        }
        if pools.is_empty() {
            return Err(ConfigError::Invalid("neither IPv4 nor IPv6 is enabled".into()));
        }
        Ok(NetConf {
            pools,
            backend: raw.backend,
        })
    }

    /// The cluster CIDRs (traffic to them is never masqueraded).
    pub fn cluster_cidrs(&self) -> Vec<IpNetwork> {
        self.pools.iter().map(|p| p.network).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannels_shape_with_its_defaults() {
        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].subnet_len, 24);
        assert_eq!(c.pools[0].min.to_string(), "10.244.1.0/24");
        assert_eq!(c.pools[0].max.to_string(), "10.244.255.0/24");
        assert_eq!(
            c.backend,
            Backend::Vxlan {
                vni: 1,
                port: 8472,
                direct_routing: false,
                checksum_offload: ChecksumOffload::Auto
            }
        );
        let c = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "SubnetMin": "10.244.10.0", "SubnetMax": "10.244.20.0", "Backend": {"Type": "host-gw"}}"#,
        )
        .unwrap();
        assert_eq!(c.pools[1].subnet_len, 64);
        assert_eq!(c.pools[0].min.to_string(), "10.244.10.0/24");
        assert_eq!(c.backend, Backend::HostGw);
    }

    #[test]
    fn refuses_what_cannot_work() {
        for bad in [
            r#"{"Backend": {"Type": "vxlan"}}"#,
            r#"{"Network": "10.244.0.0/16", "SubnetLen": 16, "Backend": {"Type": "vxlan"}}"#,
            r#"{"Network": "10.244.0.1/16", "Backend": {"Type": "vxlan"}}"#,
            r#"{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0", "Backend": {"Type": "vxlan"}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "carrier-pigeon"}}"#,
            r#"{"Network": "10.244.0.0/16", "EnableIPv4": false, "Backend": {"Type": "vxlan"}}"#,
        ] {
            assert!(NetConf::parse(bad).is_err(), "{bad}");
        }
    }
}
