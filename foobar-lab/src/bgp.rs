//! The BGP lab: active-active balancers announcing the VIP to a router, which spreads
//! the clients' flows over them by ECMP (issue 15). The balancers forward by DSR
//! (IPIP) with Maglev, so any of them sends a flow to the same web server, and the
//! web servers answer the clients straight through the router.
//!
//! ```text
//!                               br-client 10.0.0.0/24                     br-servers 10.1.0.0/24
//!  client ─ br-outside ─ [router] eth-b 10.0.0.254 ─┬─ eth-client 10.0.0.3 [lb1] eth-servers 10.1.0.3 ─┬─ web1 10.1.0.11
//!  10.3.0.2  10.3.0.0/24  eth-c 10.3.0.1            ├─ eth-client 10.0.0.4 [lb2] eth-servers 10.1.0.4 ─┼─ web2 10.1.0.12
//!                         eth-s 10.1.0.254 ─┐       └─ eth-client 10.0.0.5 [lb3] eth-servers 10.1.0.5 ─┤
//!                                           └──────────────────────────────────────────────────────────┘
//!  BGP: router AS 65000 (BIRD, BFD 50 ms × 3) ⇄ each balancer AS 65001 (the agent's BIRD)
//!  VIP 10.0.0.100/32 via 10.0.0.3, 10.0.0.4, 10.0.0.5: one multipath route, L4 hash
//! ```
//! The client is behind the router (default route 10.3.0.1). No host holds the VIP:
//! the router routes it to the balancers that announce it. The web servers' default
//! route is the router (10.1.0.254); each runs `foobar-lb decap` for the VIP, which
//! puts it on their loopback. Namespaces are `<prefix>-client`, `-router`, `-net`
//! (the switch with the three bridges), `-lb1`.., `-web1`..

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    lab::{
        Balancer, DATAPLANE_INTERFACES, LB_CLIENT_IF, LB_SERVER_IF, METRICS, ROUTER_CLIENT_SIDE,
        ROUTER_SERVER_SIDE, WEB_PORT, add_bridges, balancer_client_addr, balancer_server_addr,
        bin_dir_of_this_test, make_ns, pass_through, plug_into, start_web_node, web_addr, web_name,
    },
    netns::{Netns, unique_name},
    process::{bin, spawn_logged, terminate},
    stack,
};

/// The VIP the balancers announce.
pub const BGP_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The VIP's port: DSR keeps the port, so the web servers listen on it too.
pub const BGP_VIP_PORT: u16 = 80;
/// The client, behind the router.
pub const OUTSIDE_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 2);
/// The router on the client's network.
pub const ROUTER_OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
/// The router on the balancers' network: their BGP neighbour.
pub const ROUTER_BALANCER_SIDE: Ipv4Addr = ROUTER_CLIENT_SIDE;
/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// The balancers' AS (all the same: their routes are equal, so the router merges them).
pub const BALANCER_AS: u32 = 65001;
/// BFD's transmit and receive interval, on both sides.
pub const BFD_INTERVAL_MS: u32 = 50;
/// Missed BFD packets that take a session down.
pub const BFD_MULTIPLIER: u32 = 3;
/// BGP hold time, seconds (the smallest the RFC allows).
pub const HOLD_TIME_S: u32 = 3;
/// Seconds between BGP connection attempts.
pub const CONNECT_RETRY_S: u32 = 1;
/// How long a balancer waits after withdrawing before it stops forwarding, ms.
pub const WITHDRAW_WAIT_MS: u32 = 300;
/// The bridge of the client's network (the switch also has `br-client` for the
/// balancers' side and `br-servers`).
pub const OUTSIDE_BRIDGE: &str = "br-outside";
/// The router's interface toward the client.
pub const ROUTER_OUTSIDE_IF: &str = "eth-c";
/// The router's interface toward the balancers.
pub const ROUTER_BALANCER_IF: &str = "eth-b";
/// The router's interface toward the web servers.
pub const ROUTER_SERVER_IF: &str = "eth-s";
/// The balancers' IPIP outer sources (the agent's default `ipip_source`).
pub const IPIP_SOURCE: &str = "172.16.0.0/16";
/// The servers' network.
pub const SERVER_NETWORK: &str = "10.1.0.0/24";

/// Bounds the lab's own waits: bringing everything up, a balancer back.
const UP_LIMIT: Duration = Duration::from_secs(30);
/// How long a started process gets to show it runs.
const START_LIMIT: Duration = Duration::from_secs(10);

/// How to build a BGP lab.
#[derive(Clone, Debug)]
pub struct BgpSpec {
    /// Prefix of every namespace name; unique per test unless `persistent`.
    pub prefix: String,
    /// Balancers, `lb1`..: at least 1, at most 8 (their server-side addresses stop
    /// below the web servers').
    pub balancers: usize,
    /// Web servers.
    pub webs: usize,
    /// Leave everything running when the [`BgpLab`] drops (`cargo xtask lab up --bgp`).
    pub persistent: bool,
    /// Where the `foobar-lb` and `foobar-web` binaries and `xdp-pass.o` are.
    pub bin_dir: PathBuf,
}

impl BgpSpec {
    /// A throwaway lab for a test: unique names, two web servers, removed on drop.
    pub fn for_test(tag: &str, balancers: usize) -> Self {
        Self {
            prefix: unique_name(tag),
            balancers,
            webs: 2,
            persistent: false,
            bin_dir: bin_dir_of_this_test(),
        }
    }
}

/// The `[bgp]` section of a balancer whose address toward the router is
/// `announce_from`: the VIP announced to the router with BFD.
pub fn bgp_section(announce_from: Ipv4Addr) -> String {
    format!(
        "\n[bgp]\nlocal_as = {BALANCER_AS}\nannounce_from = \"{announce_from}\"\n\
         vips = [\"{BGP_VIP}\"]\nhold_time_s = {HOLD_TIME_S}\nconnect_retry_s = {CONNECT_RETRY_S}\n\
         withdraw_wait_ms = {WITHDRAW_WAIT_MS}\n\n\
         [bgp.bfd]\ninterval_ms = {BFD_INTERVAL_MS}\nmultiplier = {BFD_MULTIPLIER}\n\n\
         [[bgp.neighbours]]\naddress = \"{ROUTER_BALANCER_SIDE}\"\nremote_as = {ROUTER_AS}\n"
    )
}

/// A BGP balancer's configuration: VIP `www` ([`BGP_VIP`]:80) by `scheduler` with
/// DSR (IPIP) over `webs` web servers on port 80, checked by TCP every 200 ms (fall 2,
/// rise 2); metrics on 127.0.0.1:9100; the `[bgp]` section announcing the VIP from
/// `announce_from`.
pub fn agent_config(webs: usize, scheduler: &str, announce_from: Ipv4Addr) -> String {
    let backends: Vec<String> = (0..webs)
        .map(|i| {
            format!(
                "  {{ address = \"{}\", port = {BGP_VIP_PORT}, weight = 1 }},",
                web_addr(i)
            )
        })
        .collect();
    format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{BGP_VIP}\"\nport = {BGP_VIP_PORT}\n\
         scheduler = \"{scheduler}\"\nforwarding = \"dsr-ipip\"\nbackends = [\n{}\n]\n\n\
         [vips.health_check]\ntype = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n",
        backends.join("\n")
    ) + METRICS
        + &bgp_section(announce_from)
}

/// The router's BIRD configuration for `balancers` neighbours: a BGP session with
/// BFD to each, their routes to the VIP merged into one multipath route in the
/// kernel (they are equal: same AS, path and attributes, all external).
pub fn router_bird_config(balancers: usize) -> String {
    let mut text = format!(
        "# The BGP lab's router: every balancer a neighbour; their equal routes go into\n\
         # the kernel as one route with a next hop each (ECMP).\n\
         log stderr all;\n\
         router id {ROUTER_BALANCER_SIDE};\n\n\
         protocol device {{\n  scan time 10;\n}}\n\n\
         # Detects a dead balancer in {BFD_MULTIPLIER} x {BFD_INTERVAL_MS} ms, long before the hold time.\n\
         protocol bfd {{\n  interface \"{ROUTER_BALANCER_IF}\" {{\n    interval {BFD_INTERVAL_MS} ms;\n    \
         multiplier {BFD_MULTIPLIER};\n  }};\n}}\n\n\
         protocol kernel {{\n  ipv4 {{ export all; }};\n  merge paths on;\n}}\n"
    );
    for i in 0..balancers {
        text += &format!(
            "\nprotocol bgp lb{n} {{\n  local {ROUTER_BALANCER_SIDE} as {ROUTER_AS};\n  \
             neighbor {addr} as {BALANCER_AS};\n  ipv4 {{ import all; export none; }};\n  \
             bfd on;\n  hold time {HOLD_TIME_S};\n  connect retry time {CONNECT_RETRY_S};\n  \
             connect delay time 1;\n  \
             # After a session fails (a balancer died), try again within a second, not BIRD's 60.\n  \
             error wait time 1, 5;\n}}\n",
            n = i + 1,
            addr = balancer_client_addr(i),
        );
    }
    text
}

/// The next hops of `ip -j route show <prefix>` output: the `gateway` of a route with
/// one next hop, those of `nexthops` with several; dead ones left out. Sorted.
pub fn parse_next_hops(json: &str) -> Vec<Ipv4Addr> {
    let routes: serde_json::Value = if json.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("`ip -j route` gave no JSON ({e}): {json}"))
    };
    let dead = |hop: &serde_json::Value| {
        hop["flags"]
            .as_array()
            .is_some_and(|flags| flags.iter().any(|f| f == "dead"))
    };
    let mut hops = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        let each: Vec<&serde_json::Value> = match route["nexthops"].as_array() {
            Some(nexthops) => nexthops.iter().collect(),
            None => vec![route],
        };
        hops.extend(
            each.into_iter()
                .filter(|hop| !dead(hop))
                .filter_map(|hop| hop["gateway"].as_str()?.parse::<Ipv4Addr>().ok()),
        );
    }
    hops.sort();
    hops
}

/// SIGKILLs every process in `ns`: what a machine that dies does to them.
fn kill_everything_in(ns: &Netns) {
    for pid in pids_in(ns) {
        // SAFETY: a process of the lab's, inside the lab's namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The processes running in a namespace.
fn pids_in(ns: &Netns) -> Vec<i32> {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .collect()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running BGP lab.
pub struct BgpLab {
    /// The client, behind the router.
    pub client: Netns,
    /// The router: BIRD, ECMP over the balancers.
    pub router: Netns,
    /// The switch: `br-outside`, `br-client` (the balancers' network), `br-servers`.
    pub net: Netns,
    /// The balancers, `lb1`..
    pub balancers: Vec<Balancer>,
    /// The web servers, `web1`..
    pub webs: Vec<Netns>,
    /// Configuration, sockets and logs.
    pub dir: PathBuf,
    spec: BgpSpec,
    /// The router's BIRD.
    router_bird: Option<Child>,
    /// Each web server's foobar-web.
    web_nodes: Vec<Child>,
    /// Each web server's `foobar-lb decap`.
    decaps: Vec<Child>,
}

impl BgpLab {
    /// Builds the namespaces, links and addresses; starts the web servers and their
    /// decapsulators, the router's BIRD and every balancer's agent; waits (up to 30 s)
    /// until the router's kernel routes the VIP over every balancer. Panics with the
    /// logs if it does not.
    pub fn up(spec: BgpSpec) -> BgpLab {
        assert!(
            (1..=8).contains(&spec.balancers),
            "a BGP lab has 1 to 8 balancers, not {}",
            spec.balancers
        );
        assert!(spec.webs >= 1, "a BGP lab needs a web server");
        let p = &spec.prefix;
        let persistent = spec.persistent;
        let dir = std::env::temp_dir().join(p);
        std::fs::create_dir_all(&dir).expect("lab dir");
        let net = make_ns(&format!("{p}-net"), persistent);
        let client = make_ns(&format!("{p}-client"), persistent);
        let router = make_ns(&format!("{p}-router"), persistent);
        let balancers: Vec<Balancer> = (0..spec.balancers)
            .map(|i| {
                let name = format!("lb{}", i + 1);
                let ns = make_ns(&format!("{p}-{name}"), persistent);
                Balancer::new(ns, &name, &dir, p, &spec.bin_dir)
            })
            .collect();
        let webs: Vec<Netns> = (0..spec.webs)
            .map(|i| make_ns(&format!("{p}-{}", web_name(i)), persistent))
            .collect();

        add_bridges(&net, &[OUTSIDE_BRIDGE, "br-client", "br-servers"]);
        plug_into(&net, &client, "eth0", "client", OUTSIDE_BRIDGE);
        client.ip(&[
            "addr",
            "add",
            &format!("{OUTSIDE_CLIENT}/24"),
            "dev",
            "eth0",
        ]);
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_OUTSIDE.to_string(),
        ]);

        for (inner, port, bridge, address) in [
            (
                ROUTER_OUTSIDE_IF,
                "router-c",
                OUTSIDE_BRIDGE,
                ROUTER_OUTSIDE,
            ),
            (
                ROUTER_BALANCER_IF,
                "router-b",
                "br-client",
                ROUTER_BALANCER_SIDE,
            ),
            (
                ROUTER_SERVER_IF,
                "router-s",
                "br-servers",
                ROUTER_SERVER_SIDE,
            ),
        ] {
            plug_into(&net, &router, inner, port, bridge);
            router.ip(&["addr", "add", &format!("{address}/24"), "dev", inner]);
        }
        // Forwarding; flows hashed on their ports over the next hops (L4), next hops
        // whose neighbour failed avoided; and no reverse-path check: the web servers'
        // answers come from the VIP, which routes toward the balancers, not them.
        let mut sysctls = vec![
            "-qw".to_owned(),
            "net.ipv4.ip_forward=1".to_owned(),
            "net.ipv4.fib_multipath_hash_policy=1".to_owned(),
            "net.ipv4.fib_multipath_use_neigh=1".to_owned(),
        ];
        for interface in [
            "all",
            "default",
            ROUTER_OUTSIDE_IF,
            ROUTER_BALANCER_IF,
            ROUTER_SERVER_IF,
        ] {
            sysctls.push(format!("net.ipv4.conf.{interface}.rp_filter=0"));
        }
        let sysctls: Vec<&str> = sysctls.iter().map(String::as_str).collect();
        router.exec("sysctl", &sysctls);

        for (i, b) in balancers.iter().enumerate() {
            let (client_port, server_port) = (format!("{}-c", b.name), format!("{}-s", b.name));
            plug_into(&net, &b.ns, LB_CLIENT_IF, &client_port, "br-client");
            plug_into(&net, &b.ns, LB_SERVER_IF, &server_port, "br-servers");
            pass_through(&net, &spec.bin_dir, &client_port);
            pass_through(&net, &spec.bin_dir, &server_port);
            let client_side = format!("{}/24", balancer_client_addr(i));
            let server_side = format!("{}/24", balancer_server_addr(i));
            b.ns.ip(&["addr", "add", &client_side, "dev", LB_CLIENT_IF]);
            b.ns.ip(&["addr", "add", &server_side, "dev", LB_SERVER_IF]);
            // The machine's gateway is the router (the VIP is on no interface).
            let gateway = ROUTER_BALANCER_SIDE.to_string();
            b.ns.ip(&["route", "add", "default", "via", &gateway]);
            b.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        }
        for (i, web) in webs.iter().enumerate() {
            plug_into(&net, web, "eth0", &web_name(i), "br-servers");
            web.ip(&["addr", "add", &format!("{}/24", web_addr(i)), "dev", "eth0"]);
            let gateway = ROUTER_SERVER_SIDE.to_string();
            web.ip(&["route", "add", "default", "via", &gateway]);
        }
        // Hosts send full checksums: a partial one cannot be patched incrementally by
        // the balancer.
        for ns in webs.iter().chain([&client]) {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        }

        let mut lab = BgpLab {
            client,
            router,
            net,
            balancers,
            webs,
            dir,
            spec,
            router_bird: None,
            web_nodes: Vec::new(),
            decaps: Vec::new(),
        };
        for i in 0..lab.webs.len() {
            lab.start_web(i);
            lab.start_decap(i);
        }
        lab.start_router_bird();
        for i in 0..lab.balancers.len() {
            let config = lab.balancer_config(i);
            let b = &mut lab.balancers[i];
            b.write_config(&config);
            // As its service unit would stop it: a stop is a real one (withdraw, wait,
            // detach the data plane).
            b.on_exit = "detach";
            b.start_agent();
        }
        let n = lab.balancers.len();
        lab.wait_next_hops(n, UP_LIMIT);
        lab
    }

    /// The VIP clients connect to: [`BGP_VIP`]:80.
    pub fn vip(&self) -> SocketAddrV4 {
        SocketAddrV4::new(BGP_VIP, BGP_VIP_PORT)
    }

    /// What the lab was built from.
    pub fn spec(&self) -> &BgpSpec {
        &self.spec
    }

    /// The configuration balancer `i` runs.
    pub fn balancer_config(&self, i: usize) -> String {
        agent_config(self.webs.len(), "maglev", balancer_client_addr(i))
    }

    /// The router's BIRD control socket.
    pub fn router_socket(&self) -> PathBuf {
        self.dir.join("router-bird.ctl")
    }

    /// The router's BIRD log so far.
    pub fn router_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("router-bird.log")).unwrap_or_default()
    }

    /// `birdc -s <router socket> <command>`: its output (and errors).
    pub fn router_bird(&self, command: &str) -> String {
        match Command::new("birdc")
            .arg("-s")
            .arg(self.router_socket())
            .args(command.split_whitespace())
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("birdc: {e}"),
        }
    }

    /// The next hops of the router kernel's route to the VIP (none: no route).
    pub fn next_hops(&self) -> Vec<Ipv4Addr> {
        parse_next_hops(
            &self
                .router
                .ip(&["-j", "route", "show", &BGP_VIP.to_string()]),
        )
    }

    /// Waits until the router's route to the VIP has `n` next hops; panics after
    /// `limit` with the router's BGP sessions and the logs.
    pub fn wait_next_hops(&self, n: usize, limit: Duration) {
        self.wait_for(
            limit,
            &format!("the router to route the VIP over {n} balancers"),
            |lab| lab.next_hops().len() == n,
        );
    }

    /// Balancer `i` dies: both its links go down and every process of it (the agent
    /// and its BIRD) is SIGKILLed, at once.
    ///
    /// Only the agent is killed: its BIRD must die with it (it asks the kernel to be
    /// killed when its parent dies). Returns whether it did, within a second; what
    /// outlived it is killed then.
    pub fn crash_balancer(&mut self, i: usize) -> bool {
        assert!(
            self.balancers[i].agent_pid().is_some(),
            "{}'s agent is not running",
            self.balancers[i].name
        );
        self.set_plugged(i, false);
        self.balancers[i].kill_agent();
        let ns = &self.balancers[i].ns;
        let deadline = Instant::now() + Duration::from_secs(1);
        while !pids_in(ns).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let died_with_it = pids_in(ns).is_empty();
        kill_everything_in(ns);
        died_with_it
    }

    /// Balancer `i` comes back: its links up and its agent started again; waits (up to
    /// 30 s) until the router routes over it again.
    pub fn revive_balancer(&mut self, i: usize) {
        self.set_plugged(i, true);
        self.balancers[i].start_agent();
        let address = balancer_client_addr(i);
        let what = format!("the router to route over {} again", self.balancers[i].name);
        self.wait_for(UP_LIMIT, &what, |lab| lab.next_hops().contains(&address));
    }

    /// The log of web server `i`'s decapsulator.
    pub fn decap_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.decap_log_path(i)).unwrap_or_default()
    }

    /// Leaves every process running and forgets them (persistent labs): their pids.
    pub fn detach_processes(&mut self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .web_nodes
            .drain(..)
            .chain(self.decaps.drain(..))
            .chain(self.router_bird.take())
            .map(|c| c.id())
            .collect();
        for b in &mut self.balancers {
            pids.extend(b.detach_agent());
        }
        pids
    }

    fn set_plugged(&self, i: usize, plugged: bool) {
        let name = &self.balancers[i].name;
        let state = if plugged { "up" } else { "down" };
        for port in [format!("{name}-c"), format!("{name}-s")] {
            self.net.ip(&["link", "set", &port, state]);
        }
    }

    /// Polls `done` every 25 ms; panics after `limit` with what the lab shows.
    fn wait_for(&self, limit: Duration, what: &str, mut done: impl FnMut(&BgpLab) -> bool) {
        let started = Instant::now();
        while !done(self) {
            if started.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n{}",
                    self.diagnosis()
                );
            }
            sleep(Duration::from_millis(25));
        }
    }

    /// The router's sessions and route, and the tails of the logs.
    fn diagnosis(&self) -> String {
        let mut text = format!(
            "router's next hops for {BGP_VIP}: {:?}\n== birdc show protocols (router)\n{}\n\
             == router BIRD log\n{}\n",
            self.next_hops(),
            self.router_bird("show protocols"),
            tail(&self.router_log(), 30)
        );
        for b in &self.balancers {
            text += &format!("== {} agent log\n{}\n", b.name, tail(&b.agent_log(), 30));
        }
        text
    }

    fn start_router_bird(&mut self) {
        let conf = self.dir.join("router-bird.conf");
        std::fs::write(&conf, router_bird_config(self.balancers.len())).expect("router-bird.conf");
        let socket = self.router_socket();
        // bird2 comes with `cargo xtask setup`.
        let child = spawn_logged(
            self.router
                .command("bird")
                .arg("-f")
                .arg("-c")
                .arg(&conf)
                .arg("-s")
                .arg(&socket)
                .arg("-P")
                .arg(self.dir.join("router-bird.pid")),
            &self.dir.join("router-bird.log"),
        );
        self.router_bird = Some(child);
        let started = Instant::now();
        loop {
            let answers = Command::new("birdc")
                .arg("-s")
                .arg(&socket)
                .args(["show", "status"])
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"BIRD"));
            if answers {
                return;
            }
            let exited = self
                .router_bird
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.router_bird = None;
                panic!(
                    "the router's BIRD exited ({status}):\n{}",
                    self.router_log()
                );
            }
            assert!(
                started.elapsed() < START_LIMIT,
                "the router's BIRD did not answer within {START_LIMIT:?}:\n{}",
                self.router_log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Starts web server `i`'s foobar-web on the VIP's port (DSR: the port the clients
    /// asked for) and waits until it answers.
    fn start_web(&mut self, i: usize) {
        let name = web_name(i);
        let dir = stack::server_dir(&self.dir, &name);
        let down = self.dir.join(format!("{name}.down"));
        let plain = stack::plain_web_config(&dir, &name, &down);
        let listen = format!("listen = \"[::]:{WEB_PORT}\"");
        assert!(
            plain.contains(&listen),
            "no {listen} in the web config: {plain}"
        );
        // Kept-alive connections live for two minutes (the tests hold some across a
        // failover); a stop is immediate.
        let text = plain.replace(&listen, &format!("listen = \"[::]:{BGP_VIP_PORT}\""))
            + "\n[limits]\nheader_timeout_ms = 120000\ndrain_ms = 0\n";
        let url = format!("http://{}:{BGP_VIP_PORT}/healthz", web_addr(i));
        let child = start_web_node(
            &self.webs[i],
            &self.router,
            &self.spec.bin_dir,
            &dir,
            &text,
            &url,
        );
        self.web_nodes.push(child);
    }

    fn decap_log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("decap-{}.log", web_name(i)))
    }

    /// Starts `foobar-lb decap` on web server `i` for the VIP, accepting packets
    /// encapsulated by the balancers, and waits until it attached.
    fn start_decap(&mut self, i: usize) {
        let log = self.decap_log_path(i);
        let mut command = self.webs[i].command(&bin(&self.spec.bin_dir, "foobar-lb"));
        command.args([
            "decap",
            "--interface",
            "eth0",
            "--vip",
            &BGP_VIP.to_string(),
        ]);
        // The balancers' IPIP sources, and their own addresses toward the servers.
        for from in [IPIP_SOURCE, SERVER_NETWORK] {
            command.args(["--from", from]);
        }
        self.decaps.push(spawn_logged(&mut command, &log));
        let started = Instant::now();
        while !self.decap_log(i).contains("decapsulating") {
            assert!(
                started.elapsed() < START_LIMIT,
                "decap on {} did not attach within {START_LIMIT:?}:\n{}",
                web_name(i),
                self.decap_log(i)
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        if self.spec.persistent {
            return;
        }
        // The balancers first: each withdraws the VIP before it stops forwarding.
        for b in &mut self.balancers {
            b.stop_all();
            // Whatever outlived its agent (its BIRD, should it not have stopped).
            kill_everything_in(&b.ns);
        }
        if let Some(mut bird) = self.router_bird.take() {
            terminate(&mut bird);
        }
        for mut child in self.decaps.drain(..).chain(self.web_nodes.drain(..)) {
            terminate(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        // The namespaces go as their fields drop.
    }
}

/// Whether `dir` is a BGP lab's directory (it has the router's BIRD configuration).
pub fn is_bgp_lab_dir(dir: &Path) -> bool {
    dir.join("router-bird.conf").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_come_from_single_and_multipath_routes() {
        assert_eq!(parse_next_hops("[]\n"), Vec::<Ipv4Addr>::new());
        assert_eq!(parse_next_hops(""), Vec::<Ipv4Addr>::new());
        let single = r#"[{"dst":"10.0.0.100","gateway":"10.0.0.4","dev":"eth-b","protocol":"bird","metric":32,"flags":[]}]"#;
        assert_eq!(parse_next_hops(single), [Ipv4Addr::new(10, 0, 0, 4)]);
        let multi = r#"[{"dst":"10.0.0.100","protocol":"bird","metric":32,"flags":[],"nexthops":[
            {"gateway":"10.0.0.5","dev":"eth-b","weight":1,"flags":[]},
            {"gateway":"10.0.0.3","dev":"eth-b","weight":1,"flags":[]},
            {"gateway":"10.0.0.4","dev":"eth-b","weight":1,"flags":["dead","linkdown"]}]}]"#;
        assert_eq!(
            parse_next_hops(multi),
            [Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 5)]
        );
    }

    #[test]
    fn the_router_has_a_session_per_balancer_and_merges_their_paths() {
        let conf = router_bird_config(3);
        assert!(conf.contains("merge paths on;"), "{conf}");
        for n in 3..=5 {
            assert!(
                conf.contains(&format!("neighbor 10.0.0.{n} as 65001;")),
                "{conf}"
            );
        }
        assert_eq!(conf.matches("protocol bgp").count(), 3);
    }

    #[test]
    fn a_balancer_announces_the_vip_from_its_own_address() {
        let config = agent_config(2, "maglev", Ipv4Addr::new(10, 0, 0, 4));
        assert!(config.contains("announce_from = \"10.0.0.4\""), "{config}");
        assert!(config.contains("vips = [\"10.0.0.100\"]"), "{config}");
        assert!(
            config.contains("address = \"10.1.0.12\", port = 80"),
            "{config}"
        );
        assert!(
            config.contains("[[bgp.neighbours]]\naddress = \"10.0.0.254\""),
            "{config}"
        );
    }
}
