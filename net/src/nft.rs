//! nftables: masquerade for pod traffic (being written for issue 3).
