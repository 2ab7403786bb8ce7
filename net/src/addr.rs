//! IP addresses on links, IPv4 and IPv6 through the same code.
//!
//! Adds use `NLM_F_CREATE | NLM_F_REPLACE`: adding an address that is already there succeeds
//! (and updates its flags), so a retried CNI ADD does not fail. Deleting a missing address succeeds.

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{IpFamily, NetError, Netlink};

/// Options for [`Netlink::add_address_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressOptions {
    /// IPv6 only: `IFA_F_NODAD`, usable at once without duplicate address detection (a pod's
    /// address is unique by construction, and DAD delays it by about a second).
    pub nodad: bool,
    /// `IFA_F_NOPREFIXROUTE`: do not add the prefix route for the address's subnet.
    pub no_prefix_route: bool,
}

/// An address as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    /// Index of the link that holds it.
    pub index: u32,
    /// Address and prefix length.
    pub address: IpNetwork,
    /// `RT_SCOPE_*` (0 universe, 253 link, 254 host).
    pub scope: u8,
    /// `IFA_F_*` flags.
    pub flags: u32,
    /// IPv4 label (`eth0:1`).
    pub label: Option<String>,
}

impl AddressInfo {
    /// IPv6 duplicate address detection has not finished yet: the address cannot be bound.
    pub fn is_tentative(&self) -> bool {
        self.flags & AddressFlags::Tentative.bits() != 0
    }

    /// IPv6 duplicate address detection found the address in use.
    pub fn is_dad_failed(&self) -> bool {
        self.flags & AddressFlags::Dadfailed.bits() != 0
    }

    pub(crate) fn from_message(msg: &AddressMessage) -> Option<Self> {
        IpFamily::from_netlink(msg.header.family)?;
        let (mut local, mut address, mut label) = (None, None, None);
        let mut flags = u32::from(msg.header.flags.bits());
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Label(l) => label = Some(l.clone()),
                AddressAttribute::Flags(f) => flags = f.bits(),
                _ => {}
            }
        }
        // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links.
        let ip = local.or(address)?;
        Some(Self {
            index: msg.header.index,
            address: IpNetwork::new(ip, msg.header.prefix_len).ok()?,
            scope: msg.header.scope.into(),
            flags,
            label,
        })
    }
}

fn address_message(index: u32, address: IpNetwork, opts: AddressOptions) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = IpFamily::of(address.ip()).to_netlink();
    msg.header.prefix_len = address.prefix();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(address.ip()));
    msg.attributes.push(AddressAttribute::Address(address.ip()));
    if let IpNetwork::V4(net) = address {
        if net.prefix() < 31 {
            msg.attributes.push(AddressAttribute::Broadcast(net.broadcast()));
        }
    }
    let mut flags = AddressFlags::empty();
    flags.set(AddressFlags::Nodad, opts.nodad && address.is_ipv6());
    flags.set(AddressFlags::Noprefixroute, opts.no_prefix_route);
    if !flags.is_empty() {
        // The header has 8 bits of flags; IFA_FLAGS carries all 32.
        msg.header.flags = AddressHeaderFlags::from_bits_truncate(flags.bits() as u8);
        msg.attributes.push(AddressAttribute::Flags(flags));
    }
    msg
}

impl Netlink {
    /// `ip addr replace ADDRESS dev INDEX`.
    pub async fn add_address(&self, index: u32, address: IpNetwork) -> Result<(), NetError> {
        self.add_address_with(index, address, AddressOptions::default()).await
    }

    /// `ip addr replace ADDRESS dev INDEX [nodad] [noprefixroute]`.
    pub async fn add_address_with(&self, index: u32, address: IpNetwork, opts: AddressOptions) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::NewAddress(address_message(index, address, opts));
        match self.ack(msg, NLM_F_CREATE | NLM_F_REPLACE).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(format!(
                "adding address {address} to link {}",
                self.link_label(index).await
            ))),
        }
    }

    /// `ip addr del ADDRESS dev INDEX`; a missing address (or link) is success.
    pub async fn del_address(&self, index: u32, address: IpNetwork) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::DelAddress(address_message(index, address, AddressOptions::default()));
        match self.ack(msg, 0).await {
            Err(f) if !f.is_not_found() => Err(f.context(format!(
                "deleting address {address} from link {}",
                self.link_label(index).await
            ))),
            _ => Ok(()),
        }
    }

    /// The IPv4 and IPv6 addresses of one link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<AddressInfo>, NetError> {
        let mut req = AddressMessage::default();
        req.header.index = index; // only a hint: filtering by index needs strict checking
        let replies = self
            .dump(RouteNetlinkMessage::GetAddress(req))
            .await
            .map_err(|f| f.context(format!("listing addresses of link #{index}")))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => AddressInfo::from_message(a),
                _ => None,
            })
            .collect())
    }
}
