//! `cargo xtask bench failover --bgp`: what clients see when one of three
//! active-active balancers dies.
//!
//! One BGP lab: the client behind a router (BIRD, ECMP over every balancer that
//! announces the VIP, hashing on the 5-tuple, BFD every 50 ms × 3), three balancers
//! (Maglev, DSR over IPIP) and two web servers that answer the client straight through
//! the router. Each round `k`:
//! - 24 keep-alive connections are opened through the VIP and asked once each; the
//!   router's hash spreads them over the three balancers;
//! - a probe starts a request on a new connection every 10 ms;
//! - balancer `k % 3` crashes (agent SIGKILLed, links down); the bench waits until the
//!   router routes over the two others, then 500 ms more, and stops the probe;
//! - `gap_ms`: how long new connections hashed to the dead balancer kept failing: from
//!   the crash to the start of the last probe request that failed (0 if none did; to
//!   within the probe's 10 ms, of which a third hash to each balancer). The longest
//!   time between two successful answers, the VRRP bench's gap, says little here: the
//!   other balancers' clients go on being answered meanwhile; the summary gives it as
//!   `answer_gap_ms_max`;
//! - `established_broken`: held connections whose second request fails. Those the
//!   router moves to another balancer carry on: Maglev there picks the same server,
//!   which answers the client directly;
//! - the balancer is revived, and the router routes over all three again before the
//!   next round.
//!
//! One JSON line per round, then a summary. The bench fails if any of the lab's
//! namespaces is left once the lab is gone.

use std::{
    net::{SocketAddrV4, TcpStream},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use foobar_lab::{
    bgp::{BFD_INTERVAL_MS, BFD_MULTIPLIER, BgpLab, BgpSpec},
    http::{connect, get},
    netns::{Netns, unique_name},
    probe::{Probe, outage},
};
use serde_json::json;

/// Balancers of the lab: one crashes each round, two carry on.
const BALANCERS: usize = 3;
/// Keep-alive connections held through each crash.
const HELD: usize = 24;
/// Longest wait for the router to follow a change.
const LIMIT: Duration = Duration::from_secs(10);
/// BFD's detection (3 × 50 ms), the router's route update, and a margin.
const TARGET_MS: u64 = 400;

pub fn run(rounds: u32) -> Result<()> {
    let prefix = unique_name("bench-bgp");
    let mut lab = BgpLab::up(BgpSpec {
        prefix: prefix.clone(),
        balancers: BALANCERS,
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
    });
    let result = rounds_on(&mut lab, rounds);
    // Everything goes with the lab, whatever the rounds did.
    drop(lab);
    let left = namespaces_left(&prefix);
    let summary = result?;
    println!("{summary}");
    let left = left?;
    if !left.is_empty() {
        bail!("the lab left namespaces behind: {}", left.join(", "));
    }
    Ok(())
}

/// The rounds; prints a line per round and returns the summary.
fn rounds_on(lab: &mut BgpLab, rounds: u32) -> Result<serde_json::Value> {
    wait_for_next_hops(lab, BALANCERS, "the router to route over every balancer")?;
    let mut gaps: Vec<u64> = Vec::new();
    let mut withdrawn: Vec<u64> = Vec::new();
    let mut answer_gap_max = 0u64;
    let mut failed_total = 0usize;
    let mut broken_total = 0usize;
    for round in 1..=rounds {
        let victim = round as usize % BALANCERS;
        let mut held = open_held(&lab.client, lab.vip())?;
        let probe = Probe::start(&lab.client, lab.vip());
        sleep(Duration::from_millis(300));
        let crashed = Instant::now();
        lab.crash_balancer(victim);
        let moved = wait_for_next_hops(
            lab,
            BALANCERS - 1,
            "the router to stop routing over the crashed balancer",
        );
        let moved_after = crashed.elapsed();
        if moved.is_ok() {
            sleep(Duration::from_millis(500));
        }
        // Stopped either way: its workers would otherwise run on to their hard limit.
        let attempts = probe.stop();
        moved?;

        let Some(o) = outage(&attempts) else {
            bail!("round {round}: no request got through the VIP");
        };
        // The last 50 ms of requests: all answered, once the router has moved.
        if attempts.iter().rev().take(5).any(|a| a.answer.is_none()) {
            bail!("round {round}: new connections still fail after the router moved");
        }
        let gap = attempts
            .iter()
            .filter(|a| a.answer.is_none() && a.at >= crashed)
            .map(|a| a.started.saturating_duration_since(crashed))
            .max()
            .unwrap_or(Duration::ZERO);
        let broken = count_broken(&mut held);
        drop(held);
        let gap_ms = gap.as_millis() as u64;
        // The field order, which other tools read.
        println!(
            "{{\"case\":\"balancer_crash\",\"round\":{round},\"gap_ms\":{gap_ms},\"established_broken\":{broken}}}"
        );
        gaps.push(gap_ms);
        withdrawn.push(moved_after.as_millis() as u64);
        answer_gap_max = answer_gap_max.max(o.longest_gap.as_millis() as u64);
        failed_total += o.failures;
        broken_total += broken;

        lab.revive_balancer(victim);
        wait_for_next_hops(
            lab,
            BALANCERS,
            "the router to route over the revived balancer",
        )?;
    }
    gaps.sort_unstable();
    withdrawn.sort_unstable();
    Ok(json!({
        "case": "balancer_crash", "summary": true, "rounds": gaps.len(),
        "gap_ms_min": gaps.first(), "gap_ms_median": gaps.get(gaps.len() / 2),
        "gap_ms_max": gaps.last(),
        "established_broken_total": broken_total, "established_held": HELD * gaps.len(),
        "route_moved_ms_median": withdrawn.get(withdrawn.len() / 2),
        "route_moved_ms_max": withdrawn.last(),
        "answer_gap_ms_max": answer_gap_max, "failed_requests_total": failed_total,
        "target_ms": TARGET_MS, "bfd_interval_ms": BFD_INTERVAL_MS, "bfd_multiplier": BFD_MULTIPLIER
    }))
}

/// Waits (at most [`LIMIT`]) until the router routes the VIP over exactly `n`
/// balancers.
pub(crate) fn wait_for_next_hops(lab: &BgpLab, n: usize, what: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let hops = lab.next_hops();
        if hops.len() == n {
            return Ok(());
        }
        if started.elapsed() > LIMIT {
            bail!("timed out after {LIMIT:?} waiting for {what}: next hops {hops:?}");
        }
        sleep(Duration::from_millis(5));
    }
}

/// [`HELD`] keep-alive connections through the VIP, each answered once.
fn open_held(client: &Netns, vip: SocketAddrV4) -> Result<Vec<TcpStream>> {
    (0..HELD)
        .map(|i| -> Result<TcpStream> {
            let mut stream = connect(client, vip, None)
                .with_context(|| format!("opening held connection {i}"))?;
            get(&mut stream)
                .with_context(|| format!("the first request on held connection {i}"))?;
            Ok(stream)
        })
        .collect()
}

/// How many held connections fail a request now (asked all at once, so black-holed
/// ones cost one timeout, not one each).
fn count_broken(held: &mut [TcpStream]) -> usize {
    std::thread::scope(|s| {
        let asks: Vec<_> = held
            .iter_mut()
            .map(|stream| s.spawn(move || get(stream).is_err()))
            .collect();
        asks.into_iter()
            .map(|ask| ask.join().unwrap_or(true))
            .filter(|&failed| failed)
            .count()
    })
}

/// The namespaces whose names start with `prefix`.
fn namespaces_left(prefix: &str) -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("ip netns list")?;
    if !out.status.success() {
        bail!("ip netns list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(String::from)
        .collect())
}
