//! A real etcd server for a test: one member on free loopback ports, its data in a temporary
//! folder, killed when the guard drops (pass or fail).

use etcd_client::Client;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use trellis_tests::{unique_name, TempDir};

pub struct EtcdServer {
    name: String,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A port free on 127.0.0.1 now (the kernel's choice; etcd binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

impl EtcdServer {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> EtcdServer {
        let mut s = EtcdServer {
            name: unique_name("etcd-"),
            dir: TempDir::new("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        s.spawn().await;
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub async fn client(&self) -> Client {
        Client::connect([self.endpoint()], None).await.expect("etcd client")
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

    /// Starts the killed server again: same name, data and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
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
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let client = self.client().await;
        for _ in 0..100 {
            let mut c = client.clone();
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), c.get("ready", None)).await {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited ({status}):\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not answer on {} within the time allowed", self.endpoint());
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
