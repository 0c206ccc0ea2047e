//! foobar-web in its own namespace, talked to with curl and raw TCP: static files
//! (validators, ranges, compression, containment), the reverse proxy (keep-alive,
//! passive health, retry, 502/504), TLS (ALPN, certificate reload), the redirect to
//! HTTPS, and bad input.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use foobar_lab::pki::Pki;
use tests::{
    http::connect,
    nodes::{Sandbox, header},
};

const WEB: &str = "127.0.0.1:8080";
/// The web node's worker threads (one per CPU here).
const WORKERS: usize = 2;

/// A document root with a page, a bigger text file, an API file for upstreams, and a
/// link out of the root.
fn site(sandbox: &Sandbox, name: &str) -> String {
    let root = sandbox.path(&format!("{name}-root"));
    std::fs::create_dir_all(root.join("api")).unwrap();
    std::fs::write(root.join("index.html"), format!("<h1>{name}</h1>\n")).unwrap();
    std::fs::write(root.join("big.txt"), "foobar ".repeat(2000)).unwrap();
    // A whole second, as deployed files have: HTTP dates have no fractions.
    let whole_second = std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    for file in ["index.html", "big.txt"] {
        let f = std::fs::File::options()
            .write(true)
            .open(root.join(file))
            .unwrap();
        f.set_modified(whole_second).unwrap();
    }
    std::fs::write(root.join("api/who"), format!("{name}\n")).unwrap();
    std::fs::write(sandbox.path("secret.txt"), "secret\n").unwrap();
    let _ = std::os::unix::fs::symlink(sandbox.path("secret.txt"), root.join("escape"));
    root.display().to_string()
}

fn web_config(root: &str, extra: &str) -> String {
    format!(
        "name = \"w1\"\naccess_log = \"ACCESS\"\n[http]\nlisten = \"{WEB}\"\n[files]\nroot = \"{root}\"\n\
         [limits]\nheader_timeout_ms = 1000\nworkers = {WORKERS}\n{extra}"
    )
}

fn start_web(sandbox: &mut Sandbox, config: &str) {
    let config = config.replace("ACCESS", sandbox.path("access.log").to_str().unwrap());
    sandbox.start_node(
        "web",
        "foobar-web",
        &config,
        &format!("http://{WEB}/healthz"),
    );
}

#[test]
fn static_files_have_validators_ranges_compression_and_stay_in_their_root() {
    let mut s = Sandbox::new("web-files");
    let root = site(&s, "w1");
    start_web(&mut s, &web_config(&root, ""));
    let url = |path: &str| format!("http://{WEB}{path}");

    let (code, headers, body) = s.fetch(&[&url("/")]);
    assert_eq!((code, body.as_str()), (200, "<h1>w1</h1>\n"), "{headers}");
    assert_eq!(header(&headers, "content-type"), Some("text/html"));
    assert_eq!(header(&headers, "x-served-by"), Some("w1"));
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    let modified = header(&headers, "last-modified")
        .expect("Last-Modified")
        .to_owned();

    // Conditional requests: 304 with no body, by ETag and by date.
    let (code, _, body) = s.fetch(&["-H", &format!("If-None-Match: {etag}"), &url("/")]);
    assert_eq!((code, body.as_str()), (304, ""));
    let (code, _, _) = s.fetch(&["-H", &format!("If-Modified-Since: {modified}"), &url("/")]);
    assert_eq!(code, 304);
    let (code, _, _) = s.fetch(&["-H", "If-None-Match: \"other\"", &url("/")]);
    assert_eq!(code, 200);

    // A byte range.
    let (code, headers, body) = s.fetch(&["-H", "Range: bytes=7-13", &url("/big.txt")]);
    assert_eq!((code, body.as_str()), (206, "foobar "));
    assert_eq!(header(&headers, "content-range"), Some("bytes 7-13/14000"));

    // Compression as the client asks; the encoded body has a weak validator.
    for (encoding, decoder) in [("gzip", "gzip"), ("br", "brotli")] {
        let (code, headers, _) = s.fetch(&[
            "-H",
            &format!("Accept-Encoding: {encoding}"),
            "-o",
            "/dev/null",
            &url("/big.txt"),
        ]);
        assert_eq!(code, 200);
        assert_eq!(
            header(&headers, "content-encoding"),
            Some(encoding),
            "{decoder}: {headers}"
        );
        assert!(
            header(&headers, "etag").unwrap().starts_with("W/"),
            "{headers}"
        );
    }
    let compressed = s.curl(&[
        "--compressed",
        "-w",
        "%{size_download}",
        "-o",
        "/dev/null",
        &url("/big.txt"),
    ]);
    let size: u64 = String::from_utf8_lossy(&compressed.stdout).parse().unwrap();
    assert!(size < 1000, "14,000 repetitive bytes sent as {size}");
    let plain = s.curl(&[&url("/big.txt")]);
    assert_eq!(plain.stdout.len(), 14_000, "no compression unless asked");

    // Out of the root, in every spelling: refused; the file stays unread.
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/api/..%2f..%2fsecret.txt",
        "/%2E%2E%5csecret.txt",
    ] {
        let (code, _, body) = s.fetch(&["--path-as-is", &url(path)]);
        assert_eq!(code, 400, "{path}: {body}");
        assert!(!body.contains("secret\n"), "{path}");
    }
    let (code, _, body) = s.fetch(&[&url("/escape")]);
    assert_eq!(code, 403, "{body}");
    let (code, _, _) = s.fetch(&[&url("/missing.html")]);
    assert_eq!(code, 404);

    // One combined-format line per request, and the metrics by route and status.
    std::thread::sleep(Duration::from_millis(400));
    let log = std::fs::read_to_string(s.path("access.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("\"GET / HTTP/1.1\""))
        .expect("an access-log line for GET /");
    assert!(
        line.starts_with("127.0.0.1 - - [")
            && line.contains("] \"GET / HTTP/1.1\" 200 12 \"-\" \"curl/"),
        "{line}"
    );
    assert!(log.contains("\"GET /escape HTTP/1.1\" 403 "), "{log}");
    let metrics = String::from_utf8_lossy(&s.curl(&[&url("/metrics")]).stdout).into_owned();
    assert!(
        metrics.contains("foobar_web_http_requests_total{route=\"static\",code=\"304\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("foobar_web_http_request_duration_seconds_bucket{"),
        "{metrics}"
    );
}

/// Two upstream web nodes (serving `/api/who` with their name) behind the proxy.
fn proxy_sandbox(tag: &str, upstreams: &[&str], extra: &str) -> Sandbox {
    let mut s = Sandbox::new(tag);
    let root = site(&s, "front");
    let list: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    let config = web_config(
        &root,
        &format!(
            "[proxy]\nupstreams = [{}]\nmax_fails = 1\nfail_timeout_ms = 30000\n{extra}",
            list.join(", ")
        ),
    );
    start_web(&mut s, &config);
    s
}

fn start_upstream(s: &mut Sandbox, name: &str, listen: &str) {
    let root = site(s, name);
    let config = format!("[http]\nlisten = \"{listen}\"\n[files]\nroot = \"{root}\"\n");
    s.start_node(
        name,
        "foobar-web",
        &config,
        &format!("http://{listen}/healthz"),
    );
}

fn metric(s: &Sandbox, series: &str) -> u64 {
    let text =
        String::from_utf8_lossy(&s.curl(&[&format!("http://{WEB}/metrics")]).stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

fn count_sockets(s: &Sandbox, state: &str, port: u16) -> usize {
    let out =
        s.ns.command("ss")
            .args(["-Htan", "state", state, &format!("( dport = :{port} )")])
            .output()
            .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn the_proxy_keeps_connections_alive_skips_a_dead_upstream_and_retries_once() {
    let mut s = proxy_sandbox("web-proxy", &["127.0.0.1:9001", "127.0.0.1:9002"], "");
    start_upstream(&mut s, "up1", "127.0.0.1:9001");
    start_upstream(&mut s, "up2", "127.0.0.1:9002");
    let who = format!("http://{WEB}/api/who");

    // Round robin, over kept-alive connections: 20 requests, one connection per
    // upstream and worker (as nginx keeps a pool per worker), none closed (the health
    // checks above left their own TIME_WAITs).
    let closed_before: Vec<usize> = [9001, 9002]
        .iter()
        .map(|&p| count_sockets(&s, "time-wait", p))
        .collect();
    let mut answers = Vec::new();
    for _ in 0..20 {
        let (code, _, body) = s.fetch(&[&who]);
        assert_eq!(code, 200);
        answers.push(body.trim().to_owned());
    }
    assert_eq!(
        answers.iter().filter(|a| *a == "up1").count(),
        10,
        "{answers:?}"
    );
    for (port, before) in [9001, 9002].into_iter().zip(closed_before) {
        let open = count_sockets(&s, "established", port);
        assert!(
            (1..=WORKERS).contains(&open),
            "port {port}: {open} connections"
        );
        assert_eq!(count_sockets(&s, "time-wait", port), before, "port {port}");
    }
    let (code, headers, _) = s.fetch(&["-H", "X-Forwarded-For: 192.0.2.1", "-D", "-", &who]);
    assert_eq!(code, 200, "{headers}");

    // up1 dies: every request still succeeds; the one that met it was retried on
    // up2, and up1 is then skipped (one failed attempt in all).
    s.kill("up1");
    for _ in 0..10 {
        let (code, _, body) = s.fetch(&[&who]);
        assert_eq!((code, body.trim()), (200, "up2"));
    }
    let (code, _, body) = s.fetch(&["-X", "POST", "-d", "x=1", &who]);
    assert_eq!(
        code, 405,
        "a POST reaches a live upstream (files answer 405): {body}"
    );
    assert_eq!(
        metric(
            &s,
            "foobar_web_upstream_attempts_total{upstream=\"127.0.0.1:9001\",outcome=\"connect_error\"}"
        ),
        1
    );
    assert_eq!(metric(&s, "foobar_web_upstream_retries_total"), 1);

    // Both dead: 502 that says why, and the node still serves its files.
    s.kill("up2");
    let (code, _, body) = s.fetch(&[&who]);
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("no live upstream") || body.contains("could not connect"),
        "{body}"
    );
    let (code, _, body) = s.fetch(&[&who]);
    assert_eq!(
        (code, body.trim()),
        (502, "no live upstream: every application node is out")
    );
    assert_eq!(s.fetch(&[&format!("http://{WEB}/")]).0, 200);
}

#[test]
fn the_proxy_times_out_with_504_and_limits_request_bodies() {
    let mut s = Sandbox::new("web-timeout");
    // An upstream that accepts connections and never answers.
    let silent = {
        let _inside = s.ns.enter();
        TcpListener::bind("127.0.0.1:9003").unwrap()
    };
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().take(8) {
            held.push(stream);
        }
    });
    let root = site(&s, "front");
    start_web(
        &mut s,
        &web_config(
            &root,
            "[proxy]\nupstreams = [\"127.0.0.1:9003\"]\nread_timeout_ms = 300\nmax_body_bytes = 1000\nmax_fails = 100\n",
        ),
    );
    let started = Instant::now();
    let (code, _, body) = s.fetch(&[&format!("http://{WEB}/api/slow")]);
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("did not answer in time"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let big = "x".repeat(5000);
    let (code, _, body) = s.fetch(&["-d", &big, &format!("http://{WEB}/api/upload")]);
    assert_eq!(code, 413, "{body}");
    // Without a length up front (chunked), the limit still holds.
    let (code, _, _) = s.fetch(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-d",
        &big,
        &format!("http://{WEB}/api/upload"),
    ]);
    assert_eq!(code, 413);
}

#[test]
fn tls_offers_http2_and_reloads_its_certificate_without_dropping_connections() {
    let mut s = Sandbox::new("web-tls");
    let pki = Pki::new(&s.path("pki"));
    pki.issue("web", &["localhost", "127.0.0.1"], "first");
    let root = site(&s, "w1");
    let config = format!(
        "[http]\nlisten = \"127.0.0.1:8080\"\nredirect_to_https = true\n\
         [https]\nlisten = \"127.0.0.1:8443\"\ncertificate = \"{}\"\nkey = \"{}\"\nhsts_max_age_s = 600\n\
         [files]\nroot = \"{root}\"\n",
        pki.cert("web").display(),
        pki.key("web").display()
    );
    s.start_node(
        "web",
        "foobar-web",
        &config,
        "https://127.0.0.1:8443/healthz",
    );
    let ca = pki.ca_cert().display().to_string();
    let url = "https://localhost:8443/big.txt";

    let version = |flag: &str| {
        let out = s.curl(&[
            flag,
            "--cacert",
            &ca,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            url,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(version("--http2"), "2");
    assert_eq!(version("--http1.1"), "1.1");
    let (code, headers, _) = s.fetch(&["--cacert", &ca, "https://localhost:8443/"]);
    assert_eq!(code, 200);
    assert_eq!(
        header(&headers, "strict-transport-security"),
        Some("max-age=600")
    );

    // Plain HTTP is redirected, but for the health check.
    let (code, headers, _) = s.fetch(&["http://localhost:8080/big.txt?x=1"]);
    assert_eq!(code, 301);
    assert_eq!(
        header(&headers, "location"),
        Some("https://localhost:8443/big.txt?x=1")
    );
    assert_eq!(s.fetch(&["http://localhost:8080/healthz"]).0, 200);

    let subject = |s: &Sandbox| {
        let out = s.curl(&["-v", "--cacert", &ca, "-o", "/dev/null", url]);
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.contains("subject:"))
            .unwrap_or("")
            .to_owned()
    };
    assert!(subject(&s).contains("first"), "{}", subject(&s));

    // A download that lasts about 2 s is in flight while the certificate changes.
    let slow =
        s.ns.command("curl")
            .args([
                "-sS",
                "--http1.1",
                "--limit-rate",
                "7000",
                "--cacert",
                &ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                url,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    pki.issue("web", &["localhost", "127.0.0.1"], "second");
    s.signal("web", libc::SIGHUP);
    tests::lab::wait_until(Duration::from_secs(5), "the new certificate", || {
        subject(&s).contains("second")
    });
    let done = slow.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&done.stdout),
        "200 14000",
        "the open download finished"
    );

    // A bad pair is refused and the served certificate stays.
    std::fs::write(pki.key("web"), "not a key").unwrap();
    s.signal("web", libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(subject(&s).contains("second"));
    assert!(
        s.log("web").contains("certificate reload refused"),
        "{}",
        s.log("web")
    );
}

/// Sends raw bytes on a new connection and returns what comes back before the server
/// closes it or `wait` passes.
fn raw(s: &Sandbox, bytes: &[u8], wait: Duration) -> String {
    let mut stream = connect(&s.ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080), None).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn bad_requests_get_clear_errors_and_the_node_keeps_serving() {
    let mut s = Sandbox::new("web-bad");
    let root = site(&s, "w1");
    start_web(
        &mut s,
        &web_config(
            &root,
            "[proxy]\nupstreams = [\"127.0.0.1:9009\"]\nmax_body_bytes = 100\n",
        ),
    );
    let serves = |s: &Sandbox| s.fetch(&[&format!("http://{WEB}/")]).0 == 200;

    let answer = raw(&s, b"NOT HTTP AT ALL\r\n\r\n", Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(serves(&s));

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let answer = raw(&s, huge.as_bytes(), Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(serves(&s));

    let (code, _, body) = s.fetch(&["-d", &"y".repeat(500), &format!("http://{WEB}/api/x")]);
    assert_eq!(code, 413, "{body}");
    assert!(serves(&s));

    // A client that never finishes its headers is closed after header_timeout_ms (1 s).
    let started = Instant::now();
    let answer = raw(
        &s,
        b"GET / HTTP/1.1\r\nHost: slow\r\nX-Trickle: ",
        Duration::from_secs(5),
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    assert!(!answer.contains("200 OK"), "{answer:?}");
    assert!(serves(&s));
}
