//! Stalling a plugin's child on purpose, for the tests of what happens when a runtime kills the
//! plugin mid-ADD: the child (the IPAM plugin) is caught waiting for the address store's lock,
//! stopped there, and resumed only after the runtime's DEL has run.
//!
//! Why stop it instead of only holding the lock: `flock` does not queue waiters in order, so a
//! child merely waiting on the lock may win it before or after DEL's own IPAM call, at random.
//! Stopped with `SIGSTOP` and resumed after DEL, the child always comes second: the ordering
//! that leaks an address when a killed plugin's child outlives it. Its process is held by a
//! pidfd, so a signal never reaches a recycled PID.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a step may take before the test fails (the machine may be busy).
const PATIENCE: Duration = Duration::from_secs(30);

/// The direct children of `pid` (every thread's).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The process's name (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Whether `pid` is blocked waiting for a file lock (a `->` line of `/proc/locks`).
pub fn waits_for_a_lock(pid: u32) -> bool {
    std::fs::read_to_string("/proc/locks").is_ok_and(|locks| {
        locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&"->") && f.get(5) == Some(&pid.to_string().as_str())
        })
    })
}

/// The process state letter of `/proc/PID/stat` (`T` stopped, `Z` zombie).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name field is in parentheses and may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls `cond` until it holds; panics with `what` after [`PATIENCE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A process held by a pidfd.
pub struct Pidfd {
    pub pid: u32,
    fd: OwnedFd,
}

impl Pidfd {
    /// Opens a pidfd on a process that must exist now.
    pub fn open(pid: u32) -> Pidfd {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open {pid}: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Pidfd { pid, fd }
    }

    /// Sends `signal`; false when the process has already exited.
    pub fn signal(&self, signal: i32) -> bool {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r == 0 {
            return true;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH), "signalling {}: {e}", self.pid);
        false
    }

    /// Whether the process has exited (a zombie counts: it can do nothing any more).
    pub fn exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    /// Waits for the process to exit; panics after [`PATIENCE`].
    pub fn wait_exited(&self) {
        wait_until(&format!("process {} exits", self.pid), || self.exited());
    }
}

/// An exclusive `flock` on a lock file, as the IPAM store's users take it: taken before the
/// plugin starts, so that its child cannot get past the lock before it is caught there.
pub struct HeldLock {
    file: File,
    path: std::path::PathBuf,
}

impl HeldLock {
    pub fn take(lock: &Path) -> HeldLock {
        if let Some(dir) = lock.parent() {
            std::fs::create_dir_all(dir).expect("create the lock's folder");
        }
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock)
            .expect("open the lock file");
        file.lock().expect("take the lock");
        HeldLock {
            file,
            path: lock.to_path_buf(),
        }
    }

    /// Waits for the child named `name` of process `parent` to block on the lock, stops that
    /// child with `SIGSTOP`, then lets go of the lock. The child stays stopped until
    /// [`Stalled::resume`].
    pub fn stall_child(self, parent: u32, name: &str) -> Stalled {
        let mut pid = 0;
        wait_until(&format!("{parent} starts {name}"), || {
            match children(parent).into_iter().find(|&c| comm(c).as_deref() == Some(name)) {
                Some(c) => {
                    pid = c;
                    true
                }
                None => false,
            }
        });
        let child = Pidfd::open(pid);
        wait_until(&format!("{name} ({pid}) waits for {}", self.path.display()), || {
            waits_for_a_lock(pid)
        });
        assert!(
            child.signal(libc::SIGSTOP),
            "{name} ({pid}) exited while waiting for the lock"
        );
        wait_until(&format!("{name} ({pid}) stops"), || state(pid) == Some('T'));
        drop(self.file);
        Stalled { child }
    }
}

/// A child stopped before it could take a lock: see the module notes.
pub struct Stalled {
    pub child: Pidfd,
}

impl Stalled {
    /// Lets the child go on (if it still lives) and waits for it to exit.
    pub fn resume(self) {
        self.child.signal(libc::SIGCONT);
        self.child.wait_exited();
    }
}
