//! Round trips and every decoding error of the wire format.
use super::update::decode_prefixes;
use super::*;
use std::net::IpAddr;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn round_trip(m: Message, four: bool) {
    let bytes = m.encode(four);
    let header: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
    let (ty, body_len) = decode_header(&header).unwrap();
    assert_eq!(body_len, bytes.len() - HEADER_LEN);
    assert_eq!(Message::decode(ty, &bytes[HEADER_LEN..], four).unwrap(), m);
}

fn open() -> Open {
    Open {
        asn: 4_200_000_001,
        hold_time: 90,
        router_id: "192.168.0.1".parse().unwrap(),
        capabilities: vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::Multiprotocol { afi: 2, safi: 1 },
            Capability::RouteRefresh,
            Capability::FourOctetAs(4_200_000_001),
            Capability::GracefulRestart(GracefulRestart {
                restarted: true,
                restart_time: 120,
                families: vec![(Family::Ipv4Unicast, true), (Family::Ipv6Unicast, false)],
            }),
            Capability::Other { code: 70, data: vec![] },
        ],
    }
}

#[test]
fn open_round_trips_and_uses_as_trans() {
    round_trip(Message::Open(open()), true);
    let bytes = Message::Open(open()).encode(true);
    assert_eq!(&bytes[20..22], &(AS_TRANS as u16).to_be_bytes(), "My AS is AS_TRANS");
    let o = open();
    assert_eq!(o.families(), [Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert!(o.four_octet_as() && o.route_refresh());
    assert_eq!(o.graceful_restart().unwrap().restart_time, 120);
}

#[test]
fn open_without_capabilities_means_ipv4_and_two_octet_as() {
    let o = Open {
        asn: 64512,
        hold_time: 0,
        router_id: "10.0.0.1".parse().unwrap(),
        capabilities: vec![],
    };
    round_trip(Message::Open(o.clone()), false);
    assert_eq!(o.families(), [Family::Ipv4Unicast]);
}

fn update() -> Update {
    Update {
        withdrawn: vec![net("10.244.9.0/24"), net("10.0.0.0/8")],
        attrs: vec![
            Attr::Origin(0),
            Attr::AsPath(AsPath(vec![AsSegment {
                kind: AS_SEQUENCE,
                asns: vec![65001, 65002],
            }])),
            Attr::NextHop("192.168.77.11".parse().unwrap()),
            Attr::Med(5),
            Attr::LocalPref(100),
            Attr::AtomicAggregate,
            Attr::OriginatorId("192.168.77.12".parse().unwrap()),
            Attr::ClusterList(vec![1, 2]),
            Attr::MpReach(MpReach {
                family: Family::Ipv6Unicast,
                next_hop: "fd00:77::11".parse().unwrap(),
                link_local: Some("fe80::1".parse().unwrap()),
                nlri: vec![net("fd00:244:1::/64"), net("::/0"), net("fd00::1/128")],
            }),
            Attr::MpUnreach(MpUnreach {
                family: Family::Ipv6Unicast,
                withdrawn: vec![net("fd00:244:2::/64")],
            }),
            Attr::Other {
                flags: 0xc0,
                code: 32,
                data: vec![1; 300],
            },
        ],
        nlri: vec![
            net("10.244.1.0/24"),
            net("0.0.0.0/0"),
            net("10.244.1.7/32"),
            net("10.128.0.0/9"),
        ],
    }
}

#[test]
fn update_round_trips() {
    round_trip(Message::Update(update()), true);
    round_trip(Message::Update(update()), false);
    round_trip(Message::Update(Update::end_of_rib(Family::Ipv6Unicast)), true);
    for f in Family::ALL {
        assert_eq!(Update::end_of_rib(f).as_end_of_rib(), Some(f));
    }
    assert_eq!(update().as_end_of_rib(), None);
}

#[test]
fn other_messages_round_trip() {
    round_trip(Message::Keepalive, true);
    round_trip(Message::RouteRefresh(2, 1), true);
    round_trip(Message::Notification(Notification::new(3, 1, vec![1, 2])), true);
}

#[test]
fn two_octet_paths_carry_as_trans() {
    let u = Update {
        attrs: vec![Attr::AsPath(AsPath(vec![AsSegment {
            kind: AS_SEQUENCE,
            asns: vec![4_200_000_001],
        }]))],
        ..Default::default()
    };
    let bytes = Message::Update(u).encode(false);
    let decoded = decode_update(&bytes[HEADER_LEN..], false).unwrap();
    assert_eq!(
        decoded.attrs,
        [Attr::AsPath(AsPath(vec![AsSegment {
            kind: AS_SEQUENCE,
            asns: vec![AS_TRANS]
        }]))]
    );
}

#[test]
fn host_bits_are_cleared() {
    let p = decode_prefixes(&[20, 10, 244, 0xff], Family::Ipv4Unicast).unwrap();
    assert_eq!(p, [net("10.244.240.0/20")]);
    assert_eq!(p[0].ip(), "10.244.240.0".parse::<IpAddr>().unwrap());
}

fn header(len: u16, ty: u8) -> [u8; HEADER_LEN] {
    let mut h = [0xff; HEADER_LEN];
    h[16..18].copy_from_slice(&len.to_be_bytes());
    h[18] = ty;
    h
}

#[test]
fn header_errors() {
    let mut h = header(19, msg::KEEPALIVE);
    assert_eq!(decode_header(&h), Ok((msg::KEEPALIVE, 0)));
    h[3] = 0;
    assert_eq!(decode_header(&h).unwrap_err(), Notification::new(1, 1, vec![]));
    assert_eq!(
        decode_header(&header(18, msg::UPDATE)).unwrap_err(),
        Notification::new(1, 2, vec![0, 18])
    );
    assert_eq!(
        decode_header(&header(4097, msg::UPDATE)).unwrap_err(),
        Notification::new(1, 2, vec![0x10, 0x01])
    );
    assert_eq!(
        decode_header(&header(20, msg::KEEPALIVE)).unwrap_err().subcode,
        err::HEADER_BAD_LENGTH
    );
    assert_eq!(
        decode_header(&header(28, msg::OPEN)).unwrap_err().subcode,
        err::HEADER_BAD_LENGTH
    );
    assert_eq!(
        decode_header(&header(19, 9)).unwrap_err(),
        Notification::new(1, 3, vec![9])
    );
}

#[test]
fn open_errors() {
    let mut body = Message::Open(open()).encode(true)[HEADER_LEN..].to_vec();
    body[0] = 3;
    assert_eq!(decode_open(&body).unwrap_err(), Notification::new(2, 1, vec![0, 4]));
    // An optional parameter of type 1 (authentication, deprecated).
    let body = [4, 0xfd, 0xe8, 0, 90, 10, 0, 0, 1, 3, 1, 1, 0];
    assert_eq!(decode_open(&body).unwrap_err(), Notification::new(2, 4, vec![]));
    // A parameter longer than the parameters.
    let body = [4, 0xfd, 0xe8, 0, 90, 10, 0, 0, 1, 3, 2, 9, 0];
    assert_eq!(decode_open(&body).unwrap_err().code, err::OPEN);
}

/// An UPDATE body with these attribute bytes and NLRI bytes.
fn body(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    b
}

const ORIGIN: [u8; 4] = [0x40, 1, 1, 0];
const AS_PATH: [u8; 3] = [0x40, 2, 0];
const NEXT_HOP: [u8; 7] = [0x40, 3, 4, 192, 168, 77, 1];
const NLRI: [u8; 4] = [24, 10, 244, 1];

fn with(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn update_errors() {
    let ok = with(&[&ORIGIN, &AS_PATH, &NEXT_HOP]);
    assert!(decode_update(&body(&ok, &NLRI), true).is_ok());

    let e = |b: Vec<u8>| decode_update(&b, true).unwrap_err();
    // Withdrawn length past the end.
    assert_eq!(e(vec![0, 9, 0, 0]), Notification::new(3, 1, vec![]));
    // Total attribute length past the end.
    assert_eq!(e(vec![0, 0, 0, 9, 0x40]), Notification::new(3, 1, vec![]));
    // An attribute longer than the attributes.
    assert_eq!(e(body(&[0x40, 1, 9, 0], &NLRI)).subcode, 1);
    // Twice the same attribute.
    assert_eq!(e(body(&with(&[&ok, &ORIGIN]), &NLRI)).subcode, 1);
    // Missing well-known attributes, in order, with the type code as data.
    assert_eq!(
        e(body(&with(&[&AS_PATH, &NEXT_HOP]), &NLRI)),
        Notification::new(3, 3, vec![1])
    );
    assert_eq!(
        e(body(&with(&[&ORIGIN, &NEXT_HOP]), &NLRI)),
        Notification::new(3, 3, vec![2])
    );
    assert_eq!(
        e(body(&with(&[&ORIGIN, &AS_PATH]), &NLRI)),
        Notification::new(3, 3, vec![3])
    );
    // Nothing is mandatory without NLRI (a withdrawal, End-of-RIB).
    assert!(decode_update(&body(&[], &[]), true).is_ok());
    // ORIGIN marked optional.
    let bad = [0xc0, 1, 1, 0];
    assert_eq!(
        e(body(&with(&[&bad, &AS_PATH, &NEXT_HOP]), &NLRI)),
        Notification::new(3, 4, bad.to_vec())
    );
    // ORIGIN of two bytes, ORIGIN 7.
    let bad = [0x40, 1, 2, 0, 0];
    assert_eq!(
        e(body(&with(&[&bad, &AS_PATH, &NEXT_HOP]), &NLRI)),
        Notification::new(3, 5, bad.to_vec())
    );
    let bad = [0x40, 1, 1, 7];
    assert_eq!(
        e(body(&with(&[&bad, &AS_PATH, &NEXT_HOP]), &NLRI)),
        Notification::new(3, 6, bad.to_vec())
    );
    // NEXT_HOP 0.0.0.0, 224.0.0.1, and of 3 bytes.
    for bad in [[0x40, 3, 4, 0, 0, 0, 0], [0x40, 3, 4, 224, 0, 0, 1]] {
        assert_eq!(
            e(body(&with(&[&ORIGIN, &AS_PATH, &bad]), &NLRI)),
            Notification::new(3, 8, bad.to_vec())
        );
    }
    let bad = [0x40, 3, 3, 10, 0, 0];
    assert_eq!(
        e(body(&with(&[&ORIGIN, &AS_PATH, &bad]), &NLRI)),
        Notification::new(3, 5, bad.to_vec())
    );
    // An unknown well-known attribute; an unknown optional one is fine.
    let bad = [0x40, 99, 0];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 2, bad.to_vec())
    );
    assert!(decode_update(&body(&with(&[&ok, &[0xc0, 99, 0]]), &NLRI), true).is_ok());
    // AS_PATH segment of type 9, segment longer than the attribute.
    assert_eq!(
        e(body(&with(&[&ORIGIN, &[0x40, 2, 2, 9, 0], &NEXT_HOP]), &NLRI)).subcode,
        11
    );
    assert_eq!(
        e(body(&with(&[&ORIGIN, &[0x40, 2, 2, 2, 1], &NEXT_HOP]), &NLRI)).subcode,
        11
    );
    // NLRI with a /33 and a truncated prefix.
    assert_eq!(e(body(&ok, &[33, 10, 0, 0, 0, 0])), Notification::new(3, 10, vec![]));
    assert_eq!(e(body(&ok, &[24, 10])), Notification::new(3, 10, vec![]));
    // MP_REACH with a 5-byte IPv6 next hop.
    let bad = [0x80, 14, 10, 0, 2, 1, 5, 1, 2, 3, 4, 5, 0];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 9, bad.to_vec())
    );

    // Route reflection (RFC 4456, RFC 7606 §7.9-7.10): ORIGINATOR_ID of 4 bytes, CLUSTER_LIST
    // a multiple of 4; both optional non-transitive.
    let good = [0x80, 9, 4, 192, 168, 77, 12, 0x80, 10, 8, 1, 0, 0, 1, 1, 0, 0, 2];
    let u = decode_update(&body(&with(&[&ok, &good]), &NLRI), true).unwrap();
    assert_eq!(
        u.get(attr::ORIGINATOR_ID),
        Some(&Attr::OriginatorId("192.168.77.12".parse().unwrap()))
    );
    assert_eq!(
        u.get(attr::CLUSTER_LIST),
        Some(&Attr::ClusterList(vec![0x0100_0001, 0x0100_0002]))
    );
    let bad = [0x80, 9, 3, 192, 168, 77];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 5, bad.to_vec())
    );
    let bad = [0x80, 10, 6, 1, 0, 0, 1, 1, 0];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 5, bad.to_vec())
    );
    let bad = [0xc0, 9, 4, 192, 168, 77, 12];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 4, bad.to_vec())
    );
    let bad = [0x40, 10, 4, 1, 0, 0, 1];
    assert_eq!(
        e(body(&with(&[&ok, &bad]), &NLRI)),
        Notification::new(3, 4, bad.to_vec())
    );
}

#[test]
fn reflection_attributes_round_trip() {
    let u = Update {
        attrs: vec![
            Attr::Origin(0),
            Attr::AsPath(AsPath::default()),
            Attr::NextHop("192.168.77.13".parse().unwrap()),
            Attr::LocalPref(100),
            Attr::OriginatorId("192.168.77.13".parse().unwrap()),
            Attr::ClusterList(vec![0x0100_0001]),
        ],
        nlri: vec![net("10.244.3.0/24")],
        ..Default::default()
    };
    round_trip(Message::Update(u.clone()), true);
    round_trip(Message::Update(u), false);
    // An empty CLUSTER_LIST is well-formed.
    let empty = Update {
        attrs: vec![Attr::ClusterList(vec![])],
        ..Default::default()
    };
    round_trip(Message::Update(empty), true);
}
