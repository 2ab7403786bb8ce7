//! The node's CNI config, `/etc/cni/net.d/10-trellis.conflist`, written once the node holds its
//! CIDR: the `trellis` plugin with `trellis-ipam` ranges = the node's CIDRs, the pod MTU the
//! backend leaves, and the `portMappings` capability (hostPort, served by the plugin itself in
//! the node's nftables table: no `portmap` binary needed). Written atomically (temp file +
//! rename) and only when it changes, so a kubelet reading it never sees half a file.
//!
//! Which CNI version: `"cniVersion": "1.0.0"` with `"cniVersions": [... "1.1.0"]`. A runtime on
//! libcni 1.1 or older (containerd 1.6/1.7, podman 4, older CRI-O) reads only `cniVersion`
//! and fails every pod sandbox on a version it does not know (libcni 1.1.2 knows up to 1.0.0);
//! libcni 1.2+ picks the highest of `cniVersions` it supports, so it still calls our STATUS and
//! GC (1.1 verbs). The plugins answer in whichever version they are called with.

use crate::lease::Lease;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use trellis_plugin::config::{Mode, PluginFields};

pub const DEFAULT_PATH: &str = "/etc/cni/net.d/10-trellis.conflist";

#[derive(Clone, Debug)]
pub struct CniConfOptions {
    pub path: PathBuf,
    /// The network name (the IPAM store's folder name).
    pub network: String,
    /// The plugin's mode.
    pub mode: Mode,
    pub bridge: String,
    /// trellis-ipam's `dataDir`; its default when `None`.
    pub ipam_data_dir: Option<PathBuf>,
    /// Ask the runtime for pods' hostPorts (the `portMappings` capability).
    pub hostport: bool,
    /// The plugin's anti-spoofing (`antiSpoofing`).
    pub anti_spoofing: bool,
    /// Where the plugin leaves each protected pod's identity for trellisd to restore
    /// (`antiSpoofingRecords`).
    pub anti_spoofing_records: Option<PathBuf>,
}

/// The version written as `cniVersion`: the newest libcni 1.1 and older know.
pub const CNI_VERSION: &str = "1.0.0";
/// Every version the plugins speak, for libcni 1.2+ (`cniVersions`).
pub const CNI_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

impl Default for CniConfOptions {
    fn default() -> Self {
        CniConfOptions {
            path: PathBuf::from(DEFAULT_PATH),
            network: "trellis".into(),
            mode: Mode::Bridge,
            bridge: "cni0".into(),
            ipam_data_dir: None,
            hostport: true,
            anti_spoofing: true,
            anti_spoofing_records: None,
        }
    }
}

/// The conflist for `own` and the pod MTU.
pub fn render(own: &Lease, mtu: u32, opts: &CniConfOptions) -> Value {
    let ranges: Vec<Value> = own
        .pod_cidrs
        .iter()
        .map(|c| json!([{"subnet": c.to_string()}]))
        .collect();
    let mut ipam = json!({"type": "trellis-ipam", "ranges": ranges});
    if let Some(d) = &opts.ipam_data_dir {
        ipam["dataDir"] = json!(d);
    }
    // The plugin's own fields from its own type; then what every CNI plugin config has.
    let fields = PluginFields {
        mode: opts.mode,
        bridge: opts.bridge.clone(),
        is_gateway: true,
        is_default_gateway: true,
        mtu: Some(mtu),
        hairpin_mode: true,
        promisc_mode: false,
        anti_spoofing: opts.anti_spoofing,
        anti_spoofing_records: opts.anti_spoofing_records.clone(),
    };
    let mut plugin = serde_json::to_value(fields).expect("plugin fields are JSON");
    plugin["type"] = json!("trellis");
    // trellisd masquerades the node's pod CIDRs to outside the cluster CIDRs itself.
    plugin["ipMasq"] = json!(false);
    plugin["ipam"] = ipam;
    if opts.hostport {
        plugin["capabilities"] = json!({"portMappings": true});
    }
    let plugins = vec![plugin];
    json!({
        "cniVersion": CNI_VERSION,
        "cniVersions": CNI_VERSIONS,
        "name": opts.network,
        "plugins": plugins,
    })
}

/// The pod CIDRs in a conflist written before (none when it is missing or unreadable).
pub fn read_cidrs(path: &Path) -> Vec<ipnetwork::IpNetwork> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    v["plugins"][0]["ipam"]["ranges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|set| set[0]["subnet"].as_str()?.parse().ok())
        .collect()
}

/// Writes `content` to `path` atomically, unless it already holds exactly that. Returns whether
/// it wrote.
pub fn write_if_changed(path: &Path, content: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("conflist"),
        std::process::id()
    ));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::BackendData;

    #[test]
    fn renders_ranges_mtu_and_writes_once() {
        let own = Lease {
            node: "n1".into(),
            underlay_ip: "192.168.1.2".parse().unwrap(),
            pod_cidrs: vec!["10.244.3.0/24".parse().unwrap(), "fd00:244:3::/64".parse().unwrap()],
            backend: BackendData::HostGw,
        };
        let c = render(&own, 1450, &CniConfOptions::default());
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["cniVersions"], json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
        let p = &c["plugins"][0];
        assert_eq!(p["mtu"], 1450);
        assert_eq!(p["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(p["ipam"]["ranges"][1][0]["subnet"], "fd00:244:3::/64");
        assert_eq!(p["capabilities"]["portMappings"], true, "hostPort by the plugin itself");
        assert_eq!(c["plugins"].as_array().unwrap().len(), 1, "no portmap binary needed");

        let dir = std::env::temp_dir().join(format!("trellisd-cniconf-{}", std::process::id()));
        let path = dir.join("10-trellis.conflist");
        let text = serde_json::to_string_pretty(&c).unwrap();
        assert!(write_if_changed(&path, &text).unwrap());
        assert!(!write_if_changed(&path, &text).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(read_cidrs(&path), own.pod_cidrs);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
