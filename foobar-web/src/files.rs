//! Static files from a document root: tower-http's `ServeDir` does content types,
//! `ETag`/`Last-Modified` with conditional requests, byte ranges, precompressed
//! `.gz`/`.br` siblings and `index.html`. This module adds two things:
//! - the containment nginx's `disable_symlinks` gives: no path, however encoded, and
//!   no symbolic link may lead outside the root;
//! - a cache of `ServeDir`'s whole answers for small files, as nginx's
//!   `open_file_cache` makes its static path cheap. `ServeDir` reads through
//!   tokio's blocking pool (a thread hand-off per open, stat and read); a hit costs a
//!   hash lookup. A cached answer is checked against its file (size, modification
//!   time, containment) at most once a second, as `open_file_cache_valid` does, so a
//!   changed file is served within a second. Requests with ranges or preconditions
//!   other than `If-None-Match`/`If-Modified-Since` always go to `ServeDir`.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        Arc, LazyLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header, response::Parts},
    response::Response,
};
use foobar_node::observe::text;
use http_body_util::BodyExt;
use percent_encoding::percent_decode_str;
use tower::ServiceExt;
use tower_http::services::ServeDir;

/// Largest file whose answer is cached.
const CACHED_FILE_MAX: u64 = 256 * 1024;
/// Most answers cached; the cache starts afresh when full.
const CACHE_ENTRIES_MAX: usize = 4096;
/// How long a cached answer is served before its file is looked at again.
const REVALIDATE_MS: u64 = 1000;

/// Milliseconds since the first call: a cheap clock for revalidation.
fn now_ms() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    START.elapsed().as_millis() as u64
}

/// The document root, its server and the cache of its answers.
pub struct StaticFiles {
    root: PathBuf,
    serve: ServeDir,
    /// By request path, then by [`Variant`].
    cache: RwLock<HashMap<String, [Option<Arc<Cached>>; 4]>>,
}

/// Which encodings a client takes (they decide whether `ServeDir` answers with a
/// precompressed sibling): bit 0 gzip, bit 1 br.
type Variant = usize;

/// A whole 200 answer of `ServeDir`, and the file it came from as it was then.
struct Cached {
    head: Parts,
    body: Bytes,
    /// The file asked for (its containment is checked again).
    path: PathBuf,
    /// The file served (the file, or a precompressed sibling).
    file: PathBuf,
    stamp: (u64, Option<SystemTime>),
    /// When the file was last found unchanged and inside the root ([`now_ms`]).
    checked: AtomicU64,
}

fn stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let meta = std::fs::metadata(path).ok()?;
    meta.is_file().then(|| (meta.len(), meta.modified().ok()))
}

impl StaticFiles {
    /// Serves `root` (resolved once, so links inside it are judged against its real path).
    pub fn new(root: &Path) -> io::Result<Arc<Self>> {
        let root = root.canonicalize()?;
        let serve = ServeDir::new(&root)
            .append_index_html_on_directories(true)
            .precompressed_gzip()
            .precompressed_br();
        Ok(Arc::new(Self {
            root,
            serve,
            cache: RwLock::new(HashMap::new()),
        }))
    }

    /// The variant of a request the cache can answer, or `None`.
    fn variant(&self, request: &Request) -> Option<Variant> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return None;
        }
        let headers = request.headers();
        for uncached in [
            header::RANGE,
            header::IF_RANGE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
        ] {
            if headers.contains_key(uncached) {
                return None;
            }
        }
        if !headers.contains_key(header::ACCEPT_ENCODING) {
            return Some(0);
        }
        let accepts = |coding: &str| {
            headers.get_all(header::ACCEPT_ENCODING).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',').any(|c| {
                        let mut parts = c.split(';');
                        let name = parts.next().unwrap_or("").trim();
                        let refused = parts
                            .any(|p| matches!(p.trim(), "q=0" | "q=0.0" | "q=0.00" | "q=0.000"));
                        (name.eq_ignore_ascii_case(coding) || name == "*") && !refused
                    })
                })
            })
        };
        Some(accepts("gzip") as usize | (accepts("br") as usize) << 1)
    }

    /// The file a request path names (a directory's `index.html`); the path was
    /// checked by [`StaticFiles::check`].
    fn file_of(&self, request_path: &str) -> Option<PathBuf> {
        let decoded = percent_decode_str(request_path).decode_utf8().ok()?;
        let mut path = self.root.clone();
        path.extend(decoded.split('/').filter(|p| !p.is_empty() && *p != "."));
        if decoded.ends_with('/') {
            path.push("index.html");
        }
        Some(path)
    }

    /// A cached answer still true to its file (looked at again after a second).
    fn lookup(&self, request_path: &str, variant: Variant) -> Option<Arc<Cached>> {
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(request_path)?[variant]
            .clone()?;
        let now = now_ms();
        if now.saturating_sub(cached.checked.load(Ordering::Relaxed)) < REVALIDATE_MS {
            return Some(cached);
        }
        let inside = cached
            .path
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&self.root));
        if !inside || stamp(&cached.file) != Some(cached.stamp) {
            return None;
        }
        cached.checked.store(now, Ordering::Relaxed);
        Some(cached)
    }

    /// Keeps a 200 answer of a small file; returns the answer to send.
    async fn remember(&self, request_path: &str, variant: Variant, response: Response) -> Response {
        let small = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= CACHED_FILE_MAX);
        let Some(path) = self.file_of(request_path) else {
            return response;
        };
        if response.status() != StatusCode::OK || !small {
            return response;
        }
        let file = match response
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
        {
            Some("gzip") => sibling(&path, "gz"),
            Some("br") => sibling(&path, "br"),
            _ => path.clone(),
        };
        // Stamped before the read: a file changed meanwhile is read again next time.
        let Some(before) = stamp(&file) else {
            return response;
        };
        let (head, body) = response.into_parts();
        let Ok(collected) = body.collect().await else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "reading the file failed");
        };
        let cached = Arc::new(Cached {
            head,
            body: collected.to_bytes(),
            path,
            file,
            stamp: before,
            checked: AtomicU64::new(now_ms()),
        });
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES_MAX {
            cache.clear();
        }
        cache.entry(request_path.to_owned()).or_default()[variant] = Some(cached.clone());
        drop(cache);
        cached.answer(&Method::GET, &HeaderMap::new())
    }

    /// Refuses a request path that leaves the root: `..` in any encoding (400), or a
    /// symbolic link whose target is outside it (403). Missing files pass on to 404.
    fn check(&self, path: &str) -> Result<(), (StatusCode, &'static str)> {
        let decoded = percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| (StatusCode::BAD_REQUEST, "the path is not UTF-8"))?;
        let mut on_disk = self.root.clone();
        for part in decoded.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err((StatusCode::BAD_REQUEST, "the path leaves the document root")),
                part if part.contains(['\\', '\0']) => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "the path has a forbidden character",
                    ));
                }
                part => on_disk.push(part),
            }
        }
        match on_disk.canonicalize() {
            Ok(real) if !real.starts_with(&self.root) => Err((
                StatusCode::FORBIDDEN,
                "a symbolic link leads outside the document root",
            )),
            _ => Ok(()),
        }
    }
}

impl Cached {
    /// The answer to a request: 304 if its validators match (as `ServeDir` decides:
    /// `If-None-Match` by weak comparison, else `If-Modified-Since`), else the file.
    fn answer(&self, method: &Method, request: &HeaderMap) -> Response {
        let etag = self.head.headers.get(header::ETAG);
        let not_modified = match request.get(header::IF_NONE_MATCH) {
            Some(tags) => etag.is_some_and(|etag| weak_match(tags.as_bytes(), etag.as_bytes())),
            None => match (
                request.get(header::IF_MODIFIED_SINCE),
                self.head.headers.get(header::LAST_MODIFIED),
            ) {
                (Some(since), Some(modified)) => {
                    let date = |v: &axum::http::HeaderValue| {
                        v.to_str().ok()?.parse::<httpdate::HttpDate>().ok()
                    };
                    matches!((date(since), date(modified)), (Some(s), Some(m)) if m <= s)
                }
                _ => false,
            },
        };
        let mut response = Response::new(Body::empty());
        *response.headers_mut() = self.head.headers.clone();
        if not_modified {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            for gone in [
                header::CONTENT_LENGTH,
                header::CONTENT_TYPE,
                header::ACCEPT_RANGES,
            ] {
                response.headers_mut().remove(gone);
            }
        } else if method != Method::HEAD {
            *response.body_mut() = Body::from(self.body.clone());
        }
        response
    }
}

/// Whether any tag of an `If-None-Match` list equals `etag`, `W/` ignored; `*` matches.
fn weak_match(list: &[u8], etag: &[u8]) -> bool {
    let bare = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
    let etag = bare(etag);
    list.split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .any(|t| t == b"*" || bare(t) == etag)
}

fn sibling(path: &Path, extension: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(extension);
    PathBuf::from(name)
}

/// The fallback handler of the web node: everything not proxied is a file.
pub async fn serve(State(files): State<Arc<StaticFiles>>, request: Request) -> Response {
    // Only paths that passed the check below are ever cached.
    let variant = files.variant(&request);
    if let Some(variant) = variant
        && let Some(cached) = files.lookup(request.uri().path(), variant)
    {
        return cached.answer(request.method(), request.headers());
    }
    if let Err((status, why)) = files.check(request.uri().path()) {
        return text(status, why);
    }
    let (method, headers, path) = (
        request.method().clone(),
        request.headers().clone(),
        request.uri().path().to_owned(),
    );
    let response = match files.serve.clone().oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    };
    match variant {
        // Only a plain GET's answer is whole; conditional ones are answered from it.
        Some(variant)
            if method == Method::GET
                && !headers.contains_key(header::IF_NONE_MATCH)
                && !headers.contains_key(header::IF_MODIFIED_SINCE) =>
        {
            files.remember(&path, variant, response).await
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_paths_out_of_the_root() {
        let dir = std::env::temp_dir().join(format!("foobar-web-files-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.join("secret"), "secret").unwrap();
        std::fs::write(root.join("sub/page.html"), "page").unwrap();
        let _ = std::os::unix::fs::symlink(dir.join("secret"), root.join("out"));
        let _ = std::os::unix::fs::symlink(root.join("sub/page.html"), root.join("in"));
        let files = StaticFiles::new(&root).unwrap();
        let status = |path: &str| files.check(path).err().map(|(s, _)| s.as_u16());
        assert_eq!(status("/sub/page.html"), None);
        assert_eq!(status("/in"), None);
        assert_eq!(status("/missing"), None);
        assert_eq!(status("/../secret"), Some(400));
        assert_eq!(status("/sub/%2e%2e/%2E%2E/secret"), Some(400));
        assert_eq!(status("/sub/..%2f..%2fsecret"), Some(400));
        assert_eq!(status("/sub%5c..%5c..%5csecret"), Some(400));
        assert_eq!(status("/out"), Some(403));
        assert_eq!(status("/%ff"), Some(400));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
