//! The one etcd launcher of the tests, the benches and the lab: a single-member etcd, its data
//! kept across [`Etcd::restart`], killed when the guard drops (pass or fail).
//!
//! - [`Etcd::start`]: on free loopback ports in the caller's namespace (datastore tests);
//! - [`Etcd::start_in`]: on `IP:2379`/`2380` inside a namespace (a cluster's underlay).
//!
//! Both wait until etcd answers `GET /health` with `"health":"true"` (a leader elected), so
//! the first request of a test never races etcd's start.
//!
//! [`Etcd::start_secured`]: on loopback with TLS (a CA, serving and client certificates made
//! per server with rcgen, client certificates required) and/or authentication (a `root` user
//! with [`ROOT_PASSWORD`], `auth enable`), as a production etcd runs.

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
    /// TLS: the certificates, and the plain-HTTP port etcd answers `/health` on.
    tls: Option<(Pki, u16)>,
}

/// How [`Etcd::start_secured`] protects etcd.
#[derive(Clone, Copy, Debug, Default)]
pub struct Security {
    /// Clients speak TLS and must present a certificate signed by the server's CA.
    pub tls: bool,
    /// Authentication on, with a `root` user whose password is [`ROOT_PASSWORD`].
    pub auth: bool,
}

pub const ROOT_PASSWORD: &str = "trellis-test-root-password";

/// A CA and what it signed, as PEM files in one folder: etcd's serving certificate (for
/// 127.0.0.1) and a client certificate.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// A fresh CA (its name unique, so that another `Pki`'s CA is an unknown issuer) and the
    /// certificates, written under `dir`.
    pub fn generate(dir: &Path) -> Pki {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let ca = crate::kube_apiserver::tls::new_ca(&unique_name("trellis test etcd CA "));
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write a PEM file");
            path
        };
        let issue = |cn: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(names).expect("certificate parameters");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &ca).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let (server_cert, server_key) = issue("etcd", names, ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = issue("trellisd", vec![], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        }
    }
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
        Etcd::start_secured(Security::default())
    }

    /// etcd on free loopback ports protected as `security` says; returns once it answers.
    pub fn start_secured(security: Security) -> Etcd {
        let tmp = TempDir::new("etcd");
        let tls = security.tls.then(|| (Pki::generate(tmp.path()), free_port()));
        let mut etcd = Etcd {
            name: unique_name("etcd-"),
            netns: None,
            ip: "127.0.0.1".into(),
            client_port: free_port(),
            peer_port: free_port(),
            dir: tmp.path().to_path_buf(),
            child: None,
            _tmp: Some(tmp),
            tls,
        };
        etcd.spawn();
        if security.auth {
            etcd.enable_auth();
        }
        etcd
    }

    /// The certificates of a TLS etcd.
    pub fn pki(&self) -> Option<&Pki> {
        self.tls.as_ref().map(|(pki, _)| pki)
    }

    /// `etcdctl` as root (with the client certificate if TLS): its output, or a panic naming
    /// the command.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").args(["--endpoints", &self.endpoint()]);
        if let Some(pki) = self.pki() {
            cmd.arg("--cacert").arg(&pki.ca);
            cmd.arg("--cert").arg(&pki.client_cert);
            cmd.arg("--key").arg(&pki.client_key);
        }
        let out = cmd.args(args).output().expect("run etcdctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "etcdctl {args:?}: {text}");
        text
    }

    /// A `root` user with [`ROOT_PASSWORD`] and the root role, then `auth enable`.
    fn enable_auth(&self) {
        self.etcdctl(&["role", "add", "root"]);
        self.etcdctl(&["user", "add", &format!("root:{ROOT_PASSWORD}")]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        self.etcdctl(&["auth", "enable"]);
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
            tls: None,
        };
        etcd.spawn();
        etcd
    }

    /// `http://IP:PORT` (`https://` with TLS), for `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
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
        if let Some((pki, health_port)) = &self.tls {
            cmd.arg("--cert-file").arg(&pki.server_cert);
            cmd.arg("--key-file").arg(&pki.server_key);
            cmd.arg("--trusted-ca-file").arg(&pki.ca);
            cmd.arg("--client-cert-auth");
            // /health in plain HTTP, for wait_ready.
            cmd.args(["--listen-metrics-urls", &format!("http://{}:{health_port}", self.ip)]);
        }
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
        let port = self.tls.as_ref().map_or(self.client_port, |(_, health)| *health);
        let addr: SocketAddr = format!("{}:{port}", self.ip).parse().expect("address");
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
