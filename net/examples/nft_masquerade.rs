//! Masquerade pod traffic with nftables, over netlink.
//!
//! It changes the firewall of the network namespace it runs in, so run it in a scratch one:
//!
//! ```text
//! ip netns add demo
//! ip netns exec demo cargo run -p trellis-net --example nft_masquerade -- ensure 10.244.0.0/16
//! ip netns exec demo cargo run -p trellis-net --example nft_masquerade -- add 10.244.1.5
//! ip netns exec demo nft list ruleset
//! ip netns exec demo cargo run -p trellis-net --example nft_masquerade -- list
//! ip netns exec demo cargo run -p trellis-net --example nft_masquerade -- del 10.244.1.5
//! ip netns exec demo cargo run -p trellis-net --example nft_masquerade -- delete-all
//! ip netns del demo
//! ```

use std::process::ExitCode;

use trellis_net::nft::{Masquerade, MasqueradeConfig};

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (cmd, rest) = args
        .split_first()
        .ok_or("usage: nft_masquerade ensure|add|del|list|delete-all [ARGS]")?;
    let exempt = if cmd == "ensure" {
        rest.iter().map(|p| p.parse()).collect::<Result<Vec<_>, _>>()?
    } else {
        vec![]
    };
    let masq = Masquerade::new(MasqueradeConfig::new(exempt))?;
    match cmd.as_str() {
        "ensure" => masq.ensure()?,
        "add" => rest
            .iter()
            .try_for_each(|ip| Ok::<_, Box<dyn std::error::Error>>(masq.add_source(ip.parse()?)?))?,
        "del" => rest
            .iter()
            .try_for_each(|ip| Ok::<_, Box<dyn std::error::Error>>(masq.remove_source(ip.parse()?)?))?,
        "list" => {
            let show = |v: Vec<String>| v.join(" ");
            println!(
                "sources: {}",
                show(masq.list_sources()?.iter().map(|a| a.to_string()).collect())
            );
            println!(
                "source prefixes: {}",
                show(masq.list_source_prefixes()?.iter().map(|p| p.to_string()).collect())
            );
            println!(
                "exempt destinations: {}",
                show(masq.list_exempt_destinations()?.iter().map(|p| p.to_string()).collect())
            );
        }
        "delete-all" => masq.delete_all()?,
        other => return Err(format!("unknown command {other}").into()),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nft_masquerade: {e}");
            ExitCode::FAILURE
        }
    }
}
