//! The application node's configuration file.

use std::{net::SocketAddr, path::PathBuf};

use foobar_node::{
    config::{Invalid, Validate},
    firewall::Policy,
    server::Limits,
    tls::{CertStore, TlsError},
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
    /// TLS on the listener, for the web nodes that reach it over HTTPS; none: plain
    /// HTTP.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The database.
    pub database: Database,
    /// The host firewall's rules for this node (nftables, table `inet foobar_app`);
    /// none: no firewall.
    #[serde(default)]
    pub firewall: Option<Policy>,
}

/// `[tls]`: the listener speaks TLS only (HTTP/1.1 or HTTP/2 by ALPN); its clients,
/// the web nodes' proxies, check the certificate with their `[proxy] upstream_tls_ca`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first, for the address clients connect to (an IP
    /// address in its subject alternative names); re-read on SIGHUP.
    pub certificate: PathBuf,
    /// PEM private key; re-read on SIGHUP.
    pub key: PathBuf,
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
        if let Some(tls) = &self.tls {
            tls.validate()?;
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

impl Tls {
    /// Loads the pair as the listener will (so `--check` finds a bad one too): the
    /// file at fault named, the key's when the two do not belong together.
    fn validate(&self) -> Result<(), Invalid> {
        match CertStore::load(&self.certificate, &self.key) {
            Ok(_) => Ok(()),
            Err(TlsError::File { path, message }) if path == self.certificate => Err(Invalid::new(
                "tls.certificate",
                format!("{}: {message}", path.display()),
            )),
            Err(e) => Err(Invalid::new("tls.key", e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use foobar_node::config::parse;

    use super::*;

    #[test]
    fn a_tls_section_that_cannot_be_served_names_its_file() {
        // A file that exists but holds no PEM.
        let here = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let field_of = |tls: &str| {
            let text = format!(
                "listen = '127.0.0.1:8000'\n[tls]\n{tls}\n[database]\nwrite = '127.0.0.1:3306'\n\
                 user = 'foobar'\npassword_file = '{here}'\n"
            );
            parse::<Config>(&text, Path::new("app.toml"))
                .unwrap_err()
                .field()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            field_of("certificate = '/nonexistent.crt'\nkey = '/nonexistent.key'"),
            "tls.certificate"
        );
        assert_eq!(
            field_of(&format!("certificate = '{here}'\nkey = '{here}'")),
            "tls.certificate"
        );
        assert_eq!(
            field_of(&format!("certificate = '{here}'\nkey = '/nonexistent.key'")),
            "tls.key"
        );
    }
}
