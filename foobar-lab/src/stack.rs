//! The foobar.com stack on the lab's servers: what each node runs and how it is
//! configured. In a plain lab every server runs only a web node that answers with its
//! name; in a stack lab (`LabSpec::stack`) server1 and server2 each run foobar-web
//! (HTTP, HTTPS, the site's files, the API proxied to both application nodes) and
//! foobar-app and foobar-db (MariaDB: server1 the first primary, server2 its
//! replica), the balancer holds the site's VIP and the database's write and read
//! VIPs (full NAT: the application servers share the database servers' network),
//! and a DNS server answers for foobar.com.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use crate::{
    lab::{LB_SERVER_SIDE, VIP, WEB_PORT, vip_addr, web_addr},
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
/// HTTPS with the lab's certificate.
pub fn web_config(
    dir: &Path,
    name: &str,
    servers: usize,
    pki: &Pki,
    maintenance_file: &Path,
) -> String {
    let root = dir.join("site");
    install_site(&root);
    let upstreams: Vec<String> = (0..servers)
        .map(|i| format!("\"{}:{APP_PORT}\"", web_addr(i)))
        .collect();
    format!(
        "name = \"{name}\"\naccess_log = \"{}\"\nmaintenance_file = \"{}\"\n\n\
         [http]\nlisten = \"0.0.0.0:{HTTP_PORT}\"\n\n\
         [https]\nlisten = \"0.0.0.0:{HTTPS_PORT}\"\ncertificate = \"{}\"\nkey = \"{}\"\nhsts_max_age_s = 31536000\n\n\
         [files]\nroot = \"{}\"\n\n\
         [proxy]\npath = \"/api/\"\nupstreams = [{}]\nmax_fails = 1\nfail_timeout_ms = 5000\nconnect_timeout_ms = 500\nread_timeout_ms = 2000\n",
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
/// that takes the whole application node out of the web node's rotation.
pub fn app_config(dir: &Path, name: &str, password_file: &Path) -> String {
    let (write, read) = (db_write_vip(), db_read_vip());
    format!(
        "listen = \"0.0.0.0:{APP_PORT}\"\nname = \"{name}\"\naccess_log = \"{}\"\n\n\
         [database]\nwrite = \"{write}:{DB_PORT}\"\nread = \"{read}:{DB_PORT}\"\nname = \"{DB_SCHEMA}\"\n\
         user = \"{DB_USER}\"\npassword_file = \"{}\"\nconnect_timeout_ms = 500\nquery_timeout_ms = 1500\n",
        dir.join("app-access.log").display(),
        password_file.display(),
    )
}

/// Server `i`'s database node: server1 is the pair's first primary, server2 its
/// replica; the balancers are the witness of automatic failover.
pub fn db_config(dir: &Path, i: usize, password_file: &Path, repl_password_file: &Path) -> String {
    let peer = web_addr(1 - i);
    format!(
        "name = \"db{n}\"\nserver_id = {n}\nlisten = \"{me}:{DB_PORT}\"\nhttp = \"{me}:{DB_AGENT_PORT}\"\n\
         state_dir = \"{}\"\n\n\
         [app]\ndatabase = \"{DB_SCHEMA}\"\nuser = \"{DB_USER}\"\npassword_file = \"{}\"\nallow_from = \"10.1.0.%\"\n\n\
         [replication]\ninitial_role = \"{}\"\npassword_file = \"{}\"\nsemi_sync_timeout_ms = 500\n\
         peer = {{ mysql = \"{peer}:{DB_PORT}\", agent = \"{peer}:{DB_AGENT_PORT}\" }}\n\n\
         [replication.failover]\nwitness = \"{LB_SERVER_SIDE}:{LB_METRICS_PORT}\"\nwrite_vip = \"db-write\"\nlease_ms = 800\n",
        dir.join("db").display(),
        password_file.display(),
        if i == 0 { "primary" } else { "replica" },
        repl_password_file.display(),
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
    format!(
        "\n[[vips]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {DB_PORT}\nforwarding = \"fullnat\"\n\
         on_backend_down = \"reset\"\nbackends = [\n{}\n]\n[vips.health_check]\ntype = \"http\"\nport = {DB_AGENT_PORT}\n\
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
            let url = format!("http://{}:{APP_PORT}/healthz", web_addr(i));
            crate::process::wait_until(
                std::time::Duration::from_secs(30),
                &format!("{}'s application node healthy", self.server_name(i)),
                || {
                    self.lb()
                        .command("curl")
                        .args(["-sf", "-o", "/dev/null", "-m", "1", &url])
                        .status()
                        .is_ok_and(|s| s.success())
                },
            );
        }
    }

    /// `curl` from the client, resolving through the lab's DNS and trusting the lab's
    /// CA; `args` follow (URLs included).
    pub fn site_curl(&self, args: &[&str]) -> std::process::Output {
        let pki = self.pki.as_ref().expect("a stack lab");
        resolving_command(&self.client, "curl")
            .args(["-sS", "-m", "5", "--cacert"])
            .arg(pki.ca_cert())
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
