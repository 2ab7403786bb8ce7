//! `trellis-net`: the one typed API over the kernel that the plugin and the daemon share.
//! (Being written for issue 3.)

pub mod nft;
