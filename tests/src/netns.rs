//! The tests' network namespace guard: a uniquely named namespace, deleted when the guard drops,
//! also when the test panics. It is the one guard of the test harness, the benches and the lab;
//! it makes and removes namespaces with `trellis_net::netns` (a bind mount on
//! `/run/netns/NAME`, as `ip netns add` does, without forking), so `ip netns exec NAME` and
//! `ip -n NAME` work on it as on any named namespace.

use crate::names::unique_name;
use std::path::{Path, PathBuf};
use std::process::Command;
use trellis_net::netns::{create_named, delete_named};

#[derive(Debug)]
pub struct Netns {
    pub name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `/run/netns/<prefix><unique>` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        Netns::named(unique_name(prefix))
    }

    /// Creates `/run/netns/NAME` with loopback up; for names that must be known outside this
    /// process (the lab's). Fails if it exists.
    pub fn named(name: String) -> Netns {
        if let Err(e) = create_named(&name) {
            panic!("creating network namespace {name}: {e}");
        }
        let path = PathBuf::from("/run/netns").join(&name);
        let ns = Netns { name, path };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs a command inside the namespace and returns its stdout; panics if it fails.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "in {}: {argv:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n NAME ARGS...`; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        crate::run("ip", &[&["-n", &self.name], args].concat())
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward=1`).
    pub fn sysctl(&self, setting: &str) {
        self.exec_ok(&["sysctl", "-qw", setting]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete_named(&self.name) {
            eprintln!("trellis-tests: leaving network namespace {} behind: {e}", self.name);
        }
    }
}
