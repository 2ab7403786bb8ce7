//! Links: look up, list and delete; creation is in [`create`], changes in [`set`].
//!
//! Missing links: a lookup returns `Ok(None)` (the kernel's ENODEV), a delete succeeds.
//! Links are addressed by index in every call; after moving or renaming a link, look it up
//! again by name (the index may change when a link moves to another namespace).

mod create;
mod set;

pub use create::{BridgeConfig, IpipConfig, VethConfig, VxlanConfig};
pub use set::LinkChange;

use netlink_packet_route::link::{
    InfoData, InfoIpTunnel, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::reply::Failure;
use crate::{MacAddr, NetError, Netlink};

/// What this crate reports about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index in its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, for Ethernet-like links.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// `IFLA_INFO_KIND`: "veth", "bridge", "vxlan", ... (`None` for physical and loopback links).
    pub kind: Option<String>,
    /// Index of the master (bridge) this link is a port of.
    pub master: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier up (`IFF_LOWER_UP`).
    pub lower_up: bool,
    /// Promiscuous mode requested (`IFF_PROMISC`).
    pub promisc: bool,
    /// `IFLA_LINK`: the peer's index for a veth (in the peer's namespace), the parent's for a VLAN.
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: set when the peer/parent lives in another namespace.
    pub link_netnsid: Option<i32>,
    /// `IFLA_IFALIAS`, the link's free-form label.
    pub alias: Option<String>,
    /// The VXLAN settings, for a VXLAN device.
    pub vxlan: Option<VxlanInfo>,
    /// The tunnel settings, for an IPIP device.
    pub ipip: Option<IpipInfo>,
}

/// An IPIP device's settings as the kernel reports them (`ip -d link show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipInfo {
    /// Source address of the encapsulated packets (`None`: any).
    pub local: Option<std::net::Ipv4Addr>,
    /// Fixed destination (`None`: the route's gateway).
    pub remote: Option<std::net::Ipv4Addr>,
    /// Index of the underlay device.
    pub underlay_index: Option<u32>,
    /// Outer TTL; 0 copies the inner packet's.
    pub ttl: u8,
    /// Path MTU discovery (DF on the outer header).
    pub pmtudisc: bool,
}

impl IpipInfo {
    fn from_attributes(attrs: &[InfoIpTunnel]) -> Self {
        let v4 = |ip: &std::net::IpAddr| match ip {
            std::net::IpAddr::V4(ip) if !ip.is_unspecified() => Some(*ip),
            _ => None,
        };
        let mut info = IpipInfo {
            local: None,
            remote: None,
            underlay_index: None,
            ttl: 0,
            // The kernel's default when the attribute is absent.
            pmtudisc: true,
        };
        for attr in attrs {
            match attr {
                InfoIpTunnel::Local(ip) => info.local = v4(ip),
                InfoIpTunnel::Remote(ip) => info.remote = v4(ip),
                InfoIpTunnel::Link(index) => info.underlay_index = (*index != 0).then_some(*index),
                InfoIpTunnel::Ttl(ttl) => info.ttl = *ttl,
                InfoIpTunnel::PMtuDisc(on) => info.pmtudisc = *on,
                _ => {}
            }
        }
        info
    }
}

/// A VXLAN device's settings as the kernel reports them (`ip -d link show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Source address of the encapsulated packets.
    pub local: Option<std::net::IpAddr>,
    /// Index of the underlay device.
    pub underlay_index: Option<u32>,
    /// MAC learning from received packets.
    pub learning: bool,
}

impl VxlanInfo {
    fn from_attributes(attrs: &[InfoVxlan]) -> Self {
        let mut info = VxlanInfo {
            vni: 0,
            port: 0,
            local: None,
            underlay_index: None,
            learning: true,
        };
        for attr in attrs {
            match attr {
                InfoVxlan::Id(vni) => info.vni = *vni,
                InfoVxlan::Port(port) => info.port = *port,
                InfoVxlan::Local(ip) => info.local = Some((*ip).into()),
                InfoVxlan::Local6(ip) => info.local = Some((*ip).into()),
                InfoVxlan::Link(index) if *index != 0 => info.underlay_index = Some(*index),
                InfoVxlan::Learning(on) => info.learning = *on,
                _ => {}
            }
        }
        info
    }
}

impl LinkInfo {
    pub(crate) fn from_message(msg: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            kind: None,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            lower_up: msg.header.flags.contains(LinkFlags::LowerUp),
            promisc: msg.header.flags.contains(LinkFlags::Promisc),
            link: None,
            link_netnsid: None,
            alias: None,
            vxlan: None,
            ipip: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::Address(bytes) => info.mac = MacAddr::from_slice(bytes),
                LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
                LinkAttribute::Controller(master) if *master != 0 => info.master = Some(*master),
                LinkAttribute::Link(link) if *link != 0 => info.link = Some(*link),
                LinkAttribute::LinkNetNsId(id) => info.link_netnsid = Some(*id),
                LinkAttribute::IfAlias(alias) if !alias.is_empty() => info.alias = Some(alias.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            NlLinkInfo::Kind(kind) => info.kind = Some(kind.to_string()),
                            NlLinkInfo::Data(InfoData::Vxlan(attrs)) => {
                                info.vxlan = Some(VxlanInfo::from_attributes(attrs))
                            }
                            // Also ip6tnl and sit: only IPIP is reported.
                            NlLinkInfo::Data(InfoData::IpTunnel(attrs)) => {
                                info.ipip = Some(IpipInfo::from_attributes(attrs))
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }
}

/// Reject names the kernel would reject (`dev_valid_name`), with a clearer message.
pub(crate) fn check_ifname(name: &str) -> Result<(), NetError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if bad {
        return Err(NetError::InvalidArgument(format!(
            "bad interface name {name:?} (1 to 15 bytes, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

fn link_request(msg: LinkMessage) -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetLink(msg)
}

impl Netlink {
    /// The link called `name`, or `None` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        check_ifname(name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg)
            .await
            .map_err(|f| f.context(format!("looking up link {name}")))
    }

    /// The link with this index, or `None` if there is none.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>, NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg)
            .await
            .map_err(|f| f.context(format!("looking up link #{index}")))
    }

    /// The index of the link called `name`; an ENODEV error if there is none.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        match self.link_by_name(name).await? {
            Some(link) => Ok(link.index),
            None => Err(Failure::Kernel {
                errno: libc::ENODEV,
                extack: None,
            }
            .context(format!("looking up link {name}"))),
        }
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetError> {
        let replies = self
            .dump(link_request(LinkMessage::default()))
            .await
            .map_err(|f| f.context("listing links"))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(link) => Some(LinkInfo::from_message(link)),
                _ => None,
            })
            .collect())
    }

    /// Delete a link (and, for a veth, its peer). A missing link is success.
    pub async fn del_link(&self, index: u32) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        match self.ack(RouteNetlinkMessage::DelLink(msg), 0).await {
            Err(f) if !f.is_not_found() => Err(f.context(format!("deleting link {}", self.link_label(index).await))),
            _ => Ok(()),
        }
    }

    /// Delete the link called `name`. A missing link is success.
    pub async fn del_link_by_name(&self, name: &str) -> Result<(), NetError> {
        match self.link_by_name(name).await? {
            Some(link) => self.del_link(link.index).await,
            None => Ok(()),
        }
    }

    async fn get_link(&self, msg: LinkMessage) -> Result<Option<LinkInfo>, Failure> {
        match self.single(link_request(msg)).await {
            Ok(RouteNetlinkMessage::NewLink(link)) => Ok(Some(LinkInfo::from_message(&link))),
            Ok(other) => Err(Failure::Unexpected(format!("{other:?}"))),
            Err(f) if f.is_not_found() => Ok(None),
            Err(f) => Err(f),
        }
    }

    /// "eth0" for error messages, or "#5" if the name cannot be found.
    pub(crate) async fn link_label(&self, index: u32) -> String {
        match self.link_by_index(index).await {
            Ok(Some(link)) => link.name,
            _ => format!("#{index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::InfoKind;

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("fifteen-chars-x").is_ok());
        for bad in ["", ".", "..", "sixteen-chars-xx", "a/b", "a:b", "a b"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipip_settings_are_read_back_from_a_link_message() {
        let mut msg = LinkMessage::default();
        msg.header.index = 9;
        msg.attributes.push(LinkAttribute::IfName("trellis.ipip".into()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::IpIp),
            NlLinkInfo::Data(InfoData::IpTunnel(vec![
                InfoIpTunnel::Link(2),
                InfoIpTunnel::Local("192.168.0.11".parse().unwrap()),
                InfoIpTunnel::Remote("0.0.0.0".parse().unwrap()),
                InfoIpTunnel::Ttl(64),
                InfoIpTunnel::PMtuDisc(true),
            ])),
        ]));
        let link = LinkInfo::from_message(&msg);
        assert_eq!(link.kind.as_deref(), Some("ipip"));
        assert_eq!(
            link.ipip,
            Some(IpipInfo {
                local: Some("192.168.0.11".parse().unwrap()),
                remote: None,
                underlay_index: Some(2),
                ttl: 64,
                pmtudisc: true,
            })
        );
    }
}
