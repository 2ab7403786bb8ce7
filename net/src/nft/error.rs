//! The error of the nftables module: the kernel's errno is kept so that callers can branch on
//! "not found" and "already exists", and the message names the object that failed.

use std::fmt;

/// An nftables operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The kernel refused a request: `context` says which ("adding element 10.244.1.5 to set
    /// trellis masq4"), `errno` why, `detail` is the kernel's extended-ack text if it gave one.
    Kernel {
        context: String,
        errno: i32,
        detail: Option<String>,
    },
    /// The netlink socket itself failed (open, send, receive).
    Socket {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel's reply could not be understood.
    Protocol(String),
    /// The caller asked for something impossible (an IPv6 prefix in an IPv4 set, ...).
    InvalidInput(String),
}

impl NftError {
    /// The kernel's errno, for [`NftError::Kernel`] and [`NftError::Socket`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Kernel { errno, .. } => Some(*errno),
            NftError::Socket { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// ENOENT: the table, set or element does not exist.
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }

    /// EEXIST: the object exists already, or an interval overlaps one in the set.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    pub(super) fn socket(context: impl Into<String>, source: std::io::Error) -> Self {
        NftError::Socket {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for NftError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NftError::Kernel { context, errno, detail } => {
                write!(f, "{context}: {}", nix::errno::Errno::from_raw(*errno).desc())?;
                if let Some(detail) = detail {
                    write!(f, " ({detail})")?;
                }
                Ok(())
            }
            NftError::Socket { context, source } => write!(f, "{context}: {source}"),
            NftError::Protocol(m) => write!(f, "nftables netlink protocol: {m}"),
            NftError::InvalidInput(m) => f.write_str(m),
        }
    }
}

/// So that callers can `?` an nftables error into the crate's error; the errno, the object
/// named and the kernel's text all carry over.
impl From<NftError> for crate::NetError {
    fn from(e: NftError) -> Self {
        match e {
            NftError::Kernel { context, errno, detail } => crate::NetError::Netlink {
                what: context,
                errno,
                extack: detail,
            },
            NftError::Socket { context, source } => crate::NetError::Io { what: context, source },
            NftError::Protocol(detail) => crate::NetError::UnexpectedReply {
                what: "nftables".into(),
                detail,
            },
            NftError::InvalidInput(m) => crate::NetError::InvalidArgument(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_error_names_object_and_keeps_errno() {
        let e = NftError::Kernel {
            context: "adding element 10.244.1.5 to set trellis masq4".into(),
            errno: libc::ENOENT,
            detail: None,
        };
        assert_eq!(
            e.to_string(),
            "adding element 10.244.1.5 to set trellis masq4: No such file or directory"
        );
        assert!(e.is_not_found());
        assert!(!e.is_exists());
        let net: crate::NetError = e.into();
        assert!(net.is_not_found());
        assert!(net
            .to_string()
            .starts_with("adding element 10.244.1.5 to set trellis masq4: "));
    }
}
