//! A node lease: what every node publishes about itself and learns about the others.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use trellis_net::MacAddr;

/// The backend data a node publishes, so that the others can reach its pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BackendData {
    /// VXLAN: the node's VTEP MAC and the VNI.
    Vxlan {
        #[serde(rename = "vtepMAC")]
        vtep_mac: MacString,
        vni: u32,
    },
    /// host-gw: the underlay IP is all the others need.
    HostGw,
    /// IPIP: likewise (the underlay IP is the tunnel's outer destination).
    Ipip,
    /// BGP: the node's AS number (for the node-to-node mesh), with `CrossSubnet: vxlan` its
    /// VTEP MAC (the VNI is fixed: `backend::bgp::CROSS_SUBNET_VNI`), and its route-reflector
    /// cluster ID when it is a route reflector (`--bgp-route-reflector-cluster-id`; the other
    /// nodes peer with it, see `backend::bgp::peers`). Leases without it are no reflectors.
    Bgp {
        asn: u32,
        #[serde(rename = "vtepMAC", default, skip_serializing_if = "Option::is_none")]
        vtep_mac: Option<MacString>,
        #[serde(rename = "routeReflectorClusterID", default, skip_serializing_if = "Option::is_none")]
        rr_cluster_id: Option<Ipv4Addr>,
    },
}

/// A MAC address in a lease, as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacString(pub MacAddr);

impl Serialize for MacString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for MacString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(MacString).map_err(serde::de::Error::custom)
    }
}

/// One node's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The node's name (its key in the datastore).
    pub node: String,
    /// The address other nodes send its traffic to.
    pub underlay_ip: IpAddr,
    /// The node's pod CIDRs: at most one IPv4 and one IPv6.
    pub pod_cidrs: Vec<IpNetwork>,
    pub backend: BackendData,
}

impl Lease {
    pub fn cidr_v4(&self) -> Option<IpNetwork> {
        self.pod_cidrs.iter().copied().find(IpNetwork::is_ipv4)
    }

    pub fn cidr_v6(&self) -> Option<IpNetwork> {
        self.pod_cidrs.iter().copied().find(IpNetwork::is_ipv6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_as_json() {
        let l = Lease {
            node: "node-1".into(),
            underlay_ip: "192.168.0.11".parse().unwrap(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap(), "fd00:244:1::/64".parse().unwrap()],
            backend: BackendData::Vxlan {
                vtep_mac: MacString("02:11:22:33:44:55".parse().unwrap()),
                vni: 1,
            },
        };
        let s = serde_json::to_string(&l).unwrap();
        assert!(s.contains("\"vtepMAC\":\"02:11:22:33:44:55\""), "{s}");
        assert_eq!(serde_json::from_str::<Lease>(&s).unwrap(), l);
        assert_eq!(l.cidr_v6().unwrap().to_string(), "fd00:244:1::/64");
    }

    #[test]
    fn ipip_and_bgp_backend_data_as_json() {
        let json = |b: &BackendData| serde_json::to_string(b).unwrap();
        assert_eq!(json(&BackendData::Ipip), r#"{"type":"ipip"}"#);
        let plain = BackendData::Bgp {
            asn: 64512,
            vtep_mac: None,
            rr_cluster_id: None,
        };
        assert_eq!(json(&plain), r#"{"type":"bgp","asn":64512}"#);
        let vx = BackendData::Bgp {
            asn: 64512,
            vtep_mac: Some(MacString("02:11:22:33:44:55".parse().unwrap())),
            rr_cluster_id: None,
        };
        assert_eq!(json(&vx), r#"{"type":"bgp","asn":64512,"vtepMAC":"02:11:22:33:44:55"}"#);
        let rr = BackendData::Bgp {
            asn: 64512,
            vtep_mac: None,
            rr_cluster_id: Some("1.0.0.1".parse().unwrap()),
        };
        assert_eq!(
            json(&rr),
            r#"{"type":"bgp","asn":64512,"routeReflectorClusterID":"1.0.0.1"}"#
        );
        // A lease of an older trellisd (no such field) is no reflector's.
        assert_eq!(
            serde_json::from_str::<BackendData>(r#"{"type":"bgp","asn":64512}"#).unwrap(),
            plain
        );
        for b in [BackendData::Ipip, plain, vx, rr] {
            assert_eq!(serde_json::from_str::<BackendData>(&json(&b)).unwrap(), b);
        }
    }
}
