//! `foobar-web --config web.toml`: the web node of the foobar.com stack.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use foobar_web::config::Config;

/// The web node: static files, a reverse proxy to the application nodes, TLS.
///
/// SIGHUP re-reads the certificate and key without dropping a connection; SIGTERM
/// stops accepting and lets requests in flight finish. With `[acme]` the node obtains
/// its certificate from an ACME CA and renews it itself, swapped in the same way.
///
/// Examples:
///   foobar-web --config /etc/foobar/web.toml
///   foobar-web --config web.toml --check
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[global_allocator]
static ALLOCATOR: foobar_node::Allocator = foobar_node::Allocator;

fn main() -> ExitCode {
    let args = Args::parse();
    foobar_node::init_tracing();
    let config: Config = match foobar_node::config::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("foobar-web: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    // Before the node listens, so its ports are guarded from the first connection.
    let firewall = match foobar_node::firewall::install("foobar_web", config.firewall.as_ref()) {
        Ok(table) => table,
        Err(e) => {
            eprintln!("foobar-web: firewall: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("WT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let (shutdown, hangups) = foobar_node::signals::install()?;
        foobar_web::run(config, shutdown, Some(hangups)).await
    });
    // A clean stop; the host stays closed by its other nodes' tables.
    if let Some(table) = firewall {
        table.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foobar-web: {e:#}");
            ExitCode::FAILURE
        }
    }
}
