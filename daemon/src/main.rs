//! `trellisd`: leases this node's pod CIDR, writes the node's CNI config and keeps the
//! dataplane to every other node converged. See `--help`, and `trellisd::start` for what it runs.

use clap::Parser;
use tracing::{error, info};
use trellisd::cli::{Args, Cmd};

fn main() {
    tracing_subscriber::fmt()
        // Logs on stderr, as every node daemon (stdout is for what a command prints).
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(log_filter())
        .init();
    let args = Args::parse();
    // The one TLS crypto provider (the Kubernetes client's HTTPS): explicit, so no build that
    // happens to enable a second provider can leave rustls unable to choose one at run time.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Cmd::InstallCni { from, to }) = &args.cmd {
        match trellisd::install::install(from, to, trellisd::install::PLUGINS) {
            Ok(written) => {
                info!(to = %to.display(), ?written, "CNI plugins installed");
                return;
            }
            Err(e) => {
                error!("install-cni: {e}");
                std::process::exit(1);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(trellisd::start::run(args)) {
        error!("{e}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` (default `info`), with the Kubernetes client's own lines off unless it names
/// them: they come once per failed attempt without a cause ("failed with error client error
/// (Connect)"), while trellisd logs each failure once per cause with its whole chain
/// (`datastore::retry`).
fn log_filter() -> tracing_subscriber::EnvFilter {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let spec = if spec.contains("kube") {
        spec
    } else {
        format!("{spec},kube_client=off,kube_runtime=off")
    };
    tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("RUST_LOG={spec}: {e}; logging at info");
        tracing_subscriber::EnvFilter::new("info,kube_client=off,kube_runtime=off")
    })
}
