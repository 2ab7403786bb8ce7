//! The on-disk address store.
//!
//! Layout under `dataDir/<network>/`, the same as the reference host-local plugin's, so a node can
//! switch between the two in either direction without losing a reservation:
//! - `<ip>`: one file per reserved address, holding `<container id>\r\n<ifname>`;
//! - `last_reserved_ip.<N>`: the last address reserved from range set N (round-robin position);
//! - `lock`: `flock(2)`ed by whoever changes the store (host-local locks the same file). The
//!   kernel drops a flock when its holder dies, so a killed plugin never blocks the next one.
//!
//! Trellis adds a folder `.trellis/` that host-local ignores (its scans read every file, but no
//! file there holds `<id>\r\n<ifname>` once a write has finished):
//! - `index/<container id>:<ifname>`: the addresses of one attachment, so DEL is O(1) instead of
//!   reading every reservation as host-local does. `:` can appear in neither part. A container ID
//!   too long for a file name is shortened to its start and a hash of the whole. The index is a
//!   hint: a reservation file is the truth, and an address is released only when its file still
//!   names the attachment.
//! - `state`: the boot ID, the folder's mtime and the `last_reserved_ip` values as of Trellis's
//!   last change. If the folder changed since (host-local was used in between, or the store was
//!   never indexed) the index is rebuilt with one scan.
//!   A different boot ID means the node rebooted: every pod namespace is gone, so reservations
//!   whose file is older than the boot are released (host-local leaks them until the range is
//!   exhausted). Caveat: a wall clock stepped forward during boot, before Trellis first ran, can
//!   make a reservation made in this boot look older than the boot.
//! - `tmp`, `tmp-reservation`: the single temporary file names. Only the lock holder writes, so
//!   one name each suffices and a crash never leaves more than one behind.
//!
//! Crash safety: a reservation is made by writing `tmp-reservation` and hard-linking it to `<ip>`
//! (atomic, and it fails if the address is taken), after the index already names the address, so
//! a plugin killed at any point leaves a whole reservation that DEL finds, or none. Nothing is
//! fsync'ed: after a power loss the node reboots and every reservation is stale anyway.
//!
//! Failure safety: `tmp-reservation` is written *before* the index entry, once for all the
//! addresses of the call (each is a hard link of it). It is the step that a planted symlink or a
//! full disk refuses, and until the index is written nothing counts: a refused ADD leaves the
//! store as it found it, with nothing to undo.
//!
//! Every file is opened with `O_NOFOLLOW` and the folders are checked not to be symlinks, so a
//! symlink planted in the data dir cannot make the plugin read or write elsewhere.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use trellis_cni::env::{bounded_container_id, MAX_IFNAME_LEN};
use trellis_cni::{code, CniError};

const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
const META_DIR: &str = ".trellis";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// One reservation as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for files written by host-local versions that did not record it.
    pub ifname: String,
}

/// A network's store, not yet locked.
pub struct Store {
    dir: PathBuf,
    meta: PathBuf,
    lock: File,
}

fn store_err(what: impl std::fmt::Display, e: &std::io::Error) -> CniError {
    CniError::new(code::STORE, format!("address store: {what}")).with_details(e.to_string())
}

/// Refuses a path that exists and is a symlink (or not a folder).
fn check_dir(p: &Path) -> Result<(), CniError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => Err(CniError::new(
            code::STORE,
            format!("address store: refusing to use {}: it is a symlink", p.display()),
        )
        .with_details("remove the symlink; the store must be a real folder so that it cannot be redirected")),
        Ok(m) if !m.is_dir() => Err(CniError::new(
            code::STORE,
            format!("address store: {} is not a folder", p.display()),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(store_err(format!("cannot inspect {}", p.display()), &e)),
    }
}

fn mkdir(p: &Path) -> Result<(), CniError> {
    match fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => check_dir(p),
        Err(e) => Err(store_err(format!("cannot create {}", p.display()), &e)),
    }
}

fn open_nofollow(p: &Path, write: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if write {
        o.write(true).create(true).truncate(true).mode(0o644);
    }
    o.open(p)
}

/// Reads a small file; `None` when it is missing or not a regular file.
fn read_small(p: &Path) -> Option<String> {
    let mut s = String::new();
    open_nofollow(p, false).ok()?.read_to_string(&mut s).ok()?;
    Some(s)
}

impl Store {
    /// Opens (creating if needed) the store of `network` under `data_dir`.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, CniError> {
        fs::create_dir_all(data_dir).map_err(|e| store_err(format!("cannot create {}", data_dir.display()), &e))?;
        let dir = data_dir.join(network);
        mkdir(&dir)?;
        let meta = dir.join(META_DIR);
        mkdir(&meta)?;
        mkdir(&meta.join("index"))?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join("lock"))
            .map_err(|e| store_err(format!("cannot open lock file in {}", dir.display()), &e))?;
        Ok(Store { dir, meta, lock })
    }

    /// Opens the store only if it exists (DEL and GC never create one).
    pub fn open_existing(data_dir: &Path, network: &str) -> Result<Option<Store>, CniError> {
        match fs::symlink_metadata(data_dir.join(network)) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            _ => Store::open(data_dir, network).map(Some),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store's lock (waiting for other plugin processes), releases reservations left from
    /// before a reboot and brings the index up to date.
    pub fn lock(&self) -> Result<Locked<'_>, CniError> {
        self.lock.lock().map_err(|e| store_err("cannot lock", &e))?;
        let mut locked = Locked {
            store: self,
            dirty: false,
        };
        locked.sync()?;
        Ok(locked)
    }
}

/// The store while this process holds its lock. Unlocks on drop.
pub struct Locked<'a> {
    store: &'a Store,
    /// Whether this process changed the store (the state must then be recorded).
    dirty: bool,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // On an error path the state may go unrecorded; the next lock holder then sees a change it
        // did not make and rebuilds the index, which is always safe.
        let _ = self.finish();
        let _ = self.store.lock.unlock();
    }
}

/// What Trellis saw when it last changed the store.
#[derive(Debug, Default, PartialEq, Eq)]
struct State {
    boot_id: String,
    dir_mtime: Option<SystemTime>,
    last_reserved: BTreeMap<String, String>,
}

impl State {
    fn encode(&self) -> String {
        let mtime = self
            .dir_mtime
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
            .unwrap_or_default();
        let mut s = format!("boot_id={}\ndir_mtime={mtime}\n", self.boot_id);
        for (k, v) in &self.last_reserved {
            s.push_str(&format!("{k}={v}\n"));
        }
        s
    }

    fn decode(s: &str) -> State {
        let mut st = State::default();
        for line in s.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            match k {
                "boot_id" => st.boot_id = v.to_string(),
                "dir_mtime" => {
                    st.dir_mtime = v.split_once('.').and_then(|(s, n)| {
                        Some(SystemTime::UNIX_EPOCH + std::time::Duration::new(s.parse().ok()?, n.parse().ok()?))
                    })
                }
                _ if k.starts_with(LAST_RESERVED_PREFIX) => {
                    st.last_reserved.insert(k.to_string(), v.to_string());
                }
                _ => {}
            }
        }
        st
    }
}

fn boot_id() -> String {
    read_small(Path::new(BOOT_ID))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The wall-clock time the machine booted (`btime` of /proc/stat).
fn boot_time() -> Option<SystemTime> {
    let stat = read_small(Path::new("/proc/stat"))?;
    let secs: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

fn parse_owner(content: &str) -> (String, String) {
    let content = content.trim();
    match content.split_once('\n') {
        Some((id, ifname)) => (id.trim().to_string(), ifname.trim().to_string()),
        None => (content.to_string(), String::new()),
    }
}

/// The longest file name (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// An index entry's file name: `<container id>:<ifname>`, the ID shortened when the whole would
/// not fit in a file name (the spec does not limit an ID's length; an ifname has 15 bytes).
fn index_key(container_id: &str, ifname: &str) -> String {
    let id = bounded_container_id(container_id, NAME_MAX - 1 - ifname.len().min(MAX_IFNAME_LEN));
    format!("{id}:{ifname}")
}

/// Whether a name read from disk may be used as part of an index file name.
fn safe_key_part(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', ':', '\0']) && s != "." && s != ".."
}

impl Locked<'_> {
    fn dir(&self) -> &Path {
        &self.store.dir
    }

    fn meta(&self, name: &str) -> PathBuf {
        self.store.meta.join(name)
    }

    fn index_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.store.meta.join("index").join(index_key(container_id, ifname))
    }

    /// Overwrites a small hint file in place (no truncate to zero, no rename over it).
    ///
    /// ext4 (`auto_da_alloc`, on by default) starts writeback of a file that replaces another by
    /// rename or that is truncated to zero and rewritten: measured here, one such rename cost
    /// 2.7 ms, more than the rest of an ADD. `last_reserved_ip.N` and `state` are hints: a torn
    /// write after a crash only moves the round-robin start or triggers an index rebuild.
    fn write_in_place(&self, dest: &Path, content: &str) -> Result<(), CniError> {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dest);
        let res = f.and_then(|f| {
            f.write_all_at(content.as_bytes(), 0)?;
            f.set_len(content.len() as u64)
        });
        match res {
            // A planted symlink (O_NOFOLLOW: ELOOP) is replaced by a real file, never followed.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => self.write_atomic(dest, content),
            other => other.map_err(|e| store_err(format!("cannot write {}", dest.display()), &e)),
        }
    }

    /// Writes `content` to `dest` atomically (temp file + rename).
    fn write_atomic(&self, dest: &Path, content: &str) -> Result<(), CniError> {
        let tmp = self.meta("tmp");
        let mut f = open_nofollow(&tmp, true).map_err(|e| store_err(format!("cannot write {}", tmp.display()), &e))?;
        f.write_all(content.as_bytes())
            .map_err(|e| store_err(format!("cannot write {}", tmp.display()), &e))?;
        fs::rename(&tmp, dest).map_err(|e| store_err(format!("cannot write {}", dest.display()), &e))
    }

    fn read_state(&self) -> Option<State> {
        read_small(&self.meta("state")).map(|s| State::decode(&s))
    }

    fn current_state(&self, boot_id: String) -> Result<State, CniError> {
        let dir_mtime = fs::metadata(self.dir()).and_then(|m| m.modified()).ok();
        let mut last_reserved = BTreeMap::new();
        for entry in fs::read_dir(self.dir()).map_err(|e| store_err("cannot list", &e))? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(LAST_RESERVED_PREFIX) {
                if let Some(v) = read_small(&entry.path()) {
                    last_reserved.insert(name, v.trim().to_string());
                }
            }
        }
        Ok(State {
            boot_id,
            dir_mtime,
            last_reserved,
        })
    }

    /// Cheap check on every lock: releases pre-boot reservations after a reboot, and rebuilds the
    /// index if anyone but Trellis changed the folder since Trellis last did.
    fn sync(&mut self) -> Result<(), CniError> {
        let boot = boot_id();
        let recorded = self.read_state();
        let rebooted = recorded.as_ref().is_none_or(|s| s.boot_id != boot);
        if rebooted {
            self.release_from_before_boot()?;
        }
        let now = self.current_state(boot)?;
        if rebooted || recorded.as_ref() != Some(&now) {
            self.rebuild_index()?;
            self.write_in_place(&self.meta("state"), &self.current_state(now.boot_id.clone())?.encode())?;
        }
        Ok(())
    }

    fn release_from_before_boot(&mut self) -> Result<(), CniError> {
        let Some(booted) = boot_time() else { return Ok(()) };
        for r in self.reservations()? {
            let path = self.dir().join(r.ip.to_string());
            let old = fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < booted);
            if old {
                eprintln!(
                    "trellis-ipam: releasing {} (container {} {}): reserved before this boot",
                    r.ip, r.container_id, r.ifname
                );
                self.remove_reservation(r.ip)?;
            }
        }
        Ok(())
    }

    /// Rewrites `index/` from the reservation files (one scan).
    fn rebuild_index(&mut self) -> Result<(), CniError> {
        let index = self.store.meta.join("index");
        for entry in fs::read_dir(&index)
            .map_err(|e| store_err("cannot list index", &e))?
            .flatten()
        {
            let _ = fs::remove_file(entry.path());
        }
        let mut by_owner: BTreeMap<(String, String), Vec<IpAddr>> = BTreeMap::new();
        for r in self.reservations()? {
            by_owner.entry((r.container_id, r.ifname)).or_default().push(r.ip);
        }
        for ((id, ifname), ips) in by_owner {
            if safe_key_part(&id) && (ifname.is_empty() || safe_key_part(&ifname) && ifname.len() <= MAX_IFNAME_LEN) {
                self.write_index(&id, &ifname, &ips)?;
            }
        }
        Ok(())
    }

    /// Writes an attachment's index entry. A new entry is written directly (no temp file: it is
    /// written before any reservation it names exists, so a torn one loses nothing); an existing
    /// one is replaced atomically.
    fn write_index(&self, container_id: &str, ifname: &str, ips: &[IpAddr]) -> Result<(), CniError> {
        let body: String = ips.iter().map(|ip| format!("{ip}\n")).collect();
        let path = self.index_path(container_id, ifname);
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path);
        match created {
            Ok(mut f) => f
                .write_all(body.as_bytes())
                .map_err(|e| store_err(format!("cannot write {}", path.display()), &e)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => self.write_atomic(&path, &body),
            Err(e) => Err(store_err(format!("cannot write {}", path.display()), &e)),
        }
    }

    /// Every reservation in the store (reads every file: for GC and index rebuilds only).
    pub fn reservations(&self) -> Result<Vec<Reservation>, CniError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.dir())
            .map_err(|e| store_err("cannot list", &e))?
            .flatten()
        {
            let Ok(ip) = entry.file_name().to_string_lossy().parse::<IpAddr>() else {
                continue;
            };
            let Some(content) = read_small(&entry.path()) else {
                continue;
            };
            let (container_id, ifname) = parse_owner(&content);
            out.push(Reservation {
                ip,
                container_id,
                ifname,
            });
        }
        Ok(out)
    }

    /// How many reservation files there are per address family, without reading them (STATUS).
    pub fn reserved_addresses(&self) -> Result<Vec<IpAddr>, CniError> {
        Ok(fs::read_dir(self.dir())
            .map_err(|e| store_err("cannot list", &e))?
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<IpAddr>().ok())
            .collect())
    }

    /// The owner recorded in `ip`'s reservation file, if any.
    fn owner(&self, ip: IpAddr) -> Option<(String, String)> {
        read_small(&self.dir().join(ip.to_string())).map(|c| parse_owner(&c))
    }

    /// The addresses held by one attachment (O(1): the index, checked against the files).
    pub fn get(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        // Files from old host-local versions name only the container.
        for (key_if, must_match_if) in [(ifname, true), ("", false)] {
            let Some(body) = read_small(&self.index_path(container_id, key_if)) else {
                continue;
            };
            for ip in body.lines().filter_map(|l| l.trim().parse::<IpAddr>().ok()) {
                let matches = self
                    .owner(ip)
                    .is_some_and(|(id, i)| id == container_id && (!must_match_if || i == ifname));
                if matches && !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        ips
    }

    /// Whether nobody holds `ip` (any file, even a planted symlink, counts as held).
    pub fn is_free(&self, ip: IpAddr) -> bool {
        matches!(fs::symlink_metadata(self.dir().join(ip.to_string())), Err(e) if e.kind() == ErrorKind::NotFound)
    }

    pub fn last_reserved(&self, range_set: usize) -> Option<IpAddr> {
        read_small(&self.dir().join(format!("{LAST_RESERVED_PREFIX}{range_set}")))?
            .trim()
            .parse()
            .ok()
    }

    /// Reserves `new` (range set index, address) for the attachment, which already holds `held`.
    /// The index is written first, so a crash after any reservation still lets DEL find it; the
    /// reservation's content is written before the index, so a refusal there leaves nothing.
    pub fn reserve(
        &mut self,
        container_id: &str,
        ifname: &str,
        held: &[IpAddr],
        new: &[(usize, IpAddr)],
    ) -> Result<(), CniError> {
        let tmp = self.meta("tmp-reservation");
        // A plugin killed between its hard links and removing the temp file leaves it behind,
        // and it *is* that reservation (same inode): writing through it would rewrite the live
        // reservation's owner, which DEL then no longer recognises (it leaked once in 60 random
        // kills). Unlink a stale regular file first; a symlink is left for the refusal below.
        if fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
            fs::remove_file(&tmp).map_err(|e| store_err(format!("cannot remove {}", tmp.display()), &e))?;
        }
        let written = open_nofollow(&tmp, true)
            .and_then(|mut f| f.write_all(format!("{container_id}\r\n{ifname}").as_bytes()))
            .map_err(|e| {
                store_err(format!("cannot write {}", tmp.display()), &e).with_details(format!(
                    "{e}; if {} is a symlink, remove it: the store never writes through one",
                    tmp.display()
                ))
            });
        if let Err(e) = written {
            // Ours to remove only if we created it: a symlink (ELOOP) is left for its owner.
            if fs::symlink_metadata(&tmp).is_ok_and(|m| m.is_file()) {
                let _ = fs::remove_file(&tmp);
            }
            return Err(e);
        }
        let all: Vec<IpAddr> = held.iter().copied().chain(new.iter().map(|&(_, ip)| ip)).collect();
        self.dirty = true;
        let linked = self.write_index(container_id, ifname, &all).and_then(|()| {
            for (n, &(set, ip)) in new.iter().enumerate() {
                if let Err(e) = fs::hard_link(&tmp, self.dir().join(ip.to_string())) {
                    // Undo this call's earlier reservations before reporting.
                    for &(_, done) in &new[..n] {
                        self.remove_reservation(done)?;
                    }
                    self.restore_index(container_id, ifname, held)?;
                    return Err(store_err(format!("cannot reserve {ip}"), &e));
                }
                self.write_in_place(
                    &self.dir().join(format!("{LAST_RESERVED_PREFIX}{set}")),
                    &ip.to_string(),
                )?;
            }
            Ok(())
        });
        let _ = fs::remove_file(&tmp);
        linked
    }

    /// Puts an attachment's index entry back to `held` (none when it holds nothing).
    fn restore_index(&self, container_id: &str, ifname: &str, held: &[IpAddr]) -> Result<(), CniError> {
        if !held.is_empty() {
            return self.write_index(container_id, ifname, held);
        }
        let p = self.index_path(container_id, ifname);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(store_err(format!("cannot remove {}", p.display()), &e)),
            _ => Ok(()),
        }
    }

    fn remove_reservation(&mut self, ip: IpAddr) -> Result<(), CniError> {
        self.dirty = true;
        match fs::remove_file(self.dir().join(ip.to_string())) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(store_err(format!("cannot release {ip}"), &e)),
            _ => Ok(()),
        }
    }

    /// Releases what the attachment holds; returns the released addresses. Nothing held is fine.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let ips = self.get(container_id, ifname);
        for &ip in &ips {
            self.remove_reservation(ip)?;
        }
        for key_if in [ifname, ""] {
            let p = self.index_path(container_id, key_if);
            if fs::symlink_metadata(&p).is_ok() {
                self.dirty = true;
                let _ = fs::remove_file(p);
            }
        }
        Ok(ips)
    }

    /// Releases one address whatever its owner (GC), and forgets its index entry.
    pub fn release_ip(&mut self, r: &Reservation) -> Result<(), CniError> {
        self.remove_reservation(r.ip)?;
        if safe_key_part(&r.container_id) {
            let _ = fs::remove_file(self.index_path(&r.container_id, &r.ifname));
        }
        Ok(())
    }

    /// Records what the folder looks like after this process's changes, so the next lock holder
    /// can tell whether anyone else changed it. Also proves the store writable (STATUS).
    pub fn commit(mut self) -> Result<(), CniError> {
        self.dirty = true;
        self.finish()
    }

    fn finish(&mut self) -> Result<(), CniError> {
        if std::mem::take(&mut self.dirty) {
            let state = self.current_state(boot_id())?;
            self.write_in_place(&self.meta("state"), &state.encode())?;
        }
        Ok(())
    }

    /// Drops the lock after recording the state if anything changed.
    pub fn close(mut self) -> Result<(), CniError> {
        self.finish()
    }
}
