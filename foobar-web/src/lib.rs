//! `foobar-web`: the web node of the foobar.com stack, in nginx's role. It serves the
//! site's static files ([`files`]), passes the API to the application nodes
//! ([`proxy`]), and terminates TLS; serving, limits, logs and metrics come from
//! `foobar-node`.

pub mod config;
pub mod files;
pub mod proxy;

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{from_fn_with_state, map_response},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use foobar_node::{
    observe::{AccessLog, Observer, observe, text},
    server,
    signals::{Hangups, Shutdown},
    tls::CertStore,
};
use prometheus_client::registry::Registry;
use tower_http::{compression::CompressionLayer, set_header::SetResponseHeaderLayer};
use tracing::{error, info};

use crate::{config::Config, files::StaticFiles, proxy::Pool};

/// Runs the web node until `shutdown`; each SIGHUP from `hangups` re-reads the
/// certificate and key (a bad pair is refused and the old one kept).
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    hangups: Option<Hangups>,
) -> anyhow::Result<()> {
    let mut registry = Registry::with_prefix("foobar_web");
    let pool = config.proxy.as_ref().map(|p| Pool::new(p, &mut registry));
    let files = match &config.files {
        Some(f) => Some(StaticFiles::new(&f.root).with_context(|| f.root.display().to_string())?),
        None => None,
    };
    let access_log = match &config.access_log {
        Some(path) => Some(AccessLog::open(path).with_context(|| path.display().to_string())?),
        None => None,
    };
    let observer = Observer::new(registry, access_log, "static");
    let site = site(&config, pool, files, observer.clone());

    let mut servers = Vec::new();
    let mut certs = None;
    if let Some(https) = &config.https {
        let store = CertStore::load(&https.certificate, &https.key)?;
        let acceptor = store.acceptor()?;
        let mut router = site.clone();
        if https.hsts_max_age_s > 0 {
            let hsts = HeaderValue::from_str(&format!("max-age={}", https.hsts_max_age_s))?;
            router = router.layer(SetResponseHeaderLayer::if_not_present(
                header::STRICT_TRANSPORT_SECURITY,
                hsts,
            ));
        }
        let listener =
            server::bind(https.listen).with_context(|| format!("https.listen {}", https.listen))?;
        servers.push(tokio::spawn(server::serve(
            listener,
            Some(acceptor),
            router,
            config.limits,
            shutdown.clone(),
        )));
        certs = Some(store);
    }
    if let Some(http) = &config.http {
        let router = match (&config.https, http.redirect_to_https) {
            (Some(https), true) => redirector(https.listen.port(), &config, observer.clone()),
            _ => site.clone(),
        };
        let listener =
            server::bind(http.listen).with_context(|| format!("http.listen {}", http.listen))?;
        servers.push(tokio::spawn(server::serve(
            listener,
            None,
            router,
            config.limits,
            shutdown.clone(),
        )));
    }
    if let (Some(mut hangups), Some(store)) = (hangups, certs) {
        tokio::spawn(async move {
            while hangups.next().await.is_some() {
                match store.reload() {
                    Ok(()) => info!("certificate reloaded"),
                    Err(e) => error!("certificate reload refused, keeping the old one: {e}"),
                }
            }
        });
    }
    for server in servers {
        let _ = server.await;
    }
    observer.flush();
    Ok(())
}

/// The site: health, metrics, the proxied API, and files for everything else.
fn site(
    config: &Config,
    pool: Option<Arc<Pool>>,
    files: Option<Arc<StaticFiles>>,
    observer: Arc<Observer>,
) -> Router {
    let mut router = base_routes(config, observer.clone());
    if let (Some(pool), Some(settings)) = (pool, &config.proxy) {
        let handler = any(proxy::forward).with_state(pool);
        router = router
            .route(&settings.path, handler.clone())
            .route(&format!("{}{{*rest}}", settings.path), handler);
    }
    router = match files {
        Some(files) => router.fallback(any(files::serve).with_state(files)),
        None => router.fallback(|| async { text(StatusCode::NOT_FOUND, "not found") }),
    };
    finish(
        router
            .layer(CompressionLayer::new())
            .layer(map_response(weaken_etag_of_encoded)),
        config,
        observer,
    )
}

/// A compressed body is another representation than the file: its strong `ETag` becomes
/// weak (as nginx does), so it still validates a cached copy but never a byte range.
async fn weaken_etag_of_encoded(mut response: Response) -> Response {
    if response.headers().contains_key(header::CONTENT_ENCODING)
        && let Some(tag) = response.headers().get(header::ETAG)
        && !tag.as_bytes().starts_with(b"W/")
        && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", tag.as_bytes()].concat())
    {
        response.headers_mut().insert(header::ETAG, weak);
    }
    response
}

/// The plain-HTTP side when everything is redirected to HTTPS; `/healthz` stays so
/// the balancer can check the server over either port.
fn redirector(https_port: u16, config: &Config, observer: Arc<Observer>) -> Router {
    let redirect = move |request: Request| async move { to_https(https_port, &request) };
    finish(
        base_routes(config, observer.clone()).fallback(redirect),
        config,
        observer,
    )
}

/// `/healthz` and `/metrics`.
fn base_routes(config: &Config, observer: Arc<Observer>) -> Router {
    let maintenance: Arc<Option<PathBuf>> = Arc::new(config.maintenance_file.clone());
    Router::new()
        .route("/healthz", get(healthz).with_state(maintenance))
        .route(
            "/metrics",
            get(|State(o): State<Arc<Observer>>| async move { o.metrics_response() })
                .with_state(observer),
        )
}

/// The layers every response goes through: the access log and metrics, and the
/// `Server` and `X-Served-By` headers.
fn finish(mut router: Router, config: &Config, observer: Arc<Observer>) -> Router {
    if let Some(name) = &config.name
        && let Ok(value) = HeaderValue::from_str(name)
    {
        router = router.layer(SetResponseHeaderLayer::overriding(
            header::HeaderName::from_static("x-served-by"),
            value,
        ));
    }
    router
        .layer(SetResponseHeaderLayer::overriding(
            header::SERVER,
            HeaderValue::from_static("foobar-web"),
        ))
        .layer(from_fn_with_state(observer, observe))
}

async fn healthz(State(maintenance): State<Arc<Option<PathBuf>>>) -> Response {
    match maintenance.as_ref() {
        Some(file) if file.exists() => text(StatusCode::SERVICE_UNAVAILABLE, "maintenance"),
        _ => text(StatusCode::OK, "ok"),
    }
}

/// A redirect to the same host, path and query over HTTPS: 301 for GET and HEAD, 308
/// (method and body kept) for the rest.
fn to_https(https_port: u16, request: &Request) -> Response {
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
