//! The test harness every Trellis integration test uses: run as root, give every kernel object a
//! unique prefixed name, delete it when the test ends (pass or fail), and run plugin binaries the
//! way a container runtime does.
//!
//! - [`require_root`]: one clear failure when the tests are not run as root;
//! - [`names`]: unique names for namespaces and links;
//! - [`netns`]: a network namespace guard;
//! - [`tempdir`]: a temporary folder guard;
//! - [`cni`]: running a CNI plugin with `CNI_*` env and a config on stdin, and reading its output;
//! - [`kube_apiserver`]: a stand-in Kubernetes API server (HTTPS, Nodes, watches, faults) for
//!   the daemon's Kubernetes datastore, where no real one can run.

pub mod cluster;
pub mod cni;
pub mod kube_apiserver;
pub mod names;
pub mod netns;
pub mod tempdir;

pub use cni::{CniCall, CniOutput};
pub use names::unique_name;
pub use netns::Netns;
pub use tempdir::TempDir;

/// Fails the test with one clear message unless it runs as root (the tests create namespaces,
/// links and nftables rules; they never pass silently without the rights to do so).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "Trellis integration tests must run as root (they create network namespaces, links and \
         nftables rules). Run: sudo -E cargo test --workspace"
    );
}

/// Runs `cmd` (a shell line) and panics with its output if it fails. For test set-up only.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
