//! Every `/metrics` the project serves, read the way Prometheus reads it and checked by
//! Prometheus's own tool, promtool (Debian's `prometheus` package; `cargo xtask setup`
//! installs it): the classic text format by default, OpenMetrics when the scraper
//! asks for it.

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use tests::{
    e2e::{one_at_a_time, vip},
    http::get_once,
    lab::{Lab, LabSpec, default_config, vrrp_section, wait_until, web_addr},
    stack::{APP_PORT, DB_AGENT_PORT, HTTP_PORT, LB_METRICS_PORT},
};

const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The balancer's metrics listener, on its loopback.
fn agent_url() -> String {
    format!("http://127.0.0.1:{LB_METRICS_PORT}/metrics")
}

#[test]
fn the_agents_metrics_pass_promtool_in_both_formats() {
    let _turn = one_at_a_time();
    // As in observe.rs: lb1 alone with VRRP is MASTER, so every family is exported.
    let mut lab = Lab::up(LabSpec::ha_for_test("promtool-lb", 2));
    lab.write_config(&format!(
        "{}\n[vips.health_check]\ntype = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 100\n\n\
         [metrics]\nlisten = \"127.0.0.1:{LB_METRICS_PORT}\"\n{}",
        default_config(2, "rr"),
        vrrp_section(150, true)
    ));
    lab.start_agent();
    wait_until(Duration::from_secs(10), "lb1 to be VRRP master", || {
        lab.balancer().holds_vip()
    });
    get_once(&lab.client, vip(), None).expect("a request through the VIP");
    wait_until(Duration::from_secs(5), "a check latency", || {
        scrape(&lab, &agent_url(), None)
            .1
            .contains("foobar_lb_backend_check_latency_seconds{")
    });
    check_endpoint(&lab, &agent_url(), true);
}

#[test]
fn the_nodes_metrics_pass_promtool_in_both_formats() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::stack_for_test("promtool-stack"));
    lab.start_agent();
    lab.wait_for_backends_up();
    check_endpoint(&lab, &agent_url(), true);
    // Both servers: one database node is the primary, the other the replica, and
    // they export different series.
    for i in 0..2 {
        let server = web_addr(i);
        // The web and application nodes serve prometheus-client's metrics;
        // foobar-db writes the classic format itself, and only that.
        for (port, negotiates) in [(HTTP_PORT, true), (APP_PORT, true), (DB_AGENT_PORT, false)] {
            let url = format!("http://{server}:{port}/metrics");
            check_endpoint(&lab, &url, negotiates);
        }
    }
}

/// Scrapes `url` as a plain client (classic format expected) and as one asking for
/// OpenMetrics (expected if `negotiates`), and runs promtool on each body.
fn check_endpoint(lab: &Lab, url: &str, negotiates: bool) {
    // OpenMetrics first: families only appear over time, so each of its families is
    // in the classic body read after it.
    let (content_type, openmetrics) = scrape(lab, url, Some("application/openmetrics-text"));
    if negotiates {
        assert_eq!(content_type, OPENMETRICS, "{url} asked for OpenMetrics");
        check_openmetrics(&lab.dir, url, &openmetrics);
    } else {
        assert_eq!(content_type, CLASSIC, "{url} asked for OpenMetrics");
        check_classic(url, &openmetrics);
    }

    let (content_type, classic) = scrape(lab, url, None);
    assert_eq!(content_type, CLASSIC, "{url} by default");
    check_classic(url, &classic);
    if negotiates {
        let missing: Vec<_> = families(&openmetrics)
            .difference(&families(&classic))
            .cloned()
            .collect();
        assert!(
            missing.is_empty(),
            "{url}: families in OpenMetrics but not in the classic format: {missing:?}\n\
             {openmetrics}\n{classic}"
        );
    }
}

/// A classic body: promtool has nothing to say about it.
fn check_classic(url: &str, body: &str) {
    assert!(
        !body.contains("# EOF"),
        "{url}: # EOF in the classic format"
    );
    let (passed, findings) = promtool_lint(body);
    assert!(
        passed && findings.is_empty(),
        "{url} (classic): promtool check metrics:\n{findings}\n--- the body:\n{body}"
    );
}

/// An OpenMetrics body: it ends with `# EOF`, Prometheus's OpenMetrics parser reads
/// it, and promtool's linter finds nothing but what comes of reading it as the
/// classic format.
fn check_openmetrics(lab_dir: &Path, url: &str, body: &str) {
    assert!(body.ends_with("# EOF\n"), "{url}: no final # EOF:\n{body}");
    if let Err(e) = parse_openmetrics(&lab_dir.join("promtool-openmetrics"), body) {
        panic!("{url}: Prometheus's OpenMetrics parser refuses it: {e}\n--- the body:\n{body}");
    }
    // `check metrics` reads the classic format only, where a counter family is named
    // with its samples' `_total`; OpenMetrics names it without, so the linter sees
    // `<name>_total` samples without help. Anything else it says is a finding.
    let counters: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let (_, findings) = promtool_lint(body);
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|line| {
            let counter = line
                .strip_suffix(" no help text")
                .and_then(|name| name.strip_suffix("_total"));
            !counter.is_some_and(|name| counters.contains(name))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{url} (OpenMetrics): promtool check metrics:\n{findings}\n--- the body:\n{body}"
    );
}

/// GET `url` with curl in the balancer's namespace, with `accept` as the `Accept`
/// header (curl's `*/*` without): the answer's `Content-Type` and body.
fn scrape(lab: &Lab, url: &str, accept: Option<&str>) -> (String, String) {
    let mut curl = lab.lb().command("curl");
    curl.args(["-sS", "-f", "-m", "5", "-w", "\n%{content_type}"]);
    if let Some(accept) = accept {
        curl.arg("-H").arg(format!("Accept: {accept}"));
    }
    let out = curl.arg(url).output().expect("curl");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("metrics are UTF-8");
    let (body, content_type) = text.rsplit_once('\n').expect("curl's -w line");
    (content_type.to_owned(), body.to_owned())
}

/// `promtool check metrics` on `body`: whether it passed, and what it printed.
fn promtool_lint(body: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian's prometheus package; cargo xtask setup installs it)");
    // promtool reads all of its input before it writes, and the pipe closes here.
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// Reads an OpenMetrics body with Prometheus's own OpenMetrics parser, the one a scrape
/// that negotiated OpenMetrics uses, through promtool's backfill (into blocks under
/// `dir`, removed after). The backfill wants a timestamp on every sample, so each gets
/// one; nothing else is changed.
fn parse_openmetrics(dir: &Path, body: &str) -> Result<(), String> {
    let stamped: String = body
        .lines()
        .map(|line| {
            if line.starts_with('#') {
                format!("{line}\n")
            } else {
                format!("{line} 1700000000\n")
            }
        })
        .collect();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("a directory for promtool");
    let input = dir.join("metrics.om");
    std::fs::write(&input, stamped).expect("write the metrics");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(dir.join("blocks"))
        .output()
        .expect("run promtool");
    let _ = std::fs::remove_dir_all(dir);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The families a text declares (`# TYPE`), each as `<name> <type>` with the name its
/// samples carry: the classic format names counters that way, OpenMetrics without
/// the `_total`.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|family| match family.split_once(' ') {
            Some((name, "counter")) if !name.ends_with("_total") => {
                format!("{name}_total counter")
            }
            _ => family.to_owned(),
        })
        .collect()
}
