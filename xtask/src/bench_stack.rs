//! `cargo xtask bench stack`: the web tier of the foobar.com stack, foobar-web beside
//! nginx in the same run. wrk on the client resolves www.foobar.com through the lab's
//! DNS and goes through the VIP (foobar-lb, round robin) to server1 and server2.
//!
//! Both web servers run on both servers at once: foobar-web on ports 80 and 443, nginx
//! on 8080 and 8443, each behind VIPs of its own. They serve the same files and proxy
//! `/api/` to the same two application nodes (on MariaDB), with the same certificate;
//! nginx is configured for that role (keep-alive upstream pool, HTTP/2 by ALPN, a
//! shared TLS session cache, an access log as foobar-web writes). The runs alternate
//! between the two, round after round, so neither gains from going second (warm
//! caches, a quieter machine).
//!
//! The cost of the internal TLS: API reads and writes through the whole stack
//! (HTTPS, foobar-web), round after round with the lab's application nodes, which
//! reach MariaDB over TLS, and with nodes of the benchmark's in their place (same
//! port) that reach it in plain text (MariaDB let to take both:
//! `require_secure_transport` turned off, as during a migration to TLS).
//! Replication stays on TLS in both.

use std::{path::Path, process::Child};

use anyhow::{Context, Result, bail};
use foobar_lab::{
    lab::{Lab, LabSpec, terminate, web_addr},
    netns::unique_name,
    process::{bin, spawn_logged},
    stack::{APP_PORT, SITE, app_node_config, balancer_config, resolving_command, vip_section},
};

use crate::wrk::{self, Figures};

/// nginx's ports on the servers and on the VIP.
const NGINX_HTTP: u16 = 8080;
const NGINX_HTTPS: u16 = 8443;

/// The cases: what is fetched, over which scheme.
const CASES: [(&str, &str, &str); 4] = [
    ("static_http", "http", "/"),
    ("static_https", "https", "/"),
    ("api_read_http", "http", "/api/posts?limit=10"),
    ("api_read_https", "https", "/api/posts?limit=10"),
];

/// The web servers compared, with their HTTP and HTTPS ports.
const WEBS: [(&str, u16, u16); 2] = [("foobar-web", 80, 443), ("nginx", NGINX_HTTP, NGINX_HTTPS)];

/// The internal-TLS cases, through the site: what is fetched.
const INTERNAL_CASES: [(&str, &str); 2] = [
    ("api_read", "/api/posts?limit=10"),
    ("api_write", "/api/posts"),
];

/// wrk's script for `api_write`.
const POST_SCRIPT: &str = "wrk.method = \"POST\"\n\
    wrk.body = '{\"author\":\"bench\",\"text\":\"a write through the stack\"}'\n\
    wrk.headers[\"Content-Type\"] = \"application/json\"\n";

/// Runs every case with each web server, alternating, `rounds` times; prints the figures.
pub fn run(duration: u32, connections: u32, rounds: u32) -> Result<()> {
    let mut lab = Lab::up(LabSpec {
        prefix: unique_name("bstack"),
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
        ha: false,
        stack: true,
        router: false,
    });
    // nginx listens on ports the stack's firewalls keep closed.
    lab.open_firewalls();
    lab.write_config(&format!(
        "{}{}{}",
        balancer_config(lab.webs.len()),
        vip_section("nginx", NGINX_HTTP, "http", lab.webs.len()),
        vip_section("nginx-tls", NGINX_HTTPS, "https", lab.webs.len()),
    ));
    let mut nginx: Vec<Child> = (0..lab.webs.len())
        .map(|i| start_nginx(&lab, i))
        .collect::<Result<_>>()?;
    for i in 0..lab.webs.len().min(2) {
        lab.db_sql(i, "SET GLOBAL require_secure_transport = OFF")
            .map_err(anyhow::Error::msg)?;
    }
    let mut plain_apps: Vec<Child> = Vec::new();
    lab.start_agent();
    let measured = (|| {
        lab.wait_for_backends_up();
        for n in 0..20 {
            let body = format!("{{\"author\":\"bench\",\"text\":\"post {n}\"}}");
            let out = lab.site_curl(&[
                "-f",
                "-H",
                "Content-Type: application/json",
                "-d",
                &body,
                &format!("https://{SITE}/api/posts"),
            ]);
            if !out.status.success() {
                bail!("seeding posts: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let mut runs: Vec<(&str, &str, Figures)> = Vec::new();
        for _ in 0..rounds {
            for (case, scheme, path) in CASES {
                for (web, http, https) in WEBS {
                    let port = if scheme == "http" { http } else { https };
                    let url = format!("{scheme}://{SITE}:{port}{path}");
                    runs.push((web, case, wrk(&lab, &url, duration, connections, &[])?));
                }
            }
        }
        let script = lab.dir.join("post.lua");
        std::fs::write(&script, POST_SCRIPT)?;
        let script = script.to_str().context("a UTF-8 path")?;
        let mut internal: Vec<(&str, bool, Figures)> = Vec::new();
        for _ in 0..rounds {
            for tls in [true, false] {
                switch_apps(&mut lab, &mut plain_apps, tls)?;
                for (case, path) in INTERNAL_CASES {
                    let url = format!("https://{SITE}{path}");
                    let post = ["-s", script];
                    let extra: &[&str] = if case == "api_write" { &post } else { &[] };
                    let figures = wrk(&lab, &url, duration, connections, extra)?;
                    internal.push((case, tls, figures));
                }
            }
        }
        Ok((runs, internal))
    })();
    for child in nginx.iter_mut().chain(&mut plain_apps) {
        terminate(child);
    }
    drop(lab);
    let (runs, internal) = measured?;

    // Per web server and case: the mean over the rounds.
    let mean = |web: &str, case: &str, figure: fn(&Figures) -> f64| {
        let values: Vec<f64> = runs
            .iter()
            .filter(|(w, c, _)| *w == web && *c == case)
            .map(|(_, _, f)| figure(f))
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let mut errors = 0;
    for (case, _, _) in CASES {
        for (web, _, _) in WEBS {
            let failed: u64 = runs
                .iter()
                .filter(|(w, c, _)| *w == web && *c == case)
                .map(|(_, _, f)| f.errors)
                .sum();
            errors += failed;
            println!(
                "{{\"bench\":\"stack\",\"web\":\"{web}\",\"case\":\"{case}\",\"requests_per_second\":{:.0},\
                 \"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{failed},\"connections\":{connections},\
                 \"duration_s\":{duration},\"rounds\":{rounds}}}",
                mean(web, case, |f| f.requests_per_second),
                mean(web, case, |f| f.latency_us[0]) / 1000.0,
                mean(web, case, |f| f.latency_us[3]) / 1000.0,
            );
        }
    }
    let ratios: Vec<String> = CASES
        .iter()
        .map(|(case, _, _)| {
            let ratio = mean("foobar-web", case, |f| f.requests_per_second)
                / mean("nginx", case, |f| f.requests_per_second);
            format!("{case} {ratio:.2}")
        })
        .collect();
    println!("foobar-web / nginx: {}", ratios.join(", "));
    // The internal TLS's cost, per case: the mean over the rounds, with and without.
    let mut tls_ratios = Vec::new();
    for (case, _) in INTERNAL_CASES {
        let mut rates = [0.0; 2];
        for (slot, tls) in [true, false].into_iter().enumerate() {
            let figures: Vec<&Figures> = internal
                .iter()
                .filter(|(c, t, _)| *c == case && *t == tls)
                .map(|(_, _, f)| f)
                .collect();
            let mean = |figure: fn(&Figures) -> f64| {
                figures.iter().map(|f| figure(f)).sum::<f64>() / figures.len().max(1) as f64
            };
            let failed: u64 = figures.iter().map(|f| f.errors).sum();
            errors += failed;
            rates[slot] = mean(|f| f.requests_per_second);
            println!(
                "{{\"bench\":\"stack\",\"web\":\"foobar-web\",\"case\":\"{case}\",\"internal_tls\":{tls},\
                 \"requests_per_second\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{failed},\
                 \"connections\":{connections},\"duration_s\":{duration},\"rounds\":{rounds}}}",
                rates[slot],
                mean(|f| f.latency_us[0]) / 1000.0,
                mean(|f| f.latency_us[3]) / 1000.0,
            );
        }
        tls_ratios.push(format!("{case} {:.2}", rates[0] / rates[1]));
    }
    println!("internal TLS / plain text: {}", tls_ratios.join(", "));
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

fn wrk(lab: &Lab, url: &str, duration: u32, connections: u32, extra: &[&str]) -> Result<Figures> {
    wrk::run(
        resolving_command(&lab.client, "wrk"),
        connections,
        duration,
        extra,
        url,
    )
}

/// Puts on every server the application node that reaches MariaDB over TLS (the
/// lab's) or in plain text (`plain`, the benchmark's), in the other's place; then
/// waits until the site answers through them and warms their connections up.
fn switch_apps(lab: &mut Lab, plain: &mut Vec<Child>, internal_tls: bool) -> Result<()> {
    let servers = lab.webs.len();
    if internal_tls && !plain.is_empty() {
        for mut child in plain.drain(..) {
            terminate(&mut child);
        }
        for i in 0..servers {
            lab.start_app(i);
        }
    } else if !internal_tls && plain.is_empty() {
        for i in 0..servers {
            lab.stop_app(i);
            plain.push(start_plain_app(lab, i)?);
        }
    }
    // A node started again wrote its table again.
    lab.open_firewalls();
    lab.wait_for_backends_up();
    // A second of reads: the web nodes' pools drop their connections to the nodes
    // that left before a measured run could meet them.
    let warm_up = format!("https://{SITE}/api/posts?limit=10");
    wrk(lab, &warm_up, 1, 4, &[])?;
    Ok(())
}

/// An application node on server `i`, in place of the lab's, that reaches MariaDB in
/// plain text.
fn start_plain_app(lab: &Lab, i: usize) -> Result<Child> {
    let name = lab.server_name(i);
    let dir = lab.dir.join(&name);
    let config = dir.join("app-plain.toml");
    std::fs::write(
        &config,
        app_node_config(&dir, &name, &lab.db_password_file(), APP_PORT, None),
    )?;
    Ok(spawn_logged(
        lab.webs[i]
            .command(&bin(&lab.spec().bin_dir, "foobar-app"))
            .arg("--config")
            .arg(&config),
        &dir.join("app-plain.log"),
    ))
}

/// nginx beside foobar-web on server `i`.
fn start_nginx(lab: &Lab, i: usize) -> Result<Child> {
    let name = lab.server_name(i);
    let dir = lab.dir.join(&name).join("nginx");
    std::fs::create_dir_all(dir.join("tmp"))?;
    let pki = lab.pki.as_ref().context("a stack lab")?;
    let config = nginx_config(
        &dir,
        &name,
        &lab.dir.join(&name).join("site"),
        &pki.cert("www"),
        &pki.key("www"),
        lab.webs.len(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    Ok(spawn_logged(
        lab.webs[i]
            .command("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir),
        &dir.join("nginx.log"),
    ))
}

fn nginx_config(
    dir: &Path,
    name: &str,
    root: &Path,
    cert: &Path,
    key: &Path,
    servers: usize,
) -> String {
    let upstreams: String = (0..servers)
        .map(|i| {
            format!(
                "    server {}:{APP_PORT} max_fails=1 fail_timeout=5s;\n",
                web_addr(i)
            )
        })
        .collect();
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  include /etc/nginx/mime.types;\n  default_type application/octet-stream;\n\
         access_log {d}/access.log combined;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
         keepalive_timeout 65;\n  keepalive_requests 1000000;\n  server_tokens off;\n\
         client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
         uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
         upstream app {{\n{upstreams}    keepalive 32;\n  }}\n\
         server {{\n    listen {NGINX_HTTP} reuseport;\n    listen {NGINX_HTTPS} ssl http2 reuseport;\n    server_name {SITE};\n\
         ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_session_cache shared:SSL:10m;\n\
         root {};\n    index index.html;\n    add_header X-Served-By {name} always;\n\
         add_header Strict-Transport-Security \"max-age=31536000\" always;\n\
         location = /healthz {{ return 200 \"ok\\n\"; }}\n\
         location /api/ {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         proxy_set_header Host $host;\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         proxy_set_header X-Forwarded-Proto $scheme;\n      proxy_connect_timeout 500ms;\n      proxy_read_timeout 5s;\n\
         proxy_next_upstream error timeout;\n    }}\n  }}\n}}\n",
        cert.display(),
        key.display(),
        root.display(),
    )
}
