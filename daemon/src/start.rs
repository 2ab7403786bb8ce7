//! Starting the node: find the underlay, set up the dataplane, take this node's lease, start BGP
//! if configured, write the CNI config (last: it marks the node ready), then hand every source
//! to the [`Node`] loop. What
//! `trellisd` (no subcommand) runs; `main.rs` only parses flags and sets up logging.

use crate::bgp::{BgpConfig, Speaker};
use crate::cli::{Args, DatastoreKind};
use crate::cniconf::{self, CniConfOptions};
use crate::config::NetConf;
use crate::datastore::{etcd::EtcdStore, none::NoneStore, trust::Bounds, Datastore, NodeInfo};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::node::{self, BgpPeers, KernelPlane, Node};
use crate::reconcile::{Dataplane, DataplaneConfig};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tracing::{info, warn};

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs the node until SIGTERM, or until its lease is lost (`Err` with the reason).
pub async fn run(args: Args) -> Result<(), String> {
    let node = args
        .node_name
        .clone()
        .or_else(hostname)
        .ok_or("no --node-name and no hostname")?;
    let text =
        std::fs::read_to_string(&args.net_conf).map_err(|e| format!("reading {}: {e}", args.net_conf.display()))?;
    let mut conf = NetConf::parse(&text).map_err(|e| e.to_string())?;
    if let Some(asn) = args.bgp_as_number {
        match &mut conf.backend {
            crate::config::Backend::Bgp { as_number, .. } if asn != 0 => *as_number = asn,
            crate::config::Backend::Bgp { .. } => return Err("--bgp-as-number 0: AS 0 is reserved".into()),
            other => warn!(
                backend = other.name(),
                "--bgp-as-number ignored: the backend is not bgp"
            ),
        }
    }
    let metrics = Metrics::new();
    tokio::spawn(metrics.clone().serve(args.listen));

    let nl = trellis_net::Netlink::connect().map_err(|e| e.to_string())?;
    let underlay = crate::underlay::detect(&nl, args.underlay_iface.as_deref(), args.underlay_ip)
        .await
        .map_err(|e| e.to_string())?;
    info!(node, underlay = %underlay.name, ip = %underlay.ip, mtu = underlay.mtu, backend = conf.backend.name(), "starting");
    let mut dp = Dataplane::new(
        DataplaneConfig {
            node: node.clone(),
            backend: conf.backend.clone(),
            underlay: underlay.clone(),
            cluster_cidrs: conf.cluster_cidrs(),
            nexthop_objects: !args.no_nexthop_objects,
        },
        metrics.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    // NetworkPolicy needs the Kubernetes API (the objects live there).
    let policy_kind = match args.cni_mode {
        trellis_plugin::config::Mode::Routed => trellis_net::nft::PortKind::Routed,
        trellis_plugin::config::Mode::Bridge => trellis_net::nft::PortKind::Bridged,
    };
    let policy_client = match &args.datastore {
        DatastoreKind::Kube => match crate::policy::enforce::prepare(policy_kind) {
            Ok(()) => {
                let kube = crate::datastore::kube::KubeStore {
                    kubeconfig: args.kubeconfig.clone(),
                };
                Some(kube.client().await.map_err(|e| e.to_string())?)
            }
            Err(e) => {
                metrics.set_problem(crate::metrics::Problem::Policy, Some(e.clone()));
                warn!("NetworkPolicy is not enforced: {e}");
                None
            }
        },
        _ => None,
    };
    let store = match args.datastore {
        DatastoreKind::Etcd => Datastore::Etcd(Box::new(
            EtcdStore::new(args.etcd_endpoints.clone())
                .with_prefix(args.etcd_prefix.clone())
                .with_ttl(Duration::from_secs(args.lease_ttl))
                .with_security(args.etcd_security())
                // The CIDRs held before: the same ones back after a restart, even one longer
                // than the lease's TTL (from the CNI config an earlier version wrote when the
                // state folder has none).
                .with_hint(
                    Some(crate::state::read_cidrs(&args.state_dir))
                        .filter(|c| !c.is_empty())
                        .unwrap_or_else(|| cniconf::read_cidrs(&args.cni_conf)),
                )
                .with_identity(
                    crate::datastore::identity::load_or_create(&args.state_dir)
                        .map_err(|e| format!("keeping this node's ID in {}: {e}", args.state_dir.display()))?,
                ),
        )),
        DatastoreKind::Kube => Datastore::Kube(crate::datastore::kube::KubeStore {
            kubeconfig: args.kubeconfig.clone(),
        }),
        DatastoreKind::None => Datastore::None(NoneStore {
            pod_cidrs: args.pod_cidr.clone(),
        }),
    };
    let mut backend_data = dp.backend_data();
    match (&mut backend_data, args.bgp_route_reflector_cluster_id) {
        (crate::lease::BackendData::Bgp { rr_cluster_id, .. }, Some(id)) => {
            info!(cluster_id = %id, "this node is a BGP route reflector");
            *rr_cluster_id = Some(id);
        }
        (_, Some(_)) => warn!("--bgp-route-reflector-cluster-id is for the bgp backend only: ignored"),
        (_, None) => {}
    }
    let me = NodeInfo {
        name: node.clone(),
        underlay_ip: underlay.ip,
        backend: backend_data,
    };
    let (own, events) = store
        .start(me, conf.pools.clone(), metrics.clone())
        .await
        .map_err(|e| e.to_string())?;
    info!(cidrs = ?own.pod_cidrs, "holding the node lease");
    if let Err(e) = crate::state::write_cidrs(&args.state_dir, &own.pod_cidrs) {
        warn!(dir = %args.state_dir.display(), "cannot remember the pod CIDRs ({e}): a restart after the lease expires may get others");
    }
    dp.set_own(&own).await.map_err(|e| e.to_string())?;
    // The node routes between its pods and the other nodes. In a container /proc/sys is
    // read-only unless privileged: kubeadm already requires ip_forward, so a node where it is on
    // needs no write, and one where it is off gets a warning rather than a crash loop.
    for (key, on) in [
        ("net.ipv4.ip_forward", own.cidr_v4().is_some()),
        ("net.ipv6.conf.all.forwarding", own.cidr_v6().is_some()),
    ] {
        let already = trellis_net::sysctl::read(key).is_ok_and(|v| v.trim() == "1");
        if on && !already {
            if let Err(e) = trellis_net::sysctl::write(key, "1") {
                warn!("{key} is off and cannot be turned on ({e}): pods on other nodes are unreachable until it is");
            }
        }
    }
    let opts = CniConfOptions {
        path: args.cni_conf.clone(),
        mode: args.cni_mode,
        ipam_data_dir: args.ipam_data_dir.clone(),
        hostport: !args.no_hostport,
        anti_spoofing: !args.no_anti_spoofing,
        anti_spoofing_records: Some(crate::state::pod_records(&args.state_dir)),
        ..Default::default()
    };
    dp.restore_anti_spoofing_from(crate::state::pod_records(&args.state_dir));
    match policy_client {
        // The enforcer finds this node's pods by the records the plugin writes when it protects
        // them from spoofing; without anti-spoofing there are none.
        Some(_) if args.no_anti_spoofing => {
            warn!(
                "NetworkPolicy is not enforced: it finds this node's pods by the anti-spoofing records, which \
                 --no-anti-spoofing turns off"
            );
            remove_stale_policy_table();
        }
        Some(client) => {
            let records = crate::state::pod_records(&args.state_dir);
            tokio::spawn(crate::policy::enforce::run(
                client,
                metrics.clone(),
                records,
                policy_kind,
                args.policy_log_drops,
            ));
        }
        // Not enforced on this run: a table an earlier run (another mode or datastore) left
        // would go on enforcing stale policy, so it goes, as a stale backend device does.
        None => remove_stale_policy_table(),
    }

    // Every source sends its inputs to the node's one channel; the node decides what runs.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut plane = KernelPlane {
        dataplane: dp,
        metrics: metrics.clone(),
        bgp: None,
    };
    if let crate::config::Backend::Bgp {
        as_number,
        hold_time,
        graceful_restart,
        ..
    } = &conf.backend
    {
        let waits = (
            Duration::from_secs(args.bgp_restart_wait),
            Duration::from_secs(args.bgp_stale_path_time),
        );
        let password = match &args.bgp_password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let router_id = router_id(args.bgp_router_id, &underlay)?;
        let settings = (*as_number, *hold_time, *graceful_restart, waits);
        // The peers' own passwords: read now (a file that cannot be used stops the start),
        // handed to the speaker before its first peers (`node::KernelPlane`).
        let passwords =
            crate::passwords::PeerPasswords::load(crate::backend::bgp::password_files(&conf.backend), metrics.clone())?;
        let rr_cluster_id = args.bgp_route_reflector_cluster_id;
        let (speaker, rib, synced) = start_bgp(
            &plane.dataplane,
            &own,
            (&underlay, router_id),
            &conf,
            (settings, password, rr_cluster_id),
            &metrics,
        )
        .await?;
        tokio::spawn(node::forward_bgp_routes(rib, synced, tx.clone()));
        plane.bgp = Some(BgpPeers {
            speaker,
            backend: conf.backend.clone(),
            node: node.clone(),
            underlay_ip: underlay.ip,
            rr_cluster_id,
            current: None,
            passwords,
        });
    }
    // Last: the CNI config tells the kubelet the node is ready for pods, so it is written once
    // everything that can fail at start (the BGP speaker too: its port in use, no router
    // ID) has started. A node that crash-loops never looks ready.
    write_cni_conf(&own, plane.dataplane.pod_mtu(), &opts)?;
    let kernel = plane.dataplane.kernel_changes();
    tokio::spawn(node::forward_leases(events, tx.clone()));
    let resync = Duration::from_secs(args.resync.max(1));
    tokio::spawn(node::forward_kernel_ticks_and_signals(kernel, resync, tx));
    let is_bgp = plane.bgp.is_some();
    let bounds = Bounds {
        cluster: conf.cluster_cidrs(),
        underlay: underlay.prefix,
    };
    Node::new(plane, own, is_bgp, bounds, metrics).run(rx).await.map(|_| ())
}

/// Starts the BGP speaker: (speaker, its routes, whether it synced with its peers). `settings`:
/// the AS number, hold time, graceful-restart time, and the restart wait and stale-path time
/// (`--bgp-restart-wait`, `--bgp-stale-path-time`); the TCP MD5 password; the route-reflector
/// cluster ID.
#[allow(clippy::type_complexity)]
async fn start_bgp(
    dp: &Dataplane,
    own: &Lease,
    (underlay, router_id): (&crate::reconcile::Underlay, Ipv4Addr),
    conf: &NetConf,
    ((asn, hold_time, graceful_restart, (restart_wait, stale_path_time)), password, rr_cluster_id): (
        (u32, u16, u16, (Duration, Duration)),
        Option<Vec<u8>>,
        Option<std::net::Ipv4Addr>,
    ),
    metrics: &Metrics,
) -> Result<(Speaker, Routes, Synced), String> {
    let mut cfg = BgpConfig::new(asn, router_id);
    cfg.hold_time = hold_time;
    cfg.graceful_restart_secs = graceful_restart;
    cfg.restart_wait = restart_wait;
    cfg.stale_path_time = stale_path_time;
    cfg.import_within = conf.cluster_cidrs();
    cfg.md5_password = password;
    cfg.rr_cluster_id = rr_cluster_id;
    // Routes kept in the kernel from the last run: tell the peers we restarted (graceful restart).
    cfg.restarted = dp.installed_routes().await.map_err(|e| e.to_string())? > 0;
    let (speaker, rib) = Speaker::start(cfg, metrics.clone())
        .await
        .map_err(|e| format!("BGP: {e}"))?;
    let exports = crate::backend::bgp::exports(own, underlay);
    for (cidr, why) in &exports.unannounced {
        warn!(%cidr, "BGP: pod CIDR not announced: {why}");
    }
    speaker.set_exports(exports.prefixes, exports.next_hop_v4, exports.next_hop_v6);
    let synced = speaker.synced();
    info!(asn, %router_id, "BGP speaker started");
    Ok((speaker, rib, synced))
}

/// Removes the NetworkPolicy table (nothing to do when there is none).
fn remove_stale_policy_table() {
    use trellis_net::nft::{PolicyTable, PortKind};
    let removed = PolicyTable::new(crate::policy::enforce::TABLE, PortKind::Routed).and_then(|t| t.remove());
    if let Err(e) = removed {
        warn!("removing the NetworkPolicy table an earlier run left: {e}");
    }
}

/// The BGP identifier: `--bgp-router-id`, else the underlay's IPv4 address, else an IPv4
/// address on the underlay link, else the low 32 bits of the IPv6 underlay address (see the
/// flag's help for why that is unique where it matters).
fn router_id(given: Option<Ipv4Addr>, underlay: &crate::reconcile::Underlay) -> Result<Ipv4Addr, String> {
    if let Some(id) = given {
        if id.is_unspecified() {
            return Err("--bgp-router-id 0.0.0.0: the BGP identifier must not be zero".into());
        }
        return Ok(id);
    }
    let link_v4 = underlay.link_prefixes.iter().find_map(|p| match p.ip() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    });
    let id = match (underlay.ip, link_v4) {
        (IpAddr::V4(a), _) => a,
        (IpAddr::V6(_), Some(a)) => a,
        (IpAddr::V6(a), None) => Ipv4Addr::from((u128::from(a) & 0xffff_ffff) as u32),
    };
    if id.is_unspecified() {
        return Err(format!(
            "no BGP identifier to derive from the IPv6 underlay address {} (its low 32 bits are zero): give \
             --bgp-router-id",
            underlay.ip
        ));
    }
    Ok(id)
}

/// The BGP password from `--bgp-password-file`: the file's bytes, one trailing newline (`\n` or
/// `\r\n`) dropped.
fn read_password(path: &std::path::Path) -> Result<Vec<u8>, String> {
    crate::passwords::read(path).map_err(|(_, why)| format!("--bgp-password-file {why}"))
}

type Routes = tokio::sync::watch::Receiver<crate::bgp::Routes>;
type Synced = tokio::sync::watch::Receiver<bool>;

fn write_cni_conf(own: &Lease, mtu: u32, opts: &CniConfOptions) -> Result<(), String> {
    let text = serde_json::to_string_pretty(&cniconf::render(own, mtu, opts)).expect("JSON") + "\n";
    match cniconf::write_if_changed(&opts.path, &text) {
        Ok(true) => info!(path = %opts.path.display(), mtu, "wrote the CNI config"),
        Ok(false) => {}
        Err(e) => return Err(format!("writing {}: {e}", opts.path.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{read_password, router_id};
    use crate::reconcile::Underlay;

    #[test]
    fn bgp_router_id_given_else_ipv4_underlay_else_ipv4_on_the_link_else_low_bits_of_ipv6() {
        let u = |ip: &str, others: &[&str]| Underlay {
            index: 2,
            name: "eth0".into(),
            ip: ip.parse().unwrap(),
            prefix: format!("{ip}/{}", if ip.contains(':') { 64 } else { 24 })
                .parse()
                .unwrap(),
            link_prefixes: others.iter().map(|p| p.parse().unwrap()).collect(),
            mtu: 1500,
        };
        let id = |given: Option<&str>, und: &Underlay| router_id(given.map(|g| g.parse().unwrap()), und);
        let v4 = u("192.168.0.11", &["fd00:77::11/64"]);
        assert_eq!(id(None, &v4).unwrap().to_string(), "192.168.0.11");
        assert_eq!(id(Some("10.9.9.9"), &v4).unwrap().to_string(), "10.9.9.9");
        assert!(id(Some("0.0.0.0"), &v4).is_err());
        let v6_with_v4_on_link = u("fd00:77::11", &["192.168.0.11/24"]);
        assert_eq!(id(None, &v6_with_v4_on_link).unwrap().to_string(), "192.168.0.11");
        assert_eq!(id(None, &u("fd00:77::a:11", &[])).unwrap().to_string(), "0.10.0.17");
        assert_eq!(
            id(None, &u("fd00:77::c0a8:b", &[])).unwrap().to_string(),
            "192.168.0.11"
        );
        let zero = id(None, &u("fd00:77:0:0:1::", &[])).unwrap_err();
        assert!(zero.contains("--bgp-router-id"), "{zero}");
    }

    #[test]
    fn bgp_password_file_one_trailing_newline_dropped_empty_or_long_refused() {
        let dir = std::env::temp_dir().join(format!("trellis-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        for (content, want) in [
            (&b"s3cret\n"[..], Some(&b"s3cret"[..])),
            (b"s3cret\r\n", Some(b"s3cret")),
            (b"two\n\n", Some(b"two\n")),
            (b"\n", None),
            (&[b'x'; 81], None),
        ] {
            std::fs::write(&file, content).unwrap();
            assert_eq!(read_password(&file).ok().as_deref(), want, "{content:?}");
        }
        assert!(read_password(&dir.join("missing")).unwrap_err().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
