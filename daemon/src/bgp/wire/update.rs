//! UPDATE (RFC 4271 §4.3) with MP_REACH / MP_UNREACH (RFC 4760): path attributes, prefixes,
//! and every check of RFC 4271 §6.3 that needs nothing but the bytes.

use super::{
    attr, err, Cur, Family, Notification, AS_TRANS, FLAG_EXTENDED, FLAG_OPTIONAL, FLAG_PARTIAL, FLAG_TRANSITIVE,
};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// AS_PATH segment types.
pub const AS_SET: u8 = 1;
pub const AS_SEQUENCE: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsSegment {
    /// 1 AS_SET, 2 AS_SEQUENCE, 3 AS_CONFED_SEQUENCE, 4 AS_CONFED_SET.
    pub kind: u8,
    pub asns: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsPath(pub Vec<AsSegment>);

impl AsPath {
    /// The path length used in route selection (RFC 4271 §9.1.2.2: a set counts as one;
    /// confederation segments do not count).
    pub fn len(&self) -> usize {
        self.0
            .iter()
            .map(|s| match s.kind {
                AS_SEQUENCE => s.asns.len(),
                AS_SET => 1,
                _ => 0,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.0.iter().any(|s| s.asns.contains(&asn))
    }
}

/// MP_REACH_NLRI (RFC 4760 §3) for a family we carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: IpAddr,
    /// The link-local address of a 32-byte IPv6 next hop (RFC 2545).
    pub link_local: Option<Ipv6Addr>,
    pub nlri: Vec<IpNetwork>,
}

/// MP_UNREACH_NLRI (RFC 4760 §4) for a family we carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<IpNetwork>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Origin(u8),
    AsPath(AsPath),
    NextHop(Ipv4Addr),
    Med(u32),
    LocalPref(u32),
    AtomicAggregate,
    OriginatorId(Ipv4Addr),
    ClusterList(Vec<u32>),
    MpReach(MpReach),
    MpUnreach(MpUnreach),
    As4Path(AsPath),
    /// Anything else (an unknown optional attribute, AGGREGATOR, a family we do not carry),
    /// kept as it came.
    Other {
        flags: u8,
        code: u8,
        data: Vec<u8>,
    },
}

impl Attr {
    pub fn code(&self) -> u8 {
        match self {
            Attr::Origin(_) => attr::ORIGIN,
            Attr::AsPath(_) => attr::AS_PATH,
            Attr::NextHop(_) => attr::NEXT_HOP,
            Attr::Med(_) => attr::MED,
            Attr::LocalPref(_) => attr::LOCAL_PREF,
            Attr::AtomicAggregate => attr::ATOMIC_AGGREGATE,
            Attr::OriginatorId(_) => attr::ORIGINATOR_ID,
            Attr::ClusterList(_) => attr::CLUSTER_LIST,
            Attr::MpReach(_) => attr::MP_REACH,
            Attr::MpUnreach(_) => attr::MP_UNREACH,
            Attr::As4Path(_) => attr::AS4_PATH,
            Attr::Other { code, .. } => *code,
        }
    }
}

/// (optional, transitive) of each attribute we recognize.
fn known_flags(code: u8) -> Option<(bool, bool)> {
    use attr::*;
    match code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF | ATOMIC_AGGREGATE => Some((false, true)),
        MED | ORIGINATOR_ID | CLUSTER_LIST | MP_REACH | MP_UNREACH => Some((true, false)),
        AGGREGATOR | AS4_PATH | AS4_AGGREGATOR => Some((true, true)),
        _ => None,
    }
}

/// An UPDATE: IPv4 unicast in the classic fields, other families in MP attributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<IpNetwork>,
    pub attrs: Vec<Attr>,
    pub nlri: Vec<IpNetwork>,
}

impl Update {
    /// The End-of-RIB marker (RFC 4724 §2): an empty UPDATE for IPv4 unicast, an UPDATE with
    /// nothing but an empty MP_UNREACH for the others.
    pub fn end_of_rib(family: Family) -> Update {
        match family {
            Family::Ipv4Unicast => Update::default(),
            f => Update {
                attrs: vec![Attr::MpUnreach(MpUnreach {
                    family: f,
                    withdrawn: Vec::new(),
                })],
                ..Default::default()
            },
        }
    }

    /// The family this UPDATE is the End-of-RIB marker of, if it is one.
    pub fn as_end_of_rib(&self) -> Option<Family> {
        if !self.withdrawn.is_empty() || !self.nlri.is_empty() {
            return None;
        }
        match self.attrs.as_slice() {
            [] => Some(Family::Ipv4Unicast),
            [Attr::MpUnreach(u)] if u.withdrawn.is_empty() => Some(u.family),
            _ => None,
        }
    }

    pub fn get(&self, code: u8) -> Option<&Attr> {
        self.attrs.iter().find(|a| a.code() == code)
    }
}

// ---- prefixes ----

fn encode_prefix(p: &IpNetwork, out: &mut Vec<u8>) {
    let len = p.prefix();
    let n = usize::from(len).div_ceil(8);
    out.push(len);
    match p.network() {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()[..n]),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()[..n]),
    }
}

/// Prefixes in the NLRI encoding (RFC 4271 §4.3); `None` when malformed. Host bits past the
/// prefix length are cleared.
pub(super) fn decode_prefixes(buf: &[u8], family: Family) -> Option<Vec<IpNetwork>> {
    let max = match family {
        Family::Ipv4Unicast => 32,
        Family::Ipv6Unicast => 128,
    };
    let mut c = Cur(buf);
    let mut out = Vec::new();
    while !c.is_empty() {
        let len = c.u8()?;
        if len > max {
            return None;
        }
        let n = usize::from(len).div_ceil(8);
        let mut octets = [0u8; 16];
        octets[..n].copy_from_slice(c.take(n)?);
        if len % 8 != 0 {
            octets[n - 1] &= 0xffu8 << (8 - len % 8);
        }
        let ip = match family {
            Family::Ipv4Unicast => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
            Family::Ipv6Unicast => IpAddr::V6(Ipv6Addr::from(octets)),
        };
        out.push(IpNetwork::new(ip, len).expect("length checked"));
    }
    Some(out)
}

// ---- UPDATE ----

fn encode_as_path(p: &AsPath, four_octet_as: bool, out: &mut Vec<u8>) {
    for s in &p.0 {
        // A segment holds at most 255 ASes.
        for chunk in s.asns.chunks(255) {
            out.extend_from_slice(&[s.kind, chunk.len() as u8]);
            for asn in chunk {
                if four_octet_as {
                    out.extend_from_slice(&asn.to_be_bytes());
                } else {
                    let two = u16::try_from(*asn).unwrap_or(AS_TRANS as u16);
                    out.extend_from_slice(&two.to_be_bytes());
                }
            }
        }
    }
}

fn decode_as_path(buf: &[u8], four_octet_as: bool) -> Option<AsPath> {
    let mut c = Cur(buf);
    let mut segments = Vec::new();
    while !c.is_empty() {
        let kind = c.u8()?;
        let n = c.u8()?;
        if !(1..=4).contains(&kind) || n == 0 {
            return None;
        }
        let mut asns = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            asns.push(if four_octet_as { c.u32()? } else { u32::from(c.u16()?) });
        }
        segments.push(AsSegment { kind, asns });
    }
    Some(AsPath(segments))
}

fn encode_attr(a: &Attr, four_octet_as: bool, out: &mut Vec<u8>) {
    let mut v = Vec::new();
    match a {
        Attr::Origin(o) => v.push(*o),
        Attr::AsPath(p) => encode_as_path(p, four_octet_as, &mut v),
        Attr::As4Path(p) => encode_as_path(p, true, &mut v),
        Attr::NextHop(ip) | Attr::OriginatorId(ip) => v.extend_from_slice(&ip.octets()),
        Attr::Med(x) | Attr::LocalPref(x) => v.extend_from_slice(&x.to_be_bytes()),
        Attr::AtomicAggregate => {}
        Attr::ClusterList(ids) => ids.iter().for_each(|id| v.extend_from_slice(&id.to_be_bytes())),
        Attr::MpReach(r) => {
            let (afi, safi) = r.family.afi_safi();
            v.extend_from_slice(&afi.to_be_bytes());
            v.push(safi);
            let mut nh = match r.next_hop {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            if let Some(ll) = r.link_local {
                nh.extend_from_slice(&ll.octets());
            }
            v.push(nh.len() as u8);
            v.extend_from_slice(&nh);
            v.push(0);
            r.nlri.iter().for_each(|p| encode_prefix(p, &mut v));
        }
        Attr::MpUnreach(u) => {
            let (afi, safi) = u.family.afi_safi();
            v.extend_from_slice(&afi.to_be_bytes());
            v.push(safi);
            u.withdrawn.iter().for_each(|p| encode_prefix(p, &mut v));
        }
        Attr::Other { data, .. } => v.extend_from_slice(data),
    }
    let mut flags = match (a, known_flags(a.code())) {
        (Attr::Other { flags, .. }, _) => *flags & !FLAG_EXTENDED,
        (_, Some((optional, transitive))) => {
            (if optional { FLAG_OPTIONAL } else { 0 }) | (if transitive { FLAG_TRANSITIVE } else { 0 })
        }
        (_, None) => unreachable!("every typed attribute is known"),
    };
    if v.len() > 255 {
        flags |= FLAG_EXTENDED;
    }
    out.extend_from_slice(&[flags, a.code()]);
    if v.len() > 255 {
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    } else {
        out.push(v.len() as u8);
    }
    out.extend_from_slice(&v);
}

pub(super) fn encode_update(u: &Update, four_octet_as: bool, out: &mut Vec<u8>) {
    let mut withdrawn = Vec::new();
    u.withdrawn.iter().for_each(|p| encode_prefix(p, &mut withdrawn));
    let mut attrs = Vec::new();
    u.attrs.iter().for_each(|a| encode_attr(a, four_octet_as, &mut attrs));
    out.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    out.extend_from_slice(&withdrawn);
    out.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&attrs);
    u.nlri.iter().for_each(|p| encode_prefix(p, out));
}

/// A NEXT_HOP that is a valid IP host address (RFC 4271 §6.3): not 0.0.0.0/8, multicast,
/// reserved (240/4) or broadcast.
fn valid_host(ip: Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first != 0 && !ip.is_multicast() && first < 240
}

pub fn decode_update(body: &[u8], four_octet_as: bool) -> Result<Update, Notification> {
    use err::*;
    let malformed = || Notification::update(UPDATE_MALFORMED_ATTRIBUTE_LIST, &[]);
    let mut c = Cur(body);
    let withdrawn_len = c.u16().ok_or_else(malformed)?;
    let withdrawn = c.take(usize::from(withdrawn_len)).ok_or_else(malformed)?;
    let attrs_len = c.u16().ok_or_else(malformed)?;
    let mut attrs_buf = Cur(c.take(usize::from(attrs_len)).ok_or_else(malformed)?);
    let nlri_buf = c.0;

    let withdrawn = decode_prefixes(withdrawn, Family::Ipv4Unicast).ok_or_else(malformed)?;
    let mut attrs = Vec::new();
    let mut seen = [false; 256];
    while !attrs_buf.is_empty() {
        let start = attrs_buf.0;
        let flags = attrs_buf.u8().ok_or_else(malformed)?;
        let code = attrs_buf.u8().ok_or_else(malformed)?;
        let len = if flags & FLAG_EXTENDED != 0 {
            attrs_buf.u16().map(usize::from)
        } else {
            attrs_buf.u8().map(usize::from)
        }
        .ok_or_else(malformed)?;
        // Kept without the extended-length bit: encoding sets it again when needed.
        let flags = flags & !FLAG_EXTENDED;
        let value = attrs_buf.take(len).ok_or_else(malformed)?;
        let whole = &start[..start.len() - attrs_buf.0.len()];
        if std::mem::replace(&mut seen[usize::from(code)], true) {
            return Err(malformed());
        }
        let optional = flags & FLAG_OPTIONAL != 0;
        let transitive = flags & FLAG_TRANSITIVE != 0;
        let partial = flags & FLAG_PARTIAL != 0;
        match known_flags(code) {
            Some((o, t)) if o != optional || t != transitive || (partial && !(o && t)) => {
                return Err(Notification::update(UPDATE_ATTRIBUTE_FLAGS, whole));
            }
            Some(_) => {}
            None if !optional => return Err(Notification::update(UPDATE_UNRECOGNIZED_WELL_KNOWN, whole)),
            None => {
                attrs.push(Attr::Other {
                    flags,
                    code,
                    data: value.to_vec(),
                });
                continue;
            }
        }
        let length_error = || Notification::update(UPDATE_ATTRIBUTE_LENGTH, whole);
        let fixed = |n: usize| if len == n { Ok(()) } else { Err(length_error()) };
        let mut v = Cur(value);
        let a = match code {
            attr::ORIGIN => {
                fixed(1)?;
                let o = value[0];
                if o > 2 {
                    return Err(Notification::update(UPDATE_INVALID_ORIGIN, whole));
                }
                Attr::Origin(o)
            }
            attr::AS_PATH => Attr::AsPath(
                decode_as_path(value, four_octet_as)
                    .ok_or_else(|| Notification::update(UPDATE_MALFORMED_AS_PATH, &[]))?,
            ),
            attr::NEXT_HOP => {
                fixed(4)?;
                let ip = v.ipv4().expect("length checked");
                if !valid_host(ip) {
                    return Err(Notification::update(UPDATE_INVALID_NEXT_HOP, whole));
                }
                Attr::NextHop(ip)
            }
            attr::MED => {
                fixed(4)?;
                Attr::Med(v.u32().expect("length checked"))
            }
            attr::LOCAL_PREF => {
                fixed(4)?;
                Attr::LocalPref(v.u32().expect("length checked"))
            }
            attr::ATOMIC_AGGREGATE => {
                fixed(0)?;
                Attr::AtomicAggregate
            }
            attr::ORIGINATOR_ID => {
                fixed(4)?;
                Attr::OriginatorId(v.ipv4().expect("length checked"))
            }
            attr::CLUSTER_LIST => {
                if len % 4 != 0 {
                    return Err(length_error());
                }
                Attr::ClusterList(
                    value
                        .chunks(4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            attr::MP_REACH => match decode_mp_reach(value) {
                Ok(Some(r)) => Attr::MpReach(r),
                Ok(None) => Attr::Other {
                    flags,
                    code,
                    data: value.to_vec(),
                },
                Err(()) => return Err(Notification::update(UPDATE_OPTIONAL_ATTRIBUTE, whole)),
            },
            attr::MP_UNREACH => match decode_mp_unreach(value) {
                Ok(Some(u)) => Attr::MpUnreach(u),
                Ok(None) => Attr::Other {
                    flags,
                    code,
                    data: value.to_vec(),
                },
                Err(()) => return Err(Notification::update(UPDATE_OPTIONAL_ATTRIBUTE, whole)),
            },
            attr::AS4_PATH => match decode_as_path(value, true) {
                Some(p) => Attr::As4Path(p),
                // RFC 6793 §6: a malformed AS4_PATH is discarded, the UPDATE is not.
                None => continue,
            },
            _ => Attr::Other {
                flags,
                code,
                data: value.to_vec(),
            },
        };
        attrs.push(a);
    }
    let nlri = decode_prefixes(nlri_buf, Family::Ipv4Unicast)
        .ok_or_else(|| Notification::update(UPDATE_INVALID_NETWORK_FIELD, &[]))?;

    let mp_reach = attrs
        .iter()
        .any(|a| matches!(a, Attr::MpReach(r) if !r.nlri.is_empty()));
    let mut mandatory: &[u8] = &[];
    if !nlri.is_empty() {
        mandatory = &[attr::ORIGIN, attr::AS_PATH, attr::NEXT_HOP];
    } else if mp_reach {
        mandatory = &[attr::ORIGIN, attr::AS_PATH];
    }
    if let Some(missing) = mandatory.iter().find(|code| !seen[usize::from(**code)]) {
        return Err(Notification::update(UPDATE_MISSING_WELL_KNOWN, &[*missing]));
    }
    Ok(Update { withdrawn, attrs, nlri })
}

/// `Ok(None)`: a family we do not carry.
fn decode_mp_reach(value: &[u8]) -> Result<Option<MpReach>, ()> {
    let mut c = Cur(value);
    let afi = c.u16().ok_or(())?;
    let safi = c.u8().ok_or(())?;
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(None);
    };
    let nh_len = c.u8().ok_or(())?;
    let mut nh = Cur(c.take(usize::from(nh_len)).ok_or(())?);
    let (next_hop, link_local) = match (family, nh_len) {
        (Family::Ipv4Unicast, 4) => (IpAddr::V4(nh.ipv4().ok_or(())?), None),
        (_, 16) => (IpAddr::V6(nh.ipv6().ok_or(())?), None),
        (_, 32) => (IpAddr::V6(nh.ipv6().ok_or(())?), Some(nh.ipv6().ok_or(())?)),
        _ => return Err(()),
    };
    let _reserved = c.u8().ok_or(())?;
    let nlri = decode_prefixes(c.0, family).ok_or(())?;
    Ok(Some(MpReach {
        family,
        next_hop,
        link_local,
        nlri,
    }))
}

fn decode_mp_unreach(value: &[u8]) -> Result<Option<MpUnreach>, ()> {
    let mut c = Cur(value);
    let afi = c.u16().ok_or(())?;
    let safi = c.u8().ok_or(())?;
    let Some(family) = Family::from_afi_safi(afi, safi) else {
        return Ok(None);
    };
    let withdrawn = decode_prefixes(c.0, family).ok_or(())?;
    Ok(Some(MpUnreach { family, withdrawn }))
}
