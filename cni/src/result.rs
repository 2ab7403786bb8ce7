//! The ADD result, kept in one internal shape (1.1.0's) and printed in any supported version.
//!
//! What differs between the versions we speak:
//! - before 1.0.0 every entry of `ips` carries `"version": "4"` or `"6"`;
//! - 1.1.0 added route `mtu`, `advmss`, `priority`, `table`, `scope` and interface `mtu`,
//!   `socketPath`, `pciID`; older versions never print them.

use crate::config::decode;
use crate::error::CniError;
use crate::version::Version;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(rename = "socketPath", default, skip_serializing_if = "Option::is_none")]
    pub socket_path: Option<String>,
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with its prefix length, e.g. `10.244.1.5/24`.
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// An ADD result in any version, held in the newest shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

const ONE_ONE_ROUTE_FIELDS: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];
const ONE_ONE_INTERFACE_FIELDS: [&str; 3] = ["mtu", "socketPath", "pciID"];

impl CniResult {
    /// Parses a result printed in any supported version (the `version` of 0.3/0.4 IPs is ignored:
    /// the address says which family it is).
    pub fn from_value(v: Value) -> Result<CniResult, CniError> {
        let bytes = serde_json::to_vec(&v).expect("a JSON value serialises");
        CniResult::from_slice(&bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<CniResult, CniError> {
        decode(bytes, "CNI result")
    }

    /// The result as version `v` prints it.
    pub fn to_json(&self, v: Version) -> Value {
        let mut out = serde_json::to_value(self).expect("a result serialises");
        let obj = out.as_object_mut().expect("a result is an object");
        if v.result_has_ip_version() {
            for ip in obj.get_mut("ips").and_then(Value::as_array_mut).into_iter().flatten() {
                let family = match ip["address"].as_str().and_then(|a| a.parse::<IpNetwork>().ok()) {
                    Some(IpNetwork::V6(_)) => "6",
                    _ => "4",
                };
                ip["version"] = family.into();
            }
        }
        if !v.result_has_1_1_fields() {
            strip(obj.get_mut("routes"), &ONE_ONE_ROUTE_FIELDS);
            strip(obj.get_mut("interfaces"), &ONE_ONE_INTERFACE_FIELDS);
        }
        obj.insert("cniVersion".into(), v.as_str().into());
        out
    }
}

fn strip(list: Option<&mut Value>, fields: &[&str]) {
    for item in list.and_then(Value::as_array_mut).into_iter().flatten() {
        if let Some(o) = item.as_object_mut() {
            for f in fields {
                o.remove(*f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("0a:58:0a:f4:01:05".into()),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/p".into()),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                mtu: Some(1400),
                ..Route::new("0.0.0.0/0".parse().unwrap(), Some("10.244.1.1".parse().unwrap()))
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn prints_each_version_in_its_own_shape() {
        let r = sample();
        let v031 = r.to_json(Version::V0_3_1);
        assert_eq!(v031["cniVersion"], "0.3.1");
        assert_eq!(v031["ips"][0]["version"], "4");
        assert_eq!(v031["ips"][1]["version"], "6");
        assert!(v031["routes"][0].get("mtu").is_none());
        assert!(v031["interfaces"][0].get("mtu").is_none());

        let v100 = r.to_json(Version::V1_0_0);
        assert!(v100["ips"][0].get("version").is_none());
        assert!(v100["routes"][0].get("mtu").is_none());

        let v110 = r.to_json(Version::V1_1_0);
        assert_eq!(v110["routes"][0]["mtu"], 1400);
        assert_eq!(v110["interfaces"][0]["mtu"], 1450);
        assert_eq!(v110["ips"][0]["address"], "10.244.1.5/24");
    }

    #[test]
    fn reads_back_every_version() {
        let r = sample();
        for v in crate::version::SUPPORTED {
            let back = CniResult::from_value(r.to_json(v)).unwrap();
            assert_eq!(back.ips, r.ips, "{v}");
        }
        let host_local =
            json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.2/24","gateway":"10.1.0.1"}],"dns":{}});
        let back = CniResult::from_value(host_local).unwrap();
        assert_eq!(back.ips[0].address.to_string(), "10.1.0.2/24");
    }
}
