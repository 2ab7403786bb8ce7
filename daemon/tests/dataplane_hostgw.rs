//! host-gw and VXLAN with DirectRouting between three node namespaces on one L2 subnet.

mod dataplane_support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use dataplane_support::*;
use trellisd::config::Backend;
use trellisd::lease::{BackendData, Lease};
use trellisd::reconcile::ReconcileReport;

/// Log lines written while the returned guard lives (this thread only).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap()).matches(needle).count()
    }
}

#[tokio::test]
async fn host_gw_routes_via_the_nodes_and_refuses_one_off_the_subnet_once() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let c = cluster(false).await;
    // The VXLAN device of an earlier configuration (this node ran the vxlan backend).
    c.nodes[0].ip(&[
        "link",
        "add",
        "trellis.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "ul0",
    ]);
    let (mut dps, mut leases) = start(&c, &Backend::HostGw).await;
    let n1 = &c.nodes[0];
    assert_eq!(dps[0].pod_mtu(), 1500, "no encapsulation");
    assert!(
        n1.nl.link_by_name("trellis.1").await.unwrap().is_none(),
        "no device, and the earlier one removed"
    );
    assert!(
        logs.count("removed a device an earlier backend configuration left") == 1,
        "said so"
    );
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    assert!(routes.contains("10.244.3.0/24 via 192.168.77.13 dev ul0"), "{routes}");
    assert_full_mesh(&c).await;

    // A node behind a router: refused, logged once however often we reconcile.
    let mut far = Lease {
        node: "node-9".into(),
        underlay_ip: "10.99.0.9".parse().unwrap(),
        pod_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
        backend: BackendData::HostGw,
    };
    leases.insert(far.node.clone(), far.clone());
    for _ in 0..3 {
        assert_eq!(dps[0].reconcile(&leases).await.unwrap(), ReconcileReport::default());
    }
    assert!(!n1.routes(&["route", "show"]).contains("10.244.9.0"));
    let notices: Vec<_> = dps[0].notices().collect();
    assert!(notices.len() == 1 && notices[0].contains("node-9"), "{notices:?}");
    let refusal = "node node-9 (underlay 10.99.0.9) is not on this node's subnet";
    assert_eq!(logs.count(refusal), 1, "logged once");

    // It moves onto our subnet: routed; off again: refused and logged again.
    far.underlay_ip = "192.168.77.19".parse().unwrap();
    leases.insert(far.node.clone(), far.clone());
    assert_eq!(
        dps[0].reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 2, removed: 0 },
        "a nexthop and its route"
    );
    assert!(n1
        .routes(&["route", "show"])
        .contains("10.244.9.0/24 via 192.168.77.19 dev ul0"));
    far.underlay_ip = "10.99.0.9".parse().unwrap();
    leases.insert(far.node.clone(), far);
    assert_eq!(
        dps[0].reconcile(&leases).await.unwrap(),
        ReconcileReport { added: 0, removed: 2 }
    );
    assert_eq!(logs.count(refusal), 2);
    assert_full_mesh(&c).await;
}

#[tokio::test]
async fn vxlan_with_direct_routing_goes_direct_on_the_subnet_and_carries_ipv6_over_the_overlay() {
    let c = cluster(true).await;
    let (mut dps, leases) = start(&c, &vxlan(true)).await;
    let n1 = &c.nodes[0];
    let routes = n1.routes(&["route", "show", "proto", "117"]);
    assert!(routes.contains("10.244.2.0/24 via 192.168.77.12 dev ul0"), "{routes}");
    let routes6 = n1.routes(&["-6", "route", "show", "proto", "117"]);
    assert!(
        routes6.contains("fd00:244:2::/64 via fd00:244:2:: dev trellis.1"),
        "{routes6}"
    );
    let neigh = n1.ip(&["neigh", "show", "dev", "trellis.1"]);
    assert!(
        !neigh.contains("10.244.2.0") && neigh.contains("fd00:244:2::"),
        "{neigh}"
    );
    for dp in &mut dps {
        assert_eq!(dp.reconcile(&leases).await.unwrap(), ReconcileReport::default());
    }
    assert_full_mesh(&c).await;
}
