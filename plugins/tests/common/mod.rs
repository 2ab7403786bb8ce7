//! Shared by the plugin's integration tests: a "node" namespace where the plugin runs (as on a
//! real node, with the pods' namespaces beside it), configs, and snapshots of the node's state.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::PathBuf;
use trellis_tests::cni::sibling_binary;
use trellis_tests::{CniCall, CniOutput, Netns, TempDir};

pub fn plugin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trellis"))
}

/// A node: a namespace in which the plugin runs, and an IPAM data dir.
pub struct Node {
    pub ns: Netns,
    pub data: TempDir,
}

#[allow(clippy::new_without_default)] // creating a namespace is not a default
impl Node {
    pub fn new() -> Node {
        trellis_tests::require_root();
        // The IPAM plugin must have been built next to the plugin.
        sibling_binary(env!("CARGO_BIN_EXE_trellis"), "trellis-ipam");
        Node {
            ns: Netns::new("tpn"),
            data: TempDir::new("plugin"),
        }
    }

    /// A config for this node: `mode`, dual stack or IPv4 only, with `extra` merged in.
    pub fn conf(&self, mode: &str, dual: bool, extra: Value) -> Value {
        let mut ranges = vec![json!([{"subnet": "10.88.0.0/24"}])];
        if dual {
            ranges.push(json!([{"subnet": "fd00:88::/64"}]));
        }
        let mut c = json!({
            "cniVersion": "1.1.0", "name": "tnet", "type": "trellis", "mode": mode,
            "bridge": "tbr0", "isGateway": true, "isDefaultGateway": true, "ipMasq": true, "mtu": 1400,
            "ipam": {"type": "trellis-ipam", "ranges": ranges, "dataDir": self.data.path()},
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            c[k] = v.clone();
        }
        c
    }

    pub fn call(&self, command: &str, conf: &Value, container: &str, pod: Option<&Netns>) -> CniCall {
        let mut c = CniCall::new(plugin(), command, conf.clone()).container(container);
        c.exec_in_netns = Some(self.ns.name.clone());
        if let Some(p) = pod {
            c = c.netns(p.path());
        }
        c
    }

    pub fn add(&self, conf: &Value, container: &str, pod: &Netns) -> Value {
        self.call("ADD", conf, container, Some(pod)).run().ok()
    }

    pub fn del(&self, conf: &Value, container: &str, pod: Option<&Netns>) -> CniOutput {
        self.call("DEL", conf, container, pod).run()
    }

    /// Everything a pod could leave on the node: links, addresses, routes, permanent
    /// neighbours, the nftables ruleset and IPAM reservations. Only structure is kept: carrier
    /// and operational state, DAD progress and counters change by themselves over time.
    pub fn snapshot(&self) -> String {
        let json = |argv: &[&str]| -> Vec<Value> { serde_json::from_str(&self.ns.exec_ok(argv)).unwrap_or_default() };
        let pick = |v: &Value, keys: &[&str]| {
            keys.iter()
                .map(|k| format!("{k}={}", v[*k]))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut lines = Vec::new();
        for l in json(&["ip", "-j", "link", "show"]) {
            lines.push(format!(
                "link {}",
                pick(&l, &["ifname", "mtu", "master", "address", "link_type"])
            ));
        }
        for l in json(&["ip", "-j", "addr", "show"]) {
            for a in l["addr_info"].as_array().into_iter().flatten() {
                lines.push(format!(
                    "addr {} {}",
                    l["ifname"],
                    pick(a, &["local", "prefixlen", "scope"])
                ));
            }
        }
        for fam in ["-4", "-6"] {
            for r in json(&["ip", "-j", fam, "route", "show", "table", "all"]) {
                // The kernel adds the subnet-router anycast route once DAD of a link-local ends.
                if r["type"] != "anycast" {
                    lines.push(format!(
                        "route {}",
                        pick(
                            &r,
                            &["type", "dst", "gateway", "dev", "protocol", "scope", "table", "prefsrc"]
                        )
                    ));
                }
            }
        }
        for n in json(&["ip", "-j", "neigh", "show", "nud", "permanent"]) {
            lines.push(format!("neigh {}", pick(&n, &["dst", "dev", "lladdr"])));
        }
        // Stateless: counters are traffic, not something a pod leaves behind.
        lines.push(self.ns.exec_ok(&["nft", "-s", "list", "ruleset"]));
        let store = self.data.path().join("tnet");
        let mut files: Vec<String> = std::fs::read_dir(&store)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        lines.push(format!("reservations {files:?}"));
        lines.join("\n")
    }

    /// The node's links whose name starts with the plugin's host-end prefix.
    pub fn host_ends(&self) -> Vec<String> {
        self.ns
            .exec_ok(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("trl"))
            .collect()
    }

    pub fn reservations(&self) -> usize {
        std::fs::read_dir(self.data.path().join("tnet"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().parse::<std::net::IpAddr>().is_ok())
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Asserts two snapshots are equal, printing only the lines that differ.
pub fn assert_same(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let gone: Vec<&&str> = b.iter().filter(|l| !a.contains(l)).collect();
    let new: Vec<&&str> = a.iter().filter(|l| !b.contains(l)).collect();
    panic!("{what}\n  gone: {gone:#?}\n  new: {new:#?}");
}

/// The pod's addresses from an ADD result, without prefix.
pub fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().split('/').next().unwrap().to_string())
        .collect()
}

/// `ping` from a pod, one packet, short timeout; true when answered.
pub fn ping(from: &Netns, to: &str) -> bool {
    let bin = if to.contains(':') { "ping6" } else { "ping" };
    let out = from.exec(&[bin, "-c", "1", "-W", "2", to]);
    if !out.status.success() {
        // One retry: the very first packet may wait on neighbour resolution.
        return from.exec(&[bin, "-c", "1", "-W", "2", to]).status.success();
    }
    true
}
