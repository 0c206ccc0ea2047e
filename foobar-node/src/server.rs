//! Serving a router over HTTP/1.1 and HTTP/2, in the clear or over TLS, with the
//! limits every listener facing the network needs: a deadline for the request head
//! (slow clients are closed), a bound on header size (431 above it), a connection
//! limit, and a graceful stop that lets requests in flight finish.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use serde::Deserialize;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            shutdown_grace_ms: 5_000,
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
        Ok(())
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

/// Serves `router` on `listener` until `shutdown`, then waits up to the grace time
/// for open requests. With `tls`, every connection is a TLS one (HTTP/2 or HTTP/1.1
/// by ALPN).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Limits,
    mut shutdown: Shutdown,
) {
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
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut backoff = Duration::from_millis(5);
    info!(listen = ?local, tls = tls.is_some(), "serving");
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
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(info);
                request.extensions_mut().insert(ConnectInfo(addr));
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

/// Binds a listener with `SO_REUSEADDR` and a deep accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
