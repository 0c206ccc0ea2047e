//! The agent as a client: its peer's agent (`/status`, `/fence`) and the witness (a
//! balancer's `/status.json`), over HTTP/1.1 with a deadline.

use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request: the answer's status and body, or why there is none.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
    limit: Duration,
) -> Result<(u16, Bytes), String> {
    let work = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", addr.to_string())
            .header("User-Agent", "foobar-db");
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within {limit:?}")))
}

/// What the witness says of the write VIP's backend at `primary`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WitnessView {
    /// Its checks pass: the balancers still send writes there.
    Up,
    /// Its checks fail.
    Down,
    /// No answer, or no such VIP or backend.
    Unknown,
}

/// Asks the witness (a balancer's `/status.json`) how it sees `primary`'s address in
/// the VIP named `vip`.
pub async fn witness(addr: SocketAddr, vip: &str, primary: SocketAddr) -> WitnessView {
    let Ok((200, body)) = request(
        addr,
        Method::GET,
        "/status.json",
        None,
        Duration::from_millis(500),
    )
    .await
    else {
        return WitnessView::Unknown;
    };
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return WitnessView::Unknown;
    };
    let backend = status["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["name"] == vip)
        .flat_map(|v| v["backends"].as_array().into_iter().flatten())
        .find(|b| {
            b["address"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .is_some_and(|a| a.ip() == primary.ip())
        });
    match backend.and_then(|b| b["health"].as_str()) {
        Some("up") => WitnessView::Up,
        Some("down") => WitnessView::Down,
        _ => WitnessView::Unknown,
    }
}
