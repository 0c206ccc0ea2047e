//! Serving a router over HTTP/1.1 and HTTP/2, in the clear or over TLS, with the
//! limits every listener facing the network needs: a deadline for the request head
//! (slow clients are closed), a bound on header size (431 above it), a connection
//! limit, and a stop that fails no request.
//!
//! The stop has two phases. First the node is a lame duck (`drain_ms`): it keeps its
//! listener and its connections, every HTTP/1 answer says `Connection: close` (the
//! client reads it whole, then opens its next connection, which a balancer that drained
//! this node sends elsewhere), HTTP/2 clients get GOAWAY, and a connection without a
//! request for a second is closed; the phase ends as soon as no connection is
//! open. Closing a kept-alive connection that looks idle is what fails requests: its
//! client may have just sent the next one. Then the graceful stop (`shutdown_grace_ms`)
//! closes the listener and what is left, letting requests in flight finish.
//!
//! Connections are served as nginx serves them: by worker threads that each run their
//! own event loop (a single-threaded tokio runtime) on their own listening socket
//! (`SO_REUSEPORT`, the kernel spreads connections over them), so a connection lives
//! on one thread from accept to close and no request is handed between threads.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use std::convert::Infallible;

use axum::body::Bytes;
use http::{HeaderValue, StatusCode, header::CONNECTION};
use hyper::body::Incoming;
use hyper::{Request, Version};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::Service;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{config::Invalid, signals::Shutdown};

/// Limits of a listener.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A client must send a whole request head (and a TLS handshake) within this; an
    /// idle keep-alive connection is closed after it too. Slow clients cannot hold
    /// connections open by trickling headers.
    pub header_timeout_ms: u64,
    /// Largest request head in bytes; a bigger one is answered 431.
    pub max_header_bytes: usize,
    /// Most connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// On SIGTERM, how long the node stays a lame duck before it stops: it keeps
    /// serving, every HTTP/1 answer ends its connection (`Connection: close`), HTTP/2
    /// clients get GOAWAY, connections idle for a second are closed, and the node stops
    /// as soon as no connection is left. Clients move away without a failed request.
    /// 0: stop at once.
    pub drain_ms: u64,
    /// How long requests in flight get to finish on shutdown (after the lame duck).
    pub shutdown_grace_ms: u64,
    /// Worker threads per listener, each with its own listening socket; 0: one per CPU.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            drain_ms: 5_000,
            shutdown_grace_ms: 5_000,
            workers: 0,
        }
    }
}

impl Limits {
    /// Checks the limits of the section at `at`.
    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        if self.header_timeout_ms == 0 {
            return Err(Invalid::new(
                format!("{at}.header_timeout_ms"),
                "must be above 0",
            ));
        }
        // hyper's smallest read buffer.
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return Err(Invalid::new(
                format!("{at}.max_header_bytes"),
                "must be 8192 to 1048576",
            ));
        }
        if self.max_connections == 0 {
            return Err(Invalid::new(
                format!("{at}.max_connections"),
                "must be above 0",
            ));
        }
        if self.workers > 256 {
            return Err(Invalid::new(format!("{at}.workers"), "at most 256"));
        }
        Ok(())
    }

    /// The number of worker threads.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
}

/// Who a request came from and how: inserted into every request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct ClientInfo {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Whether it arrived over TLS.
    pub tls: bool,
}

/// A listener being served by its worker threads.
pub struct Server {
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` once per worker and starts the workers; each serves the router
    /// `make_router` builds for it, on its own thread (so what the router holds for the
    /// worker, connection pools to upstreams, lives on that thread), until `shutdown`,
    /// then is a lame duck until no connection is left (at most `drain_ms`, see the
    /// module) and waits up to the grace time for what is still open. With `tls`, every
    /// connection is a TLS one (HTTP/2 or HTTP/1.1 by ALPN). Fails at once if the
    /// address cannot be bound.
    pub fn start<S, B>(
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
        make_router: impl Fn() -> S + Send + Sync + 'static,
        limits: Limits,
        shutdown: Shutdown,
    ) -> std::io::Result<Server>
    where
        S: Service<Request<Incoming>, Response = hyper::Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let make_router = Arc::new(make_router);
        // Connection limits are per listener, shared by its workers, and so is the count
        // of open connections a lame duck waits to see at zero.
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let open = Arc::new(watch::channel(0usize).0);
        let sockets = (0..limits.worker_count())
            .map(|_| bind(addr))
            .collect::<std::io::Result<Vec<_>>>()?;
        info!(listen = %addr, tls = tls.is_some(), workers = sockets.len(), "serving");
        let workers = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let (tls, make_router, shutdown, slots, open) = (
                    tls.clone(),
                    make_router.clone(),
                    shutdown.clone(),
                    slots.clone(),
                    open.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("worker-{}-{i}", addr.port()))
                    .spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a worker's runtime");
                        runtime.block_on(async move {
                            let router = make_router();
                            match TcpListener::from_std(socket) {
                                Ok(listener) => {
                                    let connections = Connections { slots, open };
                                    serve(listener, tls, router, limits, connections, shutdown)
                                        .await
                                }
                                Err(e) => warn!("worker {i} of {addr}: {e}"),
                            }
                        });
                    })
                    .expect("a worker thread")
            })
            .collect();
        Ok(Server { workers })
    }

    /// Waits until every worker has finished (after shutdown).
    pub async fn finished(self) {
        let _ = tokio::task::spawn_blocking(move || {
            for worker in self.workers {
                let _ = worker.join();
            }
        })
        .await;
    }
}

/// The connections of a listener, shared by its workers: the connection-limit slots,
/// and how many are open. Free slots do not tell the latter (a worker waiting in accept
/// holds one), and a lame duck waits for it to fall to zero.
struct Connections {
    slots: Arc<Semaphore>,
    open: Arc<watch::Sender<usize>>,
}

/// One open connection's place in [`Connections`], given back when it drops.
struct Held {
    _slot: OwnedSemaphorePermit,
    open: Arc<watch::Sender<usize>>,
}

impl Held {
    fn new(slot: OwnedSemaphorePermit, open: Arc<watch::Sender<usize>>) -> Held {
        open.send_modify(|n| *n += 1);
        Held { _slot: slot, open }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n -= 1);
    }
}

/// How long a lame duck's connection may go without a request before it is closed. A
/// client that uses the connection sends its next request sooner and gets
/// `Connection: close` on the answer instead; closing a connection idle for this long
/// races only with a client that had left it in its pool.
const LAME_DUCK_IDLE: Duration = Duration::from_secs(1);

/// One worker's accept loop; after shutdown, the lame duck, then the graceful stop.
async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: S,
    limits: Limits,
    connections: Connections,
    shutdown: Shutdown,
) where
    S: Service<Request<Incoming>, Response = hyper::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let local = listener.local_addr().ok();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout())
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let builder = Arc::new(builder);
    // Set when the lame duck is over: what is still open gets hyper's graceful shutdown.
    let (stop, stopping) = Shutdown::new();
    let mut open = connections.open.subscribe();
    // Resolves when the lame duck is over: no connection left, or the drain time gone.
    let lame_duck = {
        let (mut shutdown, mut open) = (shutdown.clone(), open.clone());
        let drain = Duration::from_millis(limits.drain_ms);
        async move {
            shutdown.wait().await;
            debug!(listen = ?local, "lame duck: every connection ends after its next answer");
            if tokio::time::timeout(drain, open.wait_for(|n| *n == 0))
                .await
                .is_err()
            {
                info!(
                    listen = ?local,
                    open = *open.borrow(),
                    "connections still open after the drain time: stopping them"
                );
            }
        }
    };
    tokio::pin!(lame_duck);
    let mut backoff = Duration::from_millis(5);
    // The listener stays open through the lame duck: a connection the kernel has
    // queued, or a late client, is served (and told to go) rather than reset.
    loop {
        let permit = tokio::select! {
            _ = &mut lame_duck => break,
            permit = connections.slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, addr) = tokio::select! {
            _ = &mut lame_duck => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!("accept: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let held = Held::new(permit, connections.open.clone());
        let _ = stream.set_nodelay(true);
        let info = ClientInfo {
            addr,
            tls: tls.is_some(),
        };
        let (router, builder, tls) = (router.clone(), builder.clone(), tls.clone());
        let (shutdown, stopping) = (shutdown.clone(), stopping.clone());
        let handshake_deadline = limits.header_timeout();
        tokio::spawn(async move {
            let _held = held;
            let result = match tls {
                None => serve_connection(&builder, stream, router, info, shutdown, stopping).await,
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(handshake_deadline, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                debug!(%addr, "TLS handshake: {e}");
                                return;
                            }
                            Err(_) => {
                                debug!(%addr, "TLS handshake timed out");
                                return;
                            }
                        };
                    serve_connection(&builder, stream, router, info, shutdown, stopping).await
                }
            };
            // Clients that go away or send garbage are not our errors.
            if let Err(e) = result {
                debug!(%addr, "connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    if tokio::time::timeout(grace, open.wait_for(|n| *n == 0))
        .await
        .is_err()
    {
        warn!(listen = ?local, "requests still open after the grace time: closing them");
    }
}

/// What a connection's requests tell its lame duck: whether it speaks HTTP/2, and how
/// many requests it has had (unchanged over a check interval: it is idle).
#[derive(Default)]
struct Activity {
    h2: AtomicBool,
    requests: AtomicU64,
}

/// Serves one connection until it ends. After `shutdown` it is a lame duck's: HTTP/1
/// answers carry `Connection: close`, an HTTP/2 connection gets GOAWAY, and one without
/// a request for [`LAME_DUCK_IDLE`] is closed; after `stopping`, whatever it is doing
/// gets hyper's graceful shutdown.
async fn serve_connection<T, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: T,
    router: S,
    info: ClientInfo,
    mut shutdown: Shutdown,
    mut stopping: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = hyper::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::default());
    let service = router
        .map_response({
            let (activity, shutdown) = (activity.clone(), shutdown.clone());
            move |mut response: hyper::Response<B>| {
                // The client reads this answer whole, then opens a new connection: none
                // of its requests meets a closing connection. (HTTP/2 has GOAWAY; an
                // upgrade's answer must keep its `Connection: upgrade`.)
                if shutdown.requested()
                    && !activity.h2.load(Relaxed)
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        })
        .map_request({
            let activity = activity.clone();
            move |mut request: Request<Incoming>| {
                activity.requests.fetch_add(1, Relaxed);
                if request.version() == Version::HTTP_2 {
                    activity.h2.store(true, Relaxed);
                }
                request.extensions_mut().insert(info);
                request
            }
        });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service))
        .into_owned();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        _ = shutdown.wait() => {}
    }
    // The lame duck. The first check is at once: an HTTP/2 connection gets its GOAWAY
    // (its client retries what the server did not take); an HTTP/1 one is closed once
    // a whole interval passed without a request.
    let mut check = tokio::time::interval(LAME_DUCK_IDLE);
    let mut requests_before = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = stopping.wait() => break,
            _ = check.tick() => {
                let requests = activity.requests.load(Relaxed);
                if activity.h2.load(Relaxed) || requests_before == Some(requests) {
                    break;
                }
                requests_before = Some(requests);
            }
        }
    }
    // HTTP/1: closes it now if idle, else after the answer being written; HTTP/2:
    // GOAWAY, streams in flight finish.
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// A listening socket for one worker: `SO_REUSEPORT` so each worker has its own,
/// non-blocking for its runtime, with a deep accept queue.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Validate, parse};

    /// A file with a `[limits]` section, as the nodes' files have it.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        limits: Limits,
    }

    impl Validate for File {
        fn validate(&self) -> Result<(), Invalid> {
            self.limits.validate("limits")
        }
    }

    #[test]
    fn the_drain_time_has_a_default_and_is_read() {
        let limits = |text: &str| parse::<File>(text, Path::new("x.toml")).map(|f| f.limits);
        assert_eq!(limits("").unwrap().drain_ms, 5_000);
        assert_eq!(limits("[limits]\ndrain_ms = 0").unwrap().drain_ms, 0);
        assert_eq!(
            limits("[limits]\ndrain_ms = 30000\nshutdown_grace_ms = 1000").unwrap(),
            Limits {
                drain_ms: 30_000,
                shutdown_grace_ms: 1_000,
                ..Limits::default()
            }
        );
        assert_eq!(
            limits("[limits]\ndrain_ms = '5s'").unwrap_err().field(),
            Some("limits.drain_ms")
        );
    }
}
