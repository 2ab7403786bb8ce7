//! Kernel parameters under `/proc/sys`, with typed helpers for the networking ones we set.
//!
//! `/proc/sys/net` shows the network namespace of the thread that *opens* the file. To set a
//! pod's parameters, call these inside [`crate::netns::run_in`]:
//!
//! ```no_run
//! # fn f(pod: &std::path::Path) -> Result<(), trellis_net::NetError> {
//! trellis_net::netns::run_in(pod, || trellis_net::sysctl::set_accept_dad("eth0", false))??;
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use crate::link::check_ifname;
use crate::{IpFamily, NetError};

const ROOT: &str = "/proc/sys";

/// Reverse-path filtering (`rp_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpFilter {
    /// No source validation.
    Off = 0,
    /// Strict (RFC 3704): the reply must leave by the interface the packet came in by.
    Strict = 1,
    /// Loose: the source must be reachable by some interface.
    Loose = 2,
}

/// `sysctl -w KEY=VALUE`. `KEY` is dotted (`net.ipv4.ip_forward`); as with sysctl(8), a `/`
/// in it stands for a dot inside one component (`net.ipv4.conf.eth0/100.forwarding`).
pub fn write(key: &str, value: &str) -> Result<(), NetError> {
    write_path(key_path(key)?, value)
}

/// `sysctl -n KEY`, without the trailing newline.
pub fn read(key: &str) -> Result<String, NetError> {
    read_path(key_path(key)?)
}

/// `net.ipv4.ip_forward`.
pub fn set_ipv4_forwarding(on: bool) -> Result<(), NetError> {
    write("net.ipv4.ip_forward", flag(on))
}

/// `net.ipv6.conf.all.forwarding`.
pub fn set_ipv6_forwarding(on: bool) -> Result<(), NetError> {
    write_path(conf_path(IpFamily::V6, "all", "forwarding")?, flag(on))
}

/// `net.ipv4.conf.IF.proxy_arp`: answer ARP requests for addresses routed elsewhere (routed
/// mode: the host answers for the pod's gateway).
pub fn set_proxy_arp(ifname: &str, on: bool) -> Result<(), NetError> {
    write_path(conf_path(IpFamily::V4, ifname, "proxy_arp")?, flag(on))
}

/// `net.ipv4.conf.IF.rp_filter`. The kernel uses the higher of `all` and `IF`.
pub fn set_rp_filter(ifname: &str, mode: RpFilter) -> Result<(), NetError> {
    write_path(conf_path(IpFamily::V4, ifname, "rp_filter")?, &(mode as u8).to_string())
}

/// `net.ipv6.conf.IF.accept_dad`: off makes new IPv6 addresses usable at once.
pub fn set_accept_dad(ifname: &str, on: bool) -> Result<(), NetError> {
    write_path(conf_path(IpFamily::V6, ifname, "accept_dad")?, flag(on))
}

/// `net.ipv6.conf.IF.disable_ipv6`.
pub fn set_disable_ipv6(ifname: &str, disabled: bool) -> Result<(), NetError> {
    write_path(conf_path(IpFamily::V6, ifname, "disable_ipv6")?, flag(disabled))
}

/// `net.ipv4.route.flush` / `net.ipv6.route.flush`: forget cached routes and learned path MTUs
/// (after changing MTUs on a path).
pub fn flush_route_cache(family: IpFamily) -> Result<(), NetError> {
    write(&format!("net.{}.route.flush", family_dir(family)), "1")
}

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

fn family_dir(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

/// `/proc/sys/net/ipvN/conf/IF/LEAF`, built from parts so that dots in `IF` need no escaping.
fn conf_path(family: IpFamily, ifname: &str, leaf: &str) -> Result<PathBuf, NetError> {
    check_ifname(ifname)?;
    Ok(PathBuf::from(ROOT)
        .join("net")
        .join(family_dir(family))
        .join("conf")
        .join(ifname)
        .join(leaf))
}

fn key_path(key: &str) -> Result<PathBuf, NetError> {
    let mut path = PathBuf::from(ROOT);
    for part in key.split('.') {
        let part = part.replace('/', ".");
        if part.is_empty() || part == "." || part == ".." {
            return Err(NetError::InvalidArgument(format!("bad sysctl key {key:?}")));
        }
        path.push(part);
    }
    Ok(path)
}

fn write_path(path: PathBuf, value: &str) -> Result<(), NetError> {
    std::fs::write(&path, value).map_err(|e| NetError::io(format!("writing {value:?} to {}", path.display()), e))
}

fn read_path(path: PathBuf) -> Result<String, NetError> {
    std::fs::read_to_string(&path)
        .map(|s| s.trim_end().to_string())
        .map_err(|e| NetError::io(format!("reading {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_proc_paths() {
        assert_eq!(
            key_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(
            key_path("net.ipv4.conf.eth0/100.forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert!(key_path("net..ipv4").is_err());
        assert!(key_path("net.ipv4.conf.//.x").is_err());
        assert_eq!(
            conf_path(IpFamily::V6, "eth0.100", "accept_dad").unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/conf/eth0.100/accept_dad")
        );
        assert!(conf_path(IpFamily::V4, "../x", "proxy_arp").is_err());
    }
}
