//! The web node's configuration file.

use std::{net::SocketAddr, path::PathBuf};

use foobar_node::{
    config::{Invalid, Validate},
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
        }
        if self.files.is_none() && self.proxy.is_none() {
            return Err(Invalid::new(
                "files",
                "nothing to serve: need [files] or [proxy]",
            ));
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
}
