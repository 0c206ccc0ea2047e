//! Encryption inside the stack lab: MariaDB refuses plain text over the network and
//! takes TLS with a certificate from the lab's CA (for its own address and the
//! database VIPs'), replication runs over TLS with the primary's certificate
//! checked, a capture of the database links during API traffic holds no SQL and none
//! of the data, and no secret (a password, a private key) is on a command line or in
//! a log of the run, their files readable by their owner only. With web-to-app TLS
//! turned on, the application nodes take HTTPS only and the web nodes' proxied
//! requests cross the servers' links encrypted.

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Output},
    time::{Duration, Instant, SystemTime},
};

use foobar_lab::pki::{Pki, write_private};
use tests::{
    db::TlsFiles,
    e2e::one_at_a_time,
    lab::{Lab, LabSpec, web_addr},
    process::{spawn_logged, terminate, wait_until},
    stack::{APP_PORT, AppTlsFiles, DB_PORT, DB_USER, SITE, db_write_vip, server_dir},
};

/// A stack lab with its balancer running, the site ready and the pair replicating.
fn stack_lab(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::stack_for_test(tag));
    lab.start_agent();
    lab.wait_for_backends_up();
    for (i, role) in [(0, "primary"), (1, "replica")] {
        wait_until(
            Duration::from_secs(20),
            &format!("db{} {role}", i + 1),
            || lab.db_role_is(i, role),
        );
    }
    lab
}

/// `mariadb` in server `from`'s namespace against `host`, logged in as the
/// application (its password in an option file of mode 0600, not on the command
/// line), with `tls` options; it asks for the session's cipher.
fn mariadb_as_app(lab: &Lab, from: usize, host: Ipv4Addr, tls: &[&str]) -> Output {
    let options = lab.dir.join("app-client.cnf");
    let password = std::fs::read_to_string(lab.db_password_file()).expect("password file");
    write_private(
        &options,
        &format!(
            "[client]\nuser = {DB_USER}\npassword = {}\n",
            password.trim()
        ),
    );
    lab.webs[from]
        .command("mariadb")
        // --defaults-file must come first.
        .arg(format!("--defaults-file={}", options.display()))
        .args(["-h", &host.to_string(), "-P", &DB_PORT.to_string()])
        .args(["--connect-timeout=3", "-N", "-B"])
        .args(tls)
        .args(["-e", "SHOW STATUS LIKE 'Ssl_cipher'"])
        .output()
        .expect("mariadb (mariadb-client; cargo xtask setup installs it)")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn mariadb_refuses_plain_text_and_takes_tls_checked_against_the_labs_ca() {
    let _turn = one_at_a_time();
    let lab = stack_lab("tls-mariadb");
    let ca = TlsFiles::of(&server_dir(&lab.dir, &lab.server_name(0))).ca;
    let ca_option = format!("--ssl-ca={}", ca.display());
    let verified = [ca_option.as_str(), "--ssl-verify-server-cert"];

    // To a server's own address and, as the application connects, to the write VIP.
    // MariaDB 10.11 refuses a plain-text login as it refuses a wrong password (1045,
    // "Access denied"; later versions say 3159, "insecure transport"): the same
    // option file over TLS, just after, shows the credentials are right.
    for host in [web_addr(1), db_write_vip()] {
        let plain = mariadb_as_app(&lab, 0, host, &["--skip-ssl"]);
        let refusal = text(&plain.stderr);
        assert!(
            !plain.status.success() && (refusal.contains("1045") || refusal.contains("3159")),
            "{host}: a plain-text login with valid credentials was not refused: {}{refusal}",
            text(&plain.stdout)
        );

        let tls = mariadb_as_app(&lab, 0, host, &verified);
        let answer = text(&tls.stdout);
        assert!(tls.status.success(), "{host}: {}", text(&tls.stderr));
        let cipher = answer.trim().split('\t').nth(1).unwrap_or_default();
        assert!(!cipher.is_empty(), "{host}: no TLS cipher: {answer:?}");
    }

    // The certificate is checked: a CA that did not sign it is refused.
    let other = Pki::new(&lab.dir.join("other-ca"));
    let other_option = format!("--ssl-ca={}", other.ca_cert().display());
    let out = mariadb_as_app(
        &lab,
        0,
        web_addr(1),
        &[other_option.as_str(), "--ssl-verify-server-cert"],
    );
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted: {}",
        text(&out.stdout)
    );

    // Replication runs over TLS, the primary's certificate checked.
    let replica = |name: &str| slave_status(&lab, 1).remove(name).unwrap_or_default();
    wait_until(Duration::from_secs(10), "replication connected", || {
        replica("Slave_IO_Running") == "Yes"
    });
    assert_eq!(replica("Master_SSL_Allowed"), "Yes");
    assert_eq!(replica("Master_SSL_Verify_Server_Cert"), "Yes");
    let ca = TlsFiles::of(&server_dir(&lab.dir, &lab.server_name(1))).ca;
    assert_eq!(replica("Master_SSL_CA_File"), ca.display().to_string());
}

/// `SHOW SLAVE STATUS` on server `i`, as root over its socket: field, value.
fn slave_status(lab: &Lab, i: usize) -> std::collections::HashMap<String, String> {
    let socket = server_dir(&lab.dir, &lab.server_name(i)).join("db/mysqld.sock");
    let out = lab.webs[i]
        .command("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args(["-uroot", "-B", "-e", "SHOW SLAVE STATUS"])
        .output()
        .expect("mariadb");
    let status = text(&out.stdout);
    let mut lines = status.lines();
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    names
        .split('\t')
        .zip(values.split('\t'))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_database_links_carry_no_sql_in_the_clear_and_no_secret_leaks_to_command_lines_or_logs() {
    let _turn = one_at_a_time();
    let lab = stack_lab("tls-capture");

    // Every packet to or from MariaDB's port on both servers: the application's
    // connections through the VIPs (both ends of the full NAT), replication.
    let captures: Vec<Capture> = (0..2).map(|i| Capture::start(&lab, i, DB_PORT)).collect();
    let marker = marked_posts_and_reads(&lab, "tls-marker", "cookies.txt");
    // The replica applies the last posts (their rows cross the replication link).
    wait_until(Duration::from_secs(10), "the posts on the replica", || {
        lab.db_sql(
            1,
            &format!("SELECT COUNT(*) FROM foobar.posts WHERE text LIKE '{marker} %'"),
        )
        .is_ok_and(|n| n == "10")
    });
    let secrets = Secrets::of(&lab);
    for mut capture in captures {
        let bytes = capture.stop();
        let (file, packets) = (&capture.file, pcap_packets(&bytes));
        assert!(
            packets >= 50,
            "{}: {packets} packets ({} bytes): the capture missed the traffic; tcpdump: {}",
            file.display(),
            bytes.len(),
            capture.log()
        );
        // The server's greeting precedes TLS: seen in the clear, it shows the
        // capture holds the connections' payloads whole.
        assert!(
            contains(&bytes, b"MariaDB"),
            "{}: no MariaDB greeting in the capture",
            file.display()
        );
        let mut needles = vec![
            b"INSERT".as_slice(),
            b"SELECT".as_slice(),
            marker.as_bytes(),
        ];
        needles.extend(secrets.passwords.iter().map(|p| p.as_bytes()));
        for needle in needles {
            assert!(
                !contains(&bytes, needle),
                "{}: {:?} in the clear on the database link",
                file.display(),
                text(needle)
            );
        }
    }

    // No secret on any process's command line (the whole host's: the lab's nodes,
    // MariaDB, its clients)...
    let mut lab_processes = 0;
    for (pid, command_line) in command_lines() {
        lab_processes += usize::from(command_line.contains(&*lab.dir.to_string_lossy()));
        if let Some(secret) = secrets.find_in(&command_line) {
            panic!("process {pid} has a secret on its command line ({secret}): {command_line}");
        }
    }
    assert!(
        lab_processes >= 6,
        "only {lab_processes} of the lab's processes found: the scan proves nothing"
    );
    // ...nor in any log of the run.
    let logs: Vec<PathBuf> = files_under(&lab.dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "log"))
        .collect();
    for log in &logs {
        let contents = text(&std::fs::read(log).expect("log"));
        if let Some(secret) = secrets.find_in(&contents) {
            panic!("{} holds a secret ({secret})", log.display());
        }
    }
    let db_log = lab.log(&lab.server_name(0), "db");
    assert!(
        logs.len() >= 8 && db_log.contains("accounts in place"),
        "the logs were not found: {logs:?}"
    );

    // Their files: the owner's only.
    for (file, mode) in secrets.files.iter().map(|f| (f, mode_of(f))) {
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
    }
    for i in 0..2 {
        let state = server_dir(&lab.dir, &lab.server_name(i)).join("db");
        let mode = mode_of(&state);
        assert_eq!(
            mode,
            0o700,
            "{} (MariaDB's data, master.info's password) has mode {mode:o}",
            state.display()
        );
    }
}

#[test]
fn with_web_to_app_tls_the_api_works_and_no_request_crosses_in_the_clear() {
    let _turn = one_at_a_time();
    let mut lab = stack_lab("tls-app");
    lab.use_app_tls();
    lab.wait_for_backends_up();

    // From a server, whose web node the firewall lets reach every application node:
    // HTTPS checked against the lab's CA for the node's address is answered, a CA
    // that did not sign its certificate is refused, plain HTTP gets no answer (the
    // node speaks TLS only, so this is no firewall's doing).
    let ca = TlsFiles::of(&server_dir(&lab.dir, &lab.server_name(0))).ca;
    let ca = ca.to_str().expect("UTF-8 path").to_owned();
    let other = Pki::new(&lab.dir.join("other-ca")).ca_cert();
    let other = other.to_str().expect("UTF-8 path").to_owned();
    let curl = |args: &[&str]| {
        lab.webs[0]
            .command("curl")
            .args(["-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .expect("curl")
    };
    for i in 0..2 {
        let https_url = format!("https://{}:{APP_PORT}/healthz", web_addr(i));
        let http_url = format!("http://{}:{APP_PORT}/healthz", web_addr(i));
        let https = curl(&["--cacert", ca.as_str(), https_url.as_str()]);
        assert_eq!(
            text(&https.stdout),
            "200",
            "{https_url}: {}",
            text(&https.stderr)
        );
        let wrong_ca = curl(&["--cacert", other.as_str(), https_url.as_str()]);
        assert!(
            !wrong_ca.status.success(),
            "{https_url}: a certificate checked against another CA was accepted"
        );
        let plain = curl(&[http_url.as_str()]);
        assert!(
            !plain.status.success() && text(&plain.stdout) == "000",
            "{http_url}: plain HTTP was answered ({})",
            text(&plain.stdout)
        );
        let key = AppTlsFiles::of(&server_dir(&lab.dir, &lab.server_name(i))).key;
        assert_eq!(mode_of(&key), 0o600, "{}", key.display());
    }

    // Every packet to or from the application port on both servers' links: each web
    // node reaches the other server's application node there (its own over loopback).
    let captures: Vec<Capture> = (0..2).map(|i| Capture::start(&lab, i, APP_PORT)).collect();
    let marker = marked_posts_and_reads(&lab, "app-tls-marker", "app-tls-cookies.txt");

    for mut capture in captures {
        let bytes = capture.stop();
        let (file, packets) = (&capture.file, pcap_packets(&bytes));
        assert!(
            packets >= 10,
            "{}: {packets} packets ({} bytes): the capture missed the traffic; tcpdump: {}",
            file.display(),
            bytes.len(),
            capture.log()
        );
        // A client hello's ALPN offer (lower case) crosses in the clear: the capture
        // holds the proxy's TLS connections from their first byte.
        assert!(
            contains(&bytes, b"http/1.1"),
            "{}: no TLS handshake of the proxy in the capture",
            file.display()
        );
        for needle in [
            b"GET /api".as_slice(),
            b"POST /api".as_slice(),
            b"HTTP/1.1 ".as_slice(),
            marker.as_bytes(),
        ] {
            assert!(
                !contains(&bytes, needle),
                "{}: {:?} in the clear between the web and application nodes",
                file.display(),
                text(needle)
            );
        }
    }
}

/// Ten posts through the site whose text carries a fresh marker, each read back, and
/// the list: writes and reads that must see them (read-your-writes: the cookie jar
/// `jar` in the lab's directory). Returns the marker.
fn marked_posts_and_reads(lab: &Lab, prefix: &str, jar: &str) -> String {
    let marker = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("time")
            .as_nanos()
    );
    let jar = lab.dir.join(jar).display().to_string();
    for n in 0..10 {
        let body = lab
            .post_through_site(&format!("{marker} {n}"), &["-c", &jar, "-b", &jar])
            .unwrap_or_else(|e| panic!("post {n}: {e}"));
        let post: serde_json::Value = serde_json::from_str(&body).expect("a post");
        let url = format!("https://{SITE}/api/posts/{}", post["id"]);
        let read = lab.site_curl(&["-f", "-b", &jar, &url]);
        assert!(
            text(&read.stdout).contains(&marker),
            "post {n} not read back: {}",
            text(&read.stderr)
        );
    }
    let url = format!("https://{SITE}/api/posts?limit=10");
    let list = lab.site_curl(&["-f", "-b", &jar, &url]);
    assert!(
        text(&list.stdout).contains(&marker),
        "{}",
        text(&list.stderr)
    );
    marker
}

/// tcpdump on a server's interface, one TCP port, into a file; killed if the test
/// ends before it stops it.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
    log: PathBuf,
}

impl Capture {
    /// Starts it on server `i` for `port` and waits until it listens.
    fn start(lab: &Lab, i: usize, port: u16) -> Capture {
        let name = lab.server_name(i);
        let file = lab.dir.join(format!("{name}-{port}.pcap"));
        let log = lab.dir.join(format!("{name}-{port}-tcpdump.log"));
        // -Z root: Debian's tcpdump would write the file as its own user otherwise;
        // --immediate-mode: each packet handed over as it comes (otherwise the kernel
        // holds them in blocks, and a stop loses what it held); -U: each written as
        // it comes; -s 0: whole packets.
        let child = spawn_logged(
            lab.webs[i]
                .command("tcpdump")
                .args(["-i", "eth0", "-n", "-s", "0", "--immediate-mode", "-U"])
                .args(["-Z", "root", "-w"])
                .arg(&file)
                .args(["tcp", "port", &port.to_string()]),
            &log,
        );
        let started = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening on")) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tcpdump did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture {
            child: Some(child),
            file,
            log,
        }
    }

    /// Stops it; what it captured.
    fn stop(&mut self) -> Vec<u8> {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        std::fs::read(&self.file).expect("capture file")
    }

    /// What tcpdump said.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How many packets a pcap file (tcpdump's classic format) holds.
fn pcap_packets(file: &[u8]) -> usize {
    assert!(file.len() >= 24, "not a pcap file ({} bytes)", file.len());
    let little_endian = match file[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file: {:02x?}", &file[..4]),
    };
    let (mut at, mut count) = (24, 0);
    // Each record: time (8 bytes), captured length, original length, the bytes.
    while at + 16 <= file.len() {
        let length: [u8; 4] = file[at + 8..at + 12].try_into().expect("4 bytes");
        let length = if little_endian {
            u32::from_le_bytes(length)
        } else {
            u32::from_be_bytes(length)
        };
        at += 16 + length as usize;
        count += 1;
    }
    count
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The lab's secrets and the files that hold them.
struct Secrets {
    /// The application's, replication's and the node agents' passwords.
    passwords: Vec<String>,
    /// The lines of every private key's PEM body.
    key_lines: Vec<String>,
    /// The files.
    files: Vec<PathBuf>,
}

impl Secrets {
    fn of(lab: &Lab) -> Secrets {
        let servers: Vec<PathBuf> = (0..2)
            .map(|i| server_dir(&lab.dir, &lab.server_name(i)))
            .collect();
        let password_files: Vec<PathBuf> = [lab.db_password_file(), lab.repl_password_file()]
            .into_iter()
            .chain(servers.iter().map(|s| s.join("db/agent.password")))
            .collect();
        let key_files: Vec<PathBuf> = std::iter::once(lab.pki.as_ref().expect("stack").key("www"))
            .chain(servers.iter().map(|s| TlsFiles::of(s).key))
            .collect();
        let read = |f: &PathBuf| {
            std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        };
        let passwords = password_files
            .iter()
            .map(|f| read(f).trim().to_owned())
            .collect();
        let key_lines = key_files
            .iter()
            .flat_map(|f| {
                read(f)
                    .lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        Secrets {
            passwords,
            key_lines,
            files: password_files.into_iter().chain(key_files).collect(),
        }
    }

    /// Which secret `text` holds, if any (described, not shown).
    fn find_in(&self, text: &str) -> Option<String> {
        if let Some(i) = self
            .passwords
            .iter()
            .position(|p| text.contains(p.as_str()))
        {
            return Some(format!("password {} of {}", i + 1, self.passwords.len()));
        }
        self.key_lines
            .iter()
            .any(|l| text.contains(l.as_str()))
            .then(|| "a line of a private key".to_owned())
    }
}

/// Every process's command line, its arguments joined by spaces, with its pid.
fn command_lines() -> Vec<(String, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| {
            // A process may be gone by now.
            let bytes = std::fs::read(e.path().join("cmdline")).ok()?;
            let pid = e.file_name().to_string_lossy().into_owned();
            Some((pid, text(&bytes).replace('\0', " ")))
        })
        .collect()
}

/// Every file under `dir`, recursively (symbolic links not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}
