//! `foobar-db`: the database node agent of the foobar.com stack. It bootstraps a
//! MariaDB server on first start, writes its configuration, runs and supervises it,
//! and keeps the application's schema and account in place ([`mariadb`]).

pub mod config;
pub mod mariadb;

use std::time::Duration;

use foobar_node::signals::Shutdown;
use mysql_async::{Pool, prelude::Queryable};
use tracing::{info, warn};

use crate::{
    config::Config,
    mariadb::{Paths, ServerError, quote},
};

/// How long MariaDB gets to start (crash recovery included) and to stop.
const START_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// Runs the node until `shutdown` (then stops MariaDB cleanly) or until MariaDB exits
/// by itself (an error: the service manager restarts the node).
pub async fn run(config: Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let paths = Paths::new(&config.state_dir);
    mariadb::bootstrap(&paths).await?;
    mariadb::write_cnf(&config, &paths)?;
    let mut server = mariadb::spawn(&paths)?;
    let pool = mariadb::agent_pool(&paths)?;
    let ready = async {
        mariadb::ensure_agent_account(&mut server, &paths, START_LIMIT).await?;
        mariadb::wait_ready(&mut server, &pool, START_LIMIT).await
    };
    if let Err(e) = ready.await {
        mariadb::stop(&mut server, STOP_LIMIT).await;
        return Err(e.into());
    }
    ensure_app_account(&config, &pool).await?;
    info!(listen = %config.listen, "serving");
    let outcome = tokio::select! {
        status = server.wait() => Err(anyhow::anyhow!("mariadbd exited by itself: {status:?}")),
        _ = shutdown.wait() => {
            info!("stopping mariadbd");
            mariadb::stop(&mut server, STOP_LIMIT).await;
            Ok(())
        }
    };
    if let Err(e) = pool.disconnect().await {
        warn!("closing the agent's connections: {e}");
    }
    outcome
}

/// Creates the application's schema and account if missing and sets the account's
/// password and rights from the configuration (which may have changed since).
async fn ensure_app_account(config: &Config, pool: &Pool) -> Result<(), ServerError> {
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
    info!(
        database = app.database,
        user = app.user,
        "application account in place"
    );
    Ok(())
}
