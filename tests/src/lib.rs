//! The test harness every Trellis integration test uses: run as root, give every kernel object a
//! unique prefixed name, delete it when the test ends (pass or fail), and run plugin binaries the
//! way a container runtime does.
//!
//! - [`require_root`]: one clear failure when the tests are not run as root;
//! - [`names`]: unique names for namespaces and links;
//! - [`netns`]: the network namespace guard;
//! - [`topology`]: the one test topology: an underlay bridge and node namespaces on it (the
//!   daemon's tests, the benches, [`cluster`] and `./lab` all build on it);
//! - [`forge`]: forged frames from a hostile pod (`AF_PACKET`) and a counting receiver;
//! - [`etcd`]: the one etcd launcher; [`bird`]: the one BIRD launcher;
//! - [`cluster`]: a whole cluster on a topology: etcd or the stand-in API server, `trellisd` on
//!   every node, pods wired by the plugin;
//! - [`tempdir`]: a temporary folder guard;
//! - [`process`]: a plugin's child caught and stopped at a lock, to play a runtime killing the
//!   plugin mid-ADD;
//! - [`cni`]: running a CNI plugin with `CNI_*` env and a config on stdin, and reading its output;
//! - [`kube_apiserver`]: a stand-in Kubernetes API server (HTTPS, Nodes, watches, faults) for
//!   the daemon's Kubernetes datastore, where no real one can run.

pub mod bird;
pub mod cluster;
pub mod cni;
pub mod etcd;
pub mod forge;
pub mod kube_apiserver;
pub mod names;
pub mod netns;
pub mod probe;
pub mod process;
pub mod tempdir;
pub mod topology;

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

/// SIGTERM and SIGINT, for the harness's long-running binaries (`trellis-lab`,
/// `trellis-kube-apiserver`): [`Signals::block`] before any thread starts (threads started after
/// inherit the mask; children do not, `std::process::Command` resets it), then
/// [`Signals::wait`].
pub struct Signals(libc::sigset_t);

impl Signals {
    pub fn block() -> Signals {
        // SAFETY: plain signal-set manipulation on a local set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Signals(set)
        }
    }

    /// Blocks until one arrives; returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: an initialized signal set and a valid out pointer.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }
}

/// Runs a program and returns its stdout; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
