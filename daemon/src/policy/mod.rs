//! Kubernetes NetworkPolicy (issue 14), the part that decides: the API objects normalized
//! ([`model`]), label selectors ([`selector`]), what the API reference says is allowed
//! ([`semantics`], the definition every later stage is tested against), and the state a node's
//! nftables table must hold for it ([`compile`], checked against [`semantics`]).
//!
//! [`source`] watches the objects (Namespaces, Pods, NetworkPolicies) and folds them into a
//! view; [`enforce`] compiles each view for this node's pods and writes it with
//! `trellis_net::nft::PolicyTable`. With the Kubernetes datastore, in routed mode.

pub mod compile;
pub mod enforce;
pub mod model;
pub mod selector;
pub mod semantics;
pub mod source;
