//! Retrying a datastore politely: a capped, jittered backoff and a failure log that says each
//! cause once.
//!
//! Why these numbers: an API server that is down or refusing us (403 after an RBAC mistake) is
//! at its weakest; thousands of nodes retrying in a tight loop keep it down and fill every
//! node's log (a watcher without backoff logged 260,945 lines in a 10 s outage). client-go's
//! reflector backoff (0.8 s doubling to 30 s) is kind to the server but leaves a node blind for
//! up to 30 s after the server is back. We start at 250 ms, double to a cap of 5 s, and draw
//! each delay from [75 %, 100 %] of its step so that nodes restarted together spread out; a
//! success resets it. At 5,000 nodes that is at most 1,000 requests/s at the cap, which a
//! control plane serves from its watch cache (lists use `resourceVersion=0`).

use std::error::Error as StdError;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
    }
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.cap);
        step.mul_f64(0.75 + 0.25 * unit_random())
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A number in [0, 1) that differs between processes and calls (std's hasher keys are random
/// per process); enough to spread retries, no cryptography.
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// An error and every `source()` below it, joined by ": ", leaving out a source whose text the
/// message above already contains (kube's errors repeat their source in their own text). A bare
/// "client error (Connect)" says nothing; its chain says "connection refused" or "invalid
/// peer certificate: UnknownIssuer".
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// The `reason`s of `trellisd_datastore_credential_errors_total`.
pub const CREDENTIAL_PROBLEMS: [&str; 2] = ["tls", "auth"];

/// Whether a failure's cause (its [`chain`]) is this node's credentials: a TLS handshake that
/// failed over a certificate (`tls`), or a user, password or token refused (`auth`).
pub fn credential_problem(cause: &str) -> Option<&'static str> {
    let c = cause.to_ascii_lowercase();
    let tls = ["certificate", "handshake", "unknownissuer", "tls", "alert"];
    let auth = [
        "authentication failed",
        "invalid user id or password",
        "user name is empty",
        "user name not found",
        "invalid auth token",
        "permission denied",
        "unauthenticated",
        "unauthorized",
    ];
    if auth.iter().any(|w| c.contains(w)) {
        Some("auth")
    } else if tls.iter().any(|w| c.contains(w)) {
        Some("tls")
    } else {
        None
    }
}

/// Logs a failing operation without flooding: the first failure and every change of cause at
/// once (with the delay before the next try), the same cause again at most once a minute (with
/// a count), and one line when it works again. Every failure counts in the datastore error
/// metric.
pub struct FailureLog {
    what: &'static str,
    metrics: crate::metrics::Metrics,
    failures: u64,
    since: Option<Instant>,
    cause: String,
    logged: Option<Instant>,
}

/// How often one unchanged cause is logged again.
const REPEAT: Duration = Duration::from_secs(60);

impl FailureLog {
    /// `what` names the operation for the log ("watching Nodes").
    pub fn new(what: &'static str, metrics: crate::metrics::Metrics) -> FailureLog {
        FailureLog {
            what,
            metrics,
            failures: 0,
            since: None,
            cause: String::new(),
            logged: None,
        }
    }

    /// A failure with `cause` (use [`chain`]); the caller waits `retry_in` before trying again.
    pub fn failed(&mut self, cause: String, retry_in: Duration) {
        self.metrics.datastore_errors().inc();
        if let Some(reason) = credential_problem(&cause) {
            self.metrics.datastore_credential_errors(reason).inc();
        }
        self.failures += 1;
        let since = *self.since.get_or_insert_with(Instant::now);
        let changed = cause != self.cause;
        let due = self.logged.is_none_or(|t| t.elapsed() >= REPEAT);
        if changed {
            warn!(
                "{}: {cause}; retrying in {:.1} s (backing off to at most 5 s)",
                self.what,
                retry_in.as_secs_f64()
            );
        } else if due {
            warn!(
                "{}: still failing after {} attempts over {} s: {cause}",
                self.what,
                self.failures,
                since.elapsed().as_secs()
            );
        } else {
            return;
        }
        self.cause = cause;
        self.logged = Some(Instant::now());
    }

    /// A success: one line if it follows failures.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            let secs = self.since.map_or(0.0, |t| t.elapsed().as_secs_f64());
            info!(
                "{}: working again after {} failed attempts over {secs:.1} s",
                self.what, self.failures
            );
        }
        self.failures = 0;
        self.since = None;
        self.cause.clear();
        self.logged = None;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        let steps = [250u64, 500, 1000, 2000, 4000, 5000, 5000, 5000, 5000, 5000];
        for (d, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *d <= step && *d >= step.mul_f64(0.75),
                "{d:?} not within [75%, 100%] of {step:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }

    #[test]
    fn credential_failures_are_told_apart() {
        let tls = "transport error: error trying to connect: invalid peer certificate: UnknownIssuer";
        assert_eq!(credential_problem(tls), Some("tls"));
        let auth = "Unknown: etcdserver: authentication failed, invalid user ID or password";
        assert_eq!(credential_problem(auth), Some("auth"));
        assert_eq!(credential_problem("no answer within 1s"), None);
        assert_eq!(
            credential_problem("transport error: Connection refused (os error 111)"),
            None
        );
    }

    #[test]
    fn chain_names_every_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl StdError for E {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "failed to perform initial object list: client error (Connect)",
            Some(Box::new(E(
                "client error (Connect)",
                Some(Box::new(E(
                    "tcp connect error: Connection refused (os error 111)",
                    None,
                ))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "failed to perform initial object list: client error (Connect): tcp connect error: Connection refused (os error 111)"
        );
    }
}
