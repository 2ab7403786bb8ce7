//! `trellis-ipam`: the IPAM plugin. It hands out pod addresses from the node's pod CIDR(s).
//!
//! - [`config`]: the host-local-compatible config (`ranges`, legacy `subnet`, `routes`, `dataDir`);
//! - [`range`]: address arithmetic over ranges and range sets, IPv4 and IPv6 alike;
//! - [`store`]: the on-disk store, laid out exactly like host-local's, plus an index that makes
//!   DEL O(1) and a boot marker that releases reservations left over from before a reboot;
//! - [`allocator`]: round-robin allocation after the last reserved address;
//! - [`plugin`]: the CNI verbs.

pub mod allocator;
pub mod config;
pub mod plugin;
pub mod range;
pub mod store;

pub use plugin::IpamPlugin;
