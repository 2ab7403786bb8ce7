//! The IPIP backend between three node namespaces, one of them behind a router: the device as
//! Calico would make it (but our own, not `tunl0`), onlink routes via the nodes' underlay
//! addresses, pods reach each other, a deleted device comes back. Skipped, with the reason
//! printed, on kernels without IPIP support (the message bytes are unit-tested in trellis-net).

mod dataplane_support;

use dataplane_support::*;
use trellisd::config::Backend;
use trellisd::lease::BackendData;
use trellisd::metrics::Metrics;
use trellisd::reconcile::{Dataplane, DataplaneError, ReconcileReport};

#[tokio::test]
async fn ipip_carries_pods_across_nodes_on_and_off_the_subnet() {
    if let Err(why) = ipip_support().await {
        eprintln!("SKIPPED ipip_carries_pods_across_nodes_on_and_off_the_subnet: {why}");
        return;
    }
    let c = cluster_behind_router(false).await;
    let (mut dps, leases) = start(&c, &Backend::Ipip).await;
    let n1 = &c.nodes[0];
    assert_eq!(dps[0].backend_data(), BackendData::Ipip);
    assert_eq!(dps[0].pod_mtu(), 1480);

    let details = n1.ip(&["-d", "link", "show", "trellis.ipip"]);
    for want in ["ipip", "local 192.168.77.11", "dev ul0", "ttl 64", "mtu 1480"] {
        assert!(details.contains(want), "{want:?} not in {details}");
    }
    let addrs = n1.ip(&["addr", "show", "dev", "trellis.ipip"]);
    assert!(addrs.contains("10.244.1.0/32"), "{addrs}");
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    for want in [
        "10.244.2.0/24 via 192.168.77.12 dev trellis.ipip onlink",
        "10.244.3.0/24 via 192.168.78.13 dev trellis.ipip onlink",
    ] {
        assert!(routes.contains(want), "{want:?} not in {routes}");
    }
    assert_full_mesh(&c).await;
    // The node's own traffic leaves from its tunnel address and comes back.
    let ping = run(
        "ip",
        &[
            "netns",
            "exec",
            n1.ns.name(),
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "10.244.3.2",
        ],
    );
    assert!(ping.contains("1 received"), "{ping}");
    for dp in &mut dps {
        assert_eq!(dp.reconcile(&leases).await.unwrap(), ReconcileReport::default());
    }

    // Someone deletes the device: noticed, recreated with its address, nexthops and routes.
    let mut changes = dps[0].kernel_changes();
    n1.ip(&["link", "del", "trellis.ipip"]);
    assert!(fired(&mut changes, 3).await);
    let report = dps[0].reconcile(&leases).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport {
            added: 2 + 2,
            removed: 0
        }
    );
    assert_full_mesh(&c).await;
}

#[tokio::test]
async fn without_ipip_support_the_backend_says_so() {
    let Err(why) = ipip_support().await else {
        eprintln!("SKIPPED without_ipip_support_the_backend_says_so: this kernel has IPIP support");
        return;
    };
    eprintln!("no IPIP here ({why}): checking the error");
    let c = cluster(false).await;
    let n1 = &c.nodes[0];
    let err = match Dataplane::new_in(n1.config(&Backend::Ipip), Metrics::new(), n1.ns.path()).await {
        Ok(_) => panic!("a dataplane without IPIP support"),
        Err(e) => e,
    };
    assert!(matches!(err, DataplaneError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("modprobe ipip"), "{err}");
}
