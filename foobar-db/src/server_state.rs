//! What the agent reads of its MariaDB (one snapshot per tick: positions, replication,
//! semi-sync) and the statements that change its role.

use std::{path::Path, time::Duration};

use mysql_async::{Conn, Row, prelude::Queryable};
use serde::{Deserialize, Serialize};

use crate::mariadb::{ServerError, quote};

/// The server's state as one tick reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `read_only`.
    pub read_only: bool,
    /// Last transaction written to this server's binary log, per domain.
    pub gtid_binlog_pos: String,
    /// Last transaction per domain and server ever in its binary log.
    pub gtid_binlog_state: String,
    /// Last transaction applied by replication, per domain.
    pub gtid_slave_pos: String,
    /// Replication, when configured.
    pub replication: Option<ReplicaState>,
    /// Semi-synchronous replication as the primary side counts it.
    pub semi_sync: SemiSync,
}

/// `SHOW SLAVE STATUS`, the fields that matter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The primary it replicates from, `host:port`.
    pub primary: String,
    /// `Yes`, `Connecting` or `No`.
    pub io_running: String,
    /// Whether the SQL thread runs.
    pub sql_running: bool,
    /// Received into the relay log.
    pub gtid_io_pos: String,
    /// `Seconds_Behind_Master`; none while a thread is stopped.
    pub lag_seconds: Option<u64>,
    /// Last IO error (number, text).
    pub io_error: (u32, String),
    /// Last SQL error.
    pub sql_error: (u32, String),
}

/// `Rpl_semi_sync_master_*`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SemiSync {
    /// Semi-sync enabled on this server as a primary.
    pub enabled: bool,
    /// On: commits wait for a replica; off while enabled: fallen back to asynchronous
    /// (a timeout), when an acknowledged write may live on this server only.
    pub active: bool,
    /// Replicas attached in semi-sync mode.
    pub clients: u64,
    /// Commits a replica acknowledged.
    pub acknowledged: u64,
    /// Commits not acknowledged (asynchronous).
    pub unacknowledged: u64,
    /// Times it fell back to asynchronous.
    pub fallbacks: u64,
}

impl Snapshot {
    /// Reads it.
    pub async fn read(conn: &mut Conn) -> Result<Snapshot, ServerError> {
        let (read_only, binlog_pos, binlog_state, slave_pos, enabled): (
            bool,
            String,
            String,
            String,
            bool,
        ) = conn
            .query_first(
                "SELECT @@read_only, @@gtid_binlog_pos, @@gtid_binlog_state, @@gtid_slave_pos, \
                 @@rpl_semi_sync_master_enabled",
            )
            .await?
            .unwrap_or_default();
        let slave: Option<Row> = conn.query_first("SHOW SLAVE STATUS").await?;
        let replication = slave.map(|row| {
            let text = |name: &str| -> String {
                row.get_opt::<Option<String>, _>(name)
                    .and_then(Result::ok)
                    .flatten()
                    .unwrap_or_default()
            };
            let number = |name: &str| -> Option<u64> {
                row.get_opt::<Option<u64>, _>(name)
                    .and_then(Result::ok)
                    .flatten()
            };
            ReplicaState {
                primary: format!("{}:{}", text("Master_Host"), text("Master_Port")),
                io_running: text("Slave_IO_Running"),
                sql_running: text("Slave_SQL_Running") == "Yes",
                gtid_io_pos: text("Gtid_IO_Pos"),
                lag_seconds: number("Seconds_Behind_Master"),
                io_error: (
                    number("Last_IO_Errno").unwrap_or(0) as u32,
                    text("Last_IO_Error"),
                ),
                sql_error: (
                    number("Last_SQL_Errno").unwrap_or(0) as u32,
                    text("Last_SQL_Error"),
                ),
            }
        });
        let counters: Vec<(String, String)> = conn
            .query("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_%'")
            .await?;
        let counter = |name: &str| -> Option<&str> {
            counters
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let count = |name: &str| counter(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let semi_sync = SemiSync {
            enabled,
            active: enabled && counter("Rpl_semi_sync_master_status") == Some("ON"),
            clients: count("Rpl_semi_sync_master_clients"),
            acknowledged: count("Rpl_semi_sync_master_yes_tx"),
            unacknowledged: count("Rpl_semi_sync_master_no_tx"),
            fallbacks: count("Rpl_semi_sync_master_no_times"),
        };
        Ok(Snapshot {
            read_only,
            gtid_binlog_pos: binlog_pos,
            gtid_binlog_state: binlog_state,
            gtid_slave_pos: slave_pos,
            replication,
            semi_sync,
        })
    }
}

/// Stops writes: `read_only` binds every account but the agent's (the application's
/// account has rights on its schema only), and semi-sync's primary side goes off.
pub async fn fence(conn: &mut Conn) -> Result<(), ServerError> {
    conn.query_drop("SET GLOBAL read_only = ON").await?;
    conn.query_drop("SET GLOBAL rpl_semi_sync_master_enabled = OFF")
        .await?;
    Ok(())
}

/// Opens writes, semi-sync's primary side on (commits wait for a replica's
/// acknowledgement after the binary log is synced: `AFTER_SYNC`, set in `my.cnf`).
pub async fn open_writes(conn: &mut Conn) -> Result<(), ServerError> {
    conn.query_drop("SET GLOBAL rpl_semi_sync_master_enabled = ON")
        .await?;
    conn.query_drop("SET GLOBAL read_only = OFF").await?;
    Ok(())
}

/// Replicates from `primary` by GTID; `demote` merges this server's own binary log
/// position into its replication position first (a former primary rejoining). With
/// `tls_ca`, over TLS, the primary's certificate checked against that CA and its
/// address (what MASTER_HOST names).
pub async fn replicate_from(
    conn: &mut Conn,
    primary: std::net::SocketAddr,
    user: &str,
    password: &str,
    demote: bool,
    tls_ca: Option<&Path>,
) -> Result<(), ServerError> {
    // Every option said, as CHANGE MASTER keeps those it is not given.
    let tls = match tls_ca {
        Some(ca) => format!(
            "MASTER_SSL=1, MASTER_SSL_CA={}, MASTER_SSL_VERIFY_SERVER_CERT=1",
            quote(&ca.display().to_string())
        ),
        None => "MASTER_SSL=0, MASTER_SSL_VERIFY_SERVER_CERT=0".into(),
    };
    conn.query_drop("STOP SLAVE").await?;
    conn.query_drop(format!(
        "CHANGE MASTER TO MASTER_HOST={}, MASTER_PORT={}, MASTER_USER={}, MASTER_PASSWORD={}, \
         {tls}, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1{}",
        quote(&primary.ip().to_string()),
        primary.port(),
        quote(user),
        quote(password),
        if demote {
            ", MASTER_DEMOTE_TO_SLAVE=1"
        } else {
            ""
        }
    ))
    .await?;
    conn.query_drop("START SLAVE").await?;
    Ok(())
}

/// Waits until replication has applied `position`: `Ok(true)` when it has,
/// `Ok(false)` when `limit` passed first.
pub async fn wait_applied(
    conn: &mut Conn,
    position: &str,
    limit: Duration,
) -> Result<bool, ServerError> {
    let reached: Option<i64> = conn
        .exec_first(
            "SELECT MASTER_GTID_WAIT(?, ?)",
            (position, limit.as_secs_f64()),
        )
        .await?;
    Ok(reached == Some(0))
}
