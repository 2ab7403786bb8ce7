//! Forged packets, as a hostile pod with CAP_NET_RAW sends them: whole Ethernet frames written
//! on the pod's interface with an `AF_PACKET` socket, so that every field (source MAC, source
//! address, ARP and NDP contents) is the attacker's choice. And a counting UDP receiver, to say
//! how many arrived. Used by the anti-spoofing tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

pub type Mac = [u8; 6];
pub const BROADCAST: Mac = [0xff; 6];

fn ether(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The Internet checksum (RFC 1071) over `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An Ethernet frame with an IPv4 UDP datagram (checksum 0: none, as IPv4 allows).
pub fn udp4(dst_mac: Mac, src_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp = udp_header(40000, dport, payload);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&udp);
    ether(dst_mac, src_mac, 0x0800, &ip)
}

/// IPv6 header + `next` payload with `next_header`, its checksum (at `csum_at` in the payload)
/// filled in over the pseudo-header.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, hop_limit: u8, mut payload: Vec<u8>, csum_at: usize) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &len[..],
        &[0, 0, 0, next_header][..],
    ]
    .concat();
    let c = checksum(&[&pseudo, &payload]);
    payload[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[next_header, hop_limit]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&payload);
    ip
}

/// An Ethernet frame with an IPv6 UDP datagram.
pub fn udp6(dst_mac: Mac, src_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = ipv6(src, dst, 17, 64, udp_header(40000, dport, payload), 6);
    ether(dst_mac, src_mac, 0x86dd, &ip)
}

/// A gratuitous ARP reply, broadcast: "`claimed_ip` is at `claimed_mac`".
pub fn arp_claim(src_mac: Mac, claimed_mac: Mac, claimed_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 2];
    a.extend_from_slice(&claimed_mac);
    a.extend_from_slice(&claimed_ip.octets());
    a.extend_from_slice(&BROADCAST);
    a.extend_from_slice(&claimed_ip.octets());
    ether(BROADCAST, src_mac, 0x0806, &a)
}

/// An unsolicited neighbour advertisement (override) to all nodes: "`target` is at
/// `claimed_mac`", sent from `src`.
pub fn na_claim(src_mac: Mac, src: Ipv6Addr, target: Ipv6Addr, claimed_mac: Mac) -> Vec<u8> {
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&claimed_mac);
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("address");
    let ip = ipv6(src, all_nodes, 58, 255, icmp, 2);
    ether([0x33, 0x33, 0, 0, 0, 1], src_mac, 0x86dd, &ip)
}

/// Sends each frame `times` times on `ifname` inside the namespace at `netns`, through an
/// `AF_PACKET` socket, as a pod with CAP_NET_RAW can.
pub fn send_frames(netns: &Path, ifname: &str, frames: &[Vec<u8>], times: usize) {
    let ifname = ifname.to_string();
    let frames = frames.to_vec();
    trellis_net::netns::run_in(netns, move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            let name = std::ffi::CString::new(ifname.clone()).expect("ifname");
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index != 0, "no {ifname}");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = index as i32;
            sll.sll_halen = 6;
            for _ in 0..times {
                for f in &frames {
                    let sent = libc::sendto(
                        fd,
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
                }
            }
            libc::close(fd);
        }
    })
    .expect("enter the namespace");
}

/// A UDP socket bound inside a namespace; counts what arrives.
pub struct Receiver {
    socket: UdpSocket,
    pub port: u16,
}

impl Receiver {
    /// Bound to `[::]:port` (IPv4 too) inside the namespace at `netns`.
    pub fn bind(netns: &Path, port: u16) -> Receiver {
        let socket = trellis_net::netns::run_in(netns, move || {
            UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).expect("bind the receiver")
        })
        .expect("enter the namespace");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Receiver { socket, port }
    }

    /// The sources of the datagrams that arrive within `within` (after the last one, waits
    /// `within` more for stragglers).
    pub fn sources(&self, within: Duration) -> Vec<IpAddr> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        let mut deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok((_, from)) = self.socket.recv_from(&mut buf) {
                out.push(from.ip().to_canonical());
                deadline = Instant::now() + within;
            }
        }
        out
    }
}

/// The MAC of `ifname` inside `ns`.
pub fn mac_of(ns: &crate::Netns, ifname: &str) -> Mac {
    let text = ns.ip(&["-o", "link", "show", "dev", ifname]);
    let word = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC for {ifname}: {text}"));
    let mut mac = [0u8; 6];
    for (i, part) in word.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// The EUI-64 link-local address the kernel gives an interface with `mac` by default.
pub fn link_local(mac: Mac) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}
