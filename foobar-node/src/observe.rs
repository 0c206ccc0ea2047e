//! What a service tells its operator: one access-log line per request in the combined
//! log format (as nginx and Apache write it), and Prometheus metrics of requests by
//! route and status with a latency histogram. Both are recorded when the response
//! body has been sent (or abandoned), so sizes and durations are the real ones.

use std::{
    borrow::Cow,
    fmt::Write as _,
    io::Write as _,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, Bytes},
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::server::ClientInfo;

pub mod exposition;

pub use exposition::Format;

/// Labels of a request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Cow<'static, str>,
    code: u16,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Cow<'static, str>,
}

/// Request latency buckets, in seconds: 0.5 ms to 10 s.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The metrics registry of a service and its request log.
pub struct Observer {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    access_log: Option<AccessLog>,
    fallback_route: &'static str,
}

impl Observer {
    /// Adds the request metrics to `registry` (which holds the service's own) and
    /// freezes it. Requests that matched no route are labelled `fallback_route`.
    pub fn new(
        mut registry: Registry,
        access_log: Option<AccessLog>,
        fallback_route: &'static str,
    ) -> Arc<Self> {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request's arrival to the end of its response body",
            latency.clone(),
        );
        crate::firewall::register_metrics(&mut registry);
        Arc::new(Self {
            registry,
            requests,
            latency,
            access_log,
            fallback_route,
        })
    }

    /// The metrics in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        format.convert(out)
    }

    /// The answer to a `GET /metrics` with these headers: the classic text format
    /// unless its `Accept` asks for OpenMetrics.
    pub fn metrics_response(&self, request: &HeaderMap) -> Response {
        let accept = request.get_all(header::ACCEPT);
        let format = Format::negotiate(accept.iter().filter_map(|v| v.to_str().ok()));
        (
            [(header::CONTENT_TYPE, format.content_type())],
            self.render(format),
        )
            .into_response()
    }

    /// Flushes the access log (on shutdown).
    pub fn flush(&self) {
        if let Some(log) = &self.access_log {
            log.flush();
        }
    }

    fn finish(&self, done: &Done, bytes: u64) {
        let elapsed = done.started.elapsed();
        self.requests
            .get_or_create(&RequestLabels {
                route: done.route.clone(),
                code: done.status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: done.route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        if let Some(log) = &self.access_log {
            let mut line = done.log_head.clone();
            let _ = writeln!(
                line,
                " {} {} \"{}\" \"{}\"",
                done.status, bytes, done.referer, done.user_agent
            );
            log.write(&line);
        }
    }
}

/// The middleware: `Router::layer(axum::middleware::from_fn_with_state(observer, observe))`;
/// requests are labelled with their route's pattern.
pub async fn observe(
    State(observer): State<Arc<Observer>>,
    request: Request,
    next: Next,
) -> Response {
    let route: Cow<'static, str> = match request.extensions().get::<MatchedPath>() {
        Some(path) => Cow::Owned(path.as_str().to_owned()),
        None => Cow::Borrowed(observer.fallback_route),
    };
    let pending = observer.begin(&request, route);
    pending.finish(next.run(request).await)
}

impl Observer {
    /// Starts recording a request labelled `route`; [`Pending::finish`] records it once
    /// its response body has been sent.
    pub fn begin<B>(
        self: &Arc<Self>,
        request: &axum::http::Request<B>,
        route: Cow<'static, str>,
    ) -> Pending {
        let logged = self.access_log.is_some();
        let headers = request.headers();
        Pending {
            done: Done {
                observer: self.clone(),
                started: Instant::now(),
                route,
                status: 0,
                log_head: if logged {
                    log_head(request)
                } else {
                    String::new()
                },
                referer: if logged {
                    log_value(headers, header::REFERER)
                } else {
                    String::new()
                },
                user_agent: if logged {
                    log_value(headers, header::USER_AGENT)
                } else {
                    String::new()
                },
            },
        }
    }
}

/// A request being answered.
pub struct Pending {
    done: Done,
}

impl Pending {
    /// Its response, whose body records the request when sent or dropped.
    pub fn finish(mut self, response: Response) -> Response {
        self.done.status = response.status().as_u16();
        let done = self.done;
        response.map(|body| {
            Body::new(Observed {
                inner: body,
                bytes: 0,
                done: Some(done),
            })
        })
    }
}

/// `client - - [time] "METHOD /path HTTP/1.1"`.
fn log_head<B>(request: &axum::http::Request<B>) -> String {
    let client = request
        .extensions()
        .get::<ClientInfo>()
        .map(|c| c.addr.ip().to_string())
        .unwrap_or_else(|| "-".into());
    let time = clf_now();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    format!(
        "{client} - - [{time}] \"{} {} {:?}\"",
        request.method(),
        escape(path),
        request.version()
    )
}

/// The time in the log's format, formatted once a second per thread.
fn clf_now() -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let now = chrono::Utc::now();
    LAST.with_borrow_mut(|(second, text)| {
        if *second != now.timestamp() {
            *second = now.timestamp();
            *text = now.format("%d/%b/%Y:%H:%M:%S +0000").to_string();
        }
        text.clone()
    })
}

fn log_value(headers: &HeaderMap, name: header::HeaderName) -> String {
    match headers.get(name) {
        Some(value) => escape(&String::from_utf8_lossy(value.as_bytes())),
        None => "-".into(),
    }
}

/// As nginx does: quotes, backslashes and control characters become `\xHH`, so a
/// client cannot forge log lines.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '"' || c == '\\' || c.is_control() {
            for byte in c.to_string().bytes() {
                let _ = write!(out, "\\x{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What is known of a request when its response starts.
struct Done {
    observer: Arc<Observer>,
    started: Instant,
    route: Cow<'static, str>,
    status: u16,
    log_head: String,
    referer: String,
    user_agent: String,
}

/// A response body that records its request once sent or dropped.
struct Observed {
    inner: Body,
    bytes: u64,
    done: Option<Done>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done.observer.finish(&done, self.bytes);
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The access log: a file (or stdout), buffered and flushed four times a second.
#[derive(Clone)]
pub struct AccessLog {
    out: Arc<Mutex<std::io::BufWriter<Box<dyn std::io::Write + Send>>>>,
}

impl AccessLog {
    /// Opens `path` for appending (`-` is stdout) and starts its flusher; needs a
    /// tokio runtime.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let sink: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stdout())
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            Box::new(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        let log = Self {
            out: Arc::new(Mutex::new(std::io::BufWriter::with_capacity(
                64 * 1024,
                sink,
            ))),
        };
        let flusher = log.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                flusher.flush();
            }
        });
        Ok(log)
    }

    fn write(&self, line: &str) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = out.write_all(line.as_bytes());
    }

    /// Writes out what is buffered.
    pub fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    }
}

/// A plain-text answer with a status, for errors every service gives the same way.
pub fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut body = message.into();
    body.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\x22b\\x5Cc\\x0Ad");
        assert_eq!(escape("/ok/päth"), "/ok/päth");
    }
}
