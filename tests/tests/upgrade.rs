//! Upgrades that change the pinned maps' layout keep every flow and counter: a second
//! build of the agent (`foobar-lb-next-layout`, the `layout-test` feature: one more
//! counter per VIP and backend, the next layout version) takes over from this one's
//! pins, migrating them; the way back, to an older build, is refused and changes
//! nothing.

use std::{
    io::Read,
    net::TcpStream,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use aya::maps::MapInfo;
use foobar_lb_common::{LAYOUT_VERSION, TrafficStats, map_names as names};
use tests::{
    e2e::{json, lab_with, one_at_a_time, vip},
    http::{connect, get},
    lab::Lab,
    probe::Probe,
};

/// The build with the next layout, beside this one (`cargo xtask test` builds it).
const NEXT_LAYOUT: &str = "foobar-lb-next-layout";

fn vip_packets(lab: &Lab) -> u64 {
    let status = json(lab, &["status"]);
    status["vips"][0]["traffic"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no VIP packets in {status}"))
}

fn pinned(pin_dir: &Path, version: u32, map: &str) -> std::path::PathBuf {
    pin_dir.join(format!("maps-v{version}")).join(map)
}

/// Starts this build's agent on the lab's pins and waits, bounded, for it to
/// exit; returns its status and what it printed.
fn run_to_refusal(lab: &Lab) -> (std::process::ExitStatus, String) {
    let mut child = lab
        .agent_command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the agent did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status, err)
}

/// Every held connection answers, from the server it had.
fn assert_held(held: &mut [(TcpStream, String)], when: &str) {
    for (i, (stream, server)) in held.iter_mut().enumerate() {
        let answer = get(stream).unwrap_or_else(|e| panic!("connection {i} broke {when}: {e}"));
        assert_eq!(&answer, server, "connection {i} moved server {when}");
    }
}

#[test]
fn an_upgrade_to_another_layout_keeps_flows_and_counters_and_a_downgrade_is_refused() {
    let _turn = one_at_a_time();
    let next = tests::lab::bin_dir_of_this_test().join(NEXT_LAYOUT);
    assert!(
        next.exists(),
        "{} is not built: `cargo xtask test` builds it (cargo build -p foobar-lb \
         --features layout-test, copied under that name)",
        next.display()
    );
    // Round robin: a flow the upgrade lost would be scheduled afresh, and half of
    // them would land on the other server mid-connection.
    let mut lab = lab_with("upgrade", 2, None);
    let pin_dir = lab.balancer().pin_dir.clone();
    let mut held: Vec<(TcpStream, String)> = (0..8)
        .map(|i| {
            let mut stream =
                connect(&lab.client, vip(), None).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            let server = get(&mut stream).unwrap_or_else(|e| panic!("request {i}: {e}"));
            (stream, server)
        })
        .collect();
    let servers: std::collections::BTreeSet<&String> = held.iter().map(|(_, s)| s).collect();
    assert_eq!(servers.len(), 2, "round robin used one server only");
    assert!(pinned(&pin_dir, LAYOUT_VERSION, names::FLOWS).exists());
    let packets_before = vip_packets(&lab);
    lab.stop_agent();
    assert!(packets_before >= 16, "{packets_before} packets counted");

    // The next layout takes over: its maps are pinned as the next version, the old
    // ones carried into them and removed. New connections keep coming meanwhile
    // (every 10 ms), through the copy and the swap.
    lab.balancer_mut().program = NEXT_LAYOUT;
    let probe = Probe::start(&lab.client, vip());
    std::thread::sleep(Duration::from_millis(200));
    lab.start_agent();
    std::thread::sleep(Duration::from_millis(200));
    let attempts = probe.stop();
    let failed = attempts.iter().filter(|a| a.answer.is_none()).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} new connections failed during the upgrade",
        attempts.len()
    );
    println!(
        "{} new connections during the upgrade, none failed",
        attempts.len()
    );
    let log = lab.agent_log();
    assert!(log.contains("copied into this build's"), "{log}");
    assert!(log.contains("upgrade of the pinned maps done"), "{log}");
    let next_version = LAYOUT_VERSION + 1;
    let stats = MapInfo::from_pin(pinned(&pin_dir, next_version, names::VIP_STATS))
        .expect("the next layout's VIP_STATS");
    assert_eq!(
        stats.value_size() as usize,
        size_of::<TrafficStats>() + 8,
        "the next layout has one more counter"
    );
    assert!(
        !pin_dir.join(format!("maps-v{LAYOUT_VERSION}")).exists(),
        "the old layout's pins are left"
    );
    assert!(
        vip_packets(&lab) >= packets_before,
        "counters lost in the upgrade"
    );
    assert_held(&mut held, "across the upgrade");
    assert!(lab.get().is_some(), "new connections are not served");

    // Back to this build: refused, saying why, and nothing changes.
    lab.stop_agent();
    let (status, err) = run_to_refusal(&lab);
    assert!(!status.success(), "the older build started: {err}");
    assert!(err.contains("newer than this build's"), "{err}");
    assert!(err.contains("loses every open flow"), "{err}");
    assert!(pinned(&pin_dir, next_version, names::FLOWS).exists());
    assert_held(&mut held, "after the refused downgrade");
}
