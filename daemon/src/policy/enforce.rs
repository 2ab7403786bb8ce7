//! NetworkPolicy enforced on this node: every view of the cluster ([`super::source`]) is
//! compiled for this node's pods and written into the `trellis-policy` table.
//!
//! - **This node's pods** are the records the plugin leaves in trellisd's state dir (the same
//!   ones anti-spoofing is restored from: host end, addresses, and the pod's
//!   `namespace/name`). The folder is looked at every [`RECORDS_EVERY`], so that a pod the
//!   plugin has just wired — and holds, dropping its every packet — is judged and released
//!   within that much plus one compile and write (the start window: `docs/network-policy.md`).
//! - **Work only on change**: a new view or a changed set of records compiles and writes; in
//!   between, the last compiled state is written again every second, which costs one dump of
//!   the base chain when the kernel still holds it and rebuilds a flushed table.
//! - **Existing connections follow the policy**: after a write that changed what is allowed,
//!   the conntrack entries of the node's pods that the new state no longer allows are marked
//!   revoked ([`REVOKED_MARK`]), and the table drops their packets both ways, so that `ct state
//!   established` does not keep a connection (or a UDP flow reusing its ports) alive against
//!   the policy; an entry revoked earlier that the policy allows again is unmarked. Marked, not
//!   deleted: after a delete, an answer in flight makes a new entry the other way, which the
//!   policy may well allow (the first test of this showed it), and the flow lived on.
//! - **Bridge mode** needs bridged packets to cross the IP layer's hooks (`br_netfilter`,
//!   see `trellis_net::nft::policy`): [`prepare`] turns that on in the node's namespace.

use super::compile::{compile, Compiled, LocalPod};
use super::model::Proto;
use super::source;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};
use trellis_net::nft::{PodIdentity, PolicyTable, PortKind, DROP_LOG_PREFIX, POLICY_TABLE, REVOKED_MARK};

/// The nftables table (inet) policy lives in.
pub const TABLE: &str = POLICY_TABLE;

/// How often the records folder is looked at for new and deleted pods.
pub const RECORDS_EVERY: Duration = Duration::from_millis(50);

const BRIDGE_NF: [&str; 2] = [
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

/// Bridge mode: makes bridged IPv4 and IPv6 packets cross the `inet` hooks in this namespace
/// (`br_netfilter`'s switches are per namespace since Linux 5.3). An error says why policy
/// cannot be enforced for bridged pods.
pub fn prepare(kind: PortKind) -> Result<(), String> {
    if kind == PortKind::Routed {
        return Ok(());
    }
    for path in BRIDGE_NF {
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => std::fs::write(path, "1").map_err(|e| format!("turning on {path}: {e}"))?,
            Err(e) => {
                return Err(format!(
                    "{path}: {e}; bridge mode enforces NetworkPolicy through br_netfilter: load it (modprobe \
                     br_netfilter) on every node"
                ))
            }
        }
    }
    Ok(())
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}

/// This node's pods of `kind` from the records in `dir`.
pub fn local_pods(dir: &Path, kind: PortKind) -> Vec<LocalPod> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Some((_, id)) = std::fs::read_to_string(e.path())
            .ok()
            .and_then(|t| PodIdentity::parse_record(&t))
        else {
            continue;
        };
        if id.kind == kind {
            out.push(LocalPod {
                ifname: id.port,
                ips: id.ips.into_iter().filter(|ip| !is_link_local(ip)).collect(),
                pod: id.pod,
            });
        }
    }
    out.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    out
}

/// What changes when a record comes or goes: names and modification times (a record is
/// written aside and renamed into place, so a rewrite is a new time).
fn records_stamp(dir: &Path) -> Vec<(std::ffi::OsString, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| (e.file_name(), e.metadata().and_then(|m| m.modified()).ok()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// What [`revoke_denied_flows`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Entries marked revoked: the policy denies them now.
    pub revoked: usize,
    /// Entries revoked before that the policy allows again, unmarked.
    pub restored: usize,
}

/// Marks revoked the conntrack entries of this node's pods that `compiled` denies, and
/// unmarks those it allows again. A flow is judged as the forward hook saw its first packet:
/// the original source, and the reply's source as destination (after DNAT, the pod that
/// answers) and port.
pub fn revoke_denied_flows(compiled: &Compiled, local: &[LocalPod]) -> Result<Revoked, trellis_net::NetError> {
    use trellis_net::conntrack;
    let by_ip: HashMap<IpAddr, &str> = local
        .iter()
        .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.ifname.as_str())))
        .collect();
    let iface_of = |ip: IpAddr| by_ip.get(&ip).copied();
    let mut done = Revoked::default();
    for f in conntrack::dump()? {
        let proto = match f.orig.proto {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            132 => Proto::Sctp,
            _ => continue, // policy judges TCP, UDP and SCTP only
        };
        let (src, dst, port) = (f.orig.src, f.reply.src, f.reply.sport);
        let (src_if, dst_if) = (iface_of(src), iface_of(dst));
        if src_if.is_none() && dst_if.is_none() {
            continue;
        }
        let denied = !compiled.allows((src_if, src), (dst_if, dst), proto, port);
        let marked = f.mark & REVOKED_MARK != 0;
        if denied && !marked {
            if conntrack::set_mark(&f, REVOKED_MARK, REVOKED_MARK)? {
                done.revoked += 1;
            }
        } else if !denied && marked && conntrack::set_mark(&f, 0, REVOKED_MARK)? {
            done.restored += 1;
        }
    }
    Ok(done)
}

/// Turns the table's rule counters, read again and again, into the metrics' monotonic series
/// (a chain that went and came back starts from zero).
#[derive(Default)]
pub struct CounterDeltas {
    last: std::collections::HashMap<(String, String), u64>,
}

impl CounterDeltas {
    pub fn account(&mut self, counters: Vec<trellis_net::nft::RuleCounter>, m: &crate::metrics::PolicyMetrics) {
        let mut now = std::collections::HashMap::with_capacity(counters.len());
        for c in counters {
            let key = (c.chain, c.comment);
            let last = self.last.get(&key).copied().unwrap_or(0);
            let delta = if c.packets >= last { c.packets - last } else { c.packets };
            if delta > 0 {
                let (chain, comment) = (&key.0, &key.1);
                let direction = if chain.starts_with("in-") {
                    Some("ingress")
                } else if chain.starts_with("eg-") {
                    Some("egress")
                } else {
                    None
                };
                match direction {
                    Some(d) if comment.starts_with("isolated") => {
                        m.dropped.get_or_create(&[("reason", d)]).inc_by(delta);
                    }
                    Some(d) => {
                        let policy = comment.split(" #").next().unwrap_or(comment).to_string();
                        m.allowed
                            .get_or_create(&[("policy", policy), ("direction", d.to_string())])
                            .inc_by(delta);
                    }
                    None if comment.contains(" held ") => {
                        m.dropped.get_or_create(&[("reason", "held")]).inc_by(delta);
                    }
                    None if comment.ends_with(" revoked") => {
                        m.dropped.get_or_create(&[("reason", "revoked")]).inc_by(delta);
                    }
                    None => {}
                }
            }
            now.insert(key, c.packets);
        }
        self.last = now;
    }
}

fn set_pod_gauges(compiled: &Compiled, m: &crate::metrics::PolicyMetrics) {
    for (state, n) in [
        ("judged", compiled.covered.len()),
        ("held", compiled.held.len()),
        ("isolated_ingress", compiled.ingress.len()),
        ("isolated_egress", compiled.egress.len()),
    ] {
        m.pods.get_or_create(&[("state", state)]).set(n as i64);
    }
}

/// The NFLOG group of the drop log (`--policy-log-drops`), in the node's namespace.
pub const DROP_LOG_GROUP: u16 = 4747;

/// Addresses → `namespace/name`, for the drop log.
type Names = Arc<Mutex<HashMap<IpAddr, String>>>;

/// The drop log: reads the policy chains' NFLOG group and writes one line per dropped new
/// connection, at most one per (pod, peer, protocol, port) every 10 s and 10 a second, with
/// a count of those left out.
fn spawn_drop_log(names: Names) -> Result<(), String> {
    let mut sub = trellis_net::nflog::Subscription::bind(DROP_LOG_GROUP, 80).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("policy-drop-log".into())
        .spawn(move || {
            let mut seen: HashMap<(String, IpAddr, IpAddr, u8, u16), Instant> = HashMap::new();
            let (mut second, mut in_second, mut left_out) = (Instant::now(), 0u32, 0u64);
            loop {
                let got = match sub.recv() {
                    Ok(g) => g,
                    Err(e) => {
                        warn!("the NetworkPolicy drop log stopped: {e}");
                        return;
                    }
                };
                if got.lost {
                    left_out += 1;
                }
                for p in got.packets {
                    let Some(chain) = p.prefix.strip_prefix(DROP_LOG_PREFIX) else {
                        continue;
                    };
                    let Some(h) = trellis_net::nflog::summarize(&p.packet) else {
                        continue;
                    };
                    let now = Instant::now();
                    if now.duration_since(second) >= Duration::from_secs(1) {
                        (second, in_second) = (now, 0);
                    }
                    let key = (chain.to_string(), h.src, h.dst, h.proto, h.dport);
                    if seen
                        .get(&key)
                        .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10))
                    {
                        continue;
                    }
                    if in_second >= 10 {
                        left_out += 1;
                        continue;
                    }
                    seen.retain(|_, t| now.duration_since(*t) < Duration::from_secs(10));
                    seen.insert(key, now);
                    in_second += 1;
                    let names = names.lock().unwrap_or_else(|e| e.into_inner());
                    let name = |ip: IpAddr| names.get(&ip).cloned().unwrap_or_else(|| ip.to_string());
                    let (direction, pod, peer) = if chain.starts_with("in-") {
                        ("ingress", h.dst, h.src)
                    } else {
                        ("egress", h.src, h.dst)
                    };
                    let proto = match h.proto {
                        6 => "TCP".to_string(),
                        17 => "UDP".to_string(),
                        132 => "SCTP".to_string(),
                        n => format!("protocol {n}"),
                    };
                    info!(
                        pod = name(pod),
                        peer = name(peer),
                        src = %h.src,
                        dst = %h.dst,
                        port = h.dport,
                        protocol = proto,
                        chain,
                        left_out,
                        "NetworkPolicy dropped a new connection: no {direction} policy of the pod allows it"
                    );
                    left_out = 0;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

const WRITING: &str = "writing the NetworkPolicy table";
const COUNTERS: &str = "reading the NetworkPolicy table's counters";
const REVOKING: &str = "revoking connections the new NetworkPolicy denies";

/// The enforcer's failing steps, logged once per cause (again when the cause changes) and once
/// when they work again: they are retried every second or change, and must not flood the log.
#[derive(Default)]
struct Causes(HashMap<&'static str, String>);

impl Causes {
    fn failed(&mut self, what: &'static str, cause: String) {
        if self.0.get(what) != Some(&cause) {
            warn!("{what}: {cause}");
            self.0.insert(what, cause);
        }
    }

    fn ok(&mut self, what: &'static str) {
        if self.0.remove(what).is_some() {
            info!("{what}: working again");
        }
    }
}

/// Runs until the process ends: watches with `client`, writes the table for the pods of
/// `kind` recorded in `records`; with `log_drops`, logs the new connections it drops.
pub async fn run(
    client: kube::Client,
    metrics: crate::metrics::Metrics,
    records: PathBuf,
    kind: PortKind,
    log_drops: bool,
) {
    let pm = metrics.policy().clone();
    let mut views = source::spawn(client, metrics);
    let mut deltas = CounterDeltas::default();
    let names: Names = Arc::default();
    let table = match PolicyTable::new(TABLE, kind).map(|t| if log_drops { t.with_drop_log(DROP_LOG_GROUP) } else { t })
    {
        Ok(t) => t,
        Err(e) => {
            warn!("NetworkPolicy is not enforced on this node: opening nftables: {e}");
            return;
        }
    };
    if log_drops {
        match spawn_drop_log(Arc::clone(&names)) {
            Ok(()) => info!(
                group = DROP_LOG_GROUP,
                "logging the new connections NetworkPolicy drops"
            ),
            Err(e) => warn!("the NetworkPolicy drop log cannot start: {e}"),
        }
    }
    let mut poll = tokio::time::interval(RECORDS_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut causes = Causes::default();
    let mut write_failing = false;
    let mut backoff = crate::datastore::retry::Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let mut announced = false;
    let mut stamp = None;
    let mut last_write = tokio::time::Instant::now();
    let mut state: Option<(Compiled, Vec<LocalPod>)> = None;
    // A change right after a compile waits for the next poll: under churn (a rollout of
    // thousands of pods), at most one compile per RECORDS_EVERY, each of everything known then.
    let mut view_pending = false;
    let mut last_compile = tokio::time::Instant::now() - RECORDS_EVERY;
    loop {
        view_pending |= tokio::select! {
            r = views.changed() => if r.is_err() { return } else { true },
            _ = poll.tick() => false,
        };
        let Some(view) = views.borrow().clone() else { continue };
        let now_stamp = records_stamp(&records);
        let changed = view_pending || state.is_none() || stamp.as_ref() != Some(&now_stamp);
        if changed && last_compile.elapsed() < RECORDS_EVERY {
            continue; // debounced: the next tick compiles
        }
        if changed {
            view_pending = false;
            last_compile = tokio::time::Instant::now();
            stamp = Some(now_stamp);
            let local = local_pods(&records, kind);
            let compiled = compile(&view, &local);
            set_pod_gauges(&compiled, &pm);
            if log_drops {
                let mut n = names.lock().unwrap_or_else(|e| e.into_inner());
                n.clear();
                for p in &view.pods {
                    for ip in &p.ips {
                        n.insert(*ip, p.key());
                    }
                }
                for p in local.iter().filter(|p| p.pod.is_some()) {
                    for ip in &p.ips {
                        n.insert(*ip, p.pod.clone().unwrap_or_default());
                    }
                }
            }
            state = Some((compiled, local));
        } else if last_write.elapsed() < Duration::from_secs(1) && !write_failing {
            continue;
        }
        last_write = tokio::time::Instant::now();
        let (compiled, local) = state.as_ref().expect("compiled above");
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
                write_failing = false;
                backoff.reset();
                causes.ok(WRITING);
                match table.counters() {
                    Ok(c) => {
                        causes.ok(COUNTERS);
                        deltas.account(c, &pm)
                    }
                    Err(e) => causes.failed(COUNTERS, e.to_string()),
                }
                if applied.messages > 0 {
                    let local = local.clone();
                    let compiled = compiled.clone();
                    // conntrack is read in this (the node's) namespace, off the async threads.
                    match tokio::task::spawn_blocking(move || revoke_denied_flows(&compiled, &local)).await {
                        Ok(Ok(r)) if r == Revoked::default() => causes.ok(REVOKING),
                        Ok(Ok(r)) => {
                            causes.ok(REVOKING);
                            pm.flows_revoked.inc_by(r.revoked as u64);
                            info!(
                                revoked = r.revoked,
                                restored = r.restored,
                                "existing connections follow the new NetworkPolicy"
                            )
                        }
                        Ok(Err(e)) => causes.failed(REVOKING, e.to_string()),
                        Err(e) => causes.failed(REVOKING, e.to_string()),
                    }
                }
            }
            Err(e) => {
                pm.write_errors.inc();
                write_failing = true;
                let delay = backoff.next_delay();
                causes.failed(WRITING, format!("{e}; trying again, backing off to 10 s"));
                last_write = tokio::time::Instant::now();
                tokio::time::sleep(delay).await;
            }
        }
    }
}
