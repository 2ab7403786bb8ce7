//! Network namespaces: run code inside one without ever moving the caller.
//!
//! Why a fresh thread: `setns(CLONE_NEWNET)` changes the namespace of the *calling thread* only.
//! Switching the caller and switching back is fragile (a panic or an early `?` leaves a tokio
//! worker thread in a pod's namespace for good). [`run_in`] instead spawns a thread, enters the
//! namespace there, runs the closure and lets the thread die, so no thread is ever left behind
//! in the wrong namespace. A panic in the closure becomes [`NetError::Panicked`].
//!
//! Things that are bound to the namespace they were *created* in (netlink sockets, sysctl
//! files opened under `/proc/sys/net`) can be created inside [`run_in`] and used afterwards
//! from any thread.

mod guard;

use std::any::Any;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

pub use guard::{create_named, delete_named, NetnsGuard, NETNS_RUN_DIR};

use crate::NetError;

/// The network namespace file of the calling thread (not `/proc/self`, which is the main thread).
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A network namespace given by path (`/run/netns/NAME`, `/proc/PID/ns/net`) or by open fd.
#[derive(Debug, Clone, Copy)]
pub enum NetnsRef<'a> {
    /// A namespace file.
    Path(&'a Path),
    /// An open namespace file descriptor.
    Fd(BorrowedFd<'a>),
}

impl<'a> From<&'a Path> for NetnsRef<'a> {
    fn from(p: &'a Path) -> Self {
        Self::Path(p)
    }
}

impl<'a> From<BorrowedFd<'a>> for NetnsRef<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        Self::Fd(fd)
    }
}

impl<'a> NetnsRef<'a> {
    /// An fd for the namespace, opening the path if needed; keep it alive while the fd is used.
    pub(crate) fn open(&self) -> Result<OpenNetns<'a>, NetError> {
        match self {
            Self::Fd(fd) => Ok(OpenNetns::Borrowed(*fd)),
            Self::Path(p) => open_ns(p).map(OpenNetns::Owned),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Fd(fd) => format!("fd {}", fd.as_raw_fd()),
        }
    }
}

/// A namespace fd that is either ours (opened from a path) or the caller's.
pub(crate) enum OpenNetns<'a> {
    Owned(File),
    Borrowed(BorrowedFd<'a>),
}

impl OpenNetns<'_> {
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Self::Owned(file) => file.as_raw_fd(),
            Self::Borrowed(fd) => fd.as_raw_fd(),
        }
    }
}

fn open_ns(path: &Path) -> Result<File, NetError> {
    File::open(path).map_err(|e| NetError::io(format!("opening network namespace {}", path.display()), e))
}

/// Run `f` on a fresh OS thread that has entered the network namespace at `ns`; the caller's
/// thread never changes namespace. Returns what `f` returns, or an error if the namespace
/// cannot be entered or `f` panics.
///
/// Note: with `panic = "abort"` (the workspace's release profile) a panic still aborts.
pub fn run_in<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    let file = open_ns(ns)?;
    spawn_in(file.as_fd(), &ns.display().to_string(), f)
}

/// Like [`run_in`], with the namespace given by an open file descriptor.
pub fn run_in_fd<T: Send>(ns: BorrowedFd<'_>, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    spawn_in(ns, &format!("fd {}", ns.as_raw_fd()), f)
}

fn spawn_in<T: Send>(ns: BorrowedFd<'_>, label: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    // Why: entering a namespace needs CAP_SYS_ADMIN, even the one the thread is already in. A
    // DaemonSet pod on the host network with only NET_ADMIN (trellisd's manifest) opens its
    // sockets in its own namespace: that must not need setns at all.
    if is_thread_netns(ns) {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("trellis-netns".into())
            .spawn_scoped(scope, move || {
                setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    let what = if e == nix::errno::Errno::EPERM {
                        format!("entering network namespace {label} (needs CAP_SYS_ADMIN)")
                    } else {
                        format!("entering network namespace {label}")
                    };
                    NetError::errno_io(what, e)
                })?;
                Ok(f())
            })
            .map_err(|e| NetError::io("spawning a thread to enter a network namespace", e))?;
        thread.join().unwrap_or_else(|payload| {
            Err(NetError::Panicked {
                what: format!("running in network namespace {label}"),
                message: panic_message(payload.as_ref()),
            })
        })
    })
}

/// Whether `ns` is the calling thread's own network namespace (same device and inode).
fn is_thread_netns(ns: BorrowedFd<'_>) -> bool {
    let Ok(own) = std::fs::metadata(THREAD_NETNS) else {
        return false;
    };
    let Ok(other) = nix::sys::stat::fstat(ns) else {
        return false;
    };
    own.dev() == other.st_dev && own.ino() == other.st_ino
}

/// An identity for the namespace at `path` (its inode number): two paths name the same
/// namespace when their ids are equal. `netns_id(THREAD_NETNS)` is the calling thread's one.
pub fn netns_id(path: &Path) -> Result<u64, NetError> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|e| NetError::io(format!("reading network namespace {}", path.display()), e))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
