//! Shared by the IPAM integration tests: configs and a runner for the built `trellis-ipam`.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use trellis_tests::{CniCall, CniOutput};

pub fn ipam_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trellis-ipam"))
}

/// A network config whose `ipam` section is `ipam` plus `dataDir` and the type.
pub fn config(version: &str, name: &str, data_dir: &Path, ipam_type: &str, mut ipam: Value) -> Value {
    ipam["type"] = ipam_type.into();
    ipam["dataDir"] = data_dir.to_string_lossy().into_owned().into();
    json!({"cniVersion": version, "name": name, "type": "bridge", "ipam": ipam})
}

pub fn call(plugin: &Path, command: &str, conf: &Value, container: &str) -> CniOutput {
    CniCall::new(plugin, command, conf.clone())
        .container(container)
        .netns("/run/netns/does-not-matter-to-ipam")
        .run()
}

/// The reservation files (address names) in a network's store.
pub fn reserved(data_dir: &Path, network: &str) -> HashSet<String> {
    std::fs::read_dir(data_dir.join(network))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file below `dir` (to prove that a failed call wrote nothing).
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}
