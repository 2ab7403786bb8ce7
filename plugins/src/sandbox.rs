//! The pod's network namespace as the runtime names it (`CNI_NETNS`), checked before anything is
//! reserved or wired, so that a wrong one is the runtime's error to fix (code 4) and leaves
//! nothing behind:
//!
//! - it must open, and be a namespace file (on `nsfs`), not a regular file or a folder that the
//!   kernel would only refuse later, at `setns`, as an opaque `EINVAL`;
//! - of the network kind (`NS_GET_NSTYPE`), not, say, `/proc/PID/ns/mnt`;
//! - and not the namespace the plugin itself runs in, the node's: the plugin would wire the
//!   "pod" end into the node, replacing the node's default route with one via the pod gateway,
//!   and DEL would then delete that route, leaving the node with none. Two paths name the same
//!   namespace when they have the same device and inode (`/proc/self/ns/net` is ours).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use trellis_cni::{code, CniError};

/// How the runtime names a pod's namespace, for the messages.
const WHAT_IT_SHOULD_BE: &str =
    "CNI_NETNS must name the pod's network namespace, like /var/run/netns/NAME or /proc/PID/ns/net";

fn invalid(path: &Path, msg: &str, details: String) -> CniError {
    CniError::new(code::INVALID_ENV, format!("CNI_NETNS {} {msg}", path.display())).with_details(details)
}

/// Checks `CNI_NETNS` (see the module notes).
pub fn check(path: &Path) -> Result<(), CniError> {
    let ns = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(
                path,
                "does not exist",
                "the runtime must create the pod's network namespace before ADD".into(),
            ))
        }
        Err(e) => return Err(invalid(path, "cannot be opened", format!("{e}; {WHAT_IT_SHOULD_BE}"))),
    };
    let meta = ns
        .metadata()
        .map_err(|e| invalid(path, "cannot be read", e.to_string()))?;
    // SAFETY: a zeroed statfs is a valid out buffer for fstatfs on an open fd.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let on_nsfs = unsafe { libc::fstatfs(ns.as_raw_fd(), &mut fs) } == 0 && fs.f_type == libc::NSFS_MAGIC;
    if !on_nsfs {
        let kind = if meta.is_dir() {
            "a folder"
        } else if meta.is_file() {
            "a regular file"
        } else {
            "not a namespace file"
        };
        return Err(invalid(
            path,
            "is not a network namespace",
            format!("it is {kind}; {WHAT_IT_SHOULD_BE}"),
        ));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the namespace's CLONE_NEW* type (or
    // -1 on kernels before 4.11, where the setns of ADD still refuses another kind).
    let kind = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind >= 0 && kind != libc::CLONE_NEWNET {
        return Err(invalid(
            path,
            "is not a network namespace",
            format!("it is a namespace of another kind; {WHAT_IT_SHOULD_BE}"),
        ));
    }
    let own = std::fs::metadata("/proc/self/ns/net")
        .map_err(|e| CniError::io("reading the plugin's own network namespace", &e))?;
    if (own.dev(), own.ino()) == (meta.dev(), meta.ino()) {
        return Err(invalid(
            path,
            "is the plugin's own network namespace, the node's",
            "wiring it as a pod would replace the node's default route (and DEL would remove it); \
             the runtime must pass the pod's own namespace (a hostNetwork pod needs no CNI ADD)"
                .into(),
        ));
    }
    Ok(())
}
