//! The whole foobar.com stack in the lab: DNS, the balancer, HTTPS, the web and
//! application nodes, MariaDB; a browser using the site; a rolling deploy under load.

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use foobar_lab::deploy;
use tests::{
    browser::Browser,
    e2e::{json, one_at_a_time},
    lab::{Lab, LabSpec, VIP},
    stack::{DNS_ADDR, SITE, SITE_VIPS, SITE_WEIGHT, resolving_command},
};

/// A stack lab with its balancer running and every server up on both VIPs.
fn stack_lab(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::stack_for_test(tag));
    lab.start_agent();
    lab.wait_for_backends_up();
    lab
}

#[test]
fn the_site_resolves_and_serves_over_https_through_the_vip() {
    let _turn = one_at_a_time();
    let lab = stack_lab("stack-site");

    // An authoritative answer from the lab's DNS server, and the client's resolver
    // (its /etc/resolv.conf) going there.
    let dig = lab
        .client
        .command("dig")
        .args(["+norec", &format!("@{DNS_ADDR}"), SITE, "A"])
        .output()
        .expect("dig (bind9-dnsutils; cargo xtask setup installs it)");
    let answer = String::from_utf8_lossy(&dig.stdout);
    assert!(
        answer.contains("flags: qr aa"),
        "not authoritative:\n{answer}"
    );
    assert!(
        answer.contains(&format!("{SITE}.\t\t0\tIN\tA\t{VIP}"))
            || answer.contains(&VIP.to_string()),
        "{answer}"
    );
    let resolved = resolving_command(&lab.client, "getent")
        .args(["hosts", SITE])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&resolved.stdout)
            .split_whitespace()
            .next(),
        Some("10.0.0.100")
    );

    // The page over HTTPS (HTTP/2 by ALPN), by name, through the VIP.
    let out = lab.site_curl(&[
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &format!("https://{SITE}/"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Post, then read back, over HTTPS.
    let posted = lab.site_curl(&[
        "-f",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"author":"stack","text":"through the whole stack"}"#,
        &format!("https://{SITE}/api/posts"),
    ]);
    assert!(
        posted.status.success(),
        "{}",
        String::from_utf8_lossy(&posted.stderr)
    );
    let post: serde_json::Value = serde_json::from_slice(&posted.stdout).unwrap();
    let read = lab.site_curl(&["-f", &format!("https://{SITE}/api/posts/{}", post["id"])]);
    let read: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(read, post);

    // Each new connection goes to the next server: both serve, in turn, on both ports.
    for scheme in ["https", "http"] {
        let servers: Vec<String> = (0..6)
            .map(|_| {
                lab.served_by(&format!("{scheme}://{SITE}/"))
                    .expect("an answer")
            })
            .collect();
        assert_eq!(
            servers.iter().filter(|s| *s == "server1").count(),
            3,
            "{scheme}: {servers:?}"
        );
        assert_eq!(
            servers.iter().filter(|s| *s == "server2").count(),
            3,
            "{scheme}: {servers:?}"
        );
        assert!(
            servers.windows(2).all(|w| w[0] != w[1]),
            "{scheme}: {servers:?}"
        );
    }
}

#[test]
fn a_browser_adds_a_post_through_the_page_and_sees_it_listed() {
    let _turn = one_at_a_time();
    let lab = stack_lab("stack-browser");
    let home = lab.dir.join("browser-home");
    lab.pki.as_ref().expect("stack").trust_in_nss(&home);
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", lab.client.name(), "env"])
        .arg(format!("HOME={}", home.display()))
        .arg("chromium");
    let mut browser = Browser::start(command, &lab.dir.join("chromium-profile"));

    browser.open(&format!("https://{SITE}/"));
    browser.wait_for(
        "document.body && document.body.dataset.loaded === 'yes'",
        Duration::from_secs(15),
    );
    let served_by = browser.eval("document.getElementById('served-by').textContent");
    assert!(
        served_by == "server1" || served_by == "server2",
        "the page says it was served by {served_by}"
    );
    assert_eq!(
        browser.eval("location.protocol"),
        "https:",
        "the CA is trusted: no interstitial"
    );

    browser.eval(
        "document.getElementById('author').value = 'browser';\
         document.getElementById('text').value = 'typed into the page';\
         document.getElementById('new-post').requestSubmit(); true",
    );
    browser.wait_for(
        "[...document.querySelectorAll('#posts .post p')].some(p => p.textContent === 'typed into the page')",
        Duration::from_secs(10),
    );
    // The form refuses what the API refuses, with the field named.
    browser.eval(
        "document.getElementById('author').value = ' ';\
         document.getElementById('text').value = 'x';\
         document.getElementById('new-post').requestSubmit(); true",
    );
    browser.wait_for(
        "document.getElementById('error').textContent.startsWith('author:')",
        Duration::from_secs(10),
    );
}

#[test]
fn a_rolling_deploy_under_load_fails_no_request() {
    let _turn = one_at_a_time();
    let mut lab = stack_lab("stack-deploy");
    let url = format!("https://{SITE}/");

    let before = wrk_report(
        wrk(&lab, "3s", &url)
            .spawn()
            .expect("wrk (cargo xtask setup installs it)"),
        Duration::from_secs(30),
    );

    // Longer than the deploy takes; stopped by SIGINT when it is done.
    let mut load = Background(Some(wrk(&lab, "120s", &url).spawn().expect("wrk")));
    // Every connection open and busy on both servers before the first drain.
    sleep(Duration::from_secs(2));
    let started = Instant::now();
    let options = deploy::Options {
        drain_timeout: Duration::from_secs(5),
        step_timeout: Duration::from_secs(30),
    };
    let steps = deploy::rolling_deploy(&mut lab, &options);
    let took = started.elapsed();
    let mut wrk = load.0.take().expect("wrk");
    let ended_early = wrk.try_wait().expect("wait for wrk").is_some();
    // On SIGINT wrk stops and reports what it measured so far.
    // SAFETY: signalling our own child (`ip netns exec` became wrk).
    unsafe { libc::kill(wrk.id() as i32, libc::SIGINT) };
    let during = wrk_report(wrk, Duration::from_secs(15));
    assert!(
        !ended_early,
        "wrk ended before the deploy did: its figures do not cover it"
    );

    let steps: Vec<String> = steps.iter().map(ToString::to_string).collect();
    println!(
        "wrk over HTTPS through the VIP, 16 kept-alive connections: {:.0} requests/s before \
         the deploy, {:.0} during it ({} requests; the deploy took {:.1} s)",
        before.requests_per_second,
        during.requests_per_second,
        during.requests,
        took.as_secs_f64()
    );
    assert!(
        during.requests > 0,
        "no request during the deploy:\n{}",
        during.text
    );
    assert_eq!(
        (during.socket_errors, during.bad_answers),
        ([0; 4], 0),
        "failed requests during the deploy (socket errors: connect, read, write, \
         timeout; answers not 2xx or 3xx):\n{}\nsteps:\n{}",
        during.text,
        steps.join("\n")
    );

    // Both servers back on both VIPs with their weight, and answering in turn.
    for (vip, _, _) in SITE_VIPS {
        let listed = json(&lab, &["backend", "list", vip]);
        for backend in listed[0]["backends"].as_array().expect("backends") {
            assert_eq!(
                (backend["weight"].as_u64(), backend["health"].as_str()),
                (Some(u64::from(SITE_WEIGHT)), Some("up")),
                "{vip}: {backend}"
            );
        }
    }
    let servers: BTreeSet<String> = (0..4)
        .map(|_| lab.served_by(&url).expect("an answer after the deploy"))
        .collect();
    assert_eq!(servers.len(), 2, "{servers:?}");
}

/// wrk from the client with 16 kept-alive connections for `duration` on `url`, its
/// report piped. Over HTTPS it checks no certificate.
fn wrk(lab: &Lab, duration: &str, url: &str) -> Command {
    let duration = format!("-d{duration}");
    let mut command = resolving_command(&lab.client, "wrk");
    command
        .args(["-t2", "-c16", duration.as_str(), "--latency", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A child running in the background, killed if the test ends before it does.
struct Background(Option<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What wrk reported.
struct WrkReport {
    requests_per_second: f64,
    requests: u64,
    /// Connect, read, write and timeout errors.
    socket_errors: [u64; 4],
    /// Answers other than 2xx or 3xx.
    bad_answers: u64,
    text: String,
}

/// Waits up to `limit` for `wrk` to end and reads its report.
fn wrk_report(wrk: Child, limit: Duration) -> WrkReport {
    let mut wrk = Background(Some(wrk));
    let started = Instant::now();
    let child = wrk.0.as_mut().expect("wrk");
    while child.try_wait().expect("wait for wrk").is_none() {
        assert!(
            started.elapsed() < limit,
            "wrk did not end within {limit:?}"
        );
        sleep(Duration::from_millis(50));
    }
    let out = wrk
        .0
        .take()
        .expect("wrk")
        .wait_with_output()
        .expect("wrk's output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    };
    let requests_per_second = field("Requests/sec:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's report:\n{text}"));
    // "  1234 requests in 3.00s, 10.00MB read"
    let requests = text
        .lines()
        .find_map(|line| line.trim().split(" requests in").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk's report:\n{text}"));
    // "Socket errors: connect 0, read 1, write 0, timeout 0": only when one is not 0.
    let mut socket_errors = [0; 4];
    if let Some(list) = field("Socket errors:") {
        for (count, part) in socket_errors.iter_mut().zip(list.split(',')) {
            *count = part
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("socket errors {list:?} in wrk's report"));
        }
    }
    let bad_answers =
        field("Non-2xx or 3xx responses:").map_or(0, |n| n.parse().expect("a count of answers"));
    WrkReport {
        requests_per_second,
        requests,
        socket_errors,
        bad_answers,
        text,
    }
}
