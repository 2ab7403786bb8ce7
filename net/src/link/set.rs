//! Changing links: state, MTU, master, name, namespace, MAC, promiscuous and hairpin mode.
//!
//! Each change is one `RTM_NEWLINK` without `NLM_F_CREATE` (what `ip link set` sends).

use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkBridgePort, LinkUnspec};

use super::check_ifname;
use crate::netns::NetnsRef;
use crate::{MacAddr, NetError, Netlink};

/// Several changes to one link in one message (one round trip on a hot path such as a CNI ADD).
#[derive(Debug, Clone, Default)]
pub struct LinkChange<'a> {
    /// Bring the link up.
    pub up: bool,
    /// Make it a port of this bridge.
    pub master: Option<u32>,
    /// `IFLA_IFALIAS`: a free-form label (`ip link show` prints it as `alias`), up to 255 bytes.
    /// The kernel only takes it on an existing link, not in the message that creates one.
    pub alias: Option<&'a str>,
}

impl Netlink {
    /// Applies a [`LinkChange`] in one `RTM_NEWLINK`.
    pub async fn change_link_with(&self, index: u32, change: &LinkChange<'_>) -> Result<(), NetError> {
        let mut b = LinkUnspec::new_with_index(index);
        if change.up {
            b = b.up();
        }
        if let Some(master) = change.master {
            b = b.controller(master);
        }
        if let Some(alias) = change.alias {
            if alias.len() > 255 {
                return Err(NetError::InvalidArgument(format!(
                    "alias {alias:?} longer than 255 bytes"
                )));
            }
            b = b.append_extra_attribute(netlink_packet_route::link::LinkAttribute::IfAlias(alias.to_string()));
        }
        self.change_link(index, b.build(), |l| format!("changing link {l} ({change:?})"))
            .await
    }

    /// `ip link set INDEX up`.
    pub async fn set_link_up(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.change_link(index, msg, |l| format!("bringing link {l} up")).await
    }

    /// `ip link set INDEX down`.
    pub async fn set_link_down(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).down().build();
        self.change_link(index, msg, |l| format!("bringing link {l} down"))
            .await
    }

    /// `ip link set INDEX mtu MTU`.
    pub async fn set_link_mtu(&self, index: u32, mtu: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.change_link(index, msg, |l| format!("setting mtu {mtu} on link {l}"))
            .await
    }

    /// `ip link set INDEX master MASTER`: make the link a port of a bridge.
    pub async fn set_link_master(&self, index: u32, master: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        match self.ack(RouteNetlinkMessage::NewLink(msg), 0).await {
            Ok(()) => Ok(()),
            Err(f) => {
                let (port, bridge) = (self.link_label(index).await, self.link_label(master).await);
                Err(f.context(format!("attaching link {port} to master {bridge}")))
            }
        }
    }

    /// `ip link set INDEX nomaster`.
    pub async fn set_link_nomaster(&self, index: u32) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).nocontroller().build();
        self.change_link(index, msg, |l| format!("detaching link {l} from its master"))
            .await
    }

    /// `ip link set INDEX name NAME`. Kernels before 6.x refuse to rename a link that is up (EBUSY).
    pub async fn set_link_name(&self, index: u32, name: &str) -> Result<(), NetError> {
        check_ifname(name)?;
        let msg = LinkUnspec::new_with_index(index).name(name).build();
        self.change_link(index, msg, |l| format!("renaming link {l} to {name}"))
            .await
    }

    /// `ip link set INDEX netns NS [name NEW_NAME]`: move the link to another namespace, renamed
    /// there in the same message if `new_name` is given (so it never clashes in the target). The
    /// link is down after the move and its index may change: look it up again by name there.
    pub async fn set_link_netns(&self, index: u32, ns: NetnsRef<'_>, new_name: Option<&str>) -> Result<(), NetError> {
        if let Some(name) = new_name {
            check_ifname(name)?;
        }
        let fd = ns.open()?;
        let mut msg = LinkUnspec::new_with_index(index).setns_by_fd(fd.raw_fd());
        if let Some(name) = new_name {
            msg = msg.name(name);
        }
        let target = ns.describe();
        self.change_link(index, msg.build(), |l| {
            format!("moving link {l} to network namespace {target}")
        })
        .await
    }

    /// `ip link set INDEX address MAC`.
    pub async fn set_link_mac(&self, index: u32, mac: MacAddr) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).address(mac.0.to_vec()).build();
        self.change_link(index, msg, |l| format!("setting address {mac} on link {l}"))
            .await
    }

    /// `ip link set INDEX promisc on|off`.
    pub async fn set_link_promisc(&self, index: u32, on: bool) -> Result<(), NetError> {
        let msg = LinkUnspec::new_with_index(index).promiscuous(on).build();
        let state = if on { "on" } else { "off" };
        self.change_link(index, msg, |l| format!("turning promiscuous mode {state} on link {l}"))
            .await
    }

    /// `ip link set INDEX type bridge_slave hairpin on|off`: let a bridge port send frames back
    /// out of the port they came in by (a pod reaching itself through a service IP).
    pub async fn set_bridge_port_hairpin(&self, index: u32, on: bool) -> Result<(), NetError> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        let state = if on { "on" } else { "off" };
        self.change_link(index, msg, |l| {
            format!("turning hairpin mode {state} on bridge port {l}")
        })
        .await
    }

    async fn change_link(
        &self,
        index: u32,
        msg: LinkMessage,
        what: impl FnOnce(&str) -> String,
    ) -> Result<(), NetError> {
        match self.ack(RouteNetlinkMessage::NewLink(msg), 0).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(what(&self.link_label(index).await))),
        }
    }
}
