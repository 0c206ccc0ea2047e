//! The database pair of a stack lab, as tests and benchmarks drive it: its nodes'
//! TLS files, their status, SQL as MariaDB's root, and the failover drill (a writer
//! posting through the whole site while the primary's server dies).

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    lab::{Lab, web_addr},
    pki::Pki,
    stack::{DB_AGENT_PORT, SITE, db_read_vip, db_write_vip, server_dir},
};

/// The TLS files of a stack server, in its directory: its database node's
/// certificate and key, and the lab's CA, which its database node (replicating)
/// and its application node (connecting) check the other side's certificate with.
pub struct TlsFiles {
    /// MariaDB's certificate.
    pub certificate: PathBuf,
    /// Its key (mode 0600).
    pub key: PathBuf,
    /// The lab's CA certificate.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files of the server whose directory is `dir`.
    pub fn of(dir: &Path) -> TlsFiles {
        TlsFiles {
            certificate: dir.join("db.crt"),
            key: dir.join("db.key"),
            ca: dir.join("ca.crt"),
        }
    }

    /// Puts the lab's CA in place, as every server has it.
    pub fn install_ca(&self, pki: &Pki) {
        std::fs::copy(pki.ca_cert(), &self.ca).expect("ca.crt");
    }

    /// Puts the CA in place and issues server `i`'s database certificate, unless
    /// there is one. It names the server's address (its peer replicates from it) and
    /// the database VIPs' (the application connects to those, and with full NAT the
    /// address it checks is the VIP's). IP addresses only (the application, the
    /// replica and the `mariadb` client all connect to addresses), the server's own
    /// also as the common name, for clients that look there only.
    pub fn install(&self, pki: &Pki, i: usize) {
        self.install_ca(pki);
        if self.certificate.exists() && self.key.exists() {
            return;
        }
        let names = [web_addr(i), db_write_vip(), db_read_vip()].map(|a| a.to_string());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        pki.issue_to(&self.certificate, &self.key, &names, "");
    }
}

impl Lab {
    /// `GET path` of server `i`'s database node agent, from the balancer: the HTTP
    /// status (0: no answer) and the body.
    pub fn db_agent(&self, i: usize, path: &str) -> (u16, String) {
        let out = self
            .lb()
            .command("curl")
            .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://{}:{DB_AGENT_PORT}{path}", web_addr(i)))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// Whether server `i`'s node reports `role` (its `/status` is compact JSON).
    pub fn db_role_is(&self, i: usize, role: &str) -> bool {
        self.db_agent(i, "/status")
            .1
            .contains(&format!("\"role\":\"{role}\""))
    }

    /// `mariadb` as root over server `i`'s socket, running `query`.
    pub fn db_sql_command(&self, i: usize, query: &str) -> Command {
        let socket = server_dir(&self.dir, &self.server_name(i)).join("db/mysqld.sock");
        let mut command = self.webs[i].command("mariadb");
        command
            .arg("--no-defaults")
            .arg(format!("--socket={}", socket.display()))
            .args(["-uroot", "-N", "-B", "-e", query]);
        command
    }

    /// Runs `query` as root on server `i`: its rows as text, or the error.
    pub fn db_sql(&self, i: usize, query: &str) -> Result<String, String> {
        let out = self
            .db_sql_command(i, query)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!(
                "{query}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Posts `text` through the site (HTTPS, the site's VIP, a web node, an
    /// application node, the write VIP); `extra` curl arguments before the URL. The
    /// deadline, 3 s, is beyond what the web node gives an application node (2 s), so
    /// a write stuck on a dead server fails soon and a gap is measured finely. The
    /// answer's body if the post was acknowledged.
    pub fn post_through_site(&self, text: &str, extra: &[&str]) -> Result<String, String> {
        let body = format!(r#"{{"author":"lab","text":"{text}"}}"#);
        let url = format!("https://{SITE}/api/posts");
        let mut args = vec![
            "-w",
            "\n%{http_code}",
            "-m",
            "3",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ];
        args.extend(extra);
        args.push(&url);
        let out = self.site_curl(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        if out.status.success() && code.starts_with('2') {
            Ok(body.to_owned())
        } else {
            Err(format!(
                "{code} {} {}",
                body.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The failover drill: posts `<tag> <n>` through the site one after another;
    /// 1.5 s in, server `primary` dies (MariaDB killed, the server cut off); goes on
    /// until 20 posts have been acknowledged after that, or a minute has passed.
    pub fn crash_primary_under_writes(&self, primary: usize, tag: &str) -> CrashRun {
        let started = Instant::now();
        let replica = 1 - primary;
        let mut killed = None;
        let mut writes = Vec::new();
        // When the replica's node says it is the primary, watched beside the writer.
        let promoted = thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while started.elapsed() < Duration::from_secs(70) {
                    if self.db_role_is(replica, "primary") {
                        return Some(started.elapsed());
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                None
            });
            for n in 0.. {
                if killed.is_none() && started.elapsed() >= Duration::from_millis(1500) {
                    self.kill_mariadb(primary);
                    self.cut_server(primary);
                    killed = Some(started.elapsed());
                }
                let start = started.elapsed();
                let text = format!("{tag} {n}");
                let answer = self.post_through_site(&text, &[]);
                writes.push(Write {
                    text,
                    start,
                    end: started.elapsed(),
                    ok: answer.is_ok(),
                    error: answer.err(),
                });
                let after =
                    killed.map_or(0, |k| writes.iter().filter(|w| w.ok && w.start > k).count());
                if after >= 20 || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            watcher.join().ok().flatten()
        });
        let killed = killed.expect("the writer ran past the kill");
        CrashRun {
            writes,
            killed,
            promoted: promoted.map(|p| p.saturating_sub(killed)),
        }
    }
}

/// One post of the drill, its times since the drill began.
#[derive(Debug)]
pub struct Write {
    /// What was posted.
    pub text: String,
    /// When it was sent.
    pub start: Duration,
    /// When it was answered (or given up).
    pub end: Duration,
    /// Acknowledged.
    pub ok: bool,
    /// Why not: the HTTP status and body, or curl's complaint.
    pub error: Option<String>,
}

/// What the failover drill saw.
#[derive(Debug)]
pub struct CrashRun {
    /// Every post.
    pub writes: Vec<Write>,
    /// When the primary died.
    pub killed: Duration,
    /// How long after that the replica's node said it was the primary.
    pub promoted: Option<Duration>,
}

impl CrashRun {
    /// The posts acknowledged.
    pub fn acknowledged(&self) -> Vec<&str> {
        self.writes
            .iter()
            .filter(|w| w.ok)
            .map(|w| w.text.as_str())
            .collect()
    }

    /// The write gap a client saw: from the start of the first post that failed after
    /// the kill to the answer of the first acknowledged after it (zero if none
    /// failed); none if writes never came back.
    pub fn gap(&self) -> Option<Duration> {
        let Some(failed) = self.writes.iter().find(|w| !w.ok && w.start >= self.killed) else {
            return Some(Duration::ZERO);
        };
        let back = self
            .writes
            .iter()
            .find(|w| w.ok && w.start > failed.start)?;
        Some(back.end - failed.start)
    }
}
