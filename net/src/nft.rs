//! nftables masquerade over netlink: pods (or whole prefixes) whose traffic leaves the cluster
//! with the node's address.
//!
//! # Why this design
//!
//! The reference `bridge` plugin (`ipMasq: true`) gives every container its own iptables chain,
//! and a jump to it from POSTROUTING, by running the `iptables` binary several times per ADD
//! and DEL. Every ADD and DEL rewrites and reloads the whole nat table, and each new connection
//! walks a linear list of jumps: both grow with the number of pods, so a node slows down as
//! pods pile up, and concurrent plugins serialize on the xtables lock.
//!
//! Here the rules never change with pods. One table `inet trellis` holds:
//!
//! ```text
//! table inet trellis {
//!   set masq4       { type ipv4_addr; }                  # pod addresses    (hash)
//!   set masq_net4   { type ipv4_addr; flags interval; }  # source prefixes  (daemon)
//!   set nomasq_dst4 { type ipv4_addr; flags interval; }  # never masqueraded destinations
//!   ... and the same three for IPv6 (masq6, masq_net6, nomasq_dst6)
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat;
//!     ip  saddr @masq4     ip  daddr != @nomasq_dst4 counter masquerade
//!     ip  saddr @masq_net4 ip  daddr != @nomasq_dst4 counter masquerade
//!     ip6 saddr @masq6     ip6 daddr != @nomasq_dst6 counter masquerade
//!     ip6 saddr @masq_net6 ip6 daddr != @nomasq_dst6 counter masquerade
//!   }
//! }
//! ```
//!
//! A pod ADD adds one element to a hash set and a DEL deletes it: one netlink round trip, O(1)
//! in the kernel (hash insert, no rule rebuilt, no ruleset reloaded), and the per-packet cost is
//! one hash lookup whatever the number of pods. Pod addresses go in a hash set rather than an
//! interval set because interval sets (rbtree, pipapo) cost more per insert and per commit.
//! One `inet` table serves both families, so there is one chain and one place to look.
//!
//! # Idempotence and concurrency
//!
//! Many plugin processes may set the table up at once, and someone may have deleted a part of
//! it. [`Masquerade::ensure`] first reads the chain: when it holds exactly our four rules
//! (told by their comments, which carry a version), only missing exempt destinations are
//! committed, usually nothing at all, and the rule counters keep counting. Otherwise it sends
//! one atomic batch: create-if-missing (NLM_F_CREATE without EXCL) for the table, the chain
//! and the six sets, then *flush the chain and append the four rules*. The kernel applies a
//! batch all or nothing and serializes batches, so however many processes do this at once the
//! chain ends with exactly four rules, and a chain that lost its rules (or holds an older
//! version of them) is repaired. Creating the rules only when a NEWTABLE with NLM_F_EXCL
//! succeeds would also avoid duplicates, but would never repair a damaged table; "dump, then
//! add if missing" alone would race into duplicate rules. Set elements are always kept. The
//! table belongs to Trellis: a rule someone else puts in its chain goes at the next repair.
//!
//! Interval sets refuse overlapping elements (EEXIST) and the kernel does not merge them, so
//! adding a prefix reads the set first and plans the batch: a prefix already covered is
//! skipped, one covering others replaces them by the union; the batch is planned again if a
//! concurrent change gets in between.
//!
//! # Cost (measured on the development VM, kernel 6.18)
//!
//! `add_source`/`remove_source`: about 5 µs each, the same with 10,000 pods in the set.
//! `ensure` with everything in place: about 60 µs (two reads, no commit). Closing a netfilter
//! netlink socket (or exiting) right after a commit waits in the kernel for the deferred
//! destruction of that transaction, one RCU grace period (about 14 ms here; `nft` pays the
//! same): a plugin should do its masquerade step early rather than last.
//!
//! # Namespaces
//!
//! A [`Masquerade`] talks through a netlink socket opened by [`Masquerade::new`], and that
//! socket stays in the network namespace of the thread that created it: create it on a
//! thread that has entered the target namespace.
//!
//! The messages are built here (`nft/wire.rs`, `nft/objects.rs`) rather than with a crate such
//! as `rustables`: five kinds of object take a few hundred lines, no new dependency, and the
//! batch, acknowledgement and errno handling stay in our hands.

mod antispoof;
mod conn;
mod error;
mod hostport;
mod interval;
mod objects;
mod policy;
mod rules;
mod underlay_guard;
mod watch;
mod wire;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use ipnetwork::IpNetwork;

pub use antispoof::{AntiSpoof, PodIdentity, PortKind};
use conn::{Batch, BatchError, Conn};
pub use error::NftError;
pub use hostport::{HostPorts, MappedPort, PortMapping, Protocol};
use interval::{Bound, Family, Interval};
use objects::SetKind;
pub use policy::{
    Applied, LinePeer, LinePorts, PolicyChain, PolicyLine, PolicyState, PolicyTable, RuleCounter, DROP_LOG_PREFIX,
    POLICY_TABLE, REVOKED_MARK,
};
pub use underlay_guard::{Encapsulation, UnderlayGuard};
pub use watch::TableWatch;
use wire::MsgType;

/// The table's name when the configuration does not name one.
pub const DEFAULT_TABLE: &str = "trellis";

/// How many times an interval change is retried when a concurrent change conflicts with it.
const INTERVAL_TRIES: usize = 8;

/// What [`Masquerade::ensure`] sets up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqueradeConfig {
    /// The `inet` table that holds everything: [`DEFAULT_TABLE`] unless you run two instances.
    pub table: String,
    /// Destinations never masqueraded (the pod subnet, the cluster CIDR), added by every
    /// `ensure`. They are only added, never removed, because several networks share the table.
    pub exempt_destinations: Vec<IpNetwork>,
}

impl Default for MasqueradeConfig {
    fn default() -> Self {
        MasqueradeConfig {
            table: DEFAULT_TABLE.to_string(),
            exempt_destinations: Vec::new(),
        }
    }
}

impl MasqueradeConfig {
    /// The default table with these exempt destinations.
    pub fn new(exempt_destinations: impl IntoIterator<Item = IpNetwork>) -> Self {
        MasqueradeConfig {
            exempt_destinations: exempt_destinations.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// The masquerade table of one network namespace.
pub struct Masquerade {
    cfg: MasqueradeConfig,
    conn: Mutex<Conn>,
}

impl Masquerade {
    /// Opens a netlink socket in the calling thread's network namespace. Changes nothing.
    pub fn new(cfg: MasqueradeConfig) -> Result<Self, NftError> {
        if cfg.table.is_empty() || cfg.table.len() > 255 || cfg.table.contains('\0') {
            return Err(NftError::InvalidInput(format!(
                "invalid nftables table name {:?}",
                cfg.table
            )));
        }
        Ok(Masquerade {
            cfg,
            conn: Mutex::new(Conn::open()?),
        })
    }

    pub fn config(&self) -> &MasqueradeConfig {
        &self.cfg
    }

    /// Makes the table, chain, sets and rules be there, the chain hold exactly our rules, and
    /// the configured exempt destinations be covered; set elements are kept. Commits nothing
    /// when all is in place; otherwise one atomic batch. Safe to run from any number of
    /// processes at once, and repeatedly.
    pub fn ensure(&self) -> Result<(), NftError> {
        self.ensure_on(&mut self.conn())
    }

    /// Masquerades traffic from `ip` (a pod's address). Adding an address already there
    /// succeeds. Sets the table up first if it is missing.
    pub fn add_source(&self, ip: IpAddr) -> Result<(), NftError> {
        let conn = &mut self.conn();
        self.with_setup(conn, |conn| {
            let fam = Family::of(ip);
            let set = SetKind::Sources.name(fam);
            let mut batch = Batch::default();
            let bound = Bound {
                key: interval::addr_value(ip),
                end: false,
            };
            let msg = objects::set_elems(MsgType::NewSetElem, &self.cfg.table, set, fam, &[bound]);
            batch.push(msg, format!("adding element {ip} to set {} {set}", self.cfg.table));
            conn.commit(batch).map_err(|e| e.error)
        })
    }

    /// Stops masquerading traffic from `ip`. Succeeds when it is not there (or nothing is).
    pub fn remove_source(&self, ip: IpAddr) -> Result<(), NftError> {
        let fam = Family::of(ip);
        let set = SetKind::Sources.name(fam);
        let bound = Bound {
            key: interval::addr_value(ip),
            end: false,
        };
        let msg = objects::set_elems(MsgType::DelSetElem, &self.cfg.table, set, fam, &[bound]);
        let mut batch = Batch::default();
        batch.push(msg, format!("deleting element {ip} from set {} {set}", self.cfg.table));
        ok_if_not_found(self.conn().commit(batch).map_err(|e| e.error))
    }

    /// The addresses added with [`Masquerade::add_source`], IPv4 first; empty if no table.
    pub fn list_sources(&self) -> Result<Vec<IpAddr>, NftError> {
        let conn = &mut self.conn();
        let mut out = Vec::new();
        for fam in Family::ALL {
            let bounds = self.list_bounds(conn, SetKind::Sources, fam)?;
            out.extend(bounds.iter().map(|b| fam.addr(b.key)));
        }
        out.sort();
        Ok(out)
    }

    /// Masquerades traffic from a whole prefix (the daemon: the node's pod CIDR). A prefix
    /// covered by one already there changes nothing; one covering others replaces them.
    pub fn add_source_prefix(&self, net: IpNetwork) -> Result<(), NftError> {
        self.add_prefix(SetKind::SourcePrefixes, net)
    }

    /// Removes a prefix added with [`Masquerade::add_source_prefix`]; succeeds when it is not
    /// there as such (including when it was merged into a larger one, which stays).
    pub fn remove_source_prefix(&self, net: IpNetwork) -> Result<(), NftError> {
        self.remove_prefix(SetKind::SourcePrefixes, net)
    }

    pub fn list_source_prefixes(&self) -> Result<Vec<IpNetwork>, NftError> {
        self.list_prefixes(SetKind::SourcePrefixes)
    }

    /// Never masquerades traffic to `net`; same merging rules as
    /// [`Masquerade::add_source_prefix`].
    pub fn add_exempt_destination(&self, net: IpNetwork) -> Result<(), NftError> {
        self.add_prefix(SetKind::ExemptDestinations, net)
    }

    /// Removes an exempt destination; succeeds when it is not there as such.
    pub fn remove_exempt_destination(&self, net: IpNetwork) -> Result<(), NftError> {
        self.remove_prefix(SetKind::ExemptDestinations, net)
    }

    pub fn list_exempt_destinations(&self) -> Result<Vec<IpNetwork>, NftError> {
        self.list_prefixes(SetKind::ExemptDestinations)
    }

    /// A subscription to changes that undo this table (deleted rules, chains, sets, the table,
    /// elements deleted from its sets), opened in the calling thread's namespace.
    pub fn watch(&self) -> Result<TableWatch, NftError> {
        let sets: Vec<&str> = SetKind::ALL
            .iter()
            .flat_map(|k| Family::ALL.map(|f| k.name(f)))
            .collect();
        TableWatch::new(&self.cfg.table, &sets)
    }

    /// Deletes the whole table (rules, sets, elements). Succeeds when there is none.
    pub fn delete_all(&self) -> Result<(), NftError> {
        let mut batch = Batch::default();
        batch.push(
            objects::del_table(&self.cfg.table),
            format!("deleting table inet {}", self.cfg.table),
        );
        ok_if_not_found(self.conn().commit(batch).map_err(|e| e.error))
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A panic while holding the lock cannot leave the socket half-used: every operation
        // reads all its replies before returning, and stale ones are skipped by sequence.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `op`; if it fails because the table or a set is missing, sets up and runs it again.
    fn with_setup(&self, conn: &mut Conn, op: impl Fn(&mut Conn) -> Result<(), NftError>) -> Result<(), NftError> {
        match op(conn) {
            Err(e) if e.is_not_found() => {
                self.ensure_on(conn)?;
                op(conn)
            }
            r => r,
        }
    }

    fn ensure_on(&self, conn: &mut Conn) -> Result<(), NftError> {
        let skeleton = !self.rules_in_place(conn)?;
        let wanted = Family::ALL.map(|fam| {
            let ivs = self.cfg.exempt_destinations.iter().map(|n| Interval::of(*n));
            (
                SetKind::ExemptDestinations,
                fam,
                ivs.filter(|(f, _)| *f == fam).map(|(_, i)| i).collect(),
            )
        });
        self.commit_intervals(conn, skeleton, &wanted)
    }

    /// Whether the chain holds exactly our rules (told by their comments), in order. Rules
    /// reference the sets, so the table, the chain and the sets are then all there too.
    fn rules_in_place(&self, conn: &mut Conn) -> Result<bool, NftError> {
        let t = &self.cfg.table;
        let context = format!("listing chain inet {t} {}", objects::CHAIN);
        let replies = match conn.dump(|| objects::get_rules(t), &context) {
            Err(e) if e.is_not_found() => return Ok(false),
            r => r?,
        };
        let have: Vec<Option<String>> = replies.iter().map(|r| objects::parse_rule_comment(r)).collect();
        let want: Vec<Option<String>> = Self::rules()
            .map(|(fam, src)| Some(objects::rule_comment(fam, src)))
            .collect();
        Ok(have == want)
    }

    /// Our rules, in chain order: (family, source set).
    fn rules() -> impl Iterator<Item = (Family, SetKind)> {
        Family::ALL
            .into_iter()
            .flat_map(|fam| [SetKind::Sources, SetKind::SourcePrefixes].map(|src| (fam, src)))
    }

    /// Table, chain, sets, and the chain's rules replaced by ours.
    fn push_skeleton(&self, batch: &mut Batch) {
        let t = &self.cfg.table;
        batch.push(objects::new_table(t), format!("adding table inet {t}"));
        batch.push(
            objects::new_chain(t),
            format!("adding chain inet {t} {}", objects::CHAIN),
        );
        let mut id = 0;
        for kind in SetKind::ALL {
            for fam in Family::ALL {
                id += 1;
                batch.push(
                    objects::new_set(t, kind, fam, id),
                    format!("adding set inet {t} {}", kind.name(fam)),
                );
            }
        }
        batch.push(
            objects::flush_chain(t),
            format!("flushing chain inet {t} {}", objects::CHAIN),
        );
        for (fam, sources) in Self::rules() {
            let context = format!(
                "adding rule to chain inet {t} {}: saddr @{} daddr != @{} masquerade",
                objects::CHAIN,
                sources.name(fam),
                SetKind::ExemptDestinations.name(fam)
            );
            batch.push(objects::new_rule(t, fam, sources), context);
        }
    }

    /// Commits (the skeleton if `skeleton`, and) the changes that make each interval set cover
    /// its wanted intervals. The sets are read first and the changes planned from what is
    /// there: the kernel does not catch every overlap (an interval without an end element,
    /// reaching the top of the address space, slips through), so we do not lean on it. When
    /// a concurrent change gets in between, the kernel refuses an overlapping add (EEXIST) or
    /// a delete of what is gone (ENOENT), and we read and plan again.
    fn commit_intervals(
        &self,
        conn: &mut Conn,
        skeleton: bool,
        sets: &[(SetKind, Family, Vec<Interval>)],
    ) -> Result<(), NftError> {
        let t = &self.cfg.table;
        for attempt in 1.. {
            let mut batch = Batch::default();
            if skeleton {
                self.push_skeleton(&mut batch);
            }
            let first_element_msg = batch.len();
            let mut delete_msgs = Vec::new();
            for (kind, fam, wanted) in sets {
                if wanted.is_empty() {
                    continue;
                }
                let (fam, set) = (*fam, kind.name(*fam));
                let existing = interval::from_bounds(fam, self.list_bounds(conn, *kind, fam)?);
                let (deletes, adds) = interval::plan(&existing, wanted.clone());
                if !deletes.is_empty() {
                    let bounds: Vec<Bound> = deletes.iter().flat_map(|d| d.bounds(fam)).collect();
                    let msg = objects::set_elems(MsgType::DelSetElem, t, set, fam, &bounds);
                    let what = deletes.iter().map(|d| d.describe(fam)).collect::<Vec<_>>().join(", ");
                    delete_msgs.push(batch.len());
                    batch.push(msg, format!("deleting element {what} (to merge it) from set {t} {set}"));
                }
                if !adds.is_empty() {
                    let bounds: Vec<Bound> = adds.iter().flat_map(|a| a.bounds(fam)).collect();
                    let msg = objects::set_elems(MsgType::NewSetElem, t, set, fam, &bounds);
                    let what = adds.iter().map(|a| a.describe(fam)).collect::<Vec<_>>().join(", ");
                    batch.push(msg, format!("adding element {what} to set {t} {set}"));
                }
            }
            match conn.commit(batch) {
                Ok(()) => return Ok(()),
                Err(BatchError { index: Some(i), error })
                    if i >= first_element_msg
                        && attempt < INTERVAL_TRIES
                        && (error.is_exists() || (error.is_not_found() && delete_msgs.contains(&i))) => {}
                Err(e) => return Err(e.error),
            }
        }
        unreachable!("the loop returns by its last attempt")
    }

    fn add_prefix(&self, kind: SetKind, net: IpNetwork) -> Result<(), NftError> {
        let (fam, iv) = Interval::of(net);
        let conn = &mut self.conn();
        self.with_setup(conn, |conn| {
            self.commit_intervals(conn, false, &[(kind, fam, vec![iv])])
        })
    }

    fn remove_prefix(&self, kind: SetKind, net: IpNetwork) -> Result<(), NftError> {
        let (fam, iv) = Interval::of(net);
        let set = kind.name(fam);
        let msg = objects::set_elems(MsgType::DelSetElem, &self.cfg.table, set, fam, &iv.bounds(fam));
        let mut batch = Batch::default();
        batch.push(
            msg,
            format!(
                "deleting element {} from set {} {set}",
                iv.describe(fam),
                self.cfg.table
            ),
        );
        ok_if_not_found(self.conn().commit(batch).map_err(|e| e.error))
    }

    fn list_prefixes(&self, kind: SetKind) -> Result<Vec<IpNetwork>, NftError> {
        let conn = &mut self.conn();
        let mut out = Vec::new();
        for fam in Family::ALL {
            let ivs = interval::from_bounds(fam, self.list_bounds(conn, kind, fam)?);
            out.extend(ivs.iter().flat_map(|iv| iv.prefixes(fam)));
        }
        Ok(out)
    }

    /// The elements of one set; none when the table or set does not exist.
    fn list_bounds(&self, conn: &mut Conn, kind: SetKind, fam: Family) -> Result<Vec<Bound>, NftError> {
        let (t, set) = (&self.cfg.table, kind.name(fam));
        let context = format!("listing set {t} {set}");
        let replies = match conn.dump(|| objects::get_set_elems(t, set), &context) {
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            r => r?,
        };
        let mut out = Vec::new();
        for r in replies {
            out.extend(objects::parse_set_elems(fam, &r).map_err(|e| NftError::Protocol(format!("{context}: {e}")))?);
        }
        Ok(out)
    }
}

fn ok_if_not_found(r: Result<(), NftError>) -> Result<(), NftError> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}
