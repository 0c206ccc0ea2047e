//! The web node's configuration file.

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
    /// This server's name, sent in every response's `X-Served-By` header so a client
    /// sees which server the balancer chose.
    #[serde(default)]
    pub name: Option<String>,
    /// The plain-HTTP listener.
    #[serde(default)]
    pub http: Option<HttpListener>,
    /// The HTTPS listener.
    #[serde(default)]
    pub https: Option<HttpsListener>,
    /// Limits of both listeners.
    #[serde(default)]
    pub limits: Limits,
    /// Static files.
    #[serde(default)]
    pub files: Option<Files>,
    /// The reverse proxy to the application nodes.
    #[serde(default)]
    pub proxy: Option<Proxy>,
    /// Where the access log goes (`-`: standard output); none: no access log.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
    /// While this file exists, `/healthz` answers 503: a maintenance switch that takes
    /// the server out of its balancer's schedule.
    #[serde(default)]
    pub maintenance_file: Option<PathBuf>,
    /// The host firewall's rules for this node (nftables, table `inet foobar_web`);
    /// none: no firewall.
    #[serde(default)]
    pub firewall: Option<Policy>,
    /// The HTTPS certificate obtained and renewed by ACME.
    #[serde(default)]
    pub acme: Option<Acme>,
}

/// `[acme]`: the certificate of `[https]` obtained and renewed from an ACME CA (RFC
/// 8555) by HTTP-01, written over `https.certificate` and `https.key`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acme {
    /// The CA's directory (Let's Encrypt: `https://acme-v02.api.letsencrypt.org/directory`);
    /// the account made there agrees to the CA's terms of service.
    pub directory: String,
    /// PEM roots trusted for the directory's own TLS.
    #[serde(default = "default_directory_ca")]
    pub directory_ca: PathBuf,
    /// The account's contact URLs (`mailto:ops@foobar.com`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// The names the certificate is for; each must lead to this node's `[http]` listener
    /// (through the balancer), where the CA checks them.
    pub domains: Vec<String>,
    /// The account's key and URL (JSON, mode 0600), made on the first order.
    pub account: PathBuf,
    /// How often the certificate's expiry is looked at.
    #[serde(default = "default_check_interval_s")]
    pub check_interval_s: u64,
    /// A certificate with less than this left is renewed.
    #[serde(default = "default_renew_before_s")]
    pub renew_before_s: u64,
    /// The other web nodes behind the same names (their `[http]` listeners), asked for
    /// a challenge token this node does not hold.
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// How long a peer gets to answer.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
}

fn default_directory_ca() -> PathBuf {
    "/etc/ssl/certs/ca-certificates.crt".into()
}
fn default_check_interval_s() -> u64 {
    3600
}
fn default_renew_before_s() -> u64 {
    30 * 24 * 3600
}
fn default_peer_timeout_ms() -> u64 {
    500
}

/// `[http]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListener {
    /// Address and port.
    pub listen: SocketAddr,
    /// Answer every request (but `/healthz`) with a redirect to the same URL over HTTPS.
    #[serde(default)]
    pub redirect_to_https: bool,
}

/// `[https]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsListener {
    /// Address and port.
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first; re-read on SIGHUP.
    pub certificate: PathBuf,
    /// PEM private key; re-read on SIGHUP.
    pub key: PathBuf,
    /// `Strict-Transport-Security: max-age` in seconds; 0 sends no header.
    #[serde(default)]
    pub hsts_max_age_s: u64,
}

/// `[files]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    /// The document root; `index.html` answers for a directory.
    pub root: PathBuf,
}

/// `[proxy]`: requests under `path` go to the upstreams, as nginx's `upstream` block.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    /// Path prefix proxied, with both slashes.
    #[serde(default = "default_proxy_path")]
    pub path: String,
    /// The application nodes, taken in turn.
    pub upstreams: Vec<SocketAddr>,
    /// Failures within `fail_timeout_ms` that take an upstream out (nginx's `max_fails`).
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    /// How long an upstream stays out, and the window its failures are counted in.
    #[serde(default = "default_fail_timeout_ms")]
    pub fail_timeout_ms: u64,
    /// Deadline to connect to an upstream.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline for an upstream's response head once the request is sent.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Largest request body accepted (413 above it).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Idle keep-alive connections kept per upstream.
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    /// The CA (PEM) that signed the upstreams' certificates: connections to them use
    /// TLS, trusting this CA only, each certificate checked for the upstream's IP
    /// address; none: plain HTTP.
    #[serde(default)]
    pub upstream_tls_ca: Option<PathBuf>,
}

fn default_proxy_path() -> String {
    "/api/".into()
}
fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout_ms() -> u64 {
    10_000
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_read_timeout_ms() -> u64 {
    30_000
}
fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_keepalive() -> usize {
    32
}

impl Validate for Config {
    fn validate(&self) -> Result<(), Invalid> {
        if self.http.is_none() && self.https.is_none() {
            return Err(Invalid::new(
                "http",
                "at least one of [http] and [https] is needed",
            ));
        }
        if self.http.as_ref().is_some_and(|h| h.redirect_to_https) && self.https.is_none() {
            return Err(Invalid::new(
                "http.redirect_to_https",
                "needs an [https] listener to redirect to",
            ));
        }
        if let (Some(http), Some(https)) = (&self.http, &self.https)
            && http.listen == https.listen
        {
            return Err(Invalid::new("https.listen", "same address as http.listen"));
        }
        self.limits.validate("limits")?;
        if let Some(firewall) = &self.firewall {
            let listens: Vec<(&str, SocketAddr)> = [
                ("http.listen", self.http.as_ref().map(|h| h.listen)),
                ("https.listen", self.https.as_ref().map(|h| h.listen)),
            ]
            .into_iter()
            .filter_map(|(field, listen)| Some((field, listen?)))
            .collect();
            firewall.validate("firewall", &listens)?;
        }
        if let Some(name) = &self.name
            && (name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(Invalid::new(
                "name",
                "must be printable ASCII without spaces",
            ));
        }
        if let Some(files) = &self.files
            && !files.root.is_dir()
        {
            return Err(Invalid::new(
                "files.root",
                format!("{} is not a directory", files.root.display()),
            ));
        }
        if let Some(proxy) = &self.proxy {
            if !proxy.path.starts_with('/') || !proxy.path.ends_with('/') {
                return Err(Invalid::new("proxy.path", "must start and end with '/'"));
            }
            if proxy.upstreams.is_empty() {
                return Err(Invalid::new(
                    "proxy.upstreams",
                    "needs at least one upstream",
                ));
            }
            for (i, upstream) in proxy.upstreams.iter().enumerate() {
                if upstream.port() == 0 || upstream.ip().is_unspecified() {
                    return Err(Invalid::new(
                        format!("proxy.upstreams[{i}]"),
                        "must be a reachable address and port",
                    ));
                }
            }
            for (field, value) in [
                ("max_fails", proxy.max_fails as u64),
                ("fail_timeout_ms", proxy.fail_timeout_ms),
                ("connect_timeout_ms", proxy.connect_timeout_ms),
                ("read_timeout_ms", proxy.read_timeout_ms),
            ] {
                if value == 0 {
                    return Err(Invalid::new(format!("proxy.{field}"), "must be above 0"));
                }
            }
            // Read as the proxy will, so `--check` finds a missing or useless CA too.
            if let Some(ca) = &proxy.upstream_tls_ca
                && let Err(e) = crate::upstream_tls::connector(ca)
            {
                return Err(Invalid::new("proxy.upstream_tls_ca", e.to_string()));
            }
        }
        if self.files.is_none() && self.proxy.is_none() {
            return Err(Invalid::new(
                "files",
                "nothing to serve: need [files] or [proxy]",
            ));
        }
        if let Some(acme) = &self.acme {
            // The certificate goes to the HTTPS listener; the CA's check comes over HTTP.
            if self.https.is_none() || self.http.is_none() {
                return Err(Invalid::new("acme", "needs both [http] and [https]"));
            }
            acme.validate()?;
        }
        Ok(())
    }
}

impl Acme {
    fn validate(&self) -> Result<(), Invalid> {
        if !self.directory.starts_with("https://") {
            return Err(Invalid::new("acme.directory", "must be an https:// URL"));
        }
        if !self.directory_ca.is_file() {
            return Err(Invalid::new(
                "acme.directory_ca",
                format!("{} is not a file", self.directory_ca.display()),
            ));
        }
        if self.domains.is_empty() {
            return Err(Invalid::new("acme.domains", "needs at least one name"));
        }
        for (i, domain) in self.domains.iter().enumerate() {
            // HTTP-01 cannot prove a wildcard; the rest is the CA's to judge.
            let plain = domain.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
            if !plain {
                return Err(Invalid::new(
                    format!("acme.domains[{i}]"),
                    "must be a DNS name (no wildcard: HTTP-01 cannot prove one)",
                ));
            }
        }
        for (i, contact) in self.contact.iter().enumerate() {
            if !contact.starts_with("mailto:") {
                return Err(Invalid::new(
                    format!("acme.contact[{i}]"),
                    "must be a mailto: URL",
                ));
            }
        }
        for (field, value) in [
            ("check_interval_s", self.check_interval_s),
            ("renew_before_s", self.renew_before_s),
            ("peer_timeout_ms", self.peer_timeout_ms),
        ] {
            if value == 0 {
                return Err(Invalid::new(format!("acme.{field}"), "must be above 0"));
            }
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.port() == 0 || peer.ip().is_unspecified() {
                return Err(Invalid::new(
                    format!("acme.peers[{i}]"),
                    "must be a reachable address and port",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use foobar_node::config::parse;

    use super::*;

    fn field_of(text: &str) -> String {
        parse::<Config>(text, Path::new("web.toml"))
            .unwrap_err()
            .field()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn names_the_bad_field() {
        let ok = "[http]\nlisten = '127.0.0.1:8080'\n[files]\nroot = '/'\n";
        assert!(parse::<Config>(ok, Path::new("web.toml")).is_ok());
        assert_eq!(
            field_of("[http]\nlisten = 'nowhere'\n[files]\nroot = '/'"),
            "http.listen"
        );
        assert_eq!(field_of("[files]\nroot = '/'"), "http");
        assert_eq!(
            field_of("[http]\nlisten = '127.0.0.1:80'\n[proxy]\nupstreams = []"),
            "proxy.upstreams"
        );
        assert_eq!(
            field_of(
                "[http]\nlisten = '127.0.0.1:80'\n[proxy]\nupstreams = ['10.0.0.1:80', '10.0.0.2:0']"
            ),
            "proxy.upstreams[1]"
        );
        assert_eq!(
            field_of(
                "[http]\nlisten = '127.0.0.1:80'\nredirect_to_https = true\n[files]\nroot = '/'"
            ),
            "http.redirect_to_https"
        );
        assert_eq!(
            field_of("[http]\nlisten = '127.0.0.1:80'\n[files]\nroot = '/nonexistent-root'"),
            "files.root"
        );
        assert_eq!(
            field_of(
                "[http]\nlisten = '127.0.0.1:80'\n[limits]\nmax_header_bytes = 10\n[files]\nroot = '/'"
            ),
            "limits.max_header_bytes"
        );
        assert_eq!(
            field_of("[http]\nlisten = '127.0.0.1:80'\n[files]\nroot = '/'\nindex = 'x'"),
            "files.index"
        );
    }

    #[test]
    fn an_upstream_ca_must_be_a_readable_pem_certificate() {
        let proxy = |ca: &str| {
            format!(
                "[http]\nlisten = '127.0.0.1:80'\n[proxy]\nupstreams = ['10.0.0.1:8000']\n\
                 upstream_tls_ca = '{ca}'\n"
            )
        };
        assert_eq!(
            field_of(&proxy("/nonexistent-ca.crt")),
            "proxy.upstream_tls_ca"
        );
        // A file, but no certificate in it.
        let not_pem = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        assert_eq!(field_of(&proxy(not_pem)), "proxy.upstream_tls_ca");
    }

    #[test]
    fn acme_needs_both_listeners_and_plain_names() {
        let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let acme = |rest: &str| {
            format!(
                "[http]\nlisten = '127.0.0.1:80'\n[https]\nlisten = '127.0.0.1:443'\n\
                 certificate = '/x.crt'\nkey = '/x.key'\n[files]\nroot = '/'\n\
                 [acme]\ndirectory = 'https://ca.example/dir'\ndirectory_ca = '{ca}'\n\
                 account = '/x.json'\n{rest}"
            )
        };
        let ok = acme("domains = ['www.foobar.com']\npeers = ['10.1.0.12:80']");
        assert!(parse::<Config>(&ok, Path::new("web.toml")).is_ok());
        assert_eq!(field_of(&acme("domains = []")), "acme.domains");
        assert_eq!(
            field_of(&acme("domains = ['*.foobar.com']")),
            "acme.domains[0]"
        );
        assert_eq!(
            field_of(&acme("domains = ['a.b']\npeers = ['10.1.0.12:0']")),
            "acme.peers[0]"
        );
        assert_eq!(
            field_of(&acme("domains = ['a.b']\nrenew_before_s = 0")),
            "acme.renew_before_s"
        );
        assert_eq!(
            field_of(&acme("domains = ['a.b']\ncontact = ['ops@foobar.com']")),
            "acme.contact[0]"
        );
        assert_eq!(
            field_of(
                "[http]\nlisten = '127.0.0.1:80'\n[files]\nroot = '/'\n[acme]\n\
                 directory = 'https://ca.example/dir'\ndomains = ['a.b']\naccount = '/x.json'\n"
            ),
            "acme"
        );
    }
}
