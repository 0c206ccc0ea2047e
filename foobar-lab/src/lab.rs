//! The seed topology in network namespaces:
//!
//! ```text
//!  client 10.0.0.2 ──eth0── eth-client 10.0.0.1 [balancer] eth-servers 10.1.0.1 ──┬── web1 10.1.0.11
//!                            + VIP 10.0.0.100                                     └── web2 10.1.0.12
//! ```
//! The web servers' default route is the balancer, so replies pass through it (NAT
//! mode, as LVS-NAT). The agent runs in the balancer's namespace but with the host's
//! mounts, so its pins live on the host's bpffs under a directory of the lab's own.

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
}

impl LabSpec {
    /// A throwaway lab for a test: unique names, removed on drop.
    pub fn for_test(tag: &str, webs: usize) -> Self {
        Self {
            prefix: unique_name(tag),
            webs,
            persistent: false,
            bin_dir: bin_dir_of_this_test(),
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

/// A running lab.
pub struct Lab {
    /// The client.
    pub client: Netns,
    /// The balancer.
    pub lb: Netns,
    /// The web servers.
    pub webs: Vec<Netns>,
    /// Configuration, socket and logs.
    pub dir: PathBuf,
    /// The agent's pin directory.
    pub pin_dir: PathBuf,
    /// The agent's `RUST_LOG`.
    pub agent_log_filter: String,
    spec: LabSpec,
    web_servers: Vec<Option<Child>>,
    agent: Option<Child>,
}

impl Lab {
    /// Builds the namespaces, links and addresses, and starts the web servers (not
    /// the agent).
    pub fn up(spec: LabSpec) -> Lab {
        let p = &spec.prefix;
        let dir = std::env::temp_dir().join(p);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let client = make_ns(&format!("{p}-client"), spec.persistent);
        let lb = make_ns(&format!("{p}-lb"), spec.persistent);
        let webs: Vec<Netns> = (0..spec.webs)
            .map(|i| make_ns(&format!("{p}-{}", web_name(i)), spec.persistent))
            .collect();

        // client ── balancer
        client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            LB_CLIENT_IF,
            "netns",
            lb.name(),
        ]);
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_CLIENT_SIDE}/24"),
            "dev",
            LB_CLIENT_IF,
        ]);
        // The VIP is the balancer's: it answers ARP for it, as the VRRP master will.
        lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", LB_CLIENT_IF]);
        client.ip(&["link", "set", "eth0", "up"]);
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &LB_CLIENT_SIDE.to_string(),
        ]);

        // balancer ── a bridge ── web servers
        lb.ip(&["link", "add", "br-servers", "type", "bridge"]);
        lb.ip(&[
            "link",
            "add",
            LB_SERVER_IF,
            "type",
            "veth",
            "peer",
            "name",
            "to-lb",
        ]);
        lb.ip(&["link", "set", "to-lb", "master", "br-servers", "up"]);
        lb.ip(&[
            "addr",
            "add",
            &format!("{LB_SERVER_SIDE}/24"),
            "dev",
            LB_SERVER_IF,
        ]);
        for (i, web) in webs.iter().enumerate() {
            let port = format!("to-{}", web_name(i));
            lb.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                web.name(),
            ]);
            lb.ip(&["link", "set", &port, "master", "br-servers", "up"]);
            web.ip(&["addr", "add", &format!("{}/24", web_addr(i)), "dev", "eth0"]);
            web.ip(&["link", "set", "eth0", "up"]);
            web.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_SERVER_SIDE.to_string(),
            ]);
        }
        lb.ip(&["link", "set", "br-servers", "up"]);
        for ifname in [LB_CLIENT_IF, LB_SERVER_IF] {
            lb.ip(&["link", "set", ifname, "up"]);
        }
        lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);

        // Frames an XDP program redirects into a veth are only taken by a peer with
        // GRO on (or an XDP program of its own). Hosts send full checksums, because a
        // partial one cannot be patched incrementally by the balancer.
        for (ns, ifname) in [(&client, "eth0"), (&lb, "to-lb")]
            .into_iter()
            .chain(webs.iter().map(|w| (w, "eth0")))
        {
            ns.exec("ethtool", &["-K", ifname, "gro", "on", "tx", "off"]);
        }
        let mut lab = Lab {
            client,
            lb,
            webs,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{p}")),
            agent_log_filter: "info".into(),
            dir,
            spec,
            web_servers: Vec::new(),
            agent: None,
        };
        for i in 0..lab.webs.len() {
            lab.start_web(i);
        }
        lab
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
        let log = self.log_file(&format!("{}.log", web_name(i)));
        let child = self.webs[i]
            .command(&self.bin("foobar-web"))
            .args([
                "--name",
                &web_name(i),
                "--listen",
                &format!("0.0.0.0:{WEB_PORT}"),
                "--down-file",
                &self.web_down_file(i).display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn foobar-web");
        if self.web_servers.len() <= i {
            self.web_servers.resize_with(i + 1, || None);
        }
        self.web_servers[i] = Some(child);
        let url = format!("http://{}:{WEB_PORT}/", web_addr(i));
        wait_until(
            Duration::from_secs(10),
            &format!("{} to answer", web_name(i)),
            || {
                self.lb
                    .command("curl")
                    .args(["-sf", "-m", "1", &url])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    fn bin(&self, name: &str) -> String {
        let path = self.spec.bin_dir.join(name);
        assert!(
            path.exists(),
            "{} is not built; run `cargo build` first",
            path.display()
        );
        path.display().to_string()
    }

    fn log_file(&self, name: &str) -> File {
        File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .expect("log file")
    }

    /// The control socket of the lab's agent.
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

    /// Starts the agent (writing the default config if there is none) and waits
    /// until its control socket answers. Panics with its log if it exits instead.
    pub fn start_agent(&mut self) {
        if !self.config_path().exists() {
            self.write_config(&default_config(self.webs.len(), "rr"));
        }
        assert!(self.agent.is_none(), "the agent is already running");
        let log = self.log_file("agent.log");
        let child = self
            .lb
            .command(&self.bin("foobar-lb"))
            .arg("--socket")
            .arg(self.socket())
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .env("RUST_LOG", &self.agent_log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn foobar-lb");
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

    /// The agent process, if it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// Runs the CLI against the lab's agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(self.bin("foobar-lb"))
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
            "foobar-lb {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
        pids.extend(self.agent.take().map(|c| c.id()));
        pids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.spec.persistent {
            return;
        }
        if let Some(mut agent) = self.agent.take() {
            terminate(&mut agent);
        }
        for mut web in self.web_servers.drain(..).flatten() {
            terminate(&mut web);
        }
        remove_pins(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go as their fields drop.
    }
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
