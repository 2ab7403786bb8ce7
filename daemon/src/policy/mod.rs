//! Kubernetes NetworkPolicy (issue 14), the part that decides: the API objects normalized
//! ([`model`]), label selectors ([`selector`]) and what the API reference says is allowed
//! ([`semantics`]), the definition every later stage is tested against.
//!
//! Not yet here (README's status table says so): watching the objects in the Kubernetes
//! datastore, compiling them into the node's nftables table, and enforcing them.

pub mod model;
pub mod selector;
pub mod semantics;
