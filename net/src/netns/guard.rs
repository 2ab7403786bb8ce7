//! Named network namespaces, made and removed the way `ip netns add/del` does, without forking.
//!
//! A named namespace is a bind mount of a namespace file onto `/run/netns/NAME`: the mount keeps
//! the namespace alive after the thread that created it has gone. `/run/netns` is made a
//! shared mount (as iproute2 does) so that the names are seen by other mount namespaces.
//!
//! [`NetnsGuard`] is for tests (ours and other crates'): it creates a uniquely named namespace and
//! deletes it on drop, also when the test panics.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::THREAD_NETNS;
use crate::NetError;

/// Where named network namespaces live (the iproute2 convention).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace that is deleted when the guard is dropped.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
    path: PathBuf,
}

impl NetnsGuard {
    /// Create `/run/netns/{prefix}-{pid}-{n}`, unique within this machine.
    pub fn create(prefix: &str) -> Result<Self, NetError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let path = create_named(&name)?;
        Ok(Self { name, path })
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = delete_named(&self.name) {
            eprintln!("trellis-net: leaving network namespace {} behind: {e}", self.name);
        }
    }
}

/// Create the named namespace `/run/netns/NAME` (like `ip netns add NAME`) and return its path.
pub fn create_named(name: &str) -> Result<PathBuf, NetError> {
    let path = ns_path(name)?;
    ensure_run_dir()?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| NetError::io(format!("creating network namespace file {}", path.display()), e))?;
    if let Err(e) = bind_new_netns(&path) {
        // Best effort: the file is ours and useless without the mount.
        if let Err(rm) = fs::remove_file(&path) {
            eprintln!("trellis-net: could not remove {}: {rm}", path.display());
        }
        return Err(e);
    }
    Ok(path)
}

/// Delete the named namespace (like `ip netns del NAME`); a missing one is success.
///
/// The kernel destroys the namespace, and the links in it, once nothing else holds it
/// (a process inside it, an open fd, a netlink socket created in it).
pub fn delete_named(name: &str) -> Result<(), NetError> {
    let path = ns_path(name)?;
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetError::errno_io(
                format!("unmounting network namespace {}", path.display()),
                e,
            ))
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io(
            format!("removing network namespace {}", path.display()),
            e,
        )),
    }
}

fn ns_path(name: &str) -> Result<PathBuf, NetError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(NetError::InvalidArgument(format!(
            "bad network namespace name {name:?}"
        )));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

/// A throw-away thread unshares a new network namespace and bind-mounts its own namespace file
/// onto `path`; the mount keeps the namespace alive after the thread exits.
fn bind_new_netns(path: &Path) -> Result<(), NetError> {
    let what = format!("creating network namespace {}", path.display());
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), NetError> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| NetError::errno_io(&what, e))?;
                mount(Some(THREAD_NETNS), path, Some("none"), MsFlags::MS_BIND, None::<&str>)
                    .map_err(|e| NetError::errno_io(&what, e))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetError::Panicked {
                    what: what.clone(),
                    message: "in unshare/mount".into(),
                })
            })
    })
}

/// `mkdir -p /run/netns` and make it a shared mount point, once per process, like iproute2:
/// if it is not a mount point yet (EINVAL), bind-mount it onto itself first.
fn ensure_run_dir() -> Result<(), NetError> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if *done {
        return Ok(());
    }
    let what = format!("preparing {NETNS_RUN_DIR}");
    fs::create_dir_all(NETNS_RUN_DIR).map_err(|e| NetError::io(&what, e))?;
    let mut made_mount = false;
    loop {
        let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
        match mount(Some(""), NETNS_RUN_DIR, Some("none"), shared, None::<&str>) {
            Ok(()) => break,
            Err(Errno::EINVAL) if !made_mount => {
                let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
                mount(Some(NETNS_RUN_DIR), NETNS_RUN_DIR, Some("none"), bind, None::<&str>)
                    .map_err(|e| NetError::errno_io(&what, e))?;
                made_mount = true;
            }
            Err(e) => return Err(NetError::errno_io(&what, e)),
        }
    }
    *done = true;
    Ok(())
}
