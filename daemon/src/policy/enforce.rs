//! NetworkPolicy enforced on this node: every view of the cluster ([`super::source`]) is
//! compiled for this node's pods and written into the `trellis-policy` table, and again every
//! second, so that a pod the plugin has just wired is covered and a flushed ruleset is back
//! within a second (the write is nothing when the kernel already holds it).
//!
//! This node's pods are the records the plugin leaves in trellisd's state dir (the same ones
//! anti-spoofing is restored from: host end and addresses). Routed mode only: bridge mode needs
//! `ct state` in the bridge family (`docs/network-policy.md`), so a bridged pod is logged once
//! and left unprotected by policy.

use super::compile::{compile, LocalPod};
use super::source;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};
use trellis_net::nft::{PodIdentity, PolicyTable, PortKind};

/// The nftables table (inet) policy lives in.
pub const TABLE: &str = "trellis-policy";

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}

/// This node's routed pods from the records in `dir`, and the host ends of bridged ones.
pub fn local_pods(dir: &Path) -> (Vec<LocalPod>, Vec<String>) {
    let (mut routed, mut bridged) = (Vec::new(), Vec::new());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (routed, bridged);
    };
    for e in entries.flatten() {
        let Some((_, id)) = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| PodIdentity::parse_record(&t))
        else {
            continue;
        };
        match id.kind {
            PortKind::Routed => routed.push(LocalPod {
                ifname: id.port,
                ips: id.ips.into_iter().filter(|ip| !is_link_local(ip)).collect(),
            }),
            PortKind::Bridged => bridged.push(id.port),
        }
    }
    routed.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    (routed, bridged)
}

/// Runs until the process ends: watches with `client`, writes the table for the pods recorded
/// in `records`.
pub async fn run(client: kube::Client, metrics: crate::metrics::Metrics, records: PathBuf) {
    let mut views = source::spawn(client, metrics);
    let table = match PolicyTable::new(TABLE, PortKind::Routed) {
        Ok(t) => t,
        Err(e) => {
            warn!("NetworkPolicy is not enforced on this node: opening nftables: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    let mut bridged_logged: BTreeSet<String> = BTreeSet::new();
    let mut announced = false;
    loop {
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(view) = views.borrow().clone() else { continue };
        let (local, bridged) = local_pods(&records);
        for port in bridged {
            if bridged_logged.insert(port.clone()) {
                warn!(
                    pod_port = port,
                    "NetworkPolicy is not enforced for bridge-mode pods yet (routed mode only; see docs/network-policy.md)"
                );
            }
        }
        let compiled = compile(&view, &local);
        match table.apply(&compiled.to_nft()) {
            Ok(applied) => {
                if applied.messages > 0 && (!announced || applied.rebuilt) {
                    info!(
                        chains = compiled.chains.len(),
                        rules = compiled.lines(),
                        pods = local.len(),
                        rebuilt = applied.rebuilt,
                        "NetworkPolicy table written"
                    );
                    announced = true;
                }
                if last_error.take().is_some() {
                    info!("NetworkPolicy table written again after the failure");
                }
            }
            Err(e) => {
                let cause = e.to_string();
                if last_error.as_ref() != Some(&cause) {
                    warn!("writing the NetworkPolicy table: {cause}; trying again every second");
                    last_error = Some(cause);
                }
            }
        }
    }
}
