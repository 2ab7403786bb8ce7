//! Sysctls are per network namespace of the thread that opens them.

mod common;

use std::path::Path;

use common::netns;
use trellis_net::netns::{netns_id, run_in, THREAD_NETNS};
use trellis_net::sysctl::{self, RpFilter};
use trellis_net::{IpFamily, Netlink};

#[tokio::test]
async fn sysctls_are_set_inside_a_namespace_only() {
    let ns = netns("sysctl");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let (link, _) = common::veth_pair_up(&nl).await;
    let name = link.name.clone();

    let read_back = run_in(ns.path(), || -> Result<Vec<String>, trellis_net::NetError> {
        sysctl::set_ipv4_forwarding(true)?;
        sysctl::set_ipv6_forwarding(true)?;
        sysctl::set_proxy_arp(&name, true)?;
        sysctl::set_rp_filter(&name, RpFilter::Loose)?;
        sysctl::set_accept_dad(&name, false)?;
        sysctl::flush_route_cache(IpFamily::V4)?;
        sysctl::flush_route_cache(IpFamily::V6)?;
        ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
            .iter()
            .map(|k| sysctl::read(k))
            .chain(
                ["proxy_arp", "rp_filter"]
                    .iter()
                    .map(|leaf| sysctl::read(&format!("net.ipv4.conf.{name}.{leaf}"))),
            )
            .chain(std::iter::once(sysctl::read(&format!(
                "net.ipv6.conf.{name}.accept_dad"
            ))))
            .collect()
    })
    .unwrap()
    .unwrap();
    assert_eq!(read_back, ["1", "1", "1", "2", "0"]);

    // The caller's thread is still at home, where this link does not exist.
    assert_ne!(netns_id(Path::new(THREAD_NETNS)).unwrap(), netns_id(ns.path()).unwrap());
    let err = sysctl::read(&format!("net.ipv4.conf.{}.proxy_arp", link.name)).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(sysctl::set_proxy_arp("bad/name", true).is_err());
}
