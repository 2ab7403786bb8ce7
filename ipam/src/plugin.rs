//! The CNI verbs of `trellis-ipam`.
//!
//! **ADD reserves nothing for a plugin that is gone.** A runtime that gives up on an ADD kills
//! the main plugin and runs DEL; if this process (the main plugin's child) went on and reserved
//! after that DEL, the address would leak until GC or a reboot. `trellis` ties its delegates'
//! lives to its own (`PR_SET_PDEATHSIG`, see `trellis_cni::delegate`), but other main plugins
//! (the reference ones, in Go) do not. So ADD also checks, once it holds the store's lock and
//! before it writes anything, that its parent is still the process that started it: a dead
//! parent's children are re-parented (`getppid` changes) before the runtime can see it die, so
//! either the check sees the death, or the runtime's DEL comes later and must wait for the lock
//! held through the reservation, and then finds it. The parent is read when the process starts
//! ([`IpamPlugin::new`]); a parent that died before even that is not seen (a window of one
//! `exec`, which `trellis` closes on its side).

use crate::allocator::{allocate, exhausted, free};
use crate::config::IpamConfig;
use crate::store::Store;
use serde::Deserialize;
use std::collections::HashSet;
use trellis_cni::{code, CniError, CniResult, Context, Plugin};

/// The IPAM plugin. It reads only the `ipam` section and the network name of the config.
pub struct IpamPlugin {
    /// The process that started this one (see the module notes).
    parent: libc::pid_t,
}

impl IpamPlugin {
    /// To be made first thing in `main`: remembers the parent process.
    #[allow(clippy::new_without_default)] // reading the parent now is the point
    pub fn new() -> IpamPlugin {
        // SAFETY: getppid has no preconditions and cannot fail.
        IpamPlugin {
            parent: unsafe { libc::getppid() },
        }
    }

    /// Refuses to reserve once the plugin that asked has exited (see the module notes).
    fn parent_still_waits(&self) -> Result<(), CniError> {
        // SAFETY: as above.
        if unsafe { libc::getppid() } == self.parent {
            return Ok(());
        }
        Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "the plugin that ran this ADD (process {}) has exited: reserving nothing",
                self.parent
            ),
        )
        .with_details(
            "its runtime gave up on this ADD and runs (or ran) DEL; a reservation made now would leak. \
             A retried ADD gets an address",
        ))
    }
}

/// No fields of its own at the top level of the network config.
#[derive(Deserialize)]
pub struct TopLevel {}

type Ctx = Context<TopLevel>;

fn ipam_config(ctx: &Ctx) -> Result<IpamConfig, CniError> {
    IpamConfig::from_value(ctx.conf.ipam.as_ref())
}

impl Plugin for IpamPlugin {
    type Config = TopLevel;

    fn add(&self, ctx: &Ctx) -> Result<CniResult, CniError> {
        let conf = ipam_config(ctx)?;
        let store = Store::open(&conf.data_dir, &ctx.conf.name)?;
        let mut locked = store.lock()?;
        self.parent_still_waits()?;
        let ips = allocate(&mut locked, &conf, &ctx.env.container_id, &ctx.env.ifname)?;
        locked.close()?;
        Ok(CniResult {
            interfaces: Vec::new(),
            ips,
            routes: conf.routes.clone(),
            dns: conf.dns.clone().unwrap_or_default(),
        })
    }

    fn del(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = ipam_config(ctx)?;
        let Some(store) = Store::open_existing(&conf.data_dir, &ctx.conf.name)? else {
            return Ok(());
        };
        let mut locked = store.lock()?;
        locked.release(&ctx.env.container_id, &ctx.env.ifname)?;
        locked.close()
    }

    fn check(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = ipam_config(ctx)?;
        let missing = || {
            CniError::new(
                code::CHECK_MISMATCH,
                format!(
                    "no address is reserved for container {} interface {}",
                    ctx.env.container_id, ctx.env.ifname
                ),
            )
        };
        let store = Store::open_existing(&conf.data_dir, &ctx.conf.name)?.ok_or_else(missing)?;
        let locked = store.lock()?;
        let held = locked.get(&ctx.env.container_id, &ctx.env.ifname);
        if let Some(set) = conf.range_sets.iter().find(|s| !held.iter().any(|&ip| s.contains(ip))) {
            return Err(missing().with_details(format!("nothing held in range set {}", set.describe())));
        }
        if let Some(prev) = ctx.conf.prev_result()? {
            for ip in prev
                .ips
                .iter()
                .map(|c| c.address.ip())
                .filter(|ip| conf.range_sets.iter().any(|s| s.contains(*ip)))
            {
                if !held.contains(&ip) {
                    return Err(missing().with_details(format!("{ip} from prevResult is not reserved for it")));
                }
            }
        }
        Ok(())
    }

    fn status(&self, ctx: &Ctx) -> Result<(), CniError> {
        let unavailable = |e: CniError| CniError::new(code::PLUGIN_NOT_AVAILABLE, e.msg).with_details(e.details);
        let conf = ipam_config(ctx)?;
        let store = Store::open(&conf.data_dir, &ctx.conf.name).map_err(unavailable)?;
        let locked = store.lock().map_err(unavailable)?;
        let reserved = locked.reserved_addresses().map_err(unavailable)?;
        locked.commit().map_err(unavailable)?;
        match conf.range_sets.iter().find(|set| free(set, &reserved) == 0) {
            Some(set) => Err(unavailable(exhausted(set))),
            None => Ok(()),
        }
    }

    fn gc(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = ipam_config(ctx)?;
        let valid = ctx.conf.valid_attachments.as_ref().ok_or_else(|| {
            CniError::invalid_config("GC without \"cni.dev/valid-attachments\"")
                .with_details("refusing to guess which reservations are in use; the runtime must list them")
        })?;
        let Some(store) = Store::open_existing(&conf.data_dir, &ctx.conf.name)? else {
            return Ok(());
        };
        let valid_pairs: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let valid_ids: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
        let mut locked = store.lock()?;
        for r in locked.reservations()? {
            let in_use = if r.ifname.is_empty() {
                valid_ids.contains(r.container_id.as_str())
            } else {
                valid_pairs.contains(&(r.container_id.as_str(), r.ifname.as_str()))
            };
            if !in_use {
                locked.release_ip(&r)?;
            }
        }
        locked.close()
    }
}
