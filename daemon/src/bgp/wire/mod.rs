//! BGP-4 messages on the wire: RFC 4271 §4, with what the speaker uses of RFC 4760 (MP_REACH /
//! MP_UNREACH for IPv6 unicast), RFC 6793 (4-octet AS numbers), RFC 2918 (ROUTE-REFRESH) and
//! RFC 4724 (the graceful-restart capability, End-of-RIB).
//!
//! Decoding is strict and every failure is the NOTIFICATION that RFC 4271 §6 prescribes for it
//! (code, subcode and data), so the session only has to send what the decoder returns. Checks
//! that need the session (peer AS, our own address as NEXT_HOP, loops, policy) are done by the
//! caller; this module knows nothing but bytes.

#[cfg(test)]
mod tests;
mod update;

pub use update::{decode_update, AsPath, AsSegment, Attr, MpReach, MpUnreach, Update, AS_SEQUENCE, AS_SET};

use ipnetwork::IpNetwork;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use update::encode_update;

pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
/// The 2-octet stand-in for a 4-octet AS number (RFC 6793).
pub const AS_TRANS: u32 = 23456;

/// Message types (RFC 4271 §4.1, RFC 2918).
pub mod msg {
    pub const OPEN: u8 = 1;
    pub const UPDATE: u8 = 2;
    pub const NOTIFICATION: u8 = 3;
    pub const KEEPALIVE: u8 = 4;
    pub const ROUTE_REFRESH: u8 = 5;
}

/// NOTIFICATION error codes and subcodes (RFC 4271 §4.5, §6; RFC 4486; RFC 6608).
pub mod err {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;

    pub const HEADER_NOT_SYNCHRONIZED: u8 = 1;
    pub const HEADER_BAD_LENGTH: u8 = 2;
    pub const HEADER_BAD_TYPE: u8 = 3;

    pub const OPEN_UNSPECIFIC: u8 = 0;
    pub const OPEN_UNSUPPORTED_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_BGP_ID: u8 = 3;
    pub const OPEN_UNSUPPORTED_PARAMETER: u8 = 4;
    pub const OPEN_UNACCEPTABLE_HOLD_TIME: u8 = 6;

    pub const UPDATE_MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UPDATE_UNRECOGNIZED_WELL_KNOWN: u8 = 2;
    pub const UPDATE_MISSING_WELL_KNOWN: u8 = 3;
    pub const UPDATE_ATTRIBUTE_FLAGS: u8 = 4;
    pub const UPDATE_ATTRIBUTE_LENGTH: u8 = 5;
    pub const UPDATE_INVALID_ORIGIN: u8 = 6;
    pub const UPDATE_INVALID_NEXT_HOP: u8 = 8;
    pub const UPDATE_OPTIONAL_ATTRIBUTE: u8 = 9;
    pub const UPDATE_INVALID_NETWORK_FIELD: u8 = 10;
    pub const UPDATE_MALFORMED_AS_PATH: u8 = 11;

    pub const FSM_IN_OPENSENT: u8 = 1;
    pub const FSM_IN_OPENCONFIRM: u8 = 2;
    pub const FSM_IN_ESTABLISHED: u8 = 3;

    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    pub const CEASE_PEER_DECONFIGURED: u8 = 3;
    pub const CEASE_COLLISION: u8 = 7;
}

/// Path attribute type codes.
pub mod attr {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH: u8 = 14;
    pub const MP_UNREACH: u8 = 15;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
}

const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_PARTIAL: u8 = 0x20;
const FLAG_EXTENDED: u8 = 0x10;

/// The address families the speaker carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4Unicast, Family::Ipv6Unicast];

    pub fn afi_safi(self) -> (u16, u8) {
        match self {
            Family::Ipv4Unicast => (1, 1),
            Family::Ipv6Unicast => (2, 1),
        }
    }

    pub fn from_afi_safi(afi: u16, safi: u8) -> Option<Family> {
        match (afi, safi) {
            (1, 1) => Some(Family::Ipv4Unicast),
            (2, 1) => Some(Family::Ipv6Unicast),
            _ => None,
        }
    }

    pub fn of(prefix: &IpNetwork) -> Family {
        match prefix {
            IpNetwork::V4(_) => Family::Ipv4Unicast,
            IpNetwork::V6(_) => Family::Ipv6Unicast,
        }
    }
}

/// A NOTIFICATION: what went wrong, sent just before the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: Vec<u8>) -> Notification {
        Notification { code, subcode, data }
    }

    fn update(subcode: u8, data: &[u8]) -> Notification {
        Notification::new(err::UPDATE, subcode, data.to_vec())
    }

    fn open(subcode: u8) -> Notification {
        Notification::new(err::OPEN, subcode, Vec::new())
    }

    pub fn cease(subcode: u8) -> Notification {
        Notification::new(err::CEASE, subcode, Vec::new())
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.code, self.subcode) {
            (err::HEADER, err::HEADER_NOT_SYNCHRONIZED) => "connection not synchronized",
            (err::HEADER, err::HEADER_BAD_LENGTH) => "bad message length",
            (err::HEADER, err::HEADER_BAD_TYPE) => "bad message type",
            (err::HEADER, _) => "message header error",
            (err::OPEN, err::OPEN_UNSUPPORTED_VERSION) => "unsupported version",
            (err::OPEN, err::OPEN_BAD_PEER_AS) => "bad peer AS",
            (err::OPEN, err::OPEN_BAD_BGP_ID) => "bad BGP identifier",
            (err::OPEN, err::OPEN_UNSUPPORTED_PARAMETER) => "unsupported optional parameter",
            (err::OPEN, err::OPEN_UNACCEPTABLE_HOLD_TIME) => "unacceptable hold time",
            (err::OPEN, _) => "OPEN message error",
            (err::UPDATE, err::UPDATE_MALFORMED_ATTRIBUTE_LIST) => "malformed attribute list",
            (err::UPDATE, err::UPDATE_UNRECOGNIZED_WELL_KNOWN) => "unrecognized well-known attribute",
            (err::UPDATE, err::UPDATE_MISSING_WELL_KNOWN) => "missing well-known attribute",
            (err::UPDATE, err::UPDATE_ATTRIBUTE_FLAGS) => "attribute flags error",
            (err::UPDATE, err::UPDATE_ATTRIBUTE_LENGTH) => "attribute length error",
            (err::UPDATE, err::UPDATE_INVALID_ORIGIN) => "invalid ORIGIN",
            (err::UPDATE, err::UPDATE_INVALID_NEXT_HOP) => "invalid NEXT_HOP",
            (err::UPDATE, err::UPDATE_OPTIONAL_ATTRIBUTE) => "optional attribute error",
            (err::UPDATE, err::UPDATE_INVALID_NETWORK_FIELD) => "invalid network field",
            (err::UPDATE, err::UPDATE_MALFORMED_AS_PATH) => "malformed AS_PATH",
            (err::UPDATE, _) => "UPDATE message error",
            (err::HOLD_TIMER_EXPIRED, _) => "hold timer expired",
            (err::FSM, _) => "finite state machine error",
            (err::CEASE, err::CEASE_ADMIN_SHUTDOWN) => "cease: administrative shutdown",
            (err::CEASE, err::CEASE_PEER_DECONFIGURED) => "cease: peer de-configured",
            (err::CEASE, err::CEASE_COLLISION) => "cease: connection collision resolution",
            (err::CEASE, _) => "cease",
            _ => "unknown error",
        };
        write!(f, "{}/{} ({what})", self.code, self.subcode)
    }
}

/// A capability in OPEN (RFC 5492).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol { afi: u16, safi: u8 },
    RouteRefresh,
    GracefulRestart(GracefulRestart),
    FourOctetAs(u32),
    Other { code: u8, data: Vec<u8> },
}

/// The graceful-restart capability (RFC 4724 §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GracefulRestart {
    /// The R bit: the sender has restarted (do not wait for its End-of-RIB before sending yours).
    pub restarted: bool,
    /// Seconds the sender's routes should be kept after its session drops (12 bits).
    pub restart_time: u16,
    /// (family, forwarding state preserved) for each family the sender restarts gracefully.
    pub families: Vec<(Family, bool)>,
}

const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_GRACEFUL_RESTART: u8 = 64;
const CAP_FOUR_OCTET_AS: u8 = 65;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The sender's AS: from the 4-octet capability when present, else the 2-octet field.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    /// The families the sender carries: those of its multiprotocol capabilities, or IPv4 unicast
    /// when it sends none (RFC 4760 §8).
    pub fn families(&self) -> Vec<Family> {
        let mp: Vec<(u16, u8)> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            return vec![Family::Ipv4Unicast];
        }
        Family::ALL.into_iter().filter(|f| mp.contains(&f.afi_safi())).collect()
    }

    pub fn route_refresh(&self) -> bool {
        self.capabilities.iter().any(|c| matches!(c, Capability::RouteRefresh))
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(gr) => Some(gr),
            _ => None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    /// ROUTE-REFRESH (RFC 2918): (AFI, SAFI).
    RouteRefresh(u16, u8),
}

impl Message {
    pub fn type_code(&self) -> u8 {
        match self {
            Message::Open(_) => msg::OPEN,
            Message::Update(_) => msg::UPDATE,
            Message::Notification(_) => msg::NOTIFICATION,
            Message::Keepalive => msg::KEEPALIVE,
            Message::RouteRefresh(..) => msg::ROUTE_REFRESH,
        }
    }

    /// The whole message, header included. `four_octet_as`: AS numbers in AS_PATH take four
    /// octets (both sides sent the capability).
    pub fn encode(&self, four_octet_as: bool) -> Vec<u8> {
        let mut out = vec![0xff; 16];
        out.extend_from_slice(&[0, 0, self.type_code()]);
        match self {
            Message::Open(o) => encode_open(o, &mut out),
            Message::Update(u) => encode_update(u, four_octet_as, &mut out),
            Message::Notification(n) => {
                out.extend_from_slice(&[n.code, n.subcode]);
                out.extend_from_slice(&n.data);
            }
            Message::Keepalive => {}
            Message::RouteRefresh(afi, safi) => {
                out.extend_from_slice(&afi.to_be_bytes());
                out.extend_from_slice(&[0, *safi]);
            }
        }
        let len = u16::try_from(out.len()).expect("a BGP message longer than 64 KiB");
        out[16..18].copy_from_slice(&len.to_be_bytes());
        out
    }

    /// The message of type `ty` whose body (after the header checked by [`decode_header`]) is
    /// `body`.
    pub fn decode(ty: u8, body: &[u8], four_octet_as: bool) -> Result<Message, Notification> {
        match ty {
            msg::OPEN => decode_open(body).map(Message::Open),
            msg::UPDATE => decode_update(body, four_octet_as).map(Message::Update),
            msg::NOTIFICATION if body.len() >= 2 => Ok(Message::Notification(Notification::new(
                body[0],
                body[1],
                body[2..].to_vec(),
            ))),
            msg::KEEPALIVE if body.is_empty() => Ok(Message::Keepalive),
            msg::ROUTE_REFRESH if body.len() == 4 => {
                Ok(Message::RouteRefresh(u16::from_be_bytes([body[0], body[1]]), body[3]))
            }
            msg::NOTIFICATION | msg::KEEPALIVE | msg::ROUTE_REFRESH => {
                let len = (body.len() + HEADER_LEN) as u16;
                Err(Notification::new(
                    err::HEADER,
                    err::HEADER_BAD_LENGTH,
                    len.to_be_bytes().to_vec(),
                ))
            }
            _ => Err(Notification::new(err::HEADER, err::HEADER_BAD_TYPE, vec![ty])),
        }
    }
}

/// Checks a message header (RFC 4271 §6.1) and returns (type, body length).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), Notification> {
    if h[..16].iter().any(|&b| b != 0xff) {
        return Err(Notification::new(err::HEADER, err::HEADER_NOT_SYNCHRONIZED, Vec::new()));
    }
    let len = u16::from_be_bytes([h[16], h[17]]);
    let ty = h[18];
    let bad_length = Notification::new(err::HEADER, err::HEADER_BAD_LENGTH, len.to_be_bytes().to_vec());
    let len = usize::from(len);
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(bad_length);
    }
    let fits = match ty {
        msg::OPEN => len >= 29,
        msg::UPDATE => len >= 23,
        msg::NOTIFICATION => len >= 21,
        msg::KEEPALIVE => len == HEADER_LEN,
        msg::ROUTE_REFRESH => len == 23,
        _ => return Err(Notification::new(err::HEADER, err::HEADER_BAD_TYPE, vec![ty])),
    };
    if !fits {
        return Err(bad_length);
    }
    Ok((ty, len - HEADER_LEN))
}

/// A cursor over a byte slice; every read is `None` past the end.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn ipv4(&mut self) -> Option<Ipv4Addr> {
        self.u32().map(Ipv4Addr::from)
    }
    fn ipv6(&mut self) -> Option<Ipv6Addr> {
        self.take(16)
            .map(|b| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")))
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---- OPEN ----

fn encode_open(o: &Open, out: &mut Vec<u8>) {
    out.push(4);
    let my_as = u16::try_from(o.asn).unwrap_or(AS_TRANS as u16);
    out.extend_from_slice(&my_as.to_be_bytes());
    out.extend_from_slice(&o.hold_time.to_be_bytes());
    out.extend_from_slice(&o.router_id.octets());
    let mut caps = Vec::new();
    for c in &o.capabilities {
        let mut v = Vec::new();
        let code = match c {
            Capability::Multiprotocol { afi, safi } => {
                v.extend_from_slice(&afi.to_be_bytes());
                v.extend_from_slice(&[0, *safi]);
                CAP_MULTIPROTOCOL
            }
            Capability::RouteRefresh => CAP_ROUTE_REFRESH,
            Capability::GracefulRestart(gr) => {
                let flags_time = (u16::from(gr.restarted) << 15) | (gr.restart_time & 0x0fff);
                v.extend_from_slice(&flags_time.to_be_bytes());
                for (family, forwarding) in &gr.families {
                    let (afi, safi) = family.afi_safi();
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.extend_from_slice(&[safi, if *forwarding { 0x80 } else { 0 }]);
                }
                CAP_GRACEFUL_RESTART
            }
            Capability::FourOctetAs(asn) => {
                v.extend_from_slice(&asn.to_be_bytes());
                CAP_FOUR_OCTET_AS
            }
            Capability::Other { code, data } => {
                v.extend_from_slice(data);
                *code
            }
        };
        caps.push(code);
        caps.push(u8::try_from(v.len()).expect("capability longer than 255 bytes"));
        caps.extend_from_slice(&v);
    }
    // One optional parameter of type 2 per up to 255 bytes of capabilities.
    let mut params = Vec::new();
    let mut rest = caps.as_slice();
    while !rest.is_empty() {
        let mut n = 0;
        while n < rest.len() && n + 2 + usize::from(rest[n + 1]) <= 255 {
            n += 2 + usize::from(rest[n + 1]);
        }
        assert!(n > 0, "a capability longer than 253 bytes");
        params.push(2);
        params.push(n as u8);
        params.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out.push(u8::try_from(params.len()).expect("OPEN optional parameters longer than 255 bytes"));
    out.extend_from_slice(&params);
}

fn decode_open(body: &[u8]) -> Result<Open, Notification> {
    let unspecific = || Notification::open(err::OPEN_UNSPECIFIC);
    let mut c = Cur(body);
    let version = c.u8().ok_or_else(unspecific)?;
    if version != 4 {
        return Err(Notification::new(
            err::OPEN,
            err::OPEN_UNSUPPORTED_VERSION,
            4u16.to_be_bytes().to_vec(),
        ));
    }
    let my_as = c.u16().ok_or_else(unspecific)?;
    let hold_time = c.u16().ok_or_else(unspecific)?;
    let router_id = c.ipv4().ok_or_else(unspecific)?;
    let opt_len = c.u8().ok_or_else(unspecific)?;
    let mut params = Cur(c.take(usize::from(opt_len)).ok_or_else(unspecific)?);
    if !c.is_empty() {
        return Err(unspecific());
    }
    let mut capabilities = Vec::new();
    while !params.is_empty() {
        let ty = params.u8().ok_or_else(unspecific)?;
        let len = params.u8().ok_or_else(unspecific)?;
        let value = params.take(usize::from(len)).ok_or_else(unspecific)?;
        if ty != 2 {
            return Err(Notification::open(err::OPEN_UNSUPPORTED_PARAMETER));
        }
        let mut caps = Cur(value);
        while !caps.is_empty() {
            let code = caps.u8().ok_or_else(unspecific)?;
            let len = caps.u8().ok_or_else(unspecific)?;
            let data = caps.take(usize::from(len)).ok_or_else(unspecific)?;
            capabilities.push(decode_capability(code, data).ok_or_else(unspecific)?);
        }
    }
    let asn = capabilities
        .iter()
        .find_map(|c| match c {
            Capability::FourOctetAs(asn) => Some(*asn),
            _ => None,
        })
        .unwrap_or(u32::from(my_as));
    Ok(Open {
        asn,
        hold_time,
        router_id,
        capabilities,
    })
}

fn decode_capability(code: u8, data: &[u8]) -> Option<Capability> {
    let mut c = Cur(data);
    let cap = match code {
        CAP_MULTIPROTOCOL => {
            let afi = c.u16()?;
            let _reserved = c.u8()?;
            let safi = c.u8()?;
            Capability::Multiprotocol { afi, safi }
        }
        CAP_ROUTE_REFRESH => Capability::RouteRefresh,
        CAP_FOUR_OCTET_AS => Capability::FourOctetAs(c.u32()?),
        CAP_GRACEFUL_RESTART => {
            let flags_time = c.u16()?;
            let mut families = Vec::new();
            while !c.is_empty() {
                let afi = c.u16()?;
                let safi = c.u8()?;
                let flags = c.u8()?;
                if let Some(f) = Family::from_afi_safi(afi, safi) {
                    families.push((f, flags & 0x80 != 0));
                }
            }
            Capability::GracefulRestart(GracefulRestart {
                restarted: flags_time & 0x8000 != 0,
                restart_time: flags_time & 0x0fff,
                families,
            })
        }
        _ => {
            return Some(Capability::Other {
                code,
                data: data.to_vec(),
            })
        }
    };
    c.is_empty().then_some(cap)
}
