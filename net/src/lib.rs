//! The kernel API shared by the plugin and the daemon (filled by issue 3).
