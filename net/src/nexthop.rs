//! Nexthop objects (`ip nexthop`, Linux 5.3+): a gateway and device the kernel holds once, by
//! ID, for routes to point at (`ip route add 10.1.0.0/24 nhid 7`).
//!
//! Why the daemon wants them: when every route carries its own gateway, the kernel keeps one
//! `fib_info` per route and finds duplicates by scanning a hash chain that all such routes
//! share (same device, protocol and metric), so inserting the 10,000th route costs ~130 µs where
//! the first cost ~15 µs. A route that names a nexthop object hashes by the object's ID instead,
//! and insertion stays flat (bench/src/bin/convergence.rs measures both). Changing the gateway of
//! a nexthop also moves every route using it in one message.
//!
//! netlink-packet-route 0.34 has no nexthop message, so the wire format is here, from
//! `include/uapi/linux/nexthop.h`: a `struct nhmsg` header (family, scope, protocol, flags) and
//! `NHA_*` attributes. Only what single nexthops need is typed; groups are read (their IDs are
//! taken) but not built.
//!
//! Kernel behaviour worth knowing:
//! - deleting a nexthop deletes every route that uses it, and IPv4 routes go *without* a route
//!   notification: watch [`crate::monitor::Group::Nexthop`] to notice;
//! - a device going down or away deletes the nexthops on it (and so their routes);
//! - IDs are one space per network namespace, shared with every other user (FRR's zebra, other
//!   daemons): pick IDs nobody uses, and replace only IDs you own;
//! - a route with `nhid` must carry no gateway or device of its own ("Nexthop specification and
//!   nexthop id are mutually exclusive"), but dumps report the nexthop's gateway and device on
//!   the route too (`net.ipv4.nexthop_compat_mode`, on by default).

use std::net::IpAddr;

use netlink_packet_core::{DecodeError, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use crate::message::RtMessage;
use crate::reply::Failure;
use crate::route::RTPROT_BOOT;
use crate::{IpFamily, NetError, Netlink};

pub(crate) const RTM_NEWNEXTHOP: u16 = 104;
pub(crate) const RTM_DELNEXTHOP: u16 = 105;
pub(crate) const RTM_GETNEXTHOP: u16 = 106;

const NHMSG_LEN: usize = 8;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_BLACKHOLE: u16 = 4;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NLA_TYPE_MASK: u16 = 0x3fff;
const RTNH_F_ONLINK: u32 = 4;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// A nexthop object. Built with [`Nexthop::new`] and the setters, or returned by
/// [`Netlink::nexthops`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexthop {
    /// The ID routes refer to (`nhid`); never 0 (0 asks the kernel to pick one).
    pub id: u32,
    /// IPv4 or IPv6; `None` for groups (and blackholes made without `-4`/`-6`).
    pub family: Option<IpFamily>,
    /// `via GATEWAY`.
    pub gateway: Option<IpAddr>,
    /// `dev INDEX`.
    pub oif: Option<u32>,
    /// `onlink`: the gateway is on the link even if no address says so.
    pub onlink: bool,
    /// `RTPROT_*`: who owns the nexthop (`None` in a request: `RTPROT_BOOT`).
    pub protocol: Option<u8>,
    /// `blackhole`.
    pub blackhole: bool,
    /// For a group: its members' IDs.
    pub group: Vec<u32>,
}

impl Nexthop {
    /// A nexthop of `family` with ID `id`; give it a gateway and/or a device.
    pub fn new(id: u32, family: IpFamily) -> Self {
        Self {
            id,
            family: Some(family),
            gateway: None,
            oif: None,
            onlink: false,
            protocol: None,
            blackhole: false,
            group: Vec::new(),
        }
    }

    /// `via GATEWAY`.
    pub fn via(mut self, gateway: IpAddr) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// `dev INDEX`.
    pub fn dev(mut self, index: u32) -> Self {
        self.oif = Some(index);
        self
    }

    /// `onlink`.
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }

    /// `proto PROTOCOL`.
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = Some(protocol);
        self
    }

    fn message(&self) -> Result<NexthopMessage, NetError> {
        let invalid = |why: &str| Err(NetError::InvalidArgument(format!("nexthop id {}: {why}", self.id)));
        if self.id == 0 {
            return invalid("ID 0 would let the kernel pick one");
        }
        let Some(family) = self.family else {
            return invalid("no address family");
        };
        if self.gateway.is_some_and(|gw| IpFamily::of(gw) != family) {
            return invalid("the gateway is not of the nexthop's family");
        }
        if !self.group.is_empty() || self.blackhole {
            return invalid("groups and blackholes are not supported");
        }
        if self.gateway.is_none() && self.oif.is_none() {
            return invalid("neither a gateway nor a device");
        }
        let mut attributes = vec![NexthopAttribute::Id(self.id)];
        if let Some(oif) = self.oif {
            attributes.push(NexthopAttribute::Oif(oif));
        }
        if let Some(gw) = self.gateway {
            attributes.push(NexthopAttribute::Gateway(gw));
        }
        Ok(NexthopMessage {
            family: family_byte(family),
            scope: 0,
            protocol: self.protocol.unwrap_or(RTPROT_BOOT),
            flags: if self.onlink { RTNH_F_ONLINK } else { 0 },
            attributes,
        })
    }

    pub(crate) fn from_message(msg: &NexthopMessage) -> Option<Self> {
        let mut nh = Nexthop {
            id: 0,
            family: match msg.family {
                AF_INET => Some(IpFamily::V4),
                AF_INET6 => Some(IpFamily::V6),
                _ => None,
            },
            gateway: None,
            oif: None,
            onlink: msg.flags & RTNH_F_ONLINK != 0,
            protocol: Some(msg.protocol),
            blackhole: false,
            group: Vec::new(),
        };
        for attr in &msg.attributes {
            match attr {
                NexthopAttribute::Id(id) => nh.id = *id,
                NexthopAttribute::Oif(oif) => nh.oif = Some(*oif),
                NexthopAttribute::Gateway(gw) => nh.gateway = Some(*gw),
                NexthopAttribute::Blackhole => nh.blackhole = true,
                NexthopAttribute::Group(ids) => nh.group.clone_from(ids),
                NexthopAttribute::Other(..) => {}
            }
        }
        (nh.id != 0).then_some(nh)
    }

    /// `id 7 via 10.0.0.2 dev vxlan0 onlink proto 117`, with the link name looked up.
    async fn describe(&self, nl: &Netlink) -> String {
        let mut s = format!("id {}", self.id);
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" via {gw}"));
        }
        if let Some(oif) = self.oif {
            s.push_str(&format!(" dev {}", nl.link_label(oif).await));
        }
        if self.onlink {
            s.push_str(" onlink");
        }
        if let Some(p) = self.protocol {
            s.push_str(&format!(" proto {p}"));
        }
        s
    }
}

fn family_byte(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

/// One `NHA_*` attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NexthopAttribute {
    Id(u32),
    /// `struct nexthop_grp` entries; only the member IDs are kept.
    Group(Vec<u32>),
    Blackhole,
    Oif(u32),
    Gateway(IpAddr),
    /// Anything else, kept as its type and payload.
    Other(u16, Vec<u8>),
}

impl NexthopAttribute {
    fn kind(&self) -> u16 {
        match self {
            Self::Id(_) => NHA_ID,
            Self::Group(_) => NHA_GROUP,
            Self::Blackhole => NHA_BLACKHOLE,
            Self::Oif(_) => NHA_OIF,
            Self::Gateway(_) => NHA_GATEWAY,
            Self::Other(kind, _) => *kind,
        }
    }

    /// The payload's length (without the 4-byte header and padding).
    fn value_len(&self) -> usize {
        match self {
            Self::Id(_) | Self::Oif(_) => 4,
            // struct nexthop_grp { u32 id; u8 weight; u8 weight_high; u16 resvd2; }
            Self::Group(ids) => 8 * ids.len(),
            Self::Blackhole => 0,
            Self::Gateway(IpAddr::V4(_)) => 4,
            Self::Gateway(IpAddr::V6(_)) => 16,
            Self::Other(_, bytes) => bytes.len(),
        }
    }

    /// Writes the payload into `out`, exactly [`NexthopAttribute::value_len`] bytes.
    fn emit_value(&self, out: &mut [u8]) {
        match self {
            Self::Id(v) | Self::Oif(v) => out.copy_from_slice(&v.to_ne_bytes()),
            Self::Group(ids) => {
                for (entry, id) in out.chunks_exact_mut(8).zip(ids) {
                    entry[..4].copy_from_slice(&id.to_ne_bytes());
                    entry[4..].fill(0);
                }
            }
            Self::Blackhole => {}
            Self::Gateway(IpAddr::V4(ip)) => out.copy_from_slice(&ip.octets()),
            Self::Gateway(IpAddr::V6(ip)) => out.copy_from_slice(&ip.octets()),
            Self::Other(_, bytes) => out.copy_from_slice(bytes),
        }
    }

    fn parse(kind: u16, value: &[u8], family: u8) -> Result<Self, DecodeError> {
        let u32_of = |what: &str| -> Result<u32, DecodeError> {
            let b: [u8; 4] = value
                .try_into()
                .map_err(|_| DecodeError::from(format!("{what}: {} bytes, want 4", value.len())))?;
            Ok(u32::from_ne_bytes(b))
        };
        Ok(match kind {
            NHA_ID => Self::Id(u32_of("NHA_ID")?),
            NHA_OIF => Self::Oif(u32_of("NHA_OIF")?),
            NHA_BLACKHOLE => Self::Blackhole,
            NHA_GATEWAY => match (family, value.len()) {
                (AF_INET, 4) => Self::Gateway(IpAddr::from(<[u8; 4]>::try_from(value).expect("4 bytes"))),
                (AF_INET6, 16) => Self::Gateway(IpAddr::from(<[u8; 16]>::try_from(value).expect("16 bytes"))),
                _ => Self::Other(kind, value.to_vec()),
            },
            NHA_GROUP if value.len().is_multiple_of(8) => Self::Group(
                value
                    .chunks_exact(8)
                    .map(|e| u32::from_ne_bytes(e[0..4].try_into().expect("4 bytes")))
                    .collect(),
            ),
            _ => Self::Other(kind, value.to_vec()),
        })
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// `struct nhmsg` and its attributes: the payload of an `RTM_*NEXTHOP` message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NexthopMessage {
    pub(crate) family: u8,
    pub(crate) scope: u8,
    pub(crate) protocol: u8,
    pub(crate) flags: u32,
    pub(crate) attributes: Vec<NexthopAttribute>,
}

impl NexthopMessage {
    pub(crate) fn buffer_len(&self) -> usize {
        NHMSG_LEN + self.attributes.iter().map(|a| align4(4 + a.value_len())).sum::<usize>()
    }

    /// Writes the message into `buf`, which is exactly [`NexthopMessage::buffer_len`] long.
    pub(crate) fn emit(&self, buf: &mut [u8]) {
        buf[..NHMSG_LEN].copy_from_slice(&[self.family, self.scope, self.protocol, 0, 0, 0, 0, 0]);
        buf[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        let mut off = NHMSG_LEN;
        for a in &self.attributes {
            let len = 4 + a.value_len();
            buf[off..off + 2].copy_from_slice(&(len as u16).to_ne_bytes());
            buf[off + 2..off + 4].copy_from_slice(&a.kind().to_ne_bytes());
            a.emit_value(&mut buf[off + 4..off + len]);
            buf[off + len..off + align4(len)].fill(0);
            off += align4(len);
        }
    }

    pub(crate) fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() < NHMSG_LEN {
            return Err(format!("nexthop message of {} bytes, shorter than struct nhmsg", buf.len()).into());
        }
        let mut msg = NexthopMessage {
            family: buf[0],
            scope: buf[1],
            protocol: buf[2],
            flags: u32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes")),
            attributes: Vec::new(),
        };
        let mut off = NHMSG_LEN;
        while off + 4 <= buf.len() {
            let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
            let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
            if len < 4 || off + len > buf.len() {
                return Err(format!("nexthop attribute {kind} of length {len} overruns the message").into());
            }
            msg.attributes
                .push(NexthopAttribute::parse(kind, &buf[off + 4..off + len], msg.family)?);
            off += align4(len);
        }
        Ok(msg)
    }
}

impl Netlink {
    /// `ip nexthop add`: an existing ID is an EEXIST error.
    pub async fn add_nexthop(&self, nh: &Nexthop) -> Result<(), NetError> {
        self.new_nexthop(nh, NLM_F_CREATE | NLM_F_EXCL, "adding").await
    }

    /// `ip nexthop replace`: creates the nexthop or changes the one with this ID (and every route
    /// using it, at once).
    pub async fn replace_nexthop(&self, nh: &Nexthop) -> Result<(), NetError> {
        self.new_nexthop(nh, NLM_F_CREATE | NLM_F_REPLACE, "replacing").await
    }

    /// `ip nexthop del id ID`: a missing nexthop is success. The routes using it go with it.
    pub async fn del_nexthop(&self, id: u32) -> Result<(), NetError> {
        let msg = NexthopMessage {
            attributes: vec![NexthopAttribute::Id(id)],
            ..Default::default()
        };
        match self.ack(RtMessage::Nexthop(RTM_DELNEXTHOP, msg), 0).await {
            Err(f) if !f.is_not_found() => Err(f.context(format!("deleting nexthop id {id}"))),
            _ => Ok(()),
        }
    }

    /// Every nexthop object in the namespace, whoever made it.
    pub async fn nexthops(&self) -> Result<Vec<Nexthop>, NetError> {
        Ok(self
            .dump_nexthops()
            .await
            .map_err(|f| f.context("listing nexthops"))?
            .iter()
            .filter_map(Nexthop::from_message)
            .collect())
    }

    /// Whether the kernel has nexthop objects (Linux 5.3 and later): `false` when it does not
    /// know the request (EOPNOTSUPP).
    pub async fn nexthops_supported(&self) -> Result<bool, NetError> {
        match self.dump_nexthops().await {
            Ok(_) => Ok(true),
            Err(Failure::Kernel { errno, .. }) if errno == libc::EOPNOTSUPP => Ok(false),
            Err(f) => Err(f.context("listing nexthops")),
        }
    }

    async fn dump_nexthops(&self) -> Result<Vec<NexthopMessage>, Failure> {
        let replies = self
            .dump_rt(RtMessage::Nexthop(RTM_GETNEXTHOP, NexthopMessage::default()))
            .await?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RtMessage::Nexthop(RTM_NEWNEXTHOP, n) => Some(n),
                _ => None,
            })
            .collect())
    }

    async fn new_nexthop(&self, nh: &Nexthop, flags: u16, verb: &str) -> Result<(), NetError> {
        let msg = RtMessage::Nexthop(RTM_NEWNEXTHOP, nh.message()?);
        match self.ack(msg, flags).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(format!("{verb} nexthop {}", nh.describe(self).await))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ip nexthop add id 42 via 10.6.0.1 dev #3 onlink proto 117` as iproute2 6.1 sends it
    /// (captured with strace, netlink header removed).
    const IP_NEXTHOP_ADD: [u8; 32] = [
        0x02, 0x00, 0x75, 0x00, 0x04, 0x00, 0x00, 0x00, // nhmsg: AF_INET, proto 117, ONLINK
        0x08, 0x00, 0x01, 0x00, 0x2a, 0x00, 0x00, 0x00, // NHA_ID 42
        0x08, 0x00, 0x05, 0x00, 0x03, 0x00, 0x00, 0x00, // NHA_OIF 3
        0x08, 0x00, 0x06, 0x00, 0x0a, 0x06, 0x00, 0x01, // NHA_GATEWAY 10.6.0.1
    ];

    #[test]
    fn a_nexthop_is_encoded_as_iproute2_does() {
        let nh = Nexthop::new(42, IpFamily::V4)
            .via("10.6.0.1".parse().unwrap())
            .dev(3)
            .onlink()
            .protocol(117);
        let msg = nh.message().unwrap();
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        assert_eq!(buf, IP_NEXTHOP_ADD);
        let back = Nexthop::from_message(&NexthopMessage::parse(&buf).unwrap()).unwrap();
        assert_eq!(back, nh);
    }

    #[test]
    fn ipv6_gateways_and_groups_parse() {
        let nh = Nexthop::new(7, IpFamily::V6).via("fd00:1::1".parse().unwrap()).dev(9);
        let msg = nh.message().unwrap();
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        let back = Nexthop::from_message(&NexthopMessage::parse(&buf).unwrap()).unwrap();
        assert_eq!(
            (back.gateway, back.oif, back.protocol),
            (nh.gateway, Some(9), Some(RTPROT_BOOT))
        );

        let group = NexthopMessage {
            attributes: vec![
                NexthopAttribute::Id(100),
                NexthopAttribute::Group(vec![7, 8]),
                NexthopAttribute::Other(3, vec![0, 0, 0, 0]),
            ],
            ..Default::default()
        };
        let mut buf = vec![0; group.buffer_len()];
        group.emit(&mut buf);
        let back = Nexthop::from_message(&NexthopMessage::parse(&buf).unwrap()).unwrap();
        assert_eq!((back.id, back.family, back.group), (100, None, vec![7, 8]));
    }

    #[test]
    fn nonsense_is_refused_before_the_kernel_sees_it() {
        let gw = "10.0.0.1".parse().unwrap();
        for bad in [
            Nexthop::new(0, IpFamily::V4).via(gw),
            Nexthop::new(1, IpFamily::V6).via(gw),
            Nexthop::new(1, IpFamily::V4),
        ] {
            assert!(matches!(bad.message(), Err(NetError::InvalidArgument(_))), "{bad:?}");
        }
        let mut overrun = IP_NEXTHOP_ADD.to_vec();
        overrun[8] = 0x40;
        assert!(NexthopMessage::parse(&overrun).is_err());
        assert!(NexthopMessage::parse(&[2, 0]).is_err());
    }
}
