//! The whole foobar.com stack in the lab: DNS, the balancer, HTTPS, the web and
//! application nodes, MariaDB; and a browser using the site.

use std::{process::Command, time::Duration};

use tests::{
    browser::Browser,
    e2e::one_at_a_time,
    lab::{Lab, LabSpec, VIP},
    stack::{DNS_ADDR, SITE, resolving_command},
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
