//! The agent's local endpoints under abuse. Idle connections flood the metrics port of
//! a VRRP master whose HTTP health checks are tracked (a VIP without a usable backend
//! lowers its priority): the checks, the failover pair, the control socket and
//! `/metrics` carry on as if nothing happened. The control socket is private from the
//! start, and a client idle on it does not keep `--on-exit detach` from cleaning up.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    process::{Child, ExitStatus},
    thread::sleep,
    time::{Duration, Instant},
};

use foobar_lb::api::{ApiError, Reply, Request};
use socket2::{Domain, Socket, Type};
use tests::{
    e2e::{json_of, lab_with, one_at_a_time, vip},
    lab::{
        Balancer, LB_CLIENT_IF, LB_SERVER_IF, Lab, LabSpec, METRICS, default_config, terminate,
        vrrp_section, wait_until,
    },
    netns::Netns,
};

const LIMIT: Duration = Duration::from_secs(10);
/// The flooded agent's soft limit on open files: the usual default, set on it whatever
/// the runner's is (containers often allow a million, which no flood here would reach).
const AGENT_FILES: libc::rlim_t = 1024;
/// More connections than the agent may have descriptors, so an agent without a
/// connection limit runs out; fewer than its limit (256) and its accept queue (1024)
/// together, so every one is connected at once and none waits on SYN retransmissions.
const FLOOD: usize = 1200;
/// How long the flood is held while checking: forty health-check intervals, and longer
/// than the agent's request-head timeout (5 s), so it closes idle connections and
/// accepts queued ones meanwhile.
const HOLD: Duration = Duration::from_secs(8);
/// Where the agents serve `/metrics` (see [`METRICS`]), in their own namespaces.
const METRICS_AT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9100);

fn status(b: &Balancer) -> serde_json::Value {
    json_of(b, &["status"])
}

fn role(b: &Balancer) -> String {
    status(b)["vrrp"]["role"]
        .as_str()
        .unwrap_or("none")
        .to_owned()
}

fn wait_role(b: &Balancer, want: &str) {
    wait_until(LIMIT, &format!("{} to be {want}", b.name), || {
        role(b) == want
    });
}

/// `GET /metrics` with curl from the balancer's namespace, giving up after `seconds`.
fn metrics(b: &Balancer, seconds: u32) -> Option<String> {
    let out =
        b.ns.command("curl")
            .args(["-sf", "-m", &seconds.to_string()])
            .arg(format!("http://{METRICS_AT}/metrics"))
            .output()
            .expect("curl");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process's limit on open files; `pid` 0 is this one.
fn open_files_limit(pid: u32) -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads a limit into a struct that outlives the call.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut limit,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    limit
}

/// Sets a process's soft limit on open files (within its hard limit, which stays).
fn set_open_files(pid: u32, soft: libc::rlim_t) {
    let mut limit = open_files_limit(pid);
    limit.rlim_cur = soft.min(limit.rlim_max);
    // SAFETY: sets a limit from a struct that outlives the call.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// How many files a process has open.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's descriptors")
        .count()
}

/// Opens `n` TCP connections to `to` from inside `ns` and sends nothing on them. The
/// connects do not wait for the handshake, so a full accept queue slows nothing down.
fn idle_connections(ns: &Netns, to: SocketAddrV4, n: usize) -> Vec<Socket> {
    let _inside = ns.enter();
    (0..n)
        .map(|i| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)
                .unwrap_or_else(|e| panic!("socket {i}: {e}"));
            socket.set_nonblocking(true).expect("non-blocking");
            match socket.connect(&SocketAddr::V4(to).into()) {
                Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => {
                    panic!("connection {i}: {e}")
                }
                _ => socket,
            }
        })
        .collect()
}

fn assert_serves(lab: &Lab) {
    for i in 0..4 {
        tests::http::get_once(&lab.client, vip(), None)
            .unwrap_or_else(|e| panic!("request {i} through the VIP: {e}"));
    }
}

/// lb1 (priority 150, MASTER) and lb2 (100), both checking the web servers' /healthz
/// over HTTP every 200 ms and tracking their VIP: were lb1's checks to fail, its
/// priority would fall below lb2's and lb2 would take over.
fn checked_pair(tag: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::ha_for_test(tag, 2));
    for (i, priority) in [(0, 150), (1, 100)] {
        let config = default_config(2, "maglev")
            + "[vips.health_check]\ntype = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\n\
               timeout_ms = 100\nrise = 2\nfall = 2\n"
            + METRICS
            + &vrrp_section(priority, true)
            + "[vrrp.track]\nweight = 60\n";
        lab.balancers[i].write_config(&config);
        lab.balancers[i].start_agent();
    }
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");
    wait_until(LIMIT, "lb2 to hear lb1", || {
        status(&lab.balancers[1])["vrrp"]["master"] == "10.0.0.3"
    });
    wait_until(LIMIT, "lb1's first checks", || {
        let s = status(&lab.balancers[0]);
        (0..2).all(|i| s["vips"][0]["backends"][i]["last_check"] == "ok")
    });
    lab
}

#[test]
fn idle_connections_to_the_metrics_port_leave_health_checks_and_failover_alone() {
    let _turn = one_at_a_time();
    let lab = checked_pair("idle-metrics");
    let (lb1, lb2) = (&lab.balancers[0], &lab.balancers[1]);
    let pid = lb1.agent_pid().expect("lb1's agent");
    set_open_files(pid, AGENT_FILES);
    // This process holds the flood, besides what the test harness has open.
    let wanted = FLOOD as libc::rlim_t + 1024;
    if open_files_limit(0).rlim_cur < wanted {
        set_open_files(0, wanted);
    }
    assert!(
        open_files_limit(0).rlim_cur >= wanted,
        "this process cannot open {FLOOD} connections"
    );
    let transitions = |b: &Balancer| status(b)["vrrp"]["transitions"].clone();
    let (lb1_transitions, lb2_transitions) = (transitions(lb1), transitions(lb2));
    let heard_before = status(lb2)["vrrp"]["adverts_received"].as_u64().unwrap();

    let flood = idle_connections(&lb1.ns, METRICS_AT, FLOOD);
    let started = Instant::now();
    let mut latencies = [BTreeSet::new(), BTreeSet::new()];
    let mut most_files = 0;
    let mut samples = 0;
    while started.elapsed() < HOLD {
        // The control socket answers, and every backend stays up. (A single check may
        // time out on a busy runner; two in a row would take the backend down.)
        let s = status(lb1);
        for (i, seen) in latencies.iter_mut().enumerate() {
            let backend = &s["vips"][0]["backends"][i];
            assert_eq!(backend["health"], "up", "during the flood: {backend}");
            seen.insert(backend["check_latency_ms"].to_string());
        }
        assert_eq!(s["vrrp"]["role"], "master", "lb1 during the flood");
        assert_eq!(s["vrrp"]["priority"], 150, "lb1 during the flood: {s}");
        assert_eq!(role(lb2), "backup", "lb2 during the flood");
        most_files = most_files.max(open_files(pid));
        samples += 1;
        sleep(Duration::from_millis(300));
    }
    println!("{samples} samples; lb1's agent had at most {most_files} files open");
    // Fresh latencies: the checks kept running, not only kept their last result.
    for (i, seen) in latencies.iter().enumerate() {
        assert!(
            seen.len() >= 3,
            "backend {i}: check latencies {seen:?} over {samples} samples"
        );
    }
    // The connection limit left descriptors for the probes, VRRP and the maps.
    assert!(
        most_files + 128 <= AGENT_FILES as usize,
        "lb1's agent had {most_files} files open of {AGENT_FILES}"
    );
    assert!(lb1.holds_vip() && !lb2.holds_vip());
    assert_eq!(transitions(lb1), lb1_transitions, "lb1 changed roles");
    assert_eq!(transitions(lb2), lb2_transitions, "lb2 changed roles");
    let heard = status(lb2)["vrrp"]["adverts_received"].as_u64().unwrap();
    assert!(heard > heard_before, "lb2 stopped hearing lb1");
    assert_serves(&lab);

    // Still flooded, a new scrape waits its turn in the accept queue and is served as
    // idle connections time out.
    let waited = Instant::now();
    let text = metrics(lb1, 60).expect("/metrics during the flood");
    assert!(text.contains("foobar_lb_backend_up"), "{text}");
    println!(
        "/metrics answered after {} ms in the queue",
        waited.elapsed().as_millis()
    );
    drop(flood);
    wait_until(LIMIT, "/metrics once the flood is gone", || {
        metrics(lb1, 2).is_some()
    });
    let log = lb1.agent_log();
    for unwanted in [
        "Too many open files",
        "health check skipped",
        "backend down",
    ] {
        assert!(!log.contains(unwanted), "{unwanted:?} in lb1's log:\n{log}");
    }
    assert_eq!(role(lb1), "master");
    assert_eq!(role(lb2), "backup");
}

/// An agent the test started itself, stopped when dropped if the test did not.
struct OwnAgent(Option<Child>);

impl OwnAgent {
    fn stop(&mut self) -> ExitStatus {
        terminate(&mut self.0.take().expect("the agent runs"))
    }
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            terminate(&mut child);
        }
    }
}

fn assert_private(lab: &Lab) {
    let mode = std::fs::metadata(lab.socket())
        .expect("the control socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
}

#[test]
fn the_control_socket_is_private_and_idle_clients_do_not_hold_up_detach() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("idle-control", 1, None);
    assert_private(&lab);
    assert!(lab.stop_agent().success());

    // A run with --on-exit detach, with two clients left idle on the control socket:
    // one that asked something, one that never did.
    let log = lab.dir.join("detach.log");
    let out = std::fs::File::create(&log).expect("log");
    let mut agent = OwnAgent(Some(
        lab.agent_command(&["--on-exit", "detach"])
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("spawn the agent"),
    ));
    wait_until(Duration::from_secs(20), "the agent", || {
        lab.cli(&["status"]).status.success()
    });
    assert_private(&lab);
    let mut asked = UnixStream::connect(lab.socket()).expect("connect");
    let request = serde_json::to_string(&Request::Status).expect("request") + "\n";
    asked.write_all(request.as_bytes()).expect("send");
    let mut reply = String::new();
    BufReader::new(&asked)
        .read_line(&mut reply)
        .expect("a reply");
    let reply: Result<Reply, ApiError> = serde_json::from_str(&reply).expect("a reply line");
    assert!(matches!(reply, Ok(Reply::Status(_))), "{reply:?}");
    let _silent = UnixStream::connect(lab.socket()).expect("connect");

    let stopping = Instant::now();
    let status = agent.stop();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}:\n{log}");
    println!("stopped in {} ms", stopping.elapsed().as_millis());
    assert!(!log.contains("without cleanup"), "{log}");
    for ifname in [LB_CLIENT_IF, LB_SERVER_IF] {
        assert!(
            !lab.lb().ip(&["link", "show", ifname]).contains("xdp"),
            "{ifname} still has XDP:\n{log}"
        );
    }
    assert!(
        !lab.balancer().pin_dir.exists(),
        "pins left in {}:\n{log}",
        lab.balancer().pin_dir.display()
    );
    assert!(!lab.socket().exists());
}
