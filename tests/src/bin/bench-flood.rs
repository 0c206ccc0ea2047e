//! `cargo xtask bench flood`: legitimate clients during a random-source SYN flood,
//! through foobar-lb and through nftables (DNAT behind the kernel's SYN proxy) on the
//! same lab, one after the other.
//!
//! During each run hping3 in the client namespace floods the VIP with SYNs from
//! random sources as fast as it can, while the client's second address opens new
//! connections in a loop (connect, GET, close) and its third holds a keep-alive
//! connection with a request every 50 ms. One JSON line per setup: the flood's
//! packets/s (the client's transmit counter), the share of legitimate connections
//! that succeeded and their p99 latency, keep-alive connections broken, and the
//! flow table's entries after the flood (foobar-lb's flow table, walked; the
//! balancer namespace's conntrack count for nftables).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use foobar_lb_common::{FlowKey, FlowState, map_names};
use tests::{
    http::{connect_from, get},
    lab::{DATAPLANE_INTERFACES, Lab, LabSpec, VIP, WEB_PORT, web_addr},
    netns::Netns,
    process::{spawn_logged, terminate, wait_until},
};

/// The client address that opens new connections in a loop.
const NEW_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// The client address that holds a keep-alive connection.
const KEPT_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
/// How long a legitimate connection may take to open (a lost SYN is sent again
/// after 1 s, so one retransmission fits).
const CONNECT_WITHIN: Duration = Duration::from_secs(3);
/// New flows per second and CPU above which foobar-lb stops remembering new flows:
/// low enough that a flood cannot fill the table (its capacity over this rate is the
/// time an idle flow would survive a flood without it).
const FLOOD_THRESHOLD: u32 = 10_000;

/// What one setup's run measured.
struct Figures {
    flood_pps: f64,
    attempts: u64,
    succeeded: u64,
    p99_ms: f64,
    kept_requests: u64,
    broken: u64,
    table_before: u64,
    table_after: u64,
}

fn main() -> ExitCode {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut spec = LabSpec::for_test("bflood", 2);
    spec.bin_dir = "target/release".into();
    let mut lab = Lab::up(spec);
    for address in [NEW_CLIENT, KEPT_CLIENT] {
        lab.client
            .ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
    }
    let duration = Duration::from_secs(seconds);

    // nftables: DNAT round robin behind the kernel's SYN proxy, which answers SYNs
    // with cookies and opens the connection to the backend once the client's ACK
    // proves the cookie (conntrack must then treat a bare ACK as invalid).
    let nft = lab.dir.join("flood.nft");
    let map = format!(
        "{{ 0 : {} . {WEB_PORT}, 1 : {} . {WEB_PORT} }}",
        web_addr(0),
        web_addr(1)
    );
    std::fs::write(
        &nft,
        format!(
            "table ip fblb_flood {{\n\
             chain raw {{ type filter hook prerouting priority raw; ip daddr {VIP} tcp dport 80 tcp flags syn notrack; }}\n\
             chain input {{ type filter hook input priority filter;\n\
               ip daddr {VIP} tcp dport 80 ct state invalid,untracked synproxy mss 1460 wscale 7 timestamp sack-perm;\n\
               ip daddr {VIP} tcp dport 80 ct state invalid drop; }}\n\
             chain out {{ type nat hook output priority -100; ip daddr {VIP} tcp dport 80 dnat to numgen inc mod 2 map {map}; }}\n\
             chain pre {{ type nat hook prerouting priority dstnat; ip daddr {VIP} tcp dport 80 dnat to numgen inc mod 2 map {map}; }}\n\
             }}\n"
        ),
    )
    .expect("write the nftables rules");
    sh(
        lab.lb(),
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
    );
    sh(lab.lb(), "nft", &["-f", nft.to_str().unwrap()]);
    let lb = lab.lb().handle();
    let conntrack = move || -> u64 {
        let out = sh(&lb, "cat", &["/proc/sys/net/netfilter/nf_conntrack_count"]);
        out.trim().parse().unwrap_or(0)
    };
    let nftables = measure(&lab, duration, &conntrack);
    sh(lab.lb(), "nft", &["delete", "table", "ip", "fblb_flood"]);
    sh(
        lab.lb(),
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_tcp_loose=1"],
    );

    lab.write_config(&format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\nflood_threshold = {FLOOD_THRESHOLD}\n\n\
         [[vips]]\nname = \"www\"\naddress = \"{VIP}\"\nport = 80\nbackends = [{{ address = \"{}\", port = {WEB_PORT} }}, {{ address = \"{}\", port = {WEB_PORT} }}]\n",
        web_addr(0),
        web_addr(1)
    ));
    lab.start_agent();
    let pinned = foobar_lb::pin::maps_dir(&lab.balancer().pin_dir).join(map_names::FLOWS);
    let flow_table = move || -> u64 {
        let data = MapData::from_pin(&pinned).expect("the pinned flow table");
        let flows: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(Map::LruHashMap(data)).expect("the flow table");
        flows.keys().filter(|k| k.is_ok()).count() as u64
    };
    let ours = measure(&lab, duration, &flow_table);
    let stats = lab.cli_ok(&["-o", "json", "stats"]);
    drop(lab);

    for (setup, f) in [("foobar-lb", &ours), ("nftables", &nftables)] {
        println!(
            "{{\"bench\":\"flood\",\"setup\":\"{setup}\",\"flood_pps\":{:.0},\"legit_success_rate\":{:.4},\
             \"legit_p99_ms\":{:.1},\"established_broken\":{},\"flow_table_after\":{},\
             \"legit_attempts\":{},\"kept_requests\":{},\"flow_table_before\":{},\"duration_s\":{seconds}}}",
            f.flood_pps,
            f.succeeded as f64 / f.attempts.max(1) as f64,
            f.p99_ms,
            f.broken,
            f.table_after,
            f.attempts,
            f.kept_requests,
            f.table_before,
        );
    }
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    // An outcome or event counter of `stats`.
    let count = |name: &str| {
        ["outcomes", "events"]
            .iter()
            .flat_map(|k| stats[k].as_array().into_iter().flatten())
            .find(|c| c["name"] == name)
            .and_then(|c| c["value"].as_u64())
            .unwrap_or(0)
    };
    println!(
        "foobar-lb: {} SYNs answered with cookies, {} proven, {} new flows ({} placed by \
         hash during the flood and not remembered), {} packets of proxied flows waiting \
         for their backend dropped, {} backend SYN-ACKs answered",
        count("syn_cookie"),
        count("syn_cookie_valid"),
        count("flow_new"),
        count("flow_insert_skipped"),
        count("drop_syn_proxy_pending"),
        count("syn_proxy_ack"),
    );
    if ours.succeeded == 0 || nftables.succeeded == 0 {
        eprintln!("a setup let no legitimate connection through: see the lab's logs");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs a command in a namespace, panicking if it fails; its output.
fn sh(ns: &Netns, program: &str, args: &[&str]) -> String {
    let out = ns.command(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The client's transmitted packets so far (from /proc/net/dev, which shows the
/// reader's namespace; /sys shows the one it was mounted in).
fn client_tx(lab: &Lab) -> u64 {
    let dev = sh(&lab.client, "cat", &["/proc/net/dev"]);
    let line = dev
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .expect("eth0 in /proc/net/dev");
    // Receive has 8 fields; transmit packets is the second after them.
    let fields: Vec<&str> = line
        .split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields.get(9).and_then(|f| f.parse().ok()).unwrap_or(0)
}

/// One run: the flood for `duration`, legitimate clients alongside.
fn measure(lab: &Lab, duration: Duration, table: &dyn Fn() -> u64) -> Figures {
    let vip = SocketAddrV4::new(VIP, 80);
    wait_until(Duration::from_secs(10), "the VIP answering", || {
        connect_from(
            &lab.client,
            SocketAddrV4::new(NEW_CLIENT, 0),
            vip,
            CONNECT_WITHIN,
        )
        .and_then(|mut s| get(&mut s))
        .is_ok()
    });
    let table_before = table();
    let stop = Arc::new(AtomicBool::new(false));
    let kept = {
        let (ns, stop) = (lab.client.handle(), stop.clone());
        thread::spawn(move || {
            let from = SocketAddrV4::new(KEPT_CLIENT, 0);
            let (mut requests, mut broken) = (0u64, 0u64);
            let mut conn = connect_from(&ns, from, vip, CONNECT_WITHIN).ok();
            while !stop.load(Ordering::Relaxed) {
                let ok = conn.as_mut().is_some_and(|c| get(c).is_ok());
                requests += 1;
                if !ok {
                    broken += 1;
                    conn = connect_from(&ns, from, vip, CONNECT_WITHIN).ok();
                }
                thread::sleep(Duration::from_millis(50));
            }
            (requests, broken)
        })
    };
    let fresh = {
        let (ns, stop) = (lab.client.handle(), stop.clone());
        thread::spawn(move || {
            let from = SocketAddrV4::new(NEW_CLIENT, 0);
            let (mut attempts, mut succeeded) = (0u64, 0u64);
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                attempts += 1;
                let answered = connect_from(&ns, from, vip, CONNECT_WITHIN)
                    .and_then(|mut s| get(&mut s))
                    .is_ok();
                if answered {
                    succeeded += 1;
                    latencies.push(started.elapsed());
                }
                thread::sleep(Duration::from_millis(10));
            }
            (attempts, succeeded, latencies)
        })
    };
    let tx_before = client_tx(lab);
    let started = Instant::now();
    let mut flood = spawn_logged(
        lab.client
            .command("hping3")
            .args(["-q", "-S", "--rand-source", "--flood", "-p", "80"])
            .arg(VIP.to_string())
            .stdout(Stdio::null()),
        &lab.dir.join("hping3.log"),
    );
    thread::sleep(duration);
    terminate(&mut flood);
    let flood_pps =
        client_tx(lab).saturating_sub(tx_before) as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (kept_requests, broken) = kept.join().expect("keep-alive client");
    let (attempts, succeeded, mut latencies) = fresh.join().expect("new-connection client");
    latencies.sort();
    let p99 = latencies
        .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    Figures {
        flood_pps,
        attempts,
        succeeded,
        p99_ms: p99.as_secs_f64() * 1e3,
        kept_requests,
        broken,
        table_before,
        table_after: table(),
    }
}
