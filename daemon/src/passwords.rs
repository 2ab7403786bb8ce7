//! BGP TCP MD5 passwords from files: `--bgp-password-file` (every session's, read at start) and
//! each configured peer's own `PasswordFile` (`"Peers": [{"IP": ..., "ASNumber": ...,
//! "PasswordFile": "/etc/trellis/bgp/tor1"}]`: a mounted Secret key, as Calico's BGPPeer
//! `password.secretKeyRef`).
//!
//! A peer's file is read at start (a file that cannot be used stops the start, as
//! `--bgp-password-file` does) and again on every change of the peer set and every resync
//! (`--resync`): Kubernetes updates a mounted Secret by swapping a symlink (`..data`), and the
//! file is read by its path each time, so the rotated password is picked up within a resync
//! period. The speaker then re-keys the listening socket for that peer and reconnects it
//! (`bgp::Speaker::set_passwords`). A file that cannot be used on a re-read (gone, unreadable,
//! empty, longer than 80 bytes) leaves the last password in use: counted in
//! `trellisd_bgp_password_errors_total{reason="unreadable"|"invalid"}` and logged at most once a
//! minute per peer, naming the file and the cause.

use crate::bgp::policy::Throttle;
use crate::metrics::Metrics;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The longest TCP MD5 key the kernel takes.
const MAX_LEN: usize = 80;
/// How often the same peer's failing file is logged again.
const REPEAT_LOG: Duration = Duration::from_secs(60);

/// Why a password file cannot be used: the `reason` label (one of
/// [`crate::metrics::PASSWORD_PROBLEMS`]) and the cause, for the log.
pub type Problem = (&'static str, String);

/// A password file's bytes, one trailing newline (`\n` or `\r\n`) dropped; 1 to 80 bytes.
pub fn read(path: &Path) -> Result<Vec<u8>, Problem> {
    let mut p = std::fs::read(path).map_err(|e| ("unreadable", format!("{}: {e}", path.display())))?;
    if p.ends_with(b"\n") {
        p.pop();
        if p.ends_with(b"\r") {
            p.pop();
        }
    }
    if p.is_empty() || p.len() > MAX_LEN {
        return Err((
            "invalid",
            format!(
                "{}: the password must have 1 to {MAX_LEN} bytes, not {}",
                path.display(),
                p.len()
            ),
        ));
    }
    Ok(p)
}

/// The configured peers' own passwords; see the module docs.
pub struct PeerPasswords {
    files: BTreeMap<IpAddr, PathBuf>,
    read: HashMap<IpAddr, Vec<u8>>,
    /// Whether the speaker has them yet.
    sent: bool,
    throttles: BTreeMap<IpAddr, Throttle>,
    metrics: Metrics,
}

impl PeerPasswords {
    /// Reads every peer's file (`files`: by peer address); `Err` names the first that cannot be
    /// used.
    pub fn load(files: BTreeMap<IpAddr, PathBuf>, metrics: Metrics) -> Result<PeerPasswords, String> {
        let files: BTreeMap<IpAddr, PathBuf> = files.into_iter().map(|(a, p)| (a.to_canonical(), p)).collect();
        let mut read = HashMap::new();
        for (addr, path) in &files {
            let p = self::read(path).map_err(|(_, why)| format!("BGP peer {addr}: PasswordFile {why}"))?;
            read.insert(*addr, p);
        }
        Ok(PeerPasswords {
            files,
            read,
            sent: false,
            throttles: BTreeMap::new(),
            metrics,
        })
    }

    /// Reads the files again: `true` when the speaker must be told ([`PeerPasswords::current`]):
    /// a password changed, or it has none yet.
    pub fn refresh(&mut self) -> bool {
        let mut changed = !self.sent;
        self.sent = true;
        for (addr, path) in &self.files {
            match read(path) {
                Ok(p) => {
                    if self.read.get(addr) != Some(&p) {
                        tracing::info!(peer = %addr, file = %path.display(), "bgp: the peer's password changed");
                        self.read.insert(*addr, p);
                        changed = true;
                    }
                }
                Err((reason, why)) => {
                    self.metrics.bgp_password_errors(reason).inc();
                    let throttle = self.throttles.entry(*addr).or_insert_with(|| Throttle::new(REPEAT_LOG));
                    if let Some(held_back) = throttle.allow(Instant::now()) {
                        tracing::warn!(
                            peer = %addr, reason, held_back,
                            "bgp: the peer's PasswordFile {why}: its last password stays in use"
                        );
                    }
                }
            }
        }
        changed
    }

    /// The peers' passwords, by address.
    pub fn current(&self) -> HashMap<IpAddr, Vec<u8>> {
        self.read.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// How the kubelet updates a mounted Secret: the new version in a new folder, then the
    /// `..data` symlink swapped to it by a rename; `tor1` is `..data/tor1`.
    fn publish(dir: &Path, version: u32, content: Option<&[u8]>) {
        let v = dir.join(format!("..v{version}"));
        std::fs::create_dir_all(&v).unwrap();
        if let Some(c) = content {
            std::fs::write(v.join("tor1"), c).unwrap();
        }
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&v, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        if !dir.join("tor1").is_symlink() {
            symlink("..data/tor1", dir.join("tor1")).unwrap();
        }
    }

    #[test]
    fn a_rotated_secret_is_picked_up_and_a_broken_one_keeps_the_last_password() {
        let dir = Dir(std::env::temp_dir().join(format!("trellis-peer-pw-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        publish(&dir.0, 1, Some(b"alpha\n"));
        let tor: IpAddr = "192.168.0.1".parse().unwrap();
        let metrics = Metrics::new();
        let files = BTreeMap::from([(tor, dir.0.join("tor1"))]);
        let mut pw = PeerPasswords::load(files.clone(), metrics.clone()).unwrap();
        assert_eq!(pw.current()[&tor], b"alpha");
        assert!(pw.refresh(), "the speaker has none yet");
        assert!(!pw.refresh(), "nothing changed");

        publish(&dir.0, 2, Some(b"bravo"));
        assert!(pw.refresh(), "rotated");
        assert_eq!(pw.current()[&tor], b"bravo");

        publish(&dir.0, 3, Some(b""));
        assert!(!pw.refresh());
        publish(&dir.0, 4, None);
        assert!(!pw.refresh());
        assert_eq!(pw.current()[&tor], b"bravo", "the last good password stays");
        assert_eq!(metrics.bgp_password_errors("invalid").get(), 1);
        assert_eq!(metrics.bgp_password_errors("unreadable").get(), 1);

        // At start, a file that cannot be used is an error naming the peer and the file.
        let e = PeerPasswords::load(files, Metrics::new()).err().unwrap();
        assert!(e.contains("192.168.0.1") && e.contains("tor1"), "{e}");
    }
}
