//! The seed topology in network namespaces, with a switch namespace (`net`) holding a
//! bridge per network:
//!
//! ```text
//!  client 10.0.0.2 ─ br-client ─ eth-client 10.0.0.1 [lb] eth-servers 10.1.0.1 ─ br-servers ─┬─ web1 10.1.0.11
//!                                 + VIPs 10.0.0.100-103                                      └─ web2 10.1.0.12
//! ```
//! Every host has an IPv6 address too (the client fd00::2, the balancer fd00::1 and
//! fd00:1::1 with VIPs fd00::100-103, the web servers fd00:1::11..). The web servers'
//! default routes are the balancer, so replies pass through it (NAT mode, as
//! LVS-NAT). An optional router (`LabSpec::router`, 10.0.0.254 and 10.1.0.254) joins
//! the two networks without the balancer: the way DSR replies take to clients. An HA lab has two balancers, `lb1` (10.0.0.3, 10.1.0.3) and `lb2`
//! (10.0.0.4, 10.1.0.4), on the same bridges; the VRRP master holds the VIP and the
//! web servers' gateway 10.1.0.1. Each agent runs in its balancer's namespace but with
//! the host's mounts, so its pins live on the host's bpffs in a directory of its own.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

pub use crate::process::{terminate, wait_until};
use crate::{
    netns::{Netns, run, unique_name},
    pki::Pki,
    process::{bin, spawn_logged},
    stack,
};

/// The VIP clients connect to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The VIP's IPv6 address.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
/// How many VIP addresses the balancer holds: VIP and the three after it (IPv6 too).
pub const VIP_ADDRESSES: u8 = 4;
/// The client's IPv6 address.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The router between the two networks (`LabSpec::router`), on the client network.
pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// The router on the server network.
pub const ROUTER_SERVER_SIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
/// The router on the server network, IPv6.
pub const ROUTER_SERVER_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0xfe);

/// VIP address `i` (0: [`VIP`]).
pub fn vip_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 100 + i)
}

/// IPv6 VIP address `i` (0: [`VIP6`]).
pub fn vip_addr6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100 + i as u16)
}

/// The IPv6 address of web server `i` (0-based).
pub fn web_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11 + i as u16)
}
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
/// `[dataplane] interfaces` of the lab's balancers: clients on one side, the servers'
/// replies on the other.
pub const DATAPLANE_INTERFACES: &str = "[{ name = \"eth-client\", role = \"client\" }, { name = \"eth-servers\", role = \"backend\" }]";

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
    /// The whole foobar.com stack (see [`stack`]): servers named `server1`, `server2`
    /// with web, application and database nodes, a DNS server, HTTPS.
    pub stack: bool,
    /// A router joining the client and server networks beside the balancer.
    pub router: bool,
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
            stack: false,
            router: false,
        }
    }

    /// A throwaway stack lab: two servers with the whole foobar.com stack.
    pub fn stack_for_test(tag: &str) -> Self {
        Self {
            stack: true,
            ..Self::for_test(tag, 2)
        }
    }

    /// The name of server `i`: `web1`.. in a plain lab, `server1`.. in a stack lab.
    pub fn server_name(&self, i: usize) -> String {
        if self.stack {
            format!("server{}", i + 1)
        } else {
            web_name(i)
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
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\n\n\
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
    /// The agent's `--on-exit`: `keep` (a stop is a restart: a VRRP master keeps its
    /// addresses and resumes) or `detach` (a real stop: it hands over at once).
    pub on_exit: &'static str,
    /// The agent's binary in the build directory: `foobar-lb`, or another build of
    /// it (the upgrade test's `foobar-lb-next-layout`).
    pub program: &'static str,
    dir: PathBuf,
    bin_dir: PathBuf,
    agent: Option<Child>,
    keepalived: Option<Child>,
}

impl Balancer {
    pub(crate) fn new(
        ns: Netns,
        name: &str,
        lab_dir: &Path,
        prefix: &str,
        bin_dir: &Path,
    ) -> Balancer {
        let dir = lab_dir.join(name);
        std::fs::create_dir_all(&dir).expect("balancer dir");
        Balancer {
            ns,
            name: name.into(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{prefix}-{name}")),
            log_filter: "info".into(),
            on_exit: "keep",
            program: "foobar-lb",
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
                .command(&bin(&self.bin_dir, self.program))
                .arg("--socket")
                .arg(self.socket())
                .arg("run")
                .arg("--config")
                .arg(self.config_path())
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                // Beside the config, so the state file goes with the lab.
                .arg("--state-file")
                .arg(self.dir.join("state.json"))
                .args(["--on-exit", self.on_exit])
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

    /// Forgets the agent without stopping it (persistent labs); its pid.
    pub(crate) fn detach_agent(&mut self) -> Option<u32> {
        self.agent.take().map(|c| c.id())
    }

    pub(crate) fn stop_all(&mut self) {
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
    /// The servers behind the balancer (web servers in a plain lab).
    pub webs: Vec<Netns>,
    /// The DNS server's namespace (stack labs).
    pub dns: Option<Netns>,
    /// The router between the networks (`LabSpec::router`).
    pub router: Option<Netns>,
    /// The CA and the site's certificate (stack labs).
    pub pki: Option<Pki>,
    /// Pebble, the site's ACME CA, once [`Lab::start_acme`] started it.
    pub acme: Option<crate::acme::Pebble>,
    /// Configuration, sockets and logs.
    pub dir: PathBuf,
    spec: LabSpec,
    nodes: Vec<Node>,
    dns_server: Option<Child>,
    /// Web-to-app TLS, once [`Lab::use_app_tls`] turned it on.
    app_tls: bool,
}

/// The processes of one server.
#[derive(Default)]
struct Node {
    web: Option<Child>,
    app: Option<Child>,
    db: Option<Child>,
}

impl Node {
    fn stop_all(&mut self) {
        for child in [&mut self.web, &mut self.app, &mut self.db] {
            if let Some(mut c) = child.take() {
                terminate(&mut c);
            }
        }
    }
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
            .map(|i| make_ns(&format!("{p}-{}", spec.server_name(i)), spec.persistent))
            .collect();
        let dns = spec
            .stack
            .then(|| make_ns(&format!("{p}-dns"), spec.persistent));
        let router = spec
            .router
            .then(|| make_ns(&format!("{p}-router"), spec.persistent));

        add_bridges(&net, &["br-client", "br-servers"]);
        let plug = |ns: &Netns, inner: &str, port: &str, bridge: &str| {
            plug_into(&net, ns, inner, port, bridge)
        };
        let pass_through = |port: &str| pass_through(&net, &spec.bin_dir, port);

        plug(&client, "eth0", "client", "br-client");
        client.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"]);
        let client6 = format!("{CLIENT6}/64");
        client.ip(&["-6", "addr", "add", &client6, "dev", "eth0", "nodad"]);
        if let Some(router) = &router {
            plug(router, "eth-c", "router-c", "br-client");
            plug(router, "eth-s", "router-s", "br-servers");
            let (c, s) = (
                format!("{ROUTER_CLIENT_SIDE}/24"),
                format!("{ROUTER_SERVER_SIDE}/24"),
            );
            router.ip(&["addr", "add", &c, "dev", "eth-c"]);
            router.ip(&["addr", "add", &s, "dev", "eth-s"]);
            router.ip(&["-6", "addr", "add", "fd00::fe/64", "dev", "eth-c", "nodad"]);
            let s6 = format!("{ROUTER_SERVER_SIDE6}/64");
            router.ip(&["-6", "addr", "add", &s6, "dev", "eth-s", "nodad"]);
            router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            router.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        if let Some(dns) = &dns {
            plug(dns, "eth0", "dns", "br-client");
            dns.ip(&[
                "addr",
                "add",
                &format!("{}/24", stack::DNS_ADDR),
                "dev",
                "eth0",
            ]);
            // `ip netns exec` shows the client this file as its /etc/resolv.conf.
            let etc = resolv_dir(client.name());
            std::fs::create_dir_all(&etc).expect("/etc/netns dir");
            std::fs::write(
                etc.join("resolv.conf"),
                format!("nameserver {}\n", stack::DNS_ADDR),
            )
            .expect("resolv.conf");
        }
        for (i, b) in balancers.iter().enumerate() {
            plug(&b.ns, LB_CLIENT_IF, &format!("{}-c", b.name), "br-client");
            plug(&b.ns, LB_SERVER_IF, &format!("{}-s", b.name), "br-servers");
            pass_through(&format!("{}-c", b.name));
            pass_through(&format!("{}-s", b.name));
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
                // The VIPs are the balancer's: it answers ARP and neighbour discovery
                // for them. In an HA lab the VRRP master holds the VIP, and the web
                // servers' gateway too. (IPv6 in the single-balancer lab only.)
                for v in 0..VIP_ADDRESSES {
                    let (vip, vip6) = (
                        format!("{}/32", vip_addr(v)),
                        format!("{}/128", vip_addr6(v)),
                    );
                    b.ns.ip(&["addr", "add", &vip, "dev", LB_CLIENT_IF]);
                    b.ns.ip(&["-6", "addr", "add", &vip6, "dev", LB_CLIENT_IF, "nodad"]);
                }
                b.ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    "fd00::1/64",
                    "dev",
                    LB_CLIENT_IF,
                    "nodad",
                ]);
                b.ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    "fd00:1::1/64",
                    "dev",
                    LB_SERVER_IF,
                    "nodad",
                ]);
            }
            b.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            b.ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        if !spec.ha {
            client.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_CLIENT_SIDE.to_string(),
            ]);
            client.ip(&["-6", "route", "add", "default", "via", "fd00::1"]);
        }
        for (i, web) in webs.iter().enumerate() {
            plug(web, "eth0", &spec.server_name(i), "br-servers");
            web.ip(&["addr", "add", &format!("{}/24", web_addr(i)), "dev", "eth0"]);
            web.ip(&[
                "route",
                "add",
                "default",
                "via",
                &LB_SERVER_SIDE.to_string(),
            ]);
            let addr6 = format!("{}/64", web_addr6(i));
            web.ip(&["-6", "addr", "add", &addr6, "dev", "eth0", "nodad"]);
            if !spec.ha {
                web.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"]);
            }
        }
        // Hosts send full checksums: a partial one cannot be patched incrementally by
        // the balancer.
        for ns in webs.iter().chain([&client]) {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        }
        let pki = spec.stack.then(|| Pki::new(&dir.join("pki")));
        let mut lab = Lab {
            client,
            net,
            balancers,
            webs,
            dns,
            router,
            pki,
            acme: None,
            dir,
            spec,
            nodes: Vec::new(),
            dns_server: None,
            app_tls: false,
        };
        lab.nodes.resize_with(lab.webs.len(), Node::default);
        if let Some(dns) = &lab.dns {
            lab.dns_server = Some(stack::start_dns(dns, &lab.dir));
        }
        if lab.spec.stack {
            // Secrets: readable by their services only.
            crate::pki::write_private(&lab.db_password_file(), "lab-app-password\n");
            crate::pki::write_private(&lab.repl_password_file(), "lab-replication-password\n");
            for i in 0..lab.webs.len().min(2) {
                lab.start_db(i);
            }
            for i in 0..lab.webs.len() {
                lab.start_app(i);
            }
        }
        for i in 0..lab.webs.len() {
            lab.start_web(i);
        }
        lab
    }

    /// Whether this is a stack lab.
    pub fn is_stack(&self) -> bool {
        self.spec.stack
    }

    /// The name of server `i`.
    pub fn server_name(&self, i: usize) -> String {
        self.spec.server_name(i)
    }

    /// The file holding the application's database password.
    pub fn db_password_file(&self) -> PathBuf {
        self.dir.join("db-app.password")
    }

    /// The file holding the database pair's replication password.
    pub fn repl_password_file(&self) -> PathBuf {
        self.dir.join("db-repl.password")
    }

    /// The database node configuration of server `i`.
    pub fn db_config_path(&self, i: usize) -> PathBuf {
        stack::server_dir(&self.dir, &self.server_name(i)).join("db.toml")
    }

    /// Starts server `i`'s database node and waits until MariaDB answers (its role
    /// comes once the balancer checks it).
    pub fn start_db(&mut self, i: usize) {
        let dir = stack::server_dir(&self.dir, &self.server_name(i));
        crate::db::TlsFiles::of(&dir).install(self.pki.as_ref().expect("a stack lab"), i);
        let config = self.db_config_path(i);
        std::fs::write(
            &config,
            stack::db_config(
                &dir,
                i,
                &self.db_password_file(),
                &self.repl_password_file(),
            ),
        )
        .expect("db.toml");
        let child = spawn_logged(
            self.webs[i]
                .command(&bin(&self.spec.bin_dir, "foobar-db"))
                .args(["run", "--config"])
                .arg(&config),
            &dir.join("db.log"),
        );
        self.nodes[i].db = Some(child);
        let started = Instant::now();
        let name = self.server_name(i);
        // `mariadb-admin ping` succeeds once the server answers, even refusing the login.
        while !self.webs[i]
            .command("mariadb-admin")
            .args(["--no-defaults", "-h", &web_addr(i).to_string(), "-P"])
            .arg(stack::DB_PORT.to_string())
            .args(["-u", "nobody", "--connect-timeout=1", "ping"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let exited = self.nodes[i]
                .db
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "foobar-db exited:\n{}",
                self.log(&name, "db")
            );
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "MariaDB did not answer within 60 s:\n{}",
                self.log(&name, "db")
            );
            sleep(Duration::from_millis(100));
        }
    }

    /// Stops server `i`'s database node (SIGTERM: MariaDB shuts down cleanly).
    pub fn stop_db(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].db.take() {
            terminate(&mut child);
        }
    }

    /// Kills server `i`'s MariaDB (SIGKILL: a crash); its node agent stays.
    pub fn kill_mariadb(&self, i: usize) {
        let cnf = stack::server_dir(&self.dir, &self.server_name(i)).join("db/my.cnf");
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("mariadbd --defaults-file={}", cnf.display()))
            .status();
    }

    /// Starts server `i`'s application node (it answers before the database does).
    pub fn start_app(&mut self, i: usize) {
        let name = self.server_name(i);
        let dir = stack::server_dir(&self.dir, &name);
        let pki = self.pki.as_ref().expect("a stack lab");
        crate::db::TlsFiles::of(&dir).install_ca(pki);
        let tls = self.app_tls.then(|| {
            let files = stack::AppTlsFiles::of(&dir);
            files.install(pki, i);
            files
        });
        let config = dir.join("app.toml");
        std::fs::write(
            &config,
            stack::app_config(
                &dir,
                &name,
                self.webs.len(),
                &self.db_password_file(),
                tls.as_ref(),
            ),
        )
        .expect("app.toml");
        let child = spawn_logged(
            self.webs[i]
                .command(&bin(&self.spec.bin_dir, "foobar-app"))
                .arg("--config")
                .arg(&config),
            &dir.join("app.log"),
        );
        self.nodes[i].app = Some(child);
        // It answers (503 until its database is reachable through the balancer).
        wait_until(
            Duration::from_secs(20),
            &format!("{name}'s application node"),
            || {
                self.app_curl(i, "/healthz", &["-s", "-o", "/dev/null", "-m", "1"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    /// Turns web-to-app TLS on (stack labs): every application node is started again
    /// serving HTTPS only, with a certificate from the lab's CA for its server's
    /// address, then every web node, reaching them over TLS with the lab's CA
    /// (`[proxy] upstream_tls_ca`). Nodes started later (a deploy) keep it. The
    /// balancer sees the web nodes back up after [`Lab::wait_for_backends_up`].
    pub fn use_app_tls(&mut self) {
        assert!(self.is_stack(), "web-to-app TLS is a stack lab's");
        self.app_tls = true;
        for i in 0..self.webs.len() {
            self.stop_app(i);
            self.start_app(i);
        }
        for i in 0..self.webs.len() {
            self.stop_web(i);
            self.start_web(i);
        }
    }

    /// Whether the web nodes reach the application nodes over TLS
    /// ([`Lab::use_app_tls`]).
    pub fn uses_app_tls(&self) -> bool {
        self.app_tls
    }

    /// Stops server `i`'s application node.
    pub fn stop_app(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].app.take() {
            terminate(&mut child);
        }
    }

    /// A log of the lab: `<server>/<service>.log` (`web`, `app`, `db`).
    pub fn log(&self, server: &str, service: &str) -> String {
        std::fs::read_to_string(self.dir.join(server).join(format!("{service}.log")))
            .unwrap_or_default()
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

    /// Cuts server `i` off the servers' network (its switch port down).
    pub fn cut_server(&self, i: usize) {
        self.net.ip(&["link", "set", &self.server_name(i), "down"]);
    }

    /// Connects server `i` again.
    pub fn reconnect_server(&self, i: usize) {
        self.net.ip(&["link", "set", &self.server_name(i), "up"]);
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

    /// Stops server `i`'s web node (SIGTERM, then SIGKILL).
    pub fn stop_web(&mut self, i: usize) {
        if let Some(mut child) = self.nodes.get_mut(i).and_then(|n| n.web.take()) {
            terminate(&mut child);
        }
    }

    /// Starts (or restarts) server `i`'s web node and waits until it answers.
    pub fn start_web(&mut self, i: usize) {
        let name = self.server_name(i);
        let dir = stack::server_dir(&self.dir, &name);
        let down = self.web_down_file(i);
        let mut text = match &self.pki {
            Some(pki) => {
                let upstream_ca = self.app_tls.then(|| {
                    let files = crate::db::TlsFiles::of(&dir);
                    files.install_ca(pki);
                    files.ca
                });
                let servers = self.webs.len();
                stack::web_config(&dir, &name, servers, pki, &down, upstream_ca.as_deref())
            }
            None => stack::plain_web_config(&dir, &name, &down),
        };
        if let (Some(pebble), Some(pki)) = (&self.acme, &self.pki) {
            text = pebble.web_config(&text, &dir, i, self.webs.len(), pki);
        }
        let port = if self.spec.stack {
            stack::HTTP_PORT
        } else {
            WEB_PORT
        };
        let url = format!("http://{}:{port}/healthz", web_addr(i));
        let child = start_web_node(
            &self.webs[i],
            self.lb(),
            &self.spec.bin_dir,
            &dir,
            &text,
            &url,
        );
        self.nodes[i].web = Some(child);
    }

    /// The (first) balancer's control socket.
    pub fn socket(&self) -> PathBuf {
        self.balancer().socket()
    }

    /// `foobar-lb --socket <socket> run <options> --config <file> --pin-dir <pins>` for
    /// the (first) balancer, in its namespace, not started: for tests that run the
    /// agent themselves (to see it refuse, or with other options).
    pub fn agent_command(&self, options: &[&str]) -> Command {
        let mut command = self.lb().command(&bin(&self.spec.bin_dir, "foobar-lb"));
        command
            .arg("--socket")
            .arg(self.socket())
            .arg("run")
            .args(options)
            .arg("--config")
            .arg(self.config_path())
            .arg("--pin-dir")
            .arg(&self.balancer().pin_dir);
        command
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
            let config = if self.spec.stack {
                stack::balancer_config(self.webs.len())
            } else {
                default_config(self.webs.len(), "rr")
            };
            self.write_config(&config);
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
            .nodes
            .iter_mut()
            .flat_map(|n| [n.web.take(), n.app.take(), n.db.take()])
            .flatten()
            .chain(self.dns_server.take())
            .chain(self.acme.as_mut().and_then(|pebble| pebble.detach()))
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
        // Web and application nodes first, the database last.
        for node in self.nodes.iter_mut().rev() {
            node.stop_all();
        }
        if let Some(mut dns) = self.dns_server.take() {
            terminate(&mut dns);
        }
        // Pebble stops as it drops, before its namespace and files go.
        self.acme = None;
        let _ = std::fs::remove_dir_all(resolv_dir(self.client.name()));
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go as their fields drop.
    }
}

/// Makes the switch's bridges in `net`.
pub(crate) fn add_bridges(net: &Netns, bridges: &[&str]) {
    for bridge in bridges {
        net.ip(&["link", "add", bridge, "type", "bridge"]);
        net.ip(&["link", "set", bridge, "up"]);
    }
    // A switch hands frames on as they are. With br_netfilter loaded, a bridge
    // passes IPv4 and IPv6 through iptables, which checks headers and silently
    // drops malformed frames before the balancer could see them.
    if std::path::Path::new("/proc/sys/net/bridge").exists() {
        net.exec(
            "sysctl",
            &[
                "-qw",
                "net.bridge.bridge-nf-call-iptables=0",
                "net.bridge.bridge-nf-call-ip6tables=0",
                "net.bridge.bridge-nf-call-arptables=0",
            ],
        );
    }
}

/// Plugs interface `inner` of `ns` into `bridge` (in `net`) through port `port`.
pub(crate) fn plug_into(net: &Netns, ns: &Netns, inner: &str, port: &str, bridge: &str) {
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
    // GRO stays off (the veth default): merged segments would reach the
    // balancer as one packet whose checksum is partial, as no NIC hands over.
    ns.ip(&["link", "set", inner, "up"]);
}

/// Frames an XDP program sends into a veth (XDP_TX, redirects) are taken only by a
/// peer with an XDP program of its own (with GRO instead, XDP_TX frames wait in its
/// ring): the balancers' bridge ports (in `net`) get a pass-through one.
pub(crate) fn pass_through(net: &Netns, bin_dir: &Path, port: &str) {
    let program = bin_dir.join("xdp-pass.o").display().to_string();
    net.ip(&[
        "link", "set", "dev", port, "xdp", "obj", &program, "sec", "xdp",
    ]);
}

/// `/etc/netns/<ns>`: files `ip netns exec` shows the namespace in place of /etc's.
pub fn resolv_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

pub(crate) fn make_ns(name: &str, persistent: bool) -> Netns {
    if persistent {
        Netns::persistent(name)
    } else {
        Netns::new_named(name)
    }
}

/// Writes a web node's configuration `text` in `dir`, starts foobar-web on it in `web`
/// (its log beside it), and waits up to 10 s until `url` answers curl run in `from`;
/// panics with the node's log otherwise.
pub(crate) fn start_web_node(
    web: &Netns,
    from: &Netns,
    bin_dir: &Path,
    dir: &Path,
    text: &str,
    url: &str,
) -> Child {
    let config = dir.join("web.toml");
    std::fs::write(&config, text).expect("web.toml");
    let log = dir.join("web.log");
    let child = spawn_logged(
        web.command(&bin(bin_dir, "foobar-web"))
            .arg("--config")
            .arg(&config),
        &log,
    );
    let started = Instant::now();
    while !from
        .command("curl")
        .args(["-s", "-o", "/dev/null", "-m", "1", url])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{url} did not answer within 10 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        sleep(Duration::from_millis(50));
    }
    child
}

/// Removes a pin directory on bpffs (links and maps); missing is fine.
pub fn remove_pins(dir: &Path) {
    // Links, and the maps of every layout (`maps-vN`).
    let _ = std::fs::remove_dir_all(dir);
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
