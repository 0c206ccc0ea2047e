//! The seed topology in network namespaces, with a switch namespace (`net`) holding a
//! bridge per network:
//!
//! ```text
//!  client 10.0.0.2 ─ br-client ─ eth-client 10.0.0.1 [lb] eth-servers 10.1.0.1 ─ br-servers ─┬─ web1 10.1.0.11
//!                                 + VIP 10.0.0.100                                           └─ web2 10.1.0.12
//! ```
//! The web servers' default route is the balancer, so replies pass through it (NAT
//! mode, as LVS-NAT). An HA lab has two balancers, `lb1` (10.0.0.3, 10.1.0.3) and `lb2`
//! (10.0.0.4, 10.1.0.4), on the same bridges; the VRRP master holds the VIP and the
//! web servers' gateway 10.1.0.1. Each agent runs in its balancer's namespace but with
//! the host's mounts, so its pins live on the host's bpffs in a directory of its own.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::netns::{Netns, run, unique_name};

/// The VIP clients connect to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The VIP's port.
pub const VIP_PORT: u16 = 80;
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The balancer on the client network.
pub const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The balancer on the server network: the web servers' gateway.
pub const LB_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The port the web servers listen on.
pub const WEB_PORT: u16 = 8080;
/// The balancer's client-side interface.
pub const LB_CLIENT_IF: &str = "eth-client";
/// The balancer's server-side interface.
pub const LB_SERVER_IF: &str = "eth-servers";

/// The address of web server `i` (0-based).
pub fn web_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 11 + i as u8)
}

/// The name web server `i` answers with.
pub fn web_name(i: usize) -> String {
    format!("web{}", i + 1)
}

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Prefix of every namespace name; unique per test unless `persistent`.
    pub prefix: String,
    /// Number of web servers.
    pub webs: usize,
    /// Leave everything running when the [`Lab`] drops (`cargo xtask lab up`).
    pub persistent: bool,
    /// Where the `foobar-lb` and `foobar-web` binaries are.
    pub bin_dir: PathBuf,
    /// Two balancers (`lb1`, `lb2`) sharing the client and server networks, for VRRP.
    pub ha: bool,
}

impl LabSpec {
    /// A throwaway lab for a test: unique names, removed on drop.
    pub fn for_test(tag: &str, webs: usize) -> Self {
        Self {
            prefix: unique_name(tag),
            webs,
            persistent: false,
            bin_dir: bin_dir_of_this_test(),
            ha: false,
        }
    }

    /// The same with two balancers.
    pub fn ha_for_test(tag: &str, webs: usize) -> Self {
        Self {
            ha: true,
            ..Self::for_test(tag, webs)
        }
    }
}

/// `target/<profile>`, from a test binary in `target/<profile>/deps`.
pub fn bin_dir_of_this_test() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    if deps.ends_with("deps") {
        deps.parent().expect("profile dir").to_owned()
    } else {
        deps.to_owned()
    }
}

/// The config the lab starts the agent with: VIP :80 → every web server.
pub fn default_config(webs: usize, scheduler: &str) -> String {
    let all: Vec<(usize, u32)> = (0..webs).map(|i| (i, 1)).collect();
    config(scheduler, &all)
}

/// An HA balancer's config: VIP `www` by Maglev over every web server (so a flow
/// keeps its server when the VIP moves), and the `[vrrp]` section.
pub fn ha_config(webs: usize, priority: u8, preempt: bool) -> String {
    default_config(webs, "maglev") + METRICS + &vrrp_section(priority, preempt)
}

/// The metrics listener of HA balancers (each in its own namespace).
pub const METRICS: &str = "\n[metrics]\nlisten = \"127.0.0.1:9100\"\n";

/// A config for VIP `www` (the lab's VIP, port 80) with `scheduler` over the given
/// (web server index, weight) pairs.
pub fn config(scheduler: &str, backends: &[(usize, u32)]) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|&(i, weight)| {
            format!(
                "  {{ address = \"{}\", port = {WEB_PORT}, weight = {weight} }},",
                web_addr(i)
            )
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = [\"{LB_CLIENT_IF}\", \"{LB_SERVER_IF}\"]\nxdp_mode = \"native\"\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\nscheduler = \"{scheduler}\"\n\
         backends = [\n{}\n]\n",
        backends.join("\n")
    )
}

/// The balancers' shared router id in HA labs.
pub const VRID: u8 = 51;
/// The advertisement interval of HA labs, in ms.
pub const ADVERT_INTERVAL_MS: u32 = 100;

/// Balancer `i`'s own address on the client network in an HA lab.
pub fn balancer_client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 3 + i as u8)
}

/// Balancer `i`'s own address on the server network in an HA lab.
pub fn balancer_server_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 3 + i as u8)
}

/// The `[vrrp]` section of an HA balancer: it moves the VIP and the web servers'
/// gateway (LB_SERVER_SIDE), advertising every [`ADVERT_INTERVAL_MS`].
pub fn vrrp_section(priority: u8, preempt: bool) -> String {
    format!(
        "\n[vrrp]\ninterface = \"{LB_CLIENT_IF}\"\nvrid = {VRID}\npriority = {priority}\n\
         advert_interval_ms = {ADVERT_INTERVAL_MS}\npreempt = {preempt}\nvips = [\"{VIP}\"]\n\
         virtual_addresses = [{{ interface = \"{LB_SERVER_IF}\", address = \"{LB_SERVER_SIDE}/24\" }}]\n"
    )
}

/// keepalived's configuration for the same virtual router as [`vrrp_section`].
pub fn keepalived_config(priority: u8, preempt: bool) -> String {
    let interval = f64::from(ADVERT_INTERVAL_MS) / 1000.0;
    let nopreempt = if preempt { "" } else { "  nopreempt\n" };
    format!(
        "global_defs {{\n  vrrp_version 3\n  enable_script_security\n}}\n\
         vrrp_instance foobar {{\n  state BACKUP\n  interface {LB_CLIENT_IF}\n\
         virtual_router_id {VRID}\n  priority {priority}\n  advert_int {interval}\n{nopreempt}\
         virtual_ipaddress {{\n    {VIP}/32 dev {LB_CLIENT_IF}\n    {LB_SERVER_SIDE}/24 dev {LB_SERVER_IF}\n  }}\n}}\n"
    )
}

/// One balancer of a lab: its namespace, its agent and (optionally) a keepalived.
pub struct Balancer {
    /// Its namespace.
    pub ns: Netns,
    /// `lb`, or `lb1` and `lb2` in an HA lab.
    pub name: String,
    /// The agent's pin directory.
    pub pin_dir: PathBuf,
    /// The agent's `RUST_LOG`.
    pub log_filter: String,
    dir: PathBuf,
    bin_dir: PathBuf,
    agent: Option<Child>,
    keepalived: Option<Child>,
}

impl Balancer {
    fn new(ns: Netns, name: &str, lab_dir: &Path, prefix: &str, bin_dir: &Path) -> Balancer {
        let dir = lab_dir.join(name);
        std::fs::create_dir_all(&dir).expect("balancer dir");
        Balancer {
            ns,
            name: name.into(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}-{name}")),
            log_filter: "info".into(),
            dir,
            bin_dir: bin_dir.to_owned(),
            agent: None,
            keepalived: None,
        }
    }

    /// The agent's control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The agent's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("foobar-lb.toml")
    }

    /// Writes the agent's configuration file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent on the written configuration and waits until its control
    /// socket answers. Panics with its log if it exits instead.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        let child = spawn_logged(
            self.ns
                .command(&bin(&self.bin_dir, "foobar-lb"))
                .arg("--socket")
                .arg(self.socket())
                .arg("run")
                .arg("--config")
                .arg(self.config_path())
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .env("RUST_LOG", &self.log_filter),
            &self.dir.join("agent.log"),
        );
        self.agent = Some(child);
        let started = Instant::now();
        loop {
            if self.cli(&["status"]).status.success() {
                return;
            }
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.agent = None;
                panic!("the agent exited ({status}):\n{}", self.agent_log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the agent did not answer within 20 s:\n{}",
                self.agent_log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM and waits for it; returns its exit status.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut child = self.agent.take().expect("the agent is running");
        terminate(&mut child)
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill_agent(&mut self) {
        let mut child = self.agent.take().expect("the agent is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The agent process, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// Runs the CLI against this balancer's agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin(&self.bin_dir, "foobar-lb"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run foobar-lb")
    }

    /// Runs the CLI and returns its stdout, panicking with stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "foobar-lb {args:?} on {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts Debian's keepalived (VRRP only) with `config` in this namespace.
    pub fn start_keepalived(&mut self, config: &str) {
        assert!(self.keepalived.is_none(), "keepalived is already running");
        let conf = self.dir.join("keepalived.conf");
        std::fs::write(&conf, config).expect("keepalived.conf");
        // keepalived comes with `cargo xtask setup`.
        let child = spawn_logged(
            self.ns
                .command("keepalived")
                .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
                .arg("--use-file")
                .arg(&conf)
                .arg("--pid")
                .arg(self.dir.join("keepalived.pid"))
                .arg("--vrrp_pid")
                .arg(self.dir.join("keepalived-vrrp.pid")),
            &self.dir.join("keepalived.log"),
        );
        self.keepalived = Some(child);
    }

    /// Stops keepalived gracefully (it sends priority 0 and drops its addresses).
    pub fn stop_keepalived(&mut self) {
        if let Some(mut child) = self.keepalived.take() {
            terminate(&mut child);
        }
    }

    /// keepalived's log so far.
    pub fn keepalived_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keepalived.log")).unwrap_or_default()
    }

    /// Whether the VIP is on this balancer's client-side interface (it is MASTER).
    pub fn holds_vip(&self) -> bool {
        self.ns
            .ip(&["-4", "addr", "show", "dev", LB_CLIENT_IF])
            .contains(&format!("{VIP}/32"))
    }

    fn stop_all(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            terminate(&mut agent);
        }
        self.stop_keepalived();
        remove_pins(&self.pin_dir);
    }
}

/// A running lab.
pub struct Lab {
    /// The client.
    pub client: Netns,
    /// The switch: a bridge for the client network and one for the server network.
    pub net: Netns,
    /// The balancers: one, or two in an HA lab.
    pub balancers: Vec<Balancer>,
    /// The web servers.
    pub webs: Vec<Netns>,
    /// Configuration, sockets and logs.
    pub dir: PathBuf,
    spec: LabSpec,
    web_servers: Vec<Option<Child>>,
}

impl Lab {
    /// Builds the namespaces, links and addresses, and starts the web servers (not
    /// the agents).
    pub fn up(spec: LabSpec) -> Lab {
        let p = &spec.prefix;
        let dir = std::env::temp_dir().join(p);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let net = make_ns(&format!("{p}-net"), spec.persistent);
        let client = make_ns(&format!("{p}-client"), spec.persistent);
        let names: Vec<String> = if spec.ha {
            vec!["lb1".into(), "lb2".into()]
        } else {
            vec!["lb".into()]
        };
        let balancers: Vec<Balancer> = names
            .iter()
            .map(|name| {
                let ns = make_ns(&format!("{p}-{name}"), spec.persistent);
                Balancer::new(ns, name, &dir, p, &spec.bin_dir)
            })
            .collect();
        let webs: Vec<Netns> = (0..spec.webs)
            .map(|i| make_ns(&format!("{p}-{}", web_name(i)), spec.persistent))
            .collect();

        for bridge in ["br-client", "br-servers"] {
            net.ip(&["link", "add", bridge, "type", "bridge"]);
            net.ip(&["link", "set", bridge, "up"]);
        }
        // Plugs interface `inner` of `ns` into `bridge` through port `port`.
        let plug = |ns: &Netns, inner: &str, port: &str, bridge: &str| {
            net.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                inner,
                "netns",
                ns.name(),
            ]);
            net.ip(&["link", "set", port, "master", bridge, "up"]);
            // As a switch that knows its hosts: no flooding of frames for unknown
            // MACs, so a dead balancer's traffic is not handed to its peer's XDP,
            // which (like a NIC in promiscuous mode) would take frames for any MAC.
            net.exec("bridge", &["link", "set", "dev", port, "flood", "off"]);
            // Frames an XDP program redirects into a veth are only taken by a peer with
            // GRO on (or an XDP program of its own).
            net.exec("ethtool", &["-K", port, "gro", "on"]);
            ns.ip(&["link", "set", inner, "up"]);
        };

        plug(&client, "eth0", "client", "br-client");
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        for (i, b) in balancers.iter().enumerate() {
            plug(&b.ns, LB_CLIENT_IF, &format!("{}-c", b.name), "br-client");
            plug(&b.ns, LB_SERVER_IF, &format!("{}-s", b.name), "br-servers");
            let (client_side, server_side) = if spec.ha {
                (balancer_client_addr(i), balancer_server_addr(i))
            } else {
                (LB_CLIENT_SIDE, LB_SERVER_SIDE)
            };
            b.ns.ip(&[
                "addr",
                "add",
                &format!("{client_side}/24"),
                "dev",
                LB_CLIENT_IF,
            ]);
            b.ns.ip(&[
                "addr",
                "add",
                &format!("{server_side}/24"),
                "dev",
                LB_SERVER_IF,
            ]);
            if !spec.ha {
                // The VIP is the balancer's: it answers ARP for it. In an HA lab the
                // VRRP master holds it, and the web servers' gateway too.
                b.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", LB_CLIENT_IF]);
            }
            b.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        }
        if !spec.ha {
            client.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_CLIENT_SIDE.to_string(),
            ]);
        }
        for (i, web) in webs.iter().enumerate() {
            plug(web, "eth0", &web_name(i), "br-servers");
            web.ip(&["addr", "add", &format!("{}/24", web_addr(i)), "dev", "eth0"]);
            web.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_SERVER_SIDE.to_string(),
            ]);
        }
        // Hosts send full checksums: a partial one cannot be patched incrementally by
        // the balancer.
        for ns in webs.iter().chain([&client]) {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        }
        let mut lab = Lab {
            client,
            net,
            balancers,
            webs,
            dir,
            spec,
            web_servers: Vec::new(),
        };
        for i in 0..lab.webs.len() {
            lab.start_web(i);
        }
        lab
    }

    /// The (first) balancer.
    pub fn balancer(&self) -> &Balancer {
        &self.balancers[0]
    }

    /// The (first) balancer, to change.
    pub fn balancer_mut(&mut self) -> &mut Balancer {
        &mut self.balancers[0]
    }

    /// The (first) balancer's namespace.
    pub fn lb(&self) -> &Netns {
        &self.balancers[0].ns
    }

    /// Unplugs balancer `i` from both networks, as a machine that dies does.
    pub fn unplug(&self, i: usize) {
        self.set_plugged(i, false)
    }

    /// Plugs balancer `i` back in.
    pub fn plug_in(&self, i: usize) {
        self.set_plugged(i, true)
    }

    fn set_plugged(&self, i: usize, plugged: bool) {
        let name = &self.balancers[i].name;
        for port in [format!("{name}-c"), format!("{name}-s")] {
            let state = if plugged { "up" } else { "down" };
            self.net.ip(&["link", "set", &port, state]);
        }
    }

    /// The file whose presence makes web server `i`'s `/health` answer 503.
    pub fn web_down_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.down", web_name(i)))
    }

    /// Makes web server `i`'s `/health` answer 503 (`false`) or 200 (`true`).
    pub fn set_web_health(&self, i: usize, healthy: bool) {
        let file = self.web_down_file(i);
        if healthy {
            let _ = std::fs::remove_file(file);
        } else {
            std::fs::write(file, "down\n").expect("down file");
        }
    }

    /// Stops web server `i` (SIGTERM, then SIGKILL).
    pub fn stop_web(&mut self, i: usize) {
        if let Some(mut child) = self.web_servers.get_mut(i).and_then(Option::take) {
            terminate(&mut child);
        }
    }

    /// Starts (or restarts) web server `i` and waits until it answers.
    pub fn start_web(&mut self, i: usize) {
        let child = spawn_logged(
            self.webs[i]
                .command(&bin(&self.spec.bin_dir, "foobar-web"))
                .args([
                    "--name",
                    &web_name(i),
                    "--listen",
                    &format!("0.0.0.0:{WEB_PORT}"),
                    "--down-file",
                    &self.web_down_file(i).display().to_string(),
                ]),
            &self.dir.join(format!("{}.log", web_name(i))),
        );
        if self.web_servers.len() <= i {
            self.web_servers.resize_with(i + 1, || None);
        }
        self.web_servers[i] = Some(child);
        let url = format!("http://{}:{WEB_PORT}/", web_addr(i));
        wait_until(
            Duration::from_secs(10),
            &format!("{} to answer", web_name(i)),
            || {
                self.lb()
                    .command("curl")
                    .args(["-sf", "-m", "1", &url])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    /// The (first) balancer's control socket.
    pub fn socket(&self) -> PathBuf {
        self.balancer().socket()
    }

    /// The (first) balancer's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.balancer().config_path()
    }

    /// Writes the (first) balancer's configuration file.
    pub fn write_config(&self, text: &str) {
        self.balancer().write_config(text)
    }

    /// The (first) balancer's agent log so far.
    pub fn agent_log(&self) -> String {
        self.balancer().agent_log()
    }

    /// Starts the (first) balancer's agent, with the default config if none is written.
    pub fn start_agent(&mut self) {
        if !self.config_path().exists() {
            self.write_config(&default_config(self.webs.len(), "rr"));
        }
        self.balancer_mut().start_agent()
    }

    /// Stops the (first) balancer's agent with SIGTERM; returns its exit status.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        self.balancer_mut().stop_agent()
    }

    /// The (first) balancer's agent process, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.balancer().agent_pid()
    }

    /// Runs the CLI against the (first) balancer's agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.balancer().cli(args)
    }

    /// Runs the CLI and returns its stdout, panicking with stderr if it fails.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        self.balancer().cli_ok(args)
    }

    /// `curl http://VIP/` from the client; the name of the server that answered.
    pub fn get(&self) -> Option<String> {
        self.get_from_port(None)
    }

    /// The same from a fixed client port.
    pub fn get_from_port(&self, local_port: Option<u16>) -> Option<String> {
        let mut cmd = self.client.command("curl");
        cmd.args(["-sf", "-m", "2", &format!("http://{VIP}:{VIP_PORT}/")]);
        if let Some(port) = local_port {
            cmd.args(["--local-port", &port.to_string()]);
        }
        let out = cmd.output().expect("run curl");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// What the lab was built from (binary directory, names).
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// Leaves every process running and forgets them (persistent labs).
    pub fn detach_processes(&mut self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .web_servers
            .drain(..)
            .flatten()
            .map(|c| c.id())
            .collect();
        for b in &mut self.balancers {
            pids.extend(b.agent.take().map(|c| c.id()));
            pids.extend(b.keepalived.take().map(|c| c.id()));
        }
        pids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.spec.persistent {
            return;
        }
        for b in &mut self.balancers {
            b.stop_all();
        }
        for mut web in self.web_servers.drain(..).flatten() {
            terminate(&mut web);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go as their fields drop.
    }
}

fn bin(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build` first",
        path.display()
    );
    path.display().to_string()
}

/// Spawns `command` in a process group of its own, stdin closed, stdout and stderr
/// appended to `log`.
fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()))
}

fn make_ns(name: &str, persistent: bool) -> Netns {
    if persistent {
        Netns::persistent(name)
    } else {
        Netns::new_named(name)
    }
}

/// SIGTERM, then SIGKILL after 10 s; waits.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().expect("wait");
        }
        sleep(Duration::from_millis(20));
    }
}

/// Removes a pin directory on bpffs (links and maps); missing is fine.
pub fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Polls `done` every 50 ms until it holds; panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

/// Deletes every namespace whose name starts with `prefix` (xtask lab down).
pub fn delete_namespaces(prefix: &str) -> Vec<String> {
    let list = run("ip", &["netns", "list"]);
    let mut gone = Vec::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(prefix) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            gone.push(name.to_owned());
        }
    }
    gone
}
