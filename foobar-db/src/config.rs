//! The database node's configuration file.

use std::{net::SocketAddr, path::PathBuf};

use foobar_node::{
    config::{Invalid, Validate},
    firewall::Policy,
};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name: its binary and relay logs are named after it.
    pub name: String,
    /// MariaDB's `server_id`, unique among the nodes that replicate together.
    pub server_id: u32,
    /// Where MariaDB listens.
    pub listen: SocketAddr,
    /// Holds the data directory, the generated `my.cnf`, the socket and the agent's
    /// own password; created on first start, for this service alone (mode 0700:
    /// MariaDB keeps the replication password in the data directory's `master.info`).
    pub state_dir: PathBuf,
    /// MariaDB's InnoDB buffer pool, in MiB.
    #[serde(default = "default_buffer_pool_mb")]
    pub buffer_pool_mb: u32,
    /// The application's database and account.
    pub app: AppAccount,
    /// The agent's own HTTP endpoint: `/primary`, `/replica`, `/status`, `/metrics`
    /// (for the balancers' checks and monitoring), `/promote` and `/fence`.
    pub http: SocketAddr,
    /// Replication with the other node of the pair; none: a single server, primary.
    #[serde(default)]
    pub replication: Option<Replication>,
    /// TLS for MariaDB's clients and for replication; none: plain text.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The host firewall's rules for this node (nftables, table `inet foobar_db`):
    /// MariaDB's port and the agent's; none: no firewall.
    #[serde(default)]
    pub firewall: Option<Policy>,
}

/// `[tls]`: MariaDB serves TLS and refuses plain-text connections over the network
/// (`require_secure_transport`; its Unix socket, the agent's way in, counts as
/// secure), and replication runs over TLS with the primary's certificate checked.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// MariaDB's certificate (PEM), for every address clients connect to: this
    /// node's, and the balancers' database VIPs' (full NAT: the client sees the VIP).
    pub certificate: PathBuf,
    /// Its private key (PEM), readable by this service only (mode 0600).
    pub key: PathBuf,
    /// The CA that signed the peer's certificate, checked when replicating from it.
    pub ca: PathBuf,
}

/// What a node is when the pair is new: the first primary, or its replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialRole {
    /// Opens writes on its first start, once it is sure no other node is primary.
    Primary,
    /// Waits for a primary and replicates from it.
    Replica,
}

/// `[replication]`: the pair.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    /// This node's role when the pair is new (its data directory created on this
    /// start). Afterwards the pair decides: a node never takes writes on its own.
    pub initial_role: InitialRole,
    /// The other node.
    pub peer: Peer,
    /// The replication account (created on both nodes).
    #[serde(default = "default_repl_user")]
    pub user: String,
    /// A file holding its password, which also authorises `/promote` and `/fence`.
    pub password_file: PathBuf,
    /// How long a commit on the primary waits for the replica's acknowledgement
    /// before semi-sync falls back to asynchronous (visible and counted), ms.
    #[serde(default = "default_semi_sync_timeout_ms")]
    pub semi_sync_timeout_ms: u64,
    /// Largest replication lag at which `/replica` still answers 200, seconds.
    #[serde(default = "default_max_lag_s")]
    pub max_lag_s: u64,
    /// Automatic failover; none: promotion by hand only (`foobar-db promote`).
    #[serde(default)]
    pub failover: Option<Failover>,
}

/// The other node of the pair.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its MariaDB.
    pub mysql: SocketAddr,
    /// Its agent's HTTP endpoint.
    pub agent: SocketAddr,
}

/// `[replication.failover]`: automatic promotion, and the rule that keeps it from
/// making two primaries (see the README): the balancers are the witness.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    /// A balancer's status (`foobar-lb`'s metrics listener, `/status.json`): the
    /// replica promotes itself only when the balancers see the primary down too.
    pub witness: SocketAddr,
    /// The balancers' write VIP, by name.
    pub write_vip: String,
    /// A primary that has not been checked by a balancer for this long stops taking
    /// writes (read-only); a replica promotes only after the balancers have seen the
    /// primary down for longer, ms.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
}

fn default_repl_user() -> String {
    "repl".into()
}

fn default_semi_sync_timeout_ms() -> u64 {
    1000
}

fn default_max_lag_s() -> u64 {
    5
}

fn default_lease_ms() -> u64 {
    1500
}

/// `[app]`: the schema the application owns and the account it logs in with. The
/// account gets rights on that schema only, so `read_only` binds it on a replica.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppAccount {
    /// The schema.
    pub database: String,
    /// The account's user name.
    pub user: String,
    /// A file holding its password.
    pub password_file: PathBuf,
    /// Where it may connect from, in MariaDB's host syntax (`10.1.0.%`).
    pub allow_from: String,
}

fn default_buffer_pool_mb() -> u32 {
    64
}

/// Letters, digits and `_`: safe to write into SQL as an identifier.
fn identifier(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Validate for Config {
    fn validate(&self) -> Result<(), Invalid> {
        if !identifier(&self.name) {
            return Err(Invalid::new(
                "name",
                "letters, digits and '_' only, at most 64",
            ));
        }
        if self.server_id == 0 {
            return Err(Invalid::new("server_id", "must be above 0"));
        }
        if self.listen.port() == 0 {
            return Err(Invalid::new("listen", "needs a port"));
        }
        // MariaDB's socket path lives here and must fit in sun_path (108 bytes).
        if self.state_dir.as_os_str().len() > 80 || !self.state_dir.is_absolute() {
            return Err(Invalid::new(
                "state_dir",
                "must be an absolute path of at most 80 bytes",
            ));
        }
        if self.buffer_pool_mb < 8 {
            return Err(Invalid::new("buffer_pool_mb", "at least 8"));
        }
        let app = &self.app;
        if !identifier(&app.database) {
            return Err(Invalid::new(
                "app.database",
                "letters, digits and '_' only, at most 64",
            ));
        }
        if !identifier(&app.user) {
            return Err(Invalid::new(
                "app.user",
                "letters, digits and '_' only, at most 64",
            ));
        }
        if !app.password_file.is_file() {
            return Err(Invalid::new(
                "app.password_file",
                format!("{} is not a readable file", app.password_file.display()),
            ));
        }
        if app.allow_from.is_empty()
            || !app
                .allow_from
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".%:_-".contains(c))
        {
            return Err(Invalid::new(
                "app.allow_from",
                "a host, address or pattern such as 10.1.0.%",
            ));
        }
        if self.http.port() == 0 || self.http == self.listen {
            return Err(Invalid::new(
                "http",
                "needs a port of its own, not MariaDB's",
            ));
        }
        if let Some(repl) = &self.replication {
            repl.validate()?;
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(firewall) = &self.firewall {
            firewall.validate("firewall", &[("listen", self.listen), ("http", self.http)])?;
        }
        Ok(())
    }
}

impl Tls {
    fn validate(&self) -> Result<(), Invalid> {
        for (field, path, pem) in [
            ("tls.certificate", &self.certificate, "CERTIFICATE"),
            // PKCS#8, or the EC and RSA forms.
            ("tls.key", &self.key, "PRIVATE KEY"),
            ("tls.ca", &self.ca, "CERTIFICATE"),
        ] {
            // Written into my.cnf as it is: no quoting, escapes or comments there.
            if !path.is_absolute()
                || path
                    .to_str()
                    .is_none_or(|p| p.contains(['\'', '"', '\\', '#', '\n']))
            {
                return Err(Invalid::new(
                    field,
                    "an absolute UTF-8 path without quotes, backslashes or '#'",
                ));
            }
            // MariaDB only logs a file it cannot use, then serves no TLS at all.
            match std::fs::read_to_string(path) {
                Err(e) => return Err(Invalid::new(field, format!("{}: {e}", path.display()))),
                Ok(text) if !text.contains(&format!("{pem}-----")) => {
                    return Err(Invalid::new(
                        field,
                        format!("{} holds no PEM {pem}", path.display()),
                    ));
                }
                Ok(_) => {}
            }
        }
        if let Some(mode) = readable_by_others(&self.key) {
            return Err(Invalid::new(
                "tls.key",
                format!(
                    "{} is readable by others (mode {mode:o}): chmod 600 it",
                    self.key.display()
                ),
            ));
        }
        Ok(())
    }
}

/// The permission bits of `path` when its group or others may read or write it: a
/// secret there is not the service's alone.
pub fn readable_by_others(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

impl Replication {
    fn validate(&self) -> Result<(), Invalid> {
        if !identifier(&self.user) {
            return Err(Invalid::new(
                "replication.user",
                "letters, digits and '_' only, at most 64",
            ));
        }
        if !self.password_file.is_file() {
            return Err(Invalid::new(
                "replication.password_file",
                format!("{} is not a readable file", self.password_file.display()),
            ));
        }
        if !(100..=60_000).contains(&self.semi_sync_timeout_ms) {
            return Err(Invalid::new(
                "replication.semi_sync_timeout_ms",
                format!("{} is outside 100..=60000", self.semi_sync_timeout_ms),
            ));
        }
        if self.peer.mysql.port() == 0 || self.peer.agent.port() == 0 {
            return Err(Invalid::new("replication.peer", "addresses need ports"));
        }
        if let Some(failover) = &self.failover {
            if !(300..=60_000).contains(&failover.lease_ms) {
                return Err(Invalid::new(
                    "replication.failover.lease_ms",
                    format!("{} is outside 300..=60000", failover.lease_ms),
                ));
            }
            if failover.write_vip.is_empty() {
                return Err(Invalid::new(
                    "replication.failover.write_vip",
                    "names the balancers' write VIP",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::Path};

    use super::*;

    /// A configuration with `[tls]` over files in a fresh directory, the key's mode
    /// `key_mode`; the directory is returned for the test to remove.
    fn with_tls(tag: &str, key_mode: u32, certificate: &str) -> (PathBuf, Result<Config, String>) {
        let dir = std::env::temp_dir().join(format!("foobar-db-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("app.password"), "x\n").unwrap();
        let certificate_pem = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n";
        for file in ["db.crt", "ca.crt"] {
            std::fs::write(dir.join(file), certificate_pem).unwrap();
        }
        let key_pem = "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n";
        std::fs::write(dir.join("db.key"), key_pem).unwrap();
        let key = dir.join("db.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
        let d = dir.display();
        let text = format!(
            "name = \"db1\"\nserver_id = 1\nlisten = \"127.0.0.1:3306\"\nhttp = \"127.0.0.1:8306\"\n\
             state_dir = \"{d}/state\"\n\
             [app]\ndatabase = \"foobar\"\nuser = \"foobar\"\npassword_file = \"{d}/app.password\"\n\
             allow_from = \"127.0.0.1\"\n\
             [tls]\ncertificate = \"{d}/{certificate}\"\nkey = \"{d}/db.key\"\nca = \"{d}/ca.crt\"\n"
        );
        let parsed = foobar_node::config::parse::<Config>(&text, Path::new("db.toml"))
            .map_err(|e| e.field().unwrap_or("(read)").to_owned());
        (dir, parsed)
    }

    #[test]
    fn tls_files_must_exist_and_the_key_be_private() {
        let (dir, ok) = with_tls("tls-ok", 0o600, "db.crt");
        assert!(ok.is_ok_and(|c| c.tls.is_some()));
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, shared_key) = with_tls("tls-shared", 0o644, "db.crt");
        assert_eq!(shared_key.unwrap_err(), "tls.key");
        std::fs::remove_dir_all(dir).unwrap();

        let (dir, missing) = with_tls("tls-missing", 0o600, "nothing.crt");
        assert_eq!(missing.unwrap_err(), "tls.certificate");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
