//! `cargo xtask bench failover`: what a client sees when the VRRP master goes away,
//! and how long a dead backend keeps receiving new flows.
//!
//! On an HA lab (lb1 priority 150, lb2 100, adverts every 100 ms), each round:
//! - `crash`: lb1's agent is SIGKILLed and lb1 unplugged from both networks (a dead
//!   machine); lb2 takes over after the master-down interval;
//! - `failback`: lb1 comes back and preempts lb2;
//! - `graceful_stop`: lb1's agent is stopped for real (`--on-exit detach`, as a
//!   service's stop; a restart with `keep` moves nothing) and sends priority 0; lb2
//!   takes over after its skew only;
//! - `backend_death_to_removal`: web1 is killed; the time until the master's health
//!   checks (every 200 ms, fall 2) take it out of the schedule.
//!
//! A probe starts a request on a new connection every 10 ms; a round's gap is the
//! longest time between two successful answers. One JSON object
//! per round and case, then one summary per case.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use foobar_lab::{
    lab::{
        ADVERT_INTERVAL_MS, Balancer, Lab, LabSpec, METRICS, VIP, VIP_PORT, default_config,
        vrrp_section, wait_until,
    },
    netns::unique_name,
    probe::{Probe, outage},
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(10);

/// lb1 and lb2's configs: Maglev over both servers, TCP checks every 200 ms (fall 2).
fn config(priority: u8) -> String {
    default_config(2, "maglev")
        + "[vips.health_check]\ntype = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n"
        + METRICS
        + &vrrp_section(priority, true)
}

pub fn run(rounds: u32) -> Result<()> {
    let mut lab = Lab::up(LabSpec {
        prefix: unique_name("bench-ha"),
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
        ha: true,
        stack: false,
        router: false,
    });
    // lb1's stops are real ones (see `graceful_stop`).
    lab.balancers[0].on_exit = "detach";
    for (i, priority) in [(0, 150), (1, 100)] {
        lab.balancers[i].write_config(&config(priority));
        lab.balancers[i].start_agent();
    }
    wait_until(LIMIT, "lb1 to be master", || lab.balancers[0].holds_vip());
    let target = Duration::from_millis(3 * u64::from(ADVERT_INTERVAL_MS) + 100);
    let mut gaps: Vec<(&str, Duration)> = Vec::new();
    for round in 1..=rounds {
        let gap = measure(&mut lab, round, "crash", |lab| {
            lab.balancers[0].kill_agent();
            lab.unplug(0);
            wait_until(LIMIT, "lb2 to take over", || lab.balancers[1].holds_vip());
        })?;
        gaps.push(("crash", gap));
        let gap = measure(&mut lab, round, "failback", |lab| {
            lab.plug_in(0);
            lab.balancers[0].start_agent();
            wait_until(LIMIT, "lb1 to preempt", || {
                lab.balancers[0].holds_vip() && !lab.balancers[1].holds_vip()
            });
        })?;
        gaps.push(("failback", gap));
        let gap = measure(&mut lab, round, "graceful_stop", |lab| {
            lab.balancers[0].stop_agent();
            wait_until(LIMIT, "lb2 to take over", || lab.balancers[1].holds_vip());
        })?;
        gaps.push(("graceful_stop", gap));
        lab.balancers[0].start_agent();
        wait_until(LIMIT, "lb1 to preempt", || {
            lab.balancers[0].holds_vip() && !lab.balancers[1].holds_vip()
        });

        let removal = backend_death_to_removal(&mut lab)?;
        println!(
            "{}",
            json!({"case": "backend_death_to_removal", "round": round,
                   "ms": removal.as_millis() as u64, "check_interval_ms": 200, "fall": 2})
        );
        gaps.push(("backend_death_to_removal", removal));
    }
    for case in [
        "crash",
        "failback",
        "graceful_stop",
        "backend_death_to_removal",
    ] {
        let mut ms: Vec<u64> = gaps
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, d)| d.as_millis() as u64)
            .collect();
        ms.sort_unstable();
        let mut summary = json!({
            "case": case, "summary": true, "rounds": ms.len(),
            "min_ms": ms.first(), "median_ms": ms.get(ms.len() / 2), "max_ms": ms.last(),
        });
        if case == "crash" {
            summary["target_ms"] = json!(target.as_millis() as u64);
            summary["advert_interval_ms"] = json!(ADVERT_INTERVAL_MS);
        }
        println!("{summary}");
    }
    Ok(())
}

/// Probes the VIP while `event` happens; prints and returns the longest gap.
fn measure(
    lab: &mut Lab,
    round: u32,
    case: &str,
    event: impl FnOnce(&mut Lab),
) -> Result<Duration> {
    let probe = Probe::start(&lab.client, std::net::SocketAddrV4::new(VIP, VIP_PORT));
    sleep(Duration::from_millis(300));
    event(lab);
    sleep(Duration::from_millis(500));
    let attempts = probe.stop();
    let Some(o) = outage(&attempts) else {
        bail!("{case}: no request got through the VIP");
    };
    if attempts.last().is_none_or(|a| a.answer.is_none()) {
        bail!("{case}: requests still fail after the failover");
    }
    println!(
        "{}",
        json!({"case": case, "round": round, "gap_ms": o.longest_gap.as_millis() as u64,
               "failed": o.failures, "requests": o.attempts, "one_outage": o.contiguous})
    );
    Ok(o.longest_gap)
}

/// Kills web1, times until the master marks it down, and brings it back.
fn backend_death_to_removal(lab: &mut Lab) -> Result<Duration> {
    let health = |b: &Balancer| -> String {
        let out = b.cli_ok(&["-o", "json", "status"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        status["vips"][0]["backends"][0]["health"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    wait_until(LIMIT, "web1 to be up", || health(&lab.balancers[0]) == "up");
    let killed = Instant::now();
    lab.stop_web(0);
    while health(&lab.balancers[0]) != "down" {
        if killed.elapsed() > LIMIT {
            bail!("web1 was not marked down within {LIMIT:?}");
        }
        sleep(Duration::from_millis(5));
    }
    let removal = killed.elapsed();
    lab.start_web(0);
    Ok(removal)
}
