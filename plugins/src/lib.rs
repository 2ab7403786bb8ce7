//! The `trellis` CNI plugin: wires a pod's network namespace to its node with a veth pair.
//!
//! - [`config`]: the plugin's config (the reference `bridge` plugin's names where they overlap);
//! - [`names`]: the host end's name and label, derived from the attachment so DEL and GC find it;
//! - [`sandbox`]: `CNI_NETNS` checked before anything is done (a namespace, and not the node's);
//! - [`wire`]: ADD's kernel work, bridge mode and routed mode;
//! - [`plugin`]: the CNI verbs, with rollback and IPAM delegation.

pub mod config;
pub mod names;
pub mod plugin;
pub mod sandbox;
pub mod wire;

pub use plugin::TrellisPlugin;
