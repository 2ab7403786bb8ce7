//! The CNI verbs of `trellis-ipam`.

use crate::allocator::{allocate, exhausted, free};
use crate::config::IpamConfig;
use crate::store::Store;
use serde::Deserialize;
use std::collections::HashSet;
use trellis_cni::{code, CniError, CniResult, Context, Plugin};

/// The IPAM plugin. It reads only the `ipam` section and the network name of the config.
pub struct IpamPlugin;

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
