//! `trellisd --datastore kube` against the STAND-IN API server (`trellis_tests::kube_apiserver`;
//! no real kube-apiserver can run on these machines). Not cluster tests: the stand-in speaks the
//! real protocol (TLS with its own CA, bearer tokens, lists, chunked watch streams, bookmarks,
//! 410 Gone, 403 and 5xx on demand, outages), so the daemon's real `kube::Client` code runs
//! end to end, with real daemons in node namespaces, real netlink and real pods. The assertions
//! are about what trellisd does, never about the stand-in.
//!
//! Every daemon here runs with only the capabilities the DaemonSet manifest grants
//! (`setpriv --bounding-set`), and node1 with the in-cluster config (service account files and
//! `KUBERNETES_SERVICE_HOST`), the others with a kubeconfig.

use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use trellis_tests::cluster::{wait_until, Cluster, Options, UNDERLAY};
use trellis_tests::kube_apiserver::{Fault, ListKind};

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56",
    "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}"#;

/// The capabilities the manifest's trellisd container adds, lower-case as `setpriv` takes them.
fn manifest_capabilities() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/trellis.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap();
        if v["kind"] != "DaemonSet" {
            continue;
        }
        let containers = v["spec"]["template"]["spec"]["containers"].as_array().unwrap();
        let d = containers.iter().find(|c| c["name"] == "trellisd").unwrap();
        let caps = &d["securityContext"]["capabilities"];
        return caps["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_lowercase())
            .collect();
    }
    panic!("no DaemonSet in {path}");
}

fn pod_cidrs(n: usize) -> Vec<Vec<String>> {
    (1..=n)
        .map(|i| vec![format!("10.244.{i}.0/24"), format!("fd00:244:0:{i}::/64")])
        .collect()
}

/// `n` nodes on the stand-in, with the manifest's capabilities.
fn cluster(n: usize, options: Options) -> Cluster {
    let options = Options {
        kube: Some(pod_cidrs(n)),
        capabilities: Some(manifest_capabilities()),
        ..options
    };
    Cluster::with_options(n, NET_CONF, &trellisd(), &["--resync", "5"], options)
}

/// `n` nodes (node1 in-cluster, the others with a kubeconfig), a pod on each, all reaching
/// each other.
fn with_pods(n: usize) -> Cluster {
    let in_cluster = Options {
        in_cluster: vec![0],
        ..Options::default()
    };
    let mut c = cluster(n, in_cluster);
    for i in 0..n {
        c.add_pod(i);
    }
    if let Err(missing) = c.all_reach_all(Duration::from_secs(20)) {
        panic!("unreachable:\n{missing}\nnode1 log:\n{}", c.log(0));
    }
    c
}

/// A Node as a node running flannel or trellisd elsewhere would leave it: a pod CIDR and
/// VXLAN backend data.
fn remote_node(c: &Cluster, name: &str, cidr: &str, ip: &str) {
    c.api().create_node(name, &[cidr], Some(ip));
    c.api().update_node(name, |n| {
        n["metadata"]["annotations"] = json!({
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": r#"{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}"#,
            "flannel.alpha.coreos.com/public-ip": ip,
        });
    });
}

fn log_lines(c: &Cluster, i: usize) -> usize {
    c.log(i).lines().count()
}

#[test]
fn standin_api_three_nodes_dual_stack_vxlan_with_the_manifests_capabilities() {
    let mut c = with_pods(3);
    // Every pod reaches every pod over IPv4 and IPv6 (with_pods checked): the daemons
    // converged with NET_ADMIN and NET_RAW only, node1 on the in-cluster config.
    for i in 0..3 {
        let node = c.api().node(&format!("node{}", i + 1)).unwrap();
        let ann = &node["metadata"]["annotations"];
        assert_eq!(ann["flannel.alpha.coreos.com/backend-type"], "vxlan", "{node}");
        assert_eq!(
            ann["trellis.dev/underlay-ip"],
            format!("{UNDERLAY}.{}", 11 + i),
            "{node}"
        );
    }
    // Good citizenship: who we are, and lists from the watch cache.
    let reqs = c.api().requests();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(
            r.user_agent.as_deref(),
            Some(concat!("trellisd/", env!("CARGO_PKG_VERSION"))),
            "{r:?}"
        );
        if r.verb == "patch" {
            assert_eq!(r.field_manager.as_deref(), Some("trellisd"), "{r:?}");
        }
    }
    assert!(c.api().lists(ListKind::Cache) >= 3, "{reqs:?}");
    assert_eq!(c.api().lists(ListKind::Quorum), 0, "a quorum list: {reqs:?}");

    // The conflist works with both libcni behaviours: 1.1 and older read `cniVersion` (the pods
    // above), 1.2+ take the highest of `cniVersions`, and STATUS answers there.
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(c.nodes[0].dir.join("10-trellis.conflist")).unwrap()).unwrap();
    assert_eq!(list["cniVersion"], "1.0.0");
    assert!(
        list["cniVersions"].as_array().unwrap().contains(&json!("1.1.0")),
        "{list}"
    );
    assert_eq!(c.pods[0].result["cniVersion"], "1.0.0");
    let mut newest = c.cni_conf(0);
    newest["cniVersion"] = json!("1.1.0");
    let p = c.add_pod_with(0, newest.clone());
    assert_eq!(c.pods[p].result["cniVersion"], "1.1.0");
    let mut status = trellis_tests::CniCall::new(c.bin.join("trellis"), "STATUS", newest);
    status.exec_in_netns = Some(c.nodes[0].ns.name.clone());
    status.cni_path = vec![c.bin.clone()];
    let out = status.run();
    assert_eq!(out.exit_code, 0, "STATUS at 1.1.0: {}{}", out.stdout, out.stderr);
    c.all_reach_all(Duration::from_secs(10)).unwrap();
}

#[test]
fn standin_api_down_for_20_seconds_loses_no_ping_and_the_daemons_back_off() {
    let mut c = with_pods(2);
    wait_until("healthy", Duration::from_secs(10), || {
        c.http_get(0, "/healthz").0 == 200
    });
    let before: Vec<(usize, f64, f64)> = (0..2)
        .map(|i| {
            (
                log_lines(&c, i),
                c.metric(i, "trellisd_datastore_errors_total"),
                c.daemon_cpu_seconds(i),
            )
        })
        .collect();
    let target = c.pods[1].ips[1].clone(); // IPv6: the other family rides along in with_pods
    let (sent, got) = c.ping_during(0, &target, 21, |c| {
        c.api().stop();
        std::thread::sleep(Duration::from_secs(20));
    });
    let outage: Vec<(usize, f64, f64)> = (0..2)
        .map(|i| {
            (
                log_lines(&c, i) - before[i].0,
                c.metric(i, "trellisd_datastore_errors_total") - before[i].1,
                c.daemon_cpu_seconds(i) - before[i].2,
            )
        })
        .collect();
    let back = Instant::now();
    c.api().restart();
    let node1: Vec<String> = c.log(0).lines().skip(before[0].0).map(String::from).collect();
    eprintln!("node1's log during the outage:\n{}", node1.join("\n"));
    eprintln!("20 s outage, per node (log lines, datastore errors, CPU seconds): {outage:?}; pings {got}/{sent}");
    assert_eq!(sent, got, "pings lost while the API server was down");
    for (i, (lines, errors, _cpu)) in outage.iter().enumerate() {
        assert!(
            *lines <= 6,
            "node{}: {lines} log lines in a 20 s outage:\n{}",
            i + 1,
            c.log(i)
        );
        // Two watch loops a node, each backing off to 5 s (about 9 tries in 20 s): the Node
        // watch, and NetworkPolicy's watches of Namespaces, Pods and NetworkPolicies.
        assert!(
            (1.0..=2.0 * 15.0).contains(errors),
            "node{}: {errors} datastore errors",
            i + 1
        );
    }
    assert_eq!(
        c.http_get(0, "/healthz").0,
        200,
        "an API outage is no reason to restart trellisd"
    );
    // Back in sync: a Node that appears now is routed within 10 s of the server's return.
    remote_node(&c, "node9", "10.244.99.0/24", "192.168.200.99");
    wait_until("node9 routed after the outage", Duration::from_secs(10), || {
        !c.route_to(0, "10.244.99.0/24").is_empty()
    });
    eprintln!("resynced {:?} after the API server came back", back.elapsed());
    assert!(c.log(0).contains("working again"), "{}", c.log(0));
}

#[test]
fn standin_api_forbidden_for_10_seconds_is_no_flood_and_recovers() {
    let c = with_pods(2);
    let lines: Vec<usize> = (0..2).map(|i| log_lines(&c, i)).collect();
    let requests = c.api().request_count();
    c.api().set_fault(Fault::Forbidden);
    std::thread::sleep(Duration::from_secs(10));
    let during = c.api().request_count() - requests;
    c.api().set_fault(Fault::None);
    eprintln!("403 for 10 s: {during} requests from 2 nodes");
    assert!(during <= 2 * 15, "{during} requests in 10 s of 403s");
    for (i, before) in lines.iter().enumerate() {
        let added = log_lines(&c, i) - before;
        assert!(added <= 10, "node{}: {added} log lines:\n{}", i + 1, c.log(i));
        assert!(c.log(i).contains("forbidden"), "the cause is not logged:\n{}", c.log(i));
    }
    c.all_reach_all(Duration::from_secs(5)).unwrap();
    remote_node(&c, "node9", "10.244.99.0/24", "192.168.200.99");
    wait_until("node9 routed after the 403s", Duration::from_secs(10), || {
        !c.route_to(0, "10.244.99.0/24").is_empty()
    });
}

#[test]
fn standin_api_node_deleted_and_registered_again_is_routed_again_and_own_annotations_come_back() {
    let c = with_pods(3);
    let cidr3 = c.node_cidr(2);
    // Someone strips node2's annotations: its daemon puts them back.
    c.api()
        .update_node("node2", |n| n["metadata"]["annotations"] = json!({}));
    wait_until("node2's annotations back", Duration::from_secs(5), || {
        c.api().node("node2").unwrap()["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"].is_string()
    });
    // node3's Node is deleted: the others stop routing to it; node3 says so on /healthz.
    c.api().delete_node("node3");
    for i in 0..2 {
        wait_until("node3's route gone", Duration::from_secs(10), || {
            c.route_to(i, &cidr3).is_empty()
        });
    }
    wait_until("node3 unhealthy", Duration::from_secs(5), || {
        c.http_get(2, "/healthz").0 == 503
    });
    assert!(
        c.http_get(2, "/healthz").1.contains("gone"),
        "{:?}",
        c.http_get(2, "/healthz")
    );
    // The kubelet registers it again (same pod CIDR, no annotations): routed again without a
    // restart of anything.
    c.api()
        .create_node("node3", &[&cidr3, "fd00:244:0:3::/64"], Some(&format!("{UNDERLAY}.13")));
    for i in 0..2 {
        wait_until("node3 routed again", Duration::from_secs(10), || {
            !c.route_to(i, &cidr3).is_empty()
        });
    }
    wait_until("node3 healthy again", Duration::from_secs(5), || {
        c.http_get(2, "/healthz").0 == 200
    });
    c.all_reach_all(Duration::from_secs(10)).unwrap();
}

#[test]
fn standin_api_own_node_back_with_another_pod_cidr_exits_nonzero() {
    let mut c = with_pods(2);
    c.api().delete_node("node2");
    wait_until("node2 unhealthy", Duration::from_secs(5), || {
        c.http_get(1, "/healthz").0 == 503
    });
    c.api().create_node(
        "node2",
        &["10.244.50.0/24", "fd00:244:0:50::/64"],
        Some(&format!("{UNDERLAY}.12")),
    );
    let daemon = &mut c.nodes[1].daemon.as_mut().unwrap().child;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "node2's daemon kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status:?}");
    let log = c.log(1);
    assert!(log.contains("10.244.50.0/24") && log.contains("exiting"), "{log}");
}

#[test]
fn standin_api_410_during_a_watch_relists_without_losing_an_event() {
    let c = with_pods(2);
    wait_until("a watch open", Duration::from_secs(5), || c.api().open_watches() >= 2);
    c.api().expire_watches();
    // Changes right after the expiry: the relist must carry them.
    remote_node(&c, "node9", "10.244.99.0/24", "192.168.200.99");
    for i in 0..2 {
        wait_until("node9 routed after the 410", Duration::from_secs(10), || {
            !c.route_to(i, "10.244.99.0/24").is_empty()
        });
    }
    c.api().expire_watches();
    c.api().delete_node("node9");
    for i in 0..2 {
        wait_until("node9 gone after the 410", Duration::from_secs(10), || {
            c.route_to(i, "10.244.99.0/24").is_empty()
        });
    }
    c.all_reach_all(Duration::from_secs(5)).unwrap();
}

#[test]
fn standin_api_a_wrong_ca_is_named_in_the_log() {
    let mut c = cluster(
        1,
        Options {
            no_wait: true,
            ..Options::default()
        },
    );
    c.stop_daemon(0);
    let wrong_ca = trellis_tests::kube_apiserver::unrelated_ca_pem();
    c.api()
        .write_kubeconfig_with_ca(&c.dir.path().join("kubeconfig"), &wrong_ca);
    c.start_daemon(0);
    wait_until("the certificate problem logged", Duration::from_secs(15), || {
        let log = c.log(0);
        log.contains("UnknownIssuer") || log.contains("certificate")
    });
    let log = c.log(0);
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert!(!c.nodes[0].dir.join("10-trellis.conflist").exists());
}
