//! Shared test helpers: unique names, namespaces, and `ip` for cross-checking.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use trellis_net::netns::NetnsGuard;
use trellis_net::{AddressOptions, LinkInfo, Netlink, VethConfig};

/// A fresh named namespace `tnet-TAG-PID-N`, deleted when dropped (also on panic).
pub fn netns(tag: &str) -> NetnsGuard {
    NetnsGuard::create(&format!("tnet-{tag}")).expect("creating a test network namespace")
}

/// A link name unique in this machine, at most 15 bytes: `t{pid hex}{n}{tag}`.
pub fn ifname(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("t{:x}{n}{tag}", std::process::id());
    assert!(name.len() <= 15, "{name} too long");
    name
}

/// `ip -n NS ARGS...`, stdout; panics if `ip` fails.
pub fn ip(ns: &NetnsGuard, args: &[&str]) -> String {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair with both ends in the connection's namespace, both up.
pub async fn veth_pair_up(nl: &Netlink) -> (LinkInfo, LinkInfo) {
    let (a, b) = (ifname("a"), ifname("b"));
    let a = nl.create_veth(&VethConfig::new(&a, &b)).await.unwrap();
    let b = nl.link_by_name(&b).await.unwrap().unwrap();
    nl.set_link_up(a.index).await.unwrap();
    nl.set_link_up(b.index).await.unwrap();
    (a, b)
}

/// An up veth holding 10.0.0.1/24 and fd00::1/64 (no DAD); returns its index.
pub async fn dual_stack_link(nl: &Netlink) -> u32 {
    let (link, _) = veth_pair_up(nl).await;
    nl.add_address(link.index, "10.0.0.1/24".parse().unwrap())
        .await
        .unwrap();
    let nodad = AddressOptions {
        nodad: true,
        ..Default::default()
    };
    nl.add_address_with(link.index, "fd00::1/64".parse().unwrap(), nodad)
        .await
        .unwrap();
    link.index
}
