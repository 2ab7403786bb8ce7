//! Kubernetes NetworkPolicy (issue 14), the part that decides: the API objects normalized
//! ([`model`]), label selectors ([`selector`]), what the API reference says is allowed
//! ([`semantics`], the definition every later stage is tested against), and the state a node's
//! nftables table must hold for it ([`compile`], checked against [`semantics`]).
//!
//! Not yet here (README's status table says so): watching the objects in the Kubernetes
//! datastore, writing the compiled state into the node's nftables table, and so enforcing it.

pub mod compile;
pub mod model;
pub mod selector;
pub mod semantics;
