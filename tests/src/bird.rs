//! The one BIRD launcher of the tests and benches: BIRD 2 in a namespace, its config, control
//! socket and log in a folder, killed on drop (pass or fail). `birdc` and a parsed view of its
//! routes for assertions.

use crate::Netns;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A BIRD process in a namespace, killed on drop.
pub struct Bird {
    child: Option<Child>,
    ns: String,
    pub conf: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Bird {
    /// BIRD in `ns` with `conf` written to `dir/NAME.conf`, its control socket at
    /// `dir/NAME.ctl` and its stderr (`log stderr all`) at `dir/NAME.log`; returns once it
    /// answers on the socket.
    pub fn start(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Bird {
        let mut b = Bird::launch(ns, dir, name, conf);
        b.wait_up();
        b
    }

    /// [`Bird::start`] without waiting for it (a bench timing BIRD's own start).
    pub fn launch(ns: &Netns, dir: &Path, name: &str, conf: &str) -> Bird {
        let conf_path = dir.join(format!("{name}.conf"));
        std::fs::write(&conf_path, conf).expect("write the BIRD config");
        let mut b = Bird {
            child: None,
            ns: ns.name.clone(),
            conf: conf_path,
            socket: dir.join(format!("{name}.ctl")),
            log: dir.join(format!("{name}.log")),
        };
        b.launch_process(false);
        b
    }

    /// `recovery`: `bird -R`, graceful-restart recovery (the R bit).
    pub fn spawn(&mut self, recovery: bool) {
        self.launch_process(recovery);
        self.wait_up();
    }

    /// Writes `conf` over its config and has it reload it (`birdc configure`).
    pub fn reconfigure(&self, conf: &str) -> String {
        std::fs::write(&self.conf, conf).expect("write the BIRD config");
        self.birdc(&["configure"])
    }

    fn launch_process(&mut self, recovery: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("bird log");
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "bird", "-f", "-c"])
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.socket)
            .arg("-P")
            .arg(self.socket.with_extension("pid"));
        if recovery {
            cmd.arg("-R");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run bird (Debian package bird2)");
        self.child = Some(child);
    }

    fn wait_up(&mut self) {
        let t = Instant::now();
        while !self.birdc(&["show", "status"]).contains("Daemon is up") {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("bird exited ({status}): {}", self.log_text());
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "bird did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (BIRD closes its sessions with a Cease) or SIGKILL (no goodbye); waits.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
            let _ = c.wait();
        }
    }

    pub fn birdc(&self, args: &[&str]) -> String {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// BIRD's routes: prefix → the lines describing it (`unicast [n0 ...] * (100) [i]`,
    /// `via 192.168.77.11 on ulbr0`).
    pub fn routes(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in self.birdc(&["show", "route", "all"]).lines() {
            if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('/') {
                let mut parts = line.split_whitespace();
                let prefix = parts.next().unwrap().to_string();
                out.insert(prefix.clone(), line.to_string());
                current = Some(prefix);
            } else if line.starts_with("Table ") || line.trim().is_empty() {
                current = None;
            } else if let Some(p) = &current {
                let e = out.get_mut(p).unwrap();
                e.push('\n');
                e.push_str(line.trim());
            }
        }
        out
    }

    /// How many routes BIRD's tables hold.
    pub fn count(&self) -> usize {
        self.birdc(&["show", "route", "count"])
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
            .sum()
    }

    /// Waits until BIRD's routes satisfy `ok`.
    pub async fn wait_routes(&self, within: Duration, what: &str, ok: impl Fn(&BTreeMap<String, String>) -> bool) {
        let t = Instant::now();
        loop {
            let r = self.routes();
            if ok(&r) {
                return;
            }
            assert!(
                t.elapsed() < within,
                "BIRD: {what}: not within {within:?}; its routes: {r:#?}\nprotocols:\n{}\nlog:\n{}",
                self.birdc(&["show", "protocols", "all"]),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether BIRD has `prefix` via `gateway` (`via 192.168.77.11`).
pub fn bird_has(routes: &BTreeMap<String, String>, prefix: &str, gateway: &str) -> bool {
    routes
        .get(prefix)
        .is_some_and(|r| r.contains(&format!("via {gateway} ")) || r.contains(&format!("via {gateway}\n")))
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop(true);
    }
}
