//! Sockets and bytes: the listening socket, outgoing connections, and one task per connection
//! that frames what it reads into messages and writes what the peer task queues.
//!
//! Sockets are created in the speaker's network namespace (by a short-lived thread that has
//! entered it, see `trellis_net::netns`), so one process can run speakers for several
//! namespaces (the tests do); the caller's threads never change namespace.

use super::wire::{decode_header, Notification, HEADER_LEN};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a write may block before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After our last message (a NOTIFICATION, usually), how long we read on before closing, so that
/// unread bytes do not turn the close into a reset that loses that message.
const LINGER: Duration = Duration::from_secs(1);

/// Aborts the task when dropped.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn socket(netns: Option<&File>, v6: bool) -> io::Result<TcpSocket> {
    let make = move || if v6 { TcpSocket::new_v6() } else { TcpSocket::new_v4() };
    match netns {
        None => make(),
        Some(ns) => trellis_net::netns::run_in_fd(ns.as_fd(), make).map_err(io::Error::other)?,
    }
}

/// The listening sockets (SO_REUSEADDR, so a restarted speaker binds at once). A specific
/// address gets one socket; an unspecified one (`0.0.0.0` or `::`) gets two, one per family, on
/// the same port: `0.0.0.0` and `[::]` with `IPV6_V6ONLY`.
///
/// Two sockets rather than one dual-stack `[::]` socket: what the socket accepts does not depend
/// on the host's `net.ipv6.bindv6only`, IPv4 peers arrive as IPv4 addresses (not `::ffff:a.b.c.d`),
/// per-peer socket options (TCP MD5 keys) are set in the peer's own family, and a host without
/// IPv6 (`ipv6.disable=1`) still gets its IPv4 listener: the IPv6 one is then skipped, logged.
pub fn listen(netns: Option<&File>, addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
    if !addr.ip().is_unspecified() {
        return Ok(vec![listen_one(netns, addr)?]);
    }
    let v4 = listen_one(netns, SocketAddr::from(([0, 0, 0, 0], addr.port())))?;
    // Port 0 (tests): the IPv6 socket takes the port the IPv4 one got.
    let port = v4.local_addr()?.port();
    match listen_one(netns, SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))) {
        Ok(v6) => Ok(vec![v4, v6]),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)) => {
            tracing::warn!(error = %e, "no IPv6 on this host: BGP listens on IPv4 only");
            Ok(vec![v4])
        }
        Err(e) => Err(e),
    }
}

fn listen_one(netns: Option<&File>, addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket(netns, addr.is_ipv6())?;
    s.set_reuseaddr(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        set_int_opt(&s, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    s.bind(addr)?;
    s.listen(64)
}

/// The kernel's `struct tcp_md5sig` (linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_KEY_MAX],
}

/// The longest TCP MD5 key the kernel takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_KEY_MAX: usize = 80;

/// TCP MD5 signatures (RFC 2385) with `peer` on socket `s`: segments to and from `peer` are
/// signed with `key`, and the kernel drops those from it that are not (silently: nothing reaches
/// us). On a listening socket the key goes to the connections it accepts from `peer`. An empty
/// key removes `peer`'s. `peer` must be of the socket's family.
pub fn set_md5(s: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MD5_KEY_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TCP MD5 key of {} bytes: at most {MD5_KEY_MAX}", key.len()),
        ));
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut sig.addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
        }
        IpAddr::V6(ip) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut sig.addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = ip.octets();
        }
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: a valid descriptor, and a pointer to a struct of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_int_opt(s: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid descriptor, and a pointer to an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A connection to `peer`, from `source` when given (same family), signed with TCP MD5 key
/// `md5` when given.
pub async fn connect(
    netns: Option<&File>,
    peer: SocketAddr,
    source: Option<IpAddr>,
    md5: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = socket(netns, peer.is_ipv6())?;
    if let Some(key) = md5 {
        set_md5(&s, peer.ip(), key)?;
    }
    if let Some(ip) = source.filter(|ip| ip.is_ipv6() == peer.is_ipv6() && !ip.is_unspecified()) {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, s.connect(peer))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// What a connection task reports.
#[derive(Debug)]
pub enum IoEvent {
    /// A message whose header was valid: type and body.
    Frame(u8, Vec<u8>),
    /// The stream cannot be framed; nothing more is read.
    Malformed(Notification),
    /// The connection closed or failed; nothing more is read.
    Closed(String),
}

/// The peer task's end of a connection. Dropping it closes the connection once everything
/// queued is written.
pub struct ConnHandle {
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl ConnHandle {
    pub fn send(&self, bytes: Vec<u8>) {
        // Fails only when the task has ended, which it has reported as Closed.
        let _ = self.tx.send(bytes);
    }
}

/// Starts the task of a connection: events go to `events` tagged with `id`.
pub fn spawn_conn<E: Send + 'static>(
    stream: TcpStream,
    events: mpsc::UnboundedSender<E>,
    tag: impl Fn(IoEvent) -> E + Send + 'static,
) -> ConnHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(conn_task(stream, rx, move |ev| {
        let _ = events.send(tag(ev));
    }));
    ConnHandle { tx }
}

async fn conn_task(mut stream: TcpStream, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, report: impl Fn(IoEvent)) {
    let (mut rd, mut wr) = stream.split();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut reading = true;
    loop {
        tokio::select! {
            r = rd.read(&mut chunk), if reading => match r {
                Ok(0) => {
                    reading = false;
                    report(IoEvent::Closed("closed by the peer".into()));
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if let Err(e) = frames(&mut buf, &report) {
                        reading = false;
                        report(IoEvent::Malformed(e));
                    }
                }
                Err(e) => {
                    reading = false;
                    report(IoEvent::Closed(e.to_string()));
                }
            },
            out = rx.recv() => match out {
                Some(mut bytes) => {
                    while let Ok(more) = rx.try_recv() {
                        bytes.extend_from_slice(&more);
                        if bytes.len() > 256 * 1024 {
                            break;
                        }
                    }
                    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            report(IoEvent::Closed(format!("write: {e}")));
                            return;
                        }
                        Err(_) => {
                            report(IoEvent::Closed("write timed out".into()));
                            return;
                        }
                    }
                }
                // The peer task let go: everything it queued is written.
                None => break,
            },
        }
    }
    let _ = tokio::time::timeout(LINGER, async {
        let _ = wr.shutdown().await;
        while let Ok(n) = rd.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reports every complete message in `buf` and keeps the rest.
fn frames(buf: &mut Vec<u8>, report: &impl Fn(IoEvent)) -> Result<(), Notification> {
    let mut at = 0;
    let result = loop {
        let rest = &buf[at..];
        if rest.len() < HEADER_LEN {
            break Ok(());
        }
        let header: &[u8; HEADER_LEN] = rest[..HEADER_LEN].try_into().expect("length checked");
        let (ty, body_len) = match decode_header(header) {
            Ok(h) => h,
            Err(e) => break Err(e),
        };
        if rest.len() < HEADER_LEN + body_len {
            break Ok(());
        }
        report(IoEvent::Frame(ty, rest[HEADER_LEN..HEADER_LEN + body_len].to_vec()));
        at += HEADER_LEN + body_len;
    };
    buf.drain(..at);
    result
}

#[cfg(test)]
mod tests {
    use super::super::wire::{err, Message};
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn framing_across_reads() {
        let mut stream = Message::Keepalive.encode(true);
        stream.extend(Message::RouteRefresh(1, 1).encode(true));
        let got = RefCell::new(Vec::new());
        let report = |e: IoEvent| got.borrow_mut().push(format!("{e:?}"));
        let mut buf = Vec::new();
        for b in &stream[..25] {
            buf.push(*b);
            frames(&mut buf, &report).unwrap();
        }
        assert_eq!(got.borrow().len(), 1);
        buf.extend_from_slice(&stream[25..]);
        frames(&mut buf, &report).unwrap();
        assert!(buf.is_empty());
        assert_eq!(got.borrow().len(), 2);
        buf.extend_from_slice(&[0u8; 19]);
        assert_eq!(
            frames(&mut buf, &report).unwrap_err().subcode,
            err::HEADER_NOT_SYNCHRONIZED
        );
    }
}
