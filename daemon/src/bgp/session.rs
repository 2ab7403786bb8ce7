//! The state machine of one BGP connection (RFC 4271 §8), without I/O: frames and timer ticks
//! go in, [`Output`]s (messages to send, the session coming up, UPDATEs, the end) come out.
//!
//! A connection starts once TCP is up, in OpenSent (our OPEN is the first output), moves to
//! OpenConfirm when the peer's OPEN is acceptable (we answer KEEPALIVE) and to Established on
//! the peer's KEEPALIVE. Any error sends the NOTIFICATION RFC 4271 §6 prescribes and ends in
//! Idle; so do a NOTIFICATION received and the TCP connection closing. The Idle, Connect and
//! Active states (retrying, connecting, waiting for the peer) belong to the peer as a whole,
//! and so does collision resolution (two connections to one peer): see `peer.rs`.

use super::wire::{err, msg, Capability, Family, GracefulRestart, Message, Notification, Open, Update};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The hold time before the OPEN exchange (RFC 4271 §8.2.2 suggests 4 minutes).
const OPEN_HOLD_TIME: Duration = Duration::from_secs(240);

/// What this speaker says about itself in OPEN.
#[derive(Clone, Debug)]
pub struct Local {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// 0 (no keepalives) or at least 3 seconds.
    pub hold_time: u16,
    /// The graceful-restart capability we send, if any.
    pub graceful_restart: Option<GracefulRestart>,
}

impl Local {
    fn open(&self) -> Open {
        let mut capabilities: Vec<Capability> = Family::ALL
            .iter()
            .map(|f| {
                let (afi, safi) = f.afi_safi();
                Capability::Multiprotocol { afi, safi }
            })
            .collect();
        capabilities.push(Capability::RouteRefresh);
        capabilities.push(Capability::FourOctetAs(self.asn));
        if let Some(gr) = &self.graceful_restart {
            capabilities.push(Capability::GracefulRestart(gr.clone()));
        }
        Open {
            asn: self.asn,
            hold_time: self.hold_time,
            router_id: self.router_id,
            capabilities,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// What both OPENs agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub remote_id: Ipv4Addr,
    pub remote_asn: u32,
    pub ebgp: bool,
    /// Seconds; 0: no hold timer and no keepalives.
    pub hold_time: u16,
    pub four_octet_as: bool,
    /// The families both sides carry.
    pub families: Vec<Family>,
    /// The peer's graceful-restart capability, if it sent one.
    pub peer_graceful_restart: Option<GracefulRestart>,
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Sent(Notification),
    Received(Notification),
    /// The TCP connection closed or failed (no NOTIFICATION either way).
    Tcp(String),
}

impl CloseReason {
    /// Whether a graceful-restart-capable peer's routes are kept (RFC 4724 §4.2: when the
    /// session ends without a NOTIFICATION).
    pub fn keeps_routes(&self) -> bool {
        matches!(self, CloseReason::Tcp(_))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send(Message),
    /// The peer's OPEN was accepted (its BGP identifier is now known): resolve collisions
    /// before the KEEPALIVE that follows.
    OpenReceived,
    Established,
    Update(Update),
    RouteRefresh(Family),
    Closed(CloseReason),
}

pub struct Session {
    local: Arc<Local>,
    peer_asn: u32,
    state: State,
    negotiated: Option<Negotiated>,
    hold_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
}

impl Session {
    /// A connection to a peer of AS `peer_asn` has come up: sends our OPEN.
    pub fn start(local: Arc<Local>, peer_asn: u32, now: Instant) -> (Session, Vec<Output>) {
        let open = Message::Open(local.open());
        let s = Session {
            local,
            peer_asn,
            state: State::OpenSent,
            negotiated: None,
            hold_deadline: Some(now + OPEN_HOLD_TIME),
            keepalive_deadline: None,
        };
        (s, vec![Output::Send(open)])
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// How AS numbers are encoded on this connection.
    pub fn four_octet_as(&self) -> bool {
        self.negotiated.as_ref().is_some_and(|n| n.four_octet_as)
    }

    /// When [`Session::on_timer`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.hold_deadline, self.keepalive_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A message (type and body, its header already checked) arrived.
    pub fn on_frame(&mut self, now: Instant, ty: u8, body: &[u8]) -> Vec<Output> {
        if self.state == State::Idle {
            return Vec::new();
        }
        // A message the state does not expect is an FSM error (RFC 4271 §6.6, RFC 6608) before
        // its body is looked at: an UPDATE before OPEN is decoded with no capabilities agreed,
        // so it would otherwise fail as malformed (3/11 for a four-octet AS_PATH).
        let expected = match self.state {
            State::OpenSent => matches!(ty, msg::OPEN | msg::NOTIFICATION),
            State::OpenConfirm => matches!(ty, msg::KEEPALIVE | msg::NOTIFICATION),
            _ => true,
        };
        if !expected {
            return self.fsm_error();
        }
        let msg = match Message::decode(ty, body, self.four_octet_as()) {
            Ok(m) => m,
            Err(n) => return self.fail(n),
        };
        if self.state != State::OpenSent {
            self.restart_hold_timer(now);
        }
        match (self.state, msg) {
            (_, Message::Notification(n)) => {
                self.end();
                vec![Output::Closed(CloseReason::Received(n))]
            }
            (State::OpenSent, Message::Open(open)) => self.on_open(now, open),
            (State::OpenConfirm, Message::Keepalive) => {
                self.state = State::Established;
                vec![Output::Established]
            }
            (State::Established, Message::Keepalive) => Vec::new(),
            (State::Established, Message::Update(u)) => vec![Output::Update(u)],
            (State::Established, Message::RouteRefresh(afi, safi)) => {
                // RFC 2918 §4: a refresh for a family not negotiated is ignored.
                match Family::from_afi_safi(afi, safi) {
                    Some(f) if self.negotiated.as_ref().is_some_and(|n| n.families.contains(&f)) => {
                        vec![Output::RouteRefresh(f)]
                    }
                    _ => Vec::new(),
                }
            }
            _ => self.fsm_error(),
        }
    }

    /// A message the current state does not expect: FSM error, with the RFC 6608 subcode.
    fn fsm_error(&mut self) -> Vec<Output> {
        let subcode = match self.state {
            State::OpenSent => err::FSM_IN_OPENSENT,
            State::OpenConfirm => err::FSM_IN_OPENCONFIRM,
            _ => err::FSM_IN_ESTABLISHED,
        };
        self.fail(Notification::new(err::FSM, subcode, Vec::new()))
    }

    /// The byte stream could not be framed (a message header error).
    pub fn on_malformed(&mut self, n: Notification) -> Vec<Output> {
        self.fail(n)
    }

    pub fn on_tcp_closed(&mut self, why: String) -> Vec<Output> {
        if self.state == State::Idle {
            return Vec::new();
        }
        self.end();
        vec![Output::Closed(CloseReason::Tcp(why))]
    }

    /// Ends the session with `n` (a Cease, usually).
    pub fn stop(&mut self, n: Notification) -> Vec<Output> {
        if self.state == State::Idle {
            return Vec::new();
        }
        self.fail(n)
    }

    /// Hold timer expiry, keepalives due.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        if self.hold_deadline.is_some_and(|d| d <= now) {
            return self.fail(Notification::new(err::HOLD_TIMER_EXPIRED, 0, Vec::new()));
        }
        match self.keepalive_deadline {
            Some(d) if d <= now => {
                self.keepalive_deadline = Some(now + self.keepalive_interval());
                vec![Output::Send(Message::Keepalive)]
            }
            _ => Vec::new(),
        }
    }

    fn on_open(&mut self, now: Instant, open: Open) -> Vec<Output> {
        if open.asn != self.peer_asn {
            return self.fail(Notification::new(err::OPEN, err::OPEN_BAD_PEER_AS, Vec::new()));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return self.fail(Notification::new(
                err::OPEN,
                err::OPEN_UNACCEPTABLE_HOLD_TIME,
                Vec::new(),
            ));
        }
        let ibgp = open.asn == self.local.asn;
        if open.router_id.is_unspecified() || (ibgp && open.router_id == self.local.router_id) {
            return self.fail(Notification::new(err::OPEN, err::OPEN_BAD_BGP_ID, Vec::new()));
        }
        let hold_time = self.local.hold_time.min(open.hold_time);
        self.negotiated = Some(Negotiated {
            remote_id: open.router_id,
            remote_asn: open.asn,
            ebgp: !ibgp,
            hold_time,
            four_octet_as: open.four_octet_as(),
            // We carry every family; the peer's decide.
            families: open.families(),
            peer_graceful_restart: open.graceful_restart().cloned(),
        });
        self.state = State::OpenConfirm;
        self.restart_hold_timer(now);
        self.keepalive_deadline = (hold_time > 0).then(|| now + self.keepalive_interval());
        // Collisions are resolved before the KEEPALIVE, so that a connection that loses is
        // never confirmed to the peer.
        vec![Output::OpenReceived, Output::Send(Message::Keepalive)]
    }

    fn keepalive_interval(&self) -> Duration {
        let hold = self.negotiated.as_ref().map_or(0, |n| n.hold_time);
        Duration::from_secs(u64::from(hold / 3).max(1))
    }

    fn restart_hold_timer(&mut self, now: Instant) {
        self.hold_deadline = match self.negotiated.as_ref().map(|n| n.hold_time) {
            Some(0) => None,
            Some(h) => Some(now + Duration::from_secs(u64::from(h))),
            None => self.hold_deadline,
        };
    }

    fn end(&mut self) {
        self.state = State::Idle;
        self.hold_deadline = None;
        self.keepalive_deadline = None;
    }

    fn fail(&mut self, n: Notification) -> Vec<Output> {
        self.end();
        vec![
            Output::Send(Message::Notification(n.clone())),
            Output::Closed(CloseReason::Sent(n)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{msg, HEADER_LEN};
    use super::*;

    fn local() -> Arc<Local> {
        Arc::new(Local {
            asn: 64512,
            router_id: "192.168.0.1".parse().unwrap(),
            hold_time: 9,
            graceful_restart: None,
        })
    }

    fn peer_open(asn: u32, hold_time: u16, id: &str) -> Open {
        Open {
            asn,
            hold_time,
            router_id: id.parse().unwrap(),
            capabilities: vec![
                Capability::Multiprotocol { afi: 1, safi: 1 },
                Capability::FourOctetAs(asn),
            ],
        }
    }

    /// Feeds a message to the session as the reader would (header checked, body only).
    fn feed(s: &mut Session, now: Instant, m: Message) -> Vec<Output> {
        let bytes = m.encode(s.four_octet_as());
        let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
        let (ty, _) = super::super::wire::decode_header(&header).unwrap();
        s.on_frame(now, ty, &bytes[HEADER_LEN..])
    }

    fn notification(code: u8, subcode: u8) -> Vec<Output> {
        let n = Notification::new(code, subcode, Vec::new());
        vec![
            Output::Send(Message::Notification(n.clone())),
            Output::Closed(CloseReason::Sent(n)),
        ]
    }

    fn established(now: Instant) -> Session {
        let (mut s, _) = Session::start(local(), 64512, now);
        feed(&mut s, now, Message::Open(peer_open(64512, 30, "192.168.0.2")));
        assert_eq!(feed(&mut s, now, Message::Keepalive), [Output::Established]);
        s
    }

    #[test]
    fn open_keepalive_established() {
        let now = Instant::now();
        let (mut s, out) = Session::start(local(), 64512, now);
        assert_eq!(s.state(), State::OpenSent);
        let [Output::Send(Message::Open(open))] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert_eq!((open.asn, open.hold_time), (64512, 9));
        assert_eq!(open.families(), Family::ALL);
        assert!(open.route_refresh() && open.four_octet_as());

        let out = feed(&mut s, now, Message::Open(peer_open(64512, 30, "192.168.0.2")));
        assert_eq!(out, [Output::OpenReceived, Output::Send(Message::Keepalive)]);
        assert_eq!(s.state(), State::OpenConfirm);
        let n = s.negotiated().unwrap();
        assert_eq!(
            (n.hold_time, n.ebgp, n.four_octet_as),
            (9, false, true),
            "hold time is the smaller one"
        );
        assert_eq!(n.families, [Family::Ipv4Unicast]);

        assert_eq!(feed(&mut s, now, Message::Keepalive), [Output::Established]);
        assert_eq!(s.state(), State::Established);
        let u = Update::end_of_rib(Family::Ipv4Unicast);
        assert_eq!(feed(&mut s, now, Message::Update(u.clone())), [Output::Update(u)]);
        assert_eq!(
            feed(&mut s, now, Message::RouteRefresh(1, 1)),
            [Output::RouteRefresh(Family::Ipv4Unicast)]
        );
        assert_eq!(
            feed(&mut s, now, Message::RouteRefresh(2, 1)),
            [],
            "IPv6 was not negotiated"
        );
    }

    #[test]
    fn unacceptable_opens() {
        let now = Instant::now();
        for (open, subcode) in [
            (peer_open(64999, 30, "192.168.0.2"), err::OPEN_BAD_PEER_AS),
            (peer_open(64512, 2, "192.168.0.2"), err::OPEN_UNACCEPTABLE_HOLD_TIME),
            (peer_open(64512, 30, "0.0.0.0"), err::OPEN_BAD_BGP_ID),
            (peer_open(64512, 30, "192.168.0.1"), err::OPEN_BAD_BGP_ID),
        ] {
            let (mut s, _) = Session::start(local(), 64512, now);
            assert_eq!(feed(&mut s, now, Message::Open(open)), notification(err::OPEN, subcode));
            assert_eq!(s.state(), State::Idle);
            assert_eq!(feed(&mut s, now, Message::Keepalive), [], "nothing after the end");
        }
        // Hold time 0 is acceptable: no keepalives, no hold timer.
        let (mut s, _) = Session::start(local(), 64512, now);
        feed(&mut s, now, Message::Open(peer_open(64512, 0, "192.168.0.2")));
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn messages_out_of_order_are_fsm_errors() {
        let now = Instant::now();
        let (mut s, _) = Session::start(local(), 64512, now);
        assert_eq!(
            feed(&mut s, now, Message::Keepalive),
            notification(err::FSM, err::FSM_IN_OPENSENT)
        );
        let (mut s, _) = Session::start(local(), 64512, now);
        feed(&mut s, now, Message::Open(peer_open(64512, 30, "192.168.0.2")));
        assert_eq!(
            feed(&mut s, now, Message::Update(Update::default())),
            notification(err::FSM, err::FSM_IN_OPENCONFIRM)
        );
        let mut s = established(now);
        assert_eq!(
            feed(&mut s, now, Message::Open(peer_open(64512, 30, "192.168.0.2"))),
            notification(err::FSM, err::FSM_IN_ESTABLISHED)
        );
    }

    #[test]
    fn malformed_update_and_notifications() {
        let now = Instant::now();
        let mut s = established(now);
        // An UPDATE whose attribute length runs past the end.
        let out = s.on_frame(now, msg::UPDATE, &[0, 0, 0, 9, 0x40]);
        assert_eq!(out, notification(err::UPDATE, err::UPDATE_MALFORMED_ATTRIBUTE_LIST));

        let mut s = established(now);
        let n = Notification::cease(err::CEASE_ADMIN_SHUTDOWN);
        assert_eq!(
            feed(&mut s, now, Message::Notification(n.clone())),
            [Output::Closed(CloseReason::Received(n))]
        );
        assert_eq!(s.state(), State::Idle);

        let mut s = established(now);
        let out = s.on_tcp_closed("reset".into());
        assert!(matches!(&out[..], [Output::Closed(r)] if r.keeps_routes()));
    }

    #[test]
    fn timers() {
        let t0 = Instant::now();
        let (mut s, _) = Session::start(local(), 64512, t0);
        assert_eq!(s.next_deadline(), Some(t0 + OPEN_HOLD_TIME));
        feed(&mut s, t0, Message::Open(peer_open(64512, 30, "192.168.0.2")));
        // Hold 9 s: keepalives every 3 s.
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(3)));
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(s.on_timer(t3), [Output::Send(Message::Keepalive)]);
        assert_eq!(feed(&mut s, t3, Message::Keepalive), [Output::Established]);
        // A message restarts the hold timer; silence for 9 s ends the session.
        let t12 = t3 + Duration::from_secs(9);
        assert_eq!(
            s.on_timer(t12 - Duration::from_millis(1)),
            [Output::Send(Message::Keepalive)]
        );
        assert_eq!(s.on_timer(t12), notification(err::HOLD_TIMER_EXPIRED, 0));
        assert_eq!(s.next_deadline(), None);
    }
}
