//! The HTTP listener for people and Prometheus: `/` (a status page that refreshes
//! itself), `/status.json` and `/metrics`. Off unless `[metrics] listen` is set.

use std::{
    convert::Infallible,
    sync::{Mutex, Weak},
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    agent::Agent,
    api::{Reply, Request as ApiRequest},
    metrics,
};

const STATUS_PAGE: &str = include_str!("status.html");

/// Serves until the task is dropped. It holds the agent weakly, so an idle browser
/// connection never keeps a stopping daemon from cleaning up.
pub async fn serve(listener: TcpListener, agent: Weak<Mutex<Agent>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(answer(req.uri().path(), agent).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn response(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .header("Cache-Control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}

async fn answer(path: &str, agent: Weak<Mutex<Agent>>) -> Response<Full<Bytes>> {
    let Some(agent) = agent.upgrade() else {
        return response(503, "text/plain", "the agent is stopping\n".into());
    };
    match path {
        "/" => response(200, "text/html; charset=utf-8", STATUS_PAGE.to_owned()),
        "/status.json" | "/metrics" => {
            let wants_metrics = path == "/metrics";
            let work = tokio::task::spawn_blocking(move || {
                let mut agent = agent.lock().unwrap_or_else(|p| p.into_inner());
                let status = match agent.handle(ApiRequest::Status) {
                    Ok(Reply::Status(s)) => s,
                    other => return Err(format!("{other:?}")),
                };
                if !wants_metrics {
                    return Ok(serde_json::to_string(&status).expect("status serializes"));
                }
                let stats = match agent.handle(ApiRequest::Stats) {
                    Ok(Reply::Stats(s)) => s,
                    other => return Err(format!("{other:?}")),
                };
                Ok(metrics::render(&status, &stats))
            });
            match work.await {
                Ok(Ok(body)) if wants_metrics => {
                    response(200, "text/plain; version=0.0.4; charset=utf-8", body)
                }
                Ok(Ok(body)) => response(200, "application/json", body),
                Ok(Err(e)) => {
                    warn!("{path}: {e}");
                    response(500, "text/plain", e)
                }
                Err(e) => response(500, "text/plain", e.to_string()),
            }
        }
        _ => response(404, "text/plain", "not found\n".into()),
    }
}
