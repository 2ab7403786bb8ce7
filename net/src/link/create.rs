//! Creating links: veth pairs, bridges, VXLAN and IPIP devices.
//!
//! Each create is one `RTM_NEWLINK` with `NLM_F_CREATE | NLM_F_EXCL` (an existing link is an
//! EEXIST error, see [`NetError::is_exists`]) and returns the new link as the kernel reports it.

use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkBridge, LinkIpIp, LinkMessageBuilder, LinkUnspec, LinkVxlan};

use super::{check_ifname, LinkInfo};
use crate::netns::NetnsRef;
use crate::{MacAddr, NetError, Netlink};

/// A veth pair. With `peer_netns` set, the peer is born in that namespace under `peer_name`
/// (one netlink message), so a pod's `eth0` never exists, even briefly, on the host.
#[derive(Debug, Clone)]
pub struct VethConfig<'a> {
    /// Name of the end created in this connection's namespace.
    pub name: &'a str,
    /// Name of the other end, in `peer_netns` (or here).
    pub peer_name: &'a str,
    /// Where the peer is created; `None` for this connection's namespace.
    pub peer_netns: Option<NetnsRef<'a>>,
    /// MTU of both ends.
    pub mtu: Option<u32>,
    /// MAC of this end (random if `None`).
    pub mac: Option<MacAddr>,
    /// MAC of the peer (random if `None`).
    pub peer_mac: Option<MacAddr>,
}

impl<'a> VethConfig<'a> {
    /// A pair `name` <-> `peer_name`, both here, kernel-chosen MACs and MTU.
    pub fn new(name: &'a str, peer_name: &'a str) -> Self {
        Self {
            name,
            peer_name,
            peer_netns: None,
            mtu: None,
            mac: None,
            peer_mac: None,
        }
    }

    /// Create the peer in another namespace.
    pub fn peer_netns(mut self, ns: impl Into<NetnsRef<'a>>) -> Self {
        self.peer_netns = Some(ns.into());
        self
    }

    /// MTU of both ends.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// MAC of this end.
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// MAC of the peer.
    pub fn peer_mac(mut self, mac: MacAddr) -> Self {
        self.peer_mac = Some(mac);
        self
    }
}

/// A Linux bridge (created down; bring it up with [`Netlink::set_link_up`]).
#[derive(Debug, Clone)]
pub struct BridgeConfig<'a> {
    /// Bridge name.
    pub name: &'a str,
    /// MTU.
    pub mtu: Option<u32>,
    /// MAC (by default the kernel picks one, then follows the lowest port MAC).
    pub mac: Option<MacAddr>,
}

impl<'a> BridgeConfig<'a> {
    /// A bridge called `name` with kernel defaults.
    pub fn new(name: &'a str) -> Self {
        Self {
            name,
            mtu: None,
            mac: None,
        }
    }
}

/// A VXLAN device for the daemon's overlay: no learning (FDB and neighbours are programmed).
#[derive(Debug, Clone)]
pub struct VxlanConfig<'a> {
    /// Device name.
    pub name: &'a str,
    /// VXLAN network identifier.
    pub vni: u32,
    /// Source address of the encapsulated packets (the node's underlay IP).
    pub local: Option<IpAddr>,
    /// UDP destination port (IANA 4789; flannel and the kernel's legacy default use 8472).
    pub port: u16,
    /// Index of the underlay device the packets leave by.
    pub underlay_index: Option<u32>,
    /// MAC learning from received packets (`false` for a programmed overlay).
    pub learning: bool,
    /// MTU (underlay MTU minus 50 for IPv4 underlays).
    pub mtu: Option<u32>,
    /// MAC (the VTEP MAC published in the node lease).
    pub mac: Option<MacAddr>,
}

impl<'a> VxlanConfig<'a> {
    /// A VXLAN device on port 4789 with learning off.
    pub fn new(name: &'a str, vni: u32) -> Self {
        Self {
            name,
            vni,
            local: None,
            port: 4789,
            underlay_index: None,
            learning: false,
            mtu: None,
            mac: None,
        }
    }
}

/// An IPIP tunnel device (IPv4 in IPv4, IP protocol 4) with no fixed remote: the outer
/// destination of each packet is the gateway of the route that sent it there
/// (`ip route add 10.244.2.0/24 via 192.168.0.12 dev NAME onlink`), so one device reaches every
/// node. With `local` set, it receives the IPIP packets addressed to that address (the kernel
/// matches received packets to tunnels by their outer addresses; what matches no tunnel goes to
/// the module's fallback device `tunl0`).
///
/// `ip link add NAME type ipip local LOCAL dev UNDERLAY ttl TTL [no]pmtudisc` — the kernel must
/// have IPIP support (module `ipip`); without it the create fails with EOPNOTSUPP
/// ([`NetError::is_not_supported`]).
#[derive(Debug, Clone)]
pub struct IpipConfig<'a> {
    /// Device name.
    pub name: &'a str,
    /// Source address of the encapsulated packets (the node's underlay IP).
    pub local: Option<Ipv4Addr>,
    /// Index of the underlay device the packets leave by.
    pub underlay_index: Option<u32>,
    /// TTL of the outer header; 0 copies the inner packet's (`ttl inherit`).
    pub ttl: u8,
    /// Path MTU discovery: the outer header carries DF. A fixed `ttl` needs it (as in iproute2).
    pub pmtudisc: bool,
    /// MTU (underlay MTU minus 20).
    pub mtu: Option<u32>,
}

impl<'a> IpipConfig<'a> {
    /// An IPIP device with the kernel's defaults: no local address, `ttl inherit`, `pmtudisc`.
    pub fn new(name: &'a str) -> Self {
        Self {
            name,
            local: None,
            underlay_index: None,
            ttl: 0,
            pmtudisc: true,
            mtu: None,
        }
    }
}

/// The `RTM_NEWLINK` body that creates an IPIP device.
pub(crate) fn ipip_message(cfg: &IpipConfig<'_>) -> Result<LinkMessage, NetError> {
    check_ifname(cfg.name)?;
    if cfg.ttl != 0 && !cfg.pmtudisc {
        return Err(NetError::InvalidArgument(format!(
            "ipip {}: a fixed ttl ({}) and nopmtudisc are incompatible",
            cfg.name, cfg.ttl
        )));
    }
    let mut ipip = LinkIpIp::new(cfg.name);
    if let Some(index) = cfg.underlay_index {
        ipip = ipip.dev(index);
    }
    if let Some(local) = cfg.local {
        ipip = ipip.local(local);
    }
    let ipip = ipip.ttl(cfg.ttl).pmtudisc(cfg.pmtudisc);
    Ok(common(ipip, cfg.mtu, None).build())
}

/// Attributes every link can take at creation.
fn common<T>(mut b: LinkMessageBuilder<T>, mtu: Option<u32>, mac: Option<MacAddr>) -> LinkMessageBuilder<T> {
    if let Some(mtu) = mtu {
        b = b.mtu(mtu);
    }
    if let Some(mac) = mac {
        b = b.address(mac.0.to_vec());
    }
    b
}

/// The flags (beyond `NLM_F_REQUEST | NLM_F_ACK`) of every create: an existing link is EEXIST.
const CREATE_FLAGS: u16 = NLM_F_CREATE | NLM_F_EXCL;

impl Netlink {
    /// Create a veth pair; returns this end.
    pub async fn create_veth(&self, cfg: &VethConfig<'_>) -> Result<LinkInfo, NetError> {
        check_ifname(cfg.name)?;
        check_ifname(cfg.peer_name)?;
        let mut what = format!("creating veth {} with peer {}", cfg.name, cfg.peer_name);
        if let Some(ns) = &cfg.peer_netns {
            what.push_str(&format!(" in {}", ns.describe()));
        }
        // Keep the namespace fd open until the kernel has answered.
        let ns_fd = cfg.peer_netns.as_ref().map(NetnsRef::open).transpose()?;
        let mut peer = common(
            LinkMessageBuilder::<LinkUnspec>::new().name(cfg.peer_name),
            cfg.mtu,
            cfg.peer_mac,
        );
        if let Some(fd) = &ns_fd {
            peer = peer.setns_by_fd(fd.raw_fd());
        }
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(cfg.name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        self.create_link(common(veth, cfg.mtu, cfg.mac).build(), cfg.name, what)
            .await
    }

    /// Create a bridge; returns it.
    pub async fn create_bridge(&self, cfg: &BridgeConfig<'_>) -> Result<LinkInfo, NetError> {
        check_ifname(cfg.name)?;
        // Not `LinkBridge::new`, which also sets the bridge up.
        let bridge = common(LinkMessageBuilder::<LinkBridge>::new(cfg.name), cfg.mtu, cfg.mac);
        self.create_link(bridge.build(), cfg.name, format!("creating bridge {}", cfg.name))
            .await
    }

    /// Create a VXLAN device; returns it.
    pub async fn create_vxlan(&self, cfg: &VxlanConfig<'_>) -> Result<LinkInfo, NetError> {
        check_ifname(cfg.name)?;
        let mut vxlan = LinkVxlan::new(cfg.name, cfg.vni).port(cfg.port).learning(cfg.learning);
        if let Some(index) = cfg.underlay_index {
            vxlan = vxlan.dev(index);
        }
        vxlan = match cfg.local {
            Some(IpAddr::V4(ip)) => vxlan.local(ip),
            Some(IpAddr::V6(ip)) => vxlan.local6(ip),
            None => vxlan,
        };
        let vxlan = common(vxlan, cfg.mtu, cfg.mac);
        let what = format!("creating vxlan {} (vni {}, port {})", cfg.name, cfg.vni, cfg.port);
        self.create_link(vxlan.build(), cfg.name, what).await
    }

    /// Create an IPIP tunnel device; returns it. EOPNOTSUPP when the kernel has no IPIP support.
    pub async fn create_ipip(&self, cfg: &IpipConfig<'_>) -> Result<LinkInfo, NetError> {
        let msg = ipip_message(cfg)?;
        let mut what = format!("creating ipip {}", cfg.name);
        if let Some(local) = cfg.local {
            what.push_str(&format!(" (local {local})"));
        }
        self.create_link(msg, cfg.name, what).await
    }

    async fn create_link(&self, msg: LinkMessage, name: &str, what: String) -> Result<LinkInfo, NetError> {
        self.ack(RouteNetlinkMessage::NewLink(msg), CREATE_FLAGS)
            .await
            .map_err(|f| f.context(&what))?;
        self.link_by_name(name).await?.ok_or_else(|| NetError::UnexpectedReply {
            what,
            detail: format!("link {name} not found right after creating it"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{request, ACK_FLAGS};

    /// The attributes of a netlink attribute stream: (type without the nested/byte-order flags,
    /// payload).
    fn nlas(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
            assert!(len >= 4 && len <= buf.len(), "attribute length {len} of {}", buf.len());
            out.push((kind, &buf[4..len]));
            buf = &buf[((len + 3) & !3).min(buf.len())..];
        }
        assert!(buf.is_empty(), "trailing bytes {buf:?}");
        out
    }

    fn one<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> &'a [u8] {
        let found: Vec<_> = attrs.iter().filter(|(k, _)| *k == kind).collect();
        assert_eq!(found.len(), 1, "attribute {kind} in {attrs:?}");
        found[0].1
    }

    /// The bytes the kernel gets for a create.
    fn encoded(msg: LinkMessage) -> Vec<u8> {
        let mut m = request(RouteNetlinkMessage::NewLink(msg).into(), ACK_FLAGS | CREATE_FLAGS);
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        buf
    }

    // linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_tunnel.h
    const RTM_NEWLINK: u16 = 16;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_MTU: u16 = 4;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_INFO_DATA: u16 = 2;
    const IFLA_IPTUN_LINK: u16 = 1;
    const IFLA_IPTUN_LOCAL: u16 = 2;
    const IFLA_IPTUN_REMOTE: u16 = 3;
    const IFLA_IPTUN_TTL: u16 = 4;
    const IFLA_IPTUN_PMTUDISC: u16 = 10;

    #[test]
    fn the_ipip_create_message_carries_kind_local_link_ttl_and_pmtudisc() {
        let cfg = IpipConfig {
            local: Some(Ipv4Addr::new(192, 168, 0, 11)),
            underlay_index: Some(7),
            ttl: 64,
            pmtudisc: true,
            mtu: Some(1480),
            ..IpipConfig::new("trellis.ipip")
        };
        let buf = encoded(ipip_message(&cfg).unwrap());

        // nlmsghdr: length, RTM_NEWLINK, REQUEST|ACK|EXCL|CREATE.
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize, buf.len());
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), RTM_NEWLINK);
        assert_eq!(u16::from_ne_bytes([buf[6], buf[7]]), 0x0001 | 0x0004 | 0x0200 | 0x0400);
        // ifinfomsg (16 bytes): no index (a new link), AF_UNSPEC.
        let ifinfo = &buf[16..32];
        assert_eq!(ifinfo[0], 0, "family");
        assert_eq!(i32::from_ne_bytes(ifinfo[4..8].try_into().unwrap()), 0, "index");

        let attrs = nlas(&buf[32..]);
        assert_eq!(one(&attrs, IFLA_IFNAME), b"trellis.ipip\0");
        assert_eq!(one(&attrs, IFLA_MTU), 1480u32.to_ne_bytes());
        let info = nlas(one(&attrs, IFLA_LINKINFO));
        assert_eq!(one(&info, IFLA_INFO_KIND), b"ipip\0");
        let data = nlas(one(&info, IFLA_INFO_DATA));
        assert_eq!(one(&data, IFLA_IPTUN_LINK), 7u32.to_ne_bytes());
        assert_eq!(one(&data, IFLA_IPTUN_LOCAL), [192, 168, 0, 11]);
        assert_eq!(one(&data, IFLA_IPTUN_TTL), [64]);
        assert_eq!(one(&data, IFLA_IPTUN_PMTUDISC), [1]);
        assert!(
            data.iter().all(|(k, _)| *k != IFLA_IPTUN_REMOTE),
            "no fixed remote: the route's gateway is the outer destination"
        );
        assert_eq!(data.len(), 4, "{data:?}");
    }

    #[test]
    fn ipip_defaults_and_refusals() {
        // Kernel defaults: no local, no link, ttl inherit, pmtudisc; no MTU.
        let buf = encoded(ipip_message(&IpipConfig::new("tun9")).unwrap());
        let attrs = nlas(&buf[32..]);
        assert!(attrs.iter().all(|(k, _)| *k != IFLA_MTU));
        let data = nlas(one(&nlas(one(&attrs, IFLA_LINKINFO)), IFLA_INFO_DATA));
        assert_eq!(data, [(IFLA_IPTUN_TTL, &[0u8][..]), (IFLA_IPTUN_PMTUDISC, &[1u8][..])]);

        let bad = IpipConfig {
            ttl: 64,
            pmtudisc: false,
            ..IpipConfig::new("tun9")
        };
        let err = ipip_message(&bad).unwrap_err();
        assert!(err.to_string().contains("nopmtudisc"), "{err}");
        assert!(ipip_message(&IpipConfig::new("sixteen-chars-xx")).is_err());
    }
}
