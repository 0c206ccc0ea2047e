//! The alert rules the package ships (`deploy/alerts/`): every file passes
//! `promtool check rules`, as do the lab's copies of them (their `for:` and range
//! windows shortened to seconds, `monitoring::lab_rules`), and every foobar-lb alert
//! fires through a real Prometheus. An HA lab with health checks and VRRP tracking,
//! and the lab's monitoring host (Debian's Prometheus) scraping both agents and both
//! web servers; then each condition in turn is broken until its alert is firing in
//! Prometheus's API, and repaired until it is gone: a backend down, a VIP with no
//! healthy backend, a balancer that lost an interface of its data plane, an agent
//! gone, VRRP flapping.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use foobar_lab::monitoring::{self, LAB_FOR, Monitoring};
use serde_json::Value;
use tests::{
    e2e::{json_of, one_at_a_time},
    lab::{
        Balancer, LB_SERVER_IF, Lab, LabSpec, WEB_PORT, default_config, vrrp_section, wait_until,
        web_addr,
    },
};

/// A VRRP role change, or an agent answering.
const LIMIT: Duration = Duration::from_secs(10);
/// How long an alert may take to fire: the agent seeing the fault (its checks fail
/// within half a second, its interfaces are looked at every second), a scrape and an
/// evaluation (a second each), the lab's `for:` (2 s), and slack for two busy cores.
const FIRE: Duration = Duration::from_secs(30);
/// How long a repaired fault's alert may take to go: the lab's range window (30 s)
/// for the flapping rule, a few seconds for the others, and slack.
const CLEAR: Duration = Duration::from_secs(90);

/// The web servers' health checks: 200 ms apart, two to change a backend's state.
const CHECK: &str = "[vips.health_check]\ntype = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\n\
                     timeout_ms = 100\nrise = 2\nfall = 2\n";

/// The alerts of `deploy/alerts/foobar-lb.yml`, each of which the lab test fires.
const ALERTS: [&str; 5] = [
    "FoobarLbVipNoHealthyBackend",
    "FoobarLbBackendDown",
    "FoobarLbVrrpFlapping",
    "FoobarLbDataPlaneLost",
    "FoobarLbAgentDown",
];

#[test]
fn every_shipped_rule_file_passes_promtool() {
    let files = monitoring::rule_files();
    assert!(
        files.iter().any(|f| f.ends_with("foobar-lb.yml")),
        "no foobar-lb.yml in {}: {files:?}",
        monitoring::alerts_dir().display()
    );
    promtool(&["check", "rules"], &files);
    let shipped = read(&monitoring::alerts_dir().join("foobar-lb.yml"));
    assert_eq!(alert_names(&shipped), ALERTS, "the alerts this file tests");
}

#[test]
fn the_labs_copies_keep_every_rule_and_pass_promtool() {
    let dir = std::env::temp_dir().join(format!("fblb-alert-copies-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the copies");
    let lab_for = format!("for: {}s", LAB_FOR.as_secs());
    let copies: Vec<PathBuf> = monitoring::rule_files()
        .iter()
        .map(|file| {
            let shipped = read(file);
            let copy = monitoring::lab_rules(&shipped);
            assert_eq!(
                alert_names(&copy),
                alert_names(&shipped),
                "{}: the lab's copy has other alerts",
                file.display()
            );
            for line in copy.lines() {
                if line.trim_start().starts_with("for:") {
                    assert_eq!(
                        line.trim(),
                        lab_for,
                        "{}: in the lab's copy",
                        file.display()
                    );
                }
            }
            let path = dir.join(file.file_name().expect("a file name"));
            std::fs::write(&path, copy).expect("write the copy");
            path
        })
        .collect();
    promtool(&["check", "rules"], &copies);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn each_alert_fires_through_prometheus_and_clears() {
    let _turn = one_at_a_time();
    // lb1 (150) is MASTER, lb2 (100) BACKUP; a tracked fault takes 60 off.
    let mut lab = Lab::up(LabSpec::ha_for_test("alerts", 2));
    for (i, priority) in [(0, 150), (1, 100)] {
        let config = default_config(2, "maglev")
            + CHECK
            + &monitoring::metrics_section()
            + &vrrp_section(priority, true)
            + "[vrrp.track]\nweight = 60\n";
        lab.balancers[i].write_config(&config);
        lab.balancers[i].start_agent();
    }
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");

    let prometheus = Monitoring::start(&lab);
    promtool(&["check", "config"], &[prometheus.config_path()]);
    wait_for_targets(&prometheus);
    assert_rules_loaded(&prometheus);
    assert_series_scraped(&prometheus);
    wait_until_quiet(&prometheus);

    let mut took: Vec<(&str, Duration)> = Vec::new();
    let web1 = format!("{}:{WEB_PORT}", web_addr(0));
    let lb1 = [("balancer", "lb1")];

    // A backend down: web1's /healthz answers 503.
    let broken = Instant::now();
    lab.set_web_health(0, false);
    let alert = "FoobarLbBackendDown";
    took.push((
        alert,
        fires(
            &prometheus,
            alert,
            &[lb1[0], ("backend", web1.as_str())],
            broken,
        ),
    ));
    lab.set_web_health(0, true);
    clears(&prometheus, alert);

    // The VIP with no healthy backend: both down.
    let broken = Instant::now();
    for web in 0..2 {
        lab.set_web_health(web, false);
    }
    let alert = "FoobarLbVipNoHealthyBackend";
    took.push((
        alert,
        fires(&prometheus, alert, &[lb1[0], ("vip", "www")], broken),
    ));
    // The tracked fault this makes is the VIP's: not taken for the data plane's.
    assert_not_firing(&prometheus, "FoobarLbDataPlaneLost");
    for web in 0..2 {
        lab.set_web_health(web, true);
    }
    clears(&prometheus, alert);
    clears(&prometheus, "FoobarLbBackendDown");

    // A data plane that lost an interface: lb1's server side goes down (lb2 takes
    // over, and lb1's checks fail too, which must not hide it).
    let broken = Instant::now();
    set_server_side(&lab.balancers[0], "down");
    let alert = "FoobarLbDataPlaneLost";
    took.push((alert, fires(&prometheus, alert, &lb1, broken)));
    set_server_side(&lab.balancers[0], "up");
    clears(&prometheus, alert);
    wait_role(&lab.balancers[0], "master");
    clears(&prometheus, "FoobarLbBackendDown");
    clears(&prometheus, "FoobarLbVipNoHealthyBackend");

    // An agent gone: lb2's killed, then started again (as BACKUP).
    let broken = Instant::now();
    lab.balancers[1].kill_agent();
    let alert = "FoobarLbAgentDown";
    took.push((
        alert,
        fires(&prometheus, alert, &[("balancer", "lb2")], broken),
    ));
    lab.balancers[1].start_agent();
    clears(&prometheus, alert);
    wait_role(&lab.balancers[1], "backup");

    // VRRP flapping: lb1's server side down and up three times, each a failover and
    // a failback (two role changes on each balancer).
    let broken = Instant::now();
    for _ in 0..3 {
        set_server_side(&lab.balancers[0], "down");
        wait_role(&lab.balancers[1], "master");
        set_server_side(&lab.balancers[0], "up");
        wait_role(&lab.balancers[0], "master");
    }
    let alert = "FoobarLbVrrpFlapping";
    took.push((alert, fires(&prometheus, alert, &lb1, broken)));
    clears(&prometheus, alert);

    println!(
        "fired through Prometheus (lab `for:` {} s):",
        LAB_FOR.as_secs()
    );
    for (alert, after) in &took {
        println!(
            "  {alert:<28} {:>5.1} s after the fault",
            after.as_secs_f64()
        );
    }
    let fired: Vec<&str> = took.iter().map(|(a, _)| *a).collect();
    for alert in ALERTS {
        assert!(fired.contains(&alert), "{alert} was not tried");
    }
}

/// `promtool <args> <files>`, which must succeed.
fn promtool(args: &[&str], files: &[PathBuf]) {
    let out = Command::new("promtool")
        .args(args)
        .args(files)
        .output()
        .expect("run promtool (Debian's prometheus package; cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?} {files:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The names of a rule file's alerts (`- alert: Name`), in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

fn role(b: &Balancer) -> String {
    json_of(b, &["status"])["vrrp"]["role"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

fn wait_role(b: &Balancer, want: &str) {
    wait_until(LIMIT, &format!("{} to be {want}", b.name), || {
        role(b) == want
    });
}

/// Sets a balancer's server-side data-plane interface `up` or `down`.
fn set_server_side(b: &Balancer, state: &str) {
    b.ns.ip(&["link", "set", LB_SERVER_IF, state]);
}

/// `GET <path>` of Prometheus's API, parsed; panics unless it answers.
fn api(prometheus: &Monitoring, path: &str) -> Value {
    let body = prometheus
        .api(path)
        .unwrap_or_else(|| panic!("GET {path}: no answer\n{}", tail(&prometheus.log())));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until Prometheus scrapes every target of the lab, each up.
fn wait_for_targets(prometheus: &Monitoring) {
    let started = Instant::now();
    loop {
        let targets = api(prometheus, "/api/v1/targets");
        let active = targets["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Prometheus lists its targets a moment after it is ready.
        if active.len() == prometheus.targets.len() && active.iter().all(|t| t["health"] == "up") {
            println!(
                "{} targets up after {:.1} s",
                active.len(),
                started.elapsed().as_secs_f64()
            );
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not every target up within 30 s (want {:?}):\n{targets:#}",
            prometheus.targets
        );
        sleep(Duration::from_millis(200));
    }
}

/// Every alert of foobar-lb.yml is loaded, with the lab's `for:`.
fn assert_rules_loaded(prometheus: &Monitoring) {
    let rules = api(prometheus, "/api/v1/rules");
    let loaded: Vec<Value> = rules["data"]["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r["type"] == "alerting")
        .collect();
    for alert in ALERTS {
        let rule = loaded
            .iter()
            .find(|r| r["name"] == alert)
            .unwrap_or_else(|| panic!("{alert} is not loaded:\n{rules:#}"));
        assert_eq!(
            rule["duration"].as_f64(),
            Some(LAB_FOR.as_secs_f64()),
            "{alert}'s `for:` in the lab:\n{rule:#}"
        );
    }
}

/// Every series the expressions of foobar-lb.yml read is one Prometheus has scraped
/// from the agents (so a renamed series cannot leave a rule silently matching nothing).
fn assert_series_scraped(prometheus: &Monitoring) {
    let names = api(prometheus, "/api/v1/label/__name__/values");
    let scraped: BTreeSet<&str> = names["data"]
        .as_array()
        .expect("metric names")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let used = series_in_expressions(&read(&monitoring::alerts_dir().join("foobar-lb.yml")));
    assert!(used.len() >= 5, "series the rules read: {used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !scraped.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the rules read {missing:?}, which the agents do not export; scraped: {scraped:?}"
    );
}

/// The `foobar_lb_…` names in a rule file's `expr:` blocks (not its comments or
/// annotations).
fn series_in_expressions(rules: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let body = line.trim_start();
        if body.starts_with("expr:") {
            in_expr = true;
        } else if body.ends_with(':') || body.starts_with("- ") || body.contains(": ") {
            // The next key (`for:`, `labels:`) or rule ends the expression.
            in_expr = false;
        }
        if !in_expr || body.starts_with('#') {
            continue;
        }
        let mut rest = body;
        while let Some(at) = rest.find("foobar_lb_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            used.insert(name);
        }
    }
    used
}

/// The active alerts (pending or firing).
fn alerts(prometheus: &Monitoring) -> Vec<Value> {
    api(prometheus, "/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Whether `alert` has `labels` (and maybe more).
fn matches(alert: &Value, name: &str, labels: &[(&str, &str)]) -> bool {
    alert["labels"]["alertname"] == name
        && labels
            .iter()
            .all(|(label, value)| alert["labels"][*label] == *value)
}

/// Waits until no alert is active: the lab starts quiet.
fn wait_until_quiet(prometheus: &Monitoring) {
    let started = Instant::now();
    loop {
        let active = alerts(prometheus);
        if active.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "alerts active in a healthy lab:\n{active:#?}"
        );
        sleep(Duration::from_millis(200));
    }
}

/// Waits up to [`FIRE`] until `name` with `labels` is firing; how long after `since`
/// (the fault) it was.
fn fires(prometheus: &Monitoring, name: &str, labels: &[(&str, &str)], since: Instant) -> Duration {
    let started = Instant::now();
    loop {
        let active = alerts(prometheus);
        if active
            .iter()
            .any(|a| matches(a, name, labels) && a["state"] == "firing")
        {
            let after = since.elapsed();
            println!(
                "{name} {labels:?} firing {:.1} s after the fault",
                after.as_secs_f64()
            );
            return after;
        }
        assert!(
            started.elapsed() < FIRE,
            "{name} {labels:?} not firing within {FIRE:?}; active:\n{active:#?}\n\
             prometheus:\n{}",
            tail(&prometheus.log())
        );
        sleep(Duration::from_millis(200));
    }
}

/// Waits until no `name` alert is active.
fn clears(prometheus: &Monitoring, name: &str) {
    let started = Instant::now();
    loop {
        let active = alerts(prometheus);
        if !active.iter().any(|a| matches(a, name, &[])) {
            println!(
                "{name} gone {:.1} s after the repair",
                started.elapsed().as_secs_f64()
            );
            return;
        }
        assert!(
            started.elapsed() < CLEAR,
            "{name} still active {CLEAR:?} after the repair:\n{active:#?}"
        );
        sleep(Duration::from_millis(200));
    }
}

fn assert_not_firing(prometheus: &Monitoring, name: &str) {
    let active = alerts(prometheus);
    assert!(
        !active
            .iter()
            .any(|a| matches(a, name, &[]) && a["state"] == "firing"),
        "{name} firing:\n{active:#?}"
    );
}
