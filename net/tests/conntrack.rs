//! Conntrack dump and delete against the real kernel, in throwaway namespaces only.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};

use common::netns;
use trellis_net::conntrack::{self, Flow, Tuple};
use trellis_net::netns::{run_in, NetnsGuard};

const UDP: u8 = 17;
const TCP: u8 = 6;

/// A namespace with lo up and an nftables rule that uses conntrack (without a user, the
/// namespace tracks nothing).
fn tracking_netns(tag: &str) -> NetnsGuard {
    tracking_netns_with(tag, "")
}

/// [`tracking_netns`] with more nftables statements (`extra`) in the table.
fn tracking_netns_with(tag: &str, extra: &str) -> NetnsGuard {
    let ns = netns(tag);
    common::ip(&ns, &["link", "set", "lo", "up"]);
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns.name(), "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("running nft");
    nft.stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "table inet tct {{\n chain out {{\n  type filter hook output priority 0;\n  ct state new accept\n }}\n{extra}}}\n"
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft failed");
    ns
}

/// Sends one UDP datagram from a fresh socket to `dst` (a bound receiver) inside `ns`; returns
/// the sender's and receiver's addresses.
fn udp_flow(ns: &NetnsGuard, ip: &str) -> (SocketAddr, SocketAddr) {
    let ip: IpAddr = ip.parse().unwrap();
    run_in(ns.path(), || {
        let rx = UdpSocket::bind((ip, 0)).unwrap();
        let tx = UdpSocket::bind((ip, 0)).unwrap();
        tx.send_to(b"hello", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        rx.recv_from(&mut buf).unwrap();
        (tx.local_addr().unwrap(), rx.local_addr().unwrap())
    })
    .unwrap()
}

fn tuple(proto: u8, src: SocketAddr, dst: SocketAddr) -> Tuple {
    Tuple {
        src: src.ip(),
        dst: dst.ip(),
        proto,
        sport: src.port(),
        dport: dst.port(),
    }
}

fn dump_in(ns: &NetnsGuard) -> Vec<Flow> {
    run_in(ns.path(), conntrack::dump).unwrap().unwrap()
}

fn find(flows: &[Flow], orig: Tuple) -> Option<&Flow> {
    flows.iter().find(|f| f.orig == orig)
}

#[test]
fn dump_shows_udp_and_tcp_flows_of_both_families() {
    let ns = tracking_netns("ctdump");
    let (s4, d4) = udp_flow(&ns, "127.0.0.1");
    let (s6, d6) = udp_flow(&ns, "::1");
    let (tcp_src, tcp_dst) = run_in(ns.path(), || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        (c.local_addr().unwrap(), l.local_addr().unwrap())
    })
    .unwrap();

    let flows = dump_in(&ns);
    for (proto, src, dst) in [(UDP, s4, d4), (UDP, s6, d6), (TCP, tcp_src, tcp_dst)] {
        let orig = tuple(proto, src, dst);
        let flow = find(&flows, orig).unwrap_or_else(|| panic!("{orig} not in {flows:#?}"));
        assert_eq!(flow.reply, tuple(proto, dst, src), "{flow:?}");
        assert_eq!(flow.zone, 0);
    }
}

#[test]
fn a_namespace_without_conntrack_users_dumps_empty() {
    let ns = netns("ctempty");
    common::ip(&ns, &["link", "set", "lo", "up"]);
    udp_flow(&ns, "127.0.0.1");
    assert_eq!(dump_in(&ns), Vec::new());
}

#[test]
fn delete_removes_one_flow_and_then_reports_it_gone() {
    let ns = tracking_netns("ctdel");
    let (s4, d4) = udp_flow(&ns, "127.0.0.1");
    let (s6, d6) = udp_flow(&ns, "::1");
    let (o4, o6) = (tuple(UDP, s4, d4), tuple(UDP, s6, d6));

    let flows = dump_in(&ns);
    let f4 = find(&flows, o4).expect("IPv4 flow").clone();
    let f6 = find(&flows, o6).expect("IPv6 flow").clone();
    assert!(run_in(ns.path(), || conntrack::delete(&f4)).unwrap().unwrap());

    let after = dump_in(&ns);
    assert!(find(&after, o4).is_none(), "{after:#?}");
    assert!(find(&after, o6).is_some(), "{after:#?}");
    assert!(!run_in(ns.path(), || conntrack::delete(&f4)).unwrap().unwrap());

    assert!(run_in(ns.path(), || conntrack::delete(&f6)).unwrap().unwrap());
    assert!(find(&dump_in(&ns), o6).is_none());
}

#[test]
fn delete_where_deletes_only_matching_flows() {
    let ns = tracking_netns("ctwhere");
    let kept = [udp_flow(&ns, "127.0.0.1"), udp_flow(&ns, "::1")];
    let cut = [udp_flow(&ns, "127.0.0.1"), udp_flow(&ns, "::1")];
    let cut_origs: Vec<Tuple> = cut.iter().map(|(s, d)| tuple(UDP, *s, *d)).collect();

    let n = run_in(ns.path(), || conntrack::delete_where(|f| cut_origs.contains(&f.orig)))
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);

    let flows = dump_in(&ns);
    for (s, d) in kept {
        assert!(find(&flows, tuple(UDP, s, d)).is_some(), "{flows:#?}");
    }
    for (s, d) in cut {
        assert!(find(&flows, tuple(UDP, s, d)).is_none(), "{flows:#?}");
    }
}

#[test]
fn icmp_flows_are_deleted_too() {
    let ns = tracking_netns("cticmp");
    let ping = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ping", "-c1", "-W1", "127.0.0.1"])
        .output();
    match ping {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!("no ping: skipping");
            return;
        }
    }
    let icmp = |f: &Flow| f.orig.proto == 1;
    let flows = dump_in(&ns);
    let flow = flows.iter().find(|f| icmp(f)).expect("an ICMP flow").clone();
    assert_eq!((flow.orig.sport, flow.orig.dport), (0, 0));
    assert!(run_in(ns.path(), || conntrack::delete(&flow)).unwrap().unwrap());
    assert!(!dump_in(&ns).iter().any(icmp));
}

#[test]
fn a_large_table_is_dumped_whole_across_many_datagrams() {
    let ns = tracking_netns("ctmany");
    const N: usize = 600;
    let origs: Vec<Tuple> = run_in(ns.path(), || {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = rx.local_addr().unwrap();
        // Every sender stays open until all have sent: a closed one's port could be reused,
        // and two senders on one port are one flow.
        let senders: Vec<UdpSocket> = (0..N).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        senders
            .iter()
            .map(|tx| {
                tx.send_to(b"x", dst).unwrap();
                tuple(UDP, tx.local_addr().unwrap(), dst)
            })
            .collect()
    })
    .unwrap();
    let flows = dump_in(&ns);
    for orig in &origs {
        assert!(find(&flows, *orig).is_some(), "{orig} missing of {} flows", flows.len());
    }
    let dport = origs[0].dport;
    let n = run_in(ns.path(), || conntrack::delete_where(|f| f.orig.dport == dport))
        .unwrap()
        .unwrap();
    assert_eq!(n, N);
    assert!(dump_in(&ns).iter().all(|f| f.orig.dport != dport));
}

#[test]
fn flows_in_a_zone_are_dumped_and_deleted_with_their_zone() {
    // Packets to 127.0.0.2 are tracked in zone 7 (set before conntrack sees them).
    let ns = tracking_netns_with(
        "ctzone",
        " chain zone {\n  type filter hook output priority -300;\n  ip daddr 127.0.0.2 ct zone set 7\n }\n",
    );
    let (zs, zd) = udp_flow(&ns, "127.0.0.2");
    let (s, d) = udp_flow(&ns, "127.0.0.1");
    let flows = dump_in(&ns);
    let zoned = find(&flows, tuple(UDP, zs, zd)).expect("zoned flow").clone();
    assert_eq!(zoned.zone, 7);
    assert_eq!(find(&flows, tuple(UDP, s, d)).expect("plain flow").zone, 0);

    // The same tuple in zone 0 is not this entry.
    let mut in_zone0 = zoned.clone();
    in_zone0.zone = 0;
    assert!(!run_in(ns.path(), || conntrack::delete(&in_zone0)).unwrap().unwrap());
    assert!(run_in(ns.path(), || conntrack::delete(&zoned)).unwrap().unwrap());
    let after = dump_in(&ns);
    assert!(find(&after, zoned.orig).is_none(), "{after:#?}");
    assert!(find(&after, tuple(UDP, s, d)).is_some(), "{after:#?}");
}

#[test]
fn set_mark_changes_only_the_masked_bits_of_one_entry_and_keeps_it() {
    let ns = tracking_netns("ctmark");
    let (s4, d4) = udp_flow(&ns, "127.0.0.1");
    let (s6, d6) = udp_flow(&ns, "::1");
    let (o4, o6) = (tuple(UDP, s4, d4), tuple(UDP, s6, d6));
    let flows = dump_in(&ns);
    let f4 = find(&flows, o4).expect("IPv4 flow").clone();
    assert_eq!(f4.mark, 0);
    assert!(run_in(ns.path(), || conntrack::set_mark(&f4, 0xffff_ffff, 0x0100_0000))
        .unwrap()
        .unwrap());
    let f4 = find(&dump_in(&ns), o4).expect("the marked entry stays").clone();
    assert_eq!(f4.mark, 0x0100_0000);
    assert!(run_in(ns.path(), || conntrack::set_mark(&f4, 0x0000_0042, 0x0000_00ff))
        .unwrap()
        .unwrap());
    let flows = dump_in(&ns);
    assert_eq!(find(&flows, o4).unwrap().mark, 0x0100_0042, "other bits kept");
    assert_eq!(find(&flows, o6).unwrap().mark, 0, "the other entry untouched");
    let f4 = find(&flows, o4).unwrap().clone();
    assert!(run_in(ns.path(), || conntrack::delete(&f4)).unwrap().unwrap());
    assert!(
        !run_in(ns.path(), || conntrack::set_mark(&f4, 1, 1)).unwrap().unwrap(),
        "gone: Ok(false)"
    );
}
