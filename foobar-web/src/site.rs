//! A web node's answer to a request, as one service: `/healthz`, `/metrics`, the
//! proxied API, the files, or (on a plain-HTTP listener that redirects) the way to
//! HTTPS; compressed as the client asks, stamped with this server's headers, and
//! recorded in the access log and metrics. It is written out as plain code rather
//! than as a router with middleware layers: on the static path that halves the work
//! per request (no boxed route services cloned and no futures moved per layer).

use std::{
    borrow::Cow,
    convert::Infallible,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    body::Body,
    extract::State,
    http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header},
    response::IntoResponse,
};
use foobar_node::observe::{Observer, text};
use hyper::body::Incoming;
use tower::{Service, ServiceExt};
use tower_http::compression::Compression;

use crate::{config::Config, files, files::StaticFiles, proxy, proxy::WorkerPool};

/// Where a request goes, and its label in the metrics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    Metrics,
    Api,
    Static,
    Redirect,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Health => "healthz",
            Route::Metrics => "metrics",
            Route::Api => "api",
            Route::Static => "static",
            Route::Redirect => "redirect",
        }
    }
}

/// What answers requests, shared by the requests of one worker.
struct Routes {
    observer: Arc<Observer>,
    maintenance: Option<PathBuf>,
    proxy: Option<(String, Arc<WorkerPool>)>,
    files: Option<Arc<StaticFiles>>,
    /// On a plain-HTTP listener that sends everything (but `/healthz`) to HTTPS: the
    /// HTTPS port.
    redirect_to: Option<u16>,
}

impl Routes {
    fn route(&self, request: &Request<Incoming>) -> Route {
        let path = request.uri().path();
        match path {
            "/healthz" => Route::Health,
            _ if self.redirect_to.is_some() => Route::Redirect,
            "/metrics" => Route::Metrics,
            _ if self
                .proxy
                .as_ref()
                .is_some_and(|(prefix, _)| path.starts_with(prefix.as_str())) =>
            {
                Route::Api
            }
            _ => Route::Static,
        }
    }
}

/// The routes as a service (what compression wraps).
#[derive(Clone)]
struct Dispatch(Arc<Routes>);

impl Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let routes = self.0.clone();
        Box::pin(async move {
            let route = routes.route(&request);
            let request = request.map(Body::new);
            Ok(match route {
                Route::Health => match &routes.maintenance {
                    Some(file) if file.exists() => {
                        text(StatusCode::SERVICE_UNAVAILABLE, "maintenance")
                    }
                    _ => text(StatusCode::OK, "ok"),
                },
                Route::Metrics => routes.observer.metrics_response(request.headers()),
                Route::Api => {
                    let (_, worker) = routes.proxy.as_ref().expect("routed to the proxy");
                    proxy::forward(State(worker.clone()), request).await
                }
                Route::Static => match &routes.files {
                    Some(files) => files::serve(State(files.clone()), request).await,
                    None => text(StatusCode::NOT_FOUND, "not found"),
                },
                Route::Redirect => to_https(routes.redirect_to.unwrap_or(443), &request),
            })
        })
    }
}

/// The web node's service.
#[derive(Clone)]
pub struct Site {
    routes: Arc<Routes>,
    compressed: Compression<Dispatch>,
    served_by: Option<HeaderValue>,
    hsts: Option<HeaderValue>,
}

impl Site {
    /// The site of `config` for one worker: its upstream connections in `proxy`, the
    /// `Strict-Transport-Security` value to send (HTTPS), or the HTTPS port to
    /// redirect to (a plain-HTTP listener with `redirect_to_https`).
    pub fn new(
        config: &Config,
        proxy: Option<Arc<WorkerPool>>,
        files: Option<Arc<StaticFiles>>,
        observer: Arc<Observer>,
        hsts: Option<HeaderValue>,
        redirect_to: Option<u16>,
    ) -> Self {
        let prefix = config
            .proxy
            .as_ref()
            .map(|p| p.path.clone())
            .unwrap_or_default();
        let routes = Arc::new(Routes {
            observer,
            maintenance: config.maintenance_file.clone(),
            proxy: proxy.map(|worker| (prefix, worker)),
            files,
            redirect_to,
        });
        Self {
            compressed: Compression::new(Dispatch(routes.clone())),
            routes,
            served_by: config
                .name
                .as_deref()
                .and_then(|n| HeaderValue::from_str(n).ok()),
            hsts,
        }
    }

    /// `Server`, `X-Served-By` and (over HTTPS) `Strict-Transport-Security`; and a
    /// compressed body, another representation than the file, gets a weak `ETag` (as
    /// nginx does), so it still validates a cached copy but never a byte range.
    fn stamp(&self, response: &mut Response<Body>) {
        let headers = response.headers_mut();
        if headers.contains_key(header::CONTENT_ENCODING)
            && let Some(tag) = headers.get(header::ETAG)
            && !tag.as_bytes().starts_with(b"W/")
            && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", tag.as_bytes()].concat())
        {
            headers.insert(header::ETAG, weak);
        }
        headers.insert(header::SERVER, HeaderValue::from_static("foobar-web"));
        if let Some(name) = &self.served_by {
            headers.insert(HeaderName::from_static("x-served-by"), name.clone());
        }
        if let Some(hsts) = &self.hsts {
            headers
                .entry(header::STRICT_TRANSPORT_SECURITY)
                .or_insert_with(|| hsts.clone());
        }
    }
}

impl Service<Request<Incoming>> for Site {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let site = self.clone();
        Box::pin(async move {
            let route = site.routes.route(&request);
            let pending = site
                .routes
                .observer
                .begin(&request, Cow::Borrowed(route.label()));
            let mut response = match site.compressed.clone().oneshot(request).await {
                Ok(response) => response.map(Body::new),
                Err(never) => match never {},
            };
            site.stamp(&mut response);
            Ok(pending.finish(response))
        })
    }
}

/// A redirect to the same host, path and query over HTTPS: 301 for GET and HEAD, 308
/// (method and body kept) for the rest.
fn to_https(https_port: u16, request: &Request<Body>) -> Response<Body> {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    let Some(host) = host else {
        return text(StatusCode::BAD_REQUEST, "no Host header to redirect to");
    };
    // Keep the host, change the port (an IPv6 literal keeps its brackets).
    let bare = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = format!("https://{bare}{port}{path}");
    let status = if matches!(*request.method(), Method::GET | Method::HEAD) {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    (status, [(header::LOCATION, location)]).into_response()
}
