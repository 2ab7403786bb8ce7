//! The node's control loop, as a library: every source sends one [`Input`] to one [`Node`],
//! which owns the lease map and the BGP routes and decides when the dataplane runs and how.
//! `main.rs` only parses flags, starts the sources and wires them to the node's channel.
//!
//! ```text
//!  datastore events ──┐
//!  BGP routes/synced ─┤                       ┌─ resync (read the kernel first):
//!  kernel changes ────┼─▶ Input ─▶ Node ──────┤   kernel changes, ticks, retries
//!  ticks, shutdown ───┘                       └─ reconcile (send the difference):
//!                                                 datastore events, BGP updates
//! ```
//!
//! What the loop guarantees, each unit-tested here with tokio's paused clock and a recording
//! [`Plane`] (the kernel one, [`crate::reconcile::Dataplane`], is the only real one):
//! - **Nothing before the datastore's first snapshot.** Until then only this node's lease is
//!   known; a run would remove every route to the other nodes kept from before a restart.
//! - **BGP routes only once the speaker synced** (End-of-RIB from its peers, or its deadline),
//!   so the routes kept across a graceful restart stay until the peers have spoken.
//! - **Bursts batched**: datastore events arriving within 10 ms make one run; kernel
//!   notifications within 2 ms make one (a deleted route is traffic lost: short).
//! - **A failed run is retried** after a second (reading the kernel), until one succeeds.
//! - **Shutdown leaves the dataplane** as it is: pods keep talking through a restart.
//! - This node's own lease always stays as this process holds it; a datastore that says it is
//!   lost ([`Event::Lost`]) ends the loop with that reason.
//! - **No lease is believed unchecked**: what the datastore says passes
//!   [`crate::datastore::trust::admit`] before it becomes desired state; a refused lease is
//!   counted (`trellisd_leases_refused_total{reason}`) and logged once per node and reason
//!   (again at most once a minute while it lasts).

use crate::backend::bgp::BgpRoute;
use crate::bgp::policy::Throttle;
use crate::datastore::trust::{admit, Bounds, Refusal, Refused};
use crate::datastore::Event;
use crate::lease::Lease;
use crate::metrics::Metrics;
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{info, warn};

/// Everything that can make the node act.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A change in the datastore's leases.
    Lease(Event),
    /// The BGP speaker's routes, all of them (a gracefully restarting peer's, flagged stale,
    /// included), and whether it has synced with its peers.
    Routes { routes: Vec<BgpRoute>, synced: bool },
    /// The kernel reported a change that may undo our work.
    KernelChanged,
    /// Time for a periodic resync.
    Tick,
    /// Stop, leaving the dataplane in place.
    Shutdown,
}

/// What the node asks of the dataplane. `routes`: BGP's routes once it has synced (`None`:
/// not BGP, or not yet: keep what the kernel has).
pub trait Plane {
    /// Make the kernel hold what `leases` (and `routes`) call for; `read_kernel`: read what it
    /// holds first rather than trusting the last run.
    fn run(
        &mut self,
        leases: &BTreeMap<String, Lease>,
        routes: Option<&[BgpRoute]>,
        read_kernel: bool,
    ) -> impl Future<Output = Result<(), String>>;

    /// The leases changed: BGP's peer set may follow them (nothing to do for other backends).
    fn leases_changed(&mut self, _leases: &BTreeMap<String, Lease>) {}

    /// The last run succeeded (`None`) or failed (why).
    fn health(&mut self, _problem: Option<&str>) {}
}

/// How long the loop waits for more of a burst before acting.
pub const LEASE_BATCH: Duration = Duration::from_millis(10);
pub const KERNEL_DEBOUNCE: Duration = Duration::from_millis(2);
/// How soon a failed run is retried.
pub const RETRY: Duration = Duration::from_secs(1);
/// How often the same failure is logged again while it lasts.
const REPEAT_LOG: Duration = Duration::from_secs(60);

/// The node; see the module docs.
pub struct Node<P: Plane> {
    plane: P,
    own: Lease,
    /// The leases admitted ([`Trust`]): what the dataplane is given.
    leases: BTreeMap<String, Lease>,
    /// What the datastore says: every lease, and its ownership records if it keeps any.
    said: BTreeMap<String, Lease>,
    owners: Option<BTreeMap<IpNetwork, String>>,
    trust: Trust,
    have_snapshot: bool,
    /// BGP mode: the latest routes and whether the speaker synced; `None` for other backends.
    bgp: Option<(Vec<BgpRoute>, bool)>,
}

/// What a run must do, accumulated from the inputs of one batch.
#[derive(Default)]
struct Pending {
    run: bool,
    read_kernel: bool,
    leases_changed: bool,
}

impl<P: Plane> Node<P> {
    /// A node holding `own`; `bgp`: whether routes come from a BGP speaker; leases are checked
    /// against `bounds`, and refusals counted in `metrics`.
    pub fn new(plane: P, own: Lease, bgp: bool, bounds: Bounds, metrics: Metrics) -> Node<P> {
        let mut leases = BTreeMap::new();
        leases.insert(own.node.clone(), own.clone());
        Node {
            plane,
            own,
            leases,
            said: BTreeMap::new(),
            owners: None,
            trust: Trust {
                bounds,
                metrics,
                refused: BTreeMap::new(),
                throttles: BTreeMap::new(),
            },
            have_snapshot: false,
            bgp: bgp.then(|| (Vec::new(), false)),
        }
    }

    pub fn plane(&self) -> &P {
        &self.plane
    }

    /// Runs until [`Input::Shutdown`], the inputs end, or the datastore says this node's lease
    /// is lost (`Err` with the reason).
    pub async fn run(mut self, mut inputs: mpsc::Receiver<Input>) -> Result<P, String> {
        let mut retry_at: Option<Instant> = None;
        // The last failure logged and when: a run failing every second for the same reason is
        // logged again once a minute, not every second.
        let mut logged: Option<(String, Instant)> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(t) => sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let mut pending = Pending::default();
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { return Ok(self.plane) };
                    let wait = match &input {
                        Input::Lease(_) => LEASE_BATCH,
                        Input::KernelChanged => KERNEL_DEBOUNCE,
                        _ => Duration::ZERO,
                    };
                    if self.take(input, &mut pending)? {
                        return Ok(self.plane);
                    }
                    // Take the rest of a burst: everything queued, and what arrives meanwhile.
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    while let Ok(input) = inputs.try_recv() {
                        if self.take(input, &mut pending)? {
                            return Ok(self.plane);
                        }
                    }
                }
                _ = retry => {
                    pending.run = true;
                    pending.read_kernel = true;
                }
            }
            if !pending.run || !self.have_snapshot {
                continue;
            }
            if pending.leases_changed {
                let verdict = admit(
                    &self.said,
                    self.owners.as_ref(),
                    &self.own,
                    &self.leases,
                    &self.trust.bounds,
                );
                self.leases = verdict.admitted;
                self.trust.report(verdict.refused, &self.said);
                self.plane.leases_changed(&self.leases);
            }
            let routes = match &self.bgp {
                Some((routes, true)) => Some(routes.as_slice()),
                _ => None,
            };
            match self.plane.run(&self.leases, routes, pending.read_kernel).await {
                Ok(()) => {
                    if logged.take().is_some() {
                        info!("reconcile succeeded again");
                    }
                    retry_at = None;
                    self.plane.health(None);
                }
                Err(e) => {
                    let repeat = logged
                        .as_ref()
                        .is_some_and(|(last, at)| *last == e && at.elapsed() < REPEAT_LOG);
                    if !repeat {
                        warn!("reconcile failed, retrying every {} s: {e}", RETRY.as_secs());
                        logged = Some((e.clone(), Instant::now()));
                    }
                    self.plane.health(Some(&e));
                    retry_at = Some(Instant::now() + RETRY);
                }
            }
        }
    }

    /// Applies one input to the node's state and to what the next run must do; `Ok(true)`:
    /// shut down.
    fn take(&mut self, input: Input, pending: &mut Pending) -> Result<bool, String> {
        match input {
            Input::Lease(ev) => {
                self.have_snapshot = true;
                self.apply(ev)?;
                pending.run = true;
                pending.leases_changed = true;
            }
            Input::Routes { routes, synced } => {
                if let Some(bgp) = &mut self.bgp {
                    if synced && !bgp.1 {
                        info!(
                            routes = routes.len(),
                            "bgp: the speaker synced; its routes are the desired state from now on"
                        );
                    }
                    *bgp = (routes, synced || bgp.1);
                    pending.run |= bgp.1;
                }
            }
            Input::KernelChanged | Input::Tick => {
                pending.run = true;
                pending.read_kernel = true;
            }
            Input::Shutdown => {
                info!("exiting; the dataplane stays in place so pods keep talking");
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A datastore event, into what the datastore says (admitted before the next run).
    fn apply(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Snapshot(all) => {
                self.said.clear();
                self.said.extend(all.into_iter().map(|l| (l.node.clone(), l)));
            }
            Event::Upsert(l) => {
                self.said.insert(l.node.clone(), l);
            }
            Event::Remove(node) => {
                if self.said.remove(&node).is_some() {
                    info!(node, "node left");
                }
            }
            Event::Owners(all) => self.owners = Some(all),
            Event::Owner { cidr, node } => {
                let owners = self.owners.get_or_insert_with(BTreeMap::new);
                match node {
                    Some(n) => owners.insert(cidr, n),
                    None => owners.remove(&cidr),
                };
            }
            Event::Lost(why) => return Err(why),
        }
        Ok(())
    }
}

/// How long one node's refusal for one reason stays quiet in the log after it was logged.
const REFUSAL_LOG: Duration = Duration::from_secs(60);

/// Lease admission's bounds, and the report of what it refused.
struct Trust {
    bounds: Bounds,
    metrics: Metrics,
    /// The last run's refusals: a refusal counts once, when it is new.
    refused: BTreeMap<String, Refused>,
    throttles: BTreeMap<(String, Refusal), Throttle>,
}

impl Trust {
    /// Counts and logs the refusals that are new since the last run (the same lease refused for
    /// the same reason again is neither); one log line per node and reason a minute at most,
    /// however often the lease is rewritten.
    fn report(&mut self, refused: BTreeMap<String, Refused>, said: &BTreeMap<String, Lease>) {
        let now = Instant::now();
        for (node, r) in &refused {
            if self.refused.get(node) == Some(r) {
                continue;
            }
            self.metrics.leases_refused(r.reason).inc();
            let throttle = self
                .throttles
                .entry((node.clone(), r.reason))
                .or_insert_with(|| Throttle::new(REFUSAL_LOG));
            if let Some(held_back) = throttle.allow(now) {
                let also = if held_back > 0 {
                    format!(" ({held_back} more such leases refused since the last line)")
                } else {
                    String::new()
                };
                warn!(
                    node,
                    reason = r.reason.label(),
                    "refusing node {node}'s lease: {}{also}",
                    r.detail
                );
            }
        }
        // Nodes gone from the datastore take their log state with them.
        self.throttles.retain(|(node, _), _| said.contains_key(node));
        self.refused = refused;
    }
}

/// The real [`Plane`]: the kernel dataplane, and the BGP speaker's peer set.
pub struct KernelPlane {
    pub dataplane: crate::reconcile::Dataplane,
    pub metrics: crate::metrics::Metrics,
    pub bgp: Option<BgpPeers>,
}

/// What the BGP speaker's peer set is computed from (the backend config and the leases).
pub struct BgpPeers {
    pub speaker: crate::bgp::Speaker,
    pub backend: crate::config::Backend,
    pub node: String,
    pub underlay_ip: std::net::IpAddr,
    /// This node's route-reflector cluster ID (`--bgp-route-reflector-cluster-id`).
    pub rr_cluster_id: Option<std::net::Ipv4Addr>,
    /// The peers last given to the speaker.
    pub current: Option<Vec<crate::backend::bgp::Peer>>,
    /// The configured peers' own passwords, re-read on every peer-set change and resync.
    pub passwords: crate::passwords::PeerPasswords,
}

impl BgpPeers {
    /// Re-reads the peers' password files; the speaker learns of a change (and of them all the
    /// first time, before its first peers).
    fn refresh_passwords(&mut self) {
        if self.passwords.refresh() {
            self.speaker.set_passwords(self.passwords.current());
        }
    }
}

impl Plane for KernelPlane {
    async fn run(
        &mut self,
        leases: &BTreeMap<String, Lease>,
        routes: Option<&[BgpRoute]>,
        read_kernel: bool,
    ) -> Result<(), String> {
        if let (true, Some(b)) = (read_kernel, &mut self.bgp) {
            b.refresh_passwords();
        }
        let sources = crate::reconcile::Sources {
            leases,
            learned: routes,
        };
        let result = if read_kernel {
            self.dataplane.resync(sources).await
        } else {
            self.dataplane.reconcile(sources).await
        };
        result.map(|_| ()).map_err(|e| e.to_string())
    }

    fn leases_changed(&mut self, leases: &BTreeMap<String, Lease>) {
        let Some(b) = &mut self.bgp else { return };
        b.refresh_passwords();
        let peers = crate::backend::bgp::peers(&b.backend, &b.node, b.underlay_ip, b.rr_cluster_id, leases);
        if b.current.as_ref() != Some(&peers) {
            b.speaker.set_peers(
                peers
                    .iter()
                    .map(|p| crate::bgp::PeerConfig {
                        addr: p.addr,
                        asn: p.asn,
                        rr_client: p.rr_client,
                    })
                    .collect(),
            );
            b.current = Some(peers);
        }
    }

    fn health(&mut self, problem: Option<&str>) {
        use crate::metrics::Problem;
        match problem {
            None => {
                self.metrics.set_problem(Problem::Reconcile, None);
                self.metrics.set_ready();
            }
            Some(p) => self
                .metrics
                .set_problem(Problem::Reconcile, Some(format!("the last reconcile failed: {p}"))),
        }
    }
}

/// Forwards the BGP speaker's routes (and whether it synced) to the node as [`Input::Routes`]
/// whenever either changes, until the node stops listening.
pub async fn forward_bgp_routes(
    mut rib: tokio::sync::watch::Receiver<crate::bgp::Routes>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    tx: mpsc::Sender<Input>,
) {
    loop {
        let routes = rib
            .borrow_and_update()
            .values()
            .map(|r| BgpRoute {
                prefix: r.prefix,
                next_hop: r.next_hop,
            })
            .collect();
        let is_synced = *synced.borrow_and_update();
        if tx
            .send(Input::Routes {
                routes,
                synced: is_synced,
            })
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            r = rib.changed() => if r.is_err() { return },
            r = synced.changed() => if r.is_err() { return },
        }
    }
}

/// Forwards the datastore's events to the node as [`Input::Lease`].
pub async fn forward_leases(mut events: mpsc::Receiver<Event>, tx: mpsc::Sender<Input>) {
    while let Some(ev) = events.recv().await {
        if tx.send(Input::Lease(ev)).await.is_err() {
            return;
        }
    }
    warn!("the datastore stopped");
    let _ = tx.send(Input::Shutdown).await;
}

/// Forwards the kernel watch's wake-ups, periodic ticks and SIGTERM / Ctrl-C to the node.
pub async fn forward_kernel_ticks_and_signals(
    mut kernel: mpsc::Receiver<()>,
    resync: Duration,
    tx: mpsc::Sender<Input>,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(resync);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    loop {
        let input = tokio::select! {
            Some(()) = kernel.recv() => Input::KernelChanged,
            _ = tick.tick() => Input::Tick,
            _ = sigterm.recv() => Input::Shutdown,
            _ = tokio::signal::ctrl_c() => Input::Shutdown,
        };
        let last = input == Input::Shutdown;
        if tx.send(input).await.is_err() || last {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::BackendData;

    /// One call of [`Plane::run`]: the nodes it saw, the routes, whether it read the kernel, and
    /// when (paused clock, from the test's start).
    #[derive(Debug, Clone, PartialEq)]
    struct Call {
        nodes: Vec<String>,
        routes: Option<usize>,
        read_kernel: bool,
        at: Duration,
    }

    struct Recording {
        start: Instant,
        calls: Vec<Call>,
        /// Runs that fail, counted from the first.
        failures: usize,
        peer_updates: usize,
        problems: Vec<Option<String>>,
    }

    impl Plane for Recording {
        async fn run(
            &mut self,
            leases: &BTreeMap<String, Lease>,
            routes: Option<&[BgpRoute]>,
            read_kernel: bool,
        ) -> Result<(), String> {
            self.calls.push(Call {
                nodes: leases.keys().cloned().collect(),
                routes: routes.map(<[BgpRoute]>::len),
                read_kernel,
                at: self.start.elapsed(),
            });
            if self.failures > 0 {
                self.failures -= 1;
                return Err("a route was refused".into());
            }
            Ok(())
        }

        fn leases_changed(&mut self, _: &BTreeMap<String, Lease>) {
            self.peer_updates += 1;
        }

        fn health(&mut self, problem: Option<&str>) {
            self.problems.push(problem.map(String::from));
        }
    }

    fn lease(node: &str, i: u8) -> Lease {
        Lease {
            node: node.into(),
            underlay_ip: format!("192.168.1.{i}").parse().unwrap(),
            pod_cidrs: vec![format!("10.244.{i}.0/24").parse().unwrap()],
            backend: BackendData::HostGw,
        }
    }

    fn bounds() -> Bounds {
        Bounds {
            cluster: vec!["10.244.0.0/16".parse().unwrap()],
            underlay: "192.168.1.1/24".parse().unwrap(),
        }
    }

    fn route(i: u8) -> BgpRoute {
        BgpRoute {
            prefix: format!("10.244.{i}.0/24").parse().unwrap(),
            next_hop: format!("192.168.1.{i}").parse().unwrap(),
        }
    }

    type Running = (mpsc::Sender<Input>, tokio::task::JoinHandle<Result<Recording, String>>);

    /// Starts a node (bgp or not) with a recording plane whose first `failures` runs fail.
    fn start(bgp: bool, failures: usize) -> Running {
        start_with(bgp, failures, Metrics::new())
    }

    fn start_with(bgp: bool, failures: usize, metrics: Metrics) -> Running {
        let plane = Recording {
            start: Instant::now(),
            calls: Vec::new(),
            failures,
            peer_updates: 0,
            problems: Vec::new(),
        };
        let (tx, rx) = mpsc::channel(64);
        let node = Node::new(plane, lease("me", 1), bgp, bounds(), metrics);
        (tx, tokio::spawn(node.run(rx)))
    }

    async fn stop(tx: mpsc::Sender<Input>, h: tokio::task::JoinHandle<Result<Recording, String>>) -> Recording {
        tx.send(Input::Shutdown).await.unwrap();
        h.await.unwrap().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_runs_before_the_first_snapshot() {
        let (tx, h) = start(false, 0);
        tx.send(Input::KernelChanged).await.unwrap();
        tx.send(Input::Tick).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(Input::Lease(Event::Snapshot(vec![lease("a", 2)])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = stop(tx, h).await;
        assert_eq!(rec.calls.len(), 1, "{:?}", rec.calls);
        assert_eq!(rec.calls[0].nodes, ["a", "me"], "our own lease is always there");
        assert!(!rec.calls[0].read_kernel, "a datastore event sends the difference");
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_lease_events_makes_one_run_and_kernel_changes_one_resync() {
        let (tx, h) = start(false, 0);
        tx.send(Input::Lease(Event::Snapshot(vec![]))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 2..12 {
            tx.send(Input::Lease(Event::Upsert(lease(&format!("n{i:02}"), i))))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(0)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..5 {
            tx.send(Input::KernelChanged).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let rec = stop(tx, h).await;
        assert_eq!(rec.calls.len(), 3, "{:?}", rec.calls);
        assert_eq!(rec.calls[1].nodes.len(), 11, "ten upserts in one run");
        assert!(!rec.calls[1].read_kernel);
        assert!(rec.calls[2].read_kernel, "kernel changes read the kernel");
        assert_eq!(rec.peer_updates, 2, "peers follow lease changes, not kernel changes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_run_is_retried_after_a_second_reading_the_kernel() {
        let (tx, h) = start(false, 2);
        tx.send(Input::Lease(Event::Snapshot(vec![lease("a", 2)])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let rec = stop(tx, h).await;
        assert_eq!(rec.calls.len(), 3, "two failures, then success: {:?}", rec.calls);
        assert!(rec.calls[1].read_kernel && rec.calls[2].read_kernel);
        let gap = rec.calls[2].at - rec.calls[1].at;
        assert_eq!(gap, RETRY, "{:?}", rec.calls);
        assert_eq!(
            rec.problems,
            [
                Some("a route was refused".into()),
                Some("a route was refused".into()),
                None
            ]
        );
    }

    /// Sends the speaker's routes and lets the node act on them.
    async fn routes(tx: &mpsc::Sender<Input>, routes: Vec<BgpRoute>, synced: bool) {
        tx.send(Input::Routes { routes, synced }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn bgp_routes_wait_for_the_speaker_to_sync() {
        let (tx, h) = start(true, 0);
        tx.send(Input::Lease(Event::Snapshot(vec![]))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Routes before sync: kept back (the kernel keeps what it had).
        routes(&tx, vec![route(2)], false).await;
        routes(&tx, vec![route(2), route(3)], true).await;
        // Once synced, a later update (even one saying unsynced) goes through.
        routes(&tx, vec![route(2)], false).await;
        let rec = stop(tx, h).await;
        let routes: Vec<Option<usize>> = rec.calls.iter().map(|c| c.routes).collect();
        assert_eq!(routes, [None, Some(2), Some(1)], "{:?}", rec.calls);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_loop_and_a_lost_lease_ends_it_with_the_reason() {
        let (tx, h) = start(false, 0);
        let rec = stop(tx, h).await;
        assert!(rec.calls.is_empty(), "shutdown touches nothing");

        let (tx, h) = start(false, 0);
        tx.send(Input::Lease(Event::Lost("another pod CIDR".into())))
            .await
            .unwrap();
        assert_eq!(h.await.unwrap().err().as_deref(), Some("another pod CIDR"));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn lying_leases_never_reach_the_plane_and_each_counts_once() {
        let metrics = Metrics::new();
        let (tx, h) = start_with(false, 0, metrics.clone());
        let mut wide = lease("wide", 3);
        wide.pod_cidrs = vec!["8.0.0.0/5".parse().unwrap()];
        let mut half = lease("half", 4);
        half.pod_cidrs = vec!["10.244.1.128/25".parse().unwrap()];
        let thief = lease("thief", 2);
        // The records say half owns what it claims: it is refused for the overlap alone.
        let owners: BTreeMap<IpNetwork, String> = [("10.244.2.0/24", "a"), ("10.244.1.128/25", "half")]
            .into_iter()
            .map(|(c, n)| (c.parse().unwrap(), n.to_string()))
            .collect();
        tx.send(Input::Lease(Event::Snapshot(vec![lease("a", 2), wide, half.clone()])))
            .await
            .unwrap();
        tx.send(Input::Lease(Event::Owners(owners))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The same lie, again and again: counted once.
        for _ in 0..5 {
            tx.send(Input::Lease(Event::Upsert(thief.clone()))).await.unwrap();
            tx.send(Input::Lease(Event::Upsert(half.clone()))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let rec = stop(tx, h).await;
        assert!(rec.calls.len() >= 2, "{:?}", rec.calls);
        for c in &rec.calls {
            assert_eq!(c.nodes, ["a", "me"], "a lie reached the plane: {:?}", rec.calls);
        }
        let count = |r| metrics.leases_refused(r).get();
        assert_eq!(count(Refusal::OutsideCluster), 1);
        assert_eq!(count(Refusal::OverlapsOwn), 1);
        assert_eq!(count(Refusal::NotOwner), 1, "the thief's CIDR is a's");
        assert!(metrics
            .render()
            .contains("trellisd_leases_refused_total{reason=\"not_owner\"} 1"));
    }
}
