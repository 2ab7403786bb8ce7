//! The one etcd launcher of the tests, the benches and the lab: a single-member etcd, its data
//! kept across [`Etcd::restart`], killed when the guard drops (pass or fail).
//!
//! - [`Etcd::start`]: on free loopback ports in the caller's namespace (datastore tests);
//! - [`Etcd::start_in`]: on `IP:2379`/`2380` inside a namespace (a cluster's underlay).
//!
//! Both wait until etcd answers `GET /health` with `"health":"true"` (a leader elected), so
//! the first request of a test never races etcd's start.

use crate::{unique_name, Netns, TempDir};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    name: String,
    /// The namespace it runs in (`None`: the caller's) and the address it listens on.
    netns: Option<String>,
    ip: String,
    client_port: u16,
    peer_port: u16,
    /// Data in `dir/etcd`, log in `dir/etcd.log`.
    dir: PathBuf,
    child: Option<Child>,
    /// The temporary folder [`Etcd::start`] made (removed after etcd is killed).
    _tmp: Option<TempDir>,
}

/// A port free on 127.0.0.1 now (the kernel's choice; etcd binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

impl Etcd {
    /// etcd on free loopback ports, its data in a temporary folder; returns once it answers.
    pub fn start() -> Etcd {
        let tmp = TempDir::new("etcd");
        let mut etcd = Etcd {
            name: unique_name("etcd-"),
            netns: None,
            ip: "127.0.0.1".into(),
            client_port: free_port(),
            peer_port: free_port(),
            dir: tmp.path().to_path_buf(),
            child: None,
            _tmp: Some(tmp),
        };
        etcd.spawn();
        etcd
    }

    /// etcd inside `ns` on `ip` (ports 2379 and 2380), its data in `dir/etcd` and its log in
    /// `dir/etcd.log`; returns once it answers.
    pub fn start_in(ns: &Netns, ip: &str, dir: &Path) -> Etcd {
        let mut etcd = Etcd {
            name: "trellis".into(),
            netns: Some(ns.name.clone()),
            ip: ip.into(),
            client_port: 2379,
            peer_port: 2380,
            dir: dir.to_path_buf(),
            child: None,
            _tmp: None,
        };
        etcd.spawn();
        etcd
    }

    /// `http://IP:PORT`, for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.ip, self.client_port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Err(e) = c.kill() {
                eprintln!("killing etcd: {e}");
            }
            if let Err(e) = c.wait() {
                eprintln!("reaping etcd: {e}");
            }
        }
    }

    /// Starts it again (killing it first if it runs): same name, data and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Its process ID while it runs (to SIGSTOP it, say).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `GET /health` (from inside etcd's namespace) until it says healthy.
    fn wait_ready(&mut self) {
        let addr: SocketAddr = format!("{}:{}", self.ip, self.client_port).parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let healthy = match &self.netns {
                Some(ns) => {
                    trellis_net::netns::run_in(&PathBuf::from("/run/netns").join(ns), || health(addr)).unwrap_or(false)
                }
                None => health(addr),
            };
            if healthy {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd exited ({status}):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not answer on {} within 20 s", self.endpoint());
    }
}

/// Whether etcd at `addr` answers `/health` with a leader.
fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    (body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200")) && body.contains("\"true\"")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
