//! Unique names, so tests run in parallel (and next to other test runs) without collisions.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `prefix` + this process's ID + a counter, at most 15 bytes (a valid link name) when the
/// prefix is at most 5 bytes.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{:x}-{n:x}", std::process::id() & 0xfffff);
    assert!(name.len() <= 15 || prefix.len() > 5, "name {name} too long");
    name
}
