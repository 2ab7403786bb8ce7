//! Tests against the kernel, each in network namespaces of its own (root needed). Nothing runs
//! in the machine's own namespace: every socket is opened on a thread that entered a test
//! namespace, and `nft` is only run through `ip netns exec`.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipnetwork::IpNetwork;
use nix::sched::CloneFlags;

use super::*;

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn run_cmd(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted on drop, even when the test panics.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let name = format!("tnft-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run_cmd(&["ip", "netns", "add", &name]);
        Netns { name }
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A command inside the namespace (`ip netns exec`).
    fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        run_cmd(&all)
    }

    fn ruleset(&self) -> String {
        self.exec(&["nft", "list", "ruleset"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("could not delete netns {}: {out:?}", self.name);
        }
    }
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn masq(exempt: &[&str]) -> Masquerade {
    Masquerade::new(MasqueradeConfig::new(exempt.iter().map(|s| net(s)))).unwrap()
}

#[test]
fn nft_ensure_add_list_remove() {
    let ns = Netns::new();
    ns.run(|| {
        let m = masq(&["10.244.0.0/16", "fd00:244::/56"]);
        m.ensure().unwrap();
        m.ensure().unwrap(); // idempotent
        m.add_source(ip("10.244.1.5")).unwrap();
        m.add_source(ip("10.244.1.5")).unwrap(); // already there
        m.add_source(ip("fd00:244:0:1::5")).unwrap();
        assert_eq!(m.list_sources().unwrap(), vec![ip("10.244.1.5"), ip("fd00:244:0:1::5")]);
        assert_eq!(
            m.list_exempt_destinations().unwrap(),
            vec![net("10.244.0.0/16"), net("fd00:244::/56")]
        );
    });

    let text = ns.ruleset();
    assert!(text.contains("table inet trellis"), "{text}");
    assert!(text.contains("type nat hook postrouting priority srcnat"), "{text}");
    assert_eq!(
        text.matches("masquerade comment \"trellis masquerade v1").count(),
        4,
        "{text}"
    );
    for rule in [
        "ip saddr @masq4 ip daddr != @nomasq_dst4 counter",
        "ip saddr @masq_net4 ip daddr != @nomasq_dst4 counter",
        "ip6 saddr @masq6 ip6 daddr != @nomasq_dst6 counter",
        "ip6 saddr @masq_net6 ip6 daddr != @nomasq_dst6 counter",
    ] {
        assert!(text.contains(rule), "missing {rule}: {text}");
    }
    assert!(text.contains("elements = { 10.244.1.5 }"), "{text}");
    assert!(text.contains("elements = { 10.244.0.0/16 }"), "{text}");
    assert!(text.contains("elements = { fd00:244::/56 }"), "{text}");
    let json = ns.exec(&["nft", "-j", "list", "ruleset"]);
    assert!(
        json.contains(r#""masquerade""#) && json.contains(r#""10.244.1.5""#),
        "{json}"
    );

    ns.run(|| {
        let m = masq(&[]);
        m.remove_source(ip("10.244.1.5")).unwrap();
        m.remove_source(ip("10.244.1.5")).unwrap(); // missing element
        m.remove_source(ip("fd00:244:0:1::5")).unwrap();
        assert_eq!(m.list_sources().unwrap(), Vec::<IpAddr>::new());
        // ensure keeps elements and repairs a chain whose rules someone removed.
        m.add_source(ip("10.244.1.6")).unwrap();
    });
    ns.exec(&["nft", "flush", "chain", "inet", "trellis", "postrouting"]);
    ns.run(|| masq(&[]).ensure().unwrap());
    assert_eq!(
        ns.ruleset()
            .matches("masquerade comment \"trellis masquerade v1")
            .count(),
        4
    );
    // A foreign rule in our chain goes at the next ensure.
    ns.exec(&["nft", "add", "rule", "inet", "trellis", "postrouting", "counter"]);
    ns.run(|| {
        let m = masq(&[]);
        m.ensure().unwrap();
        assert_eq!(m.list_sources().unwrap(), vec![ip("10.244.1.6")]);
    });
    assert_eq!(
        ns.ruleset()
            .matches("masquerade comment \"trellis masquerade v1")
            .count(),
        4
    );
}

#[test]
fn nft_missing_table_is_fine_for_remove_list_and_delete() {
    let ns = Netns::new();
    ns.run(|| {
        let m = masq(&[]);
        m.remove_source(ip("10.0.0.1")).unwrap();
        m.remove_exempt_destination(net("10.0.0.0/8")).unwrap();
        assert!(m.list_sources().unwrap().is_empty());
        assert!(m.list_exempt_destinations().unwrap().is_empty());
        m.delete_all().unwrap();
        // add_source sets the table up when it is missing.
        m.add_source(ip("10.0.0.1")).unwrap();
        assert_eq!(m.list_sources().unwrap(), vec![ip("10.0.0.1")]);
        m.delete_all().unwrap();
        m.delete_all().unwrap();
    });
    assert_eq!(ns.ruleset().trim(), "");
}

#[test]
fn nft_errors_name_the_object_and_keep_errno() {
    let ns = Netns::new();
    ns.run(|| {
        let m = masq(&[]);
        let mut conn = m.conn();
        let mut batch = Batch::default();
        let bound = Bound {
            key: interval::addr_value(ip("10.244.1.5")),
            end: false,
        };
        batch.push(
            objects::set_elems(MsgType::NewSetElem, "trellis", "masq4", Family::V4, &[bound]),
            "adding element 10.244.1.5 to set trellis masq4",
        );
        let err = conn.commit(batch).unwrap_err();
        assert_eq!(err.index, Some(0));
        assert!(err.error.is_not_found(), "{err:?}");
        assert!(
            err.error
                .to_string()
                .starts_with("adding element 10.244.1.5 to set trellis masq4: No such file or directory"),
            "{}",
            err.error
        );
    });
    // A chain of ours that someone made a filter chain: ensure fails, naming it.
    ns.exec(&["nft", "add", "table", "inet", "trellis"]);
    ns.exec(&[
        "nft",
        "add chain inet trellis postrouting { type filter hook forward priority 0; }",
    ]);
    ns.run(|| {
        let err = masq(&[]).ensure().unwrap_err();
        assert!(
            err.to_string().starts_with("adding chain inet trellis postrouting: "),
            "{err}"
        );
        assert!(err.errno().is_some());
        masq(&[]).delete_all().unwrap();
    });
    assert_eq!(ns.ruleset().trim(), "");
}

#[test]
fn nft_overlapping_prefixes_merge() {
    let ns = Netns::new();
    ns.run(|| {
        let m = masq(&[]);
        m.add_exempt_destination(net("10.244.1.0/24")).unwrap();
        m.add_exempt_destination(net("10.244.2.0/24")).unwrap(); // adjacent-ish, disjoint
        m.add_exempt_destination(net("10.244.3.0/24")).unwrap(); // adjacent
        m.add_exempt_destination(net("10.244.1.0/24")).unwrap(); // same again
        assert_eq!(
            m.list_exempt_destinations().unwrap(),
            vec![net("10.244.1.0/24"), net("10.244.2.0/24"), net("10.244.3.0/24")]
        );
        m.add_exempt_destination(net("10.244.0.0/16")).unwrap(); // covers them: replaces them
        assert_eq!(m.list_exempt_destinations().unwrap(), vec![net("10.244.0.0/16")]);
        m.add_exempt_destination(net("10.244.9.0/24")).unwrap(); // covered: no-op
        assert_eq!(m.list_exempt_destinations().unwrap(), vec![net("10.244.0.0/16")]);
        m.remove_exempt_destination(net("10.244.9.0/24")).unwrap(); // not there as such: ok
        assert_eq!(m.list_exempt_destinations().unwrap(), vec![net("10.244.0.0/16")]);

        // A config whose exempt prefix is covered by what is there still ensures fine.
        masq(&["10.244.7.0/24", "0.0.0.0/0"]).ensure().unwrap();
        assert_eq!(m.list_exempt_destinations().unwrap(), vec![net("0.0.0.0/0")]);
        m.add_exempt_destination(net("10.1.0.0/16")).unwrap(); // inside an open-ended one
        assert_eq!(m.list_exempt_destinations().unwrap(), vec![net("0.0.0.0/0")]);
        m.remove_exempt_destination(net("0.0.0.0/0")).unwrap();
        assert!(m.list_exempt_destinations().unwrap().is_empty());

        m.add_source_prefix(net("fd00:1::/64")).unwrap();
        m.add_source_prefix(net("fd00::/16")).unwrap();
        m.add_source_prefix(net("ffff::/16")).unwrap(); // reaches the top: no end element
        assert_eq!(
            m.list_source_prefixes().unwrap(),
            vec![net("fd00::/16"), net("ffff::/16")]
        );
        m.remove_source_prefix(net("ffff::/16")).unwrap();
        m.remove_source_prefix(net("fd00::/16")).unwrap();
        assert!(m.list_source_prefixes().unwrap().is_empty());
        m.delete_all().unwrap();
    });
    assert_eq!(ns.ruleset().trim(), "");
}

#[test]
fn nft_concurrent_plugins() {
    let ns = Netns::new();
    let path = format!("/run/netns/{}", ns.name);
    // 20 "plugins" at once, each with its own socket: ensure, add its pod, add and remove a
    // second one, and add the shared exempt prefix.
    std::thread::scope(|s| {
        for i in 0..20u32 {
            let path = &path;
            s.spawn(move || {
                let f = File::open(path).unwrap();
                nix::sched::setns(&f, CloneFlags::CLONE_NEWNET).unwrap();
                let m = masq(&["10.244.0.0/16", "fd00:244::/56"]);
                m.ensure().unwrap();
                m.add_source(IpAddr::from([10, 244, 1, i as u8])).unwrap();
                let temp = IpAddr::from([10, 244, 2, i as u8]);
                m.add_source(temp).unwrap();
                m.add_exempt_destination(net(&format!("10.245.{i}.0/24"))).unwrap();
                // Overlapping prefixes from several threads: the kernel refuses the loser's
                // batch (EEXIST) and it plans again from what is there.
                m.add_exempt_destination(net(&format!("10.246.{i}.0/24"))).unwrap();
                if i % 5 == 0 {
                    m.add_exempt_destination(net("10.246.0.0/16")).unwrap();
                }
                m.remove_source(temp).unwrap();
            });
        }
    });
    ns.run(|| {
        let m = masq(&[]);
        let want: Vec<IpAddr> = (0..20u8).map(|i| IpAddr::from([10, 244, 1, i])).collect();
        assert_eq!(m.list_sources().unwrap(), want);
        let mut exempt = vec![net("10.244.0.0/16")];
        exempt.extend((0..20).map(|i| net(&format!("10.245.{i}.0/24"))));
        exempt.push(net("10.246.0.0/16"));
        exempt.push(net("fd00:244::/56"));
        assert_eq!(m.list_exempt_destinations().unwrap(), exempt);
    });
    assert_eq!(
        ns.ruleset()
            .matches("masquerade comment \"trellis masquerade v1")
            .count(),
        4
    );
}

/// pod ── node ── outside: the node forwards and masquerades. Returns the source address the
/// outside sees for a UDP datagram sent by the pod from `from` to `to`.
struct Topology {
    pod: Netns,
    node: Netns,
    outside: Netns,
}

impl Topology {
    fn new() -> Self {
        let (pod, node, outside) = (Netns::new(), Netns::new(), Netns::new());
        let (p, n, o) = (pod.name.as_str(), node.name.as_str(), outside.name.as_str());
        run_cmd(&[
            "ip", "-n", n, "link", "add", "n0", "type", "veth", "peer", "name", "p0", "netns", p,
        ]);
        run_cmd(&[
            "ip", "-n", n, "link", "add", "n1", "type", "veth", "peer", "name", "o0", "netns", o,
        ]);
        for (ns, dev, addrs) in [
            (
                p,
                "p0",
                ["10.244.1.5/24", "10.244.1.6/24", "fd00:244:1::5/64", "fd00:244:1::6/64"].as_slice(),
            ),
            (n, "n0", &["10.244.1.1/24", "fd00:244:1::1/64"]),
            (n, "n1", &["203.0.113.1/24", "2001:db8:2::1/64"]),
            (o, "o0", &["203.0.113.2/24", "2001:db8:2::2/64"]),
        ] {
            for a in addrs {
                run_cmd(&["ip", "-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
            }
            run_cmd(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run_cmd(&["ip", "-n", p, "route", "add", "default", "via", "10.244.1.1"]);
        run_cmd(&["ip", "-n", p, "-6", "route", "add", "default", "via", "fd00:244:1::1"]);
        run_cmd(&["ip", "-n", o, "route", "add", "10.244.0.0/16", "via", "203.0.113.1"]);
        run_cmd(&[
            "ip",
            "-n",
            o,
            "-6",
            "route",
            "add",
            "fd00:244::/48",
            "via",
            "2001:db8:2::1",
        ]);
        node.exec(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        Topology { pod, node, outside }
    }

    fn source_seen(&self, from: &str, from_port: u16, to: &str) -> IpAddr {
        let to: SocketAddr = (ip(to), 9000).into();
        let listen: SocketAddr = if to.is_ipv4() { "0.0.0.0:9000" } else { "[::]:9000" }.parse().unwrap();
        let got = std::sync::Mutex::new(None);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                self.outside.run(|| {
                    let sock = UdpSocket::bind(listen).unwrap();
                    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    ready_tx.send(()).unwrap();
                    let mut buf = [0u8; 16];
                    let (_, peer) = sock.recv_from(&mut buf).expect("no datagram reached the outside");
                    *got.lock().unwrap() = Some(peer.ip());
                })
            });
            ready_rx.recv().unwrap();
            self.pod.run(|| {
                let sock = UdpSocket::bind(SocketAddr::from((ip(from), from_port))).unwrap();
                // The first datagrams may wait on neighbour resolution: send until one arrives.
                for _ in 0..50 {
                    if got.lock().unwrap().is_some() {
                        break;
                    }
                    sock.send_to(b"x", to).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        });
        got.into_inner().unwrap().expect("nothing received")
    }
}

#[test]
fn nft_masquerades_real_packets() {
    let t = Topology::new();
    // Each probe uses its own source port: NAT is decided once per connection.
    t.node.run(|| {
        let m = masq(&["10.244.0.0/16", "fd00:244::/48"]);
        m.ensure().unwrap();
        m.add_source(ip("10.244.1.5")).unwrap();
        m.add_source(ip("fd00:244:1::5")).unwrap();
    });
    // A pod in the set, to a non-exempt destination: the outside sees the node.
    assert_eq!(t.source_seen("10.244.1.5", 10001, "203.0.113.2"), ip("203.0.113.1"));
    assert_eq!(
        t.source_seen("fd00:244:1::5", 10001, "2001:db8:2::2"),
        ip("2001:db8:2::1")
    );
    // A pod not in the set keeps its address.
    assert_eq!(t.source_seen("10.244.1.6", 10002, "203.0.113.2"), ip("10.244.1.6"));
    assert_eq!(
        t.source_seen("fd00:244:1::6", 10002, "2001:db8:2::2"),
        ip("fd00:244:1::6")
    );
    // An exempt destination: no masquerade.
    t.node.run(|| {
        let m = masq(&[]);
        m.add_exempt_destination(net("203.0.113.0/24")).unwrap();
        m.add_exempt_destination(net("2001:db8:2::/64")).unwrap();
    });
    assert_eq!(t.source_seen("10.244.1.5", 10003, "203.0.113.2"), ip("10.244.1.5"));
    // ensure with everything in place commits nothing: the counters keep counting.
    t.node.run(|| masq(&["10.244.0.0/16"]).ensure().unwrap());
    let text = t.node.ruleset();
    assert!(
        text.contains("ip saddr @masq4 ip daddr != @nomasq_dst4 counter packets "),
        "{text}"
    );
    assert!(
        !text.contains("ip saddr @masq4 ip daddr != @nomasq_dst4 counter packets 0 "),
        "{text}"
    );
    assert_eq!(
        t.source_seen("fd00:244:1::5", 10003, "2001:db8:2::2"),
        ip("fd00:244:1::5")
    );
    // Removed from the set: no masquerade either.
    t.node.run(|| {
        let m = masq(&[]);
        m.remove_exempt_destination(net("203.0.113.0/24")).unwrap();
        m.remove_source(ip("10.244.1.5")).unwrap();
        m.add_source_prefix(net("10.244.1.6/32")).unwrap();
    });
    assert_eq!(t.source_seen("10.244.1.5", 10004, "203.0.113.2"), ip("10.244.1.5"));
    // A source prefix is masqueraded like a pod address.
    assert_eq!(t.source_seen("10.244.1.6", 10004, "203.0.113.2"), ip("203.0.113.1"));
    t.node.run(|| masq(&[]).delete_all().unwrap());
    assert_eq!(t.node.ruleset().trim(), "");
}

fn tcp(host_port: u16, container_port: u16) -> PortMapping {
    PortMapping {
        protocol: Protocol::Tcp,
        host_port,
        container_port,
    }
}

#[test]
fn nft_hostports_add_list_conflict_remove_and_repair() {
    let ns = Netns::new();
    ns.run(|| {
        let hp = HostPorts::new(DEFAULT_TABLE).unwrap();
        // Nothing there: listing and removing succeed.
        assert!(hp.list().unwrap().is_empty());
        hp.remove("nobody").unwrap();
        let a = "trellis/net/a/eth0";
        let b = "trellis/net/b/eth0";
        let udp = PortMapping {
            protocol: Protocol::Udp,
            host_port: 5353,
            container_port: 53,
        };
        hp.add(a, &[tcp(8080, 80), udp], &[ip("10.244.1.2"), ip("fd00::2")])
            .unwrap();
        // The same again (a runtime retrying ADD) is fine.
        hp.add(a, &[tcp(8080, 80), udp], &[ip("10.244.1.2"), ip("fd00::2")])
            .unwrap();
        // Another pod cannot take a host port that is held.
        let e = hp.add(b, &[tcp(8080, 8080)], &[ip("10.244.1.3")]).unwrap_err();
        assert!(e.is_exists(), "{e}");
        hp.add(b, &[tcp(9090, 90)], &[ip("10.244.1.3")]).unwrap();
        let mut got: Vec<(String, u16, u16, IpAddr)> = hp
            .list()
            .unwrap()
            .into_iter()
            .map(|m| (m.owner, m.mapping.host_port, m.mapping.container_port, m.pod_ip))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (a.to_string(), 5353, 53, ip("10.244.1.2")),
                (a.to_string(), 5353, 53, ip("fd00::2")),
                (a.to_string(), 8080, 80, ip("10.244.1.2")),
                (a.to_string(), 8080, 80, ip("fd00::2")),
                (b.to_string(), 9090, 90, ip("10.244.1.3")),
            ]
        );
        // nft(8) reads what we wrote.
        let ruleset = ns.exec(&["nft", "list", "table", "inet", DEFAULT_TABLE]);
        for want in [
            "fib daddr type local jump hostports",
            "dnat ip to meta l4proto . th dport map @hostport4",
            "dnat ip6 to meta l4proto . th dport map @hostport6",
            "ip saddr . ip daddr @hairpin4",
            "masquerade",
        ] {
            assert!(ruleset.contains(want), "no {want:?} in:\n{ruleset}");
        }
        // DEL of a: only a's elements go, b's stay.
        hp.remove(a).unwrap();
        let left: Vec<String> = hp.list().unwrap().into_iter().map(|m| m.owner).collect();
        assert_eq!(left, vec![b.to_string()]);
        // A flushed chain is repaired by the next ensure; elements survive.
        ns.exec(&["nft", "flush", "chain", "inet", DEFAULT_TABLE, "hostports"]);
        hp.ensure().unwrap();
        let ruleset = ns.exec(&["nft", "list", "chain", "inet", DEFAULT_TABLE, "hostports"]);
        assert!(ruleset.contains("map @hostport4"), "{ruleset}");
        assert_eq!(hp.list().unwrap().len(), 1);
        // GC keeps what it is told to keep.
        let removed = hp.remove_where(|o| o == a).unwrap();
        assert_eq!(removed, vec![b.to_string()]);
        assert!(hp.list().unwrap().is_empty());
    });
}

#[test]
fn nft_table_watch_wakes_on_what_undoes_the_table_only() {
    let ns = Netns::new();
    let (m, w) = ns.run(|| {
        let m = masq(&["10.244.0.0/16"]);
        m.ensure().unwrap();
        let w = m.watch().unwrap();
        (m, w)
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut w = w;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            loop {
                if w.changed().await.is_err() || tx.send(()).is_err() {
                    return;
                }
            }
        })
    });
    let quiet = |what: &str| {
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "woken by {what}");
    };
    let woken = |what: &str| {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("not woken by {what}"));
        while rx.try_recv().is_ok() {}
    };
    // Our own additions, and another table's changes, are not news.
    m.add_source(ip("10.244.1.5")).unwrap();
    m.add_source_prefix(net("10.244.2.0/24")).unwrap();
    quiet("additions");
    ns.exec(&["nft", "add", "table", "inet", "someone_else"]);
    ns.exec(&["nft", "delete", "table", "inet", "someone_else"]);
    quiet("another table");
    ns.exec(&[
        "nft",
        "delete",
        "element",
        "inet",
        DEFAULT_TABLE,
        "masq_net4",
        "{ 10.244.2.0/24 }",
    ]);
    woken("a deleted masquerade element");
    ns.exec(&["nft", "flush", "chain", "inet", DEFAULT_TABLE, "postrouting"]);
    woken("a flushed chain");
    ns.exec(&["nft", "flush", "ruleset"]);
    woken("nft flush ruleset");
    // After the repair the table is whole again.
    m.ensure().unwrap();
    let ruleset = ns.exec(&["nft", "list", "chain", "inet", DEFAULT_TABLE, "postrouting"]);
    assert_eq!(ruleset.matches(" masquerade comment").count(), 4, "{ruleset}");
    drop(rx);
    // The waiter ends at the next change (its send fails); make one.
    ns.exec(&["nft", "flush", "ruleset"]);
    waiter.join().unwrap();
}

#[test]
fn nft_antispoof_tables_load_and_elements_follow_their_owners() {
    let ns = Netns::new();
    ns.run(|| {
        let guard = AntiSpoof::new(DEFAULT_TABLE).unwrap();
        assert!(guard.owners().unwrap().is_empty());
        guard.remove("nobody").unwrap();
        let bridged = PodIdentity {
            port: "trl000000000001".into(),
            kind: PortKind::Bridged,
            mac: [0x0a, 0x58, 10, 244, 1, 2],
            ips: vec![ip("10.244.1.2"), ip("fd00:244:1::2"), ip("fe80::858:aff:fef4:102")],
            pod: None,
        };
        let routed = PodIdentity {
            port: "trl000000000002".into(),
            kind: PortKind::Routed,
            mac: [0; 6],
            ips: vec![ip("10.244.1.3")],
            pod: None,
        };
        guard.protect("trellis/net/a/eth0", &bridged).unwrap();
        guard.protect("trellis/net/a/eth0", &bridged).unwrap();
        guard.protect("trellis/net/b/eth0", &routed).unwrap();
        let mut owners = guard.owners().unwrap();
        owners.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            owners,
            vec![
                ("trellis/net/a/eth0".to_string(), PortKind::Bridged),
                ("trellis/net/b/eth0".to_string(), PortKind::Routed)
            ]
        );
        // nft(8) reads what we wrote.
        let bridge = ns.exec(&["nft", "list", "table", "bridge", DEFAULT_TABLE]);
        for want in [
            "hook prerouting priority filter",
            "iifname != @ports accept",
            "iifname . ether saddr != @macs counter",
            "iifname . ip saddr != @ip4 counter",
            "iifname . ip6 saddr != @ip6 counter",
            "\"trl000000000001\" . 0a:58:0a:f4:01:02",
            "\"trl000000000001\" . 10.244.1.2",
            "\"trl000000000001\" . 0.0.0.0",
            "\"trl000000000001\" . fe80::858:aff:fef4:102",
            "\"trl000000000001\" . ::",
            "elements = { \"trl000000000001\" comment",
        ] {
            assert!(bridge.contains(want), "no {want:?} in:\n{bridge}");
        }
        if std::env::var_os("TRELLIS_SHOW_RULESET").is_some() {
            eprintln!("{bridge}");
        }
        let inet = ns.exec(&["nft", "list", "chain", "inet", DEFAULT_TABLE, "antispoof"]);
        for want in [
            "hook prerouting priority raw",
            "iifname != @spoof_ports accept",
            "iifname . ip saddr != @spoof_ip4 counter",
        ] {
            assert!(inet.contains(want), "no {want:?} in:\n{inet}");
        }
        // A flushed chain is repaired by the next ensure; elements survive.
        ns.exec(&["nft", "flush", "chain", "bridge", DEFAULT_TABLE, "antispoof"]);
        guard.ensure(PortKind::Bridged).unwrap();
        let chain = ns.exec(&["nft", "list", "chain", "bridge", DEFAULT_TABLE, "antispoof"]);
        assert!(chain.contains("@macs"), "{chain}");
        assert_eq!(guard.owners().unwrap().len(), 2);
        // DEL of a: only a's elements go; GC keeps what it is told to keep.
        guard.remove("trellis/net/a/eth0").unwrap();
        let bridge = ns.exec(&["nft", "list", "table", "bridge", DEFAULT_TABLE]);
        assert!(!bridge.contains("trl000000000001"), "{bridge}");
        assert_eq!(
            guard.remove_where(|o| o == "trellis/net/a/eth0").unwrap(),
            vec!["trellis/net/b/eth0".to_string()]
        );
        assert!(guard.owners().unwrap().is_empty());
    });
}

#[test]
fn nft_underlay_guard_syncs_its_nodes_in_one_batch_and_repairs() {
    let ns = Netns::new();
    ns.run(|| {
        let encap = Encapsulation {
            vxlan_port: Some(8472),
            ipip: true,
        };
        let guard = UnderlayGuard::new(DEFAULT_TABLE, encap).unwrap();
        let nodes: std::collections::BTreeSet<IpAddr> = [ip("192.168.0.11"), ip("192.168.0.12"), ip("fd00::12")].into();
        assert_eq!(guard.sync(&nodes).unwrap(), 3);
        assert_eq!(guard.sync(&nodes).unwrap(), 0, "in place: nothing committed");
        assert_eq!(guard.nodes().unwrap(), nodes);
        let table = ns.exec(&["nft", "list", "table", "inet", DEFAULT_TABLE]);
        for want in [
            "hook input priority filter",
            "hook forward priority filter",
            "udp dport 8472 ip saddr != @nodes4 counter",
            "udp dport 8472 ip6 saddr != @nodes6 counter",
            "udp dport 8472 ip daddr @nodes4 counter",
            "ip saddr != @nodes4 counter",
        ] {
            assert!(table.contains(want), "no {want:?} in:\n{table}");
        }
        // A node goes, another comes: only the difference.
        let next: std::collections::BTreeSet<IpAddr> = [ip("192.168.0.11"), ip("192.168.0.13")].into();
        assert_eq!(guard.sync(&next).unwrap(), 3);
        assert_eq!(guard.nodes().unwrap(), next);
        // A flushed ruleset comes back whole, nodes included, in one batch.
        ns.exec(&["nft", "flush", "ruleset"]);
        assert_eq!(guard.sync(&next).unwrap(), 2);
        assert_eq!(guard.nodes().unwrap(), next);
        // host-gw guards nothing.
        let none = UnderlayGuard::new("other", Encapsulation::default()).unwrap();
        assert_eq!(none.sync(&next).unwrap(), 0);
    });
}

#[test]
fn pod_identity_records_round_trip() {
    let pod = PodIdentity {
        port: "trl0123456789ab".into(),
        kind: PortKind::Bridged,
        mac: [0x0a, 0x58, 10, 244, 1, 2],
        ips: vec![ip("10.244.1.2"), ip("fd00:244:1::2")],
        pod: Some("x/a".into()),
    };
    let text = pod.record("trellis/net/a/eth0");
    assert_eq!(
        PodIdentity::parse_record(&text),
        Some(("trellis/net/a/eth0".into(), pod))
    );
    assert_eq!(PodIdentity::parse_record("owner x\nkind sideways\n"), None);
    assert_eq!(PodIdentity::parse_record("garbage"), None);
}

/// A policy table far larger than a netlink socket's default buffers (a 20,000-pod cluster's
/// peer set and 2,000 local pods): one transaction all the same, every acknowledgement read.
/// Fails with EMSGSIZE when the send buffer is not sized to the batch.
#[test]
fn nft_policy_batch_larger_than_the_socket_buffers_commits_whole() {
    let ns = Netns::new();
    let mut state = PolicyState::default();
    let addrs: Vec<(IpAddr, IpAddr)> = (0..20_000u32)
        .map(|i| {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i));
            (a, a)
        })
        .collect();
    state.sets.insert("peer-all".into(), addrs);
    state.chains.insert(
        "in-big".into(),
        PolicyChain {
            peer_is_source: true,
            lines: vec![PolicyLine {
                peer: LinePeer::Set("peer-all".into()),
                ports: LinePorts::Ranges(6, vec![(80, 80)]),
                comment: "x/big".into(),
            }],
        },
    );
    for i in 0..2000 {
        state.ingress.insert(format!("tp{i:05}"), "in-big".into());
    }
    let applied = ns.run(|| {
        PolicyTable::new("tpol", PortKind::Routed)
            .unwrap()
            .apply(&state)
            .unwrap()
    });
    assert!(applied.rebuilt);
    let listed = ns.exec(&["nft", "list", "map", "inet", "tpol", "ingress"]);
    assert_eq!(
        listed.matches("jump in-big").count(),
        2000,
        "{}",
        &listed[..listed.len().min(500)]
    );
    let set = ns.exec(&["nft", "list", "set", "inet", "tpol", "peer-all-4"]);
    assert!(set.contains("10.0.156.62"), "the last of 20,000 addresses is in");
}
