//! The HTTP API: `POST /api/posts`, `GET /api/posts?before=&limit=`,
//! `GET /api/posts/{id}`, JSON in and out. Input is checked whole and refused with
//! 400 and the field at fault; the database answers through parameterised queries.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};

use crate::db::{DbError, Pools, Post};

/// Longest author name, in characters.
pub const MAX_AUTHOR_CHARS: usize = 64;
/// Longest post, in characters.
pub const MAX_TEXT_CHARS: usize = 2000;
/// Most posts one listing returns.
pub const MAX_LIMIT: u32 = 100;
/// Posts a listing returns by default.
pub const DEFAULT_LIMIT: u32 = 20;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A refused or failed request: status, the field at fault if any, and why.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: e.to_string(),
        }
    }
}

/// A new post as sent: fields are optional here so that a missing one is named.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPost {
    author: Option<String>,
    text: Option<String>,
}

/// Checks one text field: present, 1 to `max` characters, no control characters
/// (but newlines and tabs in a post's text).
fn checked<'a>(
    field: &str,
    value: &'a Option<String>,
    max: usize,
    multiline: bool,
) -> Result<&'a str, ApiError> {
    let Some(value) = value else {
        return Err(ApiError::invalid(field, "is required"));
    };
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if chars > max {
        return Err(ApiError::invalid(
            field,
            format!("{chars} characters, at most {max}"),
        ));
    }
    let allowed = |c: char| !c.is_control() || (multiline && (c == '\n' || c == '\t' || c == '\r'));
    if !value.chars().all(allowed) {
        return Err(ApiError::invalid(field, "must not hold control characters"));
    }
    Ok(value)
}

async fn create(
    State(db): State<Arc<Pools>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            field: None,
            message: "send JSON with Content-Type: application/json".into(),
        });
    }
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let new: NewPost = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        // A body that is not JSON at all has no field to name.
        let field = match e.path().to_string() {
            path if path == "." || e.inner().is_syntax() || e.inner().is_eof() => {
                "(body)".to_owned()
            }
            path => path,
        };
        ApiError::invalid(field, format!("invalid JSON: {}", e.into_inner()))
    })?;
    let author = checked("author", &new.author, MAX_AUTHOR_CHARS, false)?;
    let text = checked("text", &new.text, MAX_TEXT_CHARS, true)?;
    let (post, gtid) = db.insert_post(author, text).await?;
    let location = format!("/api/posts/{}", post.id);
    let mut response = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(post),
    )
        .into_response();
    // Read-your-writes: the client's next reads, on any application node and any
    // connection, wait for this commit on the replica.
    if let Ok(cookie) = format!(
        "{WRITE_COOKIE}={gtid}; Path=/api/; Max-Age={WRITE_COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Lax"
    )
    .parse()
        && !gtid.is_empty()
    {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// The cookie that carries a client's last write (its GTID).
pub const WRITE_COOKIE: &str = "foobar_last_write";
/// How long it matters: past it, the replica has long applied the write.
const WRITE_COOKIE_MAX_AGE_S: u32 = 60;

/// The client's last write, from its cookie, if it is a well-formed GTID position.
fn last_write(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == WRITE_COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|value| crate::db::is_gtid_list(value))
}

/// A page of posts, newest first, and where the next page starts.
#[derive(Serialize)]
struct Page {
    posts: Vec<Post>,
    next_before: Option<u64>,
}

async fn list(
    State(db): State<Arc<Pools>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<Page>, ApiError> {
    let mut before = None;
    let mut limit = DEFAULT_LIMIT;
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "before" => {
                before = Some(
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|&v| v > 0)
                        .ok_or_else(|| {
                            ApiError::invalid("before", "must be a post id (a positive integer)")
                        })?,
                )
            }
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|v| (1..=MAX_LIMIT).contains(v))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("must be 1 to {MAX_LIMIT}"))
                    })?
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown parameter (before, limit)",
                ));
            }
        }
    }
    let posts = db
        .posts(before, limit, last_write(&headers).as_deref())
        .await?;
    let next_before = (posts.len() == limit as usize)
        .then(|| posts.last().map(|p| p.id))
        .flatten();
    Ok(Json(Page { posts, next_before }))
}

async fn one(
    State(db): State<Arc<Pools>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Post>, ApiError> {
    let id: u64 = id
        .parse()
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| ApiError::invalid("id", "must be a positive integer"))?;
    match db.post(id, last_write(&headers).as_deref()).await? {
        Some(post) => Ok(Json(post)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            field: None,
            message: format!("no post {id}"),
        }),
    }
}

/// The API routes, on a worker's connection pools.
pub fn routes(db: Arc<Pools>) -> Router {
    Router::new()
        .route("/api/posts", get(list).post(create))
        .route("/api/posts/{id}", get(one))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(value: Option<&str>, multiline: bool) -> Result<(), String> {
        let value = value.map(str::to_owned);
        checked("f", &value, 5, multiline)
            .map(|_| ())
            .map_err(|e| e.message)
    }

    #[test]
    fn reads_the_last_write_from_its_cookie() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "a=b; foobar_last_write=0-1-42".parse().unwrap(),
        );
        assert_eq!(last_write(&headers).as_deref(), Some("0-1-42"));
        headers.insert(
            header::COOKIE,
            "foobar_last_write=0-1-42'--".parse().unwrap(),
        );
        assert_eq!(last_write(&headers), None);
        assert!(crate::db::is_gtid_list("0-1-42,1-2-3"));
        assert!(!crate::db::is_gtid_list(""));
        assert!(!crate::db::is_gtid_list("0-1"));
    }

    #[test]
    fn validates_text_fields() {
        assert!(check(Some("ok"), false).is_ok());
        assert!(check(Some("a\nb"), true).is_ok());
        assert_eq!(check(None, false).unwrap_err(), "is required");
        assert_eq!(check(Some("  "), false).unwrap_err(), "must not be empty");
        assert_eq!(
            check(Some("ééééééé"), false).unwrap_err(),
            "7 characters, at most 5"
        );
        assert!(check(Some("a\nb"), false).is_err());
        assert!(check(Some("a\u{7}b"), true).is_err());
    }
}
