//! The lab's certificate authority and the site's certificate: what a real site gets
//! from a public CA, made here so the lab's clients can trust it (curl `--cacert`,
//! Chromium through an NSS database).

use std::{
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Writes a secret (a key, a password) to `path`, readable by its owner only (mode
/// 0600, also when the file was there before).
pub fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // `mode` applies to a new file only.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The names the site's certificate is for.
pub const SITE_NAMES: [&str; 2] = ["www.foobar.com", "foobar.com"];

/// The CA and the files of the site's certificate.
pub struct Pki {
    dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

impl Pki {
    /// Makes a CA in `dir` (its certificate in `ca.crt`) and a first certificate for
    /// the site (`www.crt`, `www.key`).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "foobar lab CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("ca.crt");
        let pki = Self {
            dir: dir.to_owned(),
            ca_params,
            ca_key,
        };
        pki.issue("www", &SITE_NAMES, "");
        pki
    }

    /// The CA certificate clients trust.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A certificate file written by [`Pki::issue`].
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.crt"))
    }

    /// Its key file.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// Issues a server certificate for `names` into `<name>.crt` and `<name>.key`
    /// (mode 0600), replacing any earlier one; `organization` tells issues apart.
    pub fn issue(&self, name: &str, names: &[&str], organization: &str) {
        self.issue_to(&self.cert(name), &self.key(name), names, organization);
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses; the first
    /// is also its common name) into `cert_file` and `key_file` (mode 0600).
    pub fn issue_to(&self, cert_file: &Path, key_file: &Path, names: &[&str], organization: &str) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS name")),
            })
            .collect();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if !organization.is_empty() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, organization);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let issuer = Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        std::fs::write(cert_file, cert.pem()).expect("certificate file");
        write_private(key_file, &key.serialize_pem());
    }

    /// Makes `home` a home directory whose NSS database trusts the CA, so Chromium run
    /// with `HOME=home` trusts the site as a browser trusts a public one.
    pub fn trust_in_nss(&self, home: &Path) {
        let db = home.join(".pki/nssdb");
        std::fs::create_dir_all(&db).expect("nssdb dir");
        let db = format!("sql:{}", db.display());
        for args in [
            vec!["-N", "-d", &db, "--empty-password"],
            vec![
                "-A",
                "-d",
                &db,
                "-t",
                "C,,",
                "-n",
                "foobar lab CA",
                "-i",
                self.ca_cert().to_str().expect("utf-8 path"),
            ],
        ] {
            let out = Command::new("certutil")
                .args(&args)
                .output()
                .expect("certutil (libnss3-tools; cargo xtask setup installs it)");
            assert!(
                out.status.success(),
                "certutil {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
