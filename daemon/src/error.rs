//! The daemon's shared vocabulary of failure: what the dataplane's parts (backends, tunnel
//! devices, the reconciler) return. It lives below all of them, so that no backend imports
//! anything from the reconciler that drives it.

use trellis_net::nft::NftError;
use trellis_net::NetError;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("masquerade: {0}")]
    Nft(#[from] NftError),
    #[error("{0}")]
    Invalid(String),
    /// The kernel lacks what the backend needs (the `ipip` module).
    #[error("{0}")]
    Unsupported(String),
    /// Some kernel changes of a reconcile run failed; the others were applied.
    #[error("{} kernel change(s) failed ({} applied): {}", failures.len(), report.added + report.removed,
        failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Partial {
        failures: Vec<NetError>,
        report: ReconcileReport,
    },
}

/// What a reconcile run changed: kernel objects (routes, neighbours, FDB entries) added or
/// replaced, and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: usize,
    pub removed: usize,
}
