//! A raw TCP peer (this test's own bytes) against the speaker: malformed messages get the
//! NOTIFICATION RFC 4271 §6 prescribes and that session only is closed; the speaker and its other
//! sessions carry on. Hijack attempts are dropped without closing anything; unknown sources are
//! refused.

#[path = "common/bird.rs"]
mod bird;

use bird::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use trellisd::bgp::wire::{Capability, Message, Open};

const T: Duration = Duration::from_secs(20);
const RAW: usize = 3;

/// A BGP peer made of bytes, in node 3's namespace.
struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(lab: &Lab, from: Option<IpAddr>) -> Raw {
        let sock = trellis_net::netns::run_in(lab.node(RAW).path(), TcpSocket::new_v4)
            .unwrap()
            .unwrap();
        if let Some(ip) = from {
            sock.bind(SocketAddr::new(ip, 0)).unwrap();
        }
        let s = sock.connect(SocketAddr::new(node_v4(1), 179)).await.unwrap();
        Raw { s }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// The next message, `None` at the end of the stream.
    async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 19];
        match tokio::time::timeout(T, self.s.read_exact(&mut header)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return None,
            Err(_) => panic!("the speaker said nothing for {T:?}"),
        }
        let len = usize::from(u16::from_be_bytes([header[16], header[17]]));
        let mut body = vec![0u8; len - 19];
        self.s.read_exact(&mut body).await.unwrap();
        Some((header[18], body))
    }

    fn open(asn: u32) -> Vec<u8> {
        Message::Open(Open {
            asn,
            hold_time: 30,
            router_id: "192.168.77.13".parse().unwrap(),
            capabilities: vec![
                Capability::Multiprotocol { afi: 1, safi: 1 },
                Capability::FourOctetAs(asn),
            ],
        })
        .encode(true)
    }

    /// OPEN, KEEPALIVE both ways: Established on the speaker's side.
    async fn handshake(lab: &Lab) -> Raw {
        let mut r = Raw::connect(lab, None).await;
        r.send(&Raw::open(ASN)).await;
        assert_eq!(r.read().await.map(|m| m.0), Some(1), "OPEN");
        assert_eq!(r.read().await.map(|m| m.0), Some(4), "KEEPALIVE");
        r.send(&Message::Keepalive.encode(true)).await;
        r
    }

    /// Reads on (UPDATEs, KEEPALIVEs) to a NOTIFICATION, then expects the end of the stream.
    async fn notification(&mut self) -> Expected {
        loop {
            match self.read().await {
                Some((3, body)) => {
                    assert!(
                        self.read().await.is_none(),
                        "the connection is closed after the NOTIFICATION"
                    );
                    return (body[0], body[1], body[2..].to_vec());
                }
                Some(_) => continue,
                None => panic!("closed without a NOTIFICATION"),
            }
        }
    }
}

/// A message with a valid header around `body`.
fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(body);
    m
}

/// An UPDATE body: no withdrawals, `attrs`, `nlri`.
fn update(attrs: &[&[u8]], nlri: &[u8]) -> Vec<u8> {
    let attrs = attrs.concat();
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(&attrs);
    b.extend_from_slice(nlri);
    message(2, &b)
}

/// NOTIFICATION code, subcode, data.
type Expected = (u8, u8, Vec<u8>);

const ORIGIN: &[u8] = &[0x40, 1, 1, 0];
const AS_PATH: &[u8] = &[0x40, 2, 0];
const NEXT_HOP: &[u8] = &[0x40, 3, 4, 192, 168, 77, 13];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_the_right_notification_and_only_that_session_closes() {
    let lab = Lab::new(3);
    let (s1, mut rx1) = lab.speaker(1, vec![node_peer(2), node_peer(RAW)]).await;
    let (s2, mut rx2) = lab.speaker(2, vec![node_peer(1)]).await;
    let mesh = |r: &trellisd::bgp::Routes| has(r, "10.244.2.0/24", "192.168.77.12");
    wait_routes(&mut rx1, T, "node 2's CIDR", mesh).await;
    wait_routes(&mut rx2, T, "node 1's CIDR", |r| {
        has(r, "10.244.1.0/24", "192.168.77.11")
    })
    .await;

    // A valid session first: its route is learned; a hijack attempt (default route, a prefix
    // outside the cluster) is dropped without closing anything.
    let mut r = Raw::handshake(&lab).await;
    r.send(&update(&[ORIGIN, AS_PATH, NEXT_HOP], &[24, 10, 244, 33])).await;
    r.send(&update(&[ORIGIN, AS_PATH, NEXT_HOP], &[0, 8, 10, 24, 172, 16, 5]))
        .await;
    let routes = wait_routes(&mut rx1, T, "the raw peer's route", |r| {
        has(r, "10.244.33.0/24", "192.168.77.13")
    })
    .await;
    assert!(!routes.contains_key(&"0.0.0.0/0".parse().unwrap()), "{routes:#?}");
    assert!(!routes.contains_key(&"10.0.0.0/8".parse().unwrap()), "{routes:#?}");
    assert!(s1.established().contains(&node_v4(RAW)));

    // An attribute longer than the attributes: Malformed Attribute List.
    r.send(&message(2, &[0, 0, 0, 4, 0x40, 1, 20, 0])).await;
    assert_eq!(r.notification().await, (3, 1, vec![]));
    wait_routes(&mut rx1, T, "the raw peer's route gone", |r| {
        !r.contains_key(&"10.244.33.0/24".parse().unwrap())
    })
    .await;

    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        (
            "missing ORIGIN",
            update(&[AS_PATH, NEXT_HOP], &[24, 10, 244, 33]),
            (3, 3, vec![1]),
        ),
        (
            "NEXT_HOP 0.0.0.0",
            update(&[ORIGIN, AS_PATH, &[0x40, 3, 4, 0, 0, 0, 0]], &[24, 10, 244, 33]),
            (3, 8, vec![0x40, 3, 4, 0, 0, 0, 0]),
        ),
        (
            "NEXT_HOP of 3 bytes",
            update(&[ORIGIN, AS_PATH, &[0x40, 3, 3, 10, 0, 0]], &[24, 10, 244, 33]),
            (3, 5, vec![0x40, 3, 3, 10, 0, 0]),
        ),
        (
            "ORIGIN flagged optional",
            update(&[&[0xc0, 1, 1, 0], AS_PATH, NEXT_HOP], &[24, 10, 244, 33]),
            (3, 4, vec![0xc0, 1, 1, 0]),
        ),
        (
            "NLRI /33",
            update(&[ORIGIN, AS_PATH, NEXT_HOP], &[33, 10, 244, 33, 0, 0]),
            (3, 10, vec![]),
        ),
        ("bad marker", [vec![0u8; 16], vec![0, 19, 4]].concat(), (1, 1, vec![])),
        (
            "length 5000",
            [vec![0xffu8; 16], vec![0x13, 0x88, 2]].concat(),
            (1, 2, vec![0x13, 0x88]),
        ),
        ("type 9", message(9, &[]), (1, 3, vec![9])),
        ("OPEN when established", Raw::open(ASN), (5, 3, vec![])),
    ];
    for (what, bytes, want) in cases {
        let mut r = Raw::handshake(&lab).await;
        r.send(&bytes).await;
        assert_eq!(r.notification().await, want, "{what}");
    }

    // Before Established: a bad peer AS, and an UPDATE in OpenConfirm.
    let mut r = Raw::connect(&lab, None).await;
    r.send(&Raw::open(65099)).await;
    assert_eq!(r.read().await.map(|m| m.0), Some(1));
    assert_eq!(r.notification().await, (2, 2, vec![]), "bad peer AS");
    let mut r = Raw::connect(&lab, None).await;
    r.send(&Raw::open(ASN)).await;
    r.send(&update(&[], &[])).await;
    assert_eq!(r.notification().await, (5, 2, vec![]), "UPDATE in OpenConfirm");

    // An address that is not a peer: closed at once, not a byte said.
    lab.node(RAW)
        .exec_ok(&["ip", "addr", "add", "192.168.77.99/24", "dev", "ul0"]);
    let mut r = Raw::connect(&lab, Some("192.168.77.99".parse().unwrap())).await;
    assert!(r.read().await.is_none());

    // Through all of this, the session with node 2 stayed up and its routes in place.
    assert!(s1.established().contains(&node_v4(2)));
    assert!(mesh(&rx1.borrow()));
    assert!(has(&rx2.borrow(), "10.244.1.0/24", "192.168.77.11"));
    assert_eq!(s2.established(), [node_v4(1)]);
}

/// RFC 4271 §6.6 and RFC 6608: in OpenSent only OPEN (or NOTIFICATION) is expected; anything
/// else is an FSM error, "Receive Unexpected Message in OpenSent State" (5/1), whatever its
/// body. Here an UPDATE with a four-octet AS_PATH, as a peer that assumes the capability sends
/// it: read with two-octet AS numbers (no OPEN, nothing negotiated) it would look malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_before_open_is_an_fsm_error_in_open_sent() {
    let lab = Lab::new(3);
    let (_s1, _rx1) = lab.speaker(1, vec![node_peer(RAW)]).await;
    let four_octet_as_path: &[u8] = &[0x40, 2, 6, 2, 1, 0, 0, 0xfc, 0x00];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "UPDATE with a four-octet AS_PATH",
            update(&[ORIGIN, four_octet_as_path, NEXT_HOP], &[24, 10, 244, 33]),
        ),
        (
            "UPDATE, well-formed",
            update(&[ORIGIN, AS_PATH, NEXT_HOP], &[24, 10, 244, 33]),
        ),
        ("KEEPALIVE", Message::Keepalive.encode(true)),
        ("ROUTE-REFRESH", message(5, &[0, 1, 0, 1])),
    ];
    for (what, bytes) in cases {
        let mut r = Raw::connect(&lab, None).await;
        assert_eq!(r.read().await.map(|m| m.0), Some(1), "{what}: our OPEN first");
        r.send(&bytes).await;
        assert_eq!(r.notification().await, (5, 1, vec![]), "{what} in OpenSent");
    }
}
