//! Telling the reconciler, within a second, that someone changed what it keeps in place.
//!
//! A task reads the kernel's route, neighbour and link notifications ([`Monitor`]) and wakes the
//! receiver handed out by `Dataplane::kernel_changes` when one *might* concern us:
//! - a route with our protocol was deleted, or a route to a destination we manage was added or
//!   replaced by someone else (another protocol);
//! - a nexthop object of ours was deleted (its IPv4 routes go without a notification of their
//!   own), or someone else put one in our ID range;
//! - a neighbour or FDB entry on our device was deleted;
//! - our device was deleted or went down;
//! - notifications were lost (overrun), or the monitor had to be reopened.
//!
//! Additions with our protocol are ignored (they are ours), so a reconcile does not wake itself
//! up, except once after it deletes something stale. The wake-up channel holds one element:
//! a burst of changes wakes the receiver once.

use super::nexthop::ID_RANGE as NEXTHOP_ID_RANGE;
use crate::backend::TRELLISD_PROTO;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use trellis_net::monitor::{Change, Group, Monitor};
use trellis_net::route::RT_TABLE_MAIN;
use trellis_net::NetError;

/// What the reconciler manages, as far as the watcher needs to know; updated on every run.
#[derive(Debug, Default)]
pub struct Interest {
    /// The backend device's index (0: none).
    device: AtomicU32,
    /// The destinations of the routes we want.
    routes: Mutex<BTreeSet<IpNetwork>>,
    /// Where to send wake-ups (replaced by each `kernel_changes` call).
    notify: Mutex<Option<mpsc::Sender<()>>>,
    /// Set with every wake-up, cleared by [`Interest::take_changed`]: whether the kernel may
    /// hold something else than the reconciler left there.
    changed: std::sync::atomic::AtomicBool,
}

impl Interest {
    pub fn set_device(&self, index: Option<u32>) {
        self.device.store(index.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn set_routes(&self, routes: BTreeSet<IpNetwork>) {
        *self.routes.lock().unwrap_or_else(PoisonError::into_inner) = routes;
    }

    /// Adds and removes destinations of the routes we want (an incremental run).
    pub fn update_routes(&self, add: &[IpNetwork], remove: &[IpNetwork]) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        for r in remove {
            routes.remove(r);
        }
        routes.extend(add.iter().copied());
    }

    /// A new receiver; the previous one (if any) receives nothing more.
    pub fn subscribe(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        *self.notify.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        rx
    }

    /// Whether a change that concerns us was seen since the last call (then, or at start: true).
    pub fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn wake(&self) {
        self.changed.store(true, Ordering::SeqCst);
        if let Some(tx) = &*self.notify.lock().unwrap_or_else(PoisonError::into_inner) {
            // Full means a wake-up is already pending: nothing is lost.
            let _ = tx.try_send(());
        }
    }

    /// Whether a change might undo what the reconciler put in place.
    pub fn concerns(&self, change: &Change) -> bool {
        let device = self.device.load(Ordering::Relaxed);
        let ours = |index: u32| device != 0 && index == device;
        match change {
            Change::Overrun => true,
            Change::Route { deleted, route } if route.table == RT_TABLE_MAIN => {
                if *deleted {
                    route.protocol == Some(TRELLISD_PROTO)
                } else {
                    route.protocol != Some(TRELLISD_PROTO)
                        && self
                            .routes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .contains(&route.destination)
                }
            }
            Change::Neighbour {
                deleted: true,
                neighbour,
            } => ours(neighbour.index),
            Change::Fdb { deleted: true, entry } => ours(entry.index),
            Change::Nexthop { deleted, nexthop } => {
                NEXTHOP_ID_RANGE.contains(&nexthop.id) && (*deleted == (nexthop.protocol == Some(TRELLISD_PROTO)))
            }
            Change::Link { deleted, link } => ours(link.index) && (*deleted || !link.up),
            _ => false,
        }
    }
}

/// Opens the monitor in the namespace at `ns` (now, so that errors show at start-up) and spawns
/// the task that reads it; the task reopens it (and wakes the receiver) if the socket fails.
/// `ns_file` is kept open by the task when `ns` is a `/proc/self/fd/N` path to it. `nexthops`:
/// watch nexthop objects too (a kernel without them refuses the group).
pub fn spawn(
    ns: PathBuf,
    interest: Arc<Interest>,
    ns_file: Arc<std::fs::File>,
    nexthops: bool,
) -> Result<tokio::task::JoinHandle<()>, NetError> {
    let mut groups = vec![Group::Ipv4Route, Group::Ipv6Route, Group::Neighbour, Group::Link];
    if nexthops {
        groups.push(Group::Nexthop);
    }
    let mut monitor = Monitor::open_in(&ns, &groups)?;
    Ok(tokio::spawn(async move {
        let _ns_file = ns_file;
        loop {
            while let Some(change) = monitor.next().await {
                if interest.concerns(&change) {
                    tracing::debug!(?change, "kernel change concerns the dataplane");
                    interest.wake();
                }
            }
            tracing::warn!("kernel change notifications stopped; reopening");
            let mut logged = false;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match Monitor::open_in(&ns, &groups) {
                    Ok(m) => {
                        monitor = m;
                        // Whatever happened meanwhile was missed.
                        interest.wake();
                        break;
                    }
                    // Retried every second; logged once.
                    Err(e) if !logged => {
                        tracing::warn!("reopening kernel change notifications: {e}; retrying every second");
                        logged = true;
                    }
                    Err(_) => {}
                }
            }
        }
    }))
}

/// Spawns the task that wakes the reconciler when someone undoes the nftables table `watch`
/// follows ([`trellis_net::nft::TableWatch`]); on a socket failure it reopens the watch with
/// `reopen` in the namespace at `ns` (and wakes the receiver: changes were missed meanwhile).
pub fn spawn_table_watch(
    ns: PathBuf,
    mut watch: trellis_net::nft::TableWatch,
    interest: Arc<Interest>,
    ns_file: Arc<std::fs::File>,
    reopen: impl Fn() -> Result<trellis_net::nft::TableWatch, trellis_net::nft::NftError> + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ns_file = ns_file;
        loop {
            match watch.changed().await {
                Ok(()) => {
                    tracing::debug!("the masquerade table was changed by someone else");
                    interest.wake();
                }
                Err(e) => {
                    tracing::warn!("nftables change notifications failed ({e}); reopening");
                    // Retried every second; a failure is logged once, not every second.
                    let mut logged = false;
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let failure = match trellis_net::netns::run_in(&ns, &reopen) {
                            Ok(Ok(w)) => {
                                watch = w;
                                interest.wake();
                                break;
                            }
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                        };
                        if !logged {
                            tracing::warn!("reopening nftables change notifications: {failure}; retrying every second");
                            logged = true;
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_net::{Neighbour, NeighbourState, Route};

    #[test]
    fn only_changes_that_undo_our_work_concern_us() {
        let interest = Interest::default();
        interest.set_device(Some(7));
        interest.set_routes(["10.244.2.0/24".parse().unwrap()].into());
        let ours = Route::new("10.244.2.0/24".parse().unwrap()).protocol(TRELLISD_PROTO);
        let theirs = Route::new("10.244.2.0/24".parse().unwrap()).protocol(3);
        let elsewhere = Route::new("10.9.0.0/24".parse().unwrap()).protocol(3);
        let route = |deleted, route: &Route| Change::Route {
            deleted,
            route: route.clone(),
        };
        assert!(interest.concerns(&route(true, &ours)));
        assert!(!interest.concerns(&route(false, &ours)), "our own additions");
        assert!(
            interest.concerns(&route(false, &theirs)),
            "someone took our destination"
        );
        assert!(!interest.concerns(&route(true, &theirs)));
        assert!(!interest.concerns(&route(false, &elsewhere)));
        let neigh = |index| Change::Neighbour {
            deleted: true,
            neighbour: Neighbour {
                index,
                ip: "10.244.2.0".parse().unwrap(),
                mac: None,
                state: NeighbourState::Permanent,
            },
        };
        assert!(interest.concerns(&neigh(7)));
        assert!(!interest.concerns(&neigh(8)));
        let nexthop = |deleted, id, protocol| Change::Nexthop {
            deleted,
            nexthop: trellis_net::Nexthop::new(id, trellis_net::IpFamily::V4)
                .dev(7)
                .protocol(protocol),
        };
        let ours = NEXTHOP_ID_RANGE.start + 3;
        assert!(interest.concerns(&nexthop(true, ours, TRELLISD_PROTO)));
        assert!(!interest.concerns(&nexthop(false, ours, TRELLISD_PROTO)), "our own");
        assert!(interest.concerns(&nexthop(false, ours, 3)), "someone took our ID");
        assert!(!interest.concerns(&nexthop(true, 5, 3)));
        assert!(interest.concerns(&Change::Overrun));

        let mut rx = interest.subscribe();
        assert!(!interest.take_changed());
        interest.wake();
        interest.wake();
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "a burst wakes once");
        assert!(interest.take_changed());
        assert!(!interest.take_changed(), "taken");
    }
}
