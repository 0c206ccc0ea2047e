//! Serving a router over HTTP/1.1 and HTTP/2, in the clear or over TLS, with the
//! limits every listener facing the network needs: a deadline for the request head
//! (slow clients are closed), a bound on header size (431 above it), a connection
//! limit, and a graceful stop that lets requests in flight finish.
//!
//! Connections are served as nginx serves them: by worker threads that each run their
//! own event loop (a single-threaded tokio runtime) on their own listening socket
//! (`SO_REUSEPORT`, the kernel spreads connections over them), so a connection lives
//! on one thread from accept to close and no request is handed between threads.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use std::convert::Infallible;

use axum::body::Bytes;
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::Semaphore};
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
    /// How long requests in flight get to finish on shutdown.
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
    /// then waits up to the grace time for its open requests. With `tls`, every
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
        // Connection limits are per listener, shared by its workers.
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let sockets = (0..limits.worker_count())
            .map(|_| bind(addr))
            .collect::<std::io::Result<Vec<_>>>()?;
        info!(listen = %addr, tls = tls.is_some(), workers = sockets.len(), "serving");
        let workers = sockets
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                let (tls, make_router, shutdown, slots) = (
                    tls.clone(),
                    make_router.clone(),
                    shutdown.clone(),
                    slots.clone(),
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
                                    serve(listener, tls, router, limits, slots, shutdown).await
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

/// One worker's accept loop.
async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: S,
    limits: Limits,
    slots: Arc<Semaphore>,
    mut shutdown: Shutdown,
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
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait() => break,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, addr) = tokio::select! {
            _ = shutdown.wait() => break,
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
        let _ = stream.set_nodelay(true);
        let info = ClientInfo {
            addr,
            tls: tls.is_some(),
        };
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(info);
                request
            });
        let service = TowerToHyperService::new(service);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let handshake_deadline = limits.header_timeout();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
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
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            // Clients that go away or send garbage are not our errors.
            if let Err(e) = result {
                debug!(%addr, "connection: {e}");
            }
        });
    }
    drop(listener);
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(listen = ?local, "requests still open after the grace time: closing them");
    }
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
