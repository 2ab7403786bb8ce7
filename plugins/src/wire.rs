//! ADD's kernel work, and its undoing. Two shapes:
//!
//! - **bridge** (like the reference `bridge` plugin): the node bridge holds the pods' gateway
//!   address; each pod's host end is a port of it; the pod gets its address with the subnet's
//!   prefix and routes via the gateway.
//! - **routed** (like Calico): no bridge. The pod gets a /32 (and /128) and a default route via a
//!   link-local gateway (169.254.1.1, fe80::1) that a permanent neighbour entry in the pod
//!   resolves to the host end's MAC (proxy ARP on the host end answers too, should someone flush
//!   the entry). The node gets one host route per pod address through the host end. Everything
//!   the pod needs on the host side dies with the host end, so DEL is one link delete.
//!
//! The veth is born with its peer already in the pod's namespace (one netlink message), so the
//! pod's `eth0` never exists on the host, and the host end's name comes from the attachment
//! ([`crate::names`]), so DEL finds it without the namespace and GC without any state file.

use crate::config::{Config, Mode};
use crate::names;
use ipnetwork::IpNetwork;
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use trellis_cni::{code, CniError, CniResult, Dns, Env, Interface, IpConfig, Route as CniRoute};
use trellis_net::nft::{
    AntiSpoof, HostPorts, Masquerade, MasqueradeConfig, PodIdentity, PolicyTable, PortKind, DEFAULT_TABLE, POLICY_TABLE,
};
use trellis_net::{
    netns::NetnsRef, sysctl, AddressOptions, BridgeConfig, IpFamily, LinkChange, LinkInfo, NetError, Netlink, Route,
    RouteFilter, RouteScope, VethConfig,
};

/// The routed-mode gateway the pod sees for IPv4 (Calico's choice, link-local).
pub const ROUTED_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The routed-mode gateway the pod sees for IPv6.
pub const ROUTED_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The route protocol of the host routes the plugin adds in routed mode (`ip route` shows
/// `proto 116`), so that they can be told from anyone else's.
pub const HOST_ROUTE_PROTOCOL: u8 = 116;

pub fn kernel(e: NetError) -> CniError {
    CniError::new(code::KERNEL, e.to_string())
}

fn nft(e: trellis_net::nft::NftError) -> CniError {
    CniError::new(code::KERNEL, format!("masquerade: {e}"))
}

fn routed_gateway(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => ROUTED_GATEWAY_V4.into(),
        IpFamily::V6 => ROUTED_GATEWAY_V6.into(),
    }
}

fn single_host(ip: IpAddr) -> IpNetwork {
    IpNetwork::new(ip, IpFamily::of(ip).max_prefix()).expect("a full-length prefix is valid")
}

fn is_default(dst: &IpNetwork) -> bool {
    dst.prefix() == 0
}

/// What ADD created that a failure must undo (the IPAM reservation is the caller's).
#[derive(Default)]
pub struct Created {
    /// The bridge, if this ADD created it.
    pub bridge: Option<u32>,
    /// Gateway addresses this ADD gave a bridge that already existed.
    pub gateways: Option<GivenGateways>,
    /// Whether hostPorts may have been mapped.
    pub hostports: bool,
    /// The addresses this ADD held for NetworkPolicy (released on undo: without a record,
    /// teardown knows only the interface name, and bridge mode holds addresses).
    pub held: Vec<IpAddr>,
}

/// Gateway addresses an ADD added to an existing bridge, and the bridge's ports before it did.
pub struct GivenGateways {
    pub bridge: u32,
    pub addresses: Vec<IpNetwork>,
    pub ports_before: Vec<u32>,
}

/// The indexes of the links that are ports of `bridge`.
async fn ports_of(host: &Netlink, bridge: u32) -> Result<Vec<u32>, CniError> {
    Ok(host
        .links()
        .await
        .map_err(kernel)?
        .into_iter()
        .filter(|l| l.master == Some(bridge))
        .map(|l| l.index)
        .collect())
}

fn anti_spoofing_error(e: trellis_net::nft::NftError) -> CniError {
    CniError::new(code::KERNEL, format!("anti-spoofing: {e}"))
}

fn policy_error(e: trellis_net::nft::NftError) -> CniError {
    CniError::new(
        code::KERNEL,
        format!("NetworkPolicy: holding the pod until its policy is written: {e}"),
    )
    .with_details(
        "trellisd keeps NetworkPolicy in the node's nftables table trellis-policy; see docs/network-policy.md",
    )
}

fn port_kind(conf: &Config) -> PortKind {
    match conf.mode {
        Mode::Bridge => PortKind::Bridged,
        Mode::Routed => PortKind::Routed,
    }
}

/// The start window (`docs/network-policy.md`): where trellisd enforces NetworkPolicy (its
/// table exists) the pod is held — every packet to or from it dropped — from before its link
/// is up until trellisd, which learns of it by the record [`protect`] writes, releases it in
/// the transaction that writes its rules. Only with records: without them trellisd could not
/// learn of the pod, and would never release it.
fn hold_for_policy(conf: &Config, port: &str, ipam: &CniResult, created: &mut Created) -> Result<(), CniError> {
    if !conf.anti_spoofing || conf.anti_spoofing_records.is_none() {
        return Ok(());
    }
    let ips: Vec<IpAddr> = ipam.ips.iter().map(|i| i.address.ip()).collect();
    if PolicyTable::new(POLICY_TABLE, port_kind(conf))
        .and_then(|t| t.hold(port, &ips))
        .map_err(policy_error)?
    {
        created.held = ips;
    }
    Ok(())
}

fn hostport_error(e: trellis_net::nft::NftError) -> CniError {
    CniError::new(code::KERNEL, format!("hostPort: {e}"))
}

/// Wires the pod for `ipam`'s addresses and returns the result to print.
pub async fn add(
    conf: &Config,
    network: &str,
    env: &Env,
    ipam: &CniResult,
    dns: Option<&Dns>,
    created: &mut Created,
) -> Result<CniResult, CniError> {
    let netns = env.netns.as_deref().expect("ADD has CNI_NETNS");
    let host = Netlink::connect().map_err(kernel)?;
    let pod = Netlink::connect_in(netns).map_err(kernel)?;
    let host_name = names::host_veth_name(network, &env.container_id, &env.ifname);
    // A retried ADD replaces whatever an earlier attempt for this attachment left.
    host.del_link_by_name(&host_name).await.map_err(kernel)?;
    hold_for_policy(conf, &host_name, ipam, created)?;

    let bridge = match conf.mode {
        Mode::Bridge => Some(ensure_bridge(&host, conf, ipam, created).await?),
        Mode::Routed => None,
    };
    let mut veth = VethConfig::new(&host_name, &env.ifname).peer_netns(NetnsRef::Path(netns));
    veth.mtu = conf.mtu;
    let host_end = host.create_veth(&veth).await.map_err(|e| {
        if e.is_exists() {
            CniError::new(
                code::KERNEL,
                format!("interface {} already exists in {}", env.ifname, netns.display()),
            )
            .with_details("another attachment uses this CNI_IFNAME in the pod; pick another ifname")
        } else {
            kernel(e)
        }
    })?;
    let routed_v6 = conf.mode == Mode::Routed && ipam.ips.iter().any(|i| i.address.is_ipv6());
    if routed_v6 {
        // Routed IPv6 resolves the pod through the host end's link-local address; while that
        // address is in DAD (about 2 s) the host cannot send neighbour solicitations, and the
        // pod's first packets wait. The address is unique on a point-to-point veth: skip DAD.
        sysctl::set_accept_dad(&host_name, false).map_err(kernel)?;
    }
    let alias = names::host_alias(network, &env.container_id, &env.ifname);
    let change = LinkChange {
        up: true,
        master: bridge.as_ref().map(|b| b.index),
        alias: Some(&alias),
    };
    host.change_link_with(host_end.index, &change).await.map_err(kernel)?;
    if conf.hairpin && bridge.is_some() {
        host.set_bridge_port_hairpin(host_end.index, true)
            .await
            .map_err(kernel)?;
    }
    let pod_end = pod.link_by_name(&env.ifname).await.map_err(kernel)?.ok_or_else(|| {
        CniError::new(
            code::KERNEL,
            format!("{} vanished from {}", env.ifname, netns.display()),
        )
    })?;
    if routed_v6 {
        let ifname = env.ifname.clone();
        trellis_net::netns::run_in(netns, move || sysctl::set_accept_dad(&ifname, false))
            .and_then(|r| r)
            .map_err(kernel)?;
    }
    pod.set_link_up(pod_end.index).await.map_err(kernel)?;

    let (ips, routes) = match conf.mode {
        Mode::Bridge => configure_bridged_pod(conf, &pod, pod_end.index, ipam).await?,
        Mode::Routed => configure_routed_pod(&host, &host_end, &pod, pod_end.index, ipam).await?,
    };
    enable_forwarding(ipam, conf)?;
    if conf.anti_spoofing {
        protect(conf, network, env, &host_end, &pod_end, &pod, ipam).await?;
    }
    if conf.ip_masq {
        masquerade(ipam)?;
    }
    if !conf.port_mappings.is_empty() {
        created.hostports = true;
        map_host_ports(conf, network, env, ipam)?;
    }

    let mut interfaces = Vec::new();
    if let Some(b) = &bridge {
        interfaces.push(interface(b, None, None));
    }
    interfaces.push(interface(&host_end, conf.mtu, None));
    interfaces.push(interface(&pod_end, conf.mtu, Some(netns)));
    let pod_index = interfaces.len() - 1;
    Ok(CniResult {
        interfaces,
        ips: ips
            .into_iter()
            .map(|mut ip| {
                ip.interface = Some(pod_index);
                ip
            })
            .collect(),
        routes,
        dns: dns
            .cloned()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| ipam.dns.clone()),
    })
}

fn interface(l: &LinkInfo, mtu: Option<u32>, sandbox: Option<&Path>) -> Interface {
    Interface {
        name: l.name.clone(),
        mac: l.mac.map(|m| m.to_string()),
        mtu,
        sandbox: sandbox.map(|p| p.to_string_lossy().into_owned()),
        ..Default::default()
    }
}

/// What ADD can refuse before IPAM runs: a device that holds the bridge's name and is not a
/// bridge (checked again, for a race, when the bridge is used).
pub async fn preflight(conf: &Config) -> Result<(), CniError> {
    if conf.mode != Mode::Bridge {
        return Ok(());
    }
    let host = Netlink::connect().map_err(kernel)?;
    match host.link_by_name(&conf.bridge).await.map_err(kernel)? {
        Some(l) => check_is_bridge(&l),
        None => Ok(()),
    }
}

/// Creates the bridge or reuses it (refusing a non-bridge device of that name), brings it up and
/// gives it the gateway addresses when `isGateway`.
async fn ensure_bridge(
    host: &Netlink,
    conf: &Config,
    ipam: &CniResult,
    created: &mut Created,
) -> Result<LinkInfo, CniError> {
    let br = match host.link_by_name(&conf.bridge).await.map_err(kernel)? {
        Some(l) => l,
        None => {
            let mut cfg = BridgeConfig::new(&conf.bridge);
            cfg.mtu = conf.mtu;
            // A bridge without a MAC of its own takes its lowest port's, and all zeros once its
            // last port leaves: the pods' gateway MAC would change under them. Give it a stable
            // one.
            cfg.mac = Some(names::bridge_mac(&conf.bridge));
            match host.create_bridge(&cfg).await {
                Ok(l) => {
                    created.bridge = Some(l.index);
                    if let Some(mtu) = conf.mtu {
                        // Set again after creation: only an MTU set this way marks the bridge's
                        // MTU as chosen by the user, and then the kernel stops recomputing it
                        // over every port at each port added (which grows with the pods).
                        host.set_link_mtu(l.index, mtu).await.map_err(kernel)?;
                    }
                    l
                }
                // Another ADD created it in the meantime.
                Err(e) if e.is_exists() => host
                    .link_by_name(&conf.bridge)
                    .await
                    .map_err(kernel)?
                    .ok_or_else(|| CniError::new(code::KERNEL, format!("bridge {} vanished", conf.bridge)))?,
                Err(e) => return Err(kernel(e)),
            }
        }
    };
    check_is_bridge(&br)?;
    if created.bridge.is_some() {
        // The gateway's link-local address would otherwise be tentative (unusable) for the
        // first seconds: the bridge is the only holder of that address on its segment.
        sysctl::set_accept_dad(&conf.bridge, false).map_err(kernel)?;
    }
    if !br.up {
        host.set_link_up(br.index).await.map_err(kernel)?;
    }
    if conf.promisc && !br.promisc {
        host.set_link_promisc(br.index, true).await.map_err(kernel)?;
    }
    if conf.is_gateway {
        // Addresses the bridge had are not ours to take back on failure; a bridge this ADD
        // created goes as a whole.
        let had = match created.bridge {
            Some(_) => Vec::new(),
            None => host.addresses(br.index).await.map_err(kernel)?,
        };
        for ip in &ipam.ips {
            let gw = ip.gateway.ok_or_else(|| {
                CniError::invalid_config(format!("isGateway is set but IPAM gave no gateway for {}", ip.address))
                    .with_details("give the IPAM range a \"gateway\", or set isGateway to false")
            })?;
            let addr = IpNetwork::new(gw, ip.address.prefix()).expect("prefix from IPAM");
            if created.bridge.is_none() && !had.iter().any(|a| a.address == addr) {
                if created.gateways.is_none() {
                    created.gateways = Some(GivenGateways {
                        bridge: br.index,
                        addresses: Vec::new(),
                        ports_before: ports_of(host, br.index).await?,
                    });
                }
                created.gateways.as_mut().expect("set above").addresses.push(addr);
            }
            let opts = AddressOptions {
                nodad: gw.is_ipv6(),
                no_prefix_route: false,
            };
            host.add_address_with(br.index, addr, opts).await.map_err(kernel)?;
        }
    }
    Ok(br)
}

/// A device called like the bridge must be a bridge.
pub fn check_is_bridge(l: &LinkInfo) -> Result<(), CniError> {
    if l.kind.as_deref() == Some("bridge") {
        return Ok(());
    }
    Err(
        CniError::invalid_config(format!("device {} exists and is not a bridge", l.name)).with_details(format!(
            "it is a {} device; set \"bridge\" to another name or remove the device",
            l.kind.as_deref().unwrap_or("physical")
        )),
    )
}

async fn configure_bridged_pod(
    conf: &Config,
    pod: &Netlink,
    index: u32,
    ipam: &CniResult,
) -> Result<(Vec<IpConfig>, Vec<CniRoute>), CniError> {
    for ip in &ipam.ips {
        let opts = AddressOptions {
            nodad: ip.address.is_ipv6(),
            no_prefix_route: false,
        };
        pod.add_address_with(index, ip.address, opts).await.map_err(kernel)?;
    }
    let gateway_of = |family: IpFamily| {
        ipam.ips
            .iter()
            .find(|i| IpFamily::of(i.address.ip()) == family)
            .and_then(|i| i.gateway)
    };
    let mut routes: Vec<CniRoute> = ipam.routes.clone();
    if conf.is_default_gateway {
        for ip in &ipam.ips {
            let any = IpNetwork::new(IpFamily::of(ip.address.ip()).unspecified(), 0).expect("/0");
            if !routes.iter().any(|r| r.dst == any) {
                routes.push(CniRoute::new(any, ip.gateway));
            }
        }
    }
    for r in &mut routes {
        let gw = r.gw.or_else(|| gateway_of(IpFamily::of(r.dst.ip())));
        let mut route = Route::new(r.dst).dev(index);
        if let Some(gw) = gw {
            route = route.via(gw);
        } else if is_default(&r.dst) {
            return Err(CniError::invalid_config(format!("route {} has no gateway", r.dst))
                .with_details("give the route a \"gw\" or the IPAM range a gateway"));
        }
        pod.replace_route(&route).await.map_err(kernel)?;
        r.gw = gw;
    }
    Ok((ipam.ips.clone(), routes))
}

async fn configure_routed_pod(
    host: &Netlink,
    host_end: &LinkInfo,
    pod: &Netlink,
    index: u32,
    ipam: &CniResult,
) -> Result<(Vec<IpConfig>, Vec<CniRoute>), CniError> {
    let host_mac = host_end
        .mac
        .ok_or_else(|| CniError::new(code::KERNEL, format!("{} has no MAC address", host_end.name)))?;
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for ip in &ipam.ips {
        let family = IpFamily::of(ip.address.ip());
        let gw = routed_gateway(family);
        let addr = single_host(ip.address.ip());
        let opts = AddressOptions {
            nodad: family == IpFamily::V6,
            no_prefix_route: false,
        };
        pod.add_address_with(index, addr, opts).await.map_err(kernel)?;
        pod.replace_neighbour(index, gw, host_mac).await.map_err(kernel)?;
        if family == IpFamily::V4 {
            // fe80::/64 is on-link by itself; 169.254.1.1 needs a link route.
            pod.replace_route(&Route::new(single_host(gw)).dev(index).scope(RouteScope::Link))
                .await
                .map_err(kernel)?;
        }
        let any = IpNetwork::new(family.unspecified(), 0).expect("/0");
        let mut dsts: Vec<IpNetwork> = ipam
            .routes
            .iter()
            .map(|r| r.dst)
            .filter(|d| IpFamily::of(d.ip()) == family)
            .collect();
        if !dsts.contains(&any) {
            dsts.insert(0, any);
        }
        for dst in dsts {
            pod.replace_route(&Route::new(dst).via(gw).dev(index))
                .await
                .map_err(kernel)?;
            routes.push(CniRoute::new(dst, Some(gw)));
        }
        host.replace_route(
            &Route::new(addr)
                .dev(host_end.index)
                .scope(RouteScope::Link)
                .protocol(HOST_ROUTE_PROTOCOL),
        )
        .await
        .map_err(kernel)?;
        ips.push(IpConfig {
            address: addr,
            gateway: Some(gw),
            interface: None,
        });
    }
    if ipam.ips.iter().any(|i| i.address.is_ipv4()) {
        sysctl::set_proxy_arp(&host_end.name, true).map_err(kernel)?;
    }
    Ok((ips, routes))
}

/// Turns on forwarding for the families in use (a write only when it is off).
fn enable_forwarding(ipam: &CniResult, conf: &Config) -> Result<(), CniError> {
    if conf.mode == Mode::Bridge && !conf.is_gateway {
        return Ok(());
    }
    if ipam.ips.iter().any(|i| i.address.is_ipv4())
        && sysctl::read("net.ipv4.ip_forward").map_err(kernel)?.trim() != "1"
    {
        sysctl::set_ipv4_forwarding(true).map_err(kernel)?;
    }
    if ipam.ips.iter().any(|i| i.address.is_ipv6())
        && sysctl::read("net.ipv6.conf.all.forwarding").map_err(kernel)?.trim() != "1"
    {
        sysctl::set_ipv6_forwarding(true).map_err(kernel)?;
    }
    Ok(())
}

/// Masquerades the pods' subnets to everything outside them, as Calico's `natOutgoing` does per
/// pool: the rule depends on the subnet, not on the pod, so after the first pod of a subnet an
/// ADD only reads (no nftables commit, which costs a kernel RCU grace period at exit) and a DEL
/// has nothing to undo.
fn masquerade(ipam: &CniResult) -> Result<(), CniError> {
    let subnets: Vec<IpNetwork> = ipam
        .ips
        .iter()
        .map(|i| IpNetwork::new(i.address.network(), i.address.prefix()).expect("prefix from IPAM"))
        .collect();
    let m = Masquerade::new(MasqueradeConfig::new(subnets.clone())).map_err(nft)?;
    m.ensure().map_err(nft)?;
    let have = m.list_source_prefixes().map_err(nft)?;
    for s in subnets {
        let covered = have.iter().any(|h| h.prefix() <= s.prefix() && h.contains(s.network()));
        if !covered {
            m.add_source_prefix(s).map_err(nft)?;
        }
    }
    Ok(())
}

/// Maps the pod's hostPorts to its addresses in the node's table ([`HostPorts`]); a host port
/// another pod holds is refused, naming that pod.
fn map_host_ports(conf: &Config, network: &str, env: &Env, ipam: &CniResult) -> Result<(), CniError> {
    let owners = names::hostport_owners(network, &env.container_id, &env.ifname);
    let ips: Vec<IpAddr> = ipam.ips.iter().map(|i| i.address.ip()).collect();
    let hp = HostPorts::new(DEFAULT_TABLE).map_err(hostport_error)?;
    match hp.add(&owners[0], &conf.port_mappings, &ips) {
        Ok(()) => Ok(()),
        Err(e) if e.is_exists() => {
            let held: Vec<String> = hp
                .list()
                .unwrap_or_default()
                .into_iter()
                .filter(|m| !owners.contains(&m.owner))
                .filter(|m| {
                    conf.port_mappings
                        .iter()
                        .any(|p| p.protocol == m.mapping.protocol && p.host_port == m.mapping.host_port)
                })
                .map(|m| format!("{}/{} by {}", m.mapping.host_port, m.mapping.protocol.name(), m.owner))
                .collect();
            Err(
                CniError::new(code::HOST_PORT_IN_USE, "a host port of this pod is held by another pod")
                    .with_details(format!("held: {}; free it or pick another hostPort", held.join(", "))),
            )
        }
        Err(e) => Err(hostport_error(e)),
    }
}

/// Anti-spoofing ([`AntiSpoof`]): from now on the pod may send only with its addresses (and
/// its link-local ones) and, in bridge mode, its MAC.
///
/// The link-local address is the EUI-64 one the kernel derives from the MAC by default, plus
/// any the pod already has (one made with `addr_gen_mode` stable-privacy comes up only once
/// the veth's carrier is seen, possibly after ADD returns: such a pod should turn its own
/// mode back to EUI-64 or run with `antiSpoofing: false`).
async fn protect(
    conf: &Config,
    network: &str,
    env: &Env,
    host_end: &LinkInfo,
    pod_end: &LinkInfo,
    pod: &Netlink,
    ipam: &CniResult,
) -> Result<(), CniError> {
    let mac = pod_end.mac.map(|m| m.0).unwrap_or_default();
    let mut ips: Vec<IpAddr> = ipam.ips.iter().map(|i| i.address.ip()).collect();
    ips.push(IpAddr::V6(eui64_link_local(mac)));
    for a in pod.addresses(pod_end.index).await.map_err(kernel)? {
        if let IpAddr::V6(v6) = a.address.ip() {
            if v6.is_unicast_link_local() && !ips.contains(&a.address.ip()) {
                ips.push(a.address.ip());
            }
        }
    }
    let identity = PodIdentity {
        port: host_end.name.clone(),
        kind: port_kind(conf),
        mac,
        ips,
        pod: env
            .args
            .pod_namespace()
            .zip(env.args.pod_name())
            .map(|(ns, name)| format!("{ns}/{name}")),
    };
    let owner = names::element_owner(network, &env.container_id, &env.ifname);
    AntiSpoof::new(DEFAULT_TABLE)
        .and_then(|g| g.protect(&owner, &identity))
        .map_err(anti_spoofing_error)?;
    if let Some(dir) = &conf.anti_spoofing_records {
        // Whole or absent: written aside, then renamed into place.
        let path = dir.join(&identity.port);
        let tmp = dir.join(format!(".{}.tmp", identity.port));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&tmp, identity.record(&owner)))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                CniError::new(code::IO, format!("anti-spoofing: writing {}: {e}", path.display()))
                    .with_details("the folder is antiSpoofingRecords in the network config (trellisd's --state-dir)")
            })?;
    }
    Ok(())
}

/// `fe80::/64` with the modified EUI-64 interface identifier of `mac` (RFC 4291 appendix A).
fn eui64_link_local(mac: [u8; 6]) -> std::net::Ipv6Addr {
    let m = mac;
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// Removes the attachment's hostPorts, then its host end (and with it the pod end and every
/// host route through it). Nothing there is success.
pub async fn teardown(conf: &Config, network: &str, env: &Env) -> Result<(), CniError> {
    unmap_host_ports(network, env)?;
    if let Some(dir) = &conf.anti_spoofing_records {
        let port = names::host_veth_name(network, &env.container_id, &env.ifname);
        // A pod deleted before trellisd released it must not leave its interface name or
        // addresses held for the next pod (the record has the addresses; without one, only
        // the name is known, and trellisd releases a reused address when it covers its pod).
        let ips = std::fs::read_to_string(dir.join(&port))
            .ok()
            .and_then(|t| PodIdentity::parse_record(&t))
            .map(|(_, id)| id.ips)
            .unwrap_or_default();
        PolicyTable::new(POLICY_TABLE, port_kind(conf))
            .and_then(|t| t.release(&port, &ips))
            .map_err(policy_error)?;
        match std::fs::remove_file(dir.join(&port)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CniError::new(
                    code::IO,
                    format!("anti-spoofing: removing {}: {e}", dir.join(&port).display()),
                ))
            }
            _ => {}
        }
    }
    let host = Netlink::connect().map_err(kernel)?;
    host.del_link_by_name(&names::host_veth_name(network, &env.container_id, &env.ifname))
        .await
        .map_err(kernel)
}

/// Whatever the runtime passes on DEL, the table is asked: the elements carry their owner
/// (hostPorts, anti-spoofing).
fn unmap_host_ports(network: &str, env: &Env) -> Result<(), CniError> {
    let hp = HostPorts::new(DEFAULT_TABLE).map_err(hostport_error)?;
    for owner in names::hostport_owners(network, &env.container_id, &env.ifname) {
        hp.remove(&owner).map_err(hostport_error)?;
    }
    AntiSpoof::new(DEFAULT_TABLE)
        .and_then(|g| g.remove(&names::element_owner(network, &env.container_id, &env.ifname)))
        .map_err(anti_spoofing_error)
}

/// Undoes a failed ADD: the hostPorts, the host end, the bridge if this ADD created it and no
/// port uses it, and the gateway addresses it gave an existing bridge unless a pod joined the
/// bridge since (a concurrent ADD of the same network, which relies on them).
pub async fn undo(conf: &Config, network: &str, env: &Env, created: &Created) -> Result<(), CniError> {
    teardown(conf, network, env).await?;
    if !created.held.is_empty() {
        let port = names::host_veth_name(network, &env.container_id, &env.ifname);
        PolicyTable::new(POLICY_TABLE, port_kind(conf))
            .and_then(|t| t.release(&port, &created.held))
            .map_err(policy_error)?;
    }
    let host = Netlink::connect().map_err(kernel)?;
    if let Some(bridge) = created.bridge {
        if ports_of(&host, bridge).await?.is_empty() {
            host.del_link(bridge).await.map_err(kernel)?;
        }
    }
    if let Some(given) = &created.gateways {
        let joined = ports_of(&host, given.bridge)
            .await?
            .iter()
            .any(|p| !given.ports_before.contains(p));
        if !joined {
            for &addr in &given.addresses {
                host.del_address(given.bridge, addr).await.map_err(kernel)?;
            }
        }
    }
    Ok(())
}

/// A link CHECK found administratively down: the pod is cut off through it.
fn down(what: String, up_with: String) -> CniError {
    CniError::new(code::CHECK_MISMATCH, format!("{what} is down")).with_details(format!(
        "the pod is cut off from the node while it is; bring it up ({up_with}) or recreate the pod"
    ))
}

/// CHECK: the host end, the pod end (both up), the bridge (up) or the node's routes to the pod,
/// and every address and route of `prev` are in place.
pub async fn check(conf: &Config, network: &str, env: &Env, prev: &CniResult) -> Result<(), CniError> {
    let mismatch = |msg: String| CniError::new(code::CHECK_MISMATCH, msg);
    let netns = env.netns.as_deref().expect("CHECK has CNI_NETNS");
    let host = Netlink::connect().map_err(kernel)?;
    let host_name = names::host_veth_name(network, &env.container_id, &env.ifname);
    let host_end = host.link_by_name(&host_name).await.map_err(kernel)?.ok_or_else(|| {
        mismatch(format!(
            "host end {host_name} of {} {} is missing",
            env.container_id, env.ifname
        ))
    })?;
    if !host_end.up {
        return Err(down(
            format!("host end {host_name} of {} {}", env.container_id, env.ifname),
            format!("ip link set {host_name} up"),
        ));
    }
    if conf.mode == Mode::Bridge {
        let br = host.link_by_name(&conf.bridge).await.map_err(kernel)?;
        match br {
            Some(b) if host_end.master == Some(b.index) => {
                if !b.up {
                    return Err(down(
                        format!("bridge {}", conf.bridge),
                        format!("ip link set {} up", conf.bridge),
                    ));
                }
            }
            _ => return Err(mismatch(format!("{host_name} is not a port of bridge {}", conf.bridge))),
        }
    }
    let pod = Netlink::connect_in(netns).map_err(kernel)?;
    let pod_end = pod
        .link_by_name(&env.ifname)
        .await
        .map_err(kernel)?
        .ok_or_else(|| mismatch(format!("interface {} is missing in {}", env.ifname, netns.display())))?;
    if !pod_end.up {
        return Err(down(
            format!("interface {} in {}", env.ifname, netns.display()),
            format!("ip -n {} link set {} up", netns.display(), env.ifname),
        ));
    }
    let have = pod.addresses(pod_end.index).await.map_err(kernel)?;
    let ours = |i: &IpConfig| {
        i.interface
            .and_then(|n| prev.interfaces.get(n))
            .is_none_or(|iface| iface.name == env.ifname && iface.sandbox.is_some())
    };
    for ip in prev.ips.iter().filter(|i| ours(i)) {
        if !have.iter().any(|a| a.address == ip.address) {
            return Err(mismatch(format!(
                "address {} is missing on {} in {}",
                ip.address,
                env.ifname,
                netns.display()
            ))
            .with_details(format!(
                "found {:?}",
                have.iter().map(|a| a.address.to_string()).collect::<Vec<_>>()
            )));
        }
    }
    if conf.mode == Mode::Routed {
        check_host_routes(&host, &host_end, prev.ips.iter().filter(|i| ours(i))).await?;
    }
    if !conf.port_mappings.is_empty() {
        let owners = names::hostport_owners(network, &env.container_id, &env.ifname);
        let mapped = HostPorts::new(DEFAULT_TABLE)
            .and_then(|hp| hp.list())
            .map_err(hostport_error)?;
        for ip in prev.ips.iter().filter(|i| ours(i)).map(|i| i.address.ip()) {
            for p in &conf.port_mappings {
                if !mapped
                    .iter()
                    .any(|m| owners.contains(&m.owner) && m.mapping == *p && m.pod_ip == ip)
                {
                    return Err(mismatch(format!(
                        "hostPort {}/{} -> {ip}:{} is not mapped",
                        p.host_port,
                        p.protocol.name(),
                        p.container_port
                    )));
                }
            }
        }
    }
    if conf.anti_spoofing {
        let owner = names::element_owner(network, &env.container_id, &env.ifname);
        let protected = AntiSpoof::new(DEFAULT_TABLE)
            .and_then(|g| g.owners())
            .map_err(anti_spoofing_error)?;
        if !protected.iter().any(|(o, _)| *o == owner) {
            return Err(mismatch(format!(
                "{host_name} is not under anti-spoofing protection (set {} of table {DEFAULT_TABLE})",
                if conf.mode == Mode::Bridge {
                    "bridge ports"
                } else {
                    "inet spoof_ports"
                }
            ))
            .with_details("the node's ruleset was flushed or edited; re-create the pod to restore it"));
        }
    }
    let routes = pod.routes(&RouteFilter::default()).await.map_err(kernel)?;
    for r in &prev.routes {
        let found = routes
            .iter()
            .any(|k| k.destination == r.dst && (r.gw.is_none() || k.gateway == r.gw));
        if !found {
            let via = r.gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(mismatch(format!(
                "route {}{via} is missing in {}",
                r.dst,
                netns.display()
            )));
        }
    }
    Ok(())
}

/// Routed mode: the node reaches each pod address by one host route through the host end.
async fn check_host_routes(
    host: &Netlink,
    host_end: &LinkInfo,
    ips: impl Iterator<Item = &IpConfig>,
) -> Result<(), CniError> {
    let filter = RouteFilter {
        oif: Some(host_end.index),
        ..Default::default()
    };
    let routes = host.routes(&filter).await.map_err(kernel)?;
    for ip in ips {
        let dst = single_host(ip.address.ip());
        if !routes.iter().any(|r| r.destination == dst && r.gateway.is_none()) {
            return Err(CniError::new(
                code::CHECK_MISMATCH,
                format!("host route {dst} dev {} is missing", host_end.name),
            )
            .with_details(format!(
                "the node cannot reach the pod without it (routed mode); recreate the pod, or add it back: \
                     ip route add {dst} dev {} scope link proto {HOST_ROUTE_PROTOCOL}",
                host_end.name
            )));
        }
    }
    Ok(())
}

/// STATUS: can an ADD work? Not when a non-bridge device holds the bridge's name.
pub async fn status(conf: &Config) -> Result<(), CniError> {
    preflight(conf).await.map_err(|e| match e.code {
        code::INVALID_NETWORK_CONFIG => CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg).with_details(e.details),
        _ => e,
    })
}

/// GC: deletes this network's host ends, hostPorts and anti-spoofing elements whose attachment
/// is not in `valid`.
/// Labels are compared whole, as ADD wrote them, so a shortened (long) container ID is matched
/// too.
pub async fn gc(network: &str, valid: &[trellis_cni::Attachment]) -> Result<Vec<String>, CniError> {
    let labels: HashSet<String> = valid
        .iter()
        .map(|a| names::host_alias(network, &a.container_id, &a.ifname))
        .collect();
    let owners: HashSet<String> = valid
        .iter()
        .flat_map(|a| names::hostport_owners(network, &a.container_id, &a.ifname))
        .collect();
    let stale = |in_use: &HashSet<String>, label: &str| names::is_of_network(label, network) && !in_use.contains(label);
    let mut removed: Vec<String> = HostPorts::new(DEFAULT_TABLE)
        .and_then(|hp| hp.remove_where(|owner| !stale(&owners, owner)))
        .map_err(hostport_error)?
        .into_iter()
        .map(|owner| format!("hostPorts of {owner}"))
        .collect();
    let unprotected = AntiSpoof::new(DEFAULT_TABLE)
        .and_then(|g| g.remove_where(|owner| !stale(&owners, owner)))
        .map_err(anti_spoofing_error)?;
    removed.extend(unprotected.into_iter().map(|owner| format!("anti-spoofing of {owner}")));
    let host = Netlink::connect().map_err(kernel)?;
    for l in host.links().await.map_err(kernel)? {
        if !l.name.starts_with(names::HOST_PREFIX) {
            continue;
        }
        if l.alias.as_deref().is_some_and(|a| stale(&labels, a)) {
            host.del_link(l.index).await.map_err(kernel)?;
            removed.push(l.name);
        }
    }
    Ok(removed)
}
