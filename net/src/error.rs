//! One error type for the whole crate.
//!
//! Every variant says *what* was being done ("adding route 10.1.0.0/24 via 10.0.0.2 dev vxlan0")
//! and keeps the kernel's errno, so that callers can branch on [`NetError::is_not_found`] and
//! [`NetError::is_exists`] instead of matching strings.

use std::io;

use nix::errno::Errno;

/// Anything that can go wrong while talking to the kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The kernel refused a netlink request.
    #[error("{what}: {}", describe_errno(*errno, extack.as_deref()))]
    Netlink {
        /// The operation and its object.
        what: String,
        /// The positive errno (`libc::EEXIST`, ...).
        errno: i32,
        /// The kernel's extended ACK message, when it sent one.
        extack: Option<String>,
    },
    /// A system call or file operation failed (namespaces, sysctls).
    #[error("{what}: {source}")]
    Io {
        /// The operation and its object.
        what: String,
        /// The underlying error (keeps the errno).
        #[source]
        source: io::Error,
    },
    /// The netlink connection went away before the kernel answered.
    #[error("{what}: netlink connection closed before the kernel answered")]
    ConnectionClosed {
        /// The operation and its object.
        what: String,
    },
    /// A dump kept being interrupted by concurrent changes (`NLM_F_DUMP_INTR`).
    #[error("{what}: dump interrupted by concurrent changes {attempts} times in a row")]
    DumpInterrupted {
        /// The operation and its object.
        what: String,
        /// How many times the dump was tried.
        attempts: u32,
    },
    /// The kernel answered with something that makes no sense for the request.
    #[error("{what}: unexpected netlink reply: {detail}")]
    UnexpectedReply {
        /// The operation and its object.
        what: String,
        /// What was received.
        detail: String,
    },
    /// A closure run inside a namespace panicked.
    #[error("{what}: panicked: {message}")]
    Panicked {
        /// The operation and its object.
        what: String,
        /// The panic payload, when it was a string.
        message: String,
    },
    /// An argument the kernel would reject anyway (bad interface name, mixed families...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// `Netlink::connect*` was called outside a tokio runtime.
    #[error("no tokio runtime: Netlink::connect must be called inside a tokio runtime with IO enabled")]
    NoRuntime,
}

impl NetError {
    /// The errno behind this error, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { errno, .. } => Some(*errno),
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The object does not exist (ENOENT, ENODEV, ESRCH, EADDRNOTAVAIL, or a missing file).
    pub fn is_not_found(&self) -> bool {
        if let Self::Io { source, .. } = self {
            if source.kind() == io::ErrorKind::NotFound {
                return true;
            }
        }
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// The object already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        if let Self::Io { source, .. } = self {
            if source.kind() == io::ErrorKind::AlreadyExists {
                return true;
            }
        }
        self.errno() == Some(libc::EEXIST)
    }

    /// The kernel lacks the feature (EOPNOTSUPP): a link kind whose module is missing
    /// ("Unknown device type"), an offload the driver cannot change.
    pub fn is_not_supported(&self) -> bool {
        self.errno() == Some(libc::EOPNOTSUPP)
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn errno_io(what: impl Into<String>, errno: Errno) -> Self {
        Self::io(what, io::Error::from_raw_os_error(errno as i32))
    }
}

/// "File exists (EEXIST)", followed by the kernel's extended ACK message if any.
fn describe_errno(errno: i32, extack: Option<&str>) -> String {
    let e = Errno::from_raw(errno);
    let base = format!("{} ({e:?})", e.desc());
    match extack {
        Some(msg) => format!("{base}: {msg}"),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_error_reads_like_iproute2() {
        let e = NetError::Netlink {
            what: "adding route 10.1.0.0/24 via 10.0.0.2 dev vxlan0".into(),
            errno: libc::EEXIST,
            extack: None,
        };
        assert_eq!(
            e.to_string(),
            "adding route 10.1.0.0/24 via 10.0.0.2 dev vxlan0: File exists (EEXIST)"
        );
        assert!(e.is_exists());
        assert!(!e.is_not_found());
    }

    #[test]
    fn not_found_covers_every_missing_errno() {
        for errno in [libc::ENOENT, libc::ENODEV, libc::ESRCH, libc::EADDRNOTAVAIL] {
            let e = NetError::Netlink {
                what: "x".into(),
                errno,
                extack: Some("msg".into()),
            };
            assert!(e.is_not_found(), "{e}");
        }
        let e = NetError::io("reading", io::Error::from(io::ErrorKind::NotFound));
        assert!(e.is_not_found());
    }
}
