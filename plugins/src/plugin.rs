//! The CNI verbs of `trellis`. ADD reads like the recipe: config → IPAM → wire the pod → result;
//! any failure after IPAM undoes the wiring and releases the reservation before the error is
//! printed. DEL always releases the reservation, whatever else happened.

use crate::config::{Config, PluginFields};
use crate::{sandbox, wire};
use trellis_cni::delegate;
use trellis_cni::{code, CniError, CniResult, Command, Context, Plugin};

pub struct TrellisPlugin;

type Ctx = Context<PluginFields>;

/// The plugins run one `current_thread` runtime per invocation: netlink replies are awaited,
/// never polled by threads of their own.
fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO, "cannot start the netlink runtime").with_details(e.to_string()))
}

/// `CNI_NETNS`, which the skeleton requires for ADD and CHECK.
fn pod_netns(ctx: &Ctx) -> &std::path::Path {
    ctx.env
        .netns
        .as_deref()
        .expect("the skeleton requires CNI_NETNS for ADD and CHECK")
}

/// Appends a follow-up failure (from an undo) to the error being reported.
fn also(mut e: CniError, what: &str, r: Result<(), CniError>) -> CniError {
    if let Err(f) = r {
        let sep = if e.details.is_empty() { "" } else { "; " };
        e.details = format!("{}{sep}{what} also failed: {f}", e.details);
    }
    e
}

/// Whether the IPAM result can be wired: at least one address, and none with a /0 prefix, which
/// would put every destination on the pod network (the pod's "subnet" route and, on the
/// bridge, a prefix route competing with the node's default route). trellis-ipam refuses such
/// a subnet in its config; another IPAM plugin may not.
fn usable(ipam_type: &str, ipam: &CniResult) -> Result<(), CniError> {
    if ipam.ips.is_empty() {
        return Err(CniError::new(
            code::DELEGATE,
            format!("{ipam_type} returned no address"),
        ));
    }
    if let Some(ip) = ipam.ips.iter().find(|i| i.address.prefix() == 0) {
        return Err(CniError::invalid_config(format!(
            "{ipam_type} gave {}: a /0 pod subnet covers every address",
            ip.address
        ))
        .with_details("give the IPAM range the node's pod CIDR (like 10.244.1.0/24 or fd00:10:244:1::/64), not a /0"));
    }
    Ok(())
}

impl Plugin for TrellisPlugin {
    type Config = PluginFields;

    fn add(&self, ctx: &Ctx) -> Result<CniResult, CniError> {
        // Everything that can be refused is refused before IPAM: nothing to release then.
        let conf = Config::from_netconf(&ctx.conf)?;
        sandbox::check(pod_netns(ctx))?;
        let rt = runtime()?;
        rt.block_on(wire::preflight(&conf))?;
        let ipam = delegate::add(&conf.ipam_type, &ctx.raw, &ctx.env)?;
        let release = || delegate::call(&conf.ipam_type, Command::Del, &ctx.raw, &ctx.env);
        if let Err(e) = usable(&conf.ipam_type, &ipam) {
            return Err(also(e, "releasing the reservation", release()));
        }
        let mut created = wire::Created::default();
        let wired = rt.block_on(wire::add(
            &conf,
            &ctx.conf.name,
            &ctx.env,
            &ipam,
            ctx.conf.dns.as_ref(),
            &mut created,
        ));
        match wired {
            Ok(result) => Ok(result),
            Err(e) => {
                let e = also(
                    e,
                    "undoing the wiring",
                    rt.block_on(wire::undo(&conf, &ctx.conf.name, &ctx.env, &created)),
                );
                Err(also(e, "releasing the reservation", release()))
            }
        }
    }

    fn del(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = Config::from_netconf(&ctx.conf)?;
        let kernel = runtime().and_then(|rt| rt.block_on(wire::teardown(&conf, &ctx.conf.name, &ctx.env)));
        // Released whatever happened above: a reservation must never outlive its pod.
        let ipam = delegate::call(&conf.ipam_type, Command::Del, &ctx.raw, &ctx.env);
        match (kernel, ipam) {
            (Err(e), ipam) => Err(also(e, "releasing the reservation", ipam)),
            (Ok(()), ipam) => ipam,
        }
    }

    fn check(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = Config::from_netconf(&ctx.conf)?;
        let prev = ctx.conf.prev_result()?.ok_or_else(|| {
            CniError::invalid_config("CHECK needs prevResult")
                .with_details("the runtime passes the ADD result as prevResult")
        })?;
        sandbox::check(pod_netns(ctx))?;
        delegate::call(&conf.ipam_type, Command::Check, &ctx.raw, &ctx.env)?;
        runtime()?.block_on(wire::check(&conf, &ctx.conf.name, &ctx.env, &prev))
    }

    fn status(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = Config::from_netconf(&ctx.conf)?;
        runtime()?.block_on(wire::status(&conf))?;
        delegate::call(&conf.ipam_type, Command::Status, &ctx.raw, &ctx.env)
    }

    fn gc(&self, ctx: &Ctx) -> Result<(), CniError> {
        let conf = Config::from_netconf(&ctx.conf)?;
        let valid = ctx.conf.valid_attachments.as_deref().ok_or_else(|| {
            CniError::invalid_config("GC without \"cni.dev/valid-attachments\"")
                .with_details("refusing to guess which attachments are in use; the runtime must list them")
        })?;
        let kernel = runtime().and_then(|rt| rt.block_on(wire::gc(&ctx.conf.name, valid)));
        let ipam = delegate::call(&conf.ipam_type, Command::Gc, &ctx.raw, &ctx.env);
        match (kernel, ipam) {
            (Err(e), ipam) => Err(also(e, "IPAM GC", ipam)),
            (Ok(removed), ipam) => {
                if !removed.is_empty() {
                    eprintln!("trellis: GC removed {}", removed.join(", "));
                }
                ipam
            }
        }
    }
}
