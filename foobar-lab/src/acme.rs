//! ACME in the stack lab: Debian's pebble (Let's Encrypt's test CA) as the site's CA,
//! and the web nodes turned over to it with `[acme]`.
//!
//! Pebble runs in the client's namespace: its validator resolves www.foobar.com
//! through the lab's DNS server and reaches the VIP as any client does, so the
//! balancer, not the test, picks the web node that answers each challenge. The web
//! nodes reach its directory through the balancer, which routes between the two
//! networks. The directory is served over TLS with a certificate from the lab's CA,
//! the root the web nodes trust for it; the certificates pebble issues chain to a root
//! it makes at each start, fetched from its management interface for the lab's
//! clients ([`Pebble::trusted`]). They last [`VALIDITY_S`] and the web nodes renew
//! them [`RENEW_BEFORE_S`] before the end, a quarter of a minute after each issue, so
//! a test sees real renewals. Every order is validated afresh (no reuse of an earlier
//! authorization), at once (no random wait) and without refused nonces.
//!
//! It is an opt-in step of a stack lab ([`Lab::start_acme`]), not part of every one:
//! the other stack tests keep the lab CA's certificate, and their clients its trust.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Child,
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    lab::{CLIENT, Lab, terminate, web_addr},
    netns::Netns,
    pki::{Pki, SITE_NAMES},
    process::spawn_logged,
    stack::{DNS_ADDR, HTTP_PORT, HTTPS_PORT, SITE},
};

/// Where pebble listens: on the client.
pub const PEBBLE_ADDR: Ipv4Addr = CLIENT;
/// The ACME directory's port (HTTPS).
pub const DIRECTORY_PORT: u16 = 14000;
/// The management interface's port (HTTPS): `/roots/0` is the issuing root.
pub const MANAGEMENT_PORT: u16 = 15000;
/// How long pebble's certificates last (pebble's `certificateValidityPeriod`).
pub const VALIDITY_S: u64 = 60;
/// The web nodes renew a certificate with less than this left: 15 s after its issue.
pub const RENEW_BEFORE_S: u64 = 45;
/// How often the web nodes look at their certificate.
pub const CHECK_INTERVAL_S: u64 = 1;

/// The ACME directory's URL.
pub fn directory_url() -> String {
    format!("https://{PEBBLE_ADDR}:{DIRECTORY_PORT}/dir")
}

/// The running pebble, stopped when dropped.
pub struct Pebble {
    child: Option<Child>,
    dir: PathBuf,
}

impl Pebble {
    /// Starts pebble in `client` with a listening certificate from `pki`, its files
    /// and log in `<lab_dir>/pebble`; waits until its directory answers, then saves
    /// its issuing root.
    pub fn start(client: &Netns, pki: &Pki, lab_dir: &Path) -> Pebble {
        let dir = lab_dir.join("pebble");
        std::fs::create_dir_all(&dir).expect("pebble dir");
        // The web nodes reach the directory by address: the certificate names it.
        let address = PEBBLE_ADDR.to_string();
        pki.issue("pebble", &[address.as_str()], "pebble");
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            format!(
                "{{\"pebble\": {{\"listenAddress\": \"{PEBBLE_ADDR}:{DIRECTORY_PORT}\", \
                 \"managementListenAddress\": \"{PEBBLE_ADDR}:{MANAGEMENT_PORT}\", \
                 \"certificate\": \"{}\", \"privateKey\": \"{}\", \
                 \"httpPort\": {HTTP_PORT}, \"tlsPort\": {HTTPS_PORT}, \
                 \"ocspResponderURL\": \"\", \"externalAccountBindingRequired\": false, \
                 \"certificateValidityPeriod\": {VALIDITY_S}}}}}\n",
                pki.cert("pebble").display(),
                pki.key("pebble").display(),
            ),
        )
        .expect("pebble.json");
        // pebble comes with `cargo xtask setup` (Debian's package).
        let child = spawn_logged(
            client
                .command("pebble")
                .arg("-config")
                .arg(&config)
                .args(["-dnsserver", &format!("{DNS_ADDR}:53")])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                .env("PEBBLE_AUTHZREUSE", "0"),
            &dir.join("pebble.log"),
        );
        let mut pebble = Pebble {
            child: Some(child),
            dir,
        };
        let answers = |url: &str, out: &Path| {
            client
                .command("curl")
                .args(["-sf", "-m", "1", "--cacert"])
                .arg(pki.ca_cert())
                .arg("-o")
                .arg(out)
                .arg(url)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let started = Instant::now();
        while !answers(&directory_url(), Path::new("/dev/null")) {
            let exited = pebble
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none(), "pebble exited:\n{}", pebble.log());
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pebble's directory did not answer within 10 s:\n{}",
                pebble.log()
            );
            sleep(Duration::from_millis(50));
        }
        let roots = format!("https://{PEBBLE_ADDR}:{MANAGEMENT_PORT}/roots/0");
        assert!(
            answers(&roots, &pebble.root()),
            "pebble's root from {roots}:\n{}",
            pebble.log()
        );
        let lab_ca = std::fs::read_to_string(pki.ca_cert()).expect("the lab's CA");
        let root = std::fs::read_to_string(pebble.root()).expect("pebble's root");
        std::fs::write(pebble.trusted(), format!("{lab_ca}{root}")).expect("trusted roots");
        pebble
    }

    /// Pebble's issuing root (PEM): made at its start, the root of every certificate
    /// it issues.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    /// The lab's CA and pebble's root in one file: what the lab's clients trust once
    /// the site's certificate comes from pebble.
    pub fn trusted(&self) -> PathBuf {
        self.dir.join("trusted.pem")
    }

    /// Pebble's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
    }

    /// Stops pebble (SIGTERM, then SIGKILL): the CA is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Forgets the process, leaving it running (persistent labs).
    pub fn detach(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Server `i`'s web node configuration (`text`, as [`crate::stack::web_config`]
    /// writes it for the server's `dir`) turned over to pebble: its own certificate
    /// files in `<dir>/acme` (each node orders its own; the lab CA's are shared), and
    /// an `[acme]` section whose peers are the other servers' web nodes.
    pub fn web_config(
        &self,
        text: &str,
        dir: &Path,
        i: usize,
        servers: usize,
        pki: &Pki,
    ) -> String {
        let own = dir.join("acme");
        let mut text = text.to_owned();
        for (shared, mine) in [
            (pki.cert("www"), own.join("www.crt")),
            (pki.key("www"), own.join("www.key")),
        ] {
            let shared = format!("\"{}\"", shared.display());
            assert!(
                text.contains(&shared),
                "the web node's configuration no longer names {shared}:\n{text}"
            );
            text = text.replace(&shared, &format!("\"{}\"", mine.display()));
        }
        let quoted = |items: Vec<String>| {
            items
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let peers = (0..servers)
            .filter(|&j| j != i)
            .map(|j| format!("{}:{HTTP_PORT}", web_addr(j)))
            .collect();
        let domains = SITE_NAMES.iter().map(|n| n.to_string()).collect();
        text + &format!(
            "\n[acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\ncontact = [\"mailto:hostmaster@foobar.com\"]\n\
             domains = [{}]\naccount = \"{}\"\ncheck_interval_s = {CHECK_INTERVAL_S}\n\
             renew_before_s = {RENEW_BEFORE_S}\npeers = [{}]\npeer_timeout_ms = 500\n",
            directory_url(),
            pki.ca_cert().display(),
            quoted(domains),
            own.join("account.json").display(),
            quoted(peers),
        )
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a served certificate says about itself, as openssl prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The serial number, in hexadecimal.
    pub serial: String,
    /// The issuer's name (`CN = Pebble Intermediate CA 1a2b3c`).
    pub issuer: String,
    /// The notAfter (`Jun  1 12:00:00 2025 GMT`).
    pub not_after: String,
}

impl Lab {
    /// Starts pebble and turns every web node over to it: each is restarted with
    /// `[acme]` and, from then on, obtains its own certificate in the background and
    /// renews it. Returns once the web nodes answer again (on a placeholder
    /// certificate until pebble's comes: see [`Lab::served_certificate`]).
    pub fn start_acme(&mut self) {
        let pki = self.pki.as_ref().expect("ACME needs a stack lab");
        self.acme = Some(Pebble::start(&self.client, pki, &self.dir));
        for i in 0..self.webs.len() {
            self.stop_web(i);
            self.start_web(i);
        }
    }

    /// Stops pebble: the web nodes' renewals fail from then on.
    pub fn stop_acme_ca(&mut self) {
        if let Some(pebble) = &mut self.acme {
            pebble.stop();
        }
    }

    /// The certificate server `i`'s web node serves for the site on a new connection,
    /// straight from the balancer's namespace (not through the VIP, so the server is
    /// the one asked for); `None` if the handshake failed.
    pub fn served_certificate(&self, i: usize) -> Option<Served> {
        let script = format!(
            "timeout 5 openssl s_client -connect {}:{HTTPS_PORT} -servername {SITE} </dev/null 2>/dev/null \
             | openssl x509 -noout -serial -issuer -enddate",
            web_addr(i)
        );
        let out = self
            .lb()
            .command("sh")
            .args(["-c", &script])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .map(|value| value.trim().to_owned())
        };
        Some(Served {
            serial: field("serial")?,
            issuer: field("issuer")?,
            not_after: field("notAfter")?,
        })
    }

    /// Server `i`'s web node's `/metrics`, fetched from the balancer's namespace.
    pub fn web_metrics(&self, i: usize) -> String {
        let url = format!("http://{}:{HTTP_PORT}/metrics", web_addr(i));
        let out = self
            .lb()
            .command("curl")
            .args(["-sf", "-m", "2", &url])
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
