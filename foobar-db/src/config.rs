//! The database node's configuration file.

use std::{net::SocketAddr, path::PathBuf};

use foobar_node::config::{Invalid, Validate};
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
    /// own password; created on first start.
    pub state_dir: PathBuf,
    /// MariaDB's InnoDB buffer pool, in MiB.
    #[serde(default = "default_buffer_pool_mb")]
    pub buffer_pool_mb: u32,
    /// The application's database and account.
    pub app: AppAccount,
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
        Ok(())
    }
}
