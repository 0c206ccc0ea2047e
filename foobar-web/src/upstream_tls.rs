//! TLS to the application nodes (`[proxy] upstream_tls_ca`): a rustls client with
//! ring, as everything else here, that trusts the configured CA and no other, offers
//! HTTP/1.1 only (what the pool speaks to upstreams), and checks each upstream's
//! certificate for the IP address connected to (upstreams are addresses, not names).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio_rustls::TlsConnector;

/// A CA file that cannot be used to check the upstreams.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct UpstreamCaError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// A connector trusting the certificates in `ca` (PEM) and no others.
pub fn connector(ca: &Path) -> Result<TlsConnector, UpstreamCaError> {
    let bad = |message: String| UpstreamCaError {
        path: ca.to_owned(),
        message,
    };
    let certificates = CertificateDer::pem_file_iter(ca)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(e.to_string()))?;
    let mut trusted = RootCertStore::empty();
    let (added, _) = trusted.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(bad("no usable CA certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(trusted)
        .with_no_client_auth();
    // An application node offers HTTP/2 too; the pool's connections are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name an upstream's certificate must carry: its IP address (an IP address
/// subject alternative name; no SNI is sent for one).
pub fn server_name(ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}
