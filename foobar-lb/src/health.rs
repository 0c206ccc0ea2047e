//! Health checks: what to probe (per VIP), the probes themselves, and the rise/fall
//! state machine that decides when a backend is up or down, as HAProxy means them.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Empty;
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// How a backend is probed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    #[default]
    Tcp,
    /// An HTTP/1.1 GET of `path`, answered with a status in `expect_status`.
    Http,
    /// The same over TLS. The certificate is not verified (HAProxy's `check-ssl verify
    /// none`): the check asks whether the backend serves, not who it is.
    Https,
}

fn default_path() -> String {
    "/".into()
}
fn default_expect() -> [u16; 2] {
    [200, 399]
}
fn default_interval() -> u64 {
    2000
}
fn default_timeout() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// A VIP's health check, applied to each of its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp`, `http` or `https`.
    #[serde(rename = "type", default)]
    pub kind: CheckKind,
    /// Path of the HTTP GET.
    #[serde(default = "default_path")]
    pub path: String,
    /// Accepted HTTP statuses, inclusive: `[200, 399]`.
    #[serde(default = "default_expect")]
    pub expect_status: [u16; 2],
    /// Time between checks of one backend, ms.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// How long one check may take, ms.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Check this port of the backend's address instead of its service port
    /// (HAProxy's `port`): an agent beside the service that answers for it, such as
    /// a database node's `/primary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            path: default_path(),
            expect_status: default_expect(),
            interval_ms: default_interval(),
            timeout_ms: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            port: None,
        }
    }
}

/// What happens to a backend's open flows when it goes down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// Keep them on it (it may only be slow, or its checks alone fail).
    #[default]
    Keep,
    /// Remove them, so clients' next packets are scheduled elsewhere.
    Reset,
}

impl HealthCheck {
    /// Checks every field; `at` is the path of this check in the configuration.
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((format!("{at}.{field}"), message));
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return bad(
                "interval_ms",
                format!("{} is outside 100..=3600000", self.interval_ms),
            );
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return bad(
                "timeout_ms",
                format!(
                    "{} must be at least 10 and at most interval_ms",
                    self.timeout_ms
                ),
            );
        }
        for (field, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&n) {
                return bad(field, format!("{n} is outside 1..=100"));
            }
        }
        if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_whitespace()) {
            return bad("path", format!("{:?} is not an absolute path", self.path));
        }
        if self.port == Some(0) {
            return bad("port", "0 is not a port".into());
        }
        let [lo, hi] = self.expect_status;
        if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
            return bad(
                "expect_status",
                format!("[{lo}, {hi}] is not a range of HTTP statuses"),
            );
        }
        Ok(())
    }

    /// The interval as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

/// Why a probe did not pass.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    /// The backend failed it (refused, timed out, answered wrong): counts toward `fall`.
    #[error("{0}")]
    Backend(String),
    /// This machine could not run it (out of file descriptors, memory, buffers or
    /// local ports): it says nothing about the backend, whose state stays as it was.
    #[error("skipped: local error: {0}")]
    Local(String),
}

/// How one probe went: its latency, or why it did not pass.
pub type CheckResult = Result<Duration, CheckFailure>;

/// One probe of `target`: its latency, or why it did not pass.
pub async fn probe(check: &HealthCheck, target: SocketAddr) -> CheckResult {
    let target = check
        .port
        .map_or(target, |port| SocketAddr::new(target.ip(), port));
    let started = Instant::now();
    let work = async {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| connect_failure(&e))?;
        let failed = CheckFailure::Backend;
        match check.kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Http => http_get(check, target, stream).await.map_err(failed),
            CheckKind::Https => {
                let name = ServerName::IpAddress(target.ip().into());
                let stream = tls_connector()
                    .connect(name, stream)
                    .await
                    .map_err(|e| failed(format!("tls: {e}")))?;
                http_get(check, target, stream).await.map_err(failed)
            }
        }
    };
    match tokio::time::timeout(Duration::from_millis(check.timeout_ms), work).await {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CheckFailure::Backend(format!(
            "timed out after {} ms",
            check.timeout_ms
        ))),
    }
}

/// Whose fault a failed connect is. Only the socket's creation and its implicit bind
/// can fail for want of this machine's resources; everything after is the backend's
/// (or the network's) answer.
fn connect_failure(e: &std::io::Error) -> CheckFailure {
    let local = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    );
    let message = format!("connect: {e}");
    if local {
        CheckFailure::Local(message)
    } else {
        CheckFailure::Backend(message)
    }
}

/// `GET path` on an open connection; the status must be in the expected range.
async fn http_get<S>(check: &HealthCheck, target: SocketAddr, stream: S) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = Request::get(check.path.as_str())
        .header("Host", target.to_string())
        .header("User-Agent", "foobar-lb-health-check")
        .header("Connection", "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let status = response.status().as_u16();
    let [lo, hi] = check.expect_status;
    if (lo..=hi).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}, expected {lo}-{hi}"))
    }
}

/// The TLS client of `https` checks, built once.
fn tls_connector() -> TlsConnector {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Arc::new(config)
    });
    TlsConnector::from(config.clone())
}

/// Accepts any certificate, but still checks the handshake's signatures with it, so
/// the backend must hold the key of what it presents.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How many times a backend went up or down, shared with whoever caches what `status`
/// shows (the HTTP listener): a cache learns without the agent's lock that its copy is
/// out of date. The databases' failover reads backends' health from `/status.json` and
/// must not see a flip late.
#[derive(Clone, Debug, Default)]
pub struct HealthChanges(Arc<AtomicU64>);

impl HealthChanges {
    /// The changes so far.
    pub fn count(&self) -> u64 {
        // The count guards no data (a cache reads that under the agent's lock): it
        // only has to move.
        self.0.load(Ordering::Relaxed)
    }

    /// One more change.
    pub fn record(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a backend stands, by its checks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendHealth {
    /// Up (takes new flows) or down.
    pub up: bool,
    /// Consecutive results against the current state.
    pub streak: u32,
    /// The last check: `None` before the first.
    pub last_ok: Option<bool>,
    /// What the last failure said.
    pub last_error: Option<String>,
    /// Latency of the last successful check, ms.
    pub last_latency_ms: Option<f64>,
    /// Up↔down changes so far.
    pub transitions: u64,
    /// Checks skipped so far because this machine could not run them
    /// ([`CheckFailure::Local`]).
    #[serde(default)]
    pub skipped: u64,
    /// Checks skipped in a row up to now: 0 once one runs again.
    #[serde(default)]
    pub skipped_in_a_row: u32,
    /// Why the last check was skipped.
    #[serde(default)]
    pub last_skip: Option<String>,
}

impl Default for BackendHealth {
    /// Backends start up, as in HAProxy: a fresh balancer serves at once and the
    /// checks take down what does not answer.
    fn default() -> Self {
        Self {
            up: true,
            streak: 0,
            last_ok: None,
            last_error: None,
            last_latency_ms: None,
            transitions: 0,
            skipped: 0,
            skipped_in_a_row: 0,
            last_skip: None,
        }
    }
}

impl BackendHealth {
    /// Records a check; returns the new state if it changed. A skipped check is
    /// neither a success nor a failure: the state and its streak wait for one that ran.
    pub fn record(&mut self, result: &CheckResult, rise: u32, fall: u32) -> Option<bool> {
        let result = match result {
            Err(CheckFailure::Local(why)) => {
                self.skipped += 1;
                self.skipped_in_a_row += 1;
                self.last_skip = Some(why.clone());
                return None;
            }
            Err(CheckFailure::Backend(e)) => Err(e),
            Ok(latency) => Ok(latency),
        };
        self.skipped_in_a_row = 0;
        let ok = result.is_ok();
        self.last_ok = Some(ok);
        match result {
            Ok(latency) => self.last_latency_ms = Some(latency.as_secs_f64() * 1e3),
            Err(e) => self.last_error = Some(e.clone()),
        }
        // A result that agrees with the state resets the streak against it.
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak >= if ok { rise } else { fall } {
            self.up = ok;
            self.streak = 0;
            self.transitions += 1;
            return Some(ok);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: CheckResult = Ok(Duration::from_millis(1));

    fn fail() -> CheckResult {
        Err(CheckFailure::Backend("refused".into()))
    }

    fn out_of_files() -> CheckResult {
        Err(connect_failure(&std::io::Error::from_raw_os_error(
            libc::EMFILE,
        )))
    }

    #[test]
    fn errors_of_this_machine_are_local_and_the_rest_the_backends() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(matches!(connect_failure(&e), CheckFailure::Local(_)), "{e}");
        }
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ETIMEDOUT] {
            let e = std::io::Error::from_raw_os_error(errno);
            assert!(
                matches!(connect_failure(&e), CheckFailure::Backend(_)),
                "{e}"
            );
        }
    }

    #[test]
    fn a_skipped_check_changes_neither_the_state_nor_its_streak() {
        let mut h = BackendHealth::default();
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        // However many are skipped, the third failure is still the one that counts.
        for _ in 0..10 {
            assert_eq!(h.record(&out_of_files(), 2, 3), None);
        }
        assert!(h.up);
        assert_eq!((h.skipped, h.skipped_in_a_row), (10, 10));
        assert!(h.last_skip.as_deref().unwrap().contains("connect"));
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        assert_eq!(h.record(&fail(), 2, 3), Some(false));
        assert_eq!(h.skipped_in_a_row, 0);
        // Down stays down through skipped checks.
        for _ in 0..10 {
            assert_eq!(h.record(&out_of_files(), 2, 3), None);
        }
        assert!(!h.up);
        assert_eq!(h.transitions, 1);
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = BackendHealth::default();
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        // A success in between resets the count.
        assert_eq!(h.record(&OK, 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), None);
        assert_eq!(h.record(&fail(), 2, 3), Some(false));
        assert!(!h.up);
        assert_eq!(h.record(&OK, 2, 3), None);
        assert_eq!(h.record(&OK, 2, 3), Some(true));
        assert_eq!(h.transitions, 2);
        assert_eq!(h.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn validation_names_the_field() {
        let at = "vips[0].health_check";
        let field = |c: HealthCheck| c.validate(at).unwrap_err().0;
        assert!(HealthCheck::default().validate(at).is_ok());
        let c = HealthCheck::default;
        assert_eq!(
            field(HealthCheck {
                interval_ms: 5,
                ..c()
            }),
            format!("{at}.interval_ms")
        );
        assert_eq!(
            field(HealthCheck {
                timeout_ms: 5000,
                ..c()
            }),
            format!("{at}.timeout_ms")
        );
        assert_eq!(field(HealthCheck { rise: 0, ..c() }), format!("{at}.rise"));
        assert_eq!(
            field(HealthCheck {
                port: Some(0),
                ..c()
            }),
            format!("{at}.port")
        );
        assert_eq!(
            field(HealthCheck { fall: 101, ..c() }),
            format!("{at}.fall")
        );
        assert_eq!(
            field(HealthCheck {
                path: "x".into(),
                ..c()
            }),
            format!("{at}.path")
        );
        assert_eq!(
            field(HealthCheck {
                expect_status: [400, 200],
                ..c()
            }),
            format!("{at}.expect_status")
        );
    }
}
