//! What the certificate served over HTTPS says about itself: when it expires, exported
//! as `foobar_web_certificate_expiry_seconds` whether it came from a file or from ACME
//! (an alert on it catches a renewal that keeps failing), and the names it is for.

use foobar_node::tls::CertStore;
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use rustls::pki_types::CertificateDer;
use x509_parser::{extensions::GeneralName, parse_x509_certificate};

/// A leaf certificate's facts that decide its renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Its notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Its DNS names (subject alternative names).
    pub names: Vec<String>,
}

impl Leaf {
    /// Reads a DER certificate; `None` if it does not parse.
    pub fn parse(der: &CertificateDer<'_>) -> Option<Leaf> {
        let (_, certificate) = parse_x509_certificate(der).ok()?;
        let names = match certificate.subject_alternative_name() {
            Ok(Some(extension)) => extension
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(name) => Some((*name).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(Leaf {
            not_after: certificate.validity().not_after.timestamp(),
            names,
        })
    }

    /// Whether it names every one of `domains` (in any case, as DNS compares them).
    pub fn covers(&self, domains: &[String]) -> bool {
        domains
            .iter()
            .all(|domain| self.names.iter().any(|n| n.eq_ignore_ascii_case(domain)))
    }
}

/// `foobar_web_certificate_expiry_seconds`: the notAfter of the certificate served.
#[derive(Clone, Debug, Default)]
pub struct Expiry(Gauge);

impl Expiry {
    /// Exports the gauge in `registry`: only a node with an HTTPS listener does (a 0
    /// would read as a certificate long expired).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "certificate_expiry_seconds",
            "When the certificate served over HTTPS expires (its notAfter), as a Unix time",
            self.0.clone(),
        );
    }

    /// Reads it from the certificate `store` serves now.
    pub fn observe(&self, store: &CertStore) {
        if let Some(leaf) = Leaf::parse(&store.leaf()) {
            self.0.set(leaf.not_after);
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, date_time_ymd};

    use super::*;

    #[test]
    fn reads_the_expiry_and_the_names() {
        let mut params =
            CertificateParams::new(vec!["www.foobar.com".to_owned(), "foobar.com".to_owned()])
                .unwrap();
        params.not_after = date_time_ymd(2031, 1, 1);
        let certificate = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let leaf = Leaf::parse(certificate.der()).unwrap();
        assert_eq!(leaf.not_after, 1_924_992_000);
        assert!(leaf.covers(&["WWW.foobar.com".to_owned()]));
        assert!(!leaf.covers(&["api.foobar.com".to_owned()]));
    }
}
