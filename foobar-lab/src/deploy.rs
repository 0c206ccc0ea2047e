//! A rolling deploy of a stack lab's site without a failed request: one server at a
//! time is drained at the balancer on every site VIP, its web and application nodes
//! are stopped (SIGTERM: as lame ducks they send their last clients away after a
//! complete answer) and started again from the binaries on disk (the new build),
//! checked, and given their weight back. `cargo xtask lab deploy` runs it on the
//! running lab, the stack tests on a lab of their own.

use std::{
    fmt,
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    lab::{Lab, web_addr},
    process::{bin, wait_until},
    stack::{APP_PORT, SITE_VIPS, SITE_WEIGHT},
};

/// A running stack lab, as a deploy drives it.
pub trait Site {
    /// How many servers there are.
    fn server_count(&self) -> usize;
    /// The name of server `i` (`server1`, ..).
    fn server_name(&self, i: usize) -> String;
    /// The (first) balancer's CLI with its control socket given; arguments follow.
    fn lb_cli(&self) -> Command;
    /// `program` in the (first) balancer's namespace, from which every server answers.
    fn lb_command(&self, program: &str) -> Command;
    /// Stops server `i`'s web and application nodes (SIGTERM) and waits until they
    /// exited.
    fn stop_nodes(&mut self, i: usize);
    /// Starts server `i`'s web and application nodes again, on the same configuration
    /// and the binaries on disk, and waits until they answer.
    fn start_nodes(&mut self, i: usize);
    /// Whether the application nodes serve HTTPS (web-to-app TLS); plain HTTP unless
    /// said otherwise.
    fn app_tls(&self) -> bool {
        false
    }
}

impl Site for Lab {
    fn server_count(&self) -> usize {
        self.webs.len()
    }

    fn server_name(&self, i: usize) -> String {
        Lab::server_name(self, i)
    }

    fn lb_cli(&self) -> Command {
        let mut command = Command::new(bin(&self.spec().bin_dir, "foobar-lb"));
        command.arg("--socket").arg(self.socket());
        command
    }

    fn lb_command(&self, program: &str) -> Command {
        self.lb().command(program)
    }

    fn stop_nodes(&mut self, i: usize) {
        self.stop_web(i);
        self.stop_app(i);
    }

    fn start_nodes(&mut self, i: usize) {
        // The application first: the web node proxies to it.
        self.start_app(i);
        self.start_web(i);
    }

    fn app_tls(&self) -> bool {
        self.uses_app_tls()
    }
}

/// How a deploy goes.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// How long the balancer may take to see no connection left to a drained server
    /// (`backend drain --wait --timeout`). Past it the deploy goes on with a warning:
    /// clients that keep their connections open (kept-alive ones do) are sent away by
    /// the lame-duck nodes, each after a complete answer.
    pub drain_timeout: Duration,
    /// The bound of every other wait: a CLI call, a node to answer its health check,
    /// the balancer to see it up.
    pub step_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            drain_timeout: Duration::from_secs(10),
            step_timeout: Duration::from_secs(30),
        }
    }
}

/// One step of a deploy.
#[derive(Clone, Debug)]
pub struct Step {
    /// The server it was on.
    pub server: String,
    /// What was done.
    pub what: String,
    /// How long it took.
    pub took: Duration,
    /// Whether it ended in a warning rather than as planned (a drain that timed out).
    pub warning: bool,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({:.1} s)",
            self.server,
            self.what,
            self.took.as_secs_f64()
        )
    }
}

/// Deploys every server in turn: drains it on every site VIP and waits until the
/// balancer sees no connection left (a timeout is a warning), stops its web and
/// application nodes, starts them again, waits until they answer their health checks
/// and the balancer sees them up, and gives the weight of the configuration back.
/// Prints a line per step as it ends and returns the steps; panics with what failed.
pub fn rolling_deploy(site: &mut impl Site, options: &Options) -> Vec<Step> {
    let mut steps = Vec::new();
    for i in 0..site.server_count() {
        let mut log = Log {
            server: site.server_name(i),
            steps: &mut steps,
        };
        let backends: Vec<(&str, String)> = SITE_VIPS
            .iter()
            .map(|&(vip, port, _)| (vip, format!("{}:{port}", web_addr(i))))
            .collect();

        drain(&*site, &backends, options, &mut log);

        let started = Instant::now();
        site.stop_nodes(i);
        log.step("stopped the web and application nodes", started, false);

        let started = Instant::now();
        site.start_nodes(i);
        log.step("started the web and application nodes", started, false);

        let started = Instant::now();
        let urls = wait_healthy(&*site, i, options);
        let what = format!("/healthz answers 200: {}", urls.join(" "));
        log.step(what, started, false);

        let started = Instant::now();
        wait_up(&*site, &backends, options);
        let what = format!("the balancer sees it up on {}", vip_names());
        log.step(what, started, false);

        let started = Instant::now();
        reweight(&*site, &backends, options);
        let what = format!("weight {SITE_WEIGHT} again on {}", vip_names());
        log.step(what, started, false);
    }
    steps
}

/// The steps of one server, printed as they end.
struct Log<'a> {
    server: String,
    steps: &'a mut Vec<Step>,
}

impl Log<'_> {
    fn step(&mut self, what: impl Into<String>, started: Instant, warning: bool) {
        let step = Step {
            server: self.server.clone(),
            what: what.into(),
            took: started.elapsed(),
            warning,
        };
        println!("{step}");
        self.steps.push(step);
    }
}

/// Drains `backends` (VIP, `address:port`) at the balancer and waits until it sees no
/// connection left to them; a drain that times out is a warning. Every VIP is drained
/// at once, so that their waits overlap.
fn drain(site: &impl Site, backends: &[(&str, String)], options: &Options, log: &mut Log<'_>) {
    let started = Instant::now();
    let timeout = options.drain_timeout.as_secs().max(1).to_string();
    let drains: Vec<Child> = backends
        .iter()
        .map(|(vip, backend)| {
            let args: [&str; 7] = [
                "backend",
                "drain",
                vip,
                backend,
                "--wait",
                "--timeout",
                &timeout,
            ];
            spawn_piped(site.lb_cli().args(args))
        })
        .collect();
    for ((vip, backend), child) in backends.iter().zip(drains) {
        let what = format!("foobar-lb backend drain {vip} {backend} --wait");
        let out = finish(child, options.drain_timeout + options.step_timeout, &what);
        if out.status.success() {
            let done = format!("drained {vip} {backend}: no connection left");
            log.step(done, started, false);
        } else if drained(site, vip, backend, options) {
            // Drained, with connections still open: the lame-duck nodes end them.
            let done = format!("drained {vip} {backend}, warning: {}", one_line(&out));
            log.step(done, started, true);
        } else {
            panic!("{what} failed: {}", one_line(&out));
        }
    }
}

/// Whether the balancer has `backend` drained on `vip` (a drain that timed out waiting
/// has still drained it; one refused has not).
fn drained(site: &impl Site, vip: &str, backend: &str, options: &Options) -> bool {
    let field = |name: &str| backend_field(site, vip, backend, name, options);
    field("weight").as_deref() == Some("0") || field("state").as_deref() == Some("draining")
}

/// Waits until server `i`'s web node answers 200 on `/healthz` over every site VIP's
/// protocol, and its application node too (once it reaches its database); the URLs.
fn wait_healthy(site: &impl Site, i: usize, options: &Options) -> Vec<String> {
    let address = web_addr(i);
    let mut urls: Vec<String> = SITE_VIPS
        .iter()
        .map(|&(_, port, scheme)| format!("{scheme}://{address}:{port}/healthz"))
        .collect();
    let app_scheme = if site.app_tls() { "https" } else { "http" };
    urls.push(format!("{app_scheme}://{address}:{APP_PORT}/healthz"));
    for url in &urls {
        wait_until(
            options.step_timeout,
            &format!("{url} to answer 200"),
            || {
                // -k: the certificate names the site, not the server's address.
                site.lb_command("curl")
                    .args(["-skf", "-o", "/dev/null", "-m", "1", url.as_str()])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }
    urls
}

/// Waits until the balancer sees `backends` up, by a check that passed last (one of
/// the new nodes: the old ones are gone).
fn wait_up(site: &impl Site, backends: &[(&str, String)], options: &Options) {
    for (vip, backend) in backends {
        let what = format!("the balancer to see {backend} up on {vip}");
        wait_until(options.step_timeout, &what, || {
            let field = |name: &str| backend_field(site, vip, backend, name, options);
            field("health").as_deref() == Some("up") && field("last_check").as_deref() == Some("ok")
        });
    }
}

/// Gives `backends` the weight of the configuration back.
fn reweight(site: &impl Site, backends: &[(&str, String)], options: &Options) {
    let weight = SITE_WEIGHT.to_string();
    for (vip, backend) in backends {
        let what = format!("foobar-lb backend weight {vip} {backend} {weight}");
        let args: [&str; 5] = ["backend", "weight", vip, backend, &weight];
        let out = finish(
            spawn_piped(site.lb_cli().args(args)),
            options.step_timeout,
            &what,
        );
        assert!(out.status.success(), "{what} failed: {}", one_line(&out));
    }
}

/// The site VIPs' names, for people.
fn vip_names() -> String {
    let names: Vec<&str> = SITE_VIPS.iter().map(|&(name, _, _)| name).collect();
    names.join(", ")
}

/// Spawns `command` with its output piped.
fn spawn_piped(command: &mut Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()))
}

/// Waits for `child` (whose output is small: it fits the pipes), killing it past
/// `limit`; its output.
fn finish(mut child: Child, limit: Duration, what: &str) -> Output {
    let started = Instant::now();
    while child.try_wait().expect("wait for a child").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {limit:?}");
        }
        sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("read a child's output")
}

/// A command's stderr and stdout on one line.
fn one_line(out: &Output) -> String {
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Field `field` of `backend` on `vip` in `foobar-lb -o json backend list <vip>`, as
/// text (`"weight"` → `0`, `"health"` → `up`); `None` if the CLI or the backend is not
/// there. foobar-lab has no JSON parser: the backend is the object around its address,
/// and its own fields are the only ones of that name in it.
fn backend_field(
    site: &impl Site,
    vip: &str,
    backend: &str,
    field: &str,
    options: &Options,
) -> Option<String> {
    let what = format!("foobar-lb -o json backend list {vip}");
    let args: [&str; 5] = ["-o", "json", "backend", "list", vip];
    let out = finish(
        spawn_piped(site.lb_cli().args(args)),
        options.step_timeout,
        &what,
    );
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let address = text.find(&format!("\"{backend}\""))?;
    let object = object_at(&text, text[..address].rfind('{')?);
    let key = format!("\"{field}\":");
    let value = &object[object.find(&key)? + key.len()..];
    let end = value.find([',', '}', '\n']).unwrap_or(value.len());
    Some(value[..end].trim().trim_matches('"').to_owned())
}

/// The JSON object that opens at `text[start]`, to its closing brace (braces in
/// strings skipped).
fn object_at(text: &str, start: usize) -> &str {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in text[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return &text[start..start + i + 1];
                }
            }
            _ => {}
        }
    }
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_ends_at_its_own_brace() {
        let text = r#"[{"address": "10.1.0.11:80", "last_check": "a } in {", "traffic": {"packets": 1}, "weight": 0}, {"address": "10.1.0.12:80"}]"#;
        let start = text.find('{').unwrap();
        let object = object_at(text, start);
        assert!(object.ends_with("\"weight\": 0}"), "{object}");
    }
}
