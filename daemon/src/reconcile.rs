//! The reconciler (written for issue 4).
