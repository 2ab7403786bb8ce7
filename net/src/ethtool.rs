//! The one ethtool knob we need: TX checksum offload (`ethtool -K DEV tx on|off`), through the
//! `SIOCETHTOOL` ioctl rather than the `ethtool` binary (not installed on every node).
//!
//! `ETHTOOL_STXCSUM` turns every TX checksum feature of the device on or off at once
//! (`NETIF_F_CSUM_MASK`: for a VXLAN device that is `tx-checksum-ip-generic`), and the kernel
//! then drops the features that depend on it (TSO, GSO of UDP tunnels), exactly as
//! `ethtool -K DEV tx-checksum-ip-generic off` does. These legacy commands are still served by
//! current kernels and need no string-set lookups, unlike `ETHTOOL_SFEATURES`.
//!
//! The ioctl acts on the namespace of the socket it is issued on, so an [`Ethtool`] opened in a
//! namespace (see [`Ethtool::open_in`]) can be used from any thread afterwards.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::link::check_ifname;
use crate::netns::{run_in, THREAD_NETNS};
use crate::NetError;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (padded to the union's full size).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// A socket for ethtool ioctls in one network namespace.
#[derive(Debug)]
pub struct Ethtool {
    fd: OwnedFd,
}

impl Ethtool {
    /// A socket in the calling thread's namespace.
    pub fn open() -> Result<Self, NetError> {
        Self::open_in(Path::new(THREAD_NETNS))
    }

    /// A socket in the namespace at `ns`.
    pub fn open_in(ns: &Path) -> Result<Self, NetError> {
        run_in(ns, || {
            // SAFETY: socket(2) has no memory preconditions; the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(NetError::io(
                    "opening a socket for ethtool",
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: `fd` is a freshly created descriptor nobody else owns.
            Ok(Self {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
            })
        })?
    }

    /// Whether TX checksum offload is on (`ethtool -k DEV | grep tx-checksumming`).
    pub fn tx_checksum(&self, ifname: &str) -> Result<bool, NetError> {
        let v = self.call(ifname, ETHTOOL_GTXCSUM, 0, "reading tx checksum offload of")?;
        Ok(v != 0)
    }

    /// `ethtool -K DEV tx on|off`. Fails with EOPNOTSUPP when the device cannot change it.
    pub fn set_tx_checksum(&self, ifname: &str, on: bool) -> Result<(), NetError> {
        let verb = if on {
            "turning tx checksum offload on for"
        } else {
            "turning tx checksum offload off for"
        };
        self.call(ifname, ETHTOOL_STXCSUM, u32::from(on), verb).map(drop)
    }

    fn call(&self, ifname: &str, cmd: u32, data: u32, what: &str) -> Result<u32, NetError> {
        check_ifname(ifname)?;
        let mut value = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: (&mut value as *mut EthtoolValue).cast(),
            _pad: [0; 16],
        };
        for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: `req` is a valid ifreq whose data pointer refers to `value`, and both outlive
        // the call; the kernel reads and writes only within them.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
        if rc < 0 {
            return Err(NetError::io(
                format!("{what} {ifname}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(value.data)
    }
}
