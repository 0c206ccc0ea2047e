//! The reverse proxy to the application nodes, with the behaviour of nginx's
//! `upstream` and `proxy_pass`: keep-alive connections per upstream, round robin, an
//! upstream that fails `max_fails` times within `fail_timeout` is skipped for
//! `fail_timeout` (passive health), a request that fails is tried once more on another
//! upstream when that is safe (idempotent, or never sent), `X-Forwarded-For` and
//! `X-Forwarded-Proto`, deadlines, a request-body limit, and 502/504 that say why.
//! With `upstream_tls_ca` the connections to upstreams are TLS ([`upstream_tls`]),
//! as nginx's `proxy_ssl_verify` with `proxy_ssl_trusted_certificate`.
//!
//! [`upstream_tls`]: crate::upstream_tls

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header, uri::PathAndQuery},
    response::Response,
};
use foobar_node::{observe::text, server::ClientInfo};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::client::conn::http1::{self as client_http1, SendRequest};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tracing::warn;

use crate::{
    config::Proxy,
    upstream_tls::{self, UpstreamCaError},
};

/// Largest upstream answer read whole before it is sent on.
const BUFFERED_ANSWER_MAX: u64 = 64 * 1024;

/// Labels of the per-upstream counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
    outcome: &'static str,
}

/// One application node and its passive health.
struct Upstream {
    addr: SocketAddr,
    label: String,
    /// Its `outcome="ok"` counter, looked up once (the common case, every request).
    ok: Counter,
    health: Mutex<Health>,
    /// Times it was taken out: workers drop their idle connections to it when this
    /// moves (a connection kept to a dead node would hang the next request on it).
    outages: AtomicUsize,
}

#[derive(Default)]
struct Health {
    /// Failures counted since `window_start`.
    fails: u32,
    window_start: Option<Instant>,
    /// Skipped until then.
    down_until: Option<Instant>,
}

/// The upstreams and their health, shared by every worker.
pub struct Pool {
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    settings: Proxy,
    /// TLS to the upstreams (`upstream_tls_ca`); none: plain HTTP.
    tls: Option<TlsConnector>,
    outcomes: Family<UpstreamLabels, Counter>,
    retries: Counter,
}

/// A worker's idle connections to one upstream, with the upstream's outage count
/// when they were kept.
type Idle = (usize, Vec<SendRequest<Full<Bytes>>>);

/// A worker's side of the pool: its own keep-alive connections to each upstream (as
/// each nginx worker has its own), used only on the worker's thread.
pub struct WorkerPool {
    pool: Arc<Pool>,
    /// Idle connections, by upstream.
    idle: Vec<Mutex<Idle>>,
}

/// Why an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// Could not connect: the request was never sent, so any method may be retried.
    Connect,
    /// Sent, then the connection failed.
    Error,
    /// No response head within the read deadline.
    Timeout,
}

impl Failure {
    fn outcome(self) -> &'static str {
        match self {
            Failure::Connect => "connect_error",
            Failure::Error => "error",
            Failure::Timeout => "timeout",
        }
    }
}

impl Pool {
    /// A pool for `settings`, its metrics registered in `registry`; fails if its
    /// `upstream_tls_ca` cannot be read or holds no CA certificate.
    pub fn new(settings: &Proxy, registry: &mut Registry) -> Result<Arc<Self>, UpstreamCaError> {
        let tls = match &settings.upstream_tls_ca {
            Some(ca) => Some(upstream_tls::connector(ca)?),
            None => None,
        };
        let outcomes = Family::<UpstreamLabels, Counter>::default();
        let retries = Counter::default();
        registry.register(
            "upstream_attempts",
            "Requests sent to each upstream, by outcome (ok, connect_error, error, timeout)",
            outcomes.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests tried again on another upstream after a failure",
            retries.clone(),
        );
        Ok(Arc::new(Self {
            upstreams: settings
                .upstreams
                .iter()
                .map(|&addr| Upstream {
                    addr,
                    label: addr.to_string(),
                    ok: outcomes
                        .get_or_create(&UpstreamLabels {
                            upstream: addr.to_string(),
                            outcome: "ok",
                        })
                        .clone(),
                    health: Mutex::new(Health::default()),
                    outages: AtomicUsize::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            settings: settings.clone(),
            tls,
            outcomes,
            retries,
        }))
    }

    /// The next upstream in turn that is not out and not yet tried for this request.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..n).map(|k| (start + k) % n).find(|i| {
            !tried.contains(i)
                && self.upstreams[*i]
                    .health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .down_until
                    .is_none_or(|until| until <= now)
        })
    }

    fn record(&self, i: usize, outcome: Result<(), Failure>) {
        let upstream = &self.upstreams[i];
        match outcome {
            Ok(()) => upstream.ok.inc(),
            Err(f) => self
                .outcomes
                .get_or_create(&UpstreamLabels {
                    upstream: upstream.label.clone(),
                    outcome: f.outcome(),
                })
                .inc(),
        };
        let mut health = upstream.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let fail_timeout = Duration::from_millis(self.settings.fail_timeout_ms);
        match outcome {
            Ok(()) => *health = Health::default(),
            Err(failure) => {
                if health
                    .window_start
                    .is_none_or(|start| now.duration_since(start) > fail_timeout)
                {
                    health.window_start = Some(now);
                    health.fails = 0;
                }
                health.fails += 1;
                if health.fails >= self.settings.max_fails {
                    warn!(upstream = %upstream.addr, ?failure, "upstream out for {fail_timeout:?}");
                    health.down_until = Some(now + fail_timeout);
                    upstream.outages.fetch_add(1, Ordering::Relaxed);
                    health.fails = 0;
                    health.window_start = None;
                }
            }
        }
    }

    /// The calling worker's connections to the upstreams (none open yet).
    pub fn worker(self: &Arc<Self>) -> Arc<WorkerPool> {
        Arc::new(WorkerPool {
            pool: self.clone(),
            idle: self
                .upstreams
                .iter()
                .map(|_| Mutex::new((0, Vec::new())))
                .collect(),
        })
    }
}

impl WorkerPool {
    /// An idle connection to upstream `i` ready for a request, if one is kept.
    fn checkout(&self, i: usize) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle[i].lock().unwrap_or_else(|p| p.into_inner());
        let outages = self.pool.upstreams[i].outages.load(Ordering::Relaxed);
        if idle.0 != outages {
            // Kept before the upstream was taken out: not to be trusted.
            *idle = (outages, Vec::new());
        }
        while let Some(sender) = idle.1.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose last answer was read whole, up to `keepalive`.
    fn checkin(&self, i: usize, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle[i].lock().unwrap_or_else(|p| p.into_inner());
        if idle.1.len() < self.pool.settings.keepalive {
            idle.1.push(sender);
        }
    }

    /// A new connection to upstream `i` (over TLS with `upstream_tls_ca`), its
    /// HTTP/1.1 state driven by a task of this worker.
    async fn connect(&self, i: usize) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let addr = self.pool.upstreams[i].addr;
        let deadline = Duration::from_millis(self.pool.settings.connect_timeout_ms);
        // The TLS handshake is inside the deadline: a node that takes the connection
        // but never answers the handshake is as unreachable as one that does not.
        tokio::time::timeout(deadline, self.open(addr))
            .await
            .unwrap_or(Err(Failure::Connect))
    }

    /// Connects to `addr`, and shakes hands over TLS if the pool says so.
    async fn open(&self, addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|_| Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.pool.tls else {
            return http1_over(stream).await;
        };
        match tls
            .connect(upstream_tls::server_name(addr.ip()), stream)
            .await
        {
            Ok(stream) => http1_over(stream).await,
            Err(e) => {
                // A refused certificate is a configuration to fix, not a node down:
                // the log tells them apart.
                warn!(upstream = %addr, "TLS handshake: {e}");
                Err(Failure::Connect)
            }
        }
    }

    /// Sends the request once to upstream `i`: on a kept connection, or a new one if
    /// none is kept or the kept one turns out closed before the request left.
    async fn attempt(&self, i: usize, parts: &Forwarded) -> Result<Response, Failure> {
        let read_timeout = Duration::from_millis(self.pool.settings.read_timeout_ms);
        let request = || {
            let mut request = hyper::Request::new(Full::new(parts.body.clone()));
            *request.method_mut() = parts.method.clone();
            *request.uri_mut() = Uri::from(parts.path_and_query.clone());
            *request.headers_mut() = parts.headers.clone();
            request
        };
        let (mut sender, response) = match self.checkout(i) {
            // The read deadline holds on a kept connection too: its node may have
            // died without a word since (a cut link sends no reset).
            Some(mut kept) => {
                match tokio::time::timeout(read_timeout, kept.send_request(request()))
                    .await
                    .map_err(|_| Failure::Timeout)?
                {
                    Ok(response) => (kept, Ok(response)),
                    // The upstream closed the idle connection meanwhile: the request never
                    // left, so a new connection may carry it.
                    Err(e) if e.is_canceled() || e.is_closed() => {
                        let mut fresh = self.connect(i).await?;
                        let response =
                            tokio::time::timeout(read_timeout, fresh.send_request(request())).await;
                        (fresh, response.map_err(|_| Failure::Timeout)?)
                    }
                    Err(e) => (kept, Err(e)),
                }
            }
            None => {
                let mut fresh = self.connect(i).await?;
                let response =
                    tokio::time::timeout(read_timeout, fresh.send_request(request())).await;
                (fresh, response.map_err(|_| Failure::Timeout)?)
            }
        };
        let response = response.map_err(|_| Failure::Error)?;
        let (mut head, body) = response.into_parts();
        strip_hop_by_hop(&mut head.headers);
        // A small answer is read whole and sent in one write (nginx's proxy_buffering),
        // and its connection is free again; a big or unsized one streams through on a
        // connection that is not kept.
        let small = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= BUFFERED_ANSWER_MAX);
        if !small {
            return Ok(Response::from_parts(head, Body::new(body)));
        }
        let whole = match tokio::time::timeout(read_timeout, body.collect()).await {
            Ok(Ok(whole)) => whole.to_bytes(),
            Ok(Err(_)) => return Err(Failure::Error),
            Err(_) => return Err(Failure::Timeout),
        };
        if sender.ready().await.is_ok() {
            self.checkin(i, sender);
        }
        Ok(Response::from_parts(head, Body::from(whole)))
    }
}

/// An HTTP/1.1 client connection over `io` (TCP, or TLS over it), its state driven
/// by a task of the calling worker.
async fn http1_over<T>(io: T) -> Result<SendRequest<Full<Bytes>>, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = client_http1::handshake(TokioIo::new(io))
        .await
        .map_err(|_| Failure::Connect)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// What is sent upstream, kept so it can be sent twice.
struct Forwarded {
    method: Method,
    path_and_query: PathAndQuery,
    headers: HeaderMap,
    body: Bytes,
}

/// Methods whose retry cannot do harm (RFC 9110 §9.2.2).
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// The proxy handler.
pub async fn forward(State(worker): State<Arc<WorkerPool>>, request: Request) -> Response {
    let pool = &worker.pool;
    let client = request.extensions().get::<ClientInfo>().copied();
    let (parts, body) = request.into_parts();
    let limit = pool.settings.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body above {limit} bytes"),
        );
    }
    // Most proxied requests (GET) have no body: nothing to gather.
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body above {limit} bytes"),
                );
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "the request body was cut short"),
        }
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if let Some(client) = client {
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", client.addr.ip()),
            None => client.addr.ip().to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if client.tls { "https" } else { "http" }),
        );
    }
    let forwarded = Forwarded {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        headers,
        body,
    };

    let mut tried = Vec::with_capacity(2);
    let mut last = None;
    while tried.len() < 2 {
        let Some(i) = pool.pick(&tried) else { break };
        if !tried.is_empty() {
            pool.retries.inc();
        }
        tried.push(i);
        match worker.attempt(i, &forwarded).await {
            Ok(response) => {
                pool.record(i, Ok(()));
                return response;
            }
            Err(failure) => {
                pool.record(i, Err(failure));
                last = Some(failure);
                let safe = failure == Failure::Connect || idempotent(&forwarded.method);
                if !safe {
                    break;
                }
            }
        }
    }
    match last {
        None => text(
            StatusCode::BAD_GATEWAY,
            "no live upstream: every application node is out",
        ),
        Some(Failure::Timeout) => text(
            StatusCode::GATEWAY_TIMEOUT,
            "the application node did not answer in time",
        ),
        Some(Failure::Connect) => text(
            StatusCode::BAD_GATEWAY,
            "could not connect to an application node",
        ),
        Some(Failure::Error) => text(
            StatusCode::BAD_GATEWAY,
            "the application node closed the connection",
        ),
    }
}

/// Removes the headers that belong to one connection, not to the message (RFC 9110
/// §7.6.1), including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        strip_named_by_connection(headers);
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// Removes the `Connection` header and those it names.
fn strip_named_by_connection(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    headers.remove(header::CONNECTION);
}
