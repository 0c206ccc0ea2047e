//! Static files from a document root: tower-http's `ServeDir` does content types,
//! `ETag`/`Last-Modified` with conditional requests, byte ranges, precompressed
//! `.gz`/`.br` siblings and `index.html`; this module adds the containment nginx's
//! `disable_symlinks` gives: no path, however encoded, and no symbolic link may lead
//! outside the root.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::Response,
};
use foobar_node::observe::text;
use percent_encoding::percent_decode_str;
use tower::ServiceExt;
use tower_http::services::ServeDir;

/// The document root and its server.
pub struct StaticFiles {
    root: PathBuf,
    serve: ServeDir,
}

impl StaticFiles {
    /// Serves `root` (resolved once, so links inside it are judged against its real path).
    pub fn new(root: &Path) -> io::Result<Arc<Self>> {
        let root = root.canonicalize()?;
        let serve = ServeDir::new(&root)
            .append_index_html_on_directories(true)
            .precompressed_gzip()
            .precompressed_br();
        Ok(Arc::new(Self { root, serve }))
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

/// The fallback handler of the web node: everything not proxied is a file.
pub async fn serve(State(files): State<Arc<StaticFiles>>, request: Request) -> Response {
    if let Err((status, why)) = files.check(request.uri().path()) {
        return text(status, why);
    }
    match files.serve.clone().oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
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
