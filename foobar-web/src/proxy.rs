//! The reverse proxy to the application nodes, with the behaviour of nginx's
//! `upstream` and `proxy_pass`: keep-alive connections per upstream, round robin, an
//! upstream that fails `max_fails` times within `fail_timeout` is skipped for
//! `fail_timeout` (passive health), a request that fails is tried once more on another
//! upstream when that is safe (idempotent, or never sent), `X-Forwarded-For` and
//! `X-Forwarded-Proto`, deadlines, a request-body limit, and 502/504 that say why.

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
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::Response,
};
use foobar_node::{observe::text, server::ClientInfo};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::warn;

use crate::config::Proxy;

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
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Failures counted since `window_start`.
    fails: u32,
    window_start: Option<Instant>,
    /// Skipped until then.
    down_until: Option<Instant>,
}

/// The upstream pool, shared by every request.
pub struct Pool {
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
    settings: Proxy,
    outcomes: Family<UpstreamLabels, Counter>,
    retries: Counter,
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
    /// A pool for `settings`, its metrics registered in `registry`.
    pub fn new(settings: &Proxy, registry: &mut Registry) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(settings.keepalive)
            .build(connector);
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
        Arc::new(Self {
            upstreams: settings
                .upstreams
                .iter()
                .map(|&addr| Upstream {
                    addr,
                    label: addr.to_string(),
                    health: Mutex::new(Health::default()),
                })
                .collect(),
            next: AtomicUsize::new(0),
            client,
            settings: settings.clone(),
            outcomes,
            retries,
        })
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
        self.outcomes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.label.clone(),
                outcome: match outcome {
                    Ok(()) => "ok",
                    Err(f) => f.outcome(),
                },
            })
            .inc();
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
                    health.fails = 0;
                    health.window_start = None;
                }
            }
        }
    }

    async fn attempt(&self, i: usize, parts: &Forwarded) -> Result<Response, Failure> {
        let upstream = self.upstreams[i].addr;
        let uri = Uri::builder()
            .scheme("http")
            .authority(upstream.to_string())
            .path_and_query(parts.path_and_query.as_str())
            .build()
            .map_err(|_| Failure::Error)?;
        let mut request = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(parts.body.clone()))
            .map_err(|_| Failure::Error)?;
        *request.headers_mut() = parts.headers.clone();
        let read_timeout = Duration::from_millis(self.settings.read_timeout_ms);
        match tokio::time::timeout(read_timeout, self.client.request(request)).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(Failure::Connect),
            Ok(Err(_)) => Err(Failure::Error),
            Ok(Ok(response)) => {
                let (mut head, body) = response.into_parts();
                strip_hop_by_hop(&mut head.headers);
                Ok(Response::from_parts(head, Body::new(body)))
            }
        }
    }
}

/// What is sent upstream, kept so it can be sent twice.
struct Forwarded {
    method: Method,
    path_and_query: String,
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
pub async fn forward(State(pool): State<Arc<Pool>>, request: Request) -> Response {
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
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body above {limit} bytes"),
            );
        }
        Err(_) => return text(StatusCode::BAD_REQUEST, "the request body was cut short"),
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
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
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
        match pool.attempt(i, &forwarded).await {
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
    for name in [
        header::CONNECTION,
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
