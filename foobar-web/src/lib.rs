//! `foobar-web`: the web node of the foobar.com stack, in nginx's role. It serves the
//! site's static files ([`files`]), passes the API to the application nodes
//! ([`proxy`]), and terminates TLS, with a certificate it can obtain and renew by
//! ACME itself (`acme`); serving, limits, logs and metrics come from `foobar-node`.

mod acme;
mod certificate;
pub mod config;
pub mod files;
pub mod proxy;
mod site;
pub mod upstream_tls;

use anyhow::Context as _;
use axum::http::HeaderValue;
use foobar_node::{
    observe::{AccessLog, Observer},
    server::Server,
    signals::{Hangups, Shutdown},
    tls::CertStore,
};
use prometheus_client::registry::Registry;
use tracing::{error, info};

use crate::{
    acme::{Acme, Answering},
    certificate::Expiry,
    config::Config,
    files::StaticFiles,
    proxy::Pool,
    site::Site,
};

/// Runs the web node until `shutdown`; each SIGHUP from `hangups` re-reads the
/// certificate and key (a bad pair is refused and the old one kept). With `[acme]`
/// the certificate is obtained and renewed in the background.
pub async fn run(
    config: Config,
    shutdown: Shutdown,
    hangups: Option<Hangups>,
) -> anyhow::Result<()> {
    let mut registry = Registry::with_prefix("foobar_web");
    let pool = match &config.proxy {
        Some(proxy) => Some(Pool::new(proxy, &mut registry).context("proxy.upstream_tls_ca")?),
        None => None,
    };
    let expiry = Expiry::default();
    if config.https.is_some() {
        expiry.register(&mut registry);
    }
    let acme = match &config.acme {
        Some(settings) => Some(Acme::new(settings, &mut registry).context("acme")?),
        None => None,
    };
    let tokens = acme.as_ref().map(Acme::tokens);
    let files = match &config.files {
        Some(f) => Some(StaticFiles::new(&f.root).with_context(|| f.root.display().to_string())?),
        None => None,
    };
    let access_log = match &config.access_log {
        Some(path) => Some(AccessLog::open(path).with_context(|| path.display().to_string())?),
        None => None,
    };
    let observer = Observer::new(registry, access_log, "static");
    // Each worker builds its own copy of the site (its own upstream connections),
    // behind the ACME challenge answers.
    let make_site = |hsts: Option<HeaderValue>, redirect_to: Option<u16>| {
        let (config, pool, files, observer, tokens) = (
            config.clone(),
            pool.clone(),
            files.clone(),
            observer.clone(),
            tokens.clone(),
        );
        move || {
            let site = Site::new(
                &config,
                pool.as_ref().map(|p| p.worker()),
                files.clone(),
                observer.clone(),
                hsts.clone(),
                redirect_to,
            );
            Answering::new(tokens.clone(), observer.clone(), site)
        }
    };

    let mut servers = Vec::new();
    let mut certs = None;
    if let Some(https) = &config.https {
        if let Some(acme) = &acme {
            acme.placeholder_if_missing(&https.certificate, &https.key)?;
        }
        let store = CertStore::load(&https.certificate, &https.key)?;
        expiry.observe(&store);
        let acceptor = store.acceptor()?;
        let hsts = (https.hsts_max_age_s > 0)
            .then(|| HeaderValue::from_str(&format!("max-age={}", https.hsts_max_age_s)))
            .transpose()?;
        servers.push(
            Server::start(
                https.listen,
                Some(acceptor),
                make_site(hsts, None),
                config.limits,
                shutdown.clone(),
            )
            .with_context(|| format!("https.listen {}", https.listen))?,
        );
        certs = Some(store);
    }
    if let Some(http) = &config.http {
        let redirect_to = match (&config.https, http.redirect_to_https) {
            (Some(https), true) => Some(https.listen.port()),
            _ => None,
        };
        servers.push(
            Server::start(
                http.listen,
                None,
                make_site(None, redirect_to),
                config.limits,
                shutdown.clone(),
            )
            .with_context(|| format!("http.listen {}", http.listen))?,
        );
    }
    if let (Some(acme), Some(store)) = (acme, &certs) {
        acme.spawn(store.clone(), expiry.clone(), shutdown.clone());
    }
    if let (Some(mut hangups), Some(store)) = (hangups, certs) {
        tokio::spawn(async move {
            while hangups.next().await.is_some() {
                match store.reload() {
                    Ok(()) => {
                        expiry.observe(&store);
                        info!("certificate reloaded")
                    }
                    Err(e) => error!("certificate reload refused, keeping the old one: {e}"),
                }
            }
        });
    }
    for server in servers {
        server.finished().await;
    }
    observer.flush();
    Ok(())
}
