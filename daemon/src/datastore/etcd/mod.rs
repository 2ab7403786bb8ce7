//! The etcd datastore: every node's lease under one key prefix, each node's records attached to
//! an etcd lease (TTL) that the node renews, CIDRs claimed by compare-and-swap.
//!
//! The life of a node (see [`keys`] for the key layout and why a node has two kinds of key):
//! 1. [`EtcdStore::start`] claims the node's pod CIDRs ([`acquire`]): its own CIDRs back if its
//!    records (or a hint) name them and they are free, else a free CIDR per pool. It waits and
//!    retries, logging, while no CIDR is free or etcd is unreachable; it returns only once the
//!    node holds its lease.
//! 2. A task ([`session`]) then renews the etcd lease and turns an etcd watch on the prefix into
//!    [`Event`]s. Each time it (re)connects it first checks that this node's records are still
//!    there (re-creating them with the *same* CIDRs if the etcd lease was lost), then sends a
//!    full [`Event::Snapshot`], then watches from the snapshot's revision. The snapshot matters:
//!    events missed while disconnected are gone (or compacted away), and the receiver must
//!    replace its state rather than patch it.
//! 3. The task ends when the receiver is dropped. The records are not deleted then: they expire
//!    after the TTL, so a daemon that restarts within it finds its records and keeps its CIDRs.

mod acquire;
mod claim;
mod keys;
mod listing;
mod security;
mod session;

pub use security::Security;

use super::retry::{Backoff, FailureLog};
use super::{DatastoreError, Event, NodeInfo};
use crate::config::Pool;
use crate::lease::Lease;
use acquire::Want;
use etcd_client::{Client, ConnectOptions};
use ipnetwork::IpNetwork;
use std::future::Future;
use std::time::Duration;
use tokio::sync::mpsc;

/// Where and how this node keeps its lease in etcd.
#[derive(Clone, Debug)]
pub struct EtcdStore {
    /// Client URLs, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The key prefix of the node records; the CIDR ownership keys live under `<prefix>cidrs/`.
    pub prefix: String,
    /// How long a node's records outlive its last renewal (renewed every third of it).
    pub ttl: Duration,
    /// Pod CIDRs this node used before (e.g. read from its CNI config), tried first.
    pub hint: Vec<IpNetwork>,
    /// This daemon's node ID (`datastore::identity`); `None`: take the name whoever holds it.
    pub identity: Option<String>,
    /// TLS and authentication ([`Security`]).
    pub security: Security,
}

impl EtcdStore {
    pub const DEFAULT_PREFIX: &'static str = "/trellis/leases/";
    pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

    pub fn new(endpoints: Vec<String>) -> EtcdStore {
        EtcdStore {
            endpoints,
            prefix: Self::DEFAULT_PREFIX.into(),
            ttl: Self::DEFAULT_TTL,
            hint: Vec::new(),
            identity: None,
            security: Security::default(),
        }
    }

    pub fn with_security(mut self, security: Security) -> EtcdStore {
        self.security = security;
        self
    }

    pub fn with_identity(mut self, id: impl Into<String>) -> EtcdStore {
        self.identity = Some(id.into());
        self
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> EtcdStore {
        self.prefix = prefix.into();
        self
    }

    pub fn with_ttl(mut self, ttl: Duration) -> EtcdStore {
        self.ttl = ttl;
        self
    }

    pub fn with_hint(mut self, cidrs: Vec<IpNetwork>) -> EtcdStore {
        self.hint = cidrs;
        self
    }

    /// Claims this node's lease (see the module doc), then keeps it alive and sends lease
    /// events until the receiver is dropped.
    pub async fn start(
        self,
        me: NodeInfo,
        pools: Vec<Pool>,
        metrics: crate::metrics::Metrics,
    ) -> Result<(Lease, mpsc::Receiver<Event>), DatastoreError> {
        if me.name.is_empty() || me.name.contains('/') {
            return Err(DatastoreError::Invalid(format!(
                "node name {:?} cannot be an etcd key",
                me.name
            )));
        }
        if pools.is_empty() || self.endpoints.is_empty() || self.ttl < Duration::from_secs(1) {
            return Err(DatastoreError::Invalid(
                "the etcd datastore needs endpoints, at least one pool and a TTL of 1 s or more".into(),
            ));
        }
        let credentials = self.security.load(&self.endpoints).map_err(DatastoreError::Invalid)?;
        let authenticates = credentials.authenticates();
        let mut conn = Conn::new(self.endpoints, self.ttl, credentials);
        // Connecting is lazy unless it authenticates: then it fails only on malformed endpoints,
        // which no retry will fix (an authenticating connect is a call, retried below).
        if !authenticates {
            conn.client()
                .await
                .map_err(|e| DatastoreError::Invalid(e.to_string()))?;
        }
        let keys = keys::Keys::new(&self.prefix);
        let mut backoff = Backoff::default();
        let mut failures = FailureLog::new("etcd: claiming this node's name and pod CIDRs", metrics.clone());
        if let Some(id) = &self.identity {
            loop {
                match claim::check(&mut conn, &keys, &me, id).await {
                    Ok(claim::Name::Ours) => break,
                    Ok(claim::Name::Held(why)) => return Err(DatastoreError::NameHeld(why)),
                    Err(e) => failed(&mut conn, &mut backoff, &mut failures, e).await,
                }
            }
        }
        let (lease, lease_id) = loop {
            let want = Want::Fresh {
                pools: &pools,
                hint: &self.hint,
            };
            match acquire::acquire(&mut conn, &keys, &me, self.identity.as_deref(), want).await {
                Ok(got) => break got,
                // Another node claimed a CIDR between our read and our write: read again, the
                // winner's key now shows and we pick another.
                Err(Error::Raced) => tracing::debug!("etcd: lost a race for a pod CIDR; trying another"),
                Err(Error::Exhausted(what)) => {
                    let wait = backoff.next_delay();
                    tracing::warn!("no free pod CIDR in {what}; retrying in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                }
                Err(e) => failed(&mut conn, &mut backoff, &mut failures, e).await,
            }
        };
        failures.succeeded();
        tracing::info!(
            node = %me.name,
            "etcd: holding pod CIDRs {} (etcd lease {lease_id:x}, TTL {:?})",
            show(&lease.pod_cidrs),
            self.ttl
        );
        let (tx, rx) = mpsc::channel(64);
        let mut session = session::Session::new(conn, keys, me, lease.clone(), lease_id, tx, metrics);
        session.identity = self.identity;
        tokio::spawn(session.run());
        Ok((lease, rx))
    }
}

/// A failed step of the start: counted and logged (once per cause), then a new connection
/// after a backoff.
async fn failed(conn: &mut Conn, backoff: &mut Backoff, failures: &mut FailureLog, e: Error) {
    let wait = backoff.next_delay();
    failures.failed(e.to_string(), wait);
    conn.reset();
    tokio::time::sleep(wait).await;
}

/// "10.244.3.0/24, fd00:244:0:3::/64", for logs.
fn show(cidrs: &[IpNetwork]) -> String {
    cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// What can go wrong between this node and etcd.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Etcd(String),
    #[error("another node claimed the same pod CIDR first")]
    Raced,
    /// The pool, as "network (min..max)".
    #[error("no free pod CIDR in {0}")]
    Exhausted(String),
    #[error("pod CIDR {cidr} is now held by node {owner}")]
    Taken { cidr: IpNetwork, owner: String },
    #[error("this node's etcd lease expired or its records were deleted")]
    LeaseLost,
    /// Someone else wrote this node's record or one of its CIDR's ownership records (what
    /// changed, for the log).
    #[error("{0}")]
    Rewritten(String),
}

impl From<etcd_client::Error> for Error {
    fn from(e: etcd_client::Error) -> Error {
        // etcd_client's error has no `source()`: its transport error's chain (where a TLS
        // failure says which certificate it refused) is walked here.
        use super::retry::chain;
        Error::Etcd(match &e {
            etcd_client::Error::TransportError(t) => format!("transport error: {}", chain(t)),
            etcd_client::Error::GRpcStatus(s) => {
                let mut text = format!("{:?}: {}", s.code(), s.message());
                if let Some(cause) = std::error::Error::source(s).map(chain) {
                    if cause.contains(s.message()) {
                        text = format!("{:?}: {cause}", s.code());
                    } else if !text.contains(&cause) {
                        text = format!("{text}: {cause}");
                    }
                }
                text
            }
            _ => e.to_string(),
        })
    }
}

/// The connection to etcd: a client made afresh after every failure (the client's own
/// reconnection cannot be relied on to notice a restarted server), and a deadline on every call
/// (a request to an unreachable server may otherwise wait for ever).
struct Conn {
    endpoints: Vec<String>,
    ttl: Duration,
    timeout: Duration,
    credentials: security::Credentials,
    client: Option<Client>,
    /// Whether etcd ever answered a call on any connection (see [`Conn::explain`]).
    answered: std::sync::atomic::AtomicBool,
}

impl Conn {
    fn new(endpoints: Vec<String>, ttl: Duration, credentials: security::Credentials) -> Conn {
        // A third of the TTL, so that a slow call still leaves time to renew the lease.
        let timeout = (ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(5));
        Conn {
            endpoints,
            ttl,
            timeout,
            credentials,
            client: None,
            answered: Default::default(),
        }
    }

    async fn client(&mut self) -> Result<Client, Error> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            .with_keep_alive(self.timeout, self.timeout)
            .with_keep_alive_while_idle(true);
        let options = self.credentials.apply(options);
        // Authenticating is a call: it gets the same deadline as any other (but a lazy connect
        // is no answer from etcd).
        let c = match tokio::time::timeout(self.timeout, Client::connect(&self.endpoints, Some(options))).await {
            Ok(r) => r.map_err(|e| self.explain(e.into()))?,
            Err(_) => return Err(Error::Etcd(format!("no answer within {:?}", self.timeout))),
        };
        self.client = Some(c.clone());
        Ok(c)
    }

    fn reset(&mut self) {
        self.client = None;
    }

    /// How long removals are held back after a gap (`session`): long enough for a live node to
    /// get through again, even one still waiting out the longest backoff (5 s) before a call
    /// that may take the whole deadline.
    fn grace(&self) -> Duration {
        Duration::from_secs(5) + self.timeout
    }

    /// `f` with this connection's deadline.
    async fn call<T>(&self, f: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, Error> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => {
                self.answered.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(self.explain(Error::from(e))),
            Err(_) => Err(Error::Etcd(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// A TLS etcd that refuses a client certificate (or the lack of one) closes the connection
    /// right after the handshake, and the client reports whatever it was doing then ("broken
    /// pipe", "connection closed", now and then the alert itself). Before etcd ever answered,
    /// that is said as what it is, in one text, so that it is logged once.
    fn explain(&self, e: Error) -> Error {
        let Error::Etcd(cause) = &e else { return e };
        let closed = ["connection closed", "broken pipe", "connection reset", "fatal alert"];
        if self.answered.load(std::sync::atomic::Ordering::Relaxed)
            || !self.credentials.tls()
            || !closed.iter().any(|w| cause.contains(w))
        {
            return e;
        }
        Error::Etcd(match self.credentials.client_certificate() {
            Some(file) => format!(
                "etcd closed the TLS connection at the handshake: it does not accept this node's client certificate {}",
                file.display()
            ),
            None => "etcd closed the TLS connection at the handshake: it requires a client certificate \
                     (--etcd-certfile, --etcd-keyfile)"
                .into(),
        })
    }
}
