//! `trellis-cni`: the Container Network Interface protocol, versions 0.3.0 to 1.1.0.
//!
//! Everything a plugin needs to speak CNI and nothing about the kernel:
//! - [`version`]: the spec versions we support and what each allows;
//! - [`env`]: the `CNI_*` environment, validated as the spec says, and `CNI_ARGS`;
//! - [`config`]: the network configuration read from stdin;
//! - [`result`]: the ADD result, printed in whichever version the config asked for;
//! - [`error`]: the spec's error object and codes, with Trellis's own from 100 up;
//! - [`skel`]: the skeleton, so that a plugin's `main` is one line;
//! - [`delegate`]: running another plugin (the IPAM plugin) found on `CNI_PATH`.

pub mod config;
pub mod delegate;
pub mod env;
pub mod error;
pub mod result;
pub mod skel;
pub mod version;

pub use config::{Attachment, NetConf};
pub use env::{CniArgs, Command, Env};
pub use error::{code, CniError};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::{Context, Plugin};
pub use version::Version;
