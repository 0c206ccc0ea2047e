//! One MariaDB server: its files under the node's state directory, its first-start
//! bootstrap, its process, and the agent's own connection to it (over the socket).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use mysql_async::{OptsBuilder, Pool, prelude::Queryable};
use rand::{Rng, distr::Alphanumeric};
use tokio::process::{Child, Command};
use tracing::info;

use crate::config::Config;

/// The agent's own account, on the socket only.
pub const AGENT_USER: &str = "foobar_agent";

/// What can go wrong with the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A file of the state directory.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `mariadb-install-db` or `mariadbd` could not run or failed.
    #[error("{program}: {message}")]
    Process {
        /// The program.
        program: &'static str,
        /// What happened.
        message: String,
    },
    /// The server did not accept the agent in time.
    #[error("mariadbd did not become ready within {0:?}")]
    NotReady(Duration),
    /// A statement of the agent failed.
    #[error("SQL: {0}")]
    Sql(#[from] mysql_async::Error),
}

/// The files of a node.
#[derive(Clone, Debug)]
pub struct Paths {
    state: PathBuf,
}

impl Paths {
    /// The files under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state: state_dir.to_owned(),
        }
    }
    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.state.join("data")
    }
    /// The generated server configuration.
    pub fn cnf(&self) -> PathBuf {
        self.state.join("my.cnf")
    }
    /// The server's socket.
    pub fn socket(&self) -> PathBuf {
        self.state.join("mysqld.sock")
    }
    /// The server's own temporary directory: not the shared /tmp, where another
    /// server's bootstrap or a cleaner can take its temporary tables' files away.
    pub fn tmp(&self) -> PathBuf {
        self.state.join("tmp")
    }
    /// The server's pid file.
    pub fn pid(&self) -> PathBuf {
        self.state.join("mysqld.pid")
    }
    /// The agent's password (mode 0600).
    pub fn agent_password(&self) -> PathBuf {
        self.state.join("agent.password")
    }
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::File {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to a file only its owner may read.
fn write_private(path: &Path, contents: &str) -> Result<(), ServerError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(file_error(path))?;
    file.write_all(contents.as_bytes())
        .map_err(file_error(path))
}

/// Creates the data directory on first start and the agent's password if missing;
/// returns whether it created the data directory.
pub async fn bootstrap(paths: &Paths) -> Result<bool, ServerError> {
    let state = paths.state.as_path();
    std::fs::create_dir_all(state).map_err(file_error(state))?;
    // This service's alone: the data directory holds the replication password in
    // plain text (master.info), and the socket lets root in without one.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
            .map_err(file_error(state))?;
    }
    let tmp = paths.tmp();
    std::fs::create_dir_all(&tmp).map_err(file_error(&tmp))?;
    if !paths.agent_password().is_file() {
        let password: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        write_private(&paths.agent_password(), &password)?;
    }
    if paths.data().join("mysql").is_dir() {
        return Ok(false);
    }
    let started = Instant::now();
    let out = Command::new("mariadb-install-db")
        // --no-defaults must come first; no binary log during bootstrap.
        .arg("--no-defaults")
        .arg(format!("--datadir={}", paths.data().display()))
        .arg(format!("--tmpdir={}", paths.tmp().display()))
        .args([
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            "--force",
        ])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ServerError::Process {
            program: "mariadb-install-db",
            message: format!("{e} (is mariadb-server-core installed? `cargo xtask setup`)"),
        })?;
    if !out.status.success() {
        return Err(ServerError::Process {
            program: "mariadb-install-db",
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    info!(elapsed = ?started.elapsed(), data = %paths.data().display(), "bootstrapped");
    Ok(true)
}

/// Runs SQL as MariaDB's root over the socket (root logs in by being root: the
/// `unix_socket` plugin), the SQL on standard input so no secret is on a command line.
async fn as_root(paths: &Paths, sql: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", paths.socket().display()))
        .args(["--user=root", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("mariadb: {e} (is mariadb-client installed? `cargo xtask setup`)"))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(sql.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    drop(stdin);
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Waits until root can log in over the socket, then makes sure the agent's own
/// account exists with the password of its file.
pub async fn ensure_agent_account(
    child: &mut Child,
    paths: &Paths,
    limit: Duration,
) -> Result<(), ServerError> {
    let started = Instant::now();
    let mut last = String::new();
    while let Err(e) = as_root(paths, "DO 1;").await {
        last = e;
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ServerError::Process {
                program: "mariadbd",
                message: format!("exited while starting: {status}"),
            });
        }
        if started.elapsed() > limit {
            tracing::warn!("last attempt: {last}");
            return Err(ServerError::NotReady(limit));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let path = paths.agent_password();
    let password = std::fs::read_to_string(&path).map_err(file_error(&path))?;
    let password = quote(password.trim());
    let account = format!("'{AGENT_USER}'@'localhost'");
    as_root(
        paths,
        &format!(
            "SET SESSION sql_log_bin = 0;\n\
             CREATE USER IF NOT EXISTS {account} IDENTIFIED BY {password};\n\
             ALTER USER {account} IDENTIFIED BY {password};\n\
             GRANT ALL PRIVILEGES ON *.* TO {account} WITH GRANT OPTION;\n"
        ),
    )
    .await
    .map_err(|message| ServerError::Process {
        program: "mariadb",
        message: format!("creating the agent's account: {message} (after {last:?})"),
    })?;
    info!(elapsed = ?started.elapsed(), "mariadbd is up");
    Ok(())
}

/// The server's configuration: durable commits, a row-based binary log with GTIDs
/// (what replication needs), semi-synchronous replication acknowledged after the
/// binary log is synced, TLS if configured, and this node's identity. The server
/// starts read-only and without replication: the agent decides its role.
pub fn write_cnf(config: &Config, paths: &Paths) -> Result<(), ServerError> {
    let semi_sync_timeout = config
        .replication
        .as_ref()
        .map_or(1000, |r| r.semi_sync_timeout_ms);
    // Paths only (the key stays in its file); over the network only TLS is let in,
    // while the socket (the agent's and root's way in) counts as secure.
    let tls = config
        .tls
        .as_ref()
        .map(|tls| {
            format!(
                "ssl_cert = {}\n\
                 ssl_key = {}\n\
                 ssl_ca = {}\n\
                 require_secure_transport = ON\n",
                tls.certificate.display(),
                tls.key.display(),
                tls.ca.display(),
            )
        })
        .unwrap_or_default();
    let cnf = format!(
        "# Written by foobar-db at every start; edit foobar-db's configuration instead.\n\
         [mariadb]\n\
         log_basename = {name}\n\
         server_id = {server_id}\n\
         user = root\n\
         datadir = {data}\n\
         socket = {socket}\n\
         pid_file = {pid}\n\
         tmpdir = {tmp}\n\
         port = {port}\n\
         bind_address = {address}\n\
         skip_name_resolve = ON\n\
         log_bin\n\
         binlog_format = ROW\n\
         sync_binlog = 1\n\
         innodb_flush_log_at_trx_commit = 1\n\
         log_slave_updates = ON\n\
         gtid_strict_mode = ON\n\
         read_only = ON\n\
         skip_slave_start = ON\n\
         sync_relay_log = 1\n\
         relay_log_recovery = ON\n\
         slave_net_timeout = 10\n\
         slave_parallel_threads = 4\n\
         slave_parallel_mode = optimistic\n\
         binlog_expire_logs_seconds = 0\n\
         rpl_semi_sync_slave_enabled = ON\n\
         rpl_semi_sync_master_enabled = OFF\n\
         rpl_semi_sync_master_wait_point = AFTER_SYNC\n\
         rpl_semi_sync_master_timeout = {semi_sync_timeout}\n\
         rpl_semi_sync_master_wait_no_slave = ON\n\
         rpl_semi_sync_slave_kill_conn_timeout = 1\n\
         innodb_buffer_pool_size = {pool}M\n\
         max_connections = 500\n\
         {tls}",
        name = config.name,
        server_id = config.server_id,
        data = paths.data().display(),
        socket = paths.socket().display(),
        pid = paths.pid().display(),
        tmp = paths.tmp().display(),
        port = config.listen.port(),
        address = config.listen.ip(),
        pool = config.buffer_pool_mb,
    );
    write_private(&paths.cnf(), &cnf)
}

/// Starts `mariadbd` in the foreground in a process group of its own (a Ctrl-C for
/// the agent must not reach it: the agent decides the order of shutdown). As a
/// replica at startup, crash recovery truncates from the binary log what a crashed
/// semi-sync primary had not had acknowledged, so it can rejoin as a replica.
pub fn spawn(paths: &Paths) -> Result<Child, ServerError> {
    Command::new("mariadbd")
        // --defaults-file must be the first argument.
        .arg(format!("--defaults-file={}", paths.cnf().display()))
        .arg("--init-rpl-role=SLAVE")
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ServerError::Process {
            program: "mariadbd",
            message: format!("{e} (is mariadb-server-core installed? `cargo xtask setup`)"),
        })
}

/// A pool of the agent's connections over the socket.
pub fn agent_pool(paths: &Paths) -> Result<Pool, ServerError> {
    let path = paths.agent_password();
    let password = std::fs::read_to_string(&path).map_err(file_error(&path))?;
    let opts = OptsBuilder::default()
        .socket(Some(paths.socket().display().to_string()))
        .prefer_socket(true)
        .user(Some(AGENT_USER))
        .pass(Some(password.trim().to_owned()));
    Ok(Pool::new(opts))
}

/// Waits until the agent can run a statement, or the server exits, or `limit` passes.
pub async fn wait_ready(
    child: &mut Child,
    pool: &Pool,
    limit: Duration,
) -> Result<(), ServerError> {
    let started = Instant::now();
    loop {
        if let Ok(Ok(mut conn)) =
            tokio::time::timeout(Duration::from_secs(1), pool.get_conn()).await
            && conn.query_drop("DO 1").await.is_ok()
        {
            info!(elapsed = ?started.elapsed(), "mariadbd is ready");
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ServerError::Process {
                program: "mariadbd",
                message: format!("exited while starting: {status}"),
            });
        }
        if started.elapsed() > limit {
            return Err(ServerError::NotReady(limit));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the server cleanly (SIGTERM: it flushes and closes its logs), killing it if
/// it has not finished within `limit`.
pub async fn stop(child: &mut Child, limit: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(limit, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Quotes a string for a MariaDB string literal (`'`, `\` and NUL escaped).
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_string_literals() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's \\ ok"), "'it\\'s \\\\ ok'");
    }
}
