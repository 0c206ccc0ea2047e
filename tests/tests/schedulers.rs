//! The schedulers end to end: real TCP clients (curl, sockets) through the XDP
//! balancer to real web servers in network namespaces, one of them made slow by a
//! token-bucket filter on its link.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use tests::{
    e2e::{json, lab_with, one_at_a_time, tally, vip},
    http::{connect_from, get},
    lab::{Lab, VIP, WEB_PORT, config, wait_until, web_addr},
};

/// Runs `clients` curl loops through the VIP for `seconds`, each a new connection
/// closed the usual way (FIN both ways); returns how many each server answered.
fn curl_load(lab: &Lab, clients: usize, seconds: u32) -> BTreeMap<String, usize> {
    let script = format!(
        "end=$(( $(date +%s) + {seconds} )); \
         while [ $(date +%s) -lt $end ]; do curl -s -m 5 http://{VIP}/; echo; done"
    );
    let outputs: Vec<String> = thread::scope(|s| {
        let loops: Vec<_> = (0..clients)
            .map(|_| s.spawn(|| lab.client.exec("sh", &["-c", &script])))
            .collect();
        loops
            .into_iter()
            .map(|l| l.join().expect("curl loop"))
            .collect()
    });
    let answers = outputs
        .iter()
        .flat_map(|out| out.lines())
        .filter(|line| !line.is_empty())
        .map(str::to_owned);
    tally(answers)
}

fn share(counts: &BTreeMap<String, usize>, server: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(server).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

#[test]
fn least_connections_sends_a_slow_server_fewer_connections_than_round_robin() {
    let _turn = one_at_a_time();
    let lab = lab_with("lc", 2, Some(config("rr", &[(0, 1), (1, 1)])));
    // web2 answers late: what it sends leaves at 100 kbit/s (about 20 ms a packet).
    lab.webs[1].exec(
        "tc",
        &[
            "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "100kbit", "burst", "1600",
            "latency", "2s",
        ],
    );
    let rr = curl_load(&lab, 6, 3);
    lab.write_config(&config("lc", &[(0, 1), (1, 1)]));
    lab.balancer().cli_ok(&["reload"]);
    let lc = curl_load(&lab, 6, 3);
    let (rr_slow, lc_slow) = (share(&rr, "web2"), share(&lc, "web2"));
    // Figures for the record.
    println!(
        "new connections to the slow server: rr {:.1}% of {} ({rr:?}), lc {:.1}% of {} ({lc:?})",
        rr_slow * 100.0,
        rr.values().sum::<usize>(),
        lc_slow * 100.0,
        lc.values().sum::<usize>(),
    );
    assert!((0.4..=0.6).contains(&rr_slow), "rr alternates: {rr:?}");
    assert!(lc_slow < rr_slow / 2.0, "lc avoids the slow server: {lc:?}");
    // Every connection closed (FIN both ways): the counts go back to nothing once the
    // loops end and the slow link has let its last FINs through.
    let active = || -> Vec<u64> {
        json(&lab, &["status"])["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["traffic"]["active_flows"].as_u64().unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(15), "no active connection left", || {
        active() == [0, 0]
    });
}

#[test]
fn source_hashing_keeps_each_client_on_one_server_and_moves_only_a_removed_servers_clients() {
    let _turn = one_at_a_time();
    let lab = lab_with("sh", 3, Some(config("sh", &[(0, 1), (1, 1), (2, 1)])));
    let clients: Vec<Ipv4Addr> = (10..30).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    for c in &clients {
        lab.client
            .ip(&["addr", "add", &format!("{c}/24"), "dev", "eth0"]);
    }
    let request = |from: Ipv4Addr| {
        let from = SocketAddrV4::new(from, 0);
        let mut stream = connect_from(&lab.client, from, vip(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{from}: {e}"));
        get(&mut stream).unwrap_or_else(|e| panic!("{from}: {e}"))
    };
    // 1,000 connections, 50 from each client: one server per client.
    let mut server_of = BTreeMap::new();
    for round in 0..50 {
        for &c in &clients {
            let server = request(c);
            let first = server_of.entry(c).or_insert_with(|| server.clone());
            assert_eq!(*first, server, "{c} moved on connection {round}");
        }
    }
    let spread = tally(server_of.values().cloned());
    assert_eq!(spread.len(), 3, "every server has clients: {spread:?}");
    // web3 leaves: only its clients move.
    let web3 = format!("{}:{WEB_PORT}", web_addr(2));
    lab.balancer().cli_ok(&["backend", "remove", "www", &web3]);
    let mut moved = 0;
    for &c in &clients {
        let now = request(c);
        let was = &server_of[&c];
        if was == "web3" {
            assert_ne!(now, "web3");
            moved += 1;
        } else {
            assert_eq!(&now, was, "{c} moved though its server stayed");
        }
    }
    println!(
        "source hashing: 1000 connections from {} clients, each on one server ({spread:?}); \
         web3 removed: {moved} of {} clients moved ({:.0}%), all of them web3's",
        clients.len(),
        clients.len(),
        moved as f64 * 100.0 / clients.len() as f64
    );
}
