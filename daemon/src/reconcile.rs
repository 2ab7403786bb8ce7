//! The reconciler: desired state from the leases, actual state from the kernel, and only the
//! difference applied.
//!
//! [`Dataplane`] owns this node's side of the node-to-node network: the backend's device (see
//! [`crate::backend`]), the routes, neighbours and FDB entries to the other nodes, and the
//! masquerade of this node's pods. Every [`Dataplane::reconcile`] run:
//!
//! 1. makes the backend's device be there (recreated if someone deleted it);
//! 2. computes the kernel objects the other nodes' leases call for ([`Desired`]) — in BGP mode,
//!    the routes the BGP speaker learned ([`Sources::learned`]) instead;
//! 3. reads what the kernel holds: routes with [`TRELLISD_PROTO`] in the main table, our
//!    nexthop objects, permanent neighbours and FDB entries on our device;
//! 4. applies the difference ([`plan`]): adds and replaces what is missing or wrong, removes what
//!    no lease wants — including what an earlier run left behind (a node gone while we were
//!    down, an old CIDR) — and touches nothing else.
//!
//! Where the kernel has nexthop objects (Linux 5.3+), every route goes by one of ours instead of
//! carrying its own gateway: route insertion then stays flat as the table grows ([`nexthop`]
//! says why and how). `DataplaneConfig::nexthop_objects` turns that off.
//!
//! It is idempotent (a second run with the same leases sends nothing), so main.rs can call it on
//! every datastore event, on kernel notifications ([`Dataplane::kernel_changes`]) and
//! periodically. A failed change does not stop the others: all are tried, the failures are
//! returned together, and the next run retries what is still missing.
//!
//! Step 3 is most of a run's cost on a large cluster (four dumps: 39 ms at 10,000 nodes), and a
//! run after a datastore event or a BGP update can skip it: [`Dataplane::reconcile`] takes the
//! kernel to hold what the last complete run left there, unless the kernel watch has seen a
//! change that concerns us since. [`Dataplane::resync`] always reads the kernel (main.rs: on
//! kernel notifications and periodically), which also catches what the watch does not report.
//!
//! In BGP mode a change of a few learned routes among many does not even work out the others
//! again: an *incremental run* (`Dataplane::incremental`) diffs the new learned routes against
//! those of the last run (one pass over two sorted lists, no allocation per route), works out
//! the kernel objects of the changed prefixes only, assigns their nexthop objects, and plans
//! their routes against what the last run left (kept by destination). It is what a complete run
//! would do for those prefixes — `dataplane_bgp.rs` checks that a resync finds nothing left to
//! do after each change — and it only runs when nothing else can differ: no kernel read asked
//! for, nothing of ours changed in the kernel since, no VXLAN cross-subnet (whose neighbours and
//! FDB entries are shared per next hop and come from the leases), this node's lease unchanged,
//! the routes sorted by prefix (the speaker's are). Otherwise the complete run goes.
//!
//! In BGP mode, while [`Sources::learned`] is `None` (the speaker has not synced) a run only
//! makes the device be there and changes no route, neighbour or FDB entry: the desired state is not known yet, and the
//! routes an earlier run installed keep the pods talking while the BGP sessions come up (see
//! `backend::bgp`).
//!
//! Nothing is torn down when the `Dataplane` is dropped: pods keep talking while the daemon
//! restarts, and the next daemon adopts what it finds.

mod kernel_watch;
mod nexthop;

pub use crate::error::{DataplaneError, ReconcileReport};
pub use crate::underlay::Underlay;
pub use nexthop::ID_RANGE as NEXTHOP_ID_RANGE;

use nexthop::Assignment;

/// What the desired state is made from: the datastore's leases, and in BGP mode the routes the
/// speaker learned — two route sources side by side, each backend reading the one it routes by.
/// A plain lease map converts into one (`dp.reconcile(&leases)`).
#[derive(Clone, Copy, Debug)]
pub struct Sources<'a> {
    /// Every node's lease, this node's included (and skipped).
    pub leases: &'a BTreeMap<String, Lease>,
    /// The BGP speaker's routes, all of them (those of a gracefully restarting peer, flagged
    /// stale, included), already through its import policy; `None` until it has synced with
    /// its peers: then a BGP run changes no route (see the module docs). Read by the `bgp`
    /// backend only.
    pub learned: Option<&'a [BgpRoute]>,
}

impl<'a> From<&'a BTreeMap<String, Lease>> for Sources<'a> {
    fn from(leases: &'a BTreeMap<String, Lease>) -> Self {
        Sources { leases, learned: None }
    }
}

use crate::backend::bgp::BgpRoute;
use crate::backend::{Backend, Desired, Notices, TRELLISD_PROTO};
use crate::lease::{BackendData, Lease};
use crate::metrics::Metrics;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use trellis_net::ethtool::Ethtool;
use trellis_net::netns::{run_in, THREAD_NETNS};
use trellis_net::nft::{AntiSpoof, Encapsulation, Masquerade, MasqueradeConfig, PodIdentity, UnderlayGuard};
use trellis_net::route::RT_TABLE_MAIN;
use trellis_net::{MacAddr, NeighbourState, NetError, Netlink, Nexthop, Route, RouteFilter};

#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// This node's name (its lease is skipped when computing routes).
    pub node: String,
    pub backend: crate::config::Backend,
    pub underlay: Underlay,
    /// Traffic to these is never masqueraded (pod to pod keeps its source).
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Routes by kernel nexthop object where the kernel has them (see the module docs);
    /// `false`: plain routes, each with its gateway (and our leftover nexthops removed).
    pub nexthop_objects: bool,
}

/// The node's dataplane; see the module docs.
pub struct Dataplane {
    cfg: DataplaneConfig,
    nl: Netlink,
    backend: Backend,
    masquerade: Masquerade,
    /// Encapsulated traffic only from and to known nodes (see `trellis_net::nft::UnderlayGuard`).
    underlay_guard: UnderlayGuard,
    /// The node addresses the guard was last made to hold (`None`: not yet, or unknown).
    guarded: Option<BTreeSet<IpAddr>>,
    /// The pods' anti-spoofing elements (the plugin's), put back from the records it leaves in
    /// `pod_records` when a flushed ruleset took them.
    anti_spoof: AntiSpoof,
    pod_records: Option<PathBuf>,
    metrics: Metrics,
    own: Option<Lease>,
    notices: Notices,
    nexthops: NexthopSupport,
    /// What the kernel holds of ours after the last run that changed everything it planned,
    /// with the device index it was made for; `None` when unknown (reads the kernel next time).
    /// While `learned` is set, its routes are there instead.
    applied: Option<(Option<u32>, Actual)>,
    /// BGP mode: the learned routes of the last complete run and what they were programmed as,
    /// for incremental runs (see [`Learned`]).
    learned: Option<Learned>,
    incremental_runs: u64,
    interest: Arc<kernel_watch::Interest>,
    watcher: tokio::task::JoinHandle<()>,
    /// Wakes the reconciler when someone undoes the masquerade table.
    table_watcher: tokio::task::JoinHandle<()>,
}

/// What this node's backend decapsulates, which the underlay guard keeps to known nodes.
fn encapsulation(backend: &crate::config::Backend) -> Encapsulation {
    use crate::config::{Backend as B, CrossSubnet};
    match backend {
        B::Vxlan { port, .. } => Encapsulation {
            vxlan_port: Some(*port),
            ipip: false,
        },
        B::Ipip => Encapsulation {
            vxlan_port: None,
            ipip: true,
        },
        B::Bgp { cross_subnet, .. } => Encapsulation {
            vxlan_port: (*cross_subnet == CrossSubnet::Vxlan).then_some(crate::backend::bgp::CROSS_SUBNET_PORT),
            ipip: *cross_subnet == CrossSubnet::Ipip,
        },
        B::HostGw => Encapsulation::default(),
    }
}

/// Whether routes go by nexthop object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NexthopSupport {
    /// The kernel has none (before 5.3): plain routes, and no nexthop is read.
    Missing,
    /// The kernel has them but the configuration says no: plain routes, ours removed.
    Off,
    /// Routes by nexthop object.
    On,
}

impl Dataplane {
    /// Sets up the dataplane in the calling thread's network namespace (the node's): connects to
    /// the kernel and creates the backend's device (VXLAN: `trellis.<VNI>`, kept when it is
    /// already there as configured). Must be called inside a tokio runtime.
    pub async fn new(cfg: DataplaneConfig, metrics: Metrics) -> Result<Dataplane, DataplaneError> {
        Self::new_in(cfg, metrics, Path::new(THREAD_NETNS)).await
    }

    /// Like [`Dataplane::new`], in the network namespace at `netns` (tests run one per node).
    pub async fn new_in(cfg: DataplaneConfig, metrics: Metrics, netns: &Path) -> Result<Dataplane, DataplaneError> {
        // Keep the namespace open: the kernel watch may need to reopen its socket later, from
        // whatever thread, in this namespace.
        let ns_file =
            File::open(netns).map_err(|e| DataplaneError::Invalid(format!("opening {}: {e}", netns.display())))?;
        let ns = PathBuf::from(format!("/proc/self/fd/{}", ns_file.as_raw_fd()));
        let nl = Netlink::connect_in(&ns)?;
        let ethtool = Ethtool::open_in(&ns)?;
        let masq_cfg = MasqueradeConfig::new(cfg.cluster_cidrs.iter().copied());
        let open = {
            let cfg = masq_cfg.clone();
            move || Masquerade::new(cfg.clone()).and_then(|m| m.watch().map(|w| (m, w)))
        };
        let (masquerade, table_watch) = run_in(&ns, open.clone())??;
        let encap = encapsulation(&cfg.backend);
        let underlay_guard = run_in(&ns, move || UnderlayGuard::new(trellis_net::nft::DEFAULT_TABLE, encap))??;
        let anti_spoof = run_in(&ns, || AntiSpoof::new(trellis_net::nft::DEFAULT_TABLE))??;
        let backend = Backend::new(&cfg.backend, &cfg.node, &cfg.underlay, &nl, ethtool).await?;
        for name in backend.remove_other_devices(&nl).await? {
            tracing::info!(device = %name, backend = cfg.backend.name(), "removed a device an earlier backend configuration left");
        }
        let nexthops = match (nl.nexthops_supported().await?, cfg.nexthop_objects) {
            (false, _) => {
                tracing::info!("this kernel has no nexthop objects (Linux 5.3+): plain routes");
                NexthopSupport::Missing
            }
            (true, false) => NexthopSupport::Off,
            (true, true) => NexthopSupport::On,
        };
        let interest = Arc::new(kernel_watch::Interest::default());
        interest.set_device(backend.device_index());
        let ns_file = Arc::new(ns_file);
        let watch_nexthops = nexthops != NexthopSupport::Missing;
        let watcher = kernel_watch::spawn(ns.clone(), Arc::clone(&interest), Arc::clone(&ns_file), watch_nexthops)?;
        let table_watcher =
            kernel_watch::spawn_table_watch(ns, table_watch, Arc::clone(&interest), ns_file, move || {
                open().map(|(_, w)| w)
            });
        Ok(Dataplane {
            cfg,
            nl,
            backend,
            masquerade,
            underlay_guard,
            guarded: None,
            anti_spoof,
            pod_records: None,
            metrics,
            own: None,
            notices: Notices::default(),
            nexthops,
            applied: None,
            learned: None,
            incremental_runs: 0,
            interest,
            watcher,
            table_watcher,
        })
    }

    /// What this node publishes in its lease.
    pub fn backend_data(&self) -> BackendData {
        self.backend.backend_data()
    }

    /// The pod MTU for the CNI config: the underlay MTU less the backend's overhead.
    pub fn pod_mtu(&self) -> u32 {
        let u = &self.cfg.underlay;
        u.mtu.saturating_sub(self.cfg.backend.overhead(u.ip.is_ipv6()))
    }

    /// Why some remote nodes (in BGP mode: some learned prefixes) get no route, as of the last
    /// reconcile run (each was logged once).
    pub fn notices(&self) -> impl Iterator<Item = &str> {
        self.notices.messages()
    }

    /// This node holds `own`: its VTEP addresses go on the device and the device comes up
    /// (VXLAN), and its pods' traffic to outside the cluster CIDRs is masqueraded. Call again
    /// when the lease changes (an earlier CIDR's addresses and masquerade are removed).
    pub async fn set_own(&mut self, own: &Lease) -> Result<(), DataplaneError> {
        if own.node != self.cfg.node {
            return Err(DataplaneError::Invalid(format!(
                "set_own: lease of node {}, this is node {}",
                own.node, self.cfg.node
            )));
        }
        let own = normalized(own);
        self.backend.ensure(&self.nl, &self.cfg.underlay, Some(&own)).await?;
        self.interest.set_device(self.backend.device_index());
        self.masquerade.ensure()?;
        if let Some(old) = &self.own {
            for cidr in old.pod_cidrs.iter().filter(|c| !own.pod_cidrs.contains(c)) {
                self.masquerade.remove_source_prefix(*cidr)?;
            }
        }
        for cidr in &own.pod_cidrs {
            self.masquerade.add_source_prefix(*cidr)?;
        }
        tracing::info!(node = %own.node, cidrs = ?own.pod_cidrs, "this node's lease is in place");
        // The learned routes overlapping it are not installed: all are looked at again.
        self.forget_learned();
        self.own = Some(own);
        Ok(())
    }

    /// How many routes of ours the kernel holds now: at start, those an earlier run left (for
    /// BGP graceful restart, the forwarding state kept across the restart).
    pub async fn installed_routes(&self) -> Result<usize, DataplaneError> {
        let filter = RouteFilter {
            table: Some(RT_TABLE_MAIN),
            protocol: Some(TRELLISD_PROTO),
            ..Default::default()
        };
        Ok(self.nl.routes(&filter).await?.len())
    }

    /// Makes the kernel hold what `sources` call for, and nothing else of ours: the other nodes'
    /// leases, or in BGP mode the learned routes (the leases then give the VXLAN cross-subnet
    /// VTEPs), and nothing changes while there are none yet.
    ///
    /// The kernel is read only when the last run left something undone or the kernel watch has
    /// seen a change that concerns us since (see the module docs); otherwise only the difference
    /// from the last run's leases is sent.
    pub async fn reconcile<'a>(&mut self, sources: impl Into<Sources<'a>>) -> Result<ReconcileReport, DataplaneError> {
        self.run(sources.into(), false).await
    }

    /// [`Dataplane::reconcile`], reading what the kernel holds whatever happened since the last
    /// run: after kernel notifications, and periodically.
    pub async fn resync<'a>(&mut self, sources: impl Into<Sources<'a>>) -> Result<ReconcileReport, DataplaneError> {
        self.run(sources.into(), true).await
    }

    async fn run(&mut self, sources: Sources<'_>, read_kernel: bool) -> Result<ReconcileReport, DataplaneError> {
        let started = Instant::now();
        self.metrics.reconcile_runs().inc();
        self.metrics.leases().set(sources.leases.len() as i64);
        let result = match self
            .ensure_masquerade(read_kernel)
            .and_then(|()| self.guard_underlay(sources.leases, read_kernel))
        {
            Ok(()) => match self.restore_anti_spoofing(read_kernel).await {
                Ok(()) => self.reconcile_once(sources, read_kernel).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        self.metrics
            .reconcile_seconds()
            .observe(started.elapsed().as_secs_f64());
        let report = match &result {
            Ok(r) => *r,
            Err(DataplaneError::Partial { report, .. }) => *report,
            Err(_) => ReconcileReport::default(),
        };
        self.metrics.kernel_objects_programmed().inc_by(report.added as u64);
        self.metrics.kernel_objects_removed().inc_by(report.removed as u64);
        if report != ReconcileReport::default() {
            tracing::info!(
                added = report.added,
                removed = report.removed,
                "reconciled the dataplane"
            );
        }
        result
    }

    /// The masquerade table is desired state too: on every run that reads the kernel, its
    /// chain, sets and rules are checked (two dumps, about 60 µs, nothing committed when in
    /// place) and this node's pod CIDRs put back in its source set if someone removed them
    /// (`nft flush ruleset`, a reload of the distribution's nftables service).
    fn ensure_masquerade(&self, read_kernel: bool) -> Result<(), DataplaneError> {
        if !read_kernel {
            return Ok(());
        }
        let Some(own) = &self.own else { return Ok(()) };
        self.masquerade.ensure()?;
        let have = self.masquerade.list_source_prefixes()?;
        for cidr in own.pod_cidrs.iter().filter(|c| !have.contains(c)) {
            tracing::info!(%cidr, "put this node's pod CIDR back into the masquerade table");
            self.masquerade.add_source_prefix(*cidr)?;
        }
        Ok(())
    }

    /// Where the plugin leaves each protected pod's identity (`antiSpoofingRecords` in the CNI
    /// config trellisd writes): from now on every run that reads the kernel puts back the
    /// anti-spoofing elements of the pods whose elements are gone (`nft flush ruleset`).
    pub fn restore_anti_spoofing_from(&mut self, dir: PathBuf) {
        self.pod_records = Some(dir);
    }

    /// See [`Dataplane::restore_anti_spoofing_from`]. A record whose host end is gone is a pod
    /// deleted without DEL: removed once it is a minute old (younger, it may be an ADD that is
    /// re-creating its host end right now).
    async fn restore_anti_spoofing(&self, read_kernel: bool) -> Result<(), DataplaneError> {
        let Some(dir) = self.pod_records.as_ref().filter(|_| read_kernel) else {
            return Ok(());
        };
        let entries = match std::fs::read_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(DataplaneError::Invalid(format!("reading {}: {e}", dir.display()))),
            Ok(entries) => entries,
        };
        let mut have: Option<BTreeSet<String>> = None;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Some((owner, pod)) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| PodIdentity::parse_record(&t))
            else {
                continue;
            };
            if have.is_none() {
                have = Some(self.anti_spoof.owners()?.into_iter().map(|(o, _)| o).collect());
            }
            if have.as_ref().is_some_and(|h| h.contains(&owner)) {
                continue;
            }
            if self.nl.link_by_name(&pod.port).await?.is_none() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 60));
                if old {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            tracing::info!(pod = %owner, port = %pod.port, "put the pod's anti-spoofing elements back");
            self.anti_spoof.protect(&owner, &pod)?;
        }
        Ok(())
    }

    /// The tunnel ports accept only the nodes of the leases (and this node): made to match when
    /// the set of nodes changed, and checked on every run that reads the kernel.
    fn guard_underlay(&mut self, leases: &BTreeMap<String, Lease>, read_kernel: bool) -> Result<(), DataplaneError> {
        let mut nodes: BTreeSet<IpAddr> = leases.values().map(|l| l.underlay_ip).collect();
        nodes.insert(self.cfg.underlay.ip);
        if !read_kernel && self.guarded.as_ref() == Some(&nodes) {
            return Ok(());
        }
        self.guarded = None;
        let changed = self.underlay_guard.sync(&nodes)?;
        if changed > 0 && read_kernel {
            tracing::debug!(changed, "the tunnel ports' node set was brought up to date");
        }
        self.guarded = Some(nodes);
        Ok(())
    }

    async fn reconcile_once(
        &mut self,
        sources: Sources<'_>,
        read_kernel: bool,
    ) -> Result<ReconcileReport, DataplaneError> {
        let underlay = &self.cfg.underlay;
        self.backend.ensure(&self.nl, underlay, self.own.as_ref()).await?;
        let device = self.backend.device_index();
        self.interest.set_device(device);
        if !read_kernel {
            if let Some(result) = self.incremental(sources.learned, device).await {
                return result;
            }
        }
        self.forget_learned();
        let underlay = &self.cfg.underlay;

        let (mut desired, mut notices) = (Desired::default(), Notices::default());
        let remotes: Vec<Lease> = sources
            .leases
            .values()
            .filter(|l| l.node != self.cfg.node)
            .map(normalized)
            .collect();
        let known = self.backend.desired(
            &remotes,
            sources.learned,
            self.own.as_ref(),
            underlay,
            &mut desired,
            &mut notices,
        );
        if !known {
            // BGP before the speaker has synced: keep what is installed (see the module docs).
            return Ok(ReconcileReport::default());
        }
        for message in notices.fresh(&self.notices) {
            tracing::warn!("{message}");
        }
        self.notices = notices;
        self.interest.set_routes(desired.routes.keys().copied().collect());

        // What the last complete run left, if nothing of ours changed since (the device was not
        // recreated, the kernel watch saw nothing); else read it. The watch's flag is cleared
        // before the dumps, so a change during them makes the next run read again.
        let actual = match self.applied.take() {
            Some((index, actual)) if !read_kernel && index == device && !self.interest.take_changed() => actual,
            _ => {
                self.interest.take_changed();
                self.actual(device).await?
            }
        };
        let routes = routes_to_program(&desired, &actual, self.nexthops == NexthopSupport::On);
        let plan = plan_routes(&desired, &routes, &actual);
        let result = self.apply(&plan, device).await;
        if result.is_ok() {
            let mut actual = settled(&desired, routes, actual, &plan);
            if let Some(learned) = sources
                .learned
                .filter(|_| self.backend.bgp().is_some_and(|b| b.per_route()))
            {
                self.learned = Some(Learned::new(learned, &mut actual));
            }
            self.applied = Some((device, actual));
        }
        result
    }

    /// Runs that applied a change of the learned routes incrementally (for tests and benches).
    pub fn incremental_runs(&self) -> u64 {
        self.incremental_runs
    }

    /// Puts the routes of [`Dataplane::learned`] back into `applied`, and forgets them.
    fn forget_learned(&mut self) {
        if let Some(l) = self.learned.take() {
            if let Some((_, actual)) = &mut self.applied {
                actual.routes = l.programmed.into_values().collect();
            }
        }
    }

    /// A run that works out and applies only what changed in the learned routes since the last
    /// run (`O(change)`, where a complete run works out every route again): in BGP mode without
    /// VXLAN cross-subnet (a learned route's kernel objects then depend on it alone), when
    /// nothing of ours changed in the kernel since the last run and the learned routes come
    /// sorted by prefix, as the speaker's do. `None` when it cannot be: the complete run goes.
    /// The result is what a complete run would have done (dataplane_bgp.rs checks it with a
    /// resync after every change).
    async fn incremental(
        &mut self,
        learned: Option<&[BgpRoute]>,
        device: Option<u32>,
    ) -> Option<Result<ReconcileReport, DataplaneError>> {
        let now = learned?;
        let bgp = self.backend.bgp().filter(|b| b.per_route())?;
        let l = self.learned.as_mut()?;
        if !matches!(&self.applied, Some((index, _)) if *index == device) {
            return None;
        }
        let changes = learned_changes(&l.routes, now)?;
        if self.interest.take_changed() {
            // Something of ours changed in the kernel: the complete run reads it.
            self.applied = None;
            return None;
        }
        let (_, actual) = self.applied.as_mut().expect("checked");
        let mut desired = Desired::default();
        let mut notices = Notices::default();
        for (prefix, next_hop) in &changes {
            if let Some(nh) = next_hop {
                bgp.desired_one(
                    *prefix,
                    *nh,
                    self.own.as_ref(),
                    &self.cfg.underlay,
                    &mut desired,
                    &mut notices,
                );
            }
        }
        for message in notices.fresh(&self.notices) {
            tracing::warn!("{message}");
        }
        for (prefix, _) in &changes {
            self.notices.forget(&prefix.to_string());
        }
        self.notices.extend(notices);

        // The routes to program, by nexthop object where routes go by them (see `nexthop`).
        let mut plan = Plan::default();
        let mut want: Vec<Route> = Vec::with_capacity(desired.routes.len());
        for (_, mut route) in desired.routes {
            if self.nexthops == NexthopSupport::On {
                if let Some(key) = nexthop::Key::of_route(&route) {
                    let id = match l.by_key.get(&key) {
                        Some(id) => Some(*id),
                        None => {
                            let id = NEXTHOP_ID_RANGE.clone().find(|id| !actual.nexthop_ids.contains(id));
                            if let Some(id) = id {
                                let nh = key.nexthop(id);
                                plan.add_nexthops.push(nh.clone());
                                actual.nexthops.push(nh);
                                actual.nexthop_ids.insert(id);
                                l.by_key.insert(key, id);
                            }
                            id
                        }
                    };
                    // 16 million IDs in use: the route stays plain rather than fail.
                    if let Some(id) = id {
                        *l.users.entry(id).or_default() += 1;
                        route.nexthop_id = Some(id);
                    }
                }
            }
            want.push(route);
        }
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut want = want.into_iter().peekable();
        for (prefix, _) in &changes {
            let new = want.next_if(|r| r.destination == *prefix);
            let old = l.programmed.remove(prefix);
            if let Some(id) = old.as_ref().and_then(|r| r.nexthop_id) {
                if let Some(n) = l.users.get_mut(&id) {
                    *n = n.saturating_sub(1);
                }
            }
            match (new, old) {
                (Some(new), Some(old)) if same_route(&new, &old) => {
                    l.programmed.insert(*prefix, old);
                }
                (Some(mut new), _) => {
                    // Replaces the old one in place (same destination, default metric).
                    plan.add_routes.push(new.clone());
                    if new.metric.is_none() && default_metric(&new) != 0 {
                        new.metric = Some(default_metric(&new));
                    }
                    l.programmed.insert(*prefix, new);
                    added.push(*prefix);
                }
                (None, Some(old)) => {
                    plan.del_routes.push(old);
                    removed.push(*prefix);
                }
                (None, None) => {}
            }
        }
        // Nexthops no route uses any more go, after the routes moved off them.
        let unused: Vec<u32> = l.users.iter().filter(|(_, n)| **n == 0).map(|(id, _)| *id).collect();
        for id in unused {
            l.users.remove(&id);
            l.by_key.retain(|_, v| *v != id);
            actual.nexthops.retain(|n| n.id != id);
            actual.nexthop_ids.remove(&id);
            plan.del_nexthops.push(id);
        }
        l.routes.clear();
        l.routes.extend(now.iter().map(|r| BgpRoute {
            prefix: normalized_prefix(r.prefix),
            next_hop: r.next_hop,
        }));
        self.interest.update_routes(&added, &removed);
        let result = self.apply(&plan, device).await;
        if result.is_ok() {
            self.incremental_runs += 1;
        } else {
            // The next run reads the kernel and works everything out again.
            self.learned = None;
            self.applied = None;
        }
        Some(result)
    }

    /// What the kernel holds of ours.
    async fn actual(&self, device: Option<u32>) -> Result<Actual, NetError> {
        let filter = RouteFilter {
            table: Some(RT_TABLE_MAIN),
            protocol: Some(TRELLISD_PROTO),
            ..Default::default()
        };
        let routes = self.nl.routes(&filter).await?;
        let (mut neighbours, mut fdb) = (BTreeMap::new(), BTreeSet::new());
        if let Some(index) = device {
            for n in self.nl.neighbours(Some(index), None).await? {
                // Only permanent entries are programmed ones; the kernel's own (NOARP for
                // multicast, failed lookups) come back as soon as they are deleted.
                if n.state == NeighbourState::Permanent {
                    neighbours.insert(n.ip, n.mac);
                }
            }
            for e in self.nl.fdb(index).await? {
                if let (true, true, None, Some(dst)) = (e.ntf_self, e.permanent, e.master, e.dst) {
                    fdb.insert((e.mac, dst));
                }
            }
        }
        let (mut nexthops, mut nexthop_ids) = (Vec::new(), BTreeSet::new());
        if self.nexthops != NexthopSupport::Missing {
            for nh in self.nl.nexthops().await? {
                nexthop_ids.insert(nh.id);
                if nexthop::is_ours(&nh) {
                    nexthops.push(nh);
                }
            }
        }
        Ok(Actual {
            routes,
            neighbours,
            fdb,
            nexthops,
            nexthop_ids,
        })
    }

    /// Applies a plan: every change is tried; failures are collected.
    async fn apply(&self, plan: &Plan, device: Option<u32>) -> Result<ReconcileReport, DataplaneError> {
        let nl = &self.nl;
        let mut report = ReconcileReport::default();
        let mut failures = Vec::new();
        let mut count = |r: Result<(), NetError>, n: &mut usize| match r {
            Ok(()) => *n += 1,
            Err(e) => failures.push(e),
        };
        // FDB first (an entry whose remote moved is deleted, then added), then neighbours and
        // routes: by the time a route exists, the entries it relies on do.
        if let Some(dev) = device {
            for (mac, dst) in &plan.del_fdb {
                count(nl.del_fdb(dev, *mac, Some(*dst)).await, &mut report.removed);
            }
            for (mac, dst) in &plan.add_fdb {
                count(nl.replace_fdb(dev, *mac, *dst).await, &mut report.added);
            }
            for (ip, mac) in &plan.add_neighbours {
                count(nl.replace_neighbour(dev, *ip, *mac).await, &mut report.added);
            }
        }
        // Nexthops before the routes that name them; a nexthop that could not be added (its ID
        // taken since we read the kernel) must not get routes, which would go by someone else's.
        let mut missing = BTreeSet::new();
        for nh in &plan.add_nexthops {
            let r = nl.add_nexthop(nh).await;
            if r.is_err() {
                missing.insert(nh.id);
            }
            count(r, &mut report.added);
        }
        for route in &plan.add_routes {
            if route.nexthop_id.is_some_and(|id| missing.contains(&id)) {
                continue;
            }
            count(nl.replace_route(route).await, &mut report.added);
        }
        for route in &plan.del_routes {
            count(nl.del_route(route).await, &mut report.removed);
        }
        // After the routes moved off them: deleting a nexthop deletes the routes using it.
        for id in &plan.del_nexthops {
            count(nl.del_nexthop(*id).await, &mut report.removed);
        }
        if let Some(dev) = device {
            for ip in &plan.del_neighbours {
                count(nl.del_neighbour(dev, *ip).await, &mut report.removed);
            }
        }
        if failures.is_empty() {
            Ok(report)
        } else {
            Err(DataplaneError::Partial { failures, report })
        }
    }

    /// A receiver that yields `()` soon after the kernel reports a change that might undo our
    /// work (a route, neighbour or FDB entry of ours deleted, our device deleted or down, lost
    /// notifications): reconcile when it fires. A burst of changes yields once; a second call
    /// replaces the receiver.
    pub fn kernel_changes(&mut self) -> mpsc::Receiver<()> {
        self.interest.subscribe()
    }
}

impl Drop for Dataplane {
    /// Stops watching the kernel; the dataplane itself stays in place.
    fn drop(&mut self) {
        self.watcher.abort();
        self.table_watcher.abort();
    }
}

/// The learned routes of the last complete run and what the kernel holds for them, kept up to
/// date by incremental runs ([`Dataplane::incremental`]).
struct Learned {
    /// The learned routes, prefixes normalized, sorted by prefix.
    routes: Vec<BgpRoute>,
    /// Every route of ours the kernel holds, as `settled` has it, by destination (moved out of
    /// `applied` while this is kept).
    programmed: BTreeMap<IpNetwork, Route>,
    /// Our nexthop objects by what they do, and how many routes use each.
    by_key: std::collections::HashMap<nexthop::Key, u32>,
    users: std::collections::HashMap<u32, usize>,
}

impl Learned {
    /// After a complete run that left `actual` (whose routes move here) for `learned`.
    fn new(learned: &[BgpRoute], actual: &mut Actual) -> Learned {
        // As `Bgp::desired`: normalized, and of two routes to one prefix the last one.
        let routes: BTreeMap<IpNetwork, IpAddr> = learned
            .iter()
            .map(|r| (normalized_prefix(r.prefix), r.next_hop))
            .collect();
        let mut by_key = std::collections::HashMap::new();
        for nh in &actual.nexthops {
            if let Some(key) = nexthop::Key::of_nexthop(nh) {
                by_key.entry(key).or_insert(nh.id);
            }
        }
        let mut users = std::collections::HashMap::new();
        let mut programmed = BTreeMap::new();
        for r in std::mem::take(&mut actual.routes) {
            if let Some(id) = r.nexthop_id {
                *users.entry(id).or_default() += 1;
            }
            programmed.insert(r.destination, r);
        }
        Learned {
            routes: routes
                .into_iter()
                .map(|(prefix, next_hop)| BgpRoute { prefix, next_hop })
                .collect(),
            programmed,
            by_key,
            users,
        }
    }
}

fn normalized_prefix(p: IpNetwork) -> IpNetwork {
    IpNetwork::new(p.network(), p.prefix()).expect("same prefix length")
}

/// What changed from `old` (normalized, sorted) to `new`: prefix → its new next hop, `None` for
/// a withdrawn prefix; in prefix order. `None` when `new` is not sorted by prefix (or repeats
/// one): then the complete run works it out.
fn learned_changes(old: &[BgpRoute], new: &[BgpRoute]) -> Option<Vec<(IpNetwork, Option<IpAddr>)>> {
    let mut out = Vec::new();
    let mut old = old.iter().peekable();
    let mut last: Option<IpNetwork> = None;
    for r in new {
        let prefix = normalized_prefix(r.prefix);
        if last.is_some_and(|l| l >= prefix) {
            return None;
        }
        last = Some(prefix);
        while let Some(o) = old.next_if(|o| o.prefix < prefix) {
            out.push((o.prefix, None));
        }
        match old.next_if(|o| o.prefix == prefix) {
            Some(o) if o.next_hop == r.next_hop => {}
            _ => out.push((prefix, Some(r.next_hop))),
        }
    }
    out.extend(old.map(|o| (o.prefix, None)));
    Some(out)
}

/// The lease with host bits cleared from its CIDRs (`10.244.1.5/24` -> `10.244.1.0/24`), the
/// way the kernel reports routes.
fn normalized(lease: &Lease) -> Lease {
    let mut l = lease.clone();
    for cidr in &mut l.pod_cidrs {
        *cidr = IpNetwork::new(cidr.network(), cidr.prefix()).expect("same prefix length");
    }
    l
}

/// What the kernel holds of ours.
#[derive(Clone, Debug, Default)]
pub struct Actual {
    /// Routes with our protocol in the main table.
    pub routes: Vec<Route>,
    /// Permanent neighbours on our device.
    pub neighbours: BTreeMap<IpAddr, Option<MacAddr>>,
    /// Permanent FDB entries (self) on our device: (MAC, remote).
    pub fdb: BTreeSet<(MacAddr, IpAddr)>,
    /// Our nexthop objects (protocol and ID range ours).
    pub nexthops: Vec<Nexthop>,
    /// The IDs of every nexthop object in the namespace, anyone's.
    pub nexthop_ids: BTreeSet<u32>,
}

/// The changes that turn `Actual` into `Desired`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub add_routes: Vec<Route>,
    pub del_routes: Vec<Route>,
    pub add_neighbours: Vec<(IpAddr, MacAddr)>,
    pub del_neighbours: Vec<IpAddr>,
    pub add_fdb: Vec<(MacAddr, IpAddr)>,
    pub del_fdb: Vec<(MacAddr, IpAddr)>,
    /// Added before the routes (new IDs, never replacing).
    pub add_nexthops: Vec<Nexthop>,
    /// Deleted after the routes.
    pub del_nexthops: Vec<u32>,
}

/// A route as the kernel holds it is the one we want when it goes the same way; its metric,
/// scope and MTU are not compared. By nexthop object, the object's ID is the way (the gateway
/// and device the kernel reports with it are the object's).
fn same_route(want: &Route, have: &Route) -> bool {
    want.destination == have.destination
        && want.nexthop_id == have.nexthop_id
        && (want.nexthop_id.is_some()
            || (want.gateway == have.gateway && want.oif == have.oif && want.onlink == have.onlink))
}

/// The metric a route added without one gets: `ip route replace` of one of ours replaces a route
/// with that metric in place.
fn default_metric(route: &Route) -> u32 {
    if route.destination.is_ipv4() {
        0
    } else {
        1024
    }
}

/// The routes to program for `desired`: as the backends asked for them, or with
/// `nexthop_objects` by nexthop object of ours (see [`nexthop`]), with the nexthop changes that
/// takes (ours that are not wanted go either way).
fn routes_to_program(desired: &Desired, actual: &Actual, nexthop_objects: bool) -> Assignment {
    if nexthop_objects {
        nexthop::assign(&desired.routes, &actual.nexthops, &actual.nexthop_ids)
    } else {
        Assignment {
            routes: desired.routes.clone(),
            add: Vec::new(),
            del: actual.nexthops.iter().map(|n| n.id).collect(),
        }
    }
}

/// What the kernel holds of ours once `plan`, made from `program` and `actual`, has been applied
/// in full: the routes programmed as the kernel reports them, and nothing else of ours.
fn settled(desired: &Desired, program: Assignment, mut actual: Actual, plan: &Plan) -> Actual {
    actual.routes = program
        .routes
        .into_values()
        .map(|mut r| {
            if r.metric.is_none() && default_metric(&r) != 0 {
                r.metric = Some(default_metric(&r));
            }
            r
        })
        .collect();
    actual.neighbours = desired.neighbours.iter().map(|(ip, mac)| (*ip, Some(*mac))).collect();
    actual.fdb.clone_from(&desired.fdb);
    let deleted: BTreeSet<u32> = plan.del_nexthops.iter().copied().collect();
    actual.nexthops.retain(|n| !deleted.contains(&n.id));
    actual.nexthops.extend(plan.add_nexthops.iter().cloned());
    actual.nexthop_ids.retain(|id| !deleted.contains(id));
    actual.nexthop_ids.extend(plan.add_nexthops.iter().map(|n| n.id));
    actual
}

/// The difference between what the leases call for and what the kernel holds; with
/// `nexthop_objects`, routes by nexthop object (our nexthops not wanted are removed either way).
pub fn plan(desired: &Desired, actual: &Actual, nexthop_objects: bool) -> Plan {
    plan_routes(desired, &routes_to_program(desired, actual, nexthop_objects), actual)
}

/// [`plan`], with the routes to program already worked out.
fn plan_routes(desired: &Desired, program: &Assignment, actual: &Actual) -> Plan {
    let mut p = Plan {
        add_nexthops: program.add.clone(),
        del_nexthops: program.del.clone(),
        ..Plan::default()
    };
    let routes = &program.routes;
    // Indexed once: scanning every actual route for every desired one made a no-op resync at
    // 10,000 nodes cost about 70 ms, most of it in that scan (bench/src/bin/convergence.rs).
    let mut by_dst: std::collections::HashMap<IpNetwork, Vec<&Route>> = std::collections::HashMap::new();
    for have in &actual.routes {
        by_dst.entry(have.destination).or_default().push(have);
    }
    for want in routes.values() {
        let present = by_dst
            .get(&want.destination)
            .is_some_and(|v| v.iter().any(|have| same_route(want, have)));
        if !present {
            p.add_routes.push(want.clone());
        }
    }
    for have in &actual.routes {
        match routes.get(&have.destination) {
            Some(want) if same_route(want, have) => {}
            // Replaced in place by the add above.
            Some(_) if have.metric.unwrap_or(0) == default_metric(have) => {}
            _ => p.del_routes.push(have.clone()),
        }
    }
    for (ip, mac) in &desired.neighbours {
        if actual.neighbours.get(ip) != Some(&Some(*mac)) {
            p.add_neighbours.push((*ip, *mac));
        }
    }
    p.del_neighbours = actual
        .neighbours
        .keys()
        .filter(|ip| !desired.neighbours.contains_key(ip))
        .copied()
        .collect();
    p.add_fdb = desired.fdb.difference(&actual.fdb).copied().collect();
    p.del_fdb = actual.fdb.difference(&desired.fdb).copied().collect();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `DST via VIA dev DEV onlink proto 117`, as the VXLAN backend asks for.
    pub(super) fn route(dst: &str, via: &str, dev: u32) -> Route {
        Route::new(dst.parse().unwrap())
            .via(via.parse().unwrap())
            .dev(dev)
            .onlink()
            .protocol(TRELLISD_PROTO)
    }

    /// How the kernel reports a route we added.
    fn as_kernel_has_it(r: &Route) -> Route {
        let mut r = r.clone();
        r.scope = Some(trellis_net::RouteScope::Universe);
        r.metric = r.destination.is_ipv6().then_some(1024);
        r
    }

    /// What one remote node with an IPv4 and an IPv6 CIDR calls for, and its VTEP MAC.
    fn one_remote() -> (Desired, MacAddr) {
        let mac: MacAddr = "02:00:00:00:00:02".parse().unwrap();
        let mut desired = Desired::default();
        for r in [
            route("10.244.2.0/24", "10.244.2.0", 7),
            route("fd00:2::/64", "fd00:2::", 7),
        ] {
            desired.routes.insert(r.destination, r);
        }
        desired.neighbours.insert("10.244.2.0".parse().unwrap(), mac);
        desired.fdb.insert((mac, "192.168.0.12".parse().unwrap()));
        (desired, mac)
    }

    #[test]
    fn only_the_difference_is_planned() {
        let (desired, mac) = one_remote();

        // Nothing there: everything is added.
        let p = plan(&desired, &Actual::default(), false);
        assert_eq!((p.add_routes.len(), p.add_neighbours.len(), p.add_fdb.len()), (2, 1, 1));

        // Everything there (as the kernel reports it): nothing to do.
        let actual = Actual {
            routes: desired.routes.values().map(as_kernel_has_it).collect(),
            neighbours: [("10.244.2.0".parse().unwrap(), Some(mac))].into(),
            fdb: desired.fdb.clone(),
            ..Default::default()
        };
        assert_eq!(plan(&desired, &actual, false), Plan::default());

        // Stale and changed objects: removed, replaced.
        let mut actual = actual;
        actual
            .routes
            .push(as_kernel_has_it(&route("10.244.9.0/24", "10.244.9.0", 7)));
        actual.routes[0] = as_kernel_has_it(&route("10.244.2.0/24", "10.244.2.0", 5));
        let other: MacAddr = "02:00:00:00:00:09".parse().unwrap();
        actual.neighbours.insert("10.244.2.0".parse().unwrap(), Some(other));
        actual.neighbours.insert("10.244.9.0".parse().unwrap(), Some(other));
        actual.fdb = [(mac, "192.168.0.99".parse().unwrap())].into();
        let p = plan(&desired, &actual, false);
        assert_eq!(
            p.add_routes
                .iter()
                .map(|r| r.destination.to_string())
                .collect::<Vec<_>>(),
            ["10.244.2.0/24"]
        );
        assert_eq!(
            p.del_routes
                .iter()
                .map(|r| r.destination.to_string())
                .collect::<Vec<_>>(),
            ["10.244.9.0/24"],
            "the changed route is replaced in place, not deleted"
        );
        assert_eq!(p.add_neighbours, [("10.244.2.0".parse().unwrap(), mac)]);
        assert_eq!(p.del_neighbours, ["10.244.9.0".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.add_fdb, [(mac, "192.168.0.12".parse().unwrap())]);
        assert_eq!(p.del_fdb, [(mac, "192.168.0.99".parse().unwrap())]);
    }

    #[test]
    fn a_route_of_ours_with_another_metric_is_deleted_not_left_beside() {
        let want = route("10.244.2.0/24", "10.244.2.0", 7);
        let mut desired = Desired::default();
        desired.routes.insert(want.destination, want.clone());
        let mut odd = as_kernel_has_it(&route("10.244.2.0/24", "192.168.0.12", 2));
        odd.metric = Some(50);
        let p = plan(
            &desired,
            &Actual {
                routes: vec![odd.clone()],
                ..Default::default()
            },
            false,
        );
        assert_eq!((p.add_routes, p.del_routes), (vec![want], vec![odd]));
    }

    #[test]
    fn routes_move_onto_nexthop_objects_in_place_and_back() {
        let want = route("10.244.2.0/24", "10.244.2.0", 7);
        let mut desired = Desired::default();
        desired.routes.insert(want.destination, want.clone());
        // An earlier daemon (or --no-nexthop-objects) left the plain route.
        let plain = Actual {
            routes: vec![as_kernel_has_it(&want)],
            nexthop_ids: [NEXTHOP_ID_RANGE.start].into(), // someone else's
            ..Default::default()
        };
        let p = plan(&desired, &plain, true);
        let id = NEXTHOP_ID_RANGE.start + 1;
        assert_eq!(p.add_nexthops.iter().map(|n| n.id).collect::<Vec<_>>(), [id]);
        assert_eq!(p.add_routes.len(), 1);
        assert_eq!(p.add_routes[0].nexthop_id, Some(id));
        assert!(p.del_routes.is_empty(), "replaced in place, not deleted and re-added");

        // As the kernel then reports it: the nexthop's gateway, device and flags on the route.
        let mut by_nexthop = as_kernel_has_it(&want);
        by_nexthop.nexthop_id = Some(id);
        let converged = Actual {
            routes: vec![by_nexthop],
            nexthops: p.add_nexthops.clone(),
            nexthop_ids: [NEXTHOP_ID_RANGE.start, id].into(),
            ..Default::default()
        };
        assert_eq!(plan(&desired, &converged, true), Plan::default());

        // Nexthop objects turned off: the plain route replaces it in place, then ours goes.
        let p = plan(&desired, &converged, false);
        assert_eq!((p.add_routes, p.del_routes.len()), (vec![want], 0));
        assert_eq!(p.del_nexthops, [id]);
    }

    /// A run that skips reading the kernel plans against `settled`: it must be what a dump after
    /// the last plan would have shown, or the next run would send changes for nothing.
    #[test]
    fn the_settled_state_needs_no_further_change() {
        let (desired, _) = one_remote();
        let stale = as_kernel_has_it(&route("10.244.9.0/24", "10.244.9.0", 7));
        let leftover = Nexthop::new(NEXTHOP_ID_RANGE.start + 9, trellis_net::IpFamily::V4)
            .dev(7)
            .protocol(TRELLISD_PROTO);
        for nexthop_objects in [true, false] {
            let actual = Actual {
                routes: vec![stale.clone(), as_kernel_has_it(&route("fd00:2::/64", "fd00:2::", 5))],
                nexthops: vec![leftover.clone()],
                nexthop_ids: [leftover.id, 3].into(),
                ..Default::default()
            };
            let program = routes_to_program(&desired, &actual, nexthop_objects);
            let p = plan_routes(&desired, &program, &actual);
            assert_ne!(p, Plan::default());
            let after = settled(&desired, program, actual, &p);
            assert_eq!(
                plan(&desired, &after, nexthop_objects),
                Plan::default(),
                "nexthops: {nexthop_objects}"
            );
            assert!(after.nexthop_ids.contains(&3), "someone else's ID stays taken");
            assert!(!after.nexthop_ids.contains(&leftover.id));
        }
    }

    #[test]
    fn learned_changes_are_the_difference_of_two_sorted_lists() {
        let r = |p: &str, nh: &str| BgpRoute {
            prefix: p.parse().unwrap(),
            next_hop: nh.parse().unwrap(),
        };
        let old = [
            r("10.1.0.0/24", "192.168.0.1"),
            r("10.2.0.0/24", "192.168.0.1"),
            r("10.3.0.0/24", "192.168.0.1"),
        ];
        let new = [
            r("10.0.0.0/24", "192.168.0.2"),
            r("10.2.0.5/24", "192.168.0.2"), // host bits: the same prefix, moved
            r("10.3.0.0/24", "192.168.0.1"),
        ];
        let got = learned_changes(&old, &new).unwrap();
        let want: Vec<(IpNetwork, Option<IpAddr>)> = vec![
            ("10.0.0.0/24".parse().unwrap(), Some("192.168.0.2".parse().unwrap())),
            ("10.1.0.0/24".parse().unwrap(), None),
            ("10.2.0.0/24".parse().unwrap(), Some("192.168.0.2".parse().unwrap())),
        ];
        assert_eq!(got, want);
        assert_eq!(learned_changes(&old, &old).unwrap(), []);
        assert_eq!(learned_changes(&old, &[]).unwrap().len(), 3);
        // Not sorted, or a prefix twice: left to a complete run.
        assert!(learned_changes(&old, &[new[1], new[0]]).is_none());
        assert!(learned_changes(&old, &[new[0], new[0]]).is_none());
    }

    /// main.rs runs the dataplane inside spawned tasks.
    #[test]
    fn the_dataplane_and_its_futures_can_move_between_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        #[allow(unreachable_code, unused_variables, clippy::diverging_sub_expression)]
        let _never_run = || {
            let dp: Dataplane = unimplemented!();
            send_sync(&dp);
            let mut dp = dp;
            send(dp.reconcile(&BTreeMap::new()));
            send(dp.set_own(unimplemented!()));
        };
    }

    #[test]
    fn host_bits_are_cleared_from_lease_cidrs() {
        let l = Lease {
            node: "n".into(),
            underlay_ip: "192.168.0.1".parse().unwrap(),
            pod_cidrs: vec!["10.244.1.5/24".parse().unwrap()],
            backend: BackendData::HostGw,
        };
        assert_eq!(normalized(&l).pod_cidrs[0].to_string(), "10.244.1.0/24");
    }
}
