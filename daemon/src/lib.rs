//! `trellisd`, the node daemon: it leases the node's pod CIDR from a datastore, writes the node's
//! CNI config, and keeps the dataplane between nodes converged.
//!
//! Data flows one way:
//! [`datastore`] (etcd, or `none` for one node) → lease events → [`reconcile`] (desired state
//! from the leases, actual state from the kernel, the difference applied) through a
//! [`backend`] (VXLAN, host-gw, IPIP, or the routes BGP learned) → the kernel. [`cniconf`] writes
//! `/etc/cni/net.d/10-trellis.conflist` once the node holds its CIDR; [`metrics`] serves
//! `/healthz` and `/metrics`.

pub mod backend;
pub mod bgp;
pub mod cidr;
pub mod cli;
pub mod cniconf;
pub mod config;
pub mod datastore;
pub mod error;
pub mod install;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod passwords;
pub mod policy;
pub mod reconcile;
pub mod start;
pub mod state;
pub mod underlay;
