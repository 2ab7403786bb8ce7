//! The tunnel port against hostile senders, on a real two-node VXLAN cluster (etcd, trellisd,
//! the plugins): an **unprivileged** pod (uid 65534, no capabilities, a plain UDP socket) and a
//! stranger on the underlay network send VXLAN frames to node 2's underlay address whose inner
//! packet, with a forged source, is addressed to a pod on node 2. Before the underlay guard
//! (issue 12) every one was delivered — the pod's outer source even masqueraded to node 1's
//! legitimate address. Now none is, while the pods' own traffic still flows. Over an IPv4 and an
//! IPv6 underlay.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use trellis_tests::cluster::{wait_until, Cluster, Options, Stack};
use trellis_tests::forge::{mac_of, Receiver};

fn trellisd() -> PathBuf {
    trellis_tests::cluster::trellisd_with_plugins(env!("CARGO_BIN_EXE_trellisd"))
}

const PORT: u16 = 7777;
const TIMES: usize = 10;

/// A Python one-liner that sends `TIMES` VXLAN datagrams (VNI 1) to `underlay:8472` (over IPv4
/// or IPv6, as `underlay` is), each an inner Ethernet frame to `vtep_mac` with an IPv4 UDP
/// packet `forged -> pod:PORT`.
fn vxlan_sender(underlay: &str, vtep_mac: &str, forged: &str, pod: &str) -> String {
    format!(
        r#"
import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s > 0xffff: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
payload = b'injected'
udp = struct.pack('!HHHH', 40000, {PORT}, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton('{forged}'), socket.inet_aton('{pod}'))
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
inner = bytes.fromhex('{mac}') + bytes.fromhex('0a580a000001') + b'\x08\x00' + ip + udp
vxlan = struct.pack('!II', 0x08000000, 1 << 8) + inner
s = socket.socket(socket.{family}, socket.SOCK_DGRAM)
for _ in range({TIMES}):
    s.sendto(vxlan, ('{underlay}', 8472))
"#,
        mac = vtep_mac.replace(':', ""),
        family = if underlay.contains(':') { "AF_INET6" } else { "AF_INET" },
    )
}

/// Runs `script` with python3 in namespace `ns`, as uid/gid 65534 with no capabilities when
/// `unprivileged`.
fn python_in(ns: &str, script: &str, unprivileged: bool) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if unprivileged {
        cmd.args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]);
    }
    // The system interpreter: a per-user one (pyenv under /root) is not readable by uid 65534.
    let out = cmd.args(["/usr/bin/python3", "-c", script]).output().expect("python3");
    assert!(
        out.status.success(),
        "python3 in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` VXLAN nodes (VNI 1, port 8472) on etcd, on an underlay of `stack`.
fn vxlan_cluster(n: usize, stack: Stack) -> Cluster {
    // Over an IPv6 underlay the pods get IPv6 too: the hostile pod sends to the node's IPv6
    // address.
    let v6 = if stack == Stack::V6Only {
        r#""EnableIPv6": true, "IPv6Network": "fd00:244::/56", "#
    } else {
        ""
    };
    Cluster::with_options(
        n,
        &format!(r#"{{"Network": "10.244.0.0/16", {v6}"Backend": {{"Type": "vxlan", "VNI": 1, "Port": 8472}}}}"#),
        &trellisd(),
        &["--lease-ttl", "10", "--resync", "5"],
        Options {
            underlay: stack,
            ..Options::default()
        },
    )
}

#[test]
fn vxlan_frames_from_pods_and_strangers_are_not_decapsulated() {
    forged_frames_are_not_decapsulated(Stack::V4);
}

/// The same with the tunnel over an IPv6 underlay (the guard's `nodes6` set and IPv6 rules).
#[test]
fn vxlan_frames_over_an_ipv6_underlay_from_pods_and_strangers_are_not_decapsulated() {
    forged_frames_are_not_decapsulated(Stack::V6Only);
}

fn forged_frames_are_not_decapsulated(stack: Stack) {
    let mut c = vxlan_cluster(2, stack);
    let (p1, p2) = (c.add_pod(0), c.add_pod(1));
    c.all_reach_all(Duration::from_secs(15)).expect("pods reach each other");
    let pod2 = c.pods[p2].ips[0].clone();
    let node2_underlay = c.node_underlay_ip(1);
    let nodes_set = if stack == Stack::V6Only { "nodes6" } else { "nodes4" };
    let vtep = mac_of(&c.nodes[1].ns, "trellis.1");
    let vtep = vtep.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let rx = Receiver::bind(c.pods[p2].ns.path(), PORT);

    // The pods' own UDP still flows (the guard drops tunnel ports only).
    let legit = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nfor _ in range({TIMES}): s.sendto(b'hi', ('{pod2}', {PORT}))\n"
    );
    python_in(&c.pods[p1].ns.name, &legit, true);
    let got = rx.sources(Duration::from_millis(500));
    assert_eq!(got.len(), TIMES, "ordinary pod-to-pod UDP: {got:?}");

    // An unprivileged pod on node 1, to node 2's tunnel port.
    let from_pod = vxlan_sender(&node2_underlay, &vtep, "10.244.250.1", &pod2);
    python_in(&c.pods[p1].ns.name, &from_pod, true);
    // A stranger on the underlay network (the underlay namespace is no node).
    let from_stranger = vxlan_sender(&node2_underlay, &vtep, "10.244.250.2", &pod2);
    python_in(&c.underlay.name, &from_stranger, false);
    let injected = rx.sources(Duration::from_millis(500));
    eprintln!(
        "sent {} forged VXLAN frames ({TIMES} from an unprivileged pod, {TIMES} from the underlay); delivered: {}",
        2 * TIMES,
        injected.len()
    );
    assert!(injected.is_empty(), "decapsulated into node 2's pod: {injected:?}");

    // The drops are counted where an operator looks: the rules' counters.
    let table = c.nodes[1]
        .ns
        .exec_ok(&["nft", "list", "chain", "inet", "trellis", "underlay_in"]);
    assert!(table.contains(&format!("packets {TIMES}")), "{table}");

    // The guard is desired state: a flushed ruleset is repaired within a second, nodes included,
    // and the pods keep talking.
    c.nodes[1].ns.exec_ok(&["nft", "flush", "ruleset"]);
    wait_until("node 2's underlay guard is back", Duration::from_secs(3), || {
        let t = c.nodes[1]
            .ns
            .exec(&["nft", "list", "set", "inet", "trellis", nodes_set]);
        String::from_utf8_lossy(&t.stdout).contains(&c.node_underlay_ip(0))
    });
    python_in(&c.pods[p1].ns.name, &from_pod, true);
    assert!(rx.sources(Duration::from_millis(500)).is_empty());
    c.all_reach_all(Duration::from_secs(15))
        .expect("pods reach each other after the repair");
}

/// Anti-spoofing is the plugin's, per pod; after `nft flush ruleset` trellisd puts each pod's
/// elements back from the record the plugin left in the daemon's state dir, on its next resync
/// (the flush wakes it at once).
#[test]
fn a_flushed_ruleset_gets_the_pods_anti_spoofing_back() {
    use trellis_tests::forge::{send_frames, udp4};
    let mut c = vxlan_cluster(1, Stack::V4);
    let (a, b) = (c.add_pod(0), c.add_pod(0));
    let (pa, pb) = (&c.pods[a], &c.pods[b]);
    let b_ip: std::net::Ipv4Addr = pb.ips[0].parse().unwrap();
    let (a_mac, b_mac) = (mac_of(&pa.ns, "eth0"), mac_of(&pb.ns, "eth0"));
    let rx = Receiver::bind(pb.ns.path(), PORT);
    let forged = || {
        send_frames(
            pa.ns.path(),
            "eth0",
            &[udp4(
                b_mac,
                a_mac,
                "10.244.250.9".parse().unwrap(),
                b_ip,
                PORT,
                b"forged",
            )],
            TIMES,
        );
        rx.sources(Duration::from_millis(300)).len()
    };
    assert_eq!(forged(), 0, "protected from the start");
    let node = &c.nodes[0];
    node.ns.exec_ok(&["nft", "flush", "ruleset"]);
    wait_until("both pods protected again", Duration::from_secs(3), || {
        let t = node.ns.exec(&["nft", "list", "set", "bridge", "trellis", "ports"]);
        String::from_utf8_lossy(&t.stdout).matches("trl").count() == 2
    });
    assert_eq!(forged(), 0, "protected again after the flush");
    c.all_reach_all(Duration::from_secs(15))
        .expect("pods reach each other after the repair");
}
