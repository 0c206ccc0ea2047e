//! The HTTP listener for people and Prometheus: `/` (a status page that refreshes
//! itself), `/status.json` and `/metrics`. Off unless `[metrics] listen` is set.
//!
//! It lives in the process that runs the health checks and VRRP, so it must never take
//! what they need. At most `connection_limit()` connections are open at once; more wait
//! in the kernel's accept queue, which costs this process no file descriptor. A client
//! has `REQUEST_HEAD_TIMEOUT` to send each request, so idle and trickling clients are
//! closed; no connection outlives `MAX_CONNECTION_AGE`; failed accepts back off instead
//! of spinning; and the agent is read at most once per `FRESH_FOR`, however often it is
//! scraped.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{
    agent::Agent,
    api::{Reply, Request as ApiRequest, Stats, Status},
    health::HealthChanges,
    metrics,
};

const STATUS_PAGE: &str = include_str!("status.html");

/// Most connections open at once: a Prometheus or two and a few browsers need a
/// handful.
const MAX_CONNECTIONS: usize = 256;
/// Connections beyond the limit wait here, in the kernel, until a slot frees (tokio's
/// default of 128 would drop the SYNs of a burst of scrapers, who then retry late).
const ACCEPT_QUEUE: u32 = 1024;
/// A client must send a whole request head within this of the connection opening or
/// of its previous answer: hyper starts the timer whenever it waits for a head, so this
/// is also the idle timeout of kept-alive connections. The status page asks every
/// 2 s, so a browser keeps its connection.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is asked to close after this (after the answer in progress) and
/// dropped [`CLOSING_GRACE`] later: hyper has no write timeout, and a client that never
/// reads its answers, or never stops asking, must not keep its slot forever.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// See [`MAX_CONNECTION_AGE`].
const CLOSING_GRACE: Duration = Duration::from_secs(5);
/// How long one read of the agent answers `/status.json` and `/metrics`.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Binds the listener, with an accept queue of [`ACCEPT_QUEUE`].
pub fn bind(at: SocketAddr) -> io::Result<TcpListener> {
    let socket = if at.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(at)?;
    socket.listen(ACCEPT_QUEUE)
}

/// Serves until the task is dropped. It holds the agent weakly, so an idle browser
/// connection never keeps a stopping daemon from cleaning up.
pub async fn serve(
    listener: TcpListener,
    agent: Weak<Mutex<Agent>>,
    health_changes: HealthChanges,
) {
    let limit = connection_limit();
    debug!(limit, "metrics listener: connection limit");
    let slots = Arc::new(Semaphore::new(limit));
    let snapshots = Arc::new(Snapshots::new(agent, health_changes));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT);
    let mut backoff = AcceptBackoff::new("metrics listener");
    loop {
        // A slot is taken before accepting: beyond the limit, connections wait in the
        // kernel's queue rather than being accepted only to be closed, which would
        // cost a descriptor each and keep this loop busy through a flood.
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff.succeeded();
                    break stream;
                }
                Err(e) => backoff.failed(&e).await,
            }
        };
        let (http, snapshots) = (http.clone(), snapshots.clone());
        tokio::spawn(async move {
            serve_connection(&http, stream, snapshots).await;
            drop(slot);
        });
    }
}

/// The connection limit: [`MAX_CONNECTIONS`], or a quarter of the file descriptors
/// this process may open if that is less, so that health probes, VRRP and the data
/// plane's maps always have the rest.
fn connection_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return MAX_CONNECTIONS;
    }
    usize::try_from(limit.rlim_cur / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS)
}

/// Serves one connection until its client closes it, idles or trickles past
/// [`REQUEST_HEAD_TIMEOUT`], or it reaches [`MAX_CONNECTION_AGE`].
async fn serve_connection(http: &http1::Builder, stream: TcpStream, snapshots: Arc<Snapshots>) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let snapshots = snapshots.clone();
        let accept = req.headers().get_all(hyper::header::ACCEPT).iter();
        let format = metrics::Format::negotiate(accept.filter_map(|v| v.to_str().ok()));
        async move { Ok::<_, Infallible>(answer(req.uri().path(), format, &snapshots).await) }
    });
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = match tokio::time::timeout(MAX_CONNECTION_AGE, connection.as_mut()).await {
        Ok(result) => result,
        Err(_) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSING_GRACE, connection).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    // Clients that time out, go away or send garbage are not our errors.
    if let Err(e) = result {
        debug!("metrics connection: {e}");
    }
}

/// Back-off after failed accepts. Out of file descriptors (EMFILE, ENFILE) or memory,
/// the connection stays queued and accepting again at once would spin; instead the
/// loop sleeps, from [`BACKOFF_FIRST`] doubling up to [`BACKOFF_MAX`], and logs once
/// per burst of failures, not per failure. The control socket uses it too.
pub(crate) struct AcceptBackoff {
    listener: &'static str,
    failures: u64,
    delay: Duration,
}

/// The first wait after a failed accept.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
/// The longest wait between accepts while they fail.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// No failure yet; `listener` names it in the log.
    pub(crate) fn new(listener: &'static str) -> Self {
        Self {
            listener,
            failures: 0,
            delay: BACKOFF_FIRST,
        }
    }

    /// After a failed accept: waits as long as the burst so far calls for.
    pub(crate) async fn failed(&mut self, error: &io::Error) {
        // That client gave up while queued: the next one may be accepted at once.
        if matches!(
            error.kind(),
            io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
        ) {
            debug!(listener = self.listener, "accept: {error}");
            return;
        }
        if self.failures == 0 {
            warn!(
                listener = self.listener,
                "accepting connections: {error}; backing off until it works again"
            );
        }
        self.failures += 1;
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    /// After an accept: ends a burst of failures.
    pub(crate) fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(
                listener = self.listener,
                failures = self.failures,
                "accepting connections again"
            );
        }
        self.failures = 0;
        self.delay = BACKOFF_FIRST;
    }
}

/// The agent's status and counters as read at one instant.
struct Snapshot {
    read_at: Instant,
    /// [`HealthChanges::count`] when it was read.
    health_changes: u64,
    status: Status,
    stats: Stats,
}

/// Reads the agent for `/status.json` and `/metrics` at most once per [`FRESH_FOR`]: a
/// read takes the agent's lock and walks the data plane's counters, and a flood of
/// scrapes must not hold up the health checks and changes that wait for that lock.
/// A backend going up or down is shown at once, though: the databases' failover reads
/// it here.
struct Snapshots {
    agent: Weak<Mutex<Agent>>,
    health_changes: HealthChanges,
    /// The last read. An async lock, held across a read, so that requests arriving
    /// meanwhile wait for that read and share it instead of each making their own.
    last: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
}

/// Why there is no snapshot to answer with.
enum Unavailable {
    /// The daemon is stopping: the agent is gone.
    Stopping,
    /// The agent could not answer.
    Failed(String),
}

impl Snapshots {
    fn new(agent: Weak<Mutex<Agent>>, health_changes: HealthChanges) -> Self {
        Self {
            agent,
            health_changes,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The last read if it is fresh and no backend went up or down since, else a new
    /// one.
    async fn fresh(&self) -> Result<Arc<Snapshot>, Unavailable> {
        let mut last = self.last.lock().await;
        let changes = self.health_changes.count();
        if let Some(snapshot) = last
            .as_ref()
            .filter(|s| s.read_at.elapsed() < FRESH_FOR && s.health_changes == changes)
        {
            return Ok(snapshot.clone());
        }
        let agent = self.agent.upgrade().ok_or(Unavailable::Stopping)?;
        let health_changes = self.health_changes.clone();
        let snapshot = tokio::task::spawn_blocking(move || read(&agent, &health_changes))
            .await
            .map_err(|e| Unavailable::Failed(e.to_string()))?
            .map_err(Unavailable::Failed)?;
        let snapshot = Arc::new(snapshot);
        *last = Some(snapshot.clone());
        Ok(snapshot)
    }
}

/// Status and counters, under one hold of the agent's lock.
fn read(agent: &Mutex<Agent>, health_changes: &HealthChanges) -> Result<Snapshot, String> {
    let mut agent = agent.lock().unwrap_or_else(|p| p.into_inner());
    // Changes are counted under the lock, so this is the count of what is read.
    let health_changes = health_changes.count();
    let status = match agent.handle(ApiRequest::Status) {
        Ok(Reply::Status(s)) => s,
        other => return Err(format!("{other:?}")),
    };
    let stats = match agent.handle(ApiRequest::Stats) {
        Ok(Reply::Stats(s)) => s,
        other => return Err(format!("{other:?}")),
    };
    Ok(Snapshot {
        read_at: Instant::now(),
        health_changes,
        status,
        stats,
    })
}

fn response(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Cache-Control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

/// The answer to a GET of `path`; `/metrics` in `format`.
async fn answer(
    path: &str,
    format: metrics::Format,
    snapshots: &Snapshots,
) -> Response<Full<Bytes>> {
    match path {
        "/" => response(200, "text/html; charset=utf-8", STATUS_PAGE.to_owned()),
        "/status.json" | "/metrics" => {
            let wants_metrics = path == "/metrics";
            let work = snapshots.fresh().await.map(|s| {
                if wants_metrics {
                    metrics::render(&s.status, &s.stats, format)
                } else {
                    serde_json::to_string(&s.status).expect("status serializes")
                }
            });
            match work {
                Ok(body) if wants_metrics => response(200, format.content_type(), body),
                Ok(body) => response(200, "application/json", body),
                Err(Unavailable::Failed(e)) => {
                    warn!("{path}: {e}");
                    response(500, "text/plain", e)
                }
                Err(Unavailable::Stopping) => {
                    response(503, "text/plain", "the agent is stopping\n".into())
                }
            }
        }
        _ => response(404, "text/plain", "not found\n".into()),
    }
}
