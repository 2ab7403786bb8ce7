//! After the claim: renew the etcd lease, watch the prefix, and start over (new connection,
//! records checked, fresh snapshot) whenever anything goes wrong.
//!
//! After such a gap, removals are held back for a grace period ([`Holdback`]): a hung etcd
//! that resumes expires every lease at once, the live nodes' included, and they are back within
//! a second. And the reconnection itself does not wait out a backoff that a hung call already
//! spent: attempts are spaced by the backoff from their *start*, so a node whose call timed out
//! against a hung etcd tries again at once, and always has a call waiting for etcd's answer.

use super::acquire::{acquire, Want};
use super::keys::{decode_lease, Key, Keys};
use super::listing::Listing;
use super::{Conn, Error, Event, NodeInfo};
use crate::bgp::policy::Throttle;
use crate::datastore::holdback::Holdback;
use crate::datastore::retry::{Backoff, FailureLog};
use crate::lease::Lease;
use crate::metrics::Metrics;
use etcd_client::{EventType, WatchOptions};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

pub(super) struct Session {
    conn: Conn,
    keys: Keys,
    me: NodeInfo,
    /// The record this node published; the daemon uses its CIDRs, so they never change here.
    lease: Lease,
    lease_id: i64,
    tx: mpsc::Sender<Event>,
    /// Events not yet taken by the receiver. Queued rather than sent inline so that a slow
    /// receiver never delays a lease renewal.
    queue: VecDeque<Event>,
    metrics: Metrics,
    /// Someone rewrote this node's records: restore them whoever they name now. Set until the
    /// restore succeeds.
    restore: bool,
    /// When they were last rewritten (`/healthz` fails until a TTL passes without another), and
    /// the log's rate limit for it.
    rewritten: Option<Instant>,
    rewrites_logged: Throttle,
    /// This daemon's node ID, written into its record.
    pub identity: Option<String>,
    claims_logged: Throttle,
    /// Removals held back after a gap, and what the receiver was told ([`Holdback`]).
    holdback: Holdback,
    /// A connection failed since the last snapshot: the next one opens a grace period.
    gap: bool,
    /// The revision of the last snapshot: watch events at or before it are already in it.
    snapshot_rev: i64,
    held_logged: Throttle,
    failures: FailureLog,
}

/// How a connection ended.
enum End {
    /// The receiver is gone: stop.
    Stopped,
    Failed(Error),
}

impl From<Error> for End {
    fn from(e: Error) -> End {
        End::Failed(e)
    }
}

impl From<etcd_client::Error> for End {
    fn from(e: etcd_client::Error) -> End {
        End::Failed(e.into())
    }
}

impl Session {
    pub fn new(
        conn: Conn,
        keys: Keys,
        me: NodeInfo,
        lease: Lease,
        lease_id: i64,
        tx: mpsc::Sender<Event>,
        metrics: Metrics,
    ) -> Session {
        Session {
            conn,
            keys,
            me,
            lease,
            lease_id,
            tx,
            queue: VecDeque::new(),
            restore: false,
            rewritten: None,
            rewrites_logged: Throttle::new(Duration::from_secs(60)),
            identity: None,
            claims_logged: Throttle::new(Duration::from_secs(60)),
            holdback: Holdback::default(),
            gap: false,
            snapshot_rev: 0,
            held_logged: Throttle::new(Duration::from_secs(60)),
            failures: FailureLog::new(
                "etcd: renewing this node's lease and watching the others",
                metrics.clone(),
            ),
            metrics,
        }
    }

    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            let attempt = Instant::now();
            let e = match self.connected(&mut backoff).await {
                Ok(never) => match never {},
                Err(End::Stopped) => return,
                Err(End::Failed(e)) => e,
            };
            self.gap = true;
            let wait = if let Error::LeaseLost = e {
                // etcd answers: re-create the records at once, the other nodes already see
                // this node gone.
                self.metrics.datastore_errors().inc();
                tracing::warn!("etcd: {e}");
                Duration::ZERO
            } else if let Error::Rewritten(what) = &e {
                // A second daemon with this node's name, or anyone holding etcd's credentials:
                // the records are put back at once, and /healthz says so for a TTL.
                let now = Instant::now();
                if let Some(held_back) = self.rewrites_logged.allow(now) {
                    tracing::warn!("etcd: {what}; restoring it ({held_back} more rewrites since the last line)");
                }
                self.metrics.datastore_errors().inc();
                let problem = format!("this node's etcd records were rewritten by someone else: {what}");
                self.metrics.set_lease_problem(Some(problem));
                (self.restore, self.rewritten) = (true, Some(now));
                Duration::ZERO
            } else {
                self.conn.reset();
                // Spaced from the attempt's start: a call that waited out its deadline on a
                // hung etcd has waited already, and the next one should be there when it wakes.
                let wait = backoff.next_delay().saturating_sub(attempt.elapsed());
                self.failures.failed(e.to_string(), wait);
                wait
            };
            // Meanwhile, hand over what was received before the failure, and stop if the
            // receiver goes away.
            if tokio::time::timeout(wait, self.flush_until_closed()).await.is_ok() {
                return;
            }
        }
    }

    /// Sends every queued event, then waits; returns once the receiver is gone.
    async fn flush_until_closed(&mut self) {
        while !self.queue.is_empty() {
            // Reserve, then pop: cancelled while waiting for room, the event stays queued.
            match self.tx.reserve().await {
                Ok(permit) => permit.send(self.queue.pop_front().expect("not empty")),
                Err(_) => return,
            }
        }
        self.tx.closed().await
    }

    /// One connection: check our records (re-create them if lost), snapshot, then renew and
    /// watch until something fails.
    async fn connected(&mut self, backoff: &mut Backoff) -> Result<Infallible, End> {
        let mut listing = Listing::read(&mut self.conn, &self.keys).await?;
        if !listing.holds(&self.lease, self.lease_id) {
            // The etcd lease expired (etcd unreachable for longer than the TTL) or someone
            // deleted our keys. Claim the very same CIDRs again: pods already use them.
            let cidrs = &self.lease.pod_cidrs;
            let want = if self.restore {
                Want::Restore(cidrs)
            } else {
                tracing::warn!(
                    "etcd: this node's records are gone; re-creating them with {}",
                    super::show(cidrs)
                );
                Want::Exact(cidrs)
            };
            match acquire(&mut self.conn, &self.keys, &self.me, self.identity.as_deref(), want).await {
                Ok((_, id)) => (self.lease_id, self.restore) = (id, false),
                Err(e @ Error::Taken { .. }) => {
                    tracing::error!("etcd: {e}; this node keeps using it, restart trellisd to get a new one");
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
            listing = Listing::read(&mut self.conn, &self.keys).await?;
        }
        if std::mem::take(&mut self.gap) {
            self.holdback.open(Instant::now() + self.conn.grace());
        }
        self.snapshot(listing);
        backoff.reset();
        self.failures.succeeded();
        self.renew_and_watch(self.snapshot_rev).await
    }

    /// Queues `listing` as a snapshot and the ownership records (through the hold-back).
    fn snapshot(&mut self, listing: Listing) {
        // The receiver replaces its state with the snapshot, so anything still queued is moot.
        self.queue.clear();
        self.snapshot_rev = listing.revision;
        let owners = listing.cidrs.into_iter().map(|(c, o)| (c, o.node)).collect();
        self.send(Event::Snapshot(listing.leases));
        self.send(Event::Owners(owners));
    }

    /// Queues `ev` unless the hold-back keeps it; counts and logs removals it starts holding.
    fn send(&mut self, ev: Event) {
        let before = self.holdback.held();
        self.queue.extend(self.holdback.pass(ev));
        let held = self.holdback.held();
        self.metrics.lease_removals_pending().set(held as i64);
        if held <= before {
            return;
        }
        self.metrics.lease_removals_held().inc_by((held - before) as u64);
        if let Some(more) = self.held_logged.allow(Instant::now()) {
            let left = self.holdback.due().map_or(0.0, |t| (t - Instant::now()).as_secs_f64());
            tracing::warn!(
                "etcd: holding back {held} lease removals after a datastore stall (a bulk expiry is no proof that nodes died); \
                 checking them against a fresh listing in {left:.1} s ({more} more such lines held back)"
            );
        }
    }

    /// The grace period ended: a fresh listing says who is gone.
    async fn recheck(&mut self) -> Result<(), Error> {
        let held = self.holdback.close();
        self.metrics.lease_removals_pending().set(0);
        if held.is_empty() {
            return Ok(());
        }
        let listing = Listing::read(&mut self.conn, &self.keys).await?;
        let gone: Vec<&String> = held
            .iter()
            .filter(|n| !listing.leases.iter().any(|l| &l.node == *n))
            .collect();
        tracing::info!(
            "etcd: after the datastore stall, {} of {} held-back nodes re-registered; removing the others: {gone:?}",
            held.len() - gone.len(),
            held.len()
        );
        self.snapshot(listing);
        Ok(())
    }

    async fn renew_and_watch(&mut self, revision: i64) -> Result<Infallible, End> {
        let mut client = self.conn.client().await?;
        let (mut keeper, mut renewals) = self.conn.call(client.lease_keep_alive(self.lease_id)).await?;
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let (_watcher, mut watch) = self.conn.call(client.watch(self.keys.prefix(), Some(options))).await?;
        let period = self.conn.ttl / 3;
        let mut tick = interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        // A handle of its own: the branches below borrow it while their handlers change `self`.
        let tx = self.tx.clone();
        loop {
            let due = self.holdback.due();
            tokio::select! {
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.recheck().await?;
                }
                _ = tick.tick() => {
                    // Two renewals unanswered: the connection is dead even if no error says so.
                    if renewed.elapsed() > self.conn.ttl / 2 {
                        return Err(Error::Etcd("lease renewals unanswered".into()).into());
                    }
                    if self.rewritten.is_some_and(|t| t.elapsed() > self.conn.ttl) {
                        self.rewritten = None;
                        self.metrics.set_lease_problem(None);
                    }
                    keeper.keep_alive().await?;
                }
                r = renewals.message() => match r? {
                    Some(r) if r.ttl() > 0 => renewed = Instant::now(),
                    Some(_) => return Err(Error::LeaseLost.into()),
                    None => return Err(Error::Etcd("lease renewal stream closed".into()).into()),
                },
                r = watch.message() => {
                    let resp = r?.ok_or_else(|| Error::Etcd("watch stream closed".into()))?;
                    if resp.canceled() {
                        let why = format!("watch canceled ({}; compacted at {})", resp.cancel_reason(), resp.compact_revision());
                        return Err(Error::Etcd(why).into());
                    }
                    for ev in resp.events() {
                        self.on_event(ev)?;
                    }
                }
                permit = tx.reserve(), if !self.queue.is_empty() => match permit {
                    Ok(p) => p.send(self.queue.pop_front().expect("not empty")),
                    Err(_) => return Err(End::Stopped),
                },
                _ = tx.closed(), if self.queue.is_empty() => return Err(End::Stopped),
            }
        }
    }

    /// Queues the event for a node record; fails when it shows our own records gone.
    fn on_event(&mut self, ev: &etcd_client::Event) -> Result<(), Error> {
        let Some(kv) = ev.kv() else { return Ok(()) };
        if kv.mod_revision() <= self.snapshot_rev {
            // Already in the snapshot taken at a recheck while the watch ran.
            return Ok(());
        }
        let me = self.me.name.clone();
        let me = me.as_str();
        match (self.keys.parse(kv.key()), ev.event_type()) {
            // Our own record deleted means our etcd lease expired (or a person deleted it):
            // re-create it rather than tell the daemon it has no lease.
            (Key::Node(n), EventType::Delete) if n == me => return Err(Error::LeaseLost),
            (Key::Node(n), EventType::Delete) => self.send(Event::Remove(n.to_string())),
            // Our own record written by someone else.
            (Key::Node(n), EventType::Put)
                if n == me
                    && (kv.lease() != self.lease_id || decode_lease(n, kv.value()).as_ref() != Some(&self.lease)) =>
            {
                let now = String::from_utf8_lossy(kv.value());
                return Err(Error::Rewritten(format!("this node's record now reads {now}")));
            }
            (Key::Node(n), EventType::Put) => {
                if let Some(l) = decode_lease(n, kv.value()) {
                    self.send(Event::Upsert(l));
                }
            }
            // One of our CIDR keys deleted: as our own record.
            (Key::Cidr(c), EventType::Delete) if self.lease.pod_cidrs.contains(&c) => return Err(Error::LeaseLost),
            (Key::Cidr(c), EventType::Put) if self.lease.pod_cidrs.contains(&c) && kv.value() != me.as_bytes() => {
                let owner = String::from_utf8_lossy(kv.value());
                return Err(Error::Rewritten(format!(
                    "the ownership record of pod CIDR {c} now names {owner}"
                )));
            }
            // A second daemon tried to start under our name, and gave up.
            (Key::Claim(n), EventType::Put) if n == me => {
                if let Some(held_back) = self.claims_logged.allow(Instant::now()) {
                    tracing::warn!(
                        "etcd: another trellisd tried to start as node {me} and was refused: {} ({held_back} more attempts since the last line)",
                        String::from_utf8_lossy(kv.value())
                    );
                }
            }
            // Every other ownership record: the receiver checks leases against them.
            (Key::Cidr(cidr), t) => {
                let node = (t == EventType::Put).then(|| String::from_utf8_lossy(kv.value()).into_owned());
                self.send(Event::Owner { cidr, node });
            }
            _ => {}
        }
        Ok(())
    }
}
