//! Servers and connection probes between pod namespaces: for tests that ask "does a new
//! connection from here to there get through?" (NetworkPolicy's reachability matrices).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a probe waits for an answer. Only blocked probes wait it out (run them in
/// parallel); an allowed one answers in microseconds, so it is generous for a loaded machine.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// A pod's servers: TCP (answering one byte) and UDP (echo) on each port, both families;
/// stopped and joined on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &Path, ports: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in ports.iter().copied() {
            let (tcp, udp) = trellis_net::netns::run_in(ns, || {
                let any = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
                (
                    TcpListener::bind(any).expect("TCP listener"),
                    UdpSocket::bind(any).expect("UDP socket"),
                )
            })
            .expect("enter the pod's namespace");
            tcp.set_nonblocking(true).expect("nonblocking");
            udp.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
            let s = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.write_all(b"k");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
            let s = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            }));
        }
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Whether a new connection from the namespace at `from` to `to` gets an answer within
/// [`PROBE_TIMEOUT`].
pub fn probe(from: &Path, to: SocketAddr, transport: Transport) -> bool {
    trellis_net::netns::run_in(from, || match transport {
        Transport::Tcp => TcpStream::connect_timeout(&to, PROBE_TIMEOUT)
            .and_then(|mut c| {
                c.set_read_timeout(Some(PROBE_TIMEOUT))?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b)
            })
            .is_ok(),
        Transport::Udp => {
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(any).expect("UDP socket");
            s.set_read_timeout(Some(PROBE_TIMEOUT)).expect("timeout");
            s.send_to(b"ping", to).is_ok() && s.recv_from(&mut [0u8; 16]).is_ok()
        }
    })
    .expect("enter the prober's namespace")
}
