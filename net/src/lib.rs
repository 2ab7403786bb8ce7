//! `trellis-net`: the one typed API over the kernel that the `trellis` CNI plugin and the
//! `trellisd` daemon share.
//!
//! - [`netns`]: run code inside a network namespace without moving the caller ([`netns::run_in`]),
//!   and named namespaces for tests ([`netns::NetnsGuard`]).
//! - [`Netlink`]: an rtnetlink connection bound to one namespace, with typed async verbs for
//!   links ([`link`]: veth, bridge, VXLAN, IPIP), addresses ([`addr`]), routes ([`route`]),
//!   nexthop objects ([`nexthop`]), neighbours ([`neigh`]) and VXLAN FDB entries ([`fdb`]).
//! - [`monitor`]: kernel change notifications (routes, nexthops, neighbours, FDB, links,
//!   addresses).
//! - [`ethtool`]: TX checksum offload through the `SIOCETHTOOL` ioctl.
//! - [`sysctl`]: `/proc/sys` parameters (per namespace of the calling thread).
//! - [`nft`], nftables: masquerade for pod traffic.
//! - [`conntrack`]: dump the connection tracking table, mark and delete entries (ctnetlink), so
//!   that a policy change revokes flows it no longer allows.
//! - [`nflog`]: the packets an nftables `log group` rule hands to user space (the policy drop
//!   log).
//! - [`NetError`]: one error type; netlink errors keep the errno and say which object failed.
//!
//! Conventions: adds that are naturally repeatable (addresses, `replace_*`) succeed when the
//! object exists; deletes succeed when it is missing; lookups return `Option`.
//! See `README.md` for the pitfalls met on the way.
//!
//! ```no_run
//! use trellis_net::{netns::NetnsRef, Netlink, VethConfig};
//! # async fn f(pod: &std::path::Path) -> Result<(), trellis_net::NetError> {
//! let host = Netlink::connect()?;
//! let veth = host.create_veth(&VethConfig::new("veth1234", "eth0").peer_netns(NetnsRef::Path(pod)).mtu(1450)).await?;
//! host.set_link_up(veth.index).await?;
//! # Ok(()) }
//! ```

pub mod addr;
pub mod conntrack;
mod error;
pub mod ethtool;
mod family;
pub mod fdb;
pub mod link;
mod mac;
mod message;
pub mod monitor;
pub mod neigh;
mod netlink;
pub mod netns;
pub mod nexthop;
pub mod nflog;
mod nfnl;
pub mod nft;
mod reply;
pub mod route;
pub mod sysctl;

pub use addr::{AddressInfo, AddressOptions};
pub use error::NetError;
pub use family::IpFamily;
pub use fdb::FdbEntry;
pub use ipnetwork::IpNetwork;
pub use link::{BridgeConfig, IpipConfig, IpipInfo, LinkChange, LinkInfo, VethConfig, VxlanConfig, VxlanInfo};
pub use mac::MacAddr;
pub use neigh::{Neighbour, NeighbourState};
pub use netlink::Netlink;
pub use nexthop::Nexthop;
pub use route::{Route, RouteFilter, RouteScope, RouteType};
