//! Running a CNI plugin binary as a container runtime does: `CNI_*` in the environment, the
//! config on stdin, a result or an error on stdout.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One invocation to make.
#[derive(Clone, Debug)]
pub struct CniCall {
    pub plugin: PathBuf,
    pub command: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
    pub cni_path: Vec<PathBuf>,
    pub args: Option<String>,
    pub config: Value,
    /// When set, the plugin runs as `ip netns exec NAME <plugin>`: inside a test's node namespace.
    pub exec_in_netns: Option<String>,
}

/// What the plugin printed and how it exited.
#[derive(Clone, Debug)]
pub struct CniOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniCall {
    pub fn new(plugin: impl Into<PathBuf>, command: &str, config: Value) -> CniCall {
        let plugin = plugin.into();
        let dir = plugin.parent().map(Path::to_path_buf).unwrap_or_default();
        CniCall {
            plugin,
            command: command.into(),
            container_id: String::new(),
            ifname: "eth0".into(),
            netns: None,
            cni_path: vec![dir, PathBuf::from(REFERENCE_PLUGINS)],
            args: None,
            config,
            exec_in_netns: None,
        }
    }

    pub fn container(mut self, id: &str) -> CniCall {
        self.container_id = id.into();
        self
    }

    pub fn ifname(mut self, ifname: &str) -> CniCall {
        self.ifname = ifname.into();
        self
    }

    pub fn netns(mut self, path: impl Into<PathBuf>) -> CniCall {
        self.netns = Some(path.into());
        self
    }

    pub fn command(mut self, c: &str) -> CniCall {
        self.command = c.into();
        self
    }

    /// Runs the plugin inside the named network namespace (`ip netns exec NAME <plugin>`).
    pub fn exec_in_netns(mut self, name: &str) -> CniCall {
        self.exec_in_netns = Some(name.into());
        self
    }

    /// Starts the plugin without waiting (for concurrency tests).
    pub fn spawn(&self) -> Child {
        let path = self
            .cni_path
            .iter()
            .map(|p| p.to_string_lossy())
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = match &self.exec_in_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.plugin);
                c
            }
            None => Command::new(&self.plugin),
        };
        cmd.env("CNI_COMMAND", &self.command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_IFNAME", &self.ifname)
            .env("CNI_PATH", path)
            .env("CNI_NETNS", self.netns.as_deref().unwrap_or(Path::new("")))
            .env("CNI_ARGS", self.args.as_deref().unwrap_or("IgnoreUnknown=1"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.plugin.display()));
        let body = serde_json::to_vec(&self.config).expect("JSON");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&body)
            .expect("write config");
        child
    }

    pub fn run(&self) -> CniOutput {
        CniOutput::from_child(self.spawn())
    }
}

impl CniOutput {
    pub fn from_child(child: Child) -> CniOutput {
        let out = child.wait_with_output().expect("wait for plugin");
        CniOutput {
            exit_code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin printed no JSON ({e}): {:?} stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }

    /// The result of a call that must have succeeded.
    pub fn ok(&self) -> Value {
        assert_eq!(self.exit_code, 0, "plugin failed: {} {}", self.stdout, self.stderr);
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// The CNI error code of a call that must have failed (non-zero exit, spec error object).
    pub fn err_code(&self) -> u64 {
        assert_ne!(
            self.exit_code, 0,
            "plugin succeeded but should have failed: {}",
            self.stdout
        );
        let v = self.json();
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {v}"
        );
        assert!(v["cniVersion"].is_string(), "error without cniVersion: {v}");
        v["code"].as_u64().unwrap_or_else(|| panic!("error without code: {v}"))
    }

    /// The addresses (without prefix) of a result.
    pub fn ips(&self) -> Vec<String> {
        self.ok()["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|ip| {
                        ip["address"]
                            .as_str()
                            .expect("address")
                            .split('/')
                            .next()
                            .unwrap()
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A reference plugin, with a clear message when the package is missing.
pub fn reference_plugin(name: &str) -> PathBuf {
    let p = Path::new(REFERENCE_PLUGINS).join(name);
    assert!(
        p.exists(),
        "{} is missing: apt-get install containernetworking-plugins (.ci/run does)",
        p.display()
    );
    p
}

/// Another binary of this workspace, next to `exe` in the target folder.
pub fn sibling_binary(exe: &str, name: &str) -> PathBuf {
    let p = Path::new(exe).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}
