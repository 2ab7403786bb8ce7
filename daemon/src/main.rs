//! `trellisd`: leases this node's pod CIDR, writes the node's CNI config and keeps the
//! dataplane to every other node converged. See `--help`.

use clap::{Parser, ValueEnum};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{error, info, warn};
use trellisd::bgp::{BgpConfig, Speaker};
use trellisd::cniconf::{self, CniConfOptions};
use trellisd::config::NetConf;
use trellisd::datastore::{etcd::EtcdStore, none::NoneStore, Datastore, NodeInfo};
use trellisd::lease::Lease;
use trellisd::metrics::Metrics;
use trellisd::node::{self, BgpPeers, KernelPlane, Node};
use trellisd::reconcile::{Dataplane, DataplaneConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DatastoreKind {
    Etcd,
    Kube,
    None,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Copy the CNI plugin binaries into the host's CNI bin folder, atomically (the init
    /// container's job), and exit.
    InstallCni {
        /// Where the image keeps the binaries.
        #[arg(long, default_value = "/opt/trellis/bin")]
        from: PathBuf,
        /// The host's CNI bin folder, as mounted in the container.
        #[arg(long, default_value = "/host/opt/cni/bin")]
        to: PathBuf,
    },
}

#[derive(Parser, Debug)]
#[command(name = "trellisd", version, about = "The Trellis node daemon")]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// This node's name (its key in the datastore).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// flannel-style net-conf.json.
    #[arg(long, default_value = "/etc/trellis/net-conf.json")]
    net_conf: PathBuf,
    /// The interface other nodes reach this one by (default: the default route's).
    #[arg(long)]
    underlay_iface: Option<String>,
    /// The address other nodes reach this one by (default: the underlay interface's first).
    #[arg(long)]
    underlay_ip: Option<IpAddr>,
    #[arg(long, value_enum, default_value = "etcd")]
    datastore: DatastoreKind,
    /// etcd endpoints, comma-separated.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    #[arg(long, default_value = "/trellis/leases/")]
    etcd_prefix: String,
    /// Seconds a lease outlives its node when the node stops renewing it.
    #[arg(long, default_value_t = 30)]
    lease_ttl: u64,
    /// A kubeconfig for `--datastore kube` (default: in-cluster service account, or KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The node's pod CIDR(s) with `--datastore none`.
    #[arg(long)]
    pod_cidr: Vec<IpNetwork>,
    /// Where /healthz and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:9909")]
    listen: SocketAddr,
    /// The CNI config to write.
    #[arg(long, default_value = cniconf::DEFAULT_PATH)]
    cni_conf: PathBuf,
    /// Where the daemon keeps what it must remember across its restarts (the pod CIDRs it held).
    #[arg(long, default_value = trellisd::state::DEFAULT_DIR)]
    state_dir: PathBuf,
    /// The trellis plugin's mode in the CNI config: bridge or routed.
    #[arg(long, default_value = "bridge")]
    cni_mode: trellis_plugin::config::Mode,
    /// trellis-ipam's dataDir in the CNI config (its default when not given).
    #[arg(long)]
    ipam_data_dir: Option<PathBuf>,
    /// Do not ask the runtime for pods' hostPorts (the `portMappings` capability) in the CNI
    /// config.
    #[arg(long, alias = "no-portmap")]
    no_hostport: bool,
    /// Seconds between full resyncs with the kernel.
    #[arg(long, default_value_t = 30)]
    resync: u64,
    /// Program plain routes, each with its own gateway, even where the kernel has nexthop
    /// objects (Linux 5.3+; by default routes go by nexthop object, which the kernel inserts in
    /// flat time however many nodes there are). Nexthops left from an earlier run are removed.
    #[arg(long)]
    no_nexthop_objects: bool,
}

fn main() {
    tracing_subscriber::fmt()
        // Logs on stderr, as every node daemon (stdout is for what a command prints).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(log_filter())
        .init();
    let args = Args::parse();
    // The one TLS crypto provider (the Kubernetes client's HTTPS): explicit, so no build that
    // happens to enable a second provider can leave rustls unable to choose one at run time.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Cmd::InstallCni { from, to }) = &args.cmd {
        match trellisd::install::install(from, to, trellisd::install::PLUGINS) {
            Ok(written) => {
                info!(to = %to.display(), ?written, "CNI plugins installed");
                return;
            }
            Err(e) => {
                error!("install-cni: {e}");
                std::process::exit(1);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        error!("{e}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` (default `info`), with the Kubernetes client's own lines off unless it names
/// them: they come once per failed attempt without a cause ("failed with error client error
/// (Connect)"), while trellisd logs each failure once per cause with its whole chain
/// (`datastore::retry`).
fn log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("kube") {
        spec
    } else {
        format!("{spec},kube_client=off,kube_runtime=off")
    };
    tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("RUST_LOG={spec}: {e}; logging at info");
        tracing_subscriber::EnvFilter::new("info,kube_client=off,kube_runtime=off")
    })
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
}

async fn run(args: Args) -> Result<(), String> {
    let node = args
        .node_name
        .clone()
        .or_else(hostname)
        .ok_or("no --node-name and no hostname")?;
    let text =
        std::fs::read_to_string(&args.net_conf).map_err(|e| format!("reading {}: {e}", args.net_conf.display()))?;
    let conf = NetConf::parse(&text).map_err(|e| e.to_string())?;
    let metrics = Metrics::new();
    tokio::spawn(metrics.clone().serve(args.listen));

    let nl = trellis_net::Netlink::connect().map_err(|e| e.to_string())?;
    let underlay = trellisd::underlay::detect(&nl, args.underlay_iface.as_deref(), args.underlay_ip)
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
    let store = match args.datastore {
        DatastoreKind::Etcd => Datastore::Etcd(
            EtcdStore::new(args.etcd_endpoints.clone())
                .with_prefix(args.etcd_prefix.clone())
                .with_ttl(Duration::from_secs(args.lease_ttl))
                // The CIDRs held before: the same ones back after a restart, even one longer
                // than the lease's TTL (from the CNI config an earlier version wrote when the
                // state folder has none).
                .with_hint(
                    Some(trellisd::state::read_cidrs(&args.state_dir))
                        .filter(|c| !c.is_empty())
                        .unwrap_or_else(|| cniconf::read_cidrs(&args.cni_conf)),
                ),
        ),
        DatastoreKind::Kube => Datastore::Kube(trellisd::datastore::kube::KubeStore {
            kubeconfig: args.kubeconfig.clone(),
        }),
        DatastoreKind::None => Datastore::None(NoneStore {
            pod_cidrs: args.pod_cidr.clone(),
        }),
    };
    let me = NodeInfo {
        name: node.clone(),
        underlay_ip: underlay.ip,
        backend: dp.backend_data(),
    };
    let (own, events) = store
        .start(me, conf.pools.clone(), metrics.clone())
        .await
        .map_err(|e| e.to_string())?;
    info!(cidrs = ?own.pod_cidrs, "holding the node lease");
    if let Err(e) = trellisd::state::write_cidrs(&args.state_dir, &own.pod_cidrs) {
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
        ..Default::default()
    };
    write_cni_conf(&own, dp.pod_mtu(), &opts)?;

    // Every source sends its inputs to the node's one channel; the node decides what runs.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut plane = KernelPlane {
        dataplane: dp,
        metrics: metrics.clone(),
        bgp: None,
    };
    if let trellisd::config::Backend::Bgp {
        as_number,
        hold_time,
        graceful_restart,
        ..
    } = &conf.backend
    {
        let settings = (*as_number, *hold_time, *graceful_restart);
        let (speaker, rib, synced) = start_bgp(&plane.dataplane, &own, &underlay, &conf, settings, &metrics).await?;
        tokio::spawn(node::forward_bgp_routes(rib, synced, tx.clone()));
        plane.bgp = Some(BgpPeers {
            speaker,
            backend: conf.backend.clone(),
            node: node.clone(),
            underlay_ip: underlay.ip,
            current: None,
        });
    }
    let kernel = plane.dataplane.kernel_changes();
    tokio::spawn(node::forward_leases(events, tx.clone()));
    let resync = Duration::from_secs(args.resync.max(1));
    tokio::spawn(node::forward_kernel_ticks_and_signals(kernel, resync, tx));
    let is_bgp = plane.bgp.is_some();
    Node::new(plane, own, is_bgp).run(rx).await.map(|_| ())
}

/// Starts the BGP speaker: (speaker, its routes, whether it synced with its peers). `settings`:
/// the AS number, hold time and graceful-restart time.
async fn start_bgp(
    dp: &Dataplane,
    own: &Lease,
    underlay: &trellisd::reconcile::Underlay,
    conf: &NetConf,
    (asn, hold_time, graceful_restart): (u32, u16, u16),
    metrics: &Metrics,
) -> Result<(Speaker, Routes, Synced), String> {
    let IpAddr::V4(router_id) = underlay.ip else {
        return Err("BGP needs an IPv4 underlay address for its router ID".into());
    };
    let mut cfg = BgpConfig::new(asn, router_id);
    cfg.hold_time = hold_time;
    cfg.graceful_restart_secs = graceful_restart;
    cfg.import_within = conf.cluster_cidrs();
    // Routes kept in the kernel from the last run: tell the peers we restarted (graceful restart).
    cfg.restarted = dp.installed_routes().await.map_err(|e| e.to_string())? > 0;
    let (speaker, rib) = Speaker::start(cfg, metrics.clone())
        .await
        .map_err(|e| format!("BGP: {e}"))?;
    let (prefixes, v4, v6) = trellisd::backend::bgp::exports(own, underlay.ip);
    speaker.set_exports(prefixes, v4, v6);
    let synced = speaker.synced();
    info!(asn, %router_id, "BGP speaker started");
    Ok((speaker, rib, synced))
}

type Routes = tokio::sync::watch::Receiver<trellisd::bgp::Routes>;
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
