//! hostPort (`runtimeConfig.portMappings`) end to end, served by the trellis plugin in the node's
//! nftables table with no `portmap` binary: from another node, from the node itself, from a pod
//! on another node and from the pod itself (hairpin), over IPv4 and IPv6, in bridge and routed
//! mode; removed on DEL and by GC; a host port another pod holds is refused.
//!
//! The underlay gets IPv6 addresses too (`fd00:200::/64`) so that another node can reach the
//! hostPort over IPv6.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use trellis_tests::cluster::{Cluster, Proc, UNDERLAY};
use trellis_tests::CniCall;

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:244::/56",
    "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}"#;
const HOST_PORT: u16 = 18080;
const POD_PORT: u16 = 8080;

fn underlay6(node: usize) -> String {
    format!("fd00:200::{}", 11 + node)
}

fn cluster(mode: &str) -> Cluster {
    let c = Cluster::new(2, NET_CONF, &trellisd(), &["--cni-mode", mode]);
    for (i, n) in c.nodes.iter().enumerate() {
        n.ns.exec_ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{}/64", underlay6(i)),
            "dev",
            "ul0",
            "nodad",
        ]);
    }
    c
}

fn with_mappings(mut conf: Value, mappings: Value) -> Value {
    conf["runtimeConfig"] = json!({ "portMappings": mappings });
    conf
}

fn mapping(host: u16, pod: u16) -> Value {
    json!([{"hostPort": host, "containerPort": pod, "protocol": "tcp", "hostIP": ""}])
}

/// A TCP server on `[::]:POD_PORT` (both families) in pod `p` that answers each connection with
/// the client's address as the pod sees it.
fn serve(c: &Cluster, p: usize) -> Proc {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('::', {POD_PORT}))\n\
         s.listen(16)\n\
         while True:\n    c, a = s.accept()\n    c.sendall((a[0].replace('::ffff:', '') + '\\n').encode())\n    c.close()\n"
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &c.pods[p].ns.name, "python3", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child }
}

/// Connects from namespace `ns` to `addr`:`port`; the line the server sent, or why not.
fn ask(ns: &str, addr: &str, port: u16) -> Result<String, String> {
    let script = format!(
        "import socket, sys\n\
         try:\n    c = socket.create_connection(('{addr}', {port}), timeout=3); print(c.recv(100).decode().strip())\n\
         except OSError as e:\n    print('ERR', e); sys.exit(1)"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `ask`, retried until the server is up (the python process needs a moment).
fn ask_until_up(ns: &str, addr: &str, port: u16) -> String {
    let t = Instant::now();
    loop {
        match ask(ns, addr, port) {
            Ok(line) => return line,
            Err(e) if t.elapsed() > Duration::from_secs(10) => panic!("{ns} -> [{addr}]:{port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn nft_map(c: &Cluster, node: usize, map: &str) -> String {
    c.nodes[node]
        .ns
        .exec_ok(&["nft", "list", "map", "inet", "trellis", map])
}

fn del(c: &Cluster, p: usize, conf: Value) {
    let node = &c.nodes[c.pods[p].node];
    let mut call = CniCall::new(c.bin.join("trellis"), "DEL", conf)
        .container(&c.pods[p].id)
        .netns(c.pods[p].ns.path());
    call.exec_in_netns = Some(node.ns.name.clone());
    call.cni_path = vec![c.bin.clone()];
    let out = call.run();
    assert_eq!(out.exit_code, 0, "DEL: {}{}", out.stdout, out.stderr);
}

fn host_ports_end_to_end(mode: &str) {
    let mut c = cluster(mode);
    let conf = with_mappings(c.cni_conf(0), mapping(HOST_PORT, POD_PORT));
    let a = c.add_pod_with(0, conf.clone());
    let b = c.add_pod(1);
    c.all_reach_all(Duration::from_secs(20)).unwrap();
    let _server = serve(&c, a);
    let (a_v4, a_v6) = (c.pods[a].ips[0].clone(), c.pods[a].ips[1].clone());
    let node1_v4 = format!("{UNDERLAY}.11");
    let node1_v6 = underlay6(0);
    let (node1, node2) = (c.nodes[0].ns.name.clone(), c.nodes[1].ns.name.clone());
    let (pod_a, pod_b) = (c.pods[a].ns.name.clone(), c.pods[b].ns.name.clone());

    // From another node: its own address reaches the pod (no source NAT, as with portmap).
    assert_eq!(ask_until_up(&node2, &node1_v4, HOST_PORT), format!("{UNDERLAY}.12"));
    assert_eq!(ask_until_up(&node2, &node1_v6, HOST_PORT), underlay6(1));
    // From the node itself.
    ask_until_up(&node1, &node1_v4, HOST_PORT);
    ask_until_up(&node1, &node1_v6, HOST_PORT);
    // From a pod on another node (its node masquerades it on the way out of the cluster CIDR).
    ask_until_up(&pod_b, &node1_v4, HOST_PORT);
    ask_until_up(&pod_b, &node1_v6, HOST_PORT);
    // Hairpin: the pod reaches its own hostPort through its node's address; its source is
    // masqueraded (or it would answer itself directly).
    for (to, own) in [(&node1_v4, &a_v4), (&node1_v6, &a_v6)] {
        let seen = ask_until_up(&pod_a, to, HOST_PORT);
        assert_ne!(&seen, own, "hairpin over {to} not masqueraded");
    }
    // The pod's own port on other addresses is not translated: 18080 elsewhere stays 18080.
    assert!(ask(&node2, &format!("{UNDERLAY}.1"), HOST_PORT).is_err());

    // Another pod cannot take the same host port: code 105, naming the holder; nothing left.
    let ns = trellis_tests::Netns::new("tcp");
    let taken = with_mappings(c.cni_conf(0), mapping(HOST_PORT, 9999));
    let mut call = CniCall::new(c.bin.join("trellis"), "ADD", taken)
        .container("node1-taken")
        .netns(ns.path());
    call.exec_in_netns = Some(node1.clone());
    call.cni_path = vec![c.bin.clone()];
    let out = call.run();
    assert_eq!(out.err_code(), 105, "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&c.pods[a].id), "{}", out.stdout);
    let links = c.nodes[0].ns.exec_ok(&["ip", "-o", "link"]);
    assert_eq!(
        links.matches(" trl").count(),
        1,
        "the refused ADD left a host end:\n{links}"
    );

    // CHECK sees the mapping; DEL removes it (both families) and the port is closed again.
    let mut check = CniCall::new(c.bin.join("trellis"), "CHECK", {
        let mut v = conf.clone();
        v["prevResult"] = c.pods[a].result.clone();
        v
    })
    .container(&c.pods[a].id)
    .netns(c.pods[a].ns.path());
    check.exec_in_netns = Some(node1.clone());
    check.cni_path = vec![c.bin.clone()];
    let out = check.run();
    assert_eq!(out.exit_code, 0, "CHECK: {}{}", out.stdout, out.stderr);
    del(&c, a, conf);
    for map in ["hostport4", "hostport6"] {
        let listed = nft_map(&c, 0, map);
        assert!(!listed.contains(&HOST_PORT.to_string()), "{map} after DEL:\n{listed}");
    }
    assert!(ask(&node2, &node1_v4, HOST_PORT).is_err());
}

#[test]
fn host_ports_bridge_mode_from_another_node_the_node_a_pod_and_hairpin() {
    host_ports_end_to_end("bridge");
}

#[test]
fn host_ports_routed_mode_from_another_node_the_node_a_pod_and_hairpin() {
    host_ports_end_to_end("routed");
}

#[test]
fn host_ports_of_pods_gone_are_removed_by_gc_and_bad_mappings_are_refused() {
    let mut c = cluster("bridge");
    let conf = with_mappings(c.cni_conf(0), mapping(HOST_PORT, POD_PORT));
    let a = c.add_pod_with(0, conf.clone());
    let keep = c.add_pod_with(0, with_mappings(c.cni_conf(0), mapping(HOST_PORT + 1, POD_PORT)));
    assert!(nft_map(&c, 0, "hostport4").contains(&HOST_PORT.to_string()));
    // GC with only `keep` valid: a's mappings go, keep's stay.
    let mut gc = c.cni_conf(0);
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": c.pods[keep].id, "ifname": "eth0"}]);
    let mut call = CniCall::new(c.bin.join("trellis"), "GC", gc);
    call.exec_in_netns = Some(c.nodes[0].ns.name.clone());
    call.cni_path = vec![c.bin.clone()];
    let out = call.run();
    assert_eq!(out.exit_code, 0, "GC: {}{}", out.stdout, out.stderr);
    let listed = nft_map(&c, 0, "hostport4");
    assert!(!listed.contains(&format!("{HOST_PORT} ")), "{listed}");
    assert!(listed.contains(&(HOST_PORT + 1).to_string()), "{listed}");
    assert!(!listed.contains(&c.pods[a].id), "{listed}");

    // Bad input: a clear error (7, or 2 for hostIP), nothing left behind.
    for (bad, code) in [
        (json!([{"hostPort": 0, "containerPort": 80}]), 7),
        (json!([{"hostPort": 70000, "containerPort": 80}]), 7),
        (json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]), 7),
        (
            json!([{"hostPort": 80, "containerPort": 80}, {"hostPort": 80, "containerPort": 81}]),
            7,
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "hostIP": "192.168.200.11"}]),
            2,
        ),
    ] {
        let ns = trellis_tests::Netns::new("tcp");
        let mut call = CniCall::new(c.bin.join("trellis"), "ADD", with_mappings(c.cni_conf(0), bad.clone()))
            .container("node1-bad")
            .netns(ns.path());
        call.exec_in_netns = Some(c.nodes[0].ns.name.clone());
        call.cni_path = vec![c.bin.clone()];
        let out = call.run();
        assert_eq!(out.err_code(), code, "{bad}: {}{}", out.stdout, out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(!v["details"].as_str().unwrap_or("").is_empty(), "{}", out.stdout);
    }
    // Only `keep`'s host end: GC took a's, and the refused ADDs left none.
    let links = c.nodes[0].ns.exec_ok(&["ip", "-o", "link"]);
    assert_eq!(links.matches(" trl").count(), 1, "{links}");
}
