//! The foobar.com stack on the lab's servers: what each node runs and how it is
//! configured. In a plain lab every server runs only a web node that answers with its
//! name; in a stack lab (`LabSpec::stack`) server1 and server2 each run foobar-web
//! (HTTP, HTTPS, the site's files, the API proxied to both application nodes) and
//! foobar-app and foobar-db (MariaDB: server1 the first primary, server2 its
//! replica), the balancer holds the site's VIP and the database's write and read
//! VIPs (full NAT: the application servers share the database servers' network),
//! and a DNS server answers for foobar.com. MariaDB takes TLS only, with
//! certificates from the lab's CA, from the application and from its replica; the
//! web nodes reach the application nodes in plain HTTP, or over TLS once
//! [`Lab::use_app_tls`](crate::lab::Lab::use_app_tls) turned it on. Every
//! node of a stack server keeps the server's firewall rules for its role
//! (`[firewall]`, [`SERVER_PORTS`]).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use crate::{
    db::TlsFiles,
    lab::{LB_SERVER_SIDE, VIP, WEB_PORT, balancer_server_addr, vip_addr, web_addr, web_addr6},
    netns::Netns,
    pki::Pki,
    process::spawn_logged,
};

/// The site's name.
pub const SITE: &str = "www.foobar.com";
/// The DNS server, on the client network.
pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 53);
/// The web nodes' plain-HTTP port (and the VIP's).
pub const HTTP_PORT: u16 = 80;
/// The web nodes' HTTPS port (and the VIP's).
pub const HTTPS_PORT: u16 = 443;
/// The application nodes' port.
pub const APP_PORT: u16 = 8000;
/// MariaDB's port (and the database VIPs').
pub const DB_PORT: u16 = 3306;
/// The database node agents' HTTP port (`/primary`, `/replica`, `/status`).
pub const DB_AGENT_PORT: u16 = 8306;
/// The balancer's metrics listener: the database nodes' witness.
pub const LB_METRICS_PORT: u16 = 9100;
/// The database's write VIP: the primary.
pub fn db_write_vip() -> Ipv4Addr {
    vip_addr(1)
}
/// The database's read VIP: the replica.
pub fn db_read_vip() -> Ipv4Addr {
    vip_addr(2)
}
/// The application's schema and account.
pub const DB_SCHEMA: &str = "foobar";
/// The application's database user.
pub const DB_USER: &str = "foobar";

/// Every port open on a stack server, whichever of its nodes serves it: each node's
/// firewall drops new connections to any other (`[firewall] host_ports`), so a
/// service added to the servers needs its port here.
pub const SERVER_PORTS: [u16; 5] = [HTTP_PORT, HTTPS_PORT, APP_PORT, DB_PORT, DB_AGENT_PORT];

/// The firewall table of each node of a stack server (`inet <name>`).
pub const FIREWALL_TABLES: [&str; 3] = ["foobar_web", "foobar_app", "foobar_db"];

/// The networks the balancer serves: its NAT VIPs keep the client's address, so the
/// web nodes see the site's connections come from these.
const CLIENT_NETWORKS: [&str; 2] = ["10.0.0.0/24", "fd00::/64"];

/// The balancers on the server network: the sources of health checks and of full NAT
/// (the database VIPs), and of scrapes. With the HA lab's own addresses, so the rules
/// hold with two balancers.
fn balancers() -> Vec<String> {
    let v4 = [
        LB_SERVER_SIDE,
        balancer_server_addr(0),
        balancer_server_addr(1),
    ];
    let mut all: Vec<String> = v4.iter().map(ToString::to_string).collect();
    all.push("fd00:1::1".into());
    all
}

/// The lab's monitoring host on the server network ([`crate::monitoring`]): it
/// scrapes each node's `/metrics`, on that node's port only.
fn monitoring_host() -> Vec<String> {
    vec![crate::monitoring::MONITOR_SERVER_SIDE.to_string()]
}

/// The addresses of servers `which` (each shared by its web, application and
/// database nodes).
fn server_addresses(which: impl IntoIterator<Item = usize>) -> Vec<String> {
    which
        .into_iter()
        .flat_map(|i| [web_addr(i).to_string(), web_addr6(i).to_string()])
        .collect()
}

/// The `[firewall]` section of a stack server's node: the host's ports, and who may
/// reach this node's (`allow`: its ports and their sources).
fn firewall_section(allow: &[(&[u16], Vec<String>)]) -> String {
    let entries: String = allow
        .iter()
        .map(|(ports, from)| {
            let from: Vec<String> = from.iter().map(|s| format!("\"{s}\"")).collect();
            format!("  {{ ports = {ports:?}, from = [{}] }},\n", from.join(", "))
        })
        .collect();
    format!("\n[firewall]\nhost_ports = {SERVER_PORTS:?}\nallow = [\n{entries}]\n")
}

/// The site's pages, shipped with the lab (the seed's "application files").
const SITE_FILES: [(&str, &str); 3] = [
    ("index.html", include_str!("../../site/index.html")),
    ("app.js", include_str!("../../site/app.js")),
    ("style.css", include_str!("../../site/style.css")),
];

/// Writes the site's pages into `root`.
pub fn install_site(root: &Path) {
    std::fs::create_dir_all(root).expect("site root");
    for (name, text) in SITE_FILES {
        std::fs::write(root.join(name), text).expect("site file");
    }
}

/// The directory of server `name` in the lab directory.
pub fn server_dir(lab_dir: &Path, name: &str) -> PathBuf {
    let dir = lab_dir.join(name);
    std::fs::create_dir_all(&dir).expect("server dir");
    dir
}

/// A plain lab's web node: its name as the page, on [`WEB_PORT`].
pub fn plain_web_config(dir: &Path, name: &str, maintenance_file: &Path) -> String {
    let root = dir.join("site");
    std::fs::create_dir_all(&root).expect("site root");
    std::fs::write(root.join("index.html"), format!("{name}\n")).expect("index.html");
    format!(
        "name = \"{name}\"\nmaintenance_file = \"{}\"\n\n[http]\nlisten = \"[::]:{WEB_PORT}\"\n\n\
         [files]\nroot = \"{}\"\n",
        maintenance_file.display(),
        root.display()
    )
}

/// A stack server's web node: the site, the API proxied to every application node,
/// HTTPS with the lab's certificate. With `upstream_ca` it reaches the application
/// nodes over TLS, checking their certificates against that CA.
pub fn web_config(
    dir: &Path,
    name: &str,
    servers: usize,
    pki: &Pki,
    maintenance_file: &Path,
    upstream_ca: Option<&Path>,
) -> String {
    let root = dir.join("site");
    install_site(&root);
    let upstreams: Vec<String> = (0..servers)
        .map(|i| format!("\"{}:{APP_PORT}\"", web_addr(i)))
        .collect();
    // The site's ports from the balancer's side: its NAT VIPs bring the clients' own
    // addresses, and it checks health. And HTTP from the other web nodes, which ask
    // each other for the ACME HTTP-01 tokens they hold (`[acme] peers`).
    let site: Vec<String> = CLIENT_NETWORKS.iter().map(|n| n.to_string()).collect();
    let firewall = firewall_section(&[
        (&[HTTP_PORT, HTTPS_PORT], [site, balancers()].concat()),
        (&[HTTP_PORT], server_addresses(0..servers)),
        (&[HTTP_PORT], monitoring_host()),
    ]);
    let upstream_tls = upstream_ca
        .map(|ca| format!("upstream_tls_ca = \"{}\"\n", ca.display()))
        .unwrap_or_default();
    format!(
        "name = \"{name}\"\naccess_log = \"{}\"\nmaintenance_file = \"{}\"\n\n\
         [http]\nlisten = \"0.0.0.0:{HTTP_PORT}\"\n\n\
         [https]\nlisten = \"0.0.0.0:{HTTPS_PORT}\"\ncertificate = \"{}\"\nkey = \"{}\"\nhsts_max_age_s = 31536000\n\n\
         [files]\nroot = \"{}\"\n\n\
         [proxy]\npath = \"/api/\"\nupstreams = [{}]\nmax_fails = 1\nfail_timeout_ms = 5000\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\n{upstream_tls}{firewall}",
        dir.join("web-access.log").display(),
        maintenance_file.display(),
        pki.cert("www").display(),
        pki.key("www").display(),
        root.display(),
        upstreams.join(", "),
    )
}

/// A stack server's application node: writes through the write VIP, reads through
/// the read VIP. Its database deadlines sit between semi-sync's wait (0.5 s) and the
/// web node's for its answer (2 s), so a stuck query fails here, not as a timeout
/// that takes the whole application node out of the web node's rotation. It reaches
/// the database over TLS, trusting the lab's CA. Its port takes the web nodes of the
/// lab's `servers`, and the balancers (its `/healthz` and `/metrics` are there too).
/// With `tls` it serves HTTPS only, with that certificate.
pub fn app_config(
    dir: &Path,
    name: &str,
    servers: usize,
    password_file: &Path,
    tls: Option<&AppTlsFiles>,
) -> String {
    let ca = TlsFiles::of(dir).ca;
    let firewall = firewall_section(&[
        (
            &[APP_PORT],
            [server_addresses(0..servers), balancers()].concat(),
        ),
        (&[APP_PORT], monitoring_host()),
    ]);
    let tls = tls
        .map(|files| {
            format!(
                "\n[tls]\ncertificate = \"{}\"\nkey = \"{}\"\n",
                files.certificate.display(),
                files.key.display()
            )
        })
        .unwrap_or_default();
    app_node_config(dir, name, password_file, APP_PORT, Some(ca.as_path())) + &tls + &firewall
}

/// The certificate and key of a stack server's application node, in the server's
/// directory, for web-to-app TLS ([`crate::lab::Lab::use_app_tls`]).
pub struct AppTlsFiles {
    /// The certificate, from the lab's CA, for the server's address: the web nodes
    /// connect to that and check it.
    pub certificate: PathBuf,
    /// Its key (mode 0600).
    pub key: PathBuf,
}

impl AppTlsFiles {
    /// The files of the server whose directory is `dir`.
    pub fn of(dir: &Path) -> AppTlsFiles {
        AppTlsFiles {
            certificate: dir.join("app.crt"),
            key: dir.join("app.key"),
        }
    }

    /// Issues server `i`'s application certificate, unless there is one.
    pub fn install(&self, pki: &Pki, i: usize) {
        if self.certificate.exists() && self.key.exists() {
            return;
        }
        let address = web_addr(i).to_string();
        pki.issue_to(&self.certificate, &self.key, &[address.as_str()], "");
    }
}

/// An application node as [`app_config`] on `port`, reaching the database over TLS
/// trusting `db_ca`, or in plain text without (what the stack benchmark compares).
pub fn app_node_config(
    dir: &Path,
    name: &str,
    password_file: &Path,
    port: u16,
    db_ca: Option<&Path>,
) -> String {
    let (write, read) = (db_write_vip(), db_read_vip());
    let access_log = if port == APP_PORT {
        dir.join("app-access.log")
    } else {
        dir.join(format!("app-{port}-access.log"))
    };
    let tls = db_ca
        .map(|ca| format!("tls_ca = \"{}\"\n", ca.display()))
        .unwrap_or_default();
    format!(
        "listen = \"0.0.0.0:{port}\"\nname = \"{name}\"\naccess_log = \"{}\"\n\n\
         [database]\nwrite = \"{write}:{DB_PORT}\"\nread = \"{read}:{DB_PORT}\"\nname = \"{DB_SCHEMA}\"\n\
         user = \"{DB_USER}\"\npassword_file = \"{}\"\nconnect_timeout_ms = 500\nquery_timeout_ms = 1500\n{tls}",
        access_log.display(),
        password_file.display(),
    )
}

/// Server `i`'s database node: server1 is the pair's first primary, server2 its
/// replica; the balancers are the witness of automatic failover. MariaDB takes TLS
/// only, and replicates over it (the files of [`TlsFiles`] in the server's directory).
pub fn db_config(dir: &Path, i: usize, password_file: &Path, repl_password_file: &Path) -> String {
    let peer = web_addr(1 - i);
    let tls = TlsFiles::of(dir);
    // What really arrives: the application nodes reach MariaDB through the balancer's
    // database VIPs, full NAT, so with the balancer's address (the VIPs' access list
    // lets in the application nodes only, see `db_vip_section`); the balancers check
    // the agent; the other database node replicates, and fences through the agent.
    // The monitoring host reads the agent's /metrics.
    let firewall = firewall_section(&[
        (
            &[DB_PORT, DB_AGENT_PORT],
            [balancers(), server_addresses([1 - i])].concat(),
        ),
        (&[DB_AGENT_PORT], monitoring_host()),
    ]);
    format!(
        "name = \"db{n}\"\nserver_id = {n}\nlisten = \"{me}:{DB_PORT}\"\nhttp = \"{me}:{DB_AGENT_PORT}\"\n\
         state_dir = \"{}\"\n\n\
         [app]\ndatabase = \"{DB_SCHEMA}\"\nuser = \"{DB_USER}\"\npassword_file = \"{}\"\nallow_from = \"10.1.0.%\"\n\n\
         [replication]\ninitial_role = \"{}\"\npassword_file = \"{}\"\nsemi_sync_timeout_ms = 500\n\
         peer = {{ mysql = \"{peer}:{DB_PORT}\", agent = \"{peer}:{DB_AGENT_PORT}\" }}\n\n\
         [replication.failover]\nwitness = \"{LB_SERVER_SIDE}:{LB_METRICS_PORT}\"\nwrite_vip = \"db-write\"\nlease_ms = 800\n\n\
         [tls]\ncertificate = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n{firewall}",
        dir.join("db").display(),
        password_file.display(),
        if i == 0 { "primary" } else { "replica" },
        repl_password_file.display(),
        tls.certificate.display(),
        tls.key.display(),
        tls.ca.display(),
        n = i + 1,
        me = web_addr(i),
    )
}

/// The site's VIPs on the balancer of a stack lab: name, port (the VIP's and the web
/// nodes'), and the protocol of their health checks.
pub const SITE_VIPS: [(&str, u16, &str); 2] =
    [("www", HTTP_PORT, "http"), ("www-tls", HTTPS_PORT, "https")];

/// Every web node's weight on a VIP of [`vip_section`]: what a drained one gets back.
pub const SITE_WEIGHT: u32 = 1;

/// The balancer of a stack lab: the VIP on port 80 and 443, round robin over the web
/// nodes as the seed says, each checked on `/healthz` over its own protocol; the
/// database's write and read VIPs. The servers' side takes both roles: the
/// application servers are the database VIPs' clients.
pub fn balancer_config(servers: usize) -> String {
    let site: String = SITE_VIPS
        .iter()
        .map(|&(name, port, check)| vip_section(name, port, check, servers))
        .collect();
    format!(
        "[dataplane]\ninterfaces = [{{ name = \"eth-client\", role = \"client\" }}, \"eth-servers\"]\n\
         xdp_mode = \"native\"\n\n[metrics]\nlisten = \"0.0.0.0:{LB_METRICS_PORT}\"\n{site}{}{}",
        db_vip_section("db-write", db_write_vip(), "/primary", servers),
        db_vip_section("db-read", db_read_vip(), "/replica", servers),
    )
}

/// A database VIP: full NAT over every server's MariaDB, each checked on its node
/// agent's `path` (`/primary` or `/replica`), quickly; flows of a backend that goes
/// down are reset, so clients reconnect to the one that took its role.
pub fn db_vip_section(name: &str, address: Ipv4Addr, path: &str, servers: usize) -> String {
    let backends: Vec<String> = (0..servers)
        .map(|i| format!("  {{ address = \"{}\", port = {DB_PORT} }},", web_addr(i)))
        .collect();
    // The application nodes only: behind full NAT MariaDB sees the balancer's address,
    // so the servers' firewalls cannot tell who asks; this list can.
    let clients: Vec<String> = (0..servers)
        .map(|i| format!("\"{}/32\"", web_addr(i)))
        .collect();
    let acl = clients.join(", ");
    format!(
        "\n[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {DB_PORT}\nforwarding = \"fullnat\"\n\
         on_backend_down = \"reset\"\nacl = {{ allow = [{acl}] }}\nbackends = [\n{}\n]\n[vips.health_check]\ntype = \"http\"\nport = {DB_AGENT_PORT}\n\
         path = \"{path}\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 2\n",
        backends.join("\n")
    )
}

/// A `[[vips]]` section: the VIP's `port`, round robin over every server's same port
/// (weight [`SITE_WEIGHT`]), checked on `/healthz` by `check` (`http` or `https`).
pub fn vip_section(name: &str, port: u16, check: &str, servers: usize) -> String {
    let backends: Vec<String> = (0..servers)
        .map(|i| {
            format!(
                "  {{ address = \"{}\", port = {port}, weight = {SITE_WEIGHT} }},",
                web_addr(i)
            )
        })
        .collect();
    format!(
        "\n[[vips]]\nname = \"{name}\"\naddress = \"{VIP}\"\nport = {port}\nscheduler = \"rr\"\n\
         backends = [\n{}\n]\n[vips.health_check]\ntype = \"{check}\"\npath = \"/healthz\"\n\
         interval_ms = 500\ntimeout_ms = 400\nrise = 2\nfall = 2\n",
        backends.join("\n")
    )
}

/// Starts the DNS server, authoritative for foobar.com: www.foobar.com and
/// foobar.com are the VIP.
pub fn start_dns(ns: &Netns, dir: &Path) -> Child {
    let mut command = ns.command("dnsmasq");
    command
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
        ])
        .args([
            "--bind-interfaces",
            "--user=root",
            "--log-facility=-",
            "--log-queries",
        ])
        .arg(format!("--listen-address={DNS_ADDR}"))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .arg(format!("--auth-server=ns.foobar.com,{DNS_ADDR}"))
        .arg("--auth-zone=foobar.com")
        .arg("--auth-soa=1,hostmaster.foobar.com")
        .arg(format!("--host-record={SITE},{VIP}"))
        .arg(format!("--host-record=foobar.com,{VIP}"))
        .arg(format!("--host-record=ns.foobar.com,{DNS_ADDR}"));
    spawn_logged(&mut command, &dir.join("dns.log"))
}

/// `ip netns exec <ns> program`: unlike [`Netns::command`] it also gives the program
/// the namespace's `/etc/netns/<ns>/resolv.conf`, so names resolve through the lab's DNS.
pub fn resolving_command(ns: &Netns, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns.name(), program]);
    command
}

impl crate::lab::Lab {
    /// Waits until the (first) balancer reports every backend of every VIP up.
    pub fn wait_for_backends_up(&self) {
        let servers = self.webs.len();
        crate::process::wait_until(
            std::time::Duration::from_secs(30),
            "every backend up",
            || {
                let status: String = self
                    .cli_ok(&["-o", "json", "status"])
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                // Every backend of the site's VIPs; one of each database VIP's (the
                // primary, the replica).
                let vips = status.matches("\"scheduler\":").count();
                let db_vips = status.matches("\"name\":\"db-").count();
                vips > 0
                    && status.matches("\"health\":\"up\"").count()
                        == (vips - db_vips) * servers + db_vips
            },
        );
        if !self.is_stack() {
            return;
        }
        // And every application node reaching its database through the VIPs.
        for i in 0..servers {
            crate::process::wait_until(
                std::time::Duration::from_secs(30),
                &format!("{}'s application node healthy", self.server_name(i)),
                || {
                    self.app_curl(i, "/healthz", &["-sf", "-o", "/dev/null", "-m", "1"])
                        .status()
                        .is_ok_and(|s| s.success())
                },
            );
        }
    }

    /// `curl` in the (first) balancer's namespace to `path` on server `i`'s application
    /// node, `args` first: over HTTPS trusting the lab's CA once
    /// [`Lab::use_app_tls`](crate::lab::Lab::use_app_tls) turned it on, else plain HTTP.
    pub fn app_curl(&self, i: usize, path: &str, args: &[&str]) -> Command {
        let mut command = self.lb().command("curl");
        command.args(args);
        let scheme = if self.uses_app_tls() {
            command
                .arg("--cacert")
                .arg(self.pki.as_ref().expect("a stack lab").ca_cert());
            "https"
        } else {
            "http"
        };
        command.arg(format!("{scheme}://{}:{APP_PORT}{path}", web_addr(i)));
        command
    }

    /// Deletes every node's firewall table on every server, as if none had a
    /// `[firewall]`: for a benchmark that reaches the servers on ports or from
    /// sources the stack's rules refuse. A node started again writes its table again.
    pub fn open_firewalls(&self) {
        for server in &self.webs {
            for table in FIREWALL_TABLES {
                // A node without a table (a plain lab) is fine.
                let _ = server
                    .command("nft")
                    .args(["delete", "table", "inet", table])
                    .output();
            }
        }
    }

    /// `curl` from the client, resolving through the lab's DNS and trusting the lab's
    /// CA; `args` follow (URLs included).
    pub fn site_curl(&self, args: &[&str]) -> std::process::Output {
        let pki = self.pki.as_ref().expect("a stack lab");
        // Once the site's certificate comes from pebble, its root is trusted too.
        let trusted = self
            .acme
            .as_ref()
            .map_or_else(|| pki.ca_cert(), |pebble| pebble.trusted());
        resolving_command(&self.client, "curl")
            .args(["-sS", "-m", "5", "--cacert"])
            .arg(trusted)
            .args(args)
            .output()
            .expect("run curl")
    }

    /// Which server answered a GET of `url` from the client (its `X-Served-By`), on
    /// a new connection; `None` if the request failed.
    pub fn served_by(&self, url: &str) -> Option<String> {
        let out = self.site_curl(&["-f", "-o", "/dev/null", "-D", "-", url]);
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("x-served-by")
                    .then(|| value.trim().to_owned())
            })
    }
}
