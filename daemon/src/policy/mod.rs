//! Kubernetes NetworkPolicy (issue 14), the part that decides: the API objects normalized
//! ([`model`]), label selectors ([`selector`]), what the API reference says is allowed
//! ([`semantics`], the definition every later stage is tested against), and the state a node's
//! nftables table must hold for it ([`compile`], checked against [`semantics`]).
//!
//! [`source`] watches the objects (Namespaces, Pods, NetworkPolicies) and folds them into a
//! view; `trellis_net::nft::PolicyTable` writes compiled state into the kernel. Not yet here
//! (README's status table says so): the node loop joining the two, so nothing is enforced yet.

pub mod compile;
pub mod model;
pub mod selector;
pub mod semantics;
pub mod source;
