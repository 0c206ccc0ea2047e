//! Active-passive failover with VRRPv3 in an HA lab: two balancers on the same client
//! and server networks. foobar-lb pairs with itself and with Debian's keepalived in
//! either role; a crash, a real stop, preemption and tracked faults move the VIP and
//! the web servers' gateway, and connections survive; a restart of the master's agent
//! moves nothing.

use std::{
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, sleep},
    time::{Duration, Instant},
};

use foobar_lb::vrrp::packet::{Advertisement, GROUP, PROTOCOL, checksum};
use socket2::{Domain, Protocol, Socket, Type};
use tests::{
    e2e::{json_of, metrics_of, one_at_a_time, vip},
    http::{connect, get, get_once},
    lab::{
        ADVERT_INTERVAL_MS, Balancer, CLIENT, LB_SERVER_IF, LB_SERVER_SIDE, Lab, LabSpec, METRICS,
        VIP, VRID, default_config, ha_config, keepalived_config, vrrp_section, wait_until,
    },
    probe::{Probe, outage},
    process::{spawn_logged, terminate},
};

const LIMIT: Duration = Duration::from_secs(10);

fn vrrp(b: &Balancer) -> serde_json::Value {
    json_of(b, &["status"])["vrrp"].clone()
}

fn role(b: &Balancer) -> String {
    vrrp(b)["role"].as_str().unwrap_or("none").to_owned()
}

fn wait_role(b: &Balancer, want: &str) {
    wait_until(LIMIT, &format!("{} to be {want}", b.name), || {
        role(b) == want
    });
}

/// Two foobar-lb balancers, lb1 (priority 150) and lb2 (100), lb1 MASTER.
fn foobar_pair(tag: &str) -> Lab {
    pair_with(tag, "maglev")
}

/// The same with the VIP on `scheduler`.
fn pair_with(tag: &str, scheduler: &str) -> Lab {
    let mut lab = Lab::up(LabSpec::ha_for_test(tag, 2));
    for (i, priority) in [(0, 150), (1, 100)] {
        let b = &mut lab.balancers[i];
        b.write_config(&(default_config(2, scheduler) + METRICS + &vrrp_section(priority, true)));
        b.start_agent();
    }
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");
    // A backup starts as one before it has heard the master (its first advert is at
    // most an interval away).
    wait_until(LIMIT, "lb2 to hear lb1", || {
        vrrp(&lab.balancers[1])["master"] == "10.0.0.3"
    });
    lab
}

fn assert_serves(lab: &Lab) {
    for i in 0..4 {
        tests::http::get_once(&lab.client, vip(), None)
            .unwrap_or_else(|e| panic!("request {i} through the VIP: {e}"));
    }
}

/// Starts lb1's agent as its service unit runs it, with `--on-exit detach`: its stop
/// is then a real one, which hands the VIPs over (the lab's default, `keep`, makes a
/// stop a restart that keeps them).
fn start_as_a_unit(lab: &mut Lab) {
    lab.balancers[0].on_exit = "detach";
    lab.balancers[0].start_agent();
}

/// SIGTERM to lb1's agent, as the unit's stop sends; waits for it to exit.
fn stop_as_a_unit(lab: &mut Lab) {
    let status = lab.balancers[0].stop_agent();
    assert!(status.success(), "the agent's stop failed: {status}");
}

#[test]
fn a_crashed_master_hands_over_and_connections_survive() {
    let _turn = one_at_a_time();
    let mut lab = foobar_pair("vrrp-crash");
    assert!(lab.balancers[0].holds_vip());
    assert!(!lab.balancers[1].holds_vip());
    assert_eq!(vrrp(&lab.balancers[1])["master"], "10.0.0.3");

    let mut long_lived = connect(&lab.client, vip(), None).expect("connect");
    let server = get(&mut long_lived).expect("first request");

    // lb1 dies: its agent is killed and it drops off both networks at once.
    let probe = Probe::start(&lab.client, vip());
    sleep(Duration::from_millis(300));
    lab.balancers[0].kill_agent();
    lab.unplug(0);
    wait_role(&lab.balancers[1], "master");
    sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let o = outage(&attempts).expect("some request got through");
    println!(
        "failover gap after a crash: {} ms ({} of {} requests failed)",
        o.longest_gap.as_millis(),
        o.failures,
        o.attempts
    );
    assert!(o.contiguous, "requests failed outside one outage: {o:?}");
    assert!(
        attempts.last().unwrap().answer.is_some(),
        "the new master does not serve"
    );

    let lb2 = &lab.balancers[1];
    assert!(lb2.holds_vip());
    assert!(
        lb2.ns
            .ip(&["-4", "addr", "show", "dev", LB_SERVER_IF])
            .contains(&format!("{LB_SERVER_SIDE}/24"))
    );
    let v = vrrp(lb2);
    assert_eq!(v["last_takeover"], "master_down");
    assert_eq!(v["transitions"]["master"], 1);
    let m = metrics_of(lb2);
    assert!(m.contains("foobar_lb_vrrp_role{role=\"master\"} 1"), "{m}");
    assert!(
        m.contains("foobar_lb_vrrp_transitions_total{role=\"master\"} 1"),
        "{m}"
    );

    // The connection opened through lb1 carries on through lb2: same Maglev table,
    // replies translated without a flow entry.
    assert_eq!(
        get(&mut long_lived).expect("request after the failover"),
        server
    );

    // lb1 comes back: it drops the addresses its killed agent left, then preempts.
    // It runs as its service unit would, so that its stop below is a real one.
    lab.plug_in(0);
    start_as_a_unit(&mut lab);
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");
    assert_eq!(vrrp(&lab.balancers[0])["last_takeover"], "preempted");
    assert!(!lab.balancers[1].holds_vip());
    assert_eq!(
        get(&mut long_lived).expect("request after the failback"),
        server
    );

    // A real stop (`--on-exit detach`) says priority 0: lb2 takes over without waiting
    // out the master-down interval, and lb1 gives its addresses up.
    stop_as_a_unit(&mut lab);
    wait_role(&lab.balancers[1], "master");
    assert_eq!(vrrp(&lab.balancers[1])["last_takeover"], "master_stopped");
    assert!(!lab.balancers[0].holds_vip());
    assert_eq!(
        get(&mut long_lived).expect("request after the stop"),
        server
    );
    assert_serves(&lab);
}

#[test]
fn keepalived_backup_pairs_with_a_foobar_master() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::ha_for_test("vrrp-kabk", 2));
    lab.balancers[0].write_config(&ha_config(2, 150, true));
    // As its service unit runs it: the stop below is a real one.
    start_as_a_unit(&mut lab);
    wait_role(&lab.balancers[0], "master");
    // lb2: keepalived moves the addresses; foobar-lb only runs its data plane.
    lab.balancers[1].write_config(&(default_config(2, "maglev") + METRICS));
    lab.balancers[1].start_agent();
    lab.balancers[1].start_keepalived(&keepalived_config(100, true));
    wait_until(LIMIT, "keepalived to settle as BACKUP", || {
        lab.balancers[1]
            .keepalived_log()
            .contains("Entering BACKUP STATE")
    });
    sleep(Duration::from_millis(500));
    assert!(
        !lab.balancers[1].holds_vip(),
        "{}",
        lab.balancers[1].keepalived_log()
    );
    assert!(
        !lab.balancers[1]
            .keepalived_log()
            .contains("Entering MASTER STATE")
    );
    assert_serves(&lab);

    // foobar-lb stops for real (priority 0): keepalived takes the VIP and the gateway;
    // lb2's data plane serves.
    stop_as_a_unit(&mut lab);
    wait_until(LIMIT, "keepalived to become MASTER", || {
        lab.balancers[1].holds_vip()
    });
    assert!(!lab.balancers[0].holds_vip());
    assert!(
        lab.balancers[1]
            .keepalived_log()
            .contains("Entering MASTER STATE")
    );
    assert_serves(&lab);

    // foobar-lb returns, hears keepalived's advertisements, and preempts it.
    lab.balancers[0].start_agent();
    wait_role(&lab.balancers[0], "master");
    let v = vrrp(&lab.balancers[0]);
    assert_eq!(v["last_takeover"], "preempted");
    assert!(v["adverts_received"].as_u64().unwrap() > 0, "{v}");
    let rejected: u64 = v["rejected"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(rejected, 0, "keepalived's advertisements were refused: {v}");
    wait_until(LIMIT, "keepalived to give the VIP up", || {
        !lab.balancers[1].holds_vip()
    });
    assert_serves(&lab);
}

#[test]
fn keepalived_master_pairs_with_a_foobar_backup() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::ha_for_test("vrrp-kams", 2));
    lab.balancers[0].write_config(&(default_config(2, "maglev") + METRICS));
    lab.balancers[0].start_agent();
    lab.balancers[0].start_keepalived(&keepalived_config(200, true));
    wait_until(LIMIT, "keepalived to become MASTER", || {
        lab.balancers[0].holds_vip()
    });
    lab.balancers[1].write_config(&ha_config(2, 100, true));
    lab.balancers[1].start_agent();
    let lb2 = &lab.balancers[1];
    wait_until(LIMIT, "lb2 to hear keepalived", || {
        vrrp(lb2)["adverts_received"].as_u64().unwrap_or(0) >= 5
    });
    let v = vrrp(lb2);
    assert_eq!(v["role"], "backup");
    assert_eq!(v["master"], "10.0.0.3");
    assert!(!lb2.holds_vip());
    assert_serves(&lab);

    // keepalived stops gracefully (priority 0): foobar-lb takes over at once.
    lab.balancers[0].stop_keepalived();
    let lb2 = &lab.balancers[1];
    wait_role(lb2, "master");
    assert_eq!(vrrp(lb2)["last_takeover"], "master_stopped");
    assert!(lb2.holds_vip());
    assert_serves(&lab);

    // keepalived comes back with the higher priority and preempts foobar-lb.
    lab.balancers[0].start_keepalived(&keepalived_config(200, true));
    let lb2 = &lab.balancers[1];
    wait_role(lb2, "backup");
    assert!(!lb2.holds_vip());
    assert_eq!(vrrp(lb2)["master"], "10.0.0.3");
    assert_serves(&lab);
}

/// Sends one IPv4 packet with a VRRP `message` from the client network, with the
/// given source and TTL (the header is ours: IPPROTO_RAW).
fn send_raw(lab: &Lab, source: Ipv4Addr, ttl: u8, message: &[u8]) {
    let _inside = lab.client.enter();
    let socket = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("raw socket");
    socket.set_multicast_if_v4(&CLIENT).expect("multicast if");
    let mut packet = vec![0x45, 0xc0];
    packet.extend_from_slice(&((20 + message.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 0, ttl, PROTOCOL, 0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&GROUP.octets());
    packet.extend_from_slice(message);
    socket
        .send_to(&packet, &SocketAddrV4::new(GROUP, 0).into())
        .expect("send");
}

/// Rewrites a message's checksum for `source` after an edit.
fn resum(mut message: Vec<u8>, source: Ipv4Addr) -> Vec<u8> {
    message[6..8].copy_from_slice(&[0, 0]);
    let sum = checksum(source, GROUP, &message);
    message[6..8].copy_from_slice(&sum.to_be_bytes());
    message
}

#[test]
fn spoofed_and_malformed_advertisements_are_refused_and_counted() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::ha_for_test("vrrp-spoof", 2));
    lab.balancers[0].write_config(&ha_config(2, 100, true));
    lab.balancers[0].start_agent();
    let lb1 = &lab.balancers[0];
    wait_role(lb1, "master");

    // Each would make lb1 yield (priority 254) if it were believed.
    let takeover = |vrid: u8, addresses: Vec<Ipv4Addr>, interval_cs: u16| Advertisement {
        vrid,
        priority: 254,
        interval_cs,
        addresses,
    };
    let ours = || vec![VIP, LB_SERVER_SIDE];
    let good = |source| takeover(VRID, ours(), 10).encode(source);
    let stranger = Ipv4Addr::new(192, 0, 2, 1);
    let cases: Vec<(&str, Ipv4Addr, u8, Vec<u8>)> = vec![
        ("ttl", CLIENT, 64, good(CLIENT)),
        ("checksum", CLIENT, 255, {
            let mut m = good(CLIENT);
            m[7] ^= 0xff;
            m
        }),
        ("version", CLIENT, 255, {
            let mut m = good(CLIENT);
            m[0] = 0x21;
            resum(m, CLIENT)
        }),
        (
            "vrid",
            CLIENT,
            255,
            takeover(VRID + 1, ours(), 10).encode(CLIENT),
        ),
        ("source_not_on_link", stranger, 255, good(stranger)),
        (
            "address_list",
            CLIENT,
            255,
            takeover(VRID, vec![VIP], 10).encode(CLIENT),
        ),
        (
            "interval",
            CLIENT,
            255,
            takeover(VRID, ours(), 0).encode(CLIENT),
        ),
        ("malformed", CLIENT, 255, good(CLIENT)[..6].to_vec()),
    ];
    for (reason, source, ttl, message) in &cases {
        send_raw(&lab, *source, *ttl, message);
        wait_until(LIMIT, &format!("a {reason} rejection"), || {
            vrrp(lb1)["rejected"][reason] == 1
        });
        assert_eq!(role(lb1), "master", "a {reason} packet was acted on");
    }
    let v = vrrp(lb1);
    assert_eq!(v["adverts_received"], 0, "{v}");
    assert_eq!(v["transitions"]["backup"], 1, "{v}");
    let m = metrics_of(lb1);
    assert!(
        m.contains("foobar_lb_vrrp_rejected_packets_total{reason=\"source_not_on_link\"} 1"),
        "{m}"
    );

    // The same advertisement done right is believed: lb1 yields to 10.0.0.2, then
    // takes over again when no more come.
    send_raw(&lab, CLIENT, 255, &good(CLIENT));
    wait_role(lb1, "backup");
    assert_eq!(vrrp(lb1)["master"], CLIENT.to_string());
    wait_role(lb1, "master");
    assert_eq!(vrrp(lb1)["last_takeover"], "master_down");
}

#[test]
fn tracked_faults_lower_the_priority_so_the_peer_takes_over() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::ha_for_test("vrrp-track", 2));
    // lb1 checks /health over HTTP, lb2 only connects: taking /health down leaves
    // lb1 alone without a usable backend.
    let check = |kind: &str| {
        format!(
            "[vips.health_check]\ntype = \"{kind}\"\npath = \"/healthz\"\ninterval_ms = 200\n\
             timeout_ms = 100\nrise = 2\nfall = 2\n"
        )
    };
    for (i, kind, priority) in [(0, "http", 150), (1, "tcp", 100)] {
        let config = default_config(2, "maglev")
            + &check(kind)
            + METRICS
            + &vrrp_section(priority, true)
            + "[vrrp.track]\nweight = 60\n";
        lab.balancers[i].write_config(&config);
        lab.balancers[i].start_agent();
    }
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");

    for web in 0..2 {
        lab.set_web_health(web, false);
    }
    wait_role(&lab.balancers[1], "master");
    let v = vrrp(&lab.balancers[0]);
    assert_eq!(v["role"], "backup");
    assert_eq!(v["priority"], 90);
    assert_eq!(v["faults"][0], "vip www has no usable backend");
    assert_eq!(vrrp(&lab.balancers[1])["last_takeover"], "preempted");
    assert_serves(&lab);

    for web in 0..2 {
        lab.set_web_health(web, true);
    }
    wait_role(&lab.balancers[0], "master");
    assert_eq!(vrrp(&lab.balancers[0])["priority"], 150);
    wait_role(&lab.balancers[1], "backup");

    // The data plane's backend side goes down on the master.
    lab.balancers[0]
        .ns
        .ip(&["link", "set", LB_SERVER_IF, "down"]);
    wait_role(&lab.balancers[1], "master");
    assert_eq!(
        vrrp(&lab.balancers[0])["faults"][0],
        format!("interface {LB_SERVER_IF} is down")
    );
    assert_serves(&lab);
    lab.balancers[0].ns.ip(&["link", "set", LB_SERVER_IF, "up"]);
    wait_role(&lab.balancers[0], "master");
    assert_serves(&lab);
}

/// A process of the test's, stopped when dropped, a panic included.
struct Ended(Child);

impl Drop for Ended {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

/// The number logged as `key=` in the first line of `log` that contains `what`.
fn logged(log: &str, what: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} in the log:\n{log}"));
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn restarting_the_masters_agent_moves_nothing_and_breaks_no_connection() {
    let _turn = one_at_a_time();
    // Round robin: a connection lives on the balancer whose flow table knows it, so
    // the VIP going to lb2 and back would break them.
    let mut lab = pair_with("vrrp-restart", "rr");
    // Every change to lb1's addresses, as the kernel reports it.
    let watched = lab.dir.join("lb1-addresses.log");
    let monitor = Ended(spawn_logged(
        lab.balancers[0]
            .ns
            .command("ip")
            .args(["-o", "monitor", "address"]),
        &watched,
    ));
    let mut open: Vec<TcpStream> = (0..8)
        .map(|i| connect(&lab.client, vip(), None).unwrap_or_else(|e| panic!("connect {i}: {e}")))
        .collect();
    let servers: Vec<String> = open
        .iter_mut()
        .map(|s| get(s).expect("first request"))
        .collect();
    // Requests on every kept-alive connection and on new ones, all through the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, ns) = (stop.clone(), lab.client.handle());
        thread::spawn(move || {
            let (mut requests, mut failures) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (i, s) in open.iter_mut().enumerate() {
                    match get(s) {
                        Ok(server) if server == servers[i] => {}
                        Ok(other) => failures.push(format!("connection {i} answered by {other}")),
                        Err(e) => failures.push(format!("connection {i}: {e}")),
                    }
                }
                if let Err(e) = get_once(&ns, vip(), None) {
                    failures.push(format!("new connection: {e}"));
                }
                requests += open.len() + 1;
                sleep(Duration::from_millis(5));
            }
            (requests, failures)
        })
    };
    sleep(Duration::from_millis(300));

    // SIGTERM with the default `--on-exit keep`: a restart.
    let restarting = Instant::now();
    lab.balancers[0].stop_agent();
    lab.balancers[0].start_agent();
    println!("lb1's agent restarted in {:?}", restarting.elapsed());
    // Several of lb2's master-down intervals.
    sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (requests, failures) = client.join().expect("client thread");
    drop(monitor);

    let log = lab.balancers[0].agent_log();
    assert!(log.contains("stepped aside for a restart"), "{log}");
    // The last advertisement of the old agent to the first of the new one, against
    // the time lb2 waits before taking over: 3 × interval + (256 − 100) / 256 × interval.
    let silent_ms = logged(&log, "MASTER resumed", "silent_ms");
    let interval = u64::from(ADVERT_INTERVAL_MS);
    let master_down_ms = 3 * interval + (256 - 100) * interval / 256;
    println!("lb1 was silent for {silent_ms} ms; lb2 takes over after {master_down_ms} ms");
    assert!(silent_ms < master_down_ms, "{log}");
    // The router resumed before the data plane's start, not after it.
    let resumed_at = log.find("MASTER resumed").unwrap();
    assert!(
        log.rfind("VIPs applied").is_some_and(|at| at > resumed_at),
        "{log}"
    );

    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed: {failures:?}",
        failures.len()
    );
    assert!(requests > 100, "only {requests} requests");
    let v = vrrp(&lab.balancers[1]);
    assert_eq!(v["role"], "backup", "{v}");
    assert_eq!(v["transitions"]["master"].as_u64().unwrap_or(0), 0, "{v}");
    assert_eq!(v["master"], "10.0.0.3", "{v}");
    assert!(!lab.balancers[1].holds_vip());
    let v = vrrp(&lab.balancers[0]);
    assert_eq!(v["role"], "master", "{v}");
    assert_eq!(v["last_takeover"], "resumed", "{v}");
    assert!(lab.balancers[0].holds_vip());
    let changes = std::fs::read_to_string(&watched).unwrap_or_default();
    let moved = |l: &str| {
        l.starts_with("Deleted")
            && (l.contains(&format!("{VIP}/")) || l.contains(&format!("{LB_SERVER_SIDE}/")))
    };
    assert!(
        !changes.lines().any(moved),
        "lb1's addresses went away during the restart:\n{changes}"
    );

    // A restart too slow to resume: lb2 takes over once, and the restarted lb1, which
    // outranks it and preempts, leaves it the role rather than fail over again.
    lab.balancers[0].stop_agent();
    wait_role(&lab.balancers[1], "master");
    assert_eq!(vrrp(&lab.balancers[1])["last_takeover"], "master_down");
    lab.balancers[0].start_agent();
    wait_role(&lab.balancers[0], "backup");
    sleep(Duration::from_millis(1000));
    assert!(lab.balancers[0].agent_log().contains("too late"));
    let v = vrrp(&lab.balancers[0]);
    assert_eq!(v["role"], "backup", "{v}");
    assert_eq!(v["master"], "10.0.0.4", "{v}");
    assert!(!lab.balancers[0].holds_vip(), "a BACKUP kept the addresses");
    let v = vrrp(&lab.balancers[1]);
    assert_eq!(v["role"], "master", "{v}");
    assert_eq!(v["transitions"]["master"], 1, "{v}");
    assert!(lab.balancers[1].holds_vip());
    assert_serves(&lab);
}

#[test]
fn a_real_stop_of_the_master_hands_over_at_once() {
    let _turn = one_at_a_time();
    let mut lab = Lab::up(LabSpec::ha_for_test("vrrp-stop", 2));
    lab.balancers[0].write_config(&ha_config(2, 150, true));
    start_as_a_unit(&mut lab);
    lab.balancers[1].write_config(&ha_config(2, 100, true));
    lab.balancers[1].start_agent();
    wait_role(&lab.balancers[0], "master");
    wait_role(&lab.balancers[1], "backup");
    wait_until(LIMIT, "lb2 to hear lb1", || {
        vrrp(&lab.balancers[1])["master"] == "10.0.0.3"
    });
    let mut long_lived = connect(&lab.client, vip(), None).expect("connect");
    let server = get(&mut long_lived).expect("first request");

    let probe = Probe::start(&lab.client, vip());
    sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    stop_as_a_unit(&mut lab);
    wait_role(&lab.balancers[1], "master");
    let took = stopping.elapsed();
    sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let o = outage(&attempts).expect("some request got through");
    println!(
        "a real stop: lb2 MASTER {} ms after SIGTERM (polled), longest gap {} ms ({} of {} \
         requests failed)",
        took.as_millis(),
        o.longest_gap.as_millis(),
        o.failures,
        o.attempts
    );
    // lb2 heard priority 0 rather than waiting for lb1's advertisements to stop.
    let v = vrrp(&lab.balancers[1]);
    assert_eq!(v["last_takeover"], "master_stopped", "{v}");
    assert!(o.contiguous, "requests failed outside one outage: {o:?}");
    // The failover bound of a dead master: its master-down interval and one more interval.
    let bound = Duration::from_millis(u64::from(4 * ADVERT_INTERVAL_MS));
    assert!(o.longest_gap < bound, "{o:?}");
    assert!(!lab.balancers[0].holds_vip());
    assert!(
        !lab.balancers[0]
            .ns
            .ip(&["-4", "addr", "show", "dev", LB_SERVER_IF])
            .contains(&format!("{LB_SERVER_SIDE}/24"))
    );
    assert!(lab.balancers[1].holds_vip());
    assert!(!lab.balancers[0].agent_log().contains("stepped aside"));
    assert_eq!(
        get(&mut long_lived).expect("request after the stop"),
        server
    );
    assert_serves(&lab);
}
