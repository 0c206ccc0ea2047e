//! `foobar-app --config app.toml`: the application node of the foobar.com stack.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use foobar_app::config::Config;

/// The application node: a posts API on MariaDB.
///
/// It starts even when the database is away, answers 503 until it is back, and
/// creates its schema once the primary answers. With `[tls]` it serves HTTPS only, and
/// SIGHUP re-reads the certificate and key without dropping a connection.
///
/// Examples:
///   foobar-app --config /etc/foobar/app.toml
///   foobar-app --config app.toml --check
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
            eprintln!("foobar-app: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    // Before the node listens, so its port is guarded from the first connection.
    let firewall = match foobar_node::firewall::install("foobar_app", config.firewall.as_ref()) {
        Ok(table) => table,
        Err(e) => {
            eprintln!("foobar-app: firewall: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let (shutdown, hangups) = foobar_node::signals::install()?;
        foobar_app::run(config, shutdown, Some(hangups)).await
    });
    // A clean stop; the host stays closed by its other nodes' tables.
    if let Some(table) = firewall {
        table.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foobar-app: {e:#}");
            ExitCode::FAILURE
        }
    }
}
