//! Routes, IPv4 and IPv6 through one routine: a [`Route`] is turned into an `RTM_*ROUTE`
//! message by [`route_message`] whatever its family, and parsed back by [`Route::from_message`].
//!
//! Conventions, taken from `ip route`:
//! - no protocol given: adds use `RTPROT_BOOT` (3), deletes match any protocol. The daemon
//!   sets its own protocol number on everything it adds, so it can list and remove only its own.
//! - no scope given: `link` for a unicast route without gateway, `host` for local routes,
//!   `universe` otherwise; deletes match any scope.
//! - tables above 255 go in `RTA_TABLE` (the header's byte is then `RT_TABLE_UNSPEC`).
//! - deletes match on destination, table, and whatever of gateway, device, metric, protocol,
//!   scope and source is set; never on the MTU.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric};
pub use netlink_packet_route::route::{RouteScope, RouteType};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{IpFamily, NetError, Netlink};

/// The main routing table.
pub const RT_TABLE_MAIN: u32 = 254;
/// The protocol `ip route add` uses, and ours when none is given.
pub const RTPROT_BOOT: u8 = 3;
/// Routes the kernel made itself (prefix routes of addresses).
pub const RTPROT_KERNEL: u8 = 2;

/// A route. Built with [`Route::new`] and the setters, or returned by [`Netlink::routes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix (host bits are cleared when the message is built).
    pub destination: IpNetwork,
    /// Next hop (same family as the destination).
    pub gateway: Option<IpAddr>,
    /// Output link index.
    pub oif: Option<u32>,
    /// Routing table.
    pub table: u32,
    /// `RTPROT_*`: who owns the route.
    pub protocol: Option<u8>,
    /// Scope; see the module docs for the default.
    pub scope: Option<RouteScope>,
    /// Unicast, blackhole, local...
    pub kind: RouteType,
    /// `RTNH_F_ONLINK`: the gateway is on the link even if no address says so.
    pub onlink: bool,
    /// Metric (`RTA_PRIORITY`).
    pub metric: Option<u32>,
    /// Path MTU (`RTAX_MTU`).
    pub mtu: Option<u32>,
    /// Preferred source address (`RTA_PREFSRC`).
    pub pref_src: Option<IpAddr>,
    /// `nhid ID`: the route goes by a nexthop object ([`crate::nexthop`]). A route built with one
    /// sends no gateway, device or `onlink` of its own (the kernel refuses both at once); one
    /// read from the kernel reports the nexthop's gateway and device as well.
    pub nexthop_id: Option<u32>,
}

impl Route {
    /// A unicast route to `destination` in the main table.
    pub fn new(destination: IpNetwork) -> Self {
        Self {
            destination,
            gateway: None,
            oif: None,
            table: RT_TABLE_MAIN,
            protocol: None,
            scope: None,
            kind: RouteType::Unicast,
            onlink: false,
            metric: None,
            mtu: None,
            pref_src: None,
            nexthop_id: None,
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

    /// `table TABLE`.
    pub fn table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    /// `proto PROTOCOL`.
    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// `scope SCOPE`.
    pub fn scope(mut self, scope: RouteScope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Route type (`blackhole`, `unreachable`, ...).
    pub fn kind(mut self, kind: RouteType) -> Self {
        self.kind = kind;
        self
    }

    /// `onlink`.
    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }

    /// `metric METRIC`.
    pub fn metric(mut self, metric: u32) -> Self {
        self.metric = Some(metric);
        self
    }

    /// `mtu MTU`.
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// `src ADDRESS`.
    pub fn pref_src(mut self, src: IpAddr) -> Self {
        self.pref_src = Some(src);
        self
    }

    /// `nhid ID`.
    pub fn nexthop(mut self, id: u32) -> Self {
        self.nexthop_id = Some(id);
        self
    }

    /// The family of the destination.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.destination.ip())
    }

    pub(crate) fn from_message(msg: &RouteMessage) -> Option<Self> {
        let family = IpFamily::from_netlink(msg.header.address_family)?;
        let mut dst = family.unspecified();
        let mut route = Route::new(IpNetwork::new(dst, 0).ok()?);
        route.table = u32::from(msg.header.table);
        route.protocol = Some(msg.header.protocol.into());
        route.scope = Some(msg.header.scope);
        route.kind = msg.header.kind;
        route.onlink = msg.header.flags.contains(RouteFlags::Onlink);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = ip_of(a)?,
                RouteAttribute::Gateway(a) => route.gateway = ip_of(a),
                RouteAttribute::PrefSource(a) => route.pref_src = ip_of(a),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Priority(p) => route.metric = Some(*p),
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::NhId(id) => route.nexthop_id = Some(*id),
                RouteAttribute::Metrics(metrics) => {
                    for m in metrics {
                        if let RouteMetric::Mtu(mtu) = m {
                            route.mtu = Some(*mtu);
                        }
                    }
                }
                _ => {}
            }
        }
        route.destination = IpNetwork::new(dst, msg.header.destination_prefix_length).ok()?;
        Some(route)
    }

    /// `10.1.0.0/24 via 10.0.0.2 dev vxlan0 table 100 onlink`, with the link name looked up.
    async fn describe(&self, nl: &Netlink) -> String {
        let mut s = self.destination.to_string();
        if let Some(id) = self.nexthop_id {
            s.push_str(&format!(" nhid {id}"));
        }
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" via {gw}"));
        }
        if let Some(oif) = self.oif {
            s.push_str(&format!(" dev {}", nl.link_label(oif).await));
        }
        if self.table != RT_TABLE_MAIN {
            s.push_str(&format!(" table {}", self.table));
        }
        if let Some(p) = self.protocol {
            s.push_str(&format!(" proto {p}"));
        }
        if self.onlink {
            s.push_str(" onlink");
        }
        s
    }
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some((*ip).into()),
        RouteAddress::Inet6(ip) => Some((*ip).into()),
        _ => None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Del,
}

/// The one routine that builds a route message, for either family.
fn route_message(r: &Route, op: Op) -> Result<RouteMessage, NetError> {
    let family = r.family();
    let gateway = r.gateway.filter(|_| r.nexthop_id.is_none());
    for ip in [gateway, r.pref_src].into_iter().flatten() {
        if IpFamily::of(ip) != family {
            return Err(NetError::InvalidArgument(format!(
                "route {}: {ip} is not of the same family",
                r.destination
            )));
        }
    }
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family.to_netlink();
    h.destination_prefix_length = r.destination.prefix();
    h.table = u8::try_from(r.table).unwrap_or(0);
    h.kind = r.kind;
    h.protocol = match op {
        Op::Add => r.protocol.unwrap_or(RTPROT_BOOT),
        Op::Del => r.protocol.unwrap_or(0),
    }
    .into();
    h.scope = r.scope.unwrap_or(match (op, r.kind) {
        (Op::Del, _) => RouteScope::NoWhere,
        (_, RouteType::Local | RouteType::Nat) => RouteScope::Host,
        (_, RouteType::Broadcast | RouteType::Multicast | RouteType::Anycast) => RouteScope::Link,
        // A nexthop object with a gateway refuses a link-scope route ("Scope mismatch with
        // nexthop"); iproute2 gives `nhid` routes universe scope too.
        (_, RouteType::Unicast | RouteType::Unspec) if r.gateway.is_none() && r.nexthop_id.is_none() => {
            RouteScope::Link
        }
        _ => RouteScope::Universe,
    });
    // With a nexthop object, the gateway, device and flags are the object's: a route read back
    // from the kernel carries them too, and sending them again would be refused.
    if r.onlink && r.nexthop_id.is_none() {
        h.flags.insert(RouteFlags::Onlink);
    }
    let attrs = &mut msg.attributes;
    attrs.push(RouteAttribute::Table(r.table));
    if r.destination.prefix() > 0 {
        let network = IpNetwork::new(r.destination.network(), r.destination.prefix())
            .map_err(|e| NetError::InvalidArgument(format!("route {}: {e}", r.destination)))?;
        attrs.push(RouteAttribute::Destination(network.ip().into()));
    }
    match r.nexthop_id {
        Some(id) => attrs.push(RouteAttribute::NhId(id)),
        None => {
            if let Some(gw) = r.gateway {
                attrs.push(RouteAttribute::Gateway(gw.into()));
            }
            if let Some(oif) = r.oif {
                attrs.push(RouteAttribute::Oif(oif));
            }
        }
    }
    if let Some(metric) = r.metric {
        attrs.push(RouteAttribute::Priority(metric));
    }
    if let Some(src) = r.pref_src {
        attrs.push(RouteAttribute::PrefSource(src.into()));
    }
    // Metrics are not part of a route's identity: a delete carrying a stale MTU would not
    // match (ESRCH), which reads as "already gone".
    if let (Some(mtu), Op::Add) = (r.mtu, op) {
        attrs.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    Ok(msg)
}

/// Which routes [`Netlink::routes`] returns; `None` fields match everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteFilter {
    /// IPv4 or IPv6 only.
    pub family: Option<IpFamily>,
    /// One table only (`Some(RT_TABLE_MAIN)` for `ip route show`).
    pub table: Option<u32>,
    /// One protocol only (the daemon's own).
    pub protocol: Option<u8>,
    /// Routes out of one link only.
    pub oif: Option<u32>,
}

impl RouteFilter {
    fn matches(&self, r: &Route) -> bool {
        self.family.is_none_or(|f| f == r.family())
            && self.table.is_none_or(|t| t == r.table)
            && self.protocol.is_none_or(|p| Some(p) == r.protocol)
            && self.oif.is_none_or(|o| Some(o) == r.oif)
    }
}

impl Netlink {
    /// `ip route add`: an existing route is an EEXIST error.
    pub async fn add_route(&self, route: &Route) -> Result<(), NetError> {
        self.new_route(route, NLM_F_CREATE | NLM_F_EXCL, "adding").await
    }

    /// `ip route replace`: creates the route or replaces the one with the same destination,
    /// table, metric (and, for IPv4, tos).
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetError> {
        self.new_route(route, NLM_F_CREATE | NLM_F_REPLACE, "replacing").await
    }

    /// `ip route del`: a missing route is success.
    pub async fn del_route(&self, route: &Route) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::DelRoute(route_message(route, Op::Del)?);
        match self.ack(msg, 0).await {
            Err(f) if !f.is_not_found() => Err(f.context(format!("deleting route {}", route.describe(self).await))),
            _ => Ok(()),
        }
    }

    /// The routes that match `filter` (cached/cloned entries excluded; multipath routes are
    /// returned without their next hops).
    pub async fn routes(&self, filter: &RouteFilter) -> Result<Vec<Route>, NetError> {
        let mut req = RouteMessage::default();
        if let Some(family) = filter.family {
            req.header.address_family = family.to_netlink();
        }
        let replies = self
            .dump(RouteNetlinkMessage::GetRoute(req))
            .await
            .map_err(|f| f.context("listing routes"))?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if !r.header.flags.contains(RouteFlags::Cloned) => {
                    Route::from_message(r)
                }
                _ => None,
            })
            .filter(|r| filter.matches(r))
            .collect())
    }

    async fn new_route(&self, route: &Route, flags: u16, verb: &str) -> Result<(), NetError> {
        let msg = RouteNetlinkMessage::NewRoute(route_message(route, Op::Add)?);
        match self.ack(msg, flags).await {
            Ok(()) => Ok(()),
            Err(f) => Err(f.context(format!("{verb} route {}", route.describe(self).await))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_routine_builds_both_families() {
        for (dst, gw) in [("10.1.0.7/24", "10.0.0.2"), ("fd00:1::7/64", "fd00::2")] {
            let route = Route::new(dst.parse().unwrap())
                .via(gw.parse().unwrap())
                .dev(3)
                .protocol(99)
                .mtu(1400);
            let msg = route_message(&route, Op::Add).unwrap();
            let back = Route::from_message(&msg).unwrap();
            assert_eq!(back.destination.ip(), route.destination.network(), "host bits cleared");
            assert_eq!(back.gateway, route.gateway);
            assert_eq!((back.oif, back.protocol, back.mtu), (Some(3), Some(99), Some(1400)));
            assert_eq!(back.scope, Some(RouteScope::Universe));
        }
    }

    #[test]
    fn defaults_follow_iproute2() {
        let dev_route = Route::new("10.1.0.0/24".parse().unwrap()).dev(3);
        let add = route_message(&dev_route, Op::Add).unwrap();
        assert_eq!(
            (add.header.scope, u8::from(add.header.protocol)),
            (RouteScope::Link, RTPROT_BOOT)
        );
        let del = route_message(&dev_route, Op::Del).unwrap();
        assert_eq!(
            (del.header.scope, u8::from(del.header.protocol)),
            (RouteScope::NoWhere, 0)
        );
    }

    #[test]
    fn a_route_by_nexthop_object_sends_only_the_id() {
        // As read back from the kernel: the nexthop's gateway, device and flags included.
        let route = Route::new("10.9.0.0/24".parse().unwrap())
            .nexthop(42)
            .via("10.6.0.1".parse().unwrap())
            .dev(3)
            .onlink()
            .protocol(117);
        for op in [Op::Add, Op::Del] {
            let msg = route_message(&route, op).unwrap();
            assert!(msg.attributes.contains(&RouteAttribute::NhId(42)));
            assert!(
                !msg.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Oif(_))),
                "{:?}",
                msg.attributes
            );
            assert!(!msg.header.flags.contains(RouteFlags::Onlink));
        }
        let bare = Route::new("10.9.0.0/24".parse().unwrap()).nexthop(42);
        let add = route_message(&bare, Op::Add).unwrap();
        assert_eq!(add.header.scope, RouteScope::Universe, "as `ip route add … nhid 42`");
        assert_eq!(Route::from_message(&add).unwrap().nexthop_id, Some(42));
    }

    #[test]
    fn mixed_families_are_rejected() {
        let route = Route::new("10.1.0.0/24".parse().unwrap()).via("fd00::1".parse().unwrap());
        assert!(matches!(
            route_message(&route, Op::Add),
            Err(NetError::InvalidArgument(_))
        ));
    }
}
