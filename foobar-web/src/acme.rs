//! The HTTPS certificate obtained and renewed from an ACME CA (RFC 8555) by the web
//! node itself, as Caddy does: no certbot beside it, no cron, no reload to arrange.
//!
//! **The challenge behind a balancer.** The CA proves control of a name by fetching
//! `http://<name>/.well-known/acme-challenge/<token>` (HTTP-01); through the VIP that
//! request reaches whichever web node the balancer picks, not necessarily the one that
//! placed the order. A node that does not hold a token asks its peers (`peers`: the
//! other web nodes' plain-HTTP listeners, over the internal network, with a short
//! deadline) and serves their answer; the request to a peer carries a header that
//! makes the peer answer only from what it holds, so a lookup is one hop and never
//! loops ([`challenge`]). Nothing is shared or stored: a token lives in the memory of
//! the node whose order needs it, for the minute the order takes. The alternatives:
//! shared storage for tokens (a database or a file system every node mounts) is a new
//! dependency and a new single point of failure for a minute-long need; a balancer that
//! sends `/.well-known` to one node cannot be had from a layer-4 balancer, which never
//! sees paths; TLS-ALPN-01 has the same routing problem on port 443 and no cheap way
//! for a peer to help (the answer is a TLS handshake, not a document); DNS-01 does not
//! depend on routing, but needs the DNS server to take updates (the lab's dnsmasq
//! serves a fixed zone; in production, RFC 2136 or a provider's API) and puts the
//! power to change the zone on every web node.
//!
//! **Who orders.** Every node orders its own certificate for the same names, with its
//! own account and key: no leader to elect, no private key copied between machines, a
//! node added later simply orders, and each renews on its own schedule. Clients do not
//! mind that two servers of one name present different certificates. The cost is one
//! order per node per renewal; Let's Encrypt allows 5 certificates for one exact set of
//! names a week, which two nodes are far from (beyond a handful, one node should order
//! and the others fetch its certificate).
//!
//! **Renewal.** Every `check_interval_s` the certificate served is looked at: with less
//! than `renew_before_s` left, or without one of the names, it is renewed (a new key
//! each time). The new pair is checked, written over `[https]`'s files and swapped in
//! by [`CertStore::install`], the same swap a SIGHUP reload does: connections open keep
//! the certificate they began with, new handshakes get the new one, nothing is dropped.
//! A failed order keeps the certificate served, is counted
//! (`foobar_web_acme_renewals_total{result="failed"}`) and logged, and is tried again
//! at the next check. At start the files are served if they exist (the last run's
//! certificate); if not, an expired self-signed placeholder is written, so the
//! listener starts at once and the first check orders.
//!
//! The CA is spoken to with instant-acme, over [`directory`]'s small HTTPS client,
//! which trusts only `directory_ca`.

mod challenge;
mod directory;
mod order;

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use foobar_node::{
    signals::Shutdown,
    tls::{CertStore, TlsError},
};
use instant_acme::{Account, AccountCredentials, AuthorizationStatus, HttpClient, NewAccount};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

pub use self::challenge::{Answering, Tokens};
use self::directory::DirectoryClient;
use crate::{
    certificate::{Expiry, Leaf},
    config,
};

/// The longest a whole order may take (account, challenges, certificate); then it
/// counts as failed and the next check tries again.
const ORDER_DEADLINE: Duration = Duration::from_secs(180);

/// What went wrong in obtaining a certificate.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The CA refused a request or could not be reached.
    #[error("{0}")]
    Protocol(#[from] instant_acme::Error),
    /// The CA offered no HTTP-01 challenge for a name.
    #[error("no http-01 challenge offered for {0}")]
    NoHttpChallenge(String),
    /// An authorization is neither pending nor valid (revoked, expired, invalid).
    #[error("the authorization for {name} is {status:?}")]
    Authorization {
        /// The name.
        name: String,
        /// Its status.
        status: AuthorizationStatus,
    },
    /// A challenge failed: the CA's own words.
    #[error("the order became invalid: {0}")]
    Invalid(String),
    /// Making the key, the request or the placeholder.
    #[error("key or certificate request: {0}")]
    Key(#[from] rcgen::Error),
    /// A file of ours could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The certificate obtained was refused (its key does not match, say).
    #[error("the certificate obtained was refused: {0}")]
    Refused(#[from] TlsError),
    /// The order took longer than [`ORDER_DEADLINE`].
    #[error("no certificate within {0:?}")]
    Deadline(Duration),
}

impl AcmeError {
    fn file(path: &Path, message: impl ToString) -> Self {
        AcmeError::File {
            path: path.to_owned(),
            message: message.to_string(),
        }
    }

    /// Whether the CA no longer knows the account (a test CA forgets them all when it
    /// restarts): a new one is made.
    fn account_gone(&self) -> bool {
        matches!(
            self,
            AcmeError::Protocol(instant_acme::Error::Api(problem))
                if problem.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist")
        )
    }
}

/// Labels of the renewal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RenewalLabels {
    result: &'static str,
}

/// The account file: the credentials, and the directory they belong to (a changed
/// `directory` makes a new account rather than asking one CA about another's).
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Obtains and renews the certificate of `[https]` (see the module).
pub struct Acme {
    settings: config::Acme,
    http: DirectoryClient,
    tokens: Arc<Tokens>,
    renewals: Family<RenewalLabels, Counter>,
}

impl Acme {
    /// Reads the roots trusted for the CA and registers the metrics.
    pub fn new(settings: &config::Acme, registry: &mut Registry) -> Result<Self, AcmeError> {
        let http = DirectoryClient::new(&settings.directory_ca)?;
        let tokens = Tokens::new(
            &settings.peers,
            Duration::from_millis(settings.peer_timeout_ms),
            registry,
        );
        let renewals = Family::<RenewalLabels, Counter>::default();
        registry.register(
            "acme_renewals",
            "Certificate orders to the ACME CA (the first one included), by result (ok, failed)",
            renewals.clone(),
        );
        // Both series from the start: a failure shows as a change, not a new series.
        for result in ["ok", "failed"] {
            renewals.get_or_create_owned(&RenewalLabels { result });
        }
        Ok(Self {
            settings: settings.clone(),
            http,
            tokens,
            renewals,
        })
    }

    /// The challenge tokens, for the listeners to answer with.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.clone()
    }

    /// Writes a placeholder over `certificate` and `key` unless both exist: a
    /// self-signed certificate for the names, expired from the start, so the first
    /// check orders and the expiry alert fires until a real one is served.
    pub fn placeholder_if_missing(&self, certificate: &Path, key: &Path) -> Result<(), AcmeError> {
        if certificate.exists() && key.exists() {
            return Ok(());
        }
        let key_pair = KeyPair::generate()?;
        let mut params = CertificateParams::new(self.settings.domains.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            "foobar-web placeholder, waiting for ACME",
        );
        params.not_before = rcgen::date_time_ymd(1975, 1, 1);
        params.not_after = rcgen::date_time_ymd(1975, 1, 2);
        let placeholder = params.self_signed(&key_pair)?;
        write_file(key, key_pair.serialize_pem().as_bytes(), 0o600)?;
        write_file(certificate, placeholder.pem().as_bytes(), 0o644)?;
        warn!(
            certificate = %certificate.display(),
            "no certificate yet: serving a placeholder until the ACME CA issues one"
        );
        Ok(())
    }

    /// Keeps the certificate `store` serves renewed until `shutdown`, in the
    /// background; `expiry` follows every certificate installed.
    pub fn spawn(self, store: Arc<CertStore>, expiry: Expiry, shutdown: Shutdown) {
        tokio::spawn(self.keep_renewed(store, expiry, shutdown));
    }

    async fn keep_renewed(self, store: Arc<CertStore>, expiry: Expiry, mut shutdown: Shutdown) {
        let interval = Duration::from_secs(self.settings.check_interval_s);
        let mut account = None;
        loop {
            if self.due(&store) {
                let started = Instant::now();
                let renewal = self.renew(&mut account, &store);
                let renewed = tokio::time::timeout(ORDER_DEADLINE, renewal)
                    .await
                    .unwrap_or_else(|_| Err(AcmeError::Deadline(ORDER_DEADLINE)));
                match renewed {
                    Ok(()) => {
                        self.count("ok");
                        expiry.observe(&store);
                        let not_after = Leaf::parse(&store.leaf()).map_or(0, |l| l.not_after);
                        info!(
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            not_after, "certificate obtained from the ACME CA and now served"
                        );
                    }
                    Err(e) => {
                        self.count("failed");
                        error!("ACME renewal failed, the certificate served stays: {e}");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    fn count(&self, result: &'static str) {
        self.renewals.get_or_create(&RenewalLabels { result }).inc();
    }

    /// Whether the certificate served must be replaced: unreadable, without one of the
    /// names, or with less than `renew_before_s` left.
    fn due(&self, store: &CertStore) -> bool {
        let Some(leaf) = Leaf::parse(&store.leaf()) else {
            return true;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        !leaf.covers(&self.settings.domains)
            || leaf.not_after - now < self.settings.renew_before_s as i64
    }

    /// One order, and its certificate installed; `account` is kept between orders.
    async fn renew(
        &self,
        account: &mut Option<Account>,
        store: &CertStore,
    ) -> Result<(), AcmeError> {
        let current = match account.clone() {
            Some(current) => current,
            None => account.insert(self.account().await?).clone(),
        };
        let domains = &self.settings.domains;
        let issued = match order::obtain(&current, domains, &self.tokens).await {
            Err(e) if e.account_gone() => {
                warn!("the ACME CA no longer knows this node's account: making a new one");
                let fresh = account.insert(self.create_account().await?).clone();
                order::obtain(&fresh, domains, &self.tokens).await?
            }
            result => result?,
        };
        store.install(issued.chain_pem.as_bytes(), issued.key_pem.as_bytes())?;
        Ok(())
    }

    /// The account of the file, or a new one if there is none for this directory.
    async fn account(&self) -> Result<Account, AcmeError> {
        let path = &self.settings.account;
        match std::fs::read(path) {
            Ok(bytes) => {
                let stored: StoredAccount =
                    serde_json::from_slice(&bytes).map_err(|e| AcmeError::file(path, e))?;
                if stored.directory == self.settings.directory {
                    return Ok(Account::builder_with_http(self.http())
                        .from_credentials(stored.credentials)
                        .await?);
                }
                info!("the account file is for another ACME directory: making a new account");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AcmeError::file(path, e)),
        }
        self.create_account().await
    }

    /// Registers a new account (agreeing to the CA's terms) and writes its file.
    async fn create_account(&self) -> Result<Account, AcmeError> {
        let contact: Vec<&str> = self.settings.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(self.http())
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await?;
        let stored = StoredAccount {
            directory: self.settings.directory.clone(),
            credentials,
        };
        let path = &self.settings.account;
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| AcmeError::file(path, e))?;
        write_file(path, &json, 0o600)?;
        info!(account = account.id(), "ACME account created");
        Ok(account)
    }

    fn http(&self) -> Box<dyn HttpClient> {
        Box::new(self.http.clone())
    }
}

/// Writes a whole file with `mode`, making its directory if needed.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), AcmeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AcmeError::file(dir, e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(|e| AcmeError::file(path, e))?;
    file.write_all(contents)
        .map_err(|e| AcmeError::file(path, e))
}
