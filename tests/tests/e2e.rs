//! End to end: the agent on real veths in network namespaces, real TCP through the
//! VIP to real HTTP servers, changed live through the CLI.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use tests::{
    e2e::{json, lab_with, one_at_a_time, running_state, tally, vip},
    http::{connect, get, get_once},
    lab::{LB_CLIENT_IF, LB_SERVER_IF, VIP, VIP_PORT, WEB_PORT, config, web_addr, web_name},
};

fn backend(i: usize) -> String {
    format!("{}:{WEB_PORT}", web_addr(i))
}

#[test]
fn rr_spreads_new_connections_exactly_as_weighted() {
    let _turn = one_at_a_time();
    let lab = lab_with("rr", 3, Some(config("rr", &[(0, 3), (1, 1), (2, 2)])));
    // 60 new connections = 10 turns of the 6-slot ring.
    let answers: Vec<String> = (0..60)
        .map(|i| get_once(&lab.client, vip(), None).unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect();
    let counts = tally(answers.clone());
    assert_eq!(
        counts,
        BTreeMap::from([
            ("web1".into(), 30),
            ("web2".into(), 10),
            ("web3".into(), 20)
        ]),
        "answers: {answers:?}"
    );
    // Smooth weighted round robin interleaves: web1 never answers 3 times in a row.
    assert!(
        !answers.windows(3).any(|w| w.iter().all(|a| a == "web1")),
        "{answers:?}"
    );
    // The counters saw the same.
    let stats = json(&lab, &["stats"]);
    let flows: Vec<u64> = stats["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["new_flows"].as_u64().unwrap())
        .collect();
    assert_eq!(flows, vec![30, 10, 20]);
}

/// Which server each client port reaches on a new connection.
fn by_port(lab: &foobar_lab::lab::Lab, ports: std::ops::Range<u16>) -> BTreeMap<u16, String> {
    ports
        .map(|p| {
            let answer = get_once(&lab.client, vip(), Some(p))
                .unwrap_or_else(|e| panic!("request from port {p}: {e}"));
            (p, answer)
        })
        .collect()
}

#[test]
fn maglev_keeps_each_client_port_on_its_backend_across_restarts_and_removals() {
    let _turn = one_at_a_time();
    let mut lab = lab_with(
        "maglev",
        3,
        Some(config("maglev", &[(0, 1), (1, 1), (2, 1)])),
    );
    let ports = 41_000..41_060;
    let first = by_port(&lab, ports.clone());
    assert_eq!(
        tally(first.values().cloned()).len(),
        3,
        "60 ports should reach all 3 servers: {first:?}"
    );
    // Every attempt from a port lands where the first did (each is a new SYN,
    // scheduled afresh through the Maglev table).
    assert_eq!(by_port(&lab, ports.clone()), first);
    // The user-space simulator predicts every one of them.
    for (&port, server) in first.iter().take(20) {
        let explained = json(&lab, &["explain", "www", &format!("10.0.0.2:{port}")]);
        let predicted = explained["backend"].as_str().unwrap().to_owned();
        let index = (0..3).find(|&i| web_name(i) == *server).unwrap();
        assert_eq!(predicted, backend(index), "port {port}");
    }

    lab.stop_agent();
    lab.start_agent();
    assert_eq!(
        by_port(&lab, ports.clone()),
        first,
        "after an agent restart"
    );

    lab.cli_ok(&["backend", "remove", "www", &backend(2)]);
    let after = by_port(&lab, ports.clone());
    for (port, before) in &first {
        if before == "web3" {
            assert_ne!(
                after[port], "web3",
                "port {port} still reaches a removed backend"
            );
        } else {
            assert_eq!(
                &after[port], before,
                "port {port} moved though its backend stayed"
            );
        }
    }
}

#[test]
fn drain_keeps_open_connections_and_sends_new_ones_elsewhere() {
    let _turn = one_at_a_time();
    let lab = lab_with("drain", 2, None);
    let mut open = connect(&lab.client, vip(), None).expect("connect");
    let server = get(&mut open).expect("first request");
    let index = if server == "web1" { 0 } else { 1 };
    let out = lab.cli_ok(&["backend", "drain", "www", &backend(index)]);
    assert!(out.contains("applied"), "{out}");
    let status = json(&lab, &["backend", "list", "www"]);
    assert_eq!(status[0]["backends"][index]["state"], "draining");

    for i in 0..5 {
        assert_eq!(
            get(&mut open).expect("request on the open connection"),
            server,
            "request {i} on the open connection"
        );
    }
    let others: Vec<String> = (0..10)
        .map(|_| get_once(&lab.client, vip(), None).expect("new connection"))
        .collect();
    assert!(
        others.iter().all(|a| *a != server),
        "a drained backend got new connections: {others:?}"
    );
    // Undrain: it gets new connections again.
    lab.cli_ok(&["backend", "weight", "www", &backend(index), "1"]);
    let back: Vec<String> = (0..4)
        .map(|_| get_once(&lab.client, vip(), None).expect("new connection"))
        .collect();
    assert!(back.contains(&server), "{back:?}");
}

#[test]
fn agent_restarts_under_load_without_failing_a_request() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("restart", 2, None);
    // At least this many requests, spanning both restarts; at most 20 times as many.
    const REQUESTS: usize = 2_000;
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (done, stop, ns) = (done.clone(), stop.clone(), lab.client.handle());
        thread::spawn(move || {
            let mut failures = Vec::new();
            for i in 0..REQUESTS * 20 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Err(e) = get_once(&ns, vip(), None) {
                    failures.push(format!("request {i}: {e}"));
                }
                done.store(i + 1, Ordering::Relaxed);
            }
            failures
        })
    };
    let wait_for = |n: usize| {
        while done.load(Ordering::Relaxed) < n && !worker.is_finished() {
            thread::sleep(Duration::from_millis(5));
        }
    };
    // Two restarts, each with requests before, during and after it.
    for _ in 0..2 {
        wait_for(done.load(Ordering::Relaxed) + 300);
        lab.stop_agent();
        lab.start_agent();
    }
    wait_for(REQUESTS.max(done.load(Ordering::Relaxed) + 300));
    stop.store(true, Ordering::Relaxed);
    let failures = worker.join().expect("client thread");
    let total = done.load(Ordering::Relaxed);
    assert!(total >= REQUESTS, "only {total} requests");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    let log = lab.agent_log();
    assert_eq!(
        log.matches("took over the pinned link").count(),
        4,
        "each restart should take over both links:\n{log}"
    );
    assert_eq!(json(&lab, &["status"])["resumed"], true);
    // A restarted agent adopts what is in the maps and writes nothing anew.
    assert_eq!(
        log.matches("resumed=true report=ApplyReport { vips_added: 0, vips_removed: 0, backends_added: 0, backends_removed: 0, slots_written: 0")
            .count(),
        2,
        "{log}"
    );
}

#[test]
fn live_changes_keep_every_established_connection() {
    let _turn = one_at_a_time();
    let lab = lab_with("live", 3, Some(config("maglev", &[(0, 1), (1, 1)])));
    let mut open: Vec<_> = (0..8)
        .map(|_| connect(&lab.client, vip(), None).expect("connect"))
        .collect();
    let servers: Vec<String> = open.iter_mut().map(|s| get(s).expect("first")).collect();
    let check = |open: &mut Vec<std::net::TcpStream>, when: &str| {
        for (i, s) in open.iter_mut().enumerate() {
            assert_eq!(
                get(s).unwrap_or_else(|e| panic!("connection {i} {when}: {e}")),
                servers[i],
                "connection {i} {when}"
            );
        }
    };
    lab.cli_ok(&["backend", "add", "www", &backend(2)]);
    check(&mut open, "after adding web3");
    let fresh: Vec<String> = (0..30)
        .map(|_| get_once(&lab.client, vip(), None).expect("new connection"))
        .collect();
    assert!(fresh.contains(&"web3".to_owned()), "{fresh:?}");
    lab.cli_ok(&["backend", "weight", "www", &backend(0), "4"]);
    check(&mut open, "after reweighting web1");
    lab.cli_ok(&["backend", "remove", "www", &backend(2)]);
    check(&mut open, "after removing web3");
    lab.cli_ok(&[
        "vip",
        "add",
        "other",
        "10.0.0.100:8080",
        "--backend",
        &backend(2),
    ]);
    check(&mut open, "after adding a VIP");
    lab.cli_ok(&["vip", "remove", "other"]);
    check(&mut open, "after removing a VIP");
}

#[test]
fn curl_and_wrk_through_the_vip() {
    let _turn = one_at_a_time();
    let lab = lab_with("clients", 2, None);
    let answers: Vec<String> = (0..4).map(|_| lab.get().expect("curl")).collect();
    assert_eq!(answers, ["web1", "web2", "web1", "web2"]);

    let out = lab
        .client
        .command("wrk")
        .args(["-t2", "-c8", "-d2s", &format!("http://{VIP}:{VIP_PORT}/")])
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk: {text}");
    let requests: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split(" requests in")
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no request count in {text}"));
    assert!(requests > 100, "{text}");
    assert!(!text.contains("Socket errors"), "{text}");
    assert!(!text.contains("Non-2xx"), "{text}");
    // 4 curl connections and wrk's 8 (and its probe), alternating by round robin.
    let status = json(&lab, &["status"]);
    let new_flows: Vec<u64> = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["traffic"]["new_flows"].as_u64().unwrap())
        .collect();
    assert!(new_flows.iter().sum::<u64>() >= 12, "{status}");
    assert!(new_flows[0].abs_diff(new_flows[1]) <= 1, "{status}");
}

#[test]
fn detach_on_exit_removes_the_program_and_its_pins() {
    let _turn = one_at_a_time();
    let mut lab = lab_with("detach", 1, None);
    assert!(lab.lb().ip(&["link", "show", LB_CLIENT_IF]).contains("xdp"));
    let status = lab.stop_agent();
    assert!(status.success(), "{status}");
    // --on-exit keep (the default) left it forwarding.
    assert_eq!(lab.get().as_deref(), Some("web1"));
    assert!(
        foobar_lb::pin::maps_dir(&lab.balancer().pin_dir)
            .join("FLOWS")
            .exists()
    );

    // A run with --on-exit detach, stopped by SIGTERM, leaves nothing behind.
    let mut agent = lab
        .agent_command(&["--on-exit", "detach"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    foobar_lab::lab::wait_until(Duration::from_secs(20), "the agent", || {
        lab.cli(&["status"]).status.success()
    });
    let status = foobar_lab::lab::terminate(&mut agent);
    assert!(status.success(), "{status}");
    for ifname in [LB_CLIENT_IF, LB_SERVER_IF] {
        assert!(
            !lab.lb().ip(&["link", "show", ifname]).contains("xdp"),
            "{ifname} still has XDP"
        );
    }
    assert!(
        !lab.balancer().pin_dir.exists(),
        "pins left in {}",
        lab.balancer().pin_dir.display()
    );
    assert!(!lab.socket().exists());
}

#[test]
fn a_start_that_fails_after_attaching_leaves_the_data_plane_as_on_exit_says() {
    let _turn = one_at_a_time();
    let lab = tests::lab::Lab::up(tests::lab::LabSpec::for_test("late-fail", 1));
    // The metrics port is taken in the balancer's namespace: the agent attaches,
    // then cannot bind it.
    let taken = {
        let _inside = lab.lb().enter();
        std::net::TcpListener::bind("127.0.0.1:9100").expect("take the metrics port")
    };
    lab.write_config(&(config("rr", &[(0, 1)]) + "\n[metrics]\nlisten = \"127.0.0.1:9100\"\n"));
    let out = lab
        .agent_command(&["--on-exit", "detach"])
        .output()
        .expect("run the agent");
    drop(taken);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {said}");
    assert!(said.contains("metrics listener"), "{said}");
    // Detached, as asked: no program left on the interfaces, no pins, no socket.
    for ifname in [LB_CLIENT_IF, LB_SERVER_IF] {
        assert!(
            !lab.lb().ip(&["link", "show", ifname]).contains("xdp"),
            "{ifname} still has XDP"
        );
    }
    assert!(!lab.balancer().pin_dir.exists(), "pins left");
    assert!(!lab.socket().exists());
}

#[test]
fn reload_applies_a_changed_file_whole() {
    let _turn = one_at_a_time();
    let lab = lab_with("reload", 2, Some(config("rr", &[(0, 1)])));
    assert_eq!(lab.get().as_deref(), Some("web1"));
    lab.write_config(&config("rr", &[(0, 1), (1, 1)]));
    let out = lab.cli_ok(&["reload"]);
    assert!(out.contains("1 backends added"), "{out}");
    let answers: Vec<String> = (0..4).map(|_| lab.get().expect("curl")).collect();
    assert_eq!(tally(answers).len(), 2);
    // SIGHUP does the same.
    lab.write_config(&config("rr", &[(1, 1)]));
    let pid = lab.agent_pid().expect("agent");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    foobar_lab::lab::wait_until(Duration::from_secs(10), "the SIGHUP reload", || {
        running_state(&lab)[0]["backends"].as_array().unwrap().len() == 1
    });
    let answers: Vec<String> = (0..4).map(|_| lab.get().expect("curl")).collect();
    assert!(answers.iter().all(|a| a == "web2"), "{answers:?}");
}

#[test]
fn the_programs_debug_log_reaches_the_agents_log() {
    let _turn = one_at_a_time();
    let mut lab = foobar_lab::lab::Lab::up(foobar_lab::lab::LabSpec::for_test("ebpflog", 1));
    lab.write_config(&config("rr", &[(0, 0)]));
    lab.balancer_mut().log_filter = "debug".into();
    lab.start_agent();
    // Every backend drained: the program drops the SYN and says why.
    assert_eq!(lab.get(), None);
    foobar_lab::lab::wait_until(Duration::from_secs(10), "the program's log line", || {
        lab.agent_log()
            .contains("has no backend in its schedule: dropping")
    });
    let stats = json(&lab, &["stats"]);
    let no_backend = stats["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "drop_no_backend")
        .unwrap()["value"]
        .as_u64()
        .unwrap();
    assert!(no_backend >= 1, "{stats}");
}

#[test]
fn next_hops_follow_the_kernels_neighbours() {
    let _turn = one_at_a_time();
    let lab = lab_with("nexthop", 2, None);
    let next_hop = |lab: &foobar_lab::lab::Lab| -> Option<String> {
        let status = json(lab, &["status"]);
        status["vips"][0]["backends"][0]["next_hop"]
            .as_str()
            .map(str::to_owned)
    };
    // The health of the lab's start resolved web1 (the kernel's ARP), and the agent
    // wrote what the kernel knows.
    tests::lab::wait_until(Duration::from_secs(5), "web1's next hop", || {
        next_hop(&lab).is_some()
    });
    let before = next_hop(&lab).unwrap();
    assert!(before.starts_with("eth-servers "), "{before}");

    // web1 gets a new MAC; the balancer's kernel forgets the old one.
    let moved = "02:aa:bb:cc:dd:11";
    lab.webs[0].ip(&["link", "set", "eth0", "address", moved]);
    lab.lb().ip(&[
        "neigh",
        "flush",
        "dev",
        "eth-servers",
        "to",
        &web_addr(0).to_string(),
    ]);
    // Every request still answered: while the agent knows no next hop, packets go to
    // the kernel, which resolves the new MAC; then the agent writes it.
    let answers: Vec<String> = (0..20).map(|_| lab.get().expect("an answer")).collect();
    assert_eq!(tally(answers).len(), 2, "both servers answered");
    tests::lab::wait_until(Duration::from_secs(5), "the new MAC in web1's slot", || {
        next_hop(&lab).as_deref() == Some(&format!("eth-servers {moved}"))
    });
    assert_ne!(before, format!("eth-servers {moved}"));
    for _ in 0..10 {
        assert!(lab.get().is_some());
    }
}
