//! The node's CNI config, `/etc/cni/net.d/10-trellis.conflist`, written once the node holds its
//! CIDR: the `trellis` plugin with `trellis-ipam` ranges = the node's CIDRs and the pod MTU the
//! backend leaves, then `portmap` for hostPort. Written atomically (temp file + rename) and only
//! when it changes, so a kubelet reading it never sees half a file.

use crate::lease::Lease;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/cni/net.d/10-trellis.conflist";

#[derive(Clone, Debug)]
pub struct CniConfOptions {
    pub path: PathBuf,
    /// The network name (the IPAM store's folder name).
    pub network: String,
    /// The plugin's mode: `bridge` or `routed`.
    pub mode: String,
    pub bridge: String,
    /// trellis-ipam's `dataDir`; its default when `None`.
    pub ipam_data_dir: Option<PathBuf>,
    /// Chain the reference `portmap` plugin (hostPort), as flannel's config does.
    pub portmap: bool,
}

impl Default for CniConfOptions {
    fn default() -> Self {
        CniConfOptions {
            path: PathBuf::from(DEFAULT_PATH),
            network: "trellis".into(),
            mode: "bridge".into(),
            bridge: "cni0".into(),
            ipam_data_dir: None,
            portmap: true,
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
    let mut plugins = vec![json!({
        "type": "trellis",
        "mode": opts.mode,
        "bridge": opts.bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        // trellisd masquerades the node's pod CIDRs to outside the cluster CIDRs itself.
        "ipMasq": false,
        "hairpinMode": true,
        "mtu": mtu,
        "ipam": ipam,
    })];
    if opts.portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    json!({"cniVersion": "1.1.0", "name": opts.network, "plugins": plugins})
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
        let p = &c["plugins"][0];
        assert_eq!(p["mtu"], 1450);
        assert_eq!(p["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
        assert_eq!(p["ipam"]["ranges"][1][0]["subnet"], "fd00:244:3::/64");
        assert_eq!(c["plugins"][1]["type"], "portmap");

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
