//! Node identity: which daemon may speak for a node name (etcd datastore).
//!
//! A node's name alone proves nothing: a cloned VM, or a `NODE_NAME` typed twice, starts a
//! second daemon under a name that a live node holds; before this it silently took over the
//! first node's CIDR and rewrote its lease with its own underlay IP (84 of 99 pings to the
//! first node's pods lost, for as long as both ran). So every daemon draws a random 128-bit
//! node ID once, keeps it in `--state-dir` (`node-id`), and writes it into its etcd record
//! (`nodeId`). At start a daemon whose name is held by a record with another ID waits up to one
//! TTL: a record that is not renewed is a dead daemon's and expires, and then the name is taken
//! back; one still renewed after a TTL is a live daemon's, and this one refuses to start,
//! naming the node and the holder (exit non-zero, so that the operator sees a crash loop, not
//! a silent hijack), after leaving its attempt under `<prefix>claims/<node>`, which the holder
//! watches and logs.
//!
//! Why a random ID in `/run` rather than `/etc/machine-id`: a VM cloned from an image often
//! keeps the image's machine-id, and containers see the host's or none; a tmpfs is never part
//! of a clone. What follows from `/run` being emptied:
//! - a reboot draws a new ID; the old record, no longer renewed, expires within a TTL and the
//!   node takes its name (and, by the CNI config's hint, its CIDR) back; the wait is at most one
//!   TTL and only when the reboot was quicker than the TTL;
//! - a reinstall (new machine, same name) is the same case: an expired record is nobody's;
//! - a daemon restart keeps `/run`, so its ID, and takes its record back at once.
//!
//! The ID is not a secret: every node can read it in etcd, and anyone holding etcd's
//! credentials can write any record. It stops accidents, not attackers; against those stand
//! the checks every receiver makes ([`super::trust`]) and the owner watching its own records
//! (a rewrite is logged, fails `/healthz` and is undone).
//!
//! Kubernetes datastore: the API server already gives each node one Node object, created by
//! its kubelet under its own credentials (with the NodeRestriction admission plugin a kubelet
//! may change only its own Node), and `spec.podCIDRs` is set once by the controller manager and
//! immutable. Two daemons under one name there share one Node and one CIDR; nothing is done
//! about it here: the kubelet's own node registration fails for the clone first.

use std::io::Read;
use std::path::Path;

const FILE: &str = "node-id";

/// This node's ID from `dir`, drawn and kept there if there is none yet.
pub fn load_or_create(dir: &Path) -> std::io::Result<String> {
    let path = dir.join(FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_string());
        }
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    crate::cniconf::write_if_changed(&path, &format!("{id}\n"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_drawn_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("trellisd-id-{}", std::process::id()));
        let id = load_or_create(&dir).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(load_or_create(&dir).unwrap(), id);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_ne!(load_or_create(&dir).unwrap(), id, "an emptied /run draws a new one");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
