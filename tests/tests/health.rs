//! Health checks end to end: real servers die, fail their checks and come back; the
//! balancer's schedules follow, and an operator's disable overrides them.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use tests::{
    e2e::{json, one_at_a_time, tally, vip},
    http::{connect, get, get_once},
    lab::{DATAPLANE_INTERFACES, Lab, LabSpec, VIP, VIP_PORT, WEB_PORT, wait_until, web_addr},
};

/// Checks every 200 ms, 100 ms timeout, up after 2 successes, down after 2 failures.
fn config(kind: &str, on_down: &str) -> String {
    format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\non_backend_down = \"{on_down}\"\n\
         backends = [\n  {{ address = \"{}\", port = {WEB_PORT} }},\n  {{ address = \"{}\", port = {WEB_PORT} }},\n]\n\
         [vips.health_check]\ntype = \"{kind}\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n",
        web_addr(0),
        web_addr(1)
    )
}

fn lab(tag: &str, kind: &str, on_down: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::for_test(tag, 2));
    lab.write_config(&config(kind, on_down));
    lab.start_agent();
    lab
}

fn backend_field(lab: &Lab, i: usize, field: &str) -> serde_json::Value {
    json(lab, &["status"])["vips"][0]["backends"][i][field].clone()
}

fn web1() -> String {
    format!("{}:{WEB_PORT}", web_addr(0))
}

#[test]
fn a_dead_backend_leaves_the_schedule_and_comes_back() {
    let _turn = one_at_a_time();
    let mut lab = lab("dead", "tcp", "keep");
    wait_until(Duration::from_secs(5), "the first checks", || {
        backend_field(&lab, 0, "last_check") == "ok"
    });
    assert_eq!(backend_field(&lab, 0, "health"), "up");

    let killed = Instant::now();
    lab.stop_web(0);
    wait_until(Duration::from_secs(5), "web1 to be marked down", || {
        backend_field(&lab, 0, "health") == "down"
    });
    let removal = killed.elapsed();
    // Checks every 200 ms, down after 2 failures: about 400 ms, bounded by 5 s above.
    println!("backend death to removal: {} ms", removal.as_millis());
    assert_eq!(backend_field(&lab, 0, "state"), "down");
    let last = backend_field(&lab, 0, "last_check");
    assert!(last.as_str().unwrap().contains("connect"), "{last}");
    let answers: Vec<String> = (0..6)
        .map(|i| get_once(&lab.client, vip(), None).unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect();
    assert!(answers.iter().all(|a| a == "web2"), "{answers:?}");

    lab.start_web(0);
    wait_until(Duration::from_secs(5), "web1 to be marked up", || {
        backend_field(&lab, 0, "health") == "up"
    });
    assert_eq!(backend_field(&lab, 0, "health_transitions"), 2);
    let answers: Vec<String> = (0..4)
        .map(|_| get_once(&lab.client, vip(), None).expect("request"))
        .collect();
    assert_eq!(tally(answers).len(), 2, "web1 did not rejoin");
    let log = lab.agent_log();
    assert!(log.contains("backend down"), "{log}");
    assert!(log.contains("backend up"), "{log}");
}

/// Opens a keep-alive connection that lands on web1.
fn connection_to_web1(lab: &Lab) -> std::net::TcpStream {
    for _ in 0..4 {
        let mut stream = connect(&lab.client, vip(), None).expect("connect");
        if get(&mut stream).expect("request") == "web1" {
            return stream;
        }
    }
    panic!("round robin never chose web1");
}

#[test]
fn a_failing_http_check_keeps_or_resets_open_flows_as_configured() {
    let _turn = one_at_a_time();
    for (on_down, survives) in [("keep", true), ("reset", false)] {
        let lab = lab(&format!("http{on_down}"), "http", on_down);
        wait_until(Duration::from_secs(5), "the first checks", || {
            backend_field(&lab, 0, "last_check") == "ok"
        });
        let mut open = connection_to_web1(&lab);
        // web1 stays up for traffic but its /health answers 503.
        lab.set_web_health(0, false);
        wait_until(Duration::from_secs(5), "web1 to be marked down", || {
            backend_field(&lab, 0, "health") == "down"
        });
        assert!(
            backend_field(&lab, 0, "last_check")
                .as_str()
                .unwrap()
                .contains("status 503"),
        );
        let after = get(&mut open);
        if survives {
            assert_eq!(after.expect("keep: the open connection works"), "web1");
        } else {
            // Its flow is gone: the next packet is scheduled onto web2, which resets it.
            assert!(
                after.is_err(),
                "reset: the connection still answered {after:?}"
            );
        }
        let fresh: Vec<String> = (0..4)
            .map(|_| get_once(&lab.client, vip(), None).expect("request"))
            .collect();
        assert!(fresh.iter().all(|a| a == "web2"), "{on_down}: {fresh:?}");
        lab.set_web_health(0, true);
        wait_until(Duration::from_secs(5), "web1 to be marked up", || {
            backend_field(&lab, 0, "health") == "up"
        });
    }
}

#[test]
fn disable_overrides_health_and_enable_hands_back_to_the_checks() {
    let _turn = one_at_a_time();
    let lab = lab("admin", "http", "keep");
    lab.cli_ok(&["backend", "disable", "www", &web1()]);
    assert_eq!(backend_field(&lab, 0, "state"), "disabled");
    // Checks go on; still up, still disabled.
    sleep(Duration::from_millis(600));
    assert_eq!(backend_field(&lab, 0, "health"), "up");
    let answers: Vec<String> = (0..4)
        .map(|_| get_once(&lab.client, vip(), None).expect("request"))
        .collect();
    assert!(answers.iter().all(|a| a == "web2"), "{answers:?}");
    let table = lab.cli_ok(&["status"]);
    assert!(table.contains("disabled"), "{table}");

    lab.cli_ok(&["backend", "enable", "www", &web1()]);
    assert_eq!(backend_field(&lab, 0, "state"), "active");
    let answers: Vec<String> = (0..4)
        .map(|_| get_once(&lab.client, vip(), None).expect("request"))
        .collect();
    assert_eq!(tally(answers).len(), 2);

    // Enabling a backend whose checks fail does not bring it back.
    lab.set_web_health(0, false);
    lab.cli_ok(&["backend", "disable", "www", &web1()]);
    wait_until(Duration::from_secs(5), "web1 down", || {
        backend_field(&lab, 0, "health") == "down"
    });
    lab.cli_ok(&["backend", "enable", "www", &web1()]);
    assert_eq!(backend_field(&lab, 0, "state"), "down");
    let answers: Vec<String> = (0..4)
        .map(|_| get_once(&lab.client, vip(), None).expect("request"))
        .collect();
    assert!(answers.iter().all(|a| a == "web2"), "{answers:?}");
}

#[test]
fn https_checks_speak_tls_to_the_backend() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::for_test("https", 2));
    // web1 also serves HTTPS (openssl s_server) on 8443 with a fresh self-signed
    // certificate; web2:8080 speaks plain HTTP only.
    let (cert, key) = (lab.dir.join("web1.pem"), lab.dir.join("web1.key"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=web1",
        ])
        .args(["-days", "1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (cargo xtask setup installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut tls_server = lab.webs[0]
        .command("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", "8443", "-cert"])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    lab.write_config(&format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\n\
         backends = [\n  {{ address = \"{}\", port = 8443 }},\n  {{ address = \"{}\", port = {WEB_PORT} }},\n]\n\
         [vips.health_check]\ntype = \"https\"\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 2\n",
        web_addr(0),
        web_addr(1)
    ));
    lab.start_agent();
    wait_until(Duration::from_secs(10), "web1's TLS check to pass", || {
        backend_field(&lab, 0, "last_check") == "ok"
    });
    assert_eq!(backend_field(&lab, 0, "health"), "up");
    // Plain HTTP fails an HTTPS check: the check really speaks TLS.
    wait_until(Duration::from_secs(10), "web2 to be marked down", || {
        backend_field(&lab, 1, "health") == "down"
    });
    let last = backend_field(&lab, 1, "last_check");
    assert!(last.as_str().unwrap().starts_with("tls: "), "{last}");

    let _ = tls_server.kill();
    let _ = tls_server.wait();
    wait_until(Duration::from_secs(10), "web1 to be marked down", || {
        backend_field(&lab, 0, "health") == "down"
    });
    let last = backend_field(&lab, 0, "last_check");
    assert!(last.as_str().unwrap().contains("connect"), "{last}");
}
