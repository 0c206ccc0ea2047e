//! `foobar-db run --config db.toml`: the database node agent of the foobar.com stack.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use foobar_db::config::Config;
use hyper::Method;

/// The database node agent: bootstraps, configures and supervises MariaDB, and
/// decides its role in a replicated primary/replica pair.
///
/// Examples:
///   foobar-db run --config /etc/foobar/db.toml
///   foobar-db check --config db.toml
///   foobar-db status --config db.toml
///   foobar-db promote --config db.toml      # this replica becomes the primary
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
    /// The running node's status (JSON), from its agent.
    Status {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Make this node, a replica, the primary: fence the old primary, apply all it
    /// had, stop replicating, open writes. Refused when the old primary cannot be
    /// fenced and the balancers still see it up.
    Promote {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Promote even when the old primary can be neither fenced nor seen down,
        /// or had fallen back to asynchronous: acknowledged writes may be lost.
        #[arg(long)]
        force: bool,
    },
}

#[global_allocator]
static ALLOCATOR: foobar_node::Allocator = foobar_node::Allocator;

fn main() -> ExitCode {
    let args = Args::parse();
    foobar_node::init_tracing();
    let (Cmd::Run { config: path }
    | Cmd::Check { config: path }
    | Cmd::Status { config: path }
    | Cmd::Promote { config: path, .. }) = &args.command;
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
    // A running node's, before MariaDB and the agent listen.
    let firewall = if matches!(args.command, Cmd::Run { .. }) {
        foobar_node::firewall::install("foobar_db", config.firewall.as_ref())
    } else {
        Ok(None)
    };
    let firewall = match firewall {
        Ok(table) => table,
        Err(e) => {
            eprintln!("foobar-db: firewall: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match args.command {
            Cmd::Status { .. } => ask(&config, Method::GET, "/status").await,
            Cmd::Promote { force, .. } => {
                let path = if force {
                    "/promote?force=true"
                } else {
                    "/promote"
                };
                ask(&config, Method::POST, path).await
            }
            _ => {
                let (shutdown, _hangups) = foobar_node::signals::install()?;
                foobar_db::run(config, shutdown).await
            }
        }
    });
    // A clean stop (MariaDB stopped); the host stays closed by its other nodes' tables.
    if let Some(table) = firewall {
        table.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foobar-db: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One request to the running agent; its answer printed.
async fn ask(config: &Config, method: Method, path: &str) -> anyhow::Result<()> {
    let token = match &config.replication {
        Some(repl) => Some(std::fs::read_to_string(&repl.password_file)?),
        None => None,
    };
    let (status, body) = foobar_db::peer::request(
        config.http,
        method,
        path,
        token.as_deref().map(str::trim),
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| anyhow::anyhow!("the agent at {}: {e}", config.http))?;
    let body = String::from_utf8_lossy(&body);
    if status == 200 {
        println!("{}", body.trim_end());
        Ok(())
    } else {
        anyhow::bail!("{}", body.trim_end())
    }
}
