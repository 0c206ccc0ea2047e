//! `foobar-app`: the application node of the foobar.com stack, a small posts API on
//! MariaDB ([`api`], [`db`]); serving, limits, logs and metrics come from `foobar-node`.

pub mod api;
pub mod config;
pub mod db;

use std::sync::Arc;

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{from_fn_with_state, map_response_with_state},
    response::{IntoResponse, Response},
    routing::get,
};
use foobar_node::{
    observe::{AccessLog, Observer, observe},
    server::Server,
    signals::{Hangups, Shutdown},
    tls::CertStore,
};
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::{
    config::Config,
    db::{Db, Pools},
};

/// Runs the application node until `shutdown`; with `[tls]`, each SIGHUP from
/// `hangups` re-reads the certificate and key (a bad pair is refused and the old one
/// kept).
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    hangups: Option<Hangups>,
) -> anyhow::Result<()> {
    let certs = match &config.tls {
        Some(tls) => Some(CertStore::load(&tls.certificate, &tls.key).context("tls")?),
        None => None,
    };
    let acceptor = match &certs {
        Some(store) => Some(store.acceptor().context("tls")?),
        None => None,
    };
    let mut registry = Registry::with_prefix("foobar_app");
    let db = Db::new(&config.database, &mut registry)?;
    let access_log = match &config.access_log {
        Some(path) => Some(AccessLog::open(path).with_context(|| path.display().to_string())?),
        None => None,
    };
    let observer = Observer::new(registry, access_log, "other");
    let supervisor = tokio::spawn(db.clone().supervise());
    let make_router = {
        let (config, db, observer) = (config.clone(), db.clone(), observer.clone());
        let workers = config.limits.worker_count();
        move || {
            router(
                &config,
                db.clone(),
                Arc::new(db.pools(workers, 1)),
                observer.clone(),
            )
        }
    };
    let server = Server::start(
        config.listen,
        acceptor,
        make_router,
        config.limits,
        shutdown,
    )
    .with_context(|| format!("listen {}", config.listen))?;
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
    server.finished().await;
    supervisor.abort();
    observer.flush();
    Ok(())
}

/// The API on a worker's connection `pools`, `/healthz` (database health) and `/metrics`.
pub fn router(config: &Config, db: Arc<Db>, pools: Arc<Pools>, observer: Arc<Observer>) -> Router {
    let name = config
        .name
        .as_deref()
        .and_then(|n| HeaderValue::from_str(n).ok());
    api::routes(pools)
        .route("/healthz", get(healthz).with_state(db))
        .route(
            "/metrics",
            get(
                |State(o): State<Arc<Observer>>, headers: HeaderMap| async move {
                    o.metrics_response(&headers)
                },
            )
            .with_state(observer.clone()),
        )
        .layer(map_response_with_state(name, served_by))
        .layer(from_fn_with_state(observer, observe))
}

async fn served_by(State(name): State<Option<HeaderValue>>, mut response: Response) -> Response {
    if let Some(name) = name {
        response.headers_mut().insert("x-served-by", name);
    }
    response
}

/// 200 while the write endpoint answers and the schema is in place, 503 otherwise;
/// the body says which (the read endpoint too).
async fn healthz(State(db): State<Arc<Db>>) -> Response {
    let health = db.health();
    // The replica away is no outage: reads go to the primary meanwhile.
    let status = if health.write && health.schema_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(health)).into_response()
}
