//! One task per configured peer: connecting with backoff, accepting, collision resolution,
//! import of what the peer sends, export of ours.
//!
//! States (RFC 4271 §8): Idle while waiting out the backoff (the peer may still connect to us),
//! Connect while our connection attempt runs, Active when none runs and we wait; each TCP
//! connection then has a [`Session`] (OpenSent → OpenConfirm → Established).
//!
//! Both sides connect, so two connections to one peer are normal at start. Collision
//! resolution (RFC 4271 §6.8) runs when a connection accepts the peer's OPEN, before it answers
//! KEEPALIVE, against every other connection to the peer whatever its state (the peer's
//! identifier is known from this OPEN): the connection opened by the side with the higher BGP
//! identifier survives, the other gets Cease/7. Both sides apply the same rule to the same
//! pair, so they keep the same connection; an Established loser is closed too (RFC 4271's
//! optional collision detection in Established), which can only happen in the first
//! milliseconds. Two connections opened by the peer mean it started over (a restart, or a
//! half-open connection it forgot): the old one is dropped as if TCP had failed, so a
//! graceful-restart peer's routes stay while the new session resyncs. (A peer with the lower
//! identifier that rebooted without closing its connection waits for our hold timer.)
//!
//! Backoff: the first attempt is immediate, then 250 ms doubling per failure up to the
//! configured connect-retry time (with ±20% jitter), reset once a session is established.

use super::io::{self, AbortOnDrop, ConnHandle, IoEvent};
use super::policy::{self, Advert, Exports, ReflectTarget, ReflectedRoutes, Rejected, Throttle};
use super::rib::{Path, PathAttrs};
use super::session::{CloseReason, Output, Session, State};
use super::wire::{err, Attr, Family, Message, Notification, Update};
use super::{CoreMsg, PeerConfig, PeerEvent, Shared};
use crate::metrics::BgpPeerMetrics;
use ipnetwork::IpNetwork;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

const FIRST_RETRY: Duration = Duration::from_millis(250);
/// At most this many connections per peer at once (two is a collision; more is abuse).
const MAX_CONNECTIONS: usize = 3;
/// At most one log line per peer and reason of dropped routes this often.
const DROP_LOG_PERIOD: Duration = Duration::from_secs(10);

pub enum PeerCmd {
    Incoming(TcpStream),
    /// De-configured: Cease and end.
    Stop,
}

enum Event {
    Connected(std::io::Result<TcpStream>),
    Io(u64, IoEvent),
}

struct Conn {
    id: u64,
    outgoing: bool,
    session: Session,
    io: ConnHandle,
    local_addr: IpAddr,
    /// Reached Established.
    up: bool,
}

pub struct PeerTask {
    shared: Arc<Shared>,
    cfg: PeerConfig,
    generation: u64,
    core: mpsc::UnboundedSender<CoreMsg>,
    exports: watch::Receiver<Arc<Exports>>,
    /// A route reflector's routes to pass on ([`policy::reflect_to`] picks ours).
    reflected: watch::Receiver<Arc<ReflectedRoutes>>,
    cmds: mpsc::UnboundedReceiver<PeerCmd>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    conns: Vec<Conn>,
    next_id: u64,
    connecting: Option<AbortOnDrop>,
    retry_at: Option<Instant>,
    failures: u32,
    /// What the established session was sent (the Adj-RIB-Out).
    advertised: BTreeMap<IpNetwork, Advert>,
    /// One log throttle per reason for dropped routes.
    dropped: BTreeMap<Rejected, Throttle>,
    rng: u64,
    /// Rate-limits the warning that a session with TCP MD5 does not come up.
    md5_warning: Throttle,
    /// The TCP MD5 key of our connections, and where it comes from (for the log).
    md5: Option<Vec<u8>>,
    md5_source: &'static str,
    /// This peer's series (`trellisd_bgp_peer_*`); detached once the peer is de-configured.
    metrics: BgpPeerMetrics,
    /// What the established session announced, before import policy: prefix → accepted.
    adj_in: BTreeMap<IpNetwork, bool>,
    accepted: usize,
}

impl PeerTask {
    pub fn new(
        shared: Arc<Shared>,
        cfg: PeerConfig,
        generation: u64,
        core: mpsc::UnboundedSender<CoreMsg>,
        exports: watch::Receiver<Arc<Exports>>,
        reflected: watch::Receiver<Arc<ReflectedRoutes>>,
        cmds: mpsc::UnboundedReceiver<PeerCmd>,
    ) -> PeerTask {
        let (events_tx, events) = mpsc::unbounded_channel();
        let seed = u64::from(u32::from(shared.cfg.router_id)) ^ generation.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        let metrics = shared.metrics.bgp_peer(cfg.addr, cfg.asn);
        let md5 = shared.cfg.md5_password.clone();
        PeerTask {
            shared,
            cfg,
            generation,
            core,
            exports,
            reflected,
            cmds,
            events_tx,
            events,
            conns: Vec::new(),
            next_id: 0,
            connecting: None,
            retry_at: Some(Instant::now()),
            failures: 0,
            advertised: BTreeMap::new(),
            dropped: BTreeMap::new(),
            rng: seed | 1,
            md5_warning: Throttle::new(Duration::from_secs(60)),
            metrics,
            adj_in: BTreeMap::new(),
            accepted: 0,
            md5,
            md5_source: "--bgp-password-file",
        }
    }

    /// The peer's own TCP MD5 key (`PasswordFile`; `None`: unsigned) instead of the speaker's.
    pub fn with_md5(mut self, key: Option<Vec<u8>>) -> PeerTask {
        self.md5 = key;
        self.md5_source = "the peer's PasswordFile";
        self
    }

    pub async fn run(mut self) {
        tracing::debug!(peer = %self.cfg.addr, asn = self.cfg.asn, "BGP peer configured");
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(PeerCmd::Incoming(stream)) => self.accept(stream),
                    Some(PeerCmd::Stop) => {
                        // De-configured or re-keyed: its series are gone or the next task's.
                        self.metrics = BgpPeerMetrics::default();
                        self.stop(Notification::cease(err::CEASE_PEER_DECONFIGURED));
                        return;
                    }
                    // The core is gone: the speaker was dropped (the daemon stops or restarts).
                    // Only an explicit `Stop` de-configures a peer; this ends like a crash, the
                    // connections closed without a NOTIFICATION, so that graceful-restart peers
                    // keep our routes. (Which of the closed channels is seen first is a race.)
                    None => return,
                },
                Some(ev) = self.events.recv() => self.on_event(ev),
                r = self.exports.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.send_exports();
                }
                r = self.reflected.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.send_exports();
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => self.on_timers(),
            }
            let state = self.state();
            // BGP4-MIB's bgpPeerState: idle(1) .. established(6).
            self.metrics.state.set(state as i64 + 1);
            self.metrics.established.set(i64::from(state == State::Established));
        }
    }

    /// The established session's Adj-RIB-In (before policy) changed by one UPDATE.
    fn note_received(&mut self, withdrawn: &[IpNetwork], announced: &[(IpNetwork, bool)]) {
        for p in withdrawn {
            if self.adj_in.remove(p) == Some(true) {
                self.accepted -= 1;
            }
        }
        for (p, accepted) in announced {
            if self.adj_in.insert(*p, *accepted) == Some(true) {
                self.accepted -= 1;
            }
            if *accepted {
                self.accepted += 1;
            }
        }
        self.metrics.prefixes_received.set(self.adj_in.len() as i64);
        self.metrics.prefixes_accepted.set(self.accepted as i64);
    }

    /// A new session, or none: nothing received or advertised on it yet.
    fn reset_session_metrics(&mut self) {
        self.adj_in.clear();
        self.accepted = 0;
        self.metrics.prefixes_received.set(0);
        self.metrics.prefixes_accepted.set(0);
        self.metrics.prefixes_advertised.set(0);
    }

    fn state(&self) -> State {
        if let Some(c) = self.conns.iter().max_by_key(|c| c.session.state() as u8) {
            return c.session.state();
        }
        if self.connecting.is_some() {
            State::Connect
        } else if self.retry_at.is_some() {
            State::Idle
        } else {
            State::Active
        }
    }

    fn established(&self) -> Option<&Conn> {
        self.conns.iter().find(|c| c.session.state() == State::Established)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let retry = self
            .retry_at
            .filter(|_| self.conns.is_empty() && self.connecting.is_none());
        self.conns
            .iter()
            .filter_map(|c| c.session.next_deadline())
            .chain(retry)
            .min()
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.conns.iter().map(|c| c.id).collect();
        for id in ids {
            if let Some(c) = self.conn_mut(id) {
                let out = c.session.on_timer(now);
                self.apply(id, out);
            }
        }
        if self.retry_at.is_some_and(|t| t <= now) && self.conns.is_empty() && self.connecting.is_none() {
            self.retry_at = None;
            self.start_connect();
        }
    }

    fn start_connect(&mut self) {
        let shared = Arc::clone(&self.shared);
        let peer = SocketAddr::new(self.cfg.addr, shared.cfg.peer_port);
        let events = self.events_tx.clone();
        let timeout = shared.cfg.connect_retry.max(Duration::from_secs(2));
        let md5 = self.md5.clone();
        tracing::debug!(%peer, "connecting");
        self.connecting = Some(AbortOnDrop(tokio::spawn(async move {
            let source = Some(shared.cfg.listen.ip());
            let r = io::connect(shared.netns.as_ref(), peer, source, md5.as_deref(), timeout).await;
            let _ = events.send(Event::Connected(r));
        })));
    }

    fn backoff(&mut self) -> Duration {
        let cap = self.shared.cfg.connect_retry.max(FIRST_RETRY);
        let base = FIRST_RETRY.saturating_mul(1 << self.failures.min(16)).min(cap);
        // xorshift64: ±20% jitter, so that peers that failed together do not retry together.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let factor = 0.8 + (self.rng % 1000) as f64 / 2500.0;
        base.mul_f64(factor)
    }

    fn schedule_retry(&mut self) {
        if self.conns.is_empty() && self.connecting.is_none() && self.retry_at.is_none() {
            let delay = self.backoff();
            tracing::debug!(peer = %self.cfg.addr, ?delay, "next connection attempt");
            self.retry_at = Some(Instant::now() + delay);
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(Ok(stream)) => {
                self.connecting = None;
                if self.established().is_some() {
                    return;
                }
                self.add_conn(stream, true);
            }
            Event::Connected(Err(e)) => {
                self.connecting = None;
                self.failures = self.failures.saturating_add(1);
                tracing::debug!(peer = %self.cfg.addr, error = %e, "connection attempt failed");
                // With TCP MD5 the kernel drops what a peer with another (or no) password sends,
                // silently: our SYNs go unanswered, its own never reach us. Say so, rate-limited.
                if self.md5.is_some() {
                    if let Some(held_back) = self.md5_warning.allow(Instant::now()) {
                        tracing::warn!(
                            peer = %self.cfg.addr,
                            error = %e,
                            password = self.md5_source,
                            held_back,
                            "BGP session not established, and TCP MD5 is configured: the kernel drops segments \
                             of a peer whose password differs (or that has none) without a word; check that \
                             the peer has the same password"
                        );
                    }
                }
                self.schedule_retry();
            }
            Event::Io(id, ev) => {
                let now = Instant::now();
                let Some(c) = self.conn_mut(id) else { return };
                let out = match ev {
                    IoEvent::Frame(ty, body) => c.session.on_frame(now, ty, &body),
                    IoEvent::Malformed(n) => c.session.on_malformed(n),
                    IoEvent::Closed(why) => c.session.on_tcp_closed(why),
                };
                self.apply(id, out);
            }
        }
    }

    fn accept(&mut self, stream: TcpStream) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(peer = %self.cfg.addr, "too many connections from the peer; refusing one");
            return;
        }
        tracing::debug!(peer = %self.cfg.addr, "accepted a connection");
        let _ = stream.set_nodelay(true);
        self.add_conn(stream, false);
    }

    fn add_conn(&mut self, stream: TcpStream, outgoing: bool) {
        let Ok(local_addr) = stream.local_addr().map(|a| a.ip().to_canonical()) else {
            return;
        };
        self.retry_at = None;
        let id = self.next_id;
        self.next_id += 1;
        let io = io::spawn_conn(stream, self.events_tx.clone(), move |ev| Event::Io(id, ev));
        let (session, out) = Session::start(self.shared.local(), self.cfg.asn, Instant::now());
        self.conns.push(Conn {
            id,
            outgoing,
            session,
            io,
            local_addr,
            up: false,
        });
        self.apply(id, out);
    }

    fn conn_mut(&mut self, id: u64) -> Option<&mut Conn> {
        self.conns.iter_mut().find(|c| c.id == id)
    }

    /// Carries out what a session asked for.
    fn apply(&mut self, id: u64, outputs: Vec<Output>) {
        for o in outputs {
            let Some(c) = self.conn_mut(id) else { return };
            match o {
                Output::Send(m) => c.io.send(m.encode(c.session.four_octet_as())),
                Output::OpenReceived => self.resolve_collision(id),
                Output::Established => self.on_established(id),
                Output::Update(u) => {
                    self.metrics.updates_received.inc();
                    self.on_update(id, u)
                }
                Output::RouteRefresh(f) => self.refresh(id, f),
                Output::Closed(reason) => self.on_closed(id, reason),
            }
        }
    }

    /// Collision resolution (RFC 4271 §6.8), when connection `id` has just accepted the peer's
    /// OPEN and before it answers KEEPALIVE. See the module docs for the rule.
    fn resolve_collision(&mut self, id: u64) {
        let Some(c) = self.conns.iter().find(|c| c.id == id) else {
            return;
        };
        let Some(theirs) = c.session.negotiated().map(|n| (n.remote_id, n.remote_asn)) else {
            return;
        };
        let this_outgoing = c.outgoing;
        // RFC 6286 §2.3: the AS breaks a tie of identifiers.
        let ours = (self.shared.cfg.router_id, self.shared.cfg.asn);
        let winner_is_outgoing = ours > theirs;
        let others: Vec<(u64, bool)> = self
            .conns
            .iter()
            .filter(|o| o.id != id)
            .map(|o| (o.id, o.outgoing))
            .collect();
        for (other, other_outgoing) in others {
            if other_outgoing == this_outgoing {
                // Two connections opened by the peer: it started over (a restart, or a half-open
                // connection it has forgotten). The old one goes as if TCP had failed, so a
                // graceful-restart peer's routes are kept until the new session resyncs.
                tracing::info!(peer = %self.cfg.addr, "the peer opened a new connection: replacing the old one");
                let out = self
                    .conn_mut(other)
                    .map(|o| o.session.on_tcp_closed("replaced by the peer's new connection".into()))
                    .unwrap_or_default();
                self.apply(other, out);
                continue;
            }
            let victim = if this_outgoing == winner_is_outgoing { other } else { id };
            tracing::debug!(peer = %self.cfg.addr, "connection collision: closing one of two connections");
            self.close(victim, Notification::cease(err::CEASE_COLLISION));
            if victim == id {
                return;
            }
        }
    }

    fn close(&mut self, id: u64, n: Notification) {
        if let Some(c) = self.conn_mut(id) {
            let out = c.session.stop(n);
            self.apply(id, out);
        }
    }

    fn stop(&mut self, n: Notification) {
        let ids: Vec<u64> = self.conns.iter().map(|c| c.id).collect();
        for id in ids {
            self.close(id, n.clone());
        }
    }

    fn on_established(&mut self, id: u64) {
        let Some(c) = self.conns.iter().find(|c| c.id == id) else {
            return;
        };
        let n = c
            .session
            .negotiated()
            .cloned()
            .expect("established sessions negotiated");
        tracing::info!(
            peer = %self.cfg.addr, asn = n.remote_asn, remote_id = %n.remote_id, hold_time = n.hold_time,
            families = ?n.families, graceful_restart = n.peer_graceful_restart.is_some(),
            "BGP session established"
        );
        if let Some(c) = self.conn_mut(id) {
            c.up = true;
        }
        // Any other connection is now surplus.
        let others: Vec<u64> = self.conns.iter().filter(|o| o.id != id).map(|o| o.id).collect();
        for other in others {
            self.close(other, Notification::cease(err::CEASE_COLLISION));
        }
        self.failures = 0;
        self.retry_at = None;
        self.connecting = None;
        self.shared.set_established(self.cfg.addr, self.generation, true);
        let keep: Vec<Family> = n
            .peer_graceful_restart
            .iter()
            .flat_map(|gr| {
                gr.families
                    .iter()
                    .filter(|(_, forwarding)| *forwarding)
                    .map(|(f, _)| *f)
            })
            .collect();
        self.to_core(PeerEvent::Up {
            keep_stale: keep,
            families: n.families.clone(),
        });
        self.reset_session_metrics();
        self.advertised.clear();
        self.send_exports();
        // End-of-RIB after the initial updates (RFC 4724 §2).
        for f in &n.families {
            self.send_to(id, Update::end_of_rib(*f));
        }
    }

    fn on_closed(&mut self, id: u64, reason: CloseReason) {
        let Some(pos) = self.conns.iter().position(|c| c.id == id) else {
            return;
        };
        // Dropping the connection's handle closes it after the queued NOTIFICATION.
        let c = self.conns.remove(pos);
        let negotiated = c.session.negotiated().cloned();
        let log_reason = match &reason {
            CloseReason::Sent(n) => format!("sent NOTIFICATION {n}"),
            CloseReason::Received(n) => format!("received NOTIFICATION {n}"),
            CloseReason::Tcp(why) => why.clone(),
        };
        if let (true, Some(n)) = (c.up, negotiated) {
            let retain: Vec<Family> = match (&n.peer_graceful_restart, reason.keeps_routes()) {
                (Some(gr), true) if gr.restart_time > 0 => gr
                    .families
                    .iter()
                    .map(|(f, _)| *f)
                    .filter(|f| n.families.contains(f))
                    .collect(),
                _ => Vec::new(),
            };
            let restart_time = n
                .peer_graceful_restart
                .as_ref()
                .map_or(Duration::ZERO, |gr| Duration::from_secs(u64::from(gr.restart_time)));
            tracing::warn!(
                peer = %self.cfg.addr, reason = %log_reason, kept_stale = ?retain,
                "BGP session down"
            );
            self.shared.set_established(self.cfg.addr, self.generation, false);
            self.advertised.clear();
            self.metrics.flaps.inc();
            self.reset_session_metrics();
            self.to_core(PeerEvent::Down { retain, restart_time });
        } else {
            let collision = matches!(&reason, CloseReason::Sent(n) | CloseReason::Received(n)
                if n.code == err::CEASE && n.subcode == err::CEASE_COLLISION);
            if !collision {
                self.failures = self.failures.saturating_add(1);
            }
            tracing::debug!(peer = %self.cfg.addr, reason = %log_reason, state = ?self.state(), "BGP connection closed");
        }
        self.schedule_retry();
    }

    fn to_core(&self, event: PeerEvent) {
        let _ = self.core.send(CoreMsg::Peer {
            peer: self.cfg.addr,
            generation: self.generation,
            event,
        });
    }

    fn send_to(&mut self, id: u64, u: Update) {
        if let Some(c) = self.conn_mut(id) {
            let m = Message::Update(u);
            c.io.send(m.encode(c.session.four_octet_as()));
            self.metrics.updates_sent.inc();
        }
    }

    /// Brings the established session's Adj-RIB-Out to the current exports and, on a route
    /// reflector, the routes it reflects to this peer.
    fn send_exports(&mut self) {
        let Some(c) = self.established() else { return };
        let (id, local_addr) = (c.id, c.local_addr);
        let n = c
            .session
            .negotiated()
            .cloned()
            .expect("established sessions negotiated");
        let exports = Arc::clone(&self.exports.borrow_and_update());
        let reflected = Arc::clone(&self.reflected.borrow_and_update());
        let mut want: BTreeMap<IpNetwork, Advert> = BTreeMap::new();
        if self.shared.cfg.rr_cluster_id.is_some() {
            let target = ReflectTarget {
                addr: self.cfg.addr,
                router_id: n.remote_id,
                ebgp: n.ebgp,
                rr_client: self.cfg.rr_client,
            };
            want.extend(
                reflected
                    .iter()
                    .filter(|(p, r)| n.families.contains(&Family::of(p)) && policy::reflect_to(r, &target))
                    .map(|(p, r)| (*p, Advert::Reflected(Arc::clone(r)))),
            );
        }
        // Our own prefixes win over anything reflected.
        want.extend(
            exports
                .for_session(&n.families, local_addr)
                .into_iter()
                .map(|(p, nh)| (p, Advert::Own(nh))),
        );
        let withdraw: Vec<IpNetwork> = self
            .advertised
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        let announce: BTreeMap<IpNetwork, Advert> = want
            .iter()
            .filter(|(p, a)| self.advertised.get(p) != Some(a))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        if !announce.is_empty() || !withdraw.is_empty() {
            tracing::debug!(peer = %self.cfg.addr, announce = announce.len(), withdraw = withdraw.len(), "sending exports");
        }
        let cluster_id = self.shared.cfg.rr_cluster_id;
        for u in policy::updates_for(&announce, &withdraw, self.shared.cfg.asn, &n, cluster_id) {
            self.send_to(id, u);
        }
        self.advertised = want;
        self.metrics.prefixes_advertised.set(self.advertised.len() as i64);
    }

    /// ROUTE-REFRESH: everything of the family again.
    fn refresh(&mut self, id: u64, family: Family) {
        let Some(n) = self
            .conns
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.session.negotiated().cloned())
        else {
            return;
        };
        tracing::debug!(peer = %self.cfg.addr, ?family, "ROUTE-REFRESH: sending our routes again");
        let again: BTreeMap<IpNetwork, Advert> = self
            .advertised
            .iter()
            .filter(|(p, _)| Family::of(p) == family)
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        let cluster_id = self.shared.cfg.rr_cluster_id;
        for u in policy::updates_for(&again, &[], self.shared.cfg.asn, &n, cluster_id) {
            self.send_to(id, u);
        }
        self.send_to(id, Update::end_of_rib(family));
    }

    /// An UPDATE from the established session: import policy, then to the RIB.
    fn on_update(&mut self, id: u64, u: Update) {
        let Some(c) = self.conns.iter().find(|c| c.id == id) else {
            return;
        };
        let local_addr = c.local_addr;
        let n = c
            .session
            .negotiated()
            .cloned()
            .expect("established sessions negotiated");
        if let Some(family) = u.as_end_of_rib() {
            tracing::debug!(peer = %self.cfg.addr, ?family, "End-of-RIB received");
            self.to_core(PeerEvent::EndOfRib(family));
            return;
        }
        let mut withdraw: Vec<IpNetwork> = u.withdrawn.clone();
        let mut received: Vec<(IpNetwork, bool)> = Vec::new();
        let mut announced: Vec<(IpNetwork, IpAddr)> = Vec::new();
        let mut next_hop_v4 = None;
        let (mut as_path_len, mut local_pref, mut looped) = (0u32, 100u32, None);
        let mut attrs = PathAttrs {
            originator_id: n.remote_id,
            ..PathAttrs::default()
        };
        let cluster_id = self.shared.cfg.rr_cluster_id.map(u32::from);
        for a in &u.attrs {
            match a {
                Attr::NextHop(ip) => next_hop_v4 = Some(IpAddr::V4(*ip)),
                Attr::Origin(o) => attrs.origin = *o,
                Attr::Med(m) => attrs.med = Some(*m),
                Attr::AsPath(p) => {
                    as_path_len = p.len() as u32;
                    attrs.as_path = p.clone();
                    if n.ebgp && p.contains(self.shared.cfg.asn) {
                        looped = looped.or(Some(Rejected::AsLoop));
                    }
                }
                Attr::As4Path(p) if n.ebgp && p.contains(self.shared.cfg.asn) => {
                    looped = looped.or(Some(Rejected::AsLoop));
                }
                // LOCAL_PREF from an external peer is ignored (RFC 4271 §5.1.5).
                Attr::LocalPref(lp) if !n.ebgp => local_pref = *lp,
                // Our own routes reflected back to us (RFC 4456 §8). ORIGINATOR_ID and
                // CLUSTER_LIST from an external peer are ignored (RFC 7606 §7.9, §7.10).
                Attr::OriginatorId(id) if !n.ebgp => {
                    attrs.originator_id = *id;
                    if *id == self.shared.cfg.router_id {
                        looped = Some(Rejected::OriginatorIsUs);
                    }
                }
                Attr::ClusterList(list) if !n.ebgp => {
                    attrs.cluster_list = list.clone();
                    if cluster_id.is_some_and(|c| list.contains(&c)) {
                        looped = looped.or(Some(Rejected::ClusterListLoop));
                    }
                }
                Attr::MpUnreach(m) if n.families.contains(&m.family) => withdraw.extend(&m.withdrawn),
                Attr::MpReach(m) if n.families.contains(&m.family) => {
                    announced.extend(m.nlri.iter().map(|p| (*p, m.next_hop)));
                }
                _ => {}
            }
        }
        if let Some(nh) = next_hop_v4 {
            if n.families.contains(&Family::Ipv4Unicast) {
                announced.extend(u.nlri.iter().map(|p| (*p, nh)));
            }
        }
        let exports = Arc::clone(&self.exports.borrow());
        let ours: Vec<IpAddr> = [Some(local_addr), Some(IpAddr::V4(self.shared.cfg.router_id))]
            .into_iter()
            .chain([exports.next_hop_v4, exports.next_hop_v6])
            .flatten()
            .collect();
        let mut accept = Vec::new();
        let mut dropped: BTreeMap<Rejected, Vec<(IpNetwork, IpAddr)>> = BTreeMap::new();
        let withdrawn = withdraw.len();
        for (prefix, nh) in announced {
            let nh = policy::normalize_next_hop(nh);
            let verdict = match looped {
                Some(why) => Err(why),
                None => policy::check_import(&prefix, nh, &self.shared.cfg.import_within, &ours),
            };
            received.push((prefix, verdict.is_ok()));
            match verdict {
                Ok(()) => accept.push((
                    prefix,
                    Path {
                        next_hop: nh,
                        local_pref,
                        as_path_len,
                        ebgp: n.ebgp,
                        attrs: attrs.clone(),
                    },
                )),
                Err(why) => {
                    // Treated as withdrawn: it replaces whatever the peer sent before for it.
                    withdraw.push(prefix);
                    dropped.entry(why).or_default().push((prefix, nh));
                }
            }
        }
        self.note_received(&withdraw[..withdrawn], &received);
        for (why, routes) in dropped {
            self.note_dropped(why, &routes);
        }
        if accept.is_empty() && withdraw.is_empty() {
            return;
        }
        self.to_core(PeerEvent::Routes {
            announce: accept,
            withdraw,
        });
    }
}

impl PeerTask {
    /// Counts routes of one UPDATE that the import policy dropped for `why`, and logs them (at
    /// most one line per reason per [`DROP_LOG_PERIOD`], with how many were held back).
    fn note_dropped(&mut self, why: Rejected, routes: &[(IpNetwork, IpAddr)]) {
        let n = routes.len() as u64;
        self.shared.metrics.bgp_routes_dropped(why).inc_by(n);
        let throttle = self
            .dropped
            .entry(why)
            .or_insert_with(|| Throttle::new(DROP_LOG_PERIOD));
        let Some(held_back) = throttle.allow_n(Instant::now(), n) else {
            return;
        };
        const SHOWN: usize = 5;
        let prefixes: Vec<String> = routes
            .iter()
            .take(SHOWN)
            .map(|(p, nh)| format!("{p} via {nh}"))
            .collect();
        let prefixes = prefixes.join(", ");
        let more = routes.len().saturating_sub(SHOWN);
        let reason = why.label();
        if why.is_loop() {
            tracing::info!(peer = %self.cfg.addr, reason, %why, prefixes, more, held_back, "dropped routes from a BGP peer");
        } else {
            tracing::warn!(peer = %self.cfg.addr, reason, %why, prefixes, more, held_back, "dropped routes from a BGP peer");
        }
    }
}

impl Drop for PeerTask {
    fn drop(&mut self) {
        self.shared.set_established(self.cfg.addr, self.generation, false);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BgpConfig, Speaker};
    use super::*;
    use crate::metrics::Metrics;

    /// The speaker is dropped: its core goes, and with it every sender of the peer tasks'
    /// commands, while a peer task may not have seen the end of the exports channel yet (it is
    /// polled on another thread, or the other branch of its `select!` wins). A closed command
    /// channel is the speaker going away, not the peer being de-configured: the session closes
    /// without a NOTIFICATION, and the graceful-restart peer keeps our routes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_command_channel_ends_the_session_without_notification() {
        // The peer: a whole speaker on 127.0.0.2 (graceful restart on by default).
        let a_addr: IpAddr = "127.0.0.1".parse().unwrap();
        let mut cfg = BgpConfig::new(64512, "127.0.0.2".parse().unwrap());
        cfg.listen = "127.0.0.2:0".parse().unwrap();
        cfg.peer_port = 9; // it never reaches us; we connect to it
        cfg.import_within = vec!["10.244.0.0/16".parse().unwrap()];
        let (b, mut routes) = Speaker::start(cfg, Metrics::new()).await.unwrap();
        b.set_peers(vec![PeerConfig::new(a_addr, 64512)]);

        // Us: one peer task, driven directly.
        let mut cfg = BgpConfig::new(64512, "127.0.0.1".parse().unwrap());
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.peer_port = b.local_addr().port();
        let shared = Arc::new(Shared::new(cfg, Metrics::new()).unwrap());
        let prefix: IpNetwork = "10.244.1.0/24".parse().unwrap();
        let (_exports_tx, exports) = watch::channel(Arc::new(Exports::new(vec![prefix], Some(a_addr), None)));
        let (core_tx, _core_rx) = mpsc::unbounded_channel();
        let (cmds_tx, cmds) = mpsc::unbounded_channel();
        let (_reflected_tx, reflected) = watch::channel(Arc::new(ReflectedRoutes::new()));
        let peer = PeerConfig::new("127.0.0.2".parse().unwrap(), 64512);
        let task = tokio::spawn(PeerTask::new(shared, peer, 1, core_tx, exports, reflected, cmds).run());
        let within = Duration::from_secs(20);
        tokio::time::timeout(within, routes.wait_for(|r| r.get(&prefix).is_some_and(|x| !x.stale)))
            .await
            .expect("the peer learned our route")
            .unwrap();

        // The command channel closes, the exports channel is still open.
        drop(cmds_tx);
        tokio::time::timeout(within, task)
            .await
            .expect("the peer task ended")
            .unwrap();
        let after = tokio::time::timeout(within, routes.wait_for(|r| r.get(&prefix).is_none_or(|x| x.stale)))
            .await
            .expect("the session ended")
            .unwrap()
            .clone();
        assert!(
            after.get(&prefix).is_some_and(|x| x.stale),
            "the peer dropped our route: it got a NOTIFICATION ({after:?})"
        );
    }
}
