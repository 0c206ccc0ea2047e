//! HTTP-01 answers (RFC 8555 §8.3) from whichever web node the balancer picks: the
//! node's own tokens first, then its peers', asked once each, at the same time.

use std::{
    borrow::Cow,
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{Request, Response, StatusCode, header},
    response::IntoResponse,
};
use foobar_node::observe::{Observer, text};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{net::TcpStream, task::JoinSet};
use tower::Service;

use crate::site::Site;

/// Where the CA asks for a token.
const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// Marks a request from another web node: it is answered from this node's tokens
/// only, so a lookup never goes further than one hop and never loops.
const PEER_LOOKUP: &str = "x-foobar-acme-peer-lookup";

/// Longest token taken (the CA's are 43 characters: 256 bits in base64url).
const TOKEN_MAX: usize = 128;

/// Largest answer read from a peer.
const ANSWER_MAX: usize = 1024;

/// Labels of the answers counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    source: &'static str,
}

/// The tokens of this node's orders in progress, and its peers to ask for others.
pub struct Tokens {
    /// Token → key authorization.
    pending: Mutex<HashMap<String, String>>,
    peers: Vec<SocketAddr>,
    peer_timeout: Duration,
    answers: Family<AnswerLabels, Counter>,
}

/// A token served until this drops: when its order is over, however it ended.
pub struct Held {
    tokens: Arc<Tokens>,
    token: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.tokens.pending().remove(&self.token);
    }
}

impl Tokens {
    /// No token yet; `peers` are the other web nodes' plain-HTTP listeners.
    pub fn new(peers: &[SocketAddr], peer_timeout: Duration, registry: &mut Registry) -> Arc<Self> {
        let answers = Family::<AnswerLabels, Counter>::default();
        registry.register(
            "acme_challenge_answers",
            "ACME HTTP-01 challenge requests, by who held the token: this node (local), \
             a peer (peer), nobody (none)",
            answers.clone(),
        );
        for source in ["local", "peer", "none"] {
            answers.get_or_create_owned(&AnswerLabels { source });
        }
        Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            peers: peers.to_vec(),
            peer_timeout,
            answers,
        })
    }

    /// Serves `key_authorization` for `token` until the guard drops.
    pub fn hold(self: &Arc<Self>, token: String, key_authorization: String) -> Held {
        self.pending().insert(token.clone(), key_authorization);
        Held {
            tokens: self.clone(),
            token,
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `token`: this node's key authorization, else (unless a peer is
    /// asking) the first a peer has, else 404.
    async fn answer(self: Arc<Self>, token: String, from_peer: bool) -> Response<Body> {
        let local = self.pending().get(&token).cloned();
        let found = match local {
            Some(key_authorization) => Some(("local", key_authorization)),
            None if from_peer => None,
            None => self.ask_peers(&token).await.map(|k| ("peer", k)),
        };
        let source = found.as_ref().map_or("none", |(source, _)| *source);
        self.answers.get_or_create(&AnswerLabels { source }).inc();
        match found {
            Some((_, key_authorization)) => (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                key_authorization,
            )
                .into_response(),
            None => text(StatusCode::NOT_FOUND, "no such challenge"),
        }
    }

    /// Every peer at once; the first that holds the token wins, the others are dropped.
    async fn ask_peers(&self, token: &str) -> Option<String> {
        let mut asked = JoinSet::new();
        for &peer in &self.peers {
            let (token, deadline) = (token.to_owned(), self.peer_timeout);
            asked.spawn(async move {
                tokio::time::timeout(deadline, ask(peer, &token))
                    .await
                    .ok()
                    .flatten()
            });
        }
        while let Some(answer) = asked.join_next().await {
            if let Ok(Some(key_authorization)) = answer {
                return Some(key_authorization);
            }
        }
        None
    }
}

/// Asks one peer for `token`; its key authorization if it holds it.
async fn ask(peer: SocketAddr, token: &str) -> Option<String> {
    let stream = TcpStream::connect(peer).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(format!("{CHALLENGE_PATH}{token}"))
        .header(header::HOST, peer.to_string())
        .header(PEER_LOOKUP, "1")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body = Limited::new(response.into_body(), ANSWER_MAX)
        .collect()
        .await
        .ok()?
        .to_bytes();
    let answer = std::str::from_utf8(&body).ok()?.trim_end();
    // A key authorization is "<token>.<account key thumbprint>"; anything else is not.
    let thumbprint = answer.strip_prefix(token)?.strip_prefix('.')?;
    (!thumbprint.is_empty()).then(|| answer.to_owned())
}

/// The token asked for, if the path is a challenge's and the token could be one:
/// base64url only, so nothing in it can mean another path.
fn token_of(path: &str) -> Option<&str> {
    let token = path.strip_prefix(CHALLENGE_PATH)?;
    let plausible = !token.is_empty()
        && token.len() <= TOKEN_MAX
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    plausible.then_some(token)
}

/// A web node's service with the challenge answers in front: the CA's requests are
/// answered here on both listeners (before any redirect to HTTPS), recorded in the log
/// and metrics as `acme-challenge`; everything else goes to the site as it came.
#[derive(Clone)]
pub struct Answering {
    tokens: Option<Arc<Tokens>>,
    observer: Arc<Observer>,
    site: Site,
}

impl Answering {
    /// `site` behind the answers of `tokens` (none: `site` alone).
    pub fn new(tokens: Option<Arc<Tokens>>, observer: Arc<Observer>, site: Site) -> Self {
        Self {
            tokens,
            observer,
            site,
        }
    }
}

impl Service<Request<Incoming>> for Answering {
    type Response = Response<Body>;
    type Error = Infallible;
    // The site's own boxed future: a request that is not a challenge costs no more.
    type Future = <Site as Service<Request<Incoming>>>::Future;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let token = token_of(request.uri().path()).map(str::to_owned);
        let (Some(tokens), Some(token)) = (&self.tokens, token) else {
            return self.site.call(request);
        };
        let tokens = tokens.clone();
        let from_peer = request.headers().contains_key(PEER_LOOKUP);
        let pending = self
            .observer
            .begin(&request, Cow::Borrowed("acme-challenge"));
        Box::pin(async move { Ok(pending.finish(tokens.answer(token, from_peer).await)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_only_what_could_be_a_token() {
        let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
        assert_eq!(
            token_of(&format!("/.well-known/acme-challenge/{token}")),
            Some(token)
        );
        for path in [
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/../../etc/passwd",
            "/.well-known/acme-challenge/a%2Fb",
            "/.well-known/acme-challenge/a/b",
            "/.well-known/other/abc",
            "/index.html",
        ] {
            assert_eq!(token_of(path), None, "{path}");
        }
        assert_eq!(
            token_of(&format!("/.well-known/acme-challenge/{}", "a".repeat(129))),
            None
        );
    }

    #[tokio::test]
    async fn answers_its_own_tokens_and_refuses_others() {
        let mut registry = Registry::default();
        let tokens = Tokens::new(&[], Duration::from_millis(100), &mut registry);
        let held = tokens.hold("abc".into(), "abc.thumb".into());
        let answer = tokens.clone().answer("abc".into(), false).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abc.thumb");
        drop(held);
        let gone = tokens.clone().answer("abc".into(), false).await;
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    }
}
