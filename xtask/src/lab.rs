//! `cargo xtask lab up|down|status|deploy` and `cargo xtask demo`.

use std::{
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use foobar_lab::{
    bgp::{self, BGP_VIP, BgpLab, BgpSpec, OUTSIDE_CLIENT},
    deploy::{self, Site},
    lab::{
        self, ADVERT_INTERVAL_MS, LB_CLIENT_IF, LB_SERVER_IF, Lab, LabSpec, VIP, VIP_PORT,
        wait_until, web_addr,
    },
    monitoring::{self, Monitoring},
    process::{bin, spawn_logged},
    stack::{self, APP_PORT, DNS_ADDR, HTTP_PORT, SITE},
};

/// Namespace prefix of the persistent lab.
const PREFIX: &str = "fblb-lab";

fn spec(persistent: bool, ha: bool, stack: bool) -> LabSpec {
    LabSpec {
        prefix: PREFIX.into(),
        webs: 2,
        persistent,
        bin_dir: PathBuf::from("target/debug"),
        ha,
        stack,
        router: false,
    }
}

/// The lab's directory: configuration, sockets, logs.
fn lab_dir() -> PathBuf {
    std::env::temp_dir().join(PREFIX)
}

fn pids_file() -> PathBuf {
    lab_dir().join("pids")
}

fn is_up() -> bool {
    std::path::Path::new(&format!("/run/netns/{PREFIX}-net")).exists()
}

/// The balancers of the running lab, by their directories (`lb`, or `lb1`.. in an HA
/// or BGP lab).
fn balancer_names() -> Vec<String> {
    std::iter::once("lb".to_owned())
        .chain((1..=8).map(|i| format!("lb{i}")))
        .filter(|name| socket(name).exists())
        .collect()
}

fn socket(balancer: &str) -> PathBuf {
    lab_dir().join(balancer).join("control.sock")
}

fn cli_line(balancer: &str) -> String {
    format!(
        "sudo target/debug/foobar-lb --socket {}",
        socket(balancer).display()
    )
}

/// Builds the lab and leaves it running.
pub fn up(ha: bool, stack: bool) -> Result<()> {
    if is_up() {
        bail!("the lab is already up; `cargo xtask lab down` first");
    }
    if ha && stack {
        bail!("--ha and --stack do not go together yet: choose one");
    }
    let mut lab = Lab::up(spec(true, ha, stack));
    if ha {
        for (i, priority) in [150, 100].into_iter().enumerate() {
            let b = &mut lab.balancers[i];
            // lab::ha_config, with the metrics listener where the monitoring host
            // reaches it.
            b.write_config(
                &(lab::default_config(2, "maglev")
                    + &monitoring::metrics_section()
                    + &lab::vrrp_section(priority, true)),
            );
            b.start_agent();
        }
        wait_until(Duration::from_secs(10), "lb1 to become MASTER", || {
            lab.balancers[0].holds_vip()
        });
    } else {
        if !stack {
            // The default config, with metrics for the monitoring host (the stack's
            // balancer has its own).
            lab.write_config(&(lab::default_config(2, "rr") + &monitoring::metrics_section()));
        }
        lab.start_agent();
    }
    // Prometheus on the monitoring host, scraping every agent and node, with the
    // alert rules of deploy/alerts/.
    let mut prometheus = Monitoring::start(&lab);
    let prometheus_url = prometheus.url();
    let agent_pids: Vec<u32> = lab.balancers.iter().filter_map(|b| b.agent_pid()).collect();
    let mut pids = lab.detach_processes();
    pids.extend(prometheus.detach());
    std::fs::write(
        pids_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    let first = if ha { "lb1" } else { "lb" };
    if stack {
        lab.wait_for_backends_up();
        println!(
            "lab up: the foobar.com stack: client {PREFIX}-client 10.0.0.2 (DNS {DNS_ADDR}) → \
             {SITE} = VIP {VIP}:80 and :443 on {PREFIX}-lb → server1 {}, server2 {} (foobar-web :80 :443, \
             foobar-app :8000, foobar-db: MariaDB primary on server1, replica on server2, through the write VIP {} and read VIP {}:3306)\n",
            web_addr(0),
            web_addr(1),
            stack::db_write_vip(),
            stack::db_read_vip(),
        );
        print_prometheus(&prometheus_url);
        println!("try:");
        println!(
            "  sudo ip netns exec {PREFIX}-client curl --cacert {} https://{SITE}/api/posts",
            lab.pki.as_ref().expect("stack").ca_cert().display()
        );
        println!("  {} status", cli_line(first));
        print_prometheus_try(&prometheus_url);
        println!("  cargo xtask lab deploy   # rolling restart of the web and application nodes");
        println!("  cargo xtask lab down");
        return Ok(());
    }
    if ha {
        println!(
            "lab up: client {PREFIX}-client 10.0.0.2 → VIP {VIP}:{VIP_PORT} on the VRRP master of \
             {PREFIX}-lb1 (priority 150) and {PREFIX}-lb2 (100), adverts every \
             {ADVERT_INTERVAL_MS} ms → web1 {}:8080, web2 {}:8080, maglev\n",
            web_addr(0),
            web_addr(1)
        );
    } else {
        println!(
            "lab up: client {PREFIX}-client 10.0.0.2 → VIP {VIP}:{VIP_PORT} on {PREFIX}-lb \
             ({LB_CLIENT_IF}, {LB_SERVER_IF}) → web1 {}:8080, web2 {}:8080, round robin\n",
            web_addr(0),
            web_addr(1)
        );
    }
    print_prometheus(&prometheus_url);
    println!("try:");
    println!("  sudo ip netns exec {PREFIX}-client curl -s http://{VIP}/");
    println!("  {} status", cli_line(first));
    print_prometheus_try(&prometheus_url);
    println!(
        "  {} backend drain www {}:8080",
        cli_line(first),
        web_addr(0)
    );
    if ha {
        println!(
            "  sudo kill -9 {}        # crash lb1's agent: lb2 takes the VIP over",
            agent_pids[0]
        );
        println!("  {} status", cli_line("lb2"));
    }
    println!("  cargo xtask lab down");
    Ok(())
}

/// How many requests `lab up --bgp` makes to show the spread.
const BGP_DEMO_REQUESTS: usize = 30;

/// Builds the BGP lab (`foobar_lab::bgp`) and leaves it running: `balancers`
/// balancers announce the VIP to a router that spreads flows over them by ECMP.
/// Shows the router's route, then which balancer carried each of a few requests.
pub fn up_bgp(balancers: usize) -> Result<()> {
    if balancers < 3 {
        bail!(
            "the BGP lab has 3 balancers or more (asked for {balancers}): ECMP over fewer \
             shows little; try `cargo xtask lab up --bgp --balancers 3`"
        );
    }
    if balancers > 8 {
        bail!("the BGP lab has at most 8 balancers (asked for {balancers})");
    }
    if is_up() {
        bail!("the lab is already up; `cargo xtask lab down` first");
    }
    let mut lab = BgpLab::up(BgpSpec {
        prefix: PREFIX.into(),
        balancers,
        webs: 2,
        persistent: true,
        bin_dir: PathBuf::from("target/debug"),
    });
    let agent_pids: Vec<u32> = lab.balancers.iter().filter_map(|b| b.agent_pid()).collect();
    // Written at once, so that `lab down` stops them whatever happens next.
    let pids = lab.detach_processes();
    std::fs::write(
        pids_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    let names: Vec<&str> = lab.balancers.iter().map(|b| b.name.as_str()).collect();
    println!(
        "lab up: client {PREFIX}-client {OUTSIDE_CLIENT} → router {PREFIX}-router (BIRD, AS {}) → \
         VIP {BGP_VIP}:80 announced over BGP with BFD ({} ms × {}) by {} (AS {}), spread by ECMP \
         (L4 hash) → DSR (IPIP), Maglev → web1 {}:80, web2 {}:80 (foobar-lb decap), answering \
         the client through the router\n",
        bgp::ROUTER_AS,
        bgp::BFD_INTERVAL_MS,
        bgp::BFD_MULTIPLIER,
        names.join(", "),
        bgp::BALANCER_AS,
        web_addr(0),
        web_addr(1),
    );
    println!(
        "== the router's route to the VIP:\n{}\n",
        lab.router
            .ip(&["route", "show", &BGP_VIP.to_string()])
            .trim_end()
    );
    println!(
        "== its BGP sessions:\n{}\n",
        lab.router_bird("show protocols").trim_end()
    );

    println!(
        "== {BGP_DEMO_REQUESTS} requests, each on a new connection: the balancer the router \
         chose (from the balancers' counters)"
    );
    let url = format!("http://{BGP_VIP}/");
    let mut carried = vec![0usize; balancers];
    for i in 1..=BGP_DEMO_REQUESTS {
        let before = vip_packets(&lab)?;
        let out = lab
            .client
            .command("curl")
            .args(["-s", "-m", "2", &url])
            .output()?;
        if !out.status.success() {
            bail!("request {i} through the VIP failed");
        }
        let server = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // The connection's last packets (the client's FIN and ACK) are counted too
        // before the next one starts.
        sleep(Duration::from_millis(20));
        let after = vip_packets(&lab)?;
        let by: Vec<usize> = (0..balancers).filter(|&b| after[b] > before[b]).collect();
        for &b in &by {
            carried[b] += 1;
        }
        let by: Vec<&str> = by.iter().map(|&b| names[b]).collect();
        let by = if by.is_empty() {
            "?".to_owned()
        } else {
            by.join(", ")
        };
        println!("  request {i:2}: answered by {server} through {by}");
    }
    let spread: Vec<String> = names
        .iter()
        .zip(&carried)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("  per balancer: {}\n", spread.join(", "));

    println!("try:");
    println!("  sudo ip netns exec {PREFIX}-client curl -s {url}");
    println!("  sudo ip netns exec {PREFIX}-router ip route show {BGP_VIP}");
    println!(
        "  sudo birdc -s {} show protocols",
        lab.router_socket().display()
    );
    println!("  {} status", cli_line(names[0]));
    if let Some(pid) = agent_pids.first() {
        println!(
            "  sudo kill -9 {pid}        # crash lb1's agent: its BIRD goes with it, and the \
             router routes around lb1"
        );
    }
    println!("  cargo xtask lab status");
    println!("  cargo xtask lab down");
    Ok(())
}

/// The packets each balancer's VIP has forwarded so far.
fn vip_packets(lab: &BgpLab) -> Result<Vec<u64>> {
    lab.balancers
        .iter()
        .map(|b| {
            let out = b.cli(&["-o", "json", "status"]);
            if !out.status.success() {
                bail!(
                    "{}'s agent does not answer: {}",
                    b.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("{}'s status", b.name))?;
            Ok(status["vips"][0]["traffic"]["packets"]
                .as_u64()
                .unwrap_or(0))
        })
        .collect()
}

/// Where the lab's Prometheus is (`url`, on the monitoring host).
fn print_prometheus(url: &str) {
    println!(
        "prometheus: {url} on {PREFIX}-mon ({}, {}), scraping every agent and node each second, \
         with the alert rules of deploy/alerts/ (their `for:` shortened to seconds)\n",
        monitoring::MONITOR_CLIENT_SIDE,
        monitoring::MONITOR_SERVER_SIDE
    );
}

/// The lab's Prometheus in the `try:` list.
fn print_prometheus_try(url: &str) {
    println!("  sudo ip netns exec {PREFIX}-client curl -s {url}/api/v1/alerts    # active alerts");
    println!(
        "  sudo ip netns exec {PREFIX}-client curl -s {url}/api/v1/targets   # every target's health"
    );
}

/// Stops every lab process and removes the namespaces and pins.
pub fn down() -> Result<()> {
    if let Ok(pids) = std::fs::read_to_string(pids_file()) {
        let pids: Vec<u32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
        for pid in &pids {
            // SAFETY: signalling a pid we started; a stale one is at worst ESRCH.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        }
        // A BGP balancer withdraws its routes and waits before it stops.
        let started = Instant::now();
        while pids.iter().any(|p| running(*p)) && started.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(50));
        }
    }
    // Whatever still runs in the lab's namespaces (a BGP agent's BIRD, a process of a
    // lab whose `up` failed half-way) goes with them.
    kill_namespace_processes(&format!("{PREFIX}-"));
    let gone = lab::delete_namespaces(&format!("{PREFIX}-"));
    // Every balancer's pins: `/sys/fs/bpf/fblb-lab-<balancer>`.
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{PREFIX}-"))
            {
                lab::remove_pins(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(PREFIX));
    let _ = std::fs::remove_dir_all(lab::resolv_dir(&format!("{PREFIX}-client")));
    println!("lab down: removed {} namespaces", gone.len());
    Ok(())
}

/// SIGKILLs every process left in the namespaces whose names start with `prefix`.
fn kill_namespace_processes(prefix: &str) {
    let Ok(list) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if !name.starts_with(prefix) {
            continue;
        }
        let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() else {
            continue;
        };
        for pid in String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: a process inside one of the lab's own namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Shows what runs.
pub fn status() -> Result<()> {
    if !is_up() {
        println!("the lab is down (`cargo xtask lab up`)");
        return Ok(());
    }
    if bgp::is_bgp_lab_dir(&lab_dir()) {
        let route = Command::new("ip")
            .args(["-n", &format!("{PREFIX}-router"), "route", "show"])
            .arg(BGP_VIP.to_string())
            .output()?;
        println!(
            "== the router's route to the VIP\n{}",
            String::from_utf8_lossy(&route.stdout).trim_end()
        );
        let protocols = Command::new("birdc")
            .arg("-s")
            .arg(lab_dir().join("router-bird.ctl"))
            .args(["show", "protocols"])
            .output()?;
        println!(
            "== the router's BGP sessions\n{}",
            String::from_utf8_lossy(&protocols.stdout).trim_end()
        );
    }
    for name in balancer_names() {
        println!("== {name}");
        let status = Command::new("target/debug/foobar-lb")
            .arg("--socket")
            .arg(socket(&name))
            .arg("status")
            .status()?;
        if !status.success() {
            println!("(the agent of {name} does not answer)");
        }
    }
    Ok(())
}

/// Fails unless the stack lab is up (`cargo xtask lab up --stack`).
pub fn require_stack() -> Result<()> {
    if !is_up() {
        bail!("the lab is down: `cargo xtask lab up --stack` first");
    }
    if !Path::new(&format!("/run/netns/{PREFIX}-dns")).exists() || !socket("lb").exists() {
        bail!(
            "the running lab is not the stack: `cargo xtask lab down`, then `cargo xtask lab up --stack`"
        );
    }
    Ok(())
}

/// A rolling deploy of the running stack lab's site (`cargo xtask lab deploy`): the
/// web and application nodes of server1, then server2, drained at the balancer,
/// stopped, started again from the binaries just built, checked and put back.
pub fn deploy(drain_timeout: Duration) -> Result<()> {
    require_stack()?;
    let mut site = Running::open()?;
    println!(
        "== rolling deploy of {SITE}: one server at a time, drained at the balancer \
         (waiting up to {} s for its connections to end), its nodes stopped and started again",
        drain_timeout.as_secs()
    );
    let started = Instant::now();
    let options = deploy::Options {
        drain_timeout,
        ..Default::default()
    };
    let steps = deploy::rolling_deploy(&mut site, &options);
    let warnings = steps.iter().filter(|s| s.warning).count();
    println!(
        "deployed in {:.1} s, {warnings} warning(s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The running persistent stack lab, as a deploy drives it. Its processes belong to
/// the `lab up` that started them, long gone: the nodes are found among the pids
/// file's by the configuration file on their command line, stopped by signal, started
/// again as the lab starts them, and the pids file follows (for `lab down`).
struct Running {
    pids: Vec<u32>,
    bin_dir: PathBuf,
}

/// How long a node gets to stop after SIGTERM before SIGKILL: its lame duck and its
/// grace time (5 s each by default), and some.
const STOP_LIMIT: Duration = Duration::from_secs(15);

impl Running {
    fn open() -> Result<Running> {
        let pids = std::fs::read_to_string(pids_file())
            .with_context(|| format!("reading {}", pids_file().display()))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        Ok(Running {
            pids,
            bin_dir: spec(true, false, true).bin_dir,
        })
    }

    /// The configuration file of server `i`'s `service` node (`web`, `app`).
    fn config(&self, i: usize, service: &str) -> PathBuf {
        stack::server_dir(&lab_dir(), &self.server_name(i)).join(format!("{service}.toml"))
    }

    /// The process of server `i`'s `service` node, if it runs.
    fn pid_of(&self, i: usize, service: &str) -> Option<u32> {
        let config = self.config(i, service);
        self.pids.iter().copied().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|line| {
                line.split(|b| *b == 0)
                    .any(|arg| arg == config.as_os_str().as_bytes())
            })
        })
    }

    fn save(&self) {
        let text: String = self.pids.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(pids_file(), text).expect("write the pids file");
    }
}

/// Whether process `pid` still runs (a zombie, exited but not yet reaped by whoever
/// adopted it, does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Sends `signal` to `pid` and waits up to `limit` for it to end; whether it did.
fn signal_and_wait(pid: u32, signal: i32, limit: Duration) -> bool {
    // SAFETY: signalling a lab process found in the pids file by its command line.
    unsafe { libc::kill(pid as i32, signal) };
    let started = Instant::now();
    while running(pid) {
        if started.elapsed() > limit {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
    true
}

/// `program` in the lab's namespace `ns`, as `Netns::command` runs it (the host's
/// mounts kept).
fn in_ns(ns: &str, program: &str) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    command
}

impl Site for Running {
    fn server_count(&self) -> usize {
        2
    }

    fn server_name(&self, i: usize) -> String {
        spec(true, false, true).server_name(i)
    }

    fn lb_cli(&self) -> Command {
        let mut command = Command::new(bin(&self.bin_dir, "foobar-lb"));
        command.arg("--socket").arg(socket("lb"));
        command
    }

    fn lb_command(&self, program: &str) -> Command {
        in_ns(&format!("{PREFIX}-lb"), program)
    }

    fn stop_nodes(&mut self, i: usize) {
        for service in ["web", "app"] {
            let Some(pid) = self.pid_of(i, service) else {
                println!("  ({} has no {service} node running)", self.server_name(i));
                continue;
            };
            if !signal_and_wait(pid, libc::SIGTERM, STOP_LIMIT) {
                println!(
                    "  ({service} node {pid} still runs {STOP_LIMIT:?} after SIGTERM: killing it)"
                );
                assert!(
                    signal_and_wait(pid, libc::SIGKILL, Duration::from_secs(5)),
                    "{service} node {pid} survives SIGKILL"
                );
            }
            self.pids.retain(|p| *p != pid);
            self.save();
        }
    }

    fn start_nodes(&mut self, i: usize) {
        let name = self.server_name(i);
        let dir = stack::server_dir(&lab_dir(), &name);
        // The application first (the web node proxies to it); each waited for until
        // it answers at all (the application says 503 until it reaches its database).
        for (service, port) in [("app", APP_PORT), ("web", HTTP_PORT)] {
            let program = bin(&self.bin_dir, &format!("foobar-{service}"));
            // Left running past this process, as `lab up` leaves them: the pids file
            // keeps them for `lab down`.
            let pid = spawn_logged(
                in_ns(&format!("{PREFIX}-{name}"), &program)
                    .arg("--config")
                    .arg(self.config(i, service)),
                &dir.join(format!("{service}.log")),
            )
            .id();
            self.pids.push(pid);
            self.save();
            let url = format!("http://{}:{port}/healthz", web_addr(i));
            wait_until(
                Duration::from_secs(20),
                &format!("{name}'s new {service} node to answer"),
                || {
                    self.lb_command("curl")
                        .args(["-s", "-o", "/dev/null", "-m", "1", &url])
                        .output()
                        .is_ok_and(|o| o.status.success())
                },
            );
        }
    }
}

/// The README's first command: the seed's whole flow through the balancer.
pub fn demo() -> Result<()> {
    if is_up() {
        down()?;
    }
    println!(
        "== building the foobar.com lab: client, DNS, balancer (XDP on veth), server1 and server2 \
         (foobar-web, foobar-app, foobar-db: a MariaDB primary and its replica)"
    );
    let mut lab = Lab::up(spec(false, false, true));
    lab.start_agent();
    lab.wait_for_backends_up();
    println!("{}\n", lab.cli_ok(&["status"]));

    let site = format!("https://{SITE}");
    println!("== the client resolves {SITE} through the lab's DNS ({DNS_ADDR}):");
    let resolved = stack::resolving_command(&lab.client, "getent")
        .args(["hosts", SITE])
        .output()?;
    println!("  {}", String::from_utf8_lossy(&resolved.stdout).trim());

    println!("\n== GET {site}/ over HTTPS through the VIP:");
    let page = ok(lab.site_curl(&[
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version} %{size_download} bytes",
        &format!("{site}/"),
    ]))?;
    println!("  {page}");

    println!("\n== POST {site}/api/posts, then read it back:");
    let posted = ok(lab.site_curl(&[
        "-f",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"author\":\"demo\",\"text\":\"Hello from the foobar.com lab\"}",
        &format!("{site}/api/posts"),
    ]))?;
    println!("  created: {posted}");
    let listed = ok(lab.site_curl(&["-f", &format!("{site}/api/posts?limit=1")]))?;
    println!("  newest:  {listed}");

    println!("\n== 6 requests, each on a new connection (round robin over the servers):");
    requests(&lab, &site, 6)?;

    let server1 = format!("{}", web_addr(0));
    println!("\n== draining server1 on both VIPs (open connections keep it, new ones do not):");
    for (vip, port) in [("www", 80), ("www-tls", 443)] {
        println!(
            "  {}",
            lab.cli_ok(&["backend", "drain", vip, &format!("{server1}:{port}")])
                .trim()
        );
    }
    requests(&lab, &site, 4)?;
    println!("\n== server1 back in:");
    for (vip, port) in [("www", 80), ("www-tls", 443)] {
        lab.cli_ok(&["backend", "weight", vip, &format!("{server1}:{port}"), "1"]);
    }
    requests(&lab, &site, 2)?;

    println!("\n{}", lab.cli_ok(&["status"]));
    println!("== removing the lab");
    drop(lab);
    println!("done. `cargo xtask lab up --stack` keeps one running to play with.");
    Ok(())
}

fn ok(out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn requests(lab: &Lab, site: &str, n: usize) -> Result<()> {
    for i in 1..=n {
        match lab.served_by(&format!("{site}/")) {
            Some(server) => println!("  request {i}: answered by {server}"),
            None => bail!(
                "request {i} through the VIP failed; agent log:\n{}",
                lab.agent_log()
            ),
        }
    }
    Ok(())
}
