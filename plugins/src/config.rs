//! The plugin's config:
//!
//! ```json
//! {"type": "trellis", "mode": "bridge", "bridge": "cni0", "isGateway": true,
//!  "isDefaultGateway": true, "ipMasq": true, "mtu": 1450, "hairpinMode": false,
//!  "promiscMode": false, "antiSpoofing": true, "ipam": {"type": "trellis-ipam", ...}}
//! ```
//! The names are the reference `bridge` plugin's, so an operator's config works after changing
//! `type`; the defaults are its defaults too.

use crate::names::MAX_NETWORK_LEN;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_cni::env::validate_ifname;
use trellis_cni::{code, CniError, NetConf};
use trellis_net::nft::{PortMapping, Protocol};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pods are ports of a node bridge that holds their gateway address (like `bridge`).
    #[default]
    Bridge,
    /// No bridge: /32 and /128 pod addresses, one host route per pod, a link-local gateway
    /// answered by the host end (like Calico).
    Routed,
}

impl std::str::FromStr for Mode {
    type Err = String;

    /// `bridge` or `routed`, as the config spells them.
    fn from_str(s: &str) -> Result<Mode, String> {
        serde_json::from_value(Value::String(s.to_string())).map_err(|_| format!("{s:?} is not bridge or routed"))
    }
}

/// The plugin's own fields (flattened into the network config). trellisd renders the node's
/// config from this struct too, so the two cannot drift apart.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginFields {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(default)]
    pub is_gateway: bool,
    #[serde(default)]
    pub is_default_gateway: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub hairpin_mode: bool,
    #[serde(default)]
    pub promisc_mode: bool,
    /// Anti-spoofing (default on): a pod may send only with its own addresses (and, in bridge
    /// mode, its own MAC, ARP and NDP included). Off for pods that legitimately route other
    /// addresses (a VPN gateway, a router pod): see docs/security.md.
    #[serde(default = "yes")]
    pub anti_spoofing: bool,
    /// A folder where each protected pod's identity is left as a small file (named after its
    /// host end), so that trellisd can put its anti-spoofing elements back after someone
    /// flushed the ruleset. trellisd sets it (`<state-dir>/pods`); without it nothing is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_spoofing_records: Option<std::path::PathBuf>,
}

fn default_bridge() -> String {
    "cni0".into()
}

fn yes() -> bool {
    true
}

/// The validated config the verbs work from.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub bridge: String,
    /// `isDefaultGateway` implies `isGateway`, as in the reference plugin.
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub mtu: Option<u32>,
    pub hairpin: bool,
    pub promisc: bool,
    pub ip_masq: bool,
    pub ipam_type: String,
    /// Whether pods may send only as themselves ([`PluginFields::anti_spoofing`]).
    pub anti_spoofing: bool,
    /// [`PluginFields::anti_spoofing_records`].
    pub anti_spoofing_records: Option<std::path::PathBuf>,
    /// hostPorts (`runtimeConfig.portMappings`, the `portMappings` capability), served from
    /// the node's nftables table.
    pub port_mappings: Vec<PortMapping>,
}

impl Config {
    pub fn from_netconf(conf: &NetConf<PluginFields>) -> Result<Config, CniError> {
        let p = &conf.plugin;
        if conf.name.len() > MAX_NETWORK_LEN {
            return Err(CniError::invalid_config(format!(
                "the network name is {} characters long; trellis allows at most {MAX_NETWORK_LEN}",
                conf.name.len()
            ))
            .with_details("every host end and hostPort is labelled with it, and the kernel limits those labels; use a shorter name"));
        }
        if p.mode == Mode::Bridge {
            validate_ifname(&p.bridge).map_err(|e| {
                CniError::invalid_config(format!("invalid bridge name {:?}", p.bridge)).with_details(e.details)
            })?;
        }
        if let Some(mtu) = p.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(CniError::invalid_config(format!("invalid mtu {mtu}"))
                    .with_details("mtu must be between 68 and 65535 (the underlay MTU less the overlay's overhead)"));
            }
        }
        let ipam_type = conf
            .ipam
            .as_ref()
            .and_then(|i| i.get("type"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                CniError::new(code::INVALID_NETWORK_CONFIG, "the config has no ipam.type")
                    .with_details("add \"ipam\": {\"type\": \"trellis-ipam\", ...}")
            })?
            .to_string();
        Ok(Config {
            mode: p.mode,
            bridge: p.bridge.clone(),
            is_gateway: p.is_gateway || p.is_default_gateway,
            is_default_gateway: p.is_default_gateway,
            mtu: p.mtu,
            hairpin: p.hairpin_mode,
            promisc: p.promisc_mode,
            ip_masq: conf.ip_masq,
            ipam_type,
            anti_spoofing: p.anti_spoofing,
            anti_spoofing_records: p.anti_spoofing_records.clone(),
            port_mappings: port_mappings(conf.runtime_config.as_ref())?,
        })
    }
}

/// `runtimeConfig.portMappings` as the runtime passes it (the `portMappings` capability):
/// `[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]`.
fn port_mappings(runtime_config: Option<&Value>) -> Result<Vec<PortMapping>, CniError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        host_port: i64,
        container_port: i64,
        #[serde(default)]
        protocol: Option<String>,
        #[serde(default, rename = "hostIP")]
        host_ip: Option<String>,
    }
    let Some(list) = runtime_config
        .and_then(|r| r.get("portMappings"))
        .filter(|l| !l.is_null())
    else {
        return Ok(Vec::new());
    };
    let bad = |msg: String| {
        CniError::invalid_config(msg).with_details(
            "each runtimeConfig.portMappings entry needs hostPort and containerPort (1-65535), a protocol \
             tcp, udp or sctp (tcp when empty), and no hostIP",
        )
    };
    let raw: Vec<Raw> =
        serde_json::from_value(list.clone()).map_err(|e| bad(format!("runtimeConfig.portMappings: {e}")))?;
    let mut out: Vec<PortMapping> = Vec::new();
    for r in raw {
        let port = |what: &str, v: i64| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("portMappings: {what} {v} is not a port (1-65535)")))
        };
        let protocol = match r.protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("tcp") => Protocol::Tcp,
            Some("udp") => Protocol::Udp,
            Some("sctp") => Protocol::Sctp,
            Some(other) => return Err(bad(format!("portMappings: protocol {other:?} is not tcp, udp or sctp"))),
        };
        let any = |ip: &str| ip.is_empty() || ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_unspecified());
        if let Some(ip) = r.host_ip.as_deref().filter(|ip| !any(ip)) {
            return Err(CniError::new(
                code::UNSUPPORTED_FIELD,
                format!("portMappings: hostIP {ip} is not supported"),
            )
            .with_details("trellis serves a hostPort on every address of the node; leave hostIP empty (or 0.0.0.0)"));
        }
        let m = PortMapping {
            protocol,
            host_port: port("hostPort", r.host_port)?,
            container_port: port("containerPort", r.container_port)?,
        };
        if out
            .iter()
            .any(|o| o.protocol == m.protocol && o.host_port == m.host_port)
        {
            return Err(bad(format!(
                "portMappings: host port {}/{} is mapped twice",
                m.host_port,
                protocol.name()
            )));
        }
        out.push(m);
    }
    Ok(out)
}
