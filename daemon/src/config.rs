//! `net-conf.json`, in flannel's shape so that a flannel user can switch:
//!
//! ```json
//! {"Network": "10.244.0.0/16", "IPv6Network": "fd00:244::/56", "EnableIPv4": true,
//!  "EnableIPv6": true, "SubnetLen": 24, "IPv6SubnetLen": 64,
//!  "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": false}}
//! ```
//!
//! `Backend` is one of (PascalCase keys, as flannel's):
//! - `{"Type": "vxlan", "VNI": 1, "Port": 8472, "DirectRouting": false, "ChecksumOffload": "auto"}`
//! - `{"Type": "host-gw"}`
//! - `{"Type": "ipip"}`: IPv4 pods only (IPIP carries IPv4)
//! - `{"Type": "bgp", "ASNumber": 64512, "Mesh": true, "Peers": [{"IP": "192.168.0.1", "ASNumber": 64513,
//!   "PasswordFile": "/etc/trellis/bgp/tor1"}],
//!   "RouteReflectors": ["192.168.0.2"], "CrossSubnet": "ipip", "HoldTime": 90, "GracefulRestartSeconds": 120}`

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("net-conf.json: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("net-conf.json: {0}")]
    Invalid(String),
}

/// When to turn off TX checksum offload on the VXLAN device (see `backend::checksum`).
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
    /// IPv4 in IPv4 to every other node (Calico's `ipipMode: Always`); see `backend::ipip`.
    #[serde(rename = "ipip")]
    Ipip,
    /// Routes learned over BGP instead of from the leases (Calico's BGP mode); see `backend::bgp`.
    #[serde(rename = "bgp")]
    Bgp {
        /// This node's AS number (every node's, in an iBGP full mesh).
        #[serde(rename = "ASNumber", default = "default_asn")]
        as_number: u32,
        /// Peer with every other node that publishes a BGP lease (the node-to-node mesh).
        #[serde(rename = "Mesh", default = "yes")]
        mesh: bool,
        /// Further peers (top-of-rack routers...), with their own AS numbers.
        #[serde(rename = "Peers", default)]
        peers: Vec<BgpPeer>,
        /// Route reflectors, peered in this node's AS.
        #[serde(rename = "RouteReflectors", default)]
        route_reflectors: Vec<IpAddr>,
        /// How routes to nodes off this node's L2 subnet go.
        #[serde(rename = "CrossSubnet", default)]
        cross_subnet: CrossSubnet,
        /// BGP hold time, seconds (0, or 3 and more: RFC 4271).
        #[serde(rename = "HoldTime", default = "default_hold_time")]
        hold_time: u16,
        /// How long routes from a restarting peer are kept (RFC 4724; at most 4095).
        #[serde(rename = "GracefulRestartSeconds", default = "default_graceful_restart")]
        graceful_restart: u16,
    },
}

/// A configured BGP peer.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BgpPeer {
    #[serde(rename = "IP")]
    pub ip: IpAddr,
    #[serde(rename = "ASNumber")]
    pub as_number: u32,
    /// A file holding the peer's own TCP MD5 password (a mounted Secret key, as Calico's
    /// BGPPeer `password.secretKeyRef`); re-read on every resync (see `crate::passwords`).
    /// Without one, the peer's sessions use `--bgp-password-file`'s, as the mesh and the route
    /// reflectors do.
    #[serde(rename = "PasswordFile", default)]
    pub password_file: Option<std::path::PathBuf>,
}

/// In BGP mode, how a route whose next hop is off this node's L2 subnet is installed (Calico's
/// `ipipMode`/`vxlanMode: CrossSubnet`): nodes on the subnet always get plain routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossSubnet {
    /// Through an IPIP tunnel (IPv4 only).
    #[default]
    Ipip,
    /// Through a VXLAN device, to nodes whose lease publishes a VTEP MAC.
    Vxlan,
    /// Not at all: such routes are refused (the underlay routers must know the pod CIDRs).
    None,
}

/// A private AS number (RFC 6996), Calico's default too.
fn default_asn() -> u32 {
    64512
}

fn default_hold_time() -> u16 {
    90
}

fn default_graceful_restart() -> u16 {
    120
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
            Backend::Ipip => "ipip",
            Backend::Bgp { .. } => "bgp",
        }
    }

    /// Bytes the backend adds to each packet on an underlay of the given family (the pod MTU is
    /// the underlay MTU less this).
    ///
    /// BGP: plain routes need nothing, but the MTU is one for the whole node, so it leaves room
    /// for the cross-subnet tunnel whenever one is configured (as Calico does with CrossSubnet).
    pub fn overhead(&self, underlay_v6: bool) -> u32 {
        // outer IP (20 or 40) + UDP 8 + VXLAN 8 + inner Ethernet 14
        let vxlan = if underlay_v6 { 70 } else { 50 };
        match self {
            Backend::Vxlan { .. } => vxlan,
            Backend::HostGw => 0,
            // the outer IPv4 header
            Backend::Ipip => IPIP_OVERHEAD,
            Backend::Bgp { cross_subnet, .. } => match cross_subnet {
                CrossSubnet::Ipip => IPIP_OVERHEAD,
                CrossSubnet::Vxlan => vxlan,
                CrossSubnet::None => 0,
            },
        }
    }

    /// What cannot work whatever the node: checked once, when the config is read.
    fn validate(&self, pools: &[Pool]) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        match self {
            Backend::Ipip if pools.iter().any(|p| p.network.is_ipv6()) => invalid(
                "the ipip backend carries IPv4 only (IP protocol 4): disable IPv6 (EnableIPv6) or use vxlan".into(),
            ),
            Backend::Bgp {
                as_number,
                peers,
                hold_time,
                graceful_restart,
                ..
            } => {
                if *as_number == 0 {
                    return invalid("bgp: ASNumber 0 is reserved".into());
                }
                if let Some(p) = peers.iter().find(|p| p.as_number == 0) {
                    return invalid(format!("bgp: peer {} has the reserved ASNumber 0", p.ip));
                }
                if matches!(hold_time, 1 | 2) {
                    return invalid(format!("bgp: HoldTime {hold_time} must be 0 or at least 3 (RFC 4271)"));
                }
                if *graceful_restart > 4095 {
                    return invalid(format!(
                        "bgp: GracefulRestartSeconds {graceful_restart} is more than 4095 (RFC 4724)"
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Bytes IPIP adds: the outer IPv4 header.
pub const IPIP_OVERHEAD: u32 = 20;

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
        raw.backend.validate(&pools)?;
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
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "Backend": {"Type": "ipip"}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "ASNumber": 0}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "HoldTime": 2}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "GracefulRestartSeconds": 5000}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "CrossSubnet": "gre"}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Peers": [{"IP": "10.0.0.1", "ASNumber": 0}]}}"#,
            r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "Peers": [{"IP": "10.0.0.1"}]}}"#,
        ] {
            assert!(NetConf::parse(bad).is_err(), "{bad}");
        }
        let err = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56", "Backend": {"Type": "ipip"}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("IPv4 only"), "{err}");
    }

    #[test]
    fn parses_ipip_and_bgp_with_their_defaults() {
        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}"#).unwrap();
        assert_eq!(c.backend, Backend::Ipip);
        assert_eq!((c.backend.name(), c.backend.overhead(false)), ("ipip", 20));

        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp"}}"#).unwrap();
        assert_eq!(
            c.backend,
            Backend::Bgp {
                as_number: 64512,
                mesh: true,
                peers: vec![],
                route_reflectors: vec![],
                cross_subnet: CrossSubnet::Ipip,
                hold_time: 90,
                graceful_restart: 120,
            }
        );
        assert_eq!(c.backend.name(), "bgp");
        assert_eq!(c.backend.overhead(false), 20, "room for the cross-subnet IPIP tunnel");

        let c = NetConf::parse(
            r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56",
                "Backend": {"Type": "bgp", "ASNumber": 65001, "Mesh": false,
                "Peers": [{"IP": "192.168.0.1", "ASNumber": 65000}, {"IP": "fd00::1", "ASNumber": 65000, "PasswordFile": "/etc/trellis/bgp/tor2"}],
                "RouteReflectors": ["192.168.0.2"], "CrossSubnet": "none", "HoldTime": 0,
                "GracefulRestartSeconds": 300}}"#,
        )
        .unwrap();
        let Backend::Bgp {
            as_number,
            mesh,
            peers,
            route_reflectors,
            cross_subnet,
            hold_time,
            graceful_restart,
        } = &c.backend
        else {
            panic!("{:?}", c.backend)
        };
        assert_eq!(
            (*as_number, *mesh, *hold_time, *graceful_restart),
            (65001, false, 0, 300)
        );
        assert_eq!(
            peers,
            &[
                BgpPeer {
                    ip: "192.168.0.1".parse().unwrap(),
                    as_number: 65000,
                    password_file: None,
                },
                BgpPeer {
                    ip: "fd00::1".parse().unwrap(),
                    as_number: 65000,
                    password_file: Some("/etc/trellis/bgp/tor2".into()),
                }
            ]
        );
        assert_eq!(route_reflectors, &["192.168.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(*cross_subnet, CrossSubnet::None);
        assert_eq!(c.backend.overhead(false), 0, "plain routes only");

        let c = NetConf::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "bgp", "CrossSubnet": "vxlan"}}"#)
            .unwrap();
        assert_eq!((c.backend.overhead(false), c.backend.overhead(true)), (50, 70));
    }
}
