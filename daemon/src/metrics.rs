//! `/healthz` and `/metrics` (Prometheus text format).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What a `/healthz` failure concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Problem {
    /// This node's lease is not what the datastore says.
    Lease,
    /// The last reconcile run failed (partly): the kernel does not hold what it should.
    Reconcile,
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
    ready: AtomicBool,
    /// What is wrong now, by what it concerns ([`Problem`]): `/healthz` fails while any is set.
    problems: Mutex<std::collections::BTreeMap<Problem, String>>,
}

type ByReason = Family<[(&'static str, &'static str); 1], Counter>;

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
        Metrics {
            inner: Arc::new(Inner {
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
                ready: AtomicBool::new(false),
                problems: Mutex::new(Default::default()),
            }),
        }
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
