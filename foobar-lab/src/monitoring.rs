//! The lab's monitoring host: Debian's Prometheus (the `prometheus` package a real
//! deployment runs; `cargo xtask setup` installs it) in a namespace of its own,
//! `<prefix>-mon`, plugged into both networks like the lab's other hosts:
//!
//! ```text
//!  br-client ─ eth-c 10.0.0.9 [mon] eth-s 10.1.0.9 ─ br-servers
//! ```
//! It scrapes every balancer's agent on the balancer's own client-side address
//! (`[metrics] listen` on every address: [`metrics_section`]) and every node's
//! `/metrics` on its server's address (the stack servers' firewalls let 10.1.0.9 in
//! on those ports), once a second, and evaluates the alert rules shipped in
//! `deploy/alerts/` once a second too, from copies whose clock runs fast
//! ([`lab_rules`]). Its API answers on port 9090 of both of its addresses.
//!
//! [`Monitoring::start`] takes a lab that is up (agents started or not); keep the
//! [`Monitoring`] after the [`Lab`] (so it drops first): it stops Prometheus and
//! removes its namespace, unless the lab is persistent.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Child,
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    lab::{LB_CLIENT_SIDE, Lab, WEB_PORT, balancer_client_addr, web_addr},
    netns::Netns,
    process::{spawn_logged, terminate},
    stack::{APP_PORT, DB_AGENT_PORT, HTTP_PORT, LB_METRICS_PORT},
};

/// The monitoring host on the client network.
pub const MONITOR_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
/// The monitoring host on the server network: the source of the nodes' scrapes.
pub const MONITOR_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 9);
/// Prometheus's port (its web UI and API).
pub const PROMETHEUS_PORT: u16 = 9090;
/// The job the agents are scraped under, as `deploy/alerts/foobar-lb.yml` expects.
pub const AGENT_JOB: &str = "foobar-lb";
/// How often Prometheus scrapes and evaluates its rules.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Every `for:` of the lab's rule copies: long enough to be seen pending, short
/// enough for a test.
pub const LAB_FOR: Duration = Duration::from_secs(2);
/// Every range window (`[10m]`) of the lab's rule copies: a burst of a few seconds
/// fits in it, and it is over half a minute after.
pub const LAB_WINDOW: Duration = Duration::from_secs(30);

/// A balancer's `[metrics]` section that the monitoring host reaches: the agent's
/// listener on every address of its namespace (the lab's [`crate::lab::METRICS`]
/// keeps it on the loopback). Stack balancers listen so already.
pub fn metrics_section() -> String {
    format!("\n[metrics]\nlisten = \"0.0.0.0:{LB_METRICS_PORT}\"\n")
}

/// The workspace's `deploy/alerts/`: the rule files the package ships.
pub fn alerts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("foobar-lab sits in the workspace")
        .join("deploy/alerts")
}

/// Every rule file of [`alerts_dir`] (`*.yml`, `*.yaml`), sorted.
pub fn rule_files() -> Vec<PathBuf> {
    let dir = alerts_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yml" || ext == "yaml")
        })
        .collect();
    files.sort();
    files
}

/// The lab's copy of a rule file, whose clock runs fast: a line that is a `for:` key
/// with a duration (`for: 10m`, quoted or not) becomes `for: <LAB_FOR>` with the
/// same indentation, and every range window, a `[` duration `]` anywhere (`[10m]`,
/// `[1d]`; not a subquery's `[5m:1m]`, not `[acme]`), becomes `[<LAB_WINDOW>]`.
/// Nothing else changes: the shipped file keeps its production durations, the lab
/// sees an alert fire in seconds and clear within [`LAB_WINDOW`] and a little more.
pub fn lab_rules(text: &str) -> String {
    let lab_for = format!("for: {}s", LAB_FOR.as_secs());
    let window = format!("[{}s]", LAB_WINDOW.as_secs());
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let body = line.trim_start();
        let indent = &line[..line.len() - body.len()];
        let is_for = body.strip_prefix("for:").is_some_and(|value| {
            let value = value.split('#').next().unwrap_or("").trim();
            is_duration(value.trim_matches(|c| c == '"' || c == '\''))
        });
        if is_for {
            out.push_str(indent);
            out.push_str(&lab_for);
        } else {
            out.push_str(&shrink_windows(line, &window));
        }
        out.push('\n');
    }
    out
}

/// `line` with every `[<duration>]` replaced by `window`.
fn shrink_windows(line: &str, window: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if is_duration(&after[..close]) => {
                out.push_str(window);
                rest = &after[close + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `s` is a Prometheus duration: one or more `<digits><unit>`, the units
/// `ms s m h d w y` (`1h30m`, `10m`, `500ms`).
fn is_duration(s: &str) -> bool {
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// One endpoint Prometheus scrapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its job: [`AGENT_JOB`], `foobar-web`, `foobar-app` or `foobar-db`.
    pub job: &'static str,
    /// `address:port`: the series' `instance`.
    pub address: String,
    /// A label naming the host for people, on every series of the target:
    /// `balancer="lb1"` or `server="server1"`.
    pub host: (&'static str, String),
    /// Scraped over HTTPS trusting this CA (application nodes with web-to-app TLS).
    pub ca: Option<PathBuf>,
}

/// What the monitoring host scrapes in `lab`: every balancer's agent, and every
/// server's nodes (the web node of a plain lab; the web, application and database
/// nodes of a stack lab).
pub fn targets(lab: &Lab) -> Vec<Target> {
    let mut all = Vec::new();
    for (i, b) in lab.balancers.iter().enumerate() {
        let address = if lab.spec().ha {
            balancer_client_addr(i)
        } else {
            LB_CLIENT_SIDE
        };
        all.push(Target {
            job: AGENT_JOB,
            address: format!("{address}:{LB_METRICS_PORT}"),
            host: ("balancer", b.name.clone()),
            ca: None,
        });
    }
    for i in 0..lab.webs.len() {
        let server = ("server", lab.server_name(i));
        let at = |port: u16| format!("{}:{port}", web_addr(i));
        if !lab.is_stack() {
            all.push(Target {
                job: "foobar-web",
                address: at(WEB_PORT),
                host: server,
                ca: None,
            });
            continue;
        }
        all.push(Target {
            job: "foobar-web",
            address: at(HTTP_PORT),
            host: server.clone(),
            ca: None,
        });
        // Over TLS once the lab turned web-to-app TLS on (before this started).
        let app_ca = lab
            .uses_app_tls()
            .then(|| lab.pki.as_ref().expect("a stack lab").ca_cert());
        all.push(Target {
            job: "foobar-app",
            address: at(APP_PORT),
            host: server.clone(),
            ca: app_ca,
        });
        // Lab::up starts a database node on the first two servers only.
        if i < 2 {
            all.push(Target {
                job: "foobar-db",
                address: at(DB_AGENT_PORT),
                host: server,
                ca: None,
            });
        }
    }
    all
}

/// Prometheus's configuration: scrape `targets` and evaluate `rule_files` every
/// [`INTERVAL`].
pub fn prometheus_config(targets: &[Target], rule_files: &[PathBuf]) -> String {
    let secs = INTERVAL.as_secs();
    // A scrape must end before the next starts.
    let timeout_ms = INTERVAL.as_millis() * 9 / 10;
    let mut text = format!(
        "# Written by foobar-lab (monitoring.rs) for the lab's monitoring host.\n\
         global:\n  scrape_interval: {secs}s\n  scrape_timeout: {timeout_ms}ms\n  \
         evaluation_interval: {secs}s\n\nrule_files:\n"
    );
    for file in rule_files {
        text.push_str(&format!("  - \"{}\"\n", file.display()));
    }
    text.push_str("\nscrape_configs:\n");
    // Each job once, in the order of its first target.
    let mut jobs: Vec<&str> = Vec::new();
    for t in targets {
        if !jobs.contains(&t.job) {
            jobs.push(t.job);
        }
    }
    for job in jobs {
        let of_job: Vec<&Target> = targets.iter().filter(|t| t.job == job).collect();
        text.push_str(&format!("  - job_name: \"{job}\"\n"));
        if let Some(ca) = of_job.iter().find_map(|t| t.ca.as_ref()) {
            text.push_str(&format!(
                "    scheme: https\n    tls_config:\n      ca_file: \"{}\"\n",
                ca.display()
            ));
        }
        text.push_str("    static_configs:\n");
        for t in of_job {
            let (label, name) = &t.host;
            text.push_str(&format!(
                "      - targets: [\"{}\"]\n        labels:\n          {label}: \"{name}\"\n",
                t.address
            ));
        }
    }
    text
}

/// Prometheus running on the lab's monitoring host.
pub struct Monitoring {
    /// The monitoring host's namespace.
    pub ns: Netns,
    /// Its configuration, the rule copies (`rules/`), the data (`data/`) and its log.
    pub dir: PathBuf,
    /// What it scrapes.
    pub targets: Vec<Target>,
    prometheus: Option<Child>,
    persistent: bool,
}

impl Monitoring {
    /// Plugs the monitoring host into `lab`'s networks, writes the configuration and
    /// the lab's copies of every rule file of `deploy/alerts/`, starts Prometheus and
    /// waits until it is ready. Panics with Prometheus's log if it is not.
    pub fn start(lab: &Lab) -> Monitoring {
        let spec = lab.spec();
        let name = format!("{}-mon", spec.prefix);
        let ns = if spec.persistent {
            Netns::persistent(&name)
        } else {
            Netns::new_named(&name)
        };
        for (inner, port, bridge, address) in [
            ("eth-c", "mon-c", "br-client", MONITOR_CLIENT_SIDE),
            ("eth-s", "mon-s", "br-servers", MONITOR_SERVER_SIDE),
        ] {
            // As Lab::up plugs its hosts: a veth whose switch end is a bridge port
            // that floods no frames for unknown MACs.
            lab.net.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", inner, "netns", &name,
            ]);
            lab.net.ip(&["link", "set", port, "master", bridge, "up"]);
            lab.net
                .exec("bridge", &["link", "set", "dev", port, "flood", "off"]);
            ns.ip(&["link", "set", inner, "up"]);
            ns.ip(&["addr", "add", &format!("{address}/24"), "dev", inner]);
            // Full checksums, as the lab's other hosts send.
            ns.exec("ethtool", &["-K", inner, "tx", "off"]);
        }

        let dir = lab.dir.join("monitoring");
        let rules_dir = dir.join("rules");
        std::fs::create_dir_all(&rules_dir).expect("monitoring dir");
        let copies: Vec<PathBuf> = rule_files()
            .iter()
            .map(|file| {
                let text = std::fs::read_to_string(file)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                let copy = rules_dir.join(file.file_name().expect("a file name"));
                std::fs::write(&copy, lab_rules(&text)).expect("write a rule copy");
                copy
            })
            .collect();
        let targets = targets(lab);
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, prometheus_config(&targets, &copies)).expect("prometheus.yml");

        let child = spawn_logged(
            ns.command("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg("--storage.tsdb.retention.time=1d")
                .arg(format!("--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}"))
                .arg("--web.enable-lifecycle")
                // Its relative defaults (console templates) resolve in its directory.
                .current_dir(&dir),
            &dir.join("prometheus.log"),
        );
        let mut monitoring = Monitoring {
            ns,
            dir,
            targets,
            prometheus: Some(child),
            persistent: spec.persistent,
        };
        monitoring.wait_ready();
        monitoring
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        while self.api("/-/ready").is_none() {
            if let Some(status) = self
                .prometheus
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.prometheus = None;
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "prometheus was not ready within 30 s:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Prometheus's URL from the lab's networks (the client reaches it on this
    /// address; inside the monitoring namespace it is also on 127.0.0.1).
    pub fn url(&self) -> String {
        format!("http://{MONITOR_CLIENT_SIDE}:{PROMETHEUS_PORT}")
    }

    /// The configuration file Prometheus runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("prometheus.yml")
    }

    /// The lab's copies of the rule files ([`lab_rules`]), as Prometheus loads them.
    pub fn rule_copies(&self) -> Vec<PathBuf> {
        rule_files()
            .iter()
            .map(|f| {
                self.dir
                    .join("rules")
                    .join(f.file_name().expect("a file name"))
            })
            .collect()
    }

    /// `GET <path>` (`/api/v1/alerts`) from inside the monitoring namespace: the
    /// body, or `None` unless it answered 2xx within 2 s.
    pub fn api(&self, path: &str) -> Option<String> {
        let out = self
            .ns
            .command("curl")
            .args(["-sf", "-m", "2"])
            .arg(format!("http://127.0.0.1:{PROMETHEUS_PORT}{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Prometheus's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Prometheus's process, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.prometheus.as_ref().map(|c| c.id())
    }

    /// Leaves Prometheus running and forgets it (persistent labs: `lab down` stops
    /// it by its pid).
    pub fn detach(&mut self) -> Option<u32> {
        self.prometheus.take().map(|c| c.id())
    }

    /// Stops Prometheus (SIGTERM: it closes its database cleanly).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.prometheus.take() {
            terminate(&mut child);
        }
    }
}

impl Drop for Monitoring {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        self.stop();
        // The namespace goes as its field drops, and the veths with it; the files
        // go with the lab's directory.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_copy_shortens_for_and_windows_only() {
        let shipped = "groups:\n  - name: g\n    rules:\n      - alert: A\n        \
                       expr: increase(x_total[10m]) > 4 and max_over_time(y[5m:1m]) > 0\n        \
                       for: 10m\n        annotations:\n          description: >-\n            \
                       Without [acme], for: nothing; see y[1h30m].\n      - alert: B\n        \
                       expr: up == 0\n        for: \"1h\"  # an hour\n";
        let lab = lab_rules(shipped);
        let expected = "groups:\n  - name: g\n    rules:\n      - alert: A\n        \
                        expr: increase(x_total[30s]) > 4 and max_over_time(y[5m:1m]) > 0\n        \
                        for: 2s\n        annotations:\n          description: >-\n            \
                        Without [acme], for: nothing; see y[30s].\n      - alert: B\n        \
                        expr: up == 0\n        for: 2s\n";
        assert_eq!(lab, expected);
    }

    #[test]
    fn durations_are_prometheus_ones() {
        for yes in ["10m", "1h30m", "500ms", "1d", "2w", "1y", "0s"] {
            assert!(is_duration(yes), "{yes}");
        }
        for no in ["", "m", "10", "acme", "5m:1m", "1.5m", "10 m", "10M"] {
            assert!(!is_duration(no), "{no}");
        }
    }

    #[test]
    fn the_shipped_rules_are_found() {
        let files = rule_files();
        assert!(
            files.iter().any(|f| f.ends_with("foobar-lb.yml")),
            "{files:?}"
        );
    }
}
