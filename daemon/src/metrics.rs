//! `/healthz` and `/metrics` (Prometheus text format).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The `reason`s of `trellisd_bgp_password_errors_total`: the file cannot be read, or what it
/// holds is no password (empty, or more than 80 bytes).
pub const PASSWORD_PROBLEMS: [&str; 2] = ["unreadable", "invalid"];

/// What a `/healthz` failure concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// This node's lease is not what the datastore says.
    Lease,
    /// The last reconcile run failed (partly): the kernel does not hold what it should.
    Reconcile,
    /// NetworkPolicy cannot be enforced on this node, or its table cannot be written.
    Policy,
}

/// The daemon's metrics; cheap to clone, shared by every part.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// Leases known (this node's included).
    pub leases: Gauge,
    /// Reconcile runs, and how long each took.
    pub reconcile_runs: Counter,
    pub reconcile_seconds: Histogram,
    /// Kernel objects (routes, neighbours, FDB entries) programmed: added or replaced.
    pub kernel_objects_programmed: Counter,
    /// Kernel objects the reconciler removed.
    pub kernel_objects_removed: Counter,
    /// Datastore operations that failed (connection lost, request refused).
    pub datastore_errors: Counter,
    /// Lease removals held back after a datastore stall (`datastore::holdback`), in all, and
    /// those held now.
    lease_removals_held: Counter,
    /// Datastore failures that are this node's credentials' (`tls`, `auth`).
    datastore_credential_errors: ByReason,
    lease_removals_pending: Gauge,
    /// Leases not believed, by why (`datastore::trust::Refusal::label`).
    leases_refused: ByReason,
    /// Routes the BGP import policy dropped, by why (`bgp::policy::Rejected::label`).
    bgp_routes_dropped: ByReason,
    /// Per configured BGP peer (see [`BgpPeerMetrics`]).
    bgp_peers: BgpPeerFamilies,
    /// Per-peer BGP password files that could not be used on a re-read, by why.
    bgp_password_errors: ByReason,
    policy: PolicyMetrics,
    ready: AtomicBool,
    /// What is wrong now, by what it concerns ([`Problem`]): `/healthz` fails while any is set.
    problems: Mutex<std::collections::BTreeMap<Problem, String>>,
}

type ByReason = Family<[(&'static str, &'static str); 1], Counter>;

/// The `reason`s of `trellisd_policy_dropped_packets_total`: no ingress or no egress policy
/// of the pod allows the connection, the pod is held (new, its rules not written yet), the
/// connection was revoked by a policy change.
pub const POLICY_DROP_REASONS: [&str; 4] = ["ingress", "egress", "held", "revoked"];

/// The `state`s of `trellisd_policy_pods`.
pub const POLICY_POD_STATES: [&str; 4] = ["judged", "held", "isolated_ingress", "isolated_egress"];

/// NetworkPolicy on this node (`policy::enforce`).
#[derive(Clone, Default)]
pub struct PolicyMetrics {
    /// New connections a policy allowed, by `policy` (`namespace/name`) and `direction`.
    pub allowed: Family<[(&'static str, String); 2], Counter>,
    /// Packets dropped, by reason ([`POLICY_DROP_REASONS`]).
    pub dropped: ByReason,
    /// Writes of the policy table that failed.
    pub write_errors: Counter,
    /// Existing connections revoked by a policy change.
    pub flows_revoked: Counter,
    /// This node's pods, by state ([`POLICY_POD_STATES`]).
    pub pods: Family<[(&'static str, &'static str); 1], Gauge>,
}

impl PolicyMetrics {
    fn register(registry: &mut Registry) -> PolicyMetrics {
        let m = PolicyMetrics {
            dropped: by_reason(
                registry,
                "policy_dropped_packets",
                "Packets the NetworkPolicy table dropped: no ingress or egress policy of the pod allows the connection, the pod held until its rules are written, a connection a policy change revoked",
                POLICY_DROP_REASONS.iter().copied(),
            ),
            ..Default::default()
        };
        registry.register(
            "policy_allowed_connections",
            "New connections a NetworkPolicy rule allowed on this node, by policy and direction",
            m.allowed.clone(),
        );
        registry.register(
            "policy_write_errors",
            "Writes of the NetworkPolicy table that failed (retried every second)",
            m.write_errors.clone(),
        );
        registry.register(
            "policy_flows_revoked",
            "Existing connections a NetworkPolicy change denied, cut by marking their conntrack entries",
            m.flows_revoked.clone(),
        );
        for state in POLICY_POD_STATES {
            let _ = m.pods.get_or_create(&[("state", state)]);
        }
        registry.register(
            "policy_pods",
            "This node's pods: judged (their Pod known), held (new, not known yet), isolated for ingress or egress",
            m.pods.clone(),
        );
        m
    }
}

/// The labels of a BGP peer's series: `peer` (its address) and `asn`.
type PeerLabels = [(&'static str, String); 2];

fn peer_labels(peer: IpAddr, asn: u32) -> PeerLabels {
    [("peer", peer.to_string()), ("asn", asn.to_string())]
}

/// The families of the per-peer BGP series, registered once.
struct BgpPeerFamilies {
    state: Family<PeerLabels, Gauge>,
    established: Family<PeerLabels, Gauge>,
    prefixes_received: Family<PeerLabels, Gauge>,
    prefixes_accepted: Family<PeerLabels, Gauge>,
    prefixes_advertised: Family<PeerLabels, Gauge>,
    updates_received: Family<PeerLabels, Counter>,
    updates_sent: Family<PeerLabels, Counter>,
    flaps: Family<PeerLabels, Counter>,
}

impl BgpPeerFamilies {
    fn register(registry: &mut Registry) -> BgpPeerFamilies {
        fn add<M: Default>(registry: &mut Registry, name: &str, help: &str) -> Family<PeerLabels, M>
        where
            Family<PeerLabels, M>: prometheus_client::registry::Metric + Clone,
        {
            let family = Family::<PeerLabels, M>::default();
            registry.register(name, help, family.clone());
            family
        }
        BgpPeerFamilies {
            state: add(
                registry,
                "bgp_peer_state",
                "BGP session state per configured peer, as BGP4-MIB bgpPeerState: 1 idle, 2 connect, 3 active, 4 opensent, 5 openconfirm, 6 established",
            ),
            established: add(
                registry,
                "bgp_peer_established",
                "1 while the session with the configured BGP peer is established, else 0",
            ),
            prefixes_received: add(
                registry,
                "bgp_peer_prefixes_received",
                "Prefixes the BGP peer announces on the current session, before import policy",
            ),
            prefixes_accepted: add(
                registry,
                "bgp_peer_prefixes_accepted",
                "Prefixes of the BGP peer's current session that passed import policy",
            ),
            prefixes_advertised: add(
                registry,
                "bgp_peer_prefixes_advertised",
                "Prefixes advertised to the BGP peer on the current session",
            ),
            updates_received: add(registry, "bgp_peer_updates_received", "BGP UPDATE messages received from the peer"),
            updates_sent: add(registry, "bgp_peer_updates_sent", "BGP UPDATE messages sent to the peer"),
            flaps: add(
                registry,
                "bgp_peer_flaps",
                "Sessions with the BGP peer that went down from Established (not counting de-configuration or re-keying)",
            ),
        }
    }

    fn remove(&self, labels: &PeerLabels) {
        self.state.remove(labels);
        self.established.remove(labels);
        self.prefixes_received.remove(labels);
        self.prefixes_accepted.remove(labels);
        self.prefixes_advertised.remove(labels);
        self.updates_received.remove(labels);
        self.updates_sent.remove(labels);
        self.flaps.remove(labels);
    }
}

/// One configured BGP peer's series (`trellisd_bgp_peer_*{peer, asn}`, README): the registered
/// metrics themselves (shared), so that its task updates them without a lookup. Once the peer is
/// removed ([`Metrics::remove_bgp_peer`]) they are no longer encoded; [`Default`] gives a set
/// that never is.
#[derive(Clone, Debug, Default)]
pub struct BgpPeerMetrics {
    pub state: Gauge,
    pub established: Gauge,
    pub prefixes_received: Gauge,
    pub prefixes_accepted: Gauge,
    pub prefixes_advertised: Gauge,
    pub updates_received: Counter,
    pub updates_sent: Counter,
    pub flaps: Counter,
}

/// A counter per `reason`, registered as `name`; every reason shows from the start (at 0), so
/// that an alert can be written on any.
fn by_reason(registry: &mut Registry, name: &str, help: &str, reasons: impl Iterator<Item = &'static str>) -> ByReason {
    let family = ByReason::default();
    for r in reasons {
        let _ = family.get_or_create(&[("reason", r)]);
    }
    registry.register(name, help, family.clone());
    family
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("trellisd");
        let leases = Gauge::default();
        let reconcile_runs = Counter::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let kernel_objects_programmed = Counter::default();
        let kernel_objects_removed = Counter::default();
        let datastore_errors = Counter::default();
        registry.register("leases", "Node leases known, this node's included", leases.clone());
        registry.register("reconcile_runs", "Reconcile runs", reconcile_runs.clone());
        registry.register(
            "reconcile_seconds",
            "Duration of a reconcile run",
            reconcile_seconds.clone(),
        );
        registry.register(
            "kernel_objects_programmed",
            "Routes, neighbours and FDB entries added or replaced",
            kernel_objects_programmed.clone(),
        );
        registry.register(
            "kernel_objects_removed",
            "Routes, neighbours and FDB entries removed",
            kernel_objects_removed.clone(),
        );
        registry.register(
            "datastore_errors",
            "Datastore operations that failed",
            datastore_errors.clone(),
        );
        let lease_removals_held = Counter::default();
        let lease_removals_pending = Gauge::default();
        registry.register(
            "lease_removals_held",
            "Lease removals held back after a datastore stall, until a fresh listing confirms them",
            lease_removals_held.clone(),
        );
        registry.register(
            "lease_removals_pending",
            "Lease removals held back now (after a datastore stall)",
            lease_removals_pending.clone(),
        );
        let datastore_credential_errors = by_reason(
            &mut registry,
            "datastore_credential_errors",
            "Datastore calls refused over this node's credentials: TLS (CA, client certificate) or authentication",
            crate::datastore::retry::CREDENTIAL_PROBLEMS.iter().copied(),
        );
        let leases_refused = by_reason(
            &mut registry,
            "leases_refused",
            "Leases from the datastore not believed (outside the cluster network, not owned, overlapping, bad endpoint)",
            crate::datastore::trust::Refusal::ALL.iter().map(|r| r.label()),
        );
        let bgp_routes_dropped = by_reason(
            &mut registry,
            "bgp_routes_dropped",
            "Routes from BGP peers the import policy dropped (outside the cluster CIDRs, default route, next hop, AS loop)",
            crate::bgp::policy::Rejected::ALL.iter().map(|r| r.label()),
        );
        let bgp_peers = BgpPeerFamilies::register(&mut registry);
        let bgp_password_errors = by_reason(
            &mut registry,
            "bgp_password_errors",
            "Re-reads of a BGP peer's PasswordFile that failed (the last password read stays in use)",
            PASSWORD_PROBLEMS.iter().copied(),
        );
        let policy = PolicyMetrics::register(&mut registry);
        Metrics {
            inner: Arc::new(Inner {
                policy,
                registry,
                leases,
                reconcile_runs,
                reconcile_seconds,
                kernel_objects_programmed,
                kernel_objects_removed,
                datastore_errors,
                lease_removals_held,
                lease_removals_pending,
                datastore_credential_errors,
                leases_refused,
                bgp_routes_dropped,
                bgp_peers,
                bgp_password_errors,
                ready: AtomicBool::new(false),
                problems: Mutex::new(Default::default()),
            }),
        }
    }

    /// NetworkPolicy's series.
    pub fn policy(&self) -> &PolicyMetrics {
        &self.inner.policy
    }

    pub fn leases(&self) -> &Gauge {
        &self.inner.leases
    }
    pub fn reconcile_runs(&self) -> &Counter {
        &self.inner.reconcile_runs
    }
    pub fn reconcile_seconds(&self) -> &Histogram {
        &self.inner.reconcile_seconds
    }
    pub fn kernel_objects_programmed(&self) -> &Counter {
        &self.inner.kernel_objects_programmed
    }
    pub fn kernel_objects_removed(&self) -> &Counter {
        &self.inner.kernel_objects_removed
    }
    pub fn datastore_errors(&self) -> &Counter {
        &self.inner.datastore_errors
    }
    pub fn lease_removals_held(&self) -> &Counter {
        &self.inner.lease_removals_held
    }
    pub fn lease_removals_pending(&self) -> &Gauge {
        &self.inner.lease_removals_pending
    }
    pub fn datastore_credential_errors(&self, reason: &'static str) -> Counter {
        self.inner
            .datastore_credential_errors
            .get_or_create(&[("reason", reason)])
            .clone()
    }
    pub fn leases_refused(&self, reason: crate::datastore::trust::Refusal) -> Counter {
        self.inner
            .leases_refused
            .get_or_create(&[("reason", reason.label())])
            .clone()
    }

    pub fn bgp_routes_dropped(&self, reason: crate::bgp::policy::Rejected) -> Counter {
        self.inner
            .bgp_routes_dropped
            .get_or_create(&[("reason", reason.label())])
            .clone()
    }

    /// The series of BGP peer `peer` in AS `asn`, created at 0 if new.
    pub fn bgp_peer(&self, peer: IpAddr, asn: u32) -> BgpPeerMetrics {
        let l = peer_labels(peer, asn);
        let f = &self.inner.bgp_peers;
        BgpPeerMetrics {
            state: f.state.get_or_create(&l).clone(),
            established: f.established.get_or_create(&l).clone(),
            prefixes_received: f.prefixes_received.get_or_create(&l).clone(),
            prefixes_accepted: f.prefixes_accepted.get_or_create(&l).clone(),
            prefixes_advertised: f.prefixes_advertised.get_or_create(&l).clone(),
            updates_received: f.updates_received.get_or_create(&l).clone(),
            updates_sent: f.updates_sent.get_or_create(&l).clone(),
            flaps: f.flaps.get_or_create(&l).clone(),
        }
    }

    /// The peer is no longer configured: its series go.
    pub fn remove_bgp_peer(&self, peer: IpAddr, asn: u32) {
        self.inner.bgp_peers.remove(&peer_labels(peer, asn));
    }

    /// A BGP peer's password file could not be used (`reason`: one of [`PASSWORD_PROBLEMS`]).
    pub fn bgp_password_errors(&self, reason: &'static str) -> Counter {
        self.inner
            .bgp_password_errors
            .get_or_create(&[("reason", reason)])
            .clone()
    }

    /// Healthy once the node holds its lease and the first reconcile ran.
    pub fn set_ready(&self) {
        self.inner.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.health().is_ok()
    }

    /// Sets or clears what is wrong with this node's lease.
    pub fn set_lease_problem(&self, problem: Option<String>) {
        self.set_problem(Problem::Lease, problem);
    }

    /// Sets (`Some`) or clears what is wrong with `what`.
    pub fn set_problem(&self, what: Problem, problem: Option<String>) {
        let mut all = self.inner.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(p) => all.insert(what, p),
            None => all.remove(&what),
        };
    }

    /// `Ok` when healthy, else why not (the `/healthz` body).
    pub fn health(&self) -> Result<(), String> {
        {
            let all = self.inner.problems.lock().unwrap_or_else(|e| e.into_inner());
            if !all.is_empty() {
                return Err(all.values().cloned().collect::<Vec<_>>().join("\n"));
            }
        }
        if self.inner.ready.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("waiting for the node lease".into())
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }

    /// Serves `/healthz` (200 once ready, 503 with the reason before and while the lease is in
    /// question) and `/metrics` on `addr` until the process
    /// ends.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<()> {
        use axum::{http::StatusCode, routing::get, Router};
        let health = self.clone();
        let metrics = self.clone();
        let app = Router::new()
            .route(
                "/healthz",
                get(move || {
                    let health = health.health();
                    async move {
                        match health {
                            Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let body = metrics.render();
                    async move { body }
                }),
            );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app).await
    }
}
