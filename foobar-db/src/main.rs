//! `foobar-db run --config db.toml`: the database node agent of the foobar.com stack.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use foobar_db::config::Config;

/// The database node agent: bootstraps, configures and supervises MariaDB.
///
/// Examples:
///   foobar-db run --config /etc/foobar/db.toml
///   foobar-db check --config db.toml
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Bootstrap MariaDB if needed, start it and supervise it until SIGTERM.
    Run {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Only check the configuration.
    Check {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

#[global_allocator]
static ALLOCATOR: foobar_node::Allocator = foobar_node::Allocator;

fn main() -> ExitCode {
    let args = Args::parse();
    foobar_node::init_tracing();
    let (Cmd::Run { config: path } | Cmd::Check { config: path }) = &args.command;
    let config: Config = match foobar_node::config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("foobar-db: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(args.command, Cmd::Check { .. }) {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        let (shutdown, _hangups) = foobar_node::signals::install()?;
        foobar_db::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foobar-db: {e:#}");
            ExitCode::FAILURE
        }
    }
}
