//! Creating links: veth pairs, bridges, VXLAN devices.
//!
//! Each create is one `RTM_NEWLINK` with `NLM_F_CREATE | NLM_F_EXCL` (an existing link is an
//! EEXIST error, see [`NetError::is_exists`]) and returns the new link as the kernel reports it.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVxlan};

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

    async fn create_link(&self, msg: LinkMessage, name: &str, what: String) -> Result<LinkInfo, NetError> {
        self.ack(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(|f| f.context(&what))?;
        self.link_by_name(name).await?.ok_or_else(|| NetError::UnexpectedReply {
            what,
            detail: format!("link {name} not found right after creating it"),
        })
    }
}
