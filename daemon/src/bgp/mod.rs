//! The BGP speaker (Calico-style BGP mode): sessions to the other nodes (full mesh), to route
//! reflectors (or, as one, to its clients) and to external routers; it advertises this node's pod CIDRs and learns the
//! other nodes' ones, which the rest of the daemon installs in the kernel.
//!
//! # Shape
//!
//! ```text
//!  Speaker (handle) ──set_peers──▶ core task ──spawns──▶ one task per peer ──▶ one task per TCP connection
//!        │ set_exports (watch) ─────────────────────────────▲   │ Session (sans-I/O FSM per connection)
//!        ▼                                                      │ import policy, export diff
//!  watch<best route per prefix> ◀── core task: Rib (Adj-RIB-In per peer, stale routes, best) ◀┘
//!  listener tasks (IPv4, IPv6): accept, hand the connection to the peer task of its source address
//! ```
//!
//! - [`wire`]: the messages, decoded into the NOTIFICATION RFC 4271 §6 prescribes on error;
//! - [`session`]: the per-connection state machine, without I/O (unit-tested transition by
//!   transition);
//! - `peer`: connect with backoff, accept, collision resolution (RFC 4271 §6.8), graceful
//!   restart as receiving speaker, Adj-RIB-Out;
//! - [`rib`]: routes per peer, stale marking, best-route selection;
//! - [`policy`]: import filter (only inside the cluster CIDRs), exports, reflection rules,
//!   UPDATE packing.
//!
//! A change travels without any timer on the way: `set_exports` → peer task → UPDATE → the
//! other speaker's peer task → its core → its watch, in well under a millisecond on one host.
//! There is no MinRouteAdvertisementInterval: pod CIDRs change rarely, and when they change
//! the other nodes should know at once.
//!
//! # Graceful restart (RFC 4724)
//!
//! We send the capability (restart time `graceful_restart_secs`, both families; when
//! [`BgpConfig::restarted`], i.e. the daemon restarted and the kernel kept the routes it had
//! installed, the F bits, and the R bit in the OPENs sent until the initial sync is done:
//! later sessions are no restart of ours) and End-of-RIB after the initial UPDATEs. Dropping
//! the [`Speaker`] closes the sessions without a NOTIFICATION, as a crash or `SIGTERM` of the
//! daemon would, so that the peers keep our routes while we restart: a peer task reads its
//! closed command channel as the speaker gone, never as a de-configuration (only an explicit
//! stop sends Cease). Restarted, we wait for the peers' End-of-RIB (at most
//! [`BgpConfig::restart_wait`], `--bgp-restart-wait`, 240 s by default as BIRD) before [`Speaker::synced`]: until
//! then the routes the kernel kept stay, even while a peer is unreachable. As receiving speaker: when a session that
//! negotiated graceful restart ends without a NOTIFICATION, the peer's routes stay (marked
//! `stale` in [`LearnedRoute`]) for its restart time; once it is back, those of the families it
//! kept forwarding for stay until its End-of-RIB (or for [`BgpConfig::stale_path_time`],
//! `--bgp-stale-path-time`, 240 s by default), the rest go at once. Meanwhile a route in use
//! stays in use, stale, although another peer offers a fresh path (RFC 4724 §4.2: the
//! forwarding state is retained; see [`rib`]).
//!
//! # Wire format: hand-written, and why
//!
//! Evaluated: `netgauze-bgp-pkt` 0.13 (complete, maintained, nom-style decoders) and
//! `zettabgp` 0.6 (small). Neither gives what the speaker must do on bad input: answer with the
//! exact NOTIFICATION of RFC 4271 §6. zettabgp's errors are strings (`BgpError::Static`), and
//! its NOTIFICATION carries a `u16` of data where the RFC wants the offending attribute.
//! netgauze maps parse errors to NOTIFICATIONs, but loosely (its own `TODO`s: no data, a
//! LOCAL_PREF length error becomes "optional attribute error"), and its decoder never reports
//! "missing well-known attribute", so we would re-check every message anyway; it also brings its IANA, parse-utils, strum, serde and ipnet crates for
//! a speaker that uses a handful of path attributes and two families. The subset we need is
//! about 1,000 lines ([`wire`]), round-trip tested, tested error by error, and checked against
//! BIRD in the integration tests; the state machine and the policy are ours either way.
//!
//! # Limitations
//!
//! TCP MD5 (RFC 2385) with a default password ([`BgpConfig::md5_password`]) and per-peer ones
//! ([`Speaker::set_passwords`]), no
//! TCP-AO, no ADD-PATH, no extended messages or extended next hop (RFC 8950), no
//! RFC 7606 "treat-as-withdraw" (a malformed UPDATE resets the session, as RFC 4271 says), no
//! RFC 8538 (a NOTIFICATION always flushes the peer's routes), no MED comparison, no outbound
//! filtering beyond "our pod CIDRs only" and the reflection rules. Learned routes are
//! re-advertised only by a route reflector ([`BgpConfig::rr_cluster_id`]): only iBGP-learned
//! ones that passed the import policy (inside the cluster CIDRs), without their unknown
//! optional transitive attributes (communities), and without AS4_PATH merging for iBGP peers
//! without 4-octet AS numbers; eBGP-learned routes are never re-advertised. As restarting
//! speaker we do not defer route selection ourselves; [`Speaker::synced`] tells the daemon
//! when the first complete view is in.
//!
//! # Route reflection (RFC 4456)
//!
//! With [`BgpConfig::rr_cluster_id`] the speaker is a route reflector: the core publishes the
//! best iBGP-learned route to each prefix with its attributes ([`policy::Reflected`], a watch
//! beside the exports), and each peer task adds to its Adj-RIB-Out what [`policy::reflect_to`]
//! says goes to its peer: a client's ([`PeerConfig::rr_client`]) route to every other iBGP peer,
//! a non-client's to the clients; never back to its peer or its originator, never to eBGP
//! peers. Attributes pass unchanged, next hop included, but ORIGINATOR_ID (the originator's
//! identifier when absent) and CLUSTER_LIST (our cluster ID prepended). The diff against the
//! Adj-RIB-Out withdraws what is no longer best and re-announces what changed; the routes of
//! a peer that restarts gracefully stay best, stale, and so stay reflected. On receipt every
//! speaker drops a route whose ORIGINATOR_ID is its identifier (`originator_is_us`), a
//! reflector one whose CLUSTER_LIST holds its cluster ID (`cluster_list_loop`); ties in route
//! selection go to the shorter CLUSTER_LIST. Which nodes are reflectors, and who is whose
//! client, the daemon decides from the leases (`backend::bgp::peers`).

mod io;
mod peer;
pub mod policy;
pub mod rib;
pub mod session;
pub mod wire;

use crate::metrics::Metrics;
use io::AbortOnDrop;
use ipnetwork::IpNetwork;
use peer::{PeerCmd, PeerTask};
use policy::{Exports, Reflected, ReflectedRoutes, Throttle};
use rib::{Path, Rib};
use session::Local;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use wire::{Family, GracefulRestart};

/// The speaker's configuration; [`BgpConfig::new`] fills in the defaults.
#[derive(Clone, Debug)]
pub struct BgpConfig {
    pub asn: u32,
    /// The BGP identifier: the node's IPv4 underlay address, usually.
    pub router_id: Ipv4Addr,
    /// Where peers connect to us (default 0.0.0.0:179). An unspecified address (`0.0.0.0` or
    /// `::`) listens on both families (see `io::listen`); a specific address, on it only, and
    /// is also the source of our outgoing connections of its family.
    pub listen: SocketAddr,
    /// The port we connect to on peers (179).
    pub peer_port: u16,
    /// Seconds; 0 (no keepalives) or at least 3. The session uses the smaller of ours and the
    /// peer's. Default 90.
    pub hold_time: u16,
    /// The longest wait between connection attempts (the backoff starts at 250 ms). Default 5 s.
    pub connect_retry: Duration,
    /// Our graceful-restart time (how long peers keep our routes while we restart), 0 for no
    /// graceful restart; at most 4095. Default 120.
    pub graceful_restart_secs: u16,
    /// This is a restart with the forwarding state kept (the daemon restarted, the kernel routes
    /// stayed): sets the F bits of the graceful-restart capability, and its R bit until the
    /// initial sync ([`Speaker::synced`]). Default false.
    pub restarted: bool,
    /// When [`BgpConfig::restarted`]: the longest [`Speaker::synced`] waits for the peers'
    /// End-of-RIB (a peer that is unreachable holds the sync back this long, and with it the
    /// removal of the routes the kernel kept). BIRD's `graceful restart wait`; default
    /// [`RESTART_WAIT`] (240 s). A fresh start waits [`INITIAL_SYNC_WAIT`]: it kept nothing.
    pub restart_wait: Duration,
    /// As receiving speaker: once a restarting peer is back, how long its stale routes (still
    /// in use) wait for its End-of-RIB at most. Default [`STALE_PATH_TIME`] (240 s).
    pub stale_path_time: Duration,
    /// Only prefixes inside these (the cluster CIDRs) are learned.
    pub import_within: Vec<IpNetwork>,
    /// The TCP MD5 (RFC 2385) password of every session (the mesh, route reflectors, external
    /// peers: `--bgp-password-file`), unless the peer has its own ([`Speaker::set_passwords`]);
    /// at most 80 bytes. `None`: unsigned.
    /// Set on the listening sockets per peer address and on each outgoing connection; a peer
    /// with another password (or none) cannot connect, and the kernel says nothing about the
    /// segments it drops: the peer task warns (rate-limited) while such a session stays down.
    pub md5_password: Option<Vec<u8>>,
    /// The network namespace the sockets live in (`/run/netns/NAME`); `None`: the calling
    /// thread's. Tests run several speakers in one process this way.
    pub netns: Option<PathBuf>,
    /// Be a route reflector (RFC 4456) with this cluster ID: reflect the best iBGP-learned
    /// routes to the other iBGP peers (see [`policy`]; clients: [`PeerConfig::rr_client`]), and
    /// drop routes whose CLUSTER_LIST holds it. `None` (default): no reflection.
    pub rr_cluster_id: Option<Ipv4Addr>,
}

impl BgpConfig {
    pub fn new(asn: u32, router_id: Ipv4Addr) -> BgpConfig {
        BgpConfig {
            asn,
            router_id,
            listen: SocketAddr::from(([0, 0, 0, 0], 179)),
            peer_port: 179,
            hold_time: 90,
            connect_retry: Duration::from_secs(5),
            graceful_restart_secs: 120,
            restarted: false,
            restart_wait: RESTART_WAIT,
            stale_path_time: STALE_PATH_TIME,
            import_within: Vec::new(),
            md5_password: None,
            netns: None,
            rr_cluster_id: None,
        }
    }
}

/// A peer: another node (iBGP full mesh), a route reflector (iBGP), an external router (eBGP,
/// another AS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub addr: IpAddr,
    pub asn: u32,
    /// A route-reflector client of ours (only meaningful when we are a reflector,
    /// [`BgpConfig::rr_cluster_id`], and the peer is in our AS).
    pub rr_client: bool,
}

impl PeerConfig {
    /// A peer that is no client of ours.
    pub fn new(addr: IpAddr, asn: u32) -> PeerConfig {
        PeerConfig {
            addr,
            asn,
            rr_client: false,
        }
    }
}

/// The best route to a prefix, as learned from `peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedRoute {
    pub prefix: IpNetwork,
    pub next_hop: IpAddr,
    pub peer: IpAddr,
    /// Kept for graceful restart while its peer's session is down or resyncing.
    pub stale: bool,
}

pub type Routes = BTreeMap<IpNetwork, LearnedRoute>;

/// The speaker; cheap to clone. Dropping the last handle stops it (sessions closed without a
/// NOTIFICATION, so that graceful-restart peers keep our routes).
#[derive(Clone)]
pub struct Speaker {
    inner: Arc<Inner>,
}

struct Inner {
    core: mpsc::UnboundedSender<CoreMsg>,
    exports: watch::Sender<Arc<Exports>>,
    routes: watch::Receiver<Routes>,
    synced: watch::Receiver<bool>,
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    _tasks: Vec<AbortOnDrop>,
}

/// What every task of the speaker reads.
struct Shared {
    cfg: BgpConfig,
    /// What our OPENs say: see [`Shared::local`].
    local: Mutex<Arc<Local>>,
    netns: Option<File>,
    metrics: Metrics,
    /// Established peers, with the generation of the peer task that holds the session.
    established: Mutex<HashMap<IpAddr, u64>>,
}

impl Shared {
    fn new(cfg: BgpConfig, metrics: Metrics) -> std::io::Result<Shared> {
        let netns = cfg.netns.as_ref().map(File::open).transpose()?;
        let graceful_restart = (cfg.graceful_restart_secs > 0).then(|| GracefulRestart {
            restarted: cfg.restarted,
            restart_time: cfg.graceful_restart_secs,
            families: Family::ALL.iter().map(|f| (*f, cfg.restarted)).collect(),
        });
        let local = Arc::new(Local {
            asn: cfg.asn,
            router_id: cfg.router_id,
            hold_time: cfg.hold_time,
            graceful_restart,
        });
        Ok(Shared {
            cfg,
            local: Mutex::new(local),
            netns,
            metrics,
            established: Mutex::new(HashMap::new()),
        })
    }

    /// What the OPEN of a new connection says. While we restart (until the initial sync) its
    /// graceful-restart capability has the Restart State bit (RFC 4724 §3); afterwards not: a
    /// session that comes up later is no restart of ours.
    fn local(&self) -> Arc<Local> {
        Arc::clone(&self.local.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Our restart is over (the initial sync is done): later OPENs go without the R bit. The F
    /// bits stay: the forwarding state was kept.
    fn restart_done(&self) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.graceful_restart.as_ref().is_some_and(|gr| gr.restarted) {
            let mut next = Local::clone(&local);
            if let Some(gr) = next.graceful_restart.as_mut() {
                gr.restarted = false;
            }
            *local = Arc::new(next);
        }
    }

    /// How long the initial sync waits for the peers: see [`BgpConfig::restart_wait`].
    fn sync_wait(&self) -> Duration {
        if self.cfg.restarted {
            self.cfg.restart_wait
        } else {
            INITIAL_SYNC_WAIT
        }
    }

    fn set_established(&self, addr: IpAddr, generation: u64, up: bool) {
        let mut m = self.established.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            m.insert(addr, generation);
        } else if m.get(&addr) == Some(&generation) {
            m.remove(&addr);
        }
    }
}

enum CoreMsg {
    SetPeers(Vec<PeerConfig>),
    SetPasswords(HashMap<IpAddr, Vec<u8>>),
    Peer {
        peer: IpAddr,
        generation: u64,
        event: PeerEvent,
    },
}

enum PeerEvent {
    /// Established; its stale routes of `keep_stale` wait for End-of-RIB, the others go.
    Up {
        keep_stale: Vec<Family>,
        /// The families it will send End-of-RIB for.
        families: Vec<Family>,
    },
    /// Down; routes of `retain` stay stale for `restart_time`.
    Down {
        retain: Vec<Family>,
        restart_time: Duration,
    },
    Routes {
        announce: Vec<(IpNetwork, Path)>,
        withdraw: Vec<IpNetwork>,
    },
    EndOfRib(Family),
}

/// The longest [`Speaker::synced`] waits for End-of-RIB from the first peers on a fresh start.
pub const INITIAL_SYNC_WAIT: Duration = Duration::from_secs(5);

/// The default of [`BgpConfig::stale_path_time`], as BIRD's wait (FRR's `stalepath-time` is
/// 360 s).
pub const STALE_PATH_TIME: Duration = Duration::from_secs(240);

/// The default of [`BgpConfig::restart_wait`]: BIRD's `graceful restart wait` (FRR's
/// `select-defer-time` is 360 s).
pub const RESTART_WAIT: Duration = Duration::from_secs(240);

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

impl Speaker {
    /// Listens on `cfg.listen` and starts; no peers and no exports yet (connections wait in the
    /// listen backlog until the first [`Speaker::set_peers`]). Returns the best route per
    /// prefix, updated as the peers speak. Must be called inside a tokio runtime.
    pub async fn start(cfg: BgpConfig, metrics: Metrics) -> std::io::Result<(Speaker, watch::Receiver<Routes>)> {
        if cfg.router_id.is_unspecified() {
            return Err(invalid("BGP router ID 0.0.0.0".into()));
        }
        if matches!(cfg.hold_time, 1 | 2) {
            return Err(invalid(format!("BGP hold time {}: 0 or at least 3", cfg.hold_time)));
        }
        if cfg.graceful_restart_secs > 0x0fff {
            return Err(invalid(format!(
                "graceful restart time {}: at most 4095",
                cfg.graceful_restart_secs
            )));
        }
        if let Some(p) = &cfg.md5_password {
            if p.is_empty() || p.len() > io::MD5_KEY_MAX {
                return Err(invalid(format!(
                    "BGP password of {} bytes: 1 to {}",
                    p.len(),
                    io::MD5_KEY_MAX
                )));
            }
        }
        let shared = Arc::new(Shared::new(cfg, metrics)?);
        let listeners: Vec<Arc<TcpListener>> = io::listen(shared.netns.as_ref(), shared.cfg.listen)?
            .into_iter()
            .map(Arc::new)
            .collect();
        let local_addr = listeners[0].local_addr()?;
        let (core_tx, core_rx) = mpsc::unbounded_channel();
        let (exports_tx, exports_rx) = watch::channel(Arc::new(Exports::default()));
        let (routes_tx, routes_rx) = watch::channel(Routes::new());
        let (reflected_tx, reflected_rx) = watch::channel(Arc::new(ReflectedRoutes::new()));
        let accept_map = Arc::new(RwLock::new(HashMap::new()));
        let (peers_known_tx, peers_known) = watch::channel(false);
        let (synced_tx, synced_rx) = watch::channel(false);
        let core = Core {
            shared: Arc::clone(&shared),
            rib: Rib::default(),
            peers: HashMap::new(),
            accept_map: Arc::clone(&accept_map),
            core_tx: core_tx.clone(),
            rx: core_rx,
            exports: exports_rx,
            routes: routes_tx,
            reflected: reflected_tx,
            reflected_rx,
            peers_known: peers_known_tx,
            synced: synced_tx,
            sync_deadline: Instant::now() + shared.sync_wait(),
            next_generation: 0,
            listeners: listeners.clone(),
            passwords: HashMap::new(),
        };
        let mut tasks = vec![AbortOnDrop(tokio::spawn(core.run()))];
        for listener in listeners {
            let accept = accept_loop(listener, Arc::clone(&accept_map), peers_known.clone());
            tasks.push(AbortOnDrop(tokio::spawn(accept)));
        }
        tracing::info!(asn = shared.cfg.asn, router_id = %shared.cfg.router_id, listen = %local_addr, "BGP speaker started");
        let speaker = Speaker {
            inner: Arc::new(Inner {
                core: core_tx,
                exports: exports_tx,
                routes: routes_rx.clone(),
                synced: synced_rx,
                shared,
                local_addr,
                _tasks: tasks,
            }),
        };
        Ok((speaker, routes_rx))
    }

    /// The peers from now on: new ones are connected, removed ones closed (Cease, peer
    /// de-configured) and their routes dropped; a peer whose AS changed starts over. Our own
    /// address in the list (a full mesh from the node list) is skipped.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let _ = self.inner.core.send(CoreMsg::SetPeers(peers));
    }

    /// The peers' own TCP MD5 passwords (Calico's BGPPeer `password`), by address, from now
    /// on: they replace [`BgpConfig::md5_password`] for those peers (at most 80 bytes; an empty
    /// one: unsigned). A peer whose password changes is re-keyed on the listening socket and
    /// reconnected (Cease, then a new session). Set them before the peers they concern, so that
    /// the first connection is signed.
    pub fn set_passwords(&self, passwords: HashMap<IpAddr, Vec<u8>>) {
        let _ = self.inner.core.send(CoreMsg::SetPasswords(passwords));
    }

    /// What this node advertises: its pod CIDRs, with next hop `next_hop_v4` / `next_hop_v6`
    /// (the node's underlay addresses; `None`: the session's own address when of the family).
    pub fn set_exports(&self, prefixes: Vec<IpNetwork>, next_hop_v4: Option<IpAddr>, next_hop_v6: Option<IpAddr>) {
        let e = Exports::new(prefixes, next_hop_v4, next_hop_v6);
        self.inner.exports.send_if_modified(|old| {
            if **old == e {
                return false;
            }
            *old = Arc::new(e);
            true
        });
    }

    /// Peers with an established session.
    pub fn established(&self) -> Vec<IpAddr> {
        let m = self.inner.shared.established.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<IpAddr> = m.keys().copied().collect();
        v.sort();
        v
    }

    /// Another receiver of the best routes.
    pub fn routes(&self) -> watch::Receiver<Routes> {
        self.inner.routes.clone()
    }

    /// `true` once the first complete view is in: every peer of the first `set_peers` has sent
    /// End-of-RIB for each of its families, or the wait has passed since the start
    /// ([`BgpConfig::restart_wait`] after a restart, else [`INITIAL_SYNC_WAIT`]; a peer that is
    /// down does not hold it back longer). A restarted daemon waits for it before removing
    /// kernel routes that the new RIB lacks.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.inner.synced.clone()
    }

    /// The address the speaker listens on (its IPv4 one when it listens on both families, on
    /// the same port).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }
}

type AcceptMap = Arc<RwLock<HashMap<IpAddr, mpsc::UnboundedSender<PeerCmd>>>>;

/// Accepts connections; only configured peers get through. Nothing is accepted before the first
/// peer list (connections wait in the backlog), so that a peer that connects first is not
/// refused as unknown.
async fn accept_loop(listener: Arc<TcpListener>, peers: AcceptMap, mut peers_known: watch::Receiver<bool>) {
    if peers_known.wait_for(|known| *known).await.is_err() {
        return;
    }
    let mut refused = Throttle::new(Duration::from_secs(10));
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let ip = from.ip().to_canonical();
                let tx = peers.read().unwrap_or_else(|e| e.into_inner()).get(&ip).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.send(PeerCmd::Incoming(stream));
                    }
                    None => {
                        if let Some(held_back) = refused.allow(Instant::now()) {
                            tracing::warn!(from = %ip, held_back, "refused a BGP connection from an address that is not a peer");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting BGP connections");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct PeerEntry {
    cfg: PeerConfig,
    generation: u64,
    /// `None` until its first session is up; then the families whose End-of-RIB is still to
    /// come.
    awaiting_end_of_rib: Option<BTreeSet<Family>>,
    cmds: mpsc::UnboundedSender<PeerCmd>,
    task: JoinHandle<()>,
}

/// Owns the peers and the RIB; publishes the best routes.
struct Core {
    shared: Arc<Shared>,
    rib: Rib,
    peers: HashMap<IpAddr, PeerEntry>,
    accept_map: AcceptMap,
    core_tx: mpsc::UnboundedSender<CoreMsg>,
    rx: mpsc::UnboundedReceiver<CoreMsg>,
    exports: watch::Receiver<Arc<Exports>>,
    routes: watch::Sender<Routes>,
    /// What a route reflector passes on (empty when we are none); the peer tasks watch it.
    reflected: watch::Sender<Arc<ReflectedRoutes>>,
    reflected_rx: watch::Receiver<Arc<ReflectedRoutes>>,
    /// Set once the first peer list is in.
    peers_known: watch::Sender<bool>,
    /// See [`Speaker::synced`].
    synced: watch::Sender<bool>,
    sync_deadline: Instant,
    next_generation: u64,
    /// The listening sockets, for the peers' TCP MD5 keys.
    listeners: Vec<Arc<TcpListener>>,
    /// The peers' own TCP MD5 passwords, over [`BgpConfig::md5_password`].
    passwords: HashMap<IpAddr, Vec<u8>>,
}

impl Core {
    async fn run(mut self) {
        loop {
            let sync_pending = !*self.synced.borrow();
            let expiry = match (self.rib.next_expiry(), sync_pending) {
                (e, false) => e,
                (Some(e), true) => Some(e.min(self.sync_deadline)),
                (None, true) => Some(self.sync_deadline),
            };
            tokio::select! {
                Some(m) = self.rx.recv() => {
                    self.handle(m);
                    // Everything already queued goes into one publication.
                    for _ in 0..10_000 {
                        match self.rx.try_recv() {
                            Ok(m) => self.handle(m),
                            Err(_) => break,
                        }
                    }
                }
                r = self.exports.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let own: BTreeSet<IpNetwork> = self.exports.borrow_and_update().prefixes.iter().copied().collect();
                    self.rib.set_own(own);
                }
                _ = sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    self.rib.expire(Instant::now());
                }
            }
            if self.rib.take_changed() {
                self.routes.send_replace(self.rib.best().clone());
            }
            if self.rib.take_paths_changed() {
                self.publish_reflected();
            }
            if sync_pending && (*self.peers_known.borrow() || Instant::now() >= self.sync_deadline) {
                let all_in = self
                    .peers
                    .values()
                    .all(|e| e.awaiting_end_of_rib.as_ref().is_some_and(BTreeSet::is_empty));
                if all_in || Instant::now() >= self.sync_deadline {
                    tracing::info!(
                        complete = all_in,
                        routes = self.rib.best().len(),
                        "BGP initial sync done"
                    );
                    self.shared.restart_done();
                    self.synced.send_replace(true);
                }
            }
        }
    }

    fn handle(&mut self, m: CoreMsg) {
        match m {
            CoreMsg::SetPeers(list) => self.set_peers(list),
            CoreMsg::SetPasswords(map) => self.set_passwords(map),
            CoreMsg::Peer {
                peer,
                generation,
                event,
            } => {
                if self.peers.get(&peer).map(|e| e.generation) != Some(generation) {
                    return; // from a peer task that has been replaced
                }
                let now = Instant::now();
                match event {
                    PeerEvent::Up { keep_stale, families } => {
                        if let Some(e) = self.peers.get_mut(&peer) {
                            e.awaiting_end_of_rib
                                .get_or_insert_with(|| families.into_iter().collect());
                        }
                        self.rib
                            .peer_up(peer, &keep_stale, now + self.shared.cfg.stale_path_time);
                    }
                    PeerEvent::Down { retain, restart_time } => {
                        self.rib.peer_down(peer, &retain, now + restart_time);
                    }
                    PeerEvent::Routes { announce, withdraw } => {
                        for p in withdraw {
                            self.rib.withdraw(peer, p);
                        }
                        for (p, path) in announce {
                            self.rib.announce(peer, p, path);
                        }
                    }
                    PeerEvent::EndOfRib(f) => {
                        self.rib.end_of_rib(peer, f);
                        if let Some(pending) = self.peers.get_mut(&peer).and_then(|e| e.awaiting_end_of_rib.as_mut()) {
                            pending.remove(&f);
                        }
                    }
                }
            }
        }
    }

    fn set_peers(&mut self, list: Vec<PeerConfig>) {
        let cfg = &self.shared.cfg;
        let ours = [IpAddr::V4(cfg.router_id), cfg.listen.ip()];
        let want: HashMap<IpAddr, PeerConfig> = list
            .into_iter()
            .map(|mut p| {
                p.addr = p.addr.to_canonical();
                p
            })
            .filter(|p| !ours.contains(&p.addr) && !p.addr.is_unspecified())
            .map(|p| (p.addr, p))
            .collect();
        let gone: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(addr, e)| want.get(addr) != Some(&e.cfg))
            .map(|(addr, _)| *addr)
            .collect();
        for addr in gone {
            let e = self.remove_peer(addr);
            self.shared.metrics.remove_bgp_peer(addr, e.cfg.asn);
            tracing::info!(peer = %addr, "BGP peer removed");
        }
        for (addr, p) in want {
            if self.peers.contains_key(&addr) {
                continue;
            }
            self.add_peer(p);
        }
        self.peers_known.send_replace(true);
    }

    /// A route reflector: the best iBGP-learned route to each prefix, for the peer tasks to
    /// pass on (each as [`policy::reflect_to`] says).
    fn publish_reflected(&mut self) {
        if self.shared.cfg.rr_cluster_id.is_none() {
            return;
        }
        let best = self.rib.best();
        let next: ReflectedRoutes = self
            .rib
            .best_paths()
            .iter()
            .filter(|(_, path)| !path.ebgp)
            .filter_map(|(prefix, path)| {
                let peer = best.get(prefix)?.peer;
                let from_client = self.peers.get(&peer).is_some_and(|e| e.cfg.rr_client);
                let r = Reflected {
                    next_hop: path.next_hop,
                    peer,
                    from_client,
                    local_pref: path.local_pref,
                    attrs: path.attrs.clone(),
                };
                Some((*prefix, Arc::new(r)))
            })
            .collect();
        self.reflected.send_if_modified(|old| {
            if **old == next {
                return false;
            }
            *old = Arc::new(next);
            true
        });
    }

    /// Stops the peer's task (Cease) and drops its routes and its TCP MD5 key.
    fn remove_peer(&mut self, addr: IpAddr) -> PeerEntry {
        let e = self.peers.remove(&addr).expect("listed");
        self.accept_map.write().unwrap_or_else(|e| e.into_inner()).remove(&addr);
        // The task sends Cease and ends by itself; its connections flush on their own.
        let _ = e.cmds.send(PeerCmd::Stop);
        self.set_md5(addr, false);
        self.rib.remove_peer(addr);
        e
    }

    /// The peers' own passwords from now on; a configured peer whose password changed starts
    /// over with the new one (re-keyed listening socket, new connection).
    fn set_passwords(&mut self, map: HashMap<IpAddr, Vec<u8>>) {
        let map: HashMap<IpAddr, Vec<u8>> = map.into_iter().map(|(a, p)| (a.to_canonical(), p)).collect();
        let changed: Vec<IpAddr> = self
            .peers
            .keys()
            .filter(|a| self.password(**a) != effective(&map, &self.shared.cfg.md5_password, **a))
            .copied()
            .collect();
        let restart: Vec<PeerConfig> = changed.into_iter().map(|a| self.remove_peer(a).cfg).collect();
        self.passwords = map;
        for p in restart {
            tracing::info!(peer = %p.addr, "the BGP peer's password changed: re-keyed, reconnecting");
            self.add_peer(p);
        }
    }

    /// The TCP MD5 password of the sessions with `peer`.
    fn password(&self, peer: IpAddr) -> Option<&[u8]> {
        effective(&self.passwords, &self.shared.cfg.md5_password, peer)
    }

    /// Starts a task for the configured peer, with its TCP MD5 key on the listening sockets.
    fn add_peer(&mut self, p: PeerConfig) {
        let addr = p.addr;
        self.set_md5(addr, true);
        let (tx, rx) = mpsc::unbounded_channel();
        self.next_generation += 1;
        let generation = self.next_generation;
        let mut task = PeerTask::new(
            Arc::clone(&self.shared),
            p.clone(),
            generation,
            self.core_tx.clone(),
            self.exports.clone(),
            self.reflected_rx.clone(),
            rx,
        );
        if let Some(own) = self.passwords.get(&addr) {
            task = task.with_md5(Some(own.clone()).filter(|p| !p.is_empty()));
        }
        let task = tokio::spawn(task.run());
        self.accept_map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, tx.clone());
        self.peers.insert(
            addr,
            PeerEntry {
                cfg: p,
                generation,
                awaiting_end_of_rib: None,
                cmds: tx,
                task,
            },
        );
    }

    /// With a BGP password: adds (`on`) or removes `peer`'s TCP MD5 key on the listening
    /// sockets of its family, so that its connections in are signed (and unsigned ones from it
    /// dropped).
    fn set_md5(&self, peer: IpAddr, on: bool) {
        let Some(password) = self.password(peer) else {
            return;
        };
        let key: &[u8] = if on { password } else { &[] };
        for l in &self.listeners {
            if l.local_addr().is_ok_and(|a| a.is_ipv6() == peer.is_ipv6()) {
                if let Err(e) = io::set_md5(l.as_ref(), peer, key) {
                    tracing::warn!(%peer, error = %e, "setting the TCP MD5 key of a BGP peer on the listening socket");
                }
            }
        }
    }
}

/// The password of `peer`: its own, else the speaker's; empty is none.
fn effective<'a>(own: &'a HashMap<IpAddr, Vec<u8>>, default: &'a Option<Vec<u8>>, peer: IpAddr) -> Option<&'a [u8]> {
    own.get(&peer)
        .or(default.as_ref())
        .map(Vec::as_slice)
        .filter(|p| !p.is_empty())
}

impl Drop for Core {
    /// The speaker is gone: peers stop at once, without NOTIFICATIONs.
    fn drop(&mut self) {
        for e in self.peers.values() {
            e.task.abort();
        }
    }
}
