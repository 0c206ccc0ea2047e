//! The site's certificate from an ACME CA, in the stack lab: pebble (Let's Encrypt's
//! test CA) checks www.foobar.com through the balancer's VIP, whichever web node it
//! lands on; both web nodes obtain their certificates, renew them without dropping a
//! connection, export their expiry, and keep serving theirs when the CA is gone.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use foobar_lab::acme::{Served, VALIDITY_S};
use tests::{
    e2e::one_at_a_time,
    lab::{Lab, LabSpec, web_addr},
    stack::{HTTP_PORT, SITE, resolving_command},
};

/// The alert rules shipped for these metrics.
const ALERT_RULES: &str = include_str!("../../deploy/alerts/certificates.yml");

#[test]
fn the_web_nodes_obtain_renew_and_keep_their_certificates_from_an_acme_ca() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::stack_for_test("acme"));
    lab.start_agent();
    lab.wait_for_backends_up();

    // Both web nodes get a certificate from pebble, each by its own order, validated
    // through the VIP on whichever server the balancer chose.
    let started = Instant::now();
    lab.start_acme();
    let first: Vec<Served> = (0..2)
        .map(|i| wait_for_pebble_certificate(&lab, i))
        .collect();
    let took = started.elapsed();
    let orders: Vec<u64> = (0..2)
        .filter_map(|i| order_times(&lab, i).first().copied())
        .collect();
    println!(
        "pebble to both web nodes serving its certificates: {:.2} s (pebble started, both \
         nodes restarted with [acme], every order); the first orders themselves took {orders:?} ms",
        took.as_secs_f64()
    );
    assert_ne!(first[0].serial, first[1].serial, "one certificate per node");
    // Trusted through the VIP by a client that knows pebble's root and nothing else.
    let servers: Vec<String> = (0..4)
        .map(|_| served_by_trusting_pebble(&lab).expect("HTTPS on pebble's root alone"))
        .collect();
    assert!(
        servers.contains(&"server1".to_owned()) && servers.contains(&"server2".to_owned()),
        "{servers:?}"
    );
    for i in 0..2 {
        println!(
            "server{}: challenge answers {:?}",
            i + 1,
            challenge_answers(&lab.web_metrics(i))
        );
    }

    // Whatever the balancer chose: with server1 out of the VIP's schedule, every
    // validation of server1's next order lands on server2, which has to ask server1.
    let server1_http = format!("{}:{HTTP_PORT}", web_addr(0));
    lab.cli_ok(&["backend", "weight", "www", &server1_http, "0"]);
    // An order already past its validation ends first.
    sleep(Duration::from_secs(2));
    let ok_before = metric(
        &lab.web_metrics(0),
        "foobar_web_acme_renewals_total{result=\"ok\"}",
    );
    let peer_before = challenge_answers(&lab.web_metrics(1)).1;
    wait_until(
        &lab,
        Duration::from_secs(60),
        "server1 renewing with server2's help",
        || {
            metric(
                &lab.web_metrics(0),
                "foobar_web_acme_renewals_total{result=\"ok\"}",
            ) > ok_before
        },
    );
    let peer_after = challenge_answers(&lab.web_metrics(1)).1;
    assert!(
        peer_after > peer_before,
        "server1 renewed while drained, but server2 never answered from its peer \
         ({peer_before} then {peer_after})"
    );
    lab.cli_ok(&["backend", "weight", "www", &server1_http, "1"]);

    // A renewal under an open connection: it keeps working, and a new connection to
    // the same server gets the new certificate.
    let mut held = HeldConnection::open(&lab);
    let server = held.get().expect("a request on the held connection");
    let i = if server == "server1" { 0 } else { 1 };
    let before = lab.served_certificate(i).expect("a certificate");
    let limit = Instant::now() + Duration::from_secs(60);
    let renewed = loop {
        assert_eq!(
            held.get().as_deref(),
            Ok(server.as_str()),
            "the held connection"
        );
        match lab.served_certificate(i) {
            Some(now) if now.serial != before.serial => break now,
            _ => {}
        }
        assert!(Instant::now() < limit, "{server} did not renew within 60 s");
        sleep(Duration::from_millis(500));
    };
    for _ in 0..3 {
        assert_eq!(
            held.get().as_deref(),
            Ok(server.as_str()),
            "the held connection after the renewal"
        );
    }
    assert!(renewed.issuer.contains("Pebble"), "{renewed:?}");
    println!(
        "{server} renewed under an open connection: serial {} then {}",
        before.serial, renewed.serial
    );
    drop(held);

    // The expiry and the renewals in /metrics, and the alert rules name only series
    // that exist.
    for i in 0..2 {
        let (served, metrics) = consistent_metrics(&lab, i);
        let expiry = metric(&metrics, "foobar_web_certificate_expiry_seconds");
        assert_eq!(
            expiry as i64,
            epoch_of(&served.not_after),
            "server{}",
            i + 1
        );
        let now = unix_now();
        assert!(
            expiry as i64 > now && expiry as i64 <= now + VALIDITY_S as i64 + 5,
            "server{}: expiry {expiry} at {now}",
            i + 1
        );
        assert!(
            metric(&metrics, "foobar_web_acme_renewals_total{result=\"ok\"}") >= 2.0,
            "server{}: the first order and a renewal at least:\n{metrics}",
            i + 1
        );
        assert!(metrics.contains("# HELP foobar_web_certificate_expiry_seconds"));
        for series in alert_series() {
            assert!(
                metrics.contains(&series),
                "{series} of the alert rules is not exported"
            );
        }
    }

    // The CA gone: the next renewal fails, is counted and logged, and the certificate
    // served stays.
    lab.stop_acme_ca();
    let kept: Vec<(Served, f64)> = (0..2)
        .map(|i| {
            (
                lab.served_certificate(i).expect("a certificate"),
                metric(
                    &lab.web_metrics(i),
                    "foobar_web_acme_renewals_total{result=\"failed\"}",
                ),
            )
        })
        .collect();
    for (i, (served, failed)) in kept.iter().enumerate() {
        wait_until(&lab, Duration::from_secs(40), "a failed renewal", || {
            metric(
                &lab.web_metrics(i),
                "foobar_web_acme_renewals_total{result=\"failed\"}",
            ) > *failed
        });
        let still = lab.served_certificate(i).expect("a certificate");
        assert_eq!(&still, served, "server{} changed its certificate", i + 1);
        let log = lab.log(&lab.server_name(i), "web");
        assert!(
            log.contains("ACME renewal failed"),
            "server{}:\n{log}",
            i + 1
        );
    }
    // The old certificates, not expired yet, are still trusted.
    assert!(served_by_trusting_pebble(&lab).is_some());

    let all: Vec<u64> = (0..2).flat_map(|i| order_times(&lab, i)).collect();
    println!(
        "orders to pebble: {} in all, {} ms median, {} ms at most",
        all.len(),
        median(&all),
        all.iter().max().copied().unwrap_or(0)
    );
}

/// Waits up to 60 s for server `i` to serve a certificate pebble issued.
fn wait_for_pebble_certificate(lab: &Lab, i: usize) -> Served {
    let mut found = None;
    wait_until(
        lab,
        Duration::from_secs(60),
        "a certificate from pebble",
        || {
            found = lab
                .served_certificate(i)
                .filter(|s| s.issuer.contains("Pebble"));
            found.is_some()
        },
    );
    found.expect("found")
}

/// Polls `done` every 200 ms; fails after `limit` with the web nodes' and pebble's logs.
fn wait_until(lab: &Lab, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            let logs: String = (0..2)
                .map(|i| {
                    let name = lab.server_name(i);
                    format!("--- {name}:\n{}\n", tail(&lab.log(&name, "web"), 30))
                })
                .collect();
            let pebble = lab.acme.as_ref().map(|p| p.log()).unwrap_or_default();
            panic!(
                "timed out after {limit:?} waiting for {what}\n{logs}--- pebble:\n{}",
                tail(&pebble, 30)
            );
        }
        sleep(Duration::from_millis(200));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A value of `/metrics`: the line that starts with `series` (name and labels).
fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

/// The challenge answers of a web node: from its own tokens, from a peer's, none.
fn challenge_answers(metrics: &str) -> (f64, f64, f64) {
    let answers = |source: &str| {
        metric(
            metrics,
            &format!("foobar_web_acme_challenge_answers_total{{source=\"{source}\"}}"),
        )
    };
    (answers("local"), answers("peer"), answers("none"))
}

/// Server `i`'s certificate and `/metrics` read with no renewal between them.
fn consistent_metrics(lab: &Lab, i: usize) -> (Served, String) {
    for _ in 0..5 {
        let before = lab.served_certificate(i).expect("a certificate");
        let metrics = lab.web_metrics(i);
        if lab.served_certificate(i).as_ref() == Some(&before) {
            return (before, metrics);
        }
    }
    panic!("server{}: a renewal between every reading", i + 1);
}

/// The `foobar_web_*` series the alert rules use.
fn alert_series() -> Vec<String> {
    let mut series: Vec<String> = ALERT_RULES
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("foobar_web_"))
        .map(str::to_owned)
        .collect();
    series.sort();
    series.dedup();
    assert!(!series.is_empty(), "no series in the alert rules");
    series
}

/// A GET of the site through the VIP by a curl that trusts pebble's root alone; the
/// server that answered.
fn served_by_trusting_pebble(lab: &Lab) -> Option<String> {
    let root = lab.acme.as_ref().expect("pebble").root();
    let out = resolving_command(&lab.client, "curl")
        .args([
            "-sS",
            "-f",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--cacert",
        ])
        .arg(root)
        .arg(format!("https://{SITE}/"))
        .output()
        .expect("run curl");
    if !out.status.success() {
        eprintln!("curl: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-served-by")
                .then(|| value.trim().to_owned())
        })
}

/// The durations of server `i`'s successful orders, from its log, in ms.
fn order_times(lab: &Lab, i: usize) -> Vec<u64> {
    lab.log(&lab.server_name(i), "web")
        .lines()
        .filter(|line| line.contains("certificate obtained from the ACME CA"))
        .filter_map(|line| {
            let (_, rest) = line.split_once("elapsed_ms=")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// An openssl date (`Jun  1 12:00:00 2025 GMT`) in seconds since the epoch.
fn epoch_of(date: &str) -> i64 {
    let out = Command::new("date")
        .args(["-u", "-d", date, "+%s"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date could not read {date:?}"))
}

/// A TLS connection held open through the VIP (openssl s_client, checking the site's
/// certificate against the lab's trusted roots), with requests sent one at a time.
struct HeldConnection {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl HeldConnection {
    fn open(lab: &Lab) -> Self {
        let trusted = lab.acme.as_ref().expect("pebble").trusted();
        let mut child = resolving_command(&lab.client, "openssl")
            .args([
                "s_client",
                "-quiet",
                "-verify_return_error",
                "-servername",
                SITE,
            ])
            .arg("-connect")
            .arg(format!("{SITE}:443"))
            .arg("-CAfile")
            .arg(trusted)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (lines_in, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_in.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// `GET /healthz` on the connection: the server that answered, or what went wrong.
    fn get(&mut self) -> Result<String, String> {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {SITE}\r\n\r\n");
        self.stdin
            .write_all(request.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("the connection is gone: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let (mut status, mut served_by) = (None, None);
        // The answer ends with its body, "ok".
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| format!("no whole answer (status {status:?})"))?;
            let line = line.trim_end();
            if line.starts_with("HTTP/") {
                status = Some(line.to_owned());
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("x-served-by")
            {
                served_by = Some(value.trim().to_owned());
            } else if line == "ok" {
                break;
            }
        }
        match (status, served_by) {
            (Some(status), Some(server)) if status.starts_with("HTTP/1.1 200") => Ok(server),
            other => Err(format!("answer {other:?}")),
        }
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
