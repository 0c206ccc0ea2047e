//! `foobar-web`: the web node of the foobar.com lab. Every request is answered with
//! the server's name, so a client sees which backend the balancer chose.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A small HTTP/1.1 server that answers every request with its own name.
///
/// Examples:
///   foobar-web --name web1 --listen 0.0.0.0:8080
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The name it answers with (body and X-Served-By header).
    #[arg(long)]
    name: String,
    /// Address and port to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// While this file exists, `/health` answers 503 (a maintenance switch for
    /// health checks); every other path still answers 200.
    #[arg(long)]
    down_file: Option<PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let name: Arc<str> = args.name.into();
    let down_file: Arc<Option<PathBuf>> = Arc::new(args.down_file);
    eprintln!("foobar-web {name} listening on {}", args.listen);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let (name, down_file) = (name.clone(), down_file.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let name = name.clone();
                        let down = req.uri().path() == "/health"
                            && down_file.as_ref().as_ref().is_some_and(|f| f.exists());
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(if down { 503 } else { 200 })
                                    .header("X-Served-By", &*name)
                                    .header("Content-Type", "text/plain")
                                    .body(Full::new(Bytes::from(format!("{name}\n"))))
                                    .expect("static response"),
                            )
                        }
                    });
                    // A client that goes away mid-request is not our error.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}
