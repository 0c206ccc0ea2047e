//! Metrics, the status page (loaded in headless Chromium) and the Grafana dashboard,
//! against a running lab.

use std::{collections::BTreeSet, time::Duration};

use tests::{
    e2e::{one_at_a_time, vip},
    http::get_once,
    lab::{Lab, LabSpec, WEB_PORT, default_config, vrrp_section, wait_until, web_addr},
};

const LISTEN: &str = "127.0.0.1:9100";

/// An HA lab whose lb1 runs alone with VRRP, so it is MASTER and every family of
/// metrics is exported.
fn lab(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::ha_for_test(tag, 2));
    lab.write_config(&format!(
        "{}\n[vips.health_check]\ntype = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 100\n\n\
         [metrics]\nlisten = \"{LISTEN}\"\n{}",
        default_config(2, "rr"),
        vrrp_section(150, true)
    ));
    lab.start_agent();
    wait_until(Duration::from_secs(10), "lb1 to be VRRP master", || {
        lab.balancer().holds_vip()
    });
    lab
}

/// `curl` from the balancer's namespace (the listener is on its loopback).
fn fetch(lab: &Lab, path: &str) -> String {
    let out = lab
        .lb()
        .command("curl")
        .args(["-sf", "-m", "5", &format!("http://{LISTEN}{path}")])
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {path} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of one sample line, by its exact name and labels.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{metrics}"))
}

#[test]
fn metrics_follow_the_traffic_and_the_health_of_backends() {
    let _turn = one_at_a_time();
    let lab = lab("metrics");
    for i in 0..4 {
        get_once(&lab.client, vip(), None).unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    let text = fetch(&lab, "/metrics");
    // The classic text format unless OpenMetrics is asked for (promtool.rs checks both).
    assert!(
        text.contains("# TYPE foobar_lb_packets_total counter") && !text.contains("# EOF"),
        "{text}"
    );
    // Every sample line is `name{labels} value`, and every name is ours.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("name value");
        assert!(series.starts_with("foobar_lb_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    let web1 = format!("{}:{WEB_PORT}", web_addr(0));
    let b1 = format!("vip=\"www\",backend=\"{web1}\"");
    assert_eq!(
        sample(&text, "foobar_lb_vip_new_flows_total{vip=\"www\"}"),
        4.0
    );
    assert_eq!(
        sample(&text, &format!("foobar_lb_backend_new_flows_total{{{b1}}}")),
        2.0
    );
    assert!(
        sample(
            &text,
            "foobar_lb_vip_packets_total{vip=\"www\",direction=\"to_client\"}"
        ) > 0.0
    );
    assert!(sample(&text, "foobar_lb_xdp_actions_total{action=\"redirect\"}") > 0.0);
    assert_eq!(sample(&text, "foobar_lb_flow_table_capacity"), 262_144.0);
    assert!(text.contains("# TYPE foobar_lb_flow_table_entries gauge"));
    assert!(text.contains("foobar_lb_packets_total{reason=\"drop_bad_ihl\"} 0"));
    assert_eq!(sample(&text, "foobar_lb_vrrp_role{role=\"master\"}"), 1.0);
    assert_eq!(sample(&text, "foobar_lb_vrrp_role{role=\"backup\"}"), 0.0);
    assert_eq!(sample(&text, "foobar_lb_vrrp_priority"), 150.0);
    assert!(
        sample(
            &text,
            "foobar_lb_vrrp_advertisements_total{direction=\"sent\"}"
        ) > 0.0
    );
    wait_until(Duration::from_secs(5), "a check latency", || {
        fetch(&lab, "/metrics")
            .contains(&format!("foobar_lb_backend_check_latency_seconds{{{b1}}}"))
    });
    assert_eq!(sample(&text, &format!("foobar_lb_backend_up{{{b1}}}")), 1.0);
    assert_eq!(
        sample(
            &text,
            &format!("foobar_lb_backend_checks_skipped_total{{{b1}}}")
        ),
        0.0
    );
    // The kernel's word on the data plane: the agent's program on both interfaces.
    for interface in ["eth-client", "eth-servers"] {
        let series = format!("foobar_lb_dataplane_attached{{interface=\"{interface}\"}}");
        assert_eq!(sample(&text, &series), 1.0, "{series}");
    }

    lab.set_web_health(0, false);
    wait_until(Duration::from_secs(5), "web1 down in the metrics", || {
        sample(
            &fetch(&lab, "/metrics"),
            &format!("foobar_lb_backend_up{{{b1}}}"),
        ) == 0.0
    });
    let text = fetch(&lab, "/metrics");
    assert_eq!(
        sample(
            &text,
            &format!("foobar_lb_backend_health_transitions_total{{{b1}}}")
        ),
        1.0
    );
    let status: serde_json::Value = serde_json::from_str(&fetch(&lab, "/status.json")).unwrap();
    assert_eq!(status["vips"][0]["backends"][0]["state"], "down");
}

#[test]
fn the_grafana_dashboard_only_uses_exported_metrics() {
    let _turn = one_at_a_time();
    let lab = lab("grafana");
    get_once(&lab.client, vip(), None).expect("request");
    wait_until(Duration::from_secs(5), "a check", || {
        fetch(&lab, "/metrics").contains("foobar_lb_backend_check_latency_seconds")
    });
    let exported: BTreeSet<String> = fetch(&lab, "/metrics")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/foobar-lb.json"),
    )
    .expect("dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in json["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("foobar_lb_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses unexported {missing:?}"
    );
}

/// The page as headless Chromium renders it (scripts run), from the balancer's
/// namespace.
fn rendered(lab: &Lab) -> String {
    let profile = lab.dir.join("chromium");
    let out = lab
        .lb()
        .command("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{LISTEN}/"))
        .output()
        .expect("run chromium (cargo xtask setup installs it)");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("<table"),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[test]
fn the_status_page_shows_vips_backends_and_their_state_in_a_browser() {
    let _turn = one_at_a_time();
    let lab = lab("page");
    let web1 = format!("{}:{WEB_PORT}", web_addr(0));
    let web2 = format!("{}:{WEB_PORT}", web_addr(1));
    wait_until(Duration::from_secs(5), "the first checks", || {
        fetch(&lab, "/status.json").contains("\"last_check\":\"ok\"")
    });
    let dom = rendered(&lab);
    for text in ["www", "10.0.0.100:80 tcp rr", &web1, &web2, "eth-client"] {
        assert!(dom.contains(text), "the page lacks {text:?}:\n{dom}");
    }
    assert_eq!(dom.matches("class=\"backend active\"").count(), 2, "{dom}");
    assert!(dom.contains("ok "), "no check latency shown:\n{dom}");
    for text in [
        "failover (VRRP vrid 51 on eth-client)",
        "MASTER",
        "priority 150/150",
    ] {
        assert!(dom.contains(text), "the page lacks {text:?}:\n{dom}");
    }

    lab.cli_ok(&["backend", "disable", "www", &web1]);
    lab.set_web_health(1, false);
    wait_until(Duration::from_secs(5), "web2 down", || {
        fetch(&lab, "/status.json").contains("\"state\":\"down\"")
    });
    let dom = rendered(&lab);
    assert!(dom.contains("class=\"backend disabled\""), "{dom}");
    assert!(dom.contains("class=\"backend down\""), "{dom}");
    assert!(dom.contains("status 503"), "{dom}");
}
