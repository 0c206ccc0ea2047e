//! `foobar-db`: the database node agent of the foobar.com stack. It bootstraps a
//! MariaDB server on first start, writes its configuration, runs and supervises it
//! ([`mariadb`]), keeps the application's schema and account in place, and decides
//! the node's role in a replicated pair ([`node`]), which it serves to the balancers
//! and its peer over HTTP ([`http`]).

pub mod config;
pub mod gtid;
pub mod http;
pub mod mariadb;
pub mod node;
pub mod peer;
pub mod server_state;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use foobar_node::{server::Server, signals::Shutdown};
use mysql_async::{Pool, prelude::Queryable};
use tokio::process::Child;
use tracing::{info, warn};

use crate::{
    config::Config,
    mariadb::{Paths, ServerError, quote},
    node::Node,
};

/// How long MariaDB gets to start (crash recovery included) and to stop.
const START_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How often the node looks at its server, its peer and the witness.
const TICK: Duration = Duration::from_millis(100);
/// MariaDB exiting this many times in a row, each within a minute of its start,
/// ends the agent (the service manager decides what next).
const RESTARTS: u32 = 3;

/// Runs the node until `shutdown` (then stops MariaDB cleanly). MariaDB exiting by
/// itself is started again, read-only: the node's role is decided again.
pub async fn run(config: Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    warn_about_shared_secrets(&config);
    let paths = Paths::new(&config.state_dir);
    let created = mariadb::bootstrap(&paths).await?;
    mariadb::write_cnf(&config, &paths)?;
    let pool = mariadb::agent_pool(&paths)?;
    let mut server = start(&config, &paths, &pool).await?;
    let node = Arc::new(Node::new(config.clone(), pool.clone(), created)?);
    let http = {
        let node = node.clone();
        Server::start(
            config.http,
            None,
            move || http::router(node.clone()),
            Default::default(),
            shutdown.clone(),
        )
        .with_context(|| format!("listen {}", config.http))?
    };
    let ticks = tokio::spawn({
        let node = node.clone();
        async move {
            loop {
                node.tick().await;
                tokio::time::sleep(TICK).await;
            }
        }
    });
    info!(listen = %config.listen, http = %config.http, "serving");
    let mut failures = 0;
    let outcome = loop {
        let started = Instant::now();
        tokio::select! {
            status = server.wait() => {
                warn!("mariadbd exited by itself ({status:?}): starting it again, read-only");
                node.mariadb_restarting();
                failures = if started.elapsed() < Duration::from_secs(60) { failures + 1 } else { 1 };
                if failures >= RESTARTS {
                    break Err(anyhow::anyhow!("mariadbd exited {failures} times in a row"));
                }
                match start(&config, &paths, &pool).await {
                    Ok(next) => server = next,
                    Err(e) => break Err(e.into()),
                }
            }
            _ = shutdown.wait() => {
                info!("stopping mariadbd");
                ticks.abort();
                mariadb::stop(&mut server, STOP_LIMIT).await;
                break Ok(());
            }
        }
    };
    ticks.abort();
    http.finished().await;
    if let Err(e) = pool.disconnect().await {
        warn!("closing the agent's connections: {e}");
    }
    outcome
}

/// Says, at every start, which password files others than this service may read:
/// still used (refusing them would stop a working node), but not secret there.
fn warn_about_shared_secrets(config: &Config) {
    let files = std::iter::once(&config.app.password_file)
        .chain(config.replication.as_ref().map(|r| &r.password_file));
    for file in files {
        if let Some(mode) = crate::config::readable_by_others(file) {
            warn!(
                file = %file.display(),
                mode = %format!("{mode:o}"),
                "a password file others may read: chmod 600 it"
            );
        }
    }
}

/// Starts MariaDB, waits until it answers, and puts the accounts in place.
async fn start(config: &Config, paths: &Paths, pool: &Pool) -> Result<Child, ServerError> {
    let mut server = mariadb::spawn(paths)?;
    let ready = async {
        mariadb::ensure_agent_account(&mut server, paths, START_LIMIT).await?;
        mariadb::wait_ready(&mut server, pool, START_LIMIT).await?;
        ensure_accounts(config, pool).await
    };
    if let Err(e) = ready.await {
        mariadb::stop(&mut server, STOP_LIMIT).await;
        return Err(e);
    }
    Ok(server)
}

/// Creates the application's schema and account, and the replication account, if
/// missing, and sets their passwords and rights from the configuration (which may
/// have changed since). Each node does it for itself, outside the binary log, so no
/// node ever holds a transaction of its own before it first replicates.
async fn ensure_accounts(config: &Config, pool: &Pool) -> Result<(), ServerError> {
    let app = &config.app;
    let password =
        std::fs::read_to_string(&app.password_file).map_err(|source| ServerError::File {
            path: app.password_file.clone(),
            source,
        })?;
    let password = quote(password.trim_end_matches(['\r', '\n']));
    // Identifiers were checked to be [A-Za-z0-9_] when the configuration was read.
    let account = format!("'{}'@{}", app.user, quote(&app.allow_from));
    let mut conn = pool.get_conn().await?;
    conn.query_drop("SET SESSION sql_log_bin = 0").await?;
    conn.query_drop(format!(
        "CREATE DATABASE IF NOT EXISTS `{}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        app.database
    ))
    .await?;
    conn.query_drop(format!(
        "CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {password}"
    ))
    .await?;
    conn.query_drop(format!("ALTER USER {account} IDENTIFIED BY {password}"))
        .await?;
    conn.query_drop(format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP ON `{}`.* TO {account}",
        app.database
    ))
    .await?;
    if let Some(repl) = &config.replication {
        let password =
            std::fs::read_to_string(&repl.password_file).map_err(|source| ServerError::File {
                path: repl.password_file.clone(),
                source,
            })?;
        let password = quote(password.trim_end_matches(['\r', '\n']));
        let account = format!("'{}'@'%'", repl.user);
        conn.query_drop(format!(
            "CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {password}"
        ))
        .await?;
        conn.query_drop(format!("ALTER USER {account} IDENTIFIED BY {password}"))
            .await?;
        conn.query_drop(format!("GRANT REPLICATION SLAVE ON *.* TO {account}"))
            .await?;
    }
    // A connection without the binary log must not go back to the pool.
    conn.disconnect().await?;
    info!(
        database = app.database,
        user = app.user,
        "accounts in place"
    );
    Ok(())
}
