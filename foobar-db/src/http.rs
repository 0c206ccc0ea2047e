//! The agent's HTTP endpoint: role checks for the balancers (`/primary`, `/replica`),
//! `/status` (JSON, also what the peer reads), `/metrics`, `/healthz`, and the two
//! role changes, `POST /promote` and `POST /fence`, which need the pair's token.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;

use crate::node::{Node, RoleError};

/// The routes.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/primary", get(primary))
        .route("/replica", get(replica))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/promote", post(promote))
        .route("/fence", post(fence))
        .with_state(node)
}

fn answer(ok: bool, yes: &'static str, node: &Node) -> Response {
    if ok {
        (StatusCode::OK, format!("{yes}\n")).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", node.role().name()),
        )
            .into_response()
    }
}

async fn primary(State(node): State<Arc<Node>>) -> Response {
    answer(node.check_primary(), "primary", &node)
}

async fn replica(State(node): State<Arc<Node>>) -> Response {
    answer(node.check_replica(), "replica", &node)
}

async fn status(State(node): State<Arc<Node>>) -> Response {
    Json(node.status()).into_response()
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    let status = node.status();
    answer(status.mysql_up, "ok", &node)
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        node.metrics(),
    )
        .into_response()
}

/// Whether the request carries the pair's token.
fn authorised(node: &Node, headers: &HeaderMap) -> bool {
    let Some(token) = node.token() else {
        return false;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused(e: RoleError) -> Response {
    let status = match e {
        RoleError::Refused(_) => StatusCode::CONFLICT,
        RoleError::Server(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("{e}\n")).into_response()
}

#[derive(Deserialize)]
struct PromoteOptions {
    #[serde(default)]
    force: bool,
}

async fn promote(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(options): Query<PromoteOptions>,
) -> Response {
    if !authorised(&node, &headers) {
        return (StatusCode::UNAUTHORIZED, "the pair's token is required\n").into_response();
    }
    match node.promote(options.force).await {
        Ok(()) => Json(node.status()).into_response(),
        Err(e) => refused(e),
    }
}

/// Fences this node; answers its binary log position as plain text.
async fn fence(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if !authorised(&node, &headers) {
        return (StatusCode::UNAUTHORIZED, "the pair's token is required\n").into_response();
    }
    match node.fence_for_peer().await {
        Ok(position) => (StatusCode::OK, position).into_response(),
        Err(e) => refused(e),
    }
}
