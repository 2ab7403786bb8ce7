//! The Kubernetes datastore WITHOUT an API server (none can run here): real Node objects as
//! `kubectl get node -o json` prints them (kept in `tests/data/`), and a recorded watch stream,
//! translated into leases and lease events. Not a cluster test.

use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use trellisd::datastore::kube::{annotations, lease_from_node, OwnNode, Skip, Translator, BACKEND_DATA};
use trellisd::datastore::{Event, NodeInfo};
use trellisd::lease::{BackendData, MacString};

fn node(file: &str) -> Node {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn no_api_server_nodes_as_kubectl_prints_them_become_leases() {
    let cp = lease_from_node(&node("node-control-plane.json")).unwrap();
    assert_eq!(cp.node, "cp-1");
    assert_eq!(cp.underlay_ip.to_string(), "192.168.56.10");
    assert_eq!(
        cp.pod_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        ["10.244.0.0/24"]
    );
    assert_eq!(
        cp.backend,
        BackendData::Vxlan {
            vtep_mac: MacString("ae:3b:51:0c:7e:21".parse().unwrap()),
            vni: 1
        }
    );
    // A dual-stack worker; Trellis's own underlay annotation wins over flannel's.
    let w = lease_from_node(&node("node-worker-dualstack.json")).unwrap();
    assert_eq!(w.pod_cidrs.len(), 2);
    assert_eq!(w.cidr_v6().unwrap().to_string(), "fd00:10:244:1::/64");
    // A node the controller manager has not given a CIDR yet is waited for.
    assert_eq!(
        lease_from_node(&node("node-new-without-cidr.json")),
        Err(Skip::NoPodCidr)
    );
}

#[test]
fn no_api_server_our_annotations_are_read_back_by_us_and_in_flannels_names() {
    let me = NodeInfo {
        name: "worker-2".into(),
        underlay_ip: "192.168.56.22".parse().unwrap(),
        backend: BackendData::Vxlan {
            vtep_mac: MacString("02:aa:bb:cc:dd:ee".parse().unwrap()),
            vni: 1,
        },
    };
    let ann = annotations(&me);
    assert_eq!(ann["flannel.alpha.coreos.com/backend-type"], "vxlan");
    assert_eq!(ann["flannel.alpha.coreos.com/public-ip"], "192.168.56.22");
    let data: serde_json::Value = serde_json::from_str(&ann["flannel.alpha.coreos.com/backend-data"]).unwrap();
    assert_eq!(data, serde_json::json!({"VNI": 1, "VtepMAC": "02:aa:bb:cc:dd:ee"}));
    let mut n = node("node-new-without-cidr.json");
    n.metadata.annotations.get_or_insert_default().extend(ann);
    n.spec.get_or_insert_default().pod_cidrs = Some(vec!["10.244.2.0/24".into()]);
    let lease = lease_from_node(&n).unwrap();
    assert_eq!(lease.backend, me.backend);
    assert_eq!(lease.underlay_ip, me.underlay_ip);
}

/// A BGP route-reflector node's cluster ID travels in the backend data, and reads back; a
/// node without it (an older trellisd) is no reflector.
#[test]
fn no_api_server_a_reflector_nodes_cluster_id_is_read_back() {
    for rr_cluster_id in [Some("1.0.0.1".parse().unwrap()), None] {
        let me = NodeInfo {
            name: "worker-3".into(),
            underlay_ip: "192.168.56.23".parse().unwrap(),
            backend: BackendData::Bgp {
                asn: 64512,
                vtep_mac: None,
                rr_cluster_id,
            },
        };
        let ann = annotations(&me);
        let data: serde_json::Value = serde_json::from_str(&ann[BACKEND_DATA]).unwrap();
        match rr_cluster_id {
            Some(_) => assert_eq!(
                data,
                serde_json::json!({"ASNumber": 64512, "RouteReflectorClusterID": "1.0.0.1"})
            ),
            None => assert_eq!(data, serde_json::json!({"ASNumber": 64512})),
        }
        let mut n = node("node-new-without-cidr.json");
        n.metadata.annotations.get_or_insert_default().extend(ann);
        n.spec.get_or_insert_default().pod_cidrs = Some(vec!["10.244.3.0/24".into()]);
        assert_eq!(lease_from_node(&n).unwrap().backend, me.backend);
    }
}

#[test]
fn no_api_server_a_recorded_watch_stream_becomes_lease_events() {
    let mut t = Translator::default();
    let mut out = Vec::new();
    let cp = node("node-control-plane.json");
    let w1 = node("node-worker-dualstack.json");
    let w2 = node("node-new-without-cidr.json");
    for ev in [
        watcher::Event::Init,
        watcher::Event::InitApply(cp.clone()),
        watcher::Event::InitApply(w1.clone()),
        watcher::Event::InitApply(w2.clone()),
        watcher::Event::InitDone,
    ] {
        out.extend(t.handle(ev));
    }
    match &out[..] {
        [Event::Snapshot(all)] => {
            let names: Vec<_> = all.iter().map(|l| l.node.as_str()).collect();
            assert_eq!(names, ["cp-1", "worker-1"], "worker-2 has no CIDR yet");
        }
        other => panic!("{other:?}"),
    }
    // An unchanged node (a heartbeat updating status) is no event.
    assert!(t.handle(watcher::Event::Apply(w1.clone())).is_empty());
    // worker-2 gets its CIDR and its daemon publishes its data: it joins.
    let mut w2b = w2.clone();
    w2b.spec.get_or_insert_default().pod_cidrs = Some(vec!["10.244.2.0/24".into()]);
    w2b.metadata
        .annotations
        .get_or_insert_default()
        .extend(annotations(&NodeInfo {
            name: "worker-2".into(),
            underlay_ip: "192.168.56.22".parse().unwrap(),
            backend: BackendData::HostGw,
        }));
    match &t.handle(watcher::Event::Apply(w2b))[..] {
        [Event::Upsert(l)] => assert_eq!(l.node, "worker-2"),
        other => panic!("{other:?}"),
    }
    // A deleted Node loses its routes everywhere.
    assert_eq!(t.handle(watcher::Event::Delete(cp)), [Event::Remove("cp-1".into())]);
    // A relist after a watch error starts over with a fresh snapshot.
    t.handle(watcher::Event::Init);
    t.handle(watcher::Event::InitApply(w1));
    match &t.handle(watcher::Event::InitDone)[..] {
        [Event::Snapshot(all)] => assert_eq!(all.len(), 1),
        other => panic!("{other:?}"),
    }
}

/// The daemon's own Node, as the watch shows it: kept, stripped of its annotations, deleted,
/// re-registered without and then with a pod CIDR, and given another CIDR.
#[test]
fn no_api_server_own_node_states_follow_the_watch() {
    let me = NodeInfo {
        name: "worker-1".into(),
        underlay_ip: "192.168.56.21".parse().unwrap(),
        backend: BackendData::HostGw,
    };
    let mut ours = node("node-worker-dualstack.json");
    ours.metadata
        .annotations
        .get_or_insert_default()
        .extend(annotations(&me));
    let own = lease_from_node(&ours).unwrap();
    let mut t = Translator::for_node(&own, annotations(&me));
    assert_eq!(t.own_state(), OwnNode::Unknown);
    t.handle(watcher::Event::Init);
    t.handle(watcher::Event::InitApply(ours.clone()));
    t.handle(watcher::Event::InitDone);
    assert_eq!(t.own_state(), OwnNode::Matches);
    // Another node's changes say nothing about ours.
    t.handle(watcher::Event::Apply(node("node-control-plane.json")));
    assert_eq!(t.own_state(), OwnNode::Matches);

    let mut stripped = ours.clone();
    stripped.metadata.annotations.as_mut().unwrap().remove(BACKEND_DATA);
    t.handle(watcher::Event::Apply(stripped));
    assert_eq!(t.own_state(), OwnNode::NeedsPublish);

    t.handle(watcher::Event::Delete(ours.clone()));
    assert_eq!(t.own_state(), OwnNode::Missing);

    let mut bare = ours.clone();
    bare.metadata.annotations = None;
    bare.spec.as_mut().unwrap().pod_cidrs = None;
    bare.spec.as_mut().unwrap().pod_cidr = None;
    t.handle(watcher::Event::Apply(bare.clone()));
    assert_eq!(t.own_state(), OwnNode::AwaitingCidr);

    let mut same_cidr = bare.clone();
    same_cidr.spec = ours.spec.clone();
    t.handle(watcher::Event::Apply(same_cidr));
    assert_eq!(
        t.own_state(),
        OwnNode::NeedsPublish,
        "re-registered with the same CIDR: publish again"
    );

    // A relist that does not have our Node at all.
    t.handle(watcher::Event::Init);
    t.handle(watcher::Event::InitApply(node("node-control-plane.json")));
    t.handle(watcher::Event::InitDone);
    assert_eq!(t.own_state(), OwnNode::Missing);

    let mut moved = ours.clone();
    moved.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.9.0/24".into()]);
    t.handle(watcher::Event::Apply(moved));
    assert_eq!(
        t.own_state(),
        OwnNode::CidrChanged(vec!["10.244.9.0/24".parse().unwrap()])
    );
}
