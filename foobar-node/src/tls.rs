//! TLS termination with a certificate that can be swapped while serving: connections
//! already open keep the certificate they started with, new handshakes get the new one.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio_rustls::TlsAcceptor;

/// A certificate or key that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file was unreadable or held nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the pair (key does not match, unsupported algorithm).
    #[error("certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate chain and key now served, re-read from their files on demand.
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// Reads the chain and key; fails unless both are usable together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = read_pair(&provider, cert_path, key_path)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            provider,
            current: ArcSwap::from_pointee(current),
        }))
    }

    /// Re-reads both files; on any error the certificate served stays as it was.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = read_pair(&self.provider, &self.cert_path, &self.key_path)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// Serves a new chain and key given in PEM (an ACME renewal) and writes them over
    /// the store's files, so a restart or SIGHUP finds them. The pair is checked before
    /// anything changes: a bad one leaves the files and the certificate served as they
    /// were. Each file is replaced by a rename, never seen half-written.
    pub fn install(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let fresh = pair_from_pem(
            &self.provider,
            chain_pem,
            key_pem,
            &self.cert_path,
            &self.key_path,
        )?;
        replace_file(&self.key_path, key_pem, 0o600)?;
        replace_file(&self.cert_path, chain_pem, 0o644)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// The leaf certificate now served (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.load().cert[0].clone()
    }

    /// A rustls server configuration offering HTTP/2 and HTTP/1.1 by ALPN.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn read_pair(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| TlsError::File {
            path: path.to_owned(),
            message: e.to_string(),
        })
    };
    pair_from_pem(
        provider,
        &read(cert_path)?,
        &read(key_path)?,
        cert_path,
        key_path,
    )
}

/// A chain and key in PEM, checked to belong together; the paths name them in errors.
fn pair_from_pem(
    provider: &CryptoProvider,
    chain_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let bad = |path: &Path, message: String| TlsError::File {
        path: path.to_owned(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert_path, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(key_path, e.to_string()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(key_path, e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match()?;
    Ok(certified)
}

/// Writes `contents` to `path` through a temporary file beside it and a rename, so a
/// reader sees the old file or the new one, never a part.
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let failed = |e: std::io::Error| TlsError::File {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&temporary)
        .map_err(failed)?;
    file.write_all(contents).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}
