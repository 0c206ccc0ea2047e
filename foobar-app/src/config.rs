//! The application node's configuration file.

use std::{net::SocketAddr, path::PathBuf};

use foobar_node::{
    config::{Invalid, Validate},
    firewall::Policy,
    server::Limits,
};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and port of the API.
    pub listen: SocketAddr,
    /// This node's name, in the `X-Served-By` header.
    #[serde(default)]
    pub name: Option<String>,
    /// Where the access log goes (`-`: standard output); none: no access log.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// Limits of the listener.
    #[serde(default)]
    pub limits: Limits,
    /// The database.
    pub database: Database,
    /// The host firewall's rules for this node (nftables, table `inet foobar_app`);
    /// none: no firewall.
    #[serde(default)]
    pub firewall: Option<Policy>,
}

/// `[database]`: where writes and reads go.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// The primary (or the write VIP in front of it).
    pub write: SocketAddr,
    /// A replica (or the read VIP); the primary when absent.
    #[serde(default)]
    pub read: Option<SocketAddr>,
    /// The schema.
    #[serde(default = "default_name")]
    pub name: String,
    /// The user the application logs in as.
    pub user: String,
    /// A file holding its password (nothing else), so the password is never on a
    /// command line or in this file.
    pub password_file: PathBuf,
    /// Most connections open to each endpoint.
    #[serde(default = "default_pool_max")]
    pub pool_max: usize,
    /// Deadline to get a connection (connect and log in); past it the request gets 503.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline of one query.
    #[serde(default = "default_query_timeout_ms")]
    pub query_timeout_ms: u64,
    /// The CA that signed the database's certificate: connections use TLS, the
    /// certificate checked for the address connected to (a VIP's, through a
    /// balancer); none: plain text.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
}

fn default_name() -> String {
    "foobar".into()
}
fn default_pool_max() -> usize {
    32
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_query_timeout_ms() -> u64 {
    3_000
}

impl Validate for Config {
    fn validate(&self) -> Result<(), Invalid> {
        self.limits.validate("limits")?;
        if let Some(firewall) = &self.firewall {
            firewall.validate("firewall", &[("listen", self.listen)])?;
        }
        let db = &self.database;
        if db.name.is_empty()
            || !db
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Invalid::new(
                "database.name",
                "letters, digits and '_' only",
            ));
        }
        if db.user.is_empty() {
            return Err(Invalid::new("database.user", "must not be empty"));
        }
        if !db.password_file.is_file() {
            return Err(Invalid::new(
                "database.password_file",
                format!("{} is not a readable file", db.password_file.display()),
            ));
        }
        if let Some(ca) = db.tls_ca.as_ref().filter(|ca| !ca.is_file()) {
            return Err(Invalid::new(
                "database.tls_ca",
                format!("{} is not a readable file", ca.display()),
            ));
        }
        for (field, value) in [
            ("pool_max", db.pool_max as u64),
            ("connect_timeout_ms", db.connect_timeout_ms),
            ("query_timeout_ms", db.query_timeout_ms),
        ] {
            if value == 0 {
                return Err(Invalid::new(format!("database.{field}"), "must be above 0"));
            }
        }
        Ok(())
    }
}
