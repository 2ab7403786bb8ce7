//! Entering namespaces, named namespaces, and connections bound to a namespace.

mod common;

use std::path::Path;

use trellis_net::netns::{self, netns_id, run_in, NETNS_RUN_DIR, THREAD_NETNS};
use trellis_net::{BridgeConfig, NetError, Netlink};

fn own_netns() -> u64 {
    netns_id(Path::new(THREAD_NETNS)).unwrap()
}

#[test]
fn run_in_runs_inside_the_namespace_and_leaves_the_caller_alone() {
    let ns = common::netns("runin");
    let before = own_netns();
    let inside = run_in(ns.path(), || netns_id(Path::new(THREAD_NETNS)).unwrap()).unwrap();
    assert_eq!(inside, netns_id(ns.path()).unwrap());
    assert_ne!(inside, before);
    assert_eq!(own_netns(), before);
}

#[test]
fn a_panic_inside_run_in_is_an_error_and_the_caller_stays_home() {
    let ns = common::netns("panic");
    let before = own_netns();
    let err = run_in(ns.path(), || -> u32 { panic!("boom in pod") }).unwrap_err();
    assert!(
        matches!(&err, NetError::Panicked { message, .. } if message == "boom in pod"),
        "{err}"
    );
    assert!(err.to_string().contains(ns.path().to_str().unwrap()), "{err}");
    assert_eq!(own_netns(), before);
    // and the namespace is still usable
    assert_eq!(run_in(ns.path(), || 7).unwrap(), 7);
}

#[test]
fn run_in_a_missing_namespace_is_not_found() {
    let err = run_in(Path::new("/run/netns/tnet-does-not-exist"), || ()).unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[test]
fn guard_creates_a_named_namespace_and_removes_it() {
    let ns = common::netns("guard");
    let path = ns.path().to_path_buf();
    assert!(path.starts_with(NETNS_RUN_DIR));
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(ns.name()));
    let name = ns.name().to_string();
    drop(ns);
    assert!(!path.exists());
    netns::delete_named(&name).expect("deleting a missing namespace is success");
    assert!(netns::delete_named("../etc").is_err());
}

#[tokio::test]
async fn a_connection_stays_in_the_namespace_it_was_opened_in() {
    let ns = common::netns("conn");
    let nl = Netlink::connect_in(ns.path()).unwrap();
    let links = nl.links().await.unwrap();
    assert_eq!(links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["lo"]);

    let name = common::ifname("br");
    nl.create_bridge(&BridgeConfig::new(&name)).await.unwrap();
    assert!(nl.link_by_name(&name).await.unwrap().is_some());
    // The caller's own namespace (read only) does not see it.
    let here = Netlink::connect().unwrap();
    assert!(here.link_by_name(&name).await.unwrap().is_none());
}

#[test]
fn connecting_outside_a_runtime_is_an_error() {
    assert!(matches!(Netlink::connect(), Err(NetError::NoRuntime)));
}
