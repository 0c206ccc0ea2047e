//! Active-active balancers over BGP (issue 15): three balancers announce the VIP to a
//! router that spreads the clients' flows over them by ECMP; they forward by DSR with
//! Maglev, so any of them sends a flow to the same web server. A balancer that dies
//! is dropped by the router (BFD) and its connections carry on through the others; one
//! without a usable backend withdraws the VIP; a clean stop withdraws before it stops
//! forwarding; round robin, which would break connections that move, is refused.

use std::{
    net::TcpStream,
    thread::{self, sleep},
    time::{Duration, Instant},
};

use foobar_lab::{
    bgp::{
        BGP_VIP, BgpLab, BgpSpec, ROUTER_BALANCER_SIDE, WITHDRAW_WAIT_MS, agent_config,
        parse_next_hops,
    },
    lab::{Balancer, LB_CLIENT_IF, LB_CLIENT_SIDE, Lab, LabSpec, balancer_client_addr},
    probe::{Attempt, Probe, outage},
    process::{bin, spawn_logged, terminate, wait_until},
};
use serde_json::Value;
use tests::{
    e2e::{json_of, metrics_of, one_at_a_time},
    http::{connect, get, get_once},
};

const LIMIT: Duration = Duration::from_secs(10);
const BALANCERS: usize = 3;
/// Connections held open across a failover: enough that each balancer carries some
/// (all on two of three: (2/3)^30 × 3, about 1 in 6000).
const HELD: usize = 30;

fn status(b: &Balancer) -> Value {
    json_of(b, &["status"])
}

/// Packets the balancer's VIP has forwarded so far.
fn vip_packets(b: &Balancer) -> u64 {
    let s = status(b);
    s["vips"][0]["traffic"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no VIP packet count in {s}"))
}

fn packets(lab: &BgpLab) -> Vec<u64> {
    lab.balancers.iter().map(vip_packets).collect()
}

/// What each balancer forwarded since `before`.
fn since(lab: &BgpLab, before: &[u64]) -> Vec<u64> {
    packets(lab)
        .iter()
        .zip(before)
        .map(|(now, then)| now.saturating_sub(*then))
        .collect()
}

/// The balancer's word on the VIP: `bgp.vips[]` for [`BGP_VIP`].
fn vip_bgp(b: &Balancer) -> Value {
    let s = status(b);
    s["bgp"]["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["address"] == BGP_VIP.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{} lists no BGP VIP {BGP_VIP}: {s}", b.name))
}

fn announced(b: &Balancer) -> bool {
    vip_bgp(b)["announced"] == true
}

/// Opens `n` kept-alive connections to the VIP from the client, each with a first
/// request; each with the server that answered.
fn hold(lab: &BgpLab, n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|i| {
            let mut stream = connect(&lab.client, lab.vip(), None)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let server =
                get(&mut stream).unwrap_or_else(|e| panic!("first request on connection {i}: {e}"));
            (stream, server)
        })
        .collect()
}

/// One more request on every held connection: what went wrong.
fn ask_again(held: &mut [(TcpStream, String)]) -> Vec<String> {
    held.iter_mut()
        .enumerate()
        .filter_map(|(i, (stream, server))| match get(stream) {
            Ok(answer) if answer == *server => None,
            Ok(other) => Some(format!("connection {i}: answered by {other}, not {server}")),
            Err(e) => Some(format!("connection {i}: {e}")),
        })
        .collect()
}

/// `n` requests from the client, each on a new connection; panics on a failure.
fn serve(lab: &BgpLab, n: usize) {
    for i in 0..n {
        get_once(&lab.client, lab.vip(), None)
            .unwrap_or_else(|e| panic!("request {i} on a new connection: {e}"));
    }
}

/// The failed attempts: how many, and the span from the first one's start to the last
/// one's end.
fn failures(attempts: &[Attempt]) -> (usize, Option<(Instant, Instant)>) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_none()).collect();
    let span = failed
        .iter()
        .map(|a| a.started)
        .min()
        .zip(failed.iter().map(|a| a.at).max());
    (failed.len(), span)
}

fn wait_announced(b: &Balancer, want: bool) {
    wait_until(
        LIMIT,
        &format!("{} to say the VIP is announced: {want}", b.name),
        || announced(b) == want,
    );
}

#[test]
fn a_crashed_balancer_breaks_no_connection() {
    let _turn = one_at_a_time();
    let mut lab = BgpLab::up(BgpSpec::for_test("bgp-crash", BALANCERS));
    let everyone: Vec<_> = (0..BALANCERS).map(balancer_client_addr).collect();
    assert_eq!(lab.next_hops(), everyone);
    for b in &lab.balancers {
        wait_until(
            LIMIT,
            &format!("{}'s session and its BFD to show up", b.name),
            // Status is a snapshot at most a second old, BIRD read every second.
            || {
                let session = &status(b)["bgp"]["sessions"][0];
                session["bfd"] == "up" && session["state"] == "established"
            },
        );
        let s = status(b);
        let session = &s["bgp"]["sessions"][0];
        assert_eq!(
            session["neighbour"],
            ROUTER_BALANCER_SIDE.to_string(),
            "{s}"
        );
        assert_eq!(session["remote_as"], 65000, "{s}");
        assert_eq!(session["state"], "established", "{s}");
        assert!(announced(b), "{s}");
        let m = metrics_of(b);
        assert!(
            m.contains(&format!(
                "foobar_lb_bgp_session_established{{neighbour=\"{ROUTER_BALANCER_SIDE}\"}} 1"
            )),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "foobar_lb_bgp_vip_announced{{address=\"{BGP_VIP}\"}} 1"
            )),
            "{m}"
        );
    }
    println!("{}", lab.router_bird("show route"));

    // The router spreads connections over every balancer.
    let before = packets(&lab);
    let mut held = hold(&lab, HELD);
    let carried = since(&lab, &before);
    println!("packets of {HELD} connections through each balancer: {carried:?}");
    assert!(
        carried.iter().all(|&n| n > 0),
        "ECMP left a balancer out: {carried:?}"
    );

    // lb1 dies: the router's BFD notices, BGP drops its route, and the kernel routes
    // over the other two. Connections that went through lb1 go through them now:
    // the same Maglev table, and the web servers answer the client directly.
    let probe = Probe::start(&lab.client, lab.vip());
    sleep(Duration::from_millis(300));
    let crashed = Instant::now();
    assert!(
        lab.crash_balancer(0),
        "lb1's BIRD outlived its SIGKILLed agent"
    );
    lab.wait_next_hops(BALANCERS - 1, LIMIT);
    let converged = Instant::now();
    assert!(!lab.next_hops().contains(&balancer_client_addr(0)));
    sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let o = outage(&attempts).expect("some request got through");
    let (failed, span) = failures(&attempts);
    println!(
        "a crashed balancer: the router routed around it {} ms later (polled); {failed} of {} \
         new connections failed, over {} ms; longest gap between answers {} ms",
        (converged - crashed).as_millis(),
        o.attempts,
        span.map_or(0, |(from, to)| (to - from).as_millis()),
        o.longest_gap.as_millis()
    );
    // Only connections hashed to lb1 between its death and the router's new route
    // fail (a third of them): one window, nothing failed before it or after it.
    for a in attempts.iter().filter(|a| a.answer.is_none()) {
        assert!(a.at >= crashed, "a request failed before the crash");
        assert!(
            a.started <= converged,
            "a new connection failed after the router had dropped lb1"
        );
    }
    assert!(
        attempts.last().unwrap().answer.is_some(),
        "the survivors do not serve"
    );
    let broken = ask_again(&mut held);
    assert!(broken.is_empty(), "held connections broke: {broken:?}");

    // lb1 comes back: the router routes over it again, it gets new connections, and
    // the connections that moved away from it and back carry on.
    let probe = Probe::start(&lab.client, lab.vip());
    let reviving = Instant::now();
    lab.revive_balancer(0);
    println!(
        "lb1 back in the router's route {} ms after its agent started",
        reviving.elapsed().as_millis()
    );
    sleep(Duration::from_millis(300));
    let attempts = probe.stop();
    let (failed, _) = failures(&attempts);
    println!(
        "while lb1 came back: {failed} of {} new connections failed",
        attempts.len()
    );
    assert_eq!(lab.next_hops(), everyone);
    let before = packets(&lab);
    serve(&lab, HELD);
    let carried = since(&lab, &before);
    println!("packets of {HELD} new connections through each balancer: {carried:?}");
    assert!(carried[0] > 0, "lb1 gets no new connections: {carried:?}");
    let broken = ask_again(&mut held);
    assert!(
        broken.is_empty(),
        "held connections broke when lb1 came back: {broken:?}"
    );
}

#[test]
fn a_balancer_without_backends_withdraws() {
    let _turn = one_at_a_time();
    let lab = BgpLab::up(BgpSpec::for_test("bgp-nobackend", BALANCERS));
    let lb3 = &lab.balancers[2];
    let lb3_address = balancer_client_addr(2);
    let announcements = status(lb3)["bgp"]["announcements"].as_u64().unwrap_or(0);

    // Through the API as through the file: a round-robin VIP on the announced address
    // is refused, naming the way out, and nothing changes.
    let names = |lb: &Balancer| -> Vec<Value> {
        let vips = status(lb)["vips"].as_array().cloned().unwrap_or_default();
        vips.iter().map(|v| v["name"].clone()).collect()
    };
    let before = names(lb3);
    let refused = lb3.cli(&[
        "vip",
        "add",
        "rr",
        &format!("{BGP_VIP}:8080"),
        "--scheduler",
        "rr",
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "an rr VIP was added: {said}");
    assert!(said.contains("maglev"), "{said}");
    assert_eq!(names(lb3), before);

    // lb3's own health checks fail (the SYNs of its probes are dropped as they leave
    // it; its XDP sees only what arrives), while the web servers stay healthy for the
    // other balancers and for the clients.
    for command in [
        "add table inet bgp_test",
        "add chain inet bgp_test out { type filter hook output priority 0 ; }",
        "add rule inet bgp_test out tcp dport 80 drop",
    ] {
        lb3.ns.exec("nft", &[command]);
    }
    wait_announced(lb3, false);
    let reason = vip_bgp(lb3)["reason"].as_str().unwrap_or("").to_owned();
    println!("lb3 withdrew the VIP: {reason}");
    assert!(!reason.is_empty(), "no reason given: {}", status(lb3));
    lab.wait_next_hops(BALANCERS - 1, LIMIT);
    assert!(!lab.next_hops().contains(&lb3_address));
    let m = metrics_of(lb3);
    assert!(
        m.contains(&format!(
            "foobar_lb_bgp_vip_announced{{address=\"{BGP_VIP}\"}} 0"
        )),
        "{m}"
    );
    assert!(
        status(lb3)["bgp"]["withdrawals"].as_u64().unwrap_or(0) >= 1,
        "{}",
        status(lb3)
    );

    // It gets nothing more; the other two serve everyone.
    sleep(Duration::from_millis(300));
    let before = packets(&lab);
    serve(&lab, HELD);
    let carried = since(&lab, &before);
    println!("packets of {HELD} connections through each balancer: {carried:?}");
    assert_eq!(carried[2], 0, "lb3 still gets connections: {carried:?}");
    assert!(carried[0] > 0 && carried[1] > 0, "{carried:?}");

    // Its checks pass again: it announces the VIP again and gets its share.
    lb3.ns.exec("nft", &["delete table inet bgp_test"]);
    wait_announced(lb3, true);
    lab.wait_next_hops(BALANCERS, LIMIT);
    assert!(lab.next_hops().contains(&lb3_address));
    assert!(
        status(lb3)["bgp"]["announcements"].as_u64().unwrap_or(0) > announcements,
        "{}",
        status(lb3)
    );
    let before = packets(&lab);
    serve(&lab, HELD);
    let carried = since(&lab, &before);
    assert!(carried[2] > 0, "lb3 gets no connections again: {carried:?}");
}

#[test]
fn rr_is_refused_active_active() {
    let _turn = one_at_a_time();
    // A plain lab: the config is refused before anything starts.
    let lab = Lab::up(LabSpec::for_test("bgp-rr", 1));
    lab.write_config(&agent_config(1, "rr", LB_CLIENT_SIDE));
    let log = lab.dir.join("rr-agent.log");
    let mut agent = spawn_logged(
        lab.lb()
            .command(&bin(&lab.spec().bin_dir, "foobar-lb"))
            .arg("--socket")
            .arg(lab.socket())
            .args(["run", "--config"])
            .arg(lab.config_path())
            .arg("--pin-dir")
            .arg(&lab.balancer().pin_dir),
        &log,
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait for the agent") {
            break status;
        }
        if started.elapsed() > LIMIT {
            terminate(&mut agent);
            panic!(
                "the agent runs with an rr VIP announced over BGP:\n{}",
                read_log()
            );
        }
        sleep(Duration::from_millis(50));
    };
    let text = read_log();
    assert!(!status.success(), "{text}");
    // Named by its name or its address.
    assert!(
        text.contains("www") || text.contains(&BGP_VIP.to_string()),
        "{text}"
    );
    assert!(text.contains("maglev"), "{text}");
    assert!(
        !lab.lb().ip(&["link", "show", LB_CLIENT_IF]).contains("xdp"),
        "the refused agent attached its program"
    );
}

#[test]
fn a_clean_stop_withdraws_first() {
    let _turn = one_at_a_time();
    let mut lab = BgpLab::up(BgpSpec::for_test("bgp-stop", BALANCERS));
    let lb3_address = balancer_client_addr(2);
    let mut held = hold(&lab, HELD);

    // Watches the router's route: when lb3 leaves it.
    let watcher = {
        let router = lab.router.handle();
        thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < 2 * LIMIT {
                let route = router.ip(&["-j", "route", "show", &BGP_VIP.to_string()]);
                if !parse_next_hops(&route).contains(&lb3_address) {
                    return Some(Instant::now());
                }
                sleep(Duration::from_millis(5));
            }
            None
        })
    };
    let probe = Probe::start(&lab.client, lab.vip());
    sleep(Duration::from_millis(300));
    // SIGTERM, as its service unit stops it (`--on-exit detach`: a real stop).
    let stopping = Instant::now();
    let exit = lab.balancers[2].stop_agent();
    let exited = Instant::now();
    assert!(
        exit.success(),
        "lb3's agent failed to stop ({exit}):\n{}",
        lab.balancers[2].agent_log()
    );
    lab.wait_next_hops(BALANCERS - 1, LIMIT);
    sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let withdrawn = watcher
        .join()
        .expect("route watcher")
        .expect("lb3 left the router's route");
    let o = outage(&attempts).expect("some request got through");
    println!(
        "a clean stop: the router dropped lb3 {} ms after SIGTERM, the agent exited after {} ms \
         (it waits {WITHDRAW_WAIT_MS} ms); longest gap between answers {} ms, {} of {} requests failed",
        withdrawn.saturating_duration_since(stopping).as_millis(),
        (exited - stopping).as_millis(),
        o.longest_gap.as_millis(),
        o.failures,
        o.attempts
    );
    // Withdrawn first, then the wait (the routers move the flows), then the stop: a
    // BIRD merely killed with the agent would drop the route as the agent exits.
    assert!(
        exited.saturating_duration_since(withdrawn)
            >= Duration::from_millis(u64::from(WITHDRAW_WAIT_MS) / 2),
        "lb3 stopped {} ms after the router had dropped it; it waits {WITHDRAW_WAIT_MS} ms",
        exited.saturating_duration_since(withdrawn).as_millis()
    );
    assert_eq!(o.failures, 0, "requests failed while lb3 stopped: {o:?}");
    assert!(!lab.next_hops().contains(&lb3_address));
    // Its data plane is gone: had it not withdrawn first, its flows would have failed.
    assert!(
        !lab.balancers[2]
            .ns
            .ip(&["link", "show", LB_CLIENT_IF])
            .contains("xdp"),
        "lb3's program is still attached"
    );
    let broken = ask_again(&mut held);
    assert!(broken.is_empty(), "held connections broke: {broken:?}");
}
