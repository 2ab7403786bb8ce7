//! Tunnel devices: the one device of the `vxlan` and `ipip` backends, and of BGP's cross-subnet
//! path, kept in place by one algorithm whatever the kind of tunnel.
//!
//! # Why one algorithm
//!
//! A tunnel device is kept the same way whatever it encapsulates ([`Tunnel::ensure`], at start
//! and on every reconcile):
//! 1. find the device by its name;
//! 2. check that it is ours and configured as wanted: first its kind, then the settings the
//!    kernel reports for that kind (local address, VNI, port, underlay device...). A device that
//!    differs is deleted and created again: those settings cannot be changed in place, and a
//!    device of another kind under our name is nothing we can fix. The MTU alone is fixed in
//!    place;
//! 3. fix in place what is not a link attribute (VXLAN: TX checksum offload);
//! 4. once this node's lease is known: this node's addresses on it, and no others, and the
//!    device up;
//! 5. remember its index: routes, neighbours and FDB entries name the device by index, and a
//!    recreated device has a new one.
//!
//! Written once, VXLAN's and IPIP's devices cannot be kept in two ways that drift apart, and the
//! next tunnel (WireGuard, Geneve) gets all of it by supplying only what differs, a
//! [`TunnelKind`]: its link kind, a label for the logs, the device's name, how to create the
//! device (its link spec, through `trellis_net`), how the settings the kernel reports compare
//! with the wanted ones, this node's addresses on it, and what else to fix in place (nothing by
//! default). Beyond this module it needs a line in `super::is_backend_device` (so that switching
//! away from it removes the device) and its overhead in `config::Backend::overhead`.
//!
//! The MTU is not the kind's to say: it is the underlay's less `config::Backend::overhead`, the
//! number the pods' MTU is computed with, so that whatever a pod sends fits through the tunnel.
//!
//! A node's address on its tunnel device ([`tunnel_address`]) is the same for every kind: its
//! pod CIDR's network address as a host prefix (VXLAN calls it the VTEP address).

use crate::config::Backend as BackendConfig;
use crate::error::DataplaneError;
use crate::lease::Lease;
use crate::underlay::Underlay;
use ipnetwork::IpNetwork;
use std::future::Future;
use std::net::IpAddr;
use trellis_net::{AddressOptions, LinkInfo, NetError, Netlink};

/// What one kind of tunnel device supplies to [`Tunnel`]: what differs between kinds.
pub trait TunnelKind {
    /// The link kind as the kernel names it (`IFLA_INFO_KIND`, what `ip -d link` shows): a
    /// device of another kind under our name is replaced. Also the name of the kernel module
    /// that provides it (`modprobe vxlan`).
    const LINK_KIND: &'static str;
    /// How logs and errors name the tunnel ("VXLAN").
    const LABEL: &'static str;

    /// The device's name (15 bytes at most).
    fn name(&self) -> &str;

    /// Creates the device as wanted, with `mtu` (EOPNOTSUPP when the kernel lacks the module).
    ///
    /// Spelled out rather than `async fn` for the `Send`: the dataplane's futures run on tokio's
    /// worker threads, and a trait's `async fn` promises nothing about that. An implementation
    /// may still be written `async fn`.
    fn create(
        &self,
        nl: &Netlink,
        underlay: &Underlay,
        mtu: u32,
    ) -> impl Future<Output = Result<LinkInfo, NetError>> + Send;

    /// What differs between the settings of `link`, a device of this kind under our name, and
    /// the wanted ones: empty when it can stay. Not the MTU, which is fixed in place.
    fn differences(&self, link: &LinkInfo, underlay: &Underlay) -> Vec<String>;

    /// This node's addresses on the device, from its lease.
    fn addresses(&self, own: &Lease) -> Vec<IpNetwork>;

    /// Checks, and fixes in place, what is not a link attribute; on every ensure.
    fn fix_in_place(&self) -> Result<(), NetError> {
        Ok(())
    }
}

/// A tunnel device of kind `K`, kept as configured (see the module docs).
#[derive(Debug)]
pub struct Tunnel<K> {
    kind: K,
    /// The underlay's MTU less the backend's overhead.
    mtu: u32,
    /// The device's index (it changes when the device is recreated).
    index: u32,
}

impl<K: TunnelKind> Tunnel<K> {
    /// Creates the device, or keeps the one that is there when its settings are right; it gets
    /// its addresses and goes up with the first [`Tunnel::ensure`] that knows this node's lease.
    /// `backend` is the configured backend: its overhead makes the MTU (see the module docs).
    pub async fn new(
        kind: K,
        backend: &BackendConfig,
        underlay: &Underlay,
        nl: &Netlink,
    ) -> Result<Tunnel<K>, DataplaneError> {
        let mtu = device_mtu(K::LABEL, backend.overhead(underlay.ip.is_ipv6()), underlay)?;
        let mut tunnel = Tunnel { kind, mtu, index: 0 };
        tunnel.ensure(nl, underlay, None).await?;
        Ok(tunnel)
    }

    /// The tunnel's kind, with its settings.
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// The device's index as of the last ensure.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Makes the device be there as configured: created if missing, recreated if its kind or
    /// settings differ, MTU and [`TunnelKind::fix_in_place`] fixed in place; with `own`, this
    /// node's addresses (and no others) on it and the device up.
    pub async fn ensure(
        &mut self,
        nl: &Netlink,
        underlay: &Underlay,
        own: Option<&Lease>,
    ) -> Result<(), DataplaneError> {
        let name = self.kind.name();
        let mut kept = None;
        if let Some(link) = nl.link_by_name(name).await? {
            let diff = differences(&self.kind, &link, underlay);
            if diff.is_empty() {
                if link.mtu != self.mtu {
                    nl.set_link_mtu(link.index, self.mtu).await?;
                }
                kept = Some(link);
            } else {
                tracing::info!(device = %name, "recreating the {} device: {}", K::LABEL, diff.join("; "));
                nl.del_link(link.index).await?;
            }
        }
        let link = match kept {
            Some(link) => link,
            None => self.create(nl, underlay).await?,
        };
        self.index = link.index;
        self.kind.fix_in_place()?;
        if let Some(own) = own {
            ensure_addresses(nl, link.index, &self.kind.addresses(own)).await?;
            if !link.up {
                nl.set_link_up(link.index).await?;
            }
        }
        Ok(())
    }

    async fn create(&self, nl: &Netlink, underlay: &Underlay) -> Result<LinkInfo, DataplaneError> {
        let link = self.kind.create(nl, underlay, self.mtu).await.map_err(|e| {
            if e.is_not_supported() {
                DataplaneError::Unsupported(format!(
                    "this kernel has no {} support (load the {module} module: modprobe {module}): {e}",
                    K::LABEL,
                    module = K::LINK_KIND
                ))
            } else {
                e.into()
            }
        })?;
        tracing::info!(device = %link.name, index = link.index, local = %underlay.ip, mtu = self.mtu,
            "created the {} device", K::LABEL);
        Ok(link)
    }
}

#[cfg(test)]
impl<K> Tunnel<K> {
    /// A tunnel whose device is at `index`, for the tests of what goes through it (never
    /// ensured: its MTU does not matter).
    pub(crate) fn at(kind: K, index: u32) -> Tunnel<K> {
        Tunnel { kind, mtu: 0, index }
    }
}

/// A node's address on its tunnel device for one of its pod CIDRs: the CIDR's network address,
/// as a host prefix. It needs no allocation and is never a pod's; traffic the node itself sends
/// to pods elsewhere leaves from it.
pub fn tunnel_address(cidr: &IpNetwork) -> IpNetwork {
    let bits = if cidr.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(cidr.network(), bits).expect("a host prefix is valid")
}

/// The device MTU: the underlay's less the tunnel's `overhead`, refused below 576 (the smallest
/// datagram every IPv4 host must take).
fn device_mtu(label: &str, overhead: u32, underlay: &Underlay) -> Result<u32, DataplaneError> {
    underlay.mtu.checked_sub(overhead).filter(|m| *m >= 576).ok_or_else(|| {
        DataplaneError::Invalid(format!(
            "underlay {} MTU {} leaves no room for {label}'s {overhead} bytes",
            underlay.name, underlay.mtu
        ))
    })
}

/// What differs between the device under our name and the one we want: its kind, or, when it is
/// of ours, the settings the kind compares.
fn differences<K: TunnelKind>(kind: &K, link: &LinkInfo, underlay: &Underlay) -> Vec<String> {
    match link.kind.as_deref() {
        Some(have) if have == K::LINK_KIND => kind.differences(link, underlay),
        have => vec![format!("kind {:?}", have.unwrap_or("none"))],
    }
}

/// This node's addresses on the device at `index`: `want` there and no other global ones (an
/// earlier CIDR's); IPv6 link-local addresses are left alone.
async fn ensure_addresses(nl: &Netlink, index: u32, want: &[IpNetwork]) -> Result<(), NetError> {
    let have = nl.addresses(index).await?;
    for a in &have {
        let link_local = matches!(a.address.ip(), IpAddr::V6(ip) if ip.segments()[0] & 0xffc0 == 0xfe80);
        if !link_local && !want.contains(&a.address) {
            nl.del_address(index, a.address).await?;
        }
    }
    for addr in want {
        if !have.iter().any(|a| a.address == *addr) {
            let opts = AddressOptions {
                nodad: true,
                no_prefix_route: true,
            };
            nl.add_address_with(index, *addr, opts).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fixtures::{link, underlay};
    use crate::backend::ipip::Ipip;

    #[test]
    fn a_device_of_another_kind_under_our_name_is_replaced_whatever_it_reports() {
        let (u, ipip) = (underlay(), Ipip::new(&underlay()).unwrap());
        let ours = LinkInfo {
            ipip: Some(ipip.wanted(&u)),
            ..link("trellis.ipip", "ipip")
        };
        assert!(differences(&ipip, &ours, &u).is_empty());
        let dummy = LinkInfo {
            kind: Some("dummy".into()),
            ..ours.clone()
        };
        assert_eq!(differences(&ipip, &dummy, &u), ["kind \"dummy\""]);
        let physical = LinkInfo { kind: None, ..ours };
        assert_eq!(differences(&ipip, &physical, &u), ["kind \"none\""]);
    }

    #[test]
    fn the_mtu_leaves_room_for_the_outer_headers() {
        let u = underlay();
        assert_eq!(device_mtu("IPIP", 20, &u).unwrap(), 1480);
        assert_eq!(device_mtu("VXLAN", 70, &u).unwrap(), 1430);
        let small = Underlay { mtu: 600, ..u };
        let err = device_mtu("VXLAN", 50, &small).unwrap_err().to_string();
        assert_eq!(err, "underlay eth0 MTU 600 leaves no room for VXLAN's 50 bytes");
    }

    #[test]
    fn tunnel_addresses_are_the_cidrs_network_addresses() {
        assert_eq!(
            tunnel_address(&"10.244.3.0/24".parse().unwrap()).to_string(),
            "10.244.3.0/32"
        );
        assert_eq!(
            tunnel_address(&"fd00:244:3::/64".parse().unwrap()).to_string(),
            "fd00:244:3::/128"
        );
    }
}
