//! The HTTPS client instant-acme speaks to the CA through: HTTP/1.1 over tokio-rustls
//! with ring, as everything else here, trusting only the configured roots, with a
//! deadline on each request. One connection per request: an order is a dozen
//! requests, and orders are weeks apart.

use std::{future::Future, path::Path, pin::Pin, sync::Arc, time::Duration};

use axum::{
    body::Bytes,
    http::{HeaderValue, Request, Uri, header},
};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::AcmeError;

/// How long one request may take, from the connection to the answer's head.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The client; cheap to clone.
#[derive(Clone)]
pub struct DirectoryClient {
    tls: TlsConnector,
}

impl DirectoryClient {
    /// A client trusting the certificates in `roots` (PEM) and no others.
    pub fn new(roots: &Path) -> Result<Self, AcmeError> {
        let certificates = CertificateDer::pem_file_iter(roots)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|e| AcmeError::file(roots, e))?;
        let mut trusted = RootCertStore::empty();
        let (added, _) = trusted.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(AcmeError::file(roots, "no usable CA certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::file(roots, e))?
            .with_root_certificates(trusted)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
        })
    }
}

impl HttpClient for DirectoryClient {
    fn request(
        &self,
        request: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            tokio::time::timeout(REQUEST_DEADLINE, send(tls, request))
                .await
                .unwrap_or_else(|_| Err(Error::Str("the ACME CA did not answer within 10 s")))
        })
    }
}

/// Sends `request` (with an absolute `https://` URL) on a new connection.
async fn send(
    tls: TlsConnector,
    mut request: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, Error> {
    let url = request.uri().clone();
    if url.scheme_str() != Some("https") {
        return Err(Error::Str("an ACME URL that is not https"));
    }
    let (Some(host), Some(authority)) = (url.host(), url.authority()) else {
        return Err(Error::Str("an ACME URL without a host"));
    };
    // An IPv6 literal is bracketed in a URL, bare in an address and a TLS name.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(other)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host).map_err(other)?;
    let stream = tls.connect(name, tcp).await.map_err(other)?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    // HTTP/1.1 sends the path alone and the host in its own header.
    let host_header = HeaderValue::from_str(authority.as_str()).map_err(other)?;
    request.headers_mut().insert(header::HOST, host_header);
    *request.uri_mut() = url
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()));
    let response = sender.send_request(request).await.map_err(other)?;
    Ok(BytesResponse::from(response))
}

fn other(error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Other(Box::new(error))
}
