//! `cargo xtask bench db`: the database tier through the whole stack. wrk on the
//! client goes through the site's VIP, a web node and an application node, and the
//! database's write or read VIP, to the MariaDB pair (server1 the first primary,
//! server2 its semi-synchronous replica).
//!
//! - API reads and writes, requests/s, with semi-sync on and then off (turned off on
//!   the primary as an operator would: `SET GLOBAL rpl_semi_sync_master_enabled`);
//! - replication lag under the write load, p50/p99: a heartbeat row the primary
//!   rewrites every 10 ms (as pt-heartbeat does), its age read on the replica every
//!   20 ms (so the figure includes up to 10 ms of the heartbeat's own period);
//! - rounds of the failover test: a writer posts through the site, the primary's
//!   server dies (MariaDB killed, the server cut off), the replica is promoted; every
//!   acknowledged post must be on the new primary. The old primary comes back as a
//!   replica before the next round, which kills the other server.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use foobar_lab::{
    lab::{Lab, LabSpec, terminate},
    netns::unique_name,
    process::wait_until,
    stack::{SITE, resolving_command, server_dir},
};
use serde_json::{Value, json};

use crate::wrk::{self, Figures};

/// Runs everything once (the failover `rounds` times); prints JSON lines.
pub fn run(duration: u32, connections: u32, rounds: u32) -> Result<()> {
    let mut lab = Lab::up(LabSpec {
        prefix: unique_name("bdb"),
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
        ha: false,
        stack: true,
        router: false,
    });
    lab.start_agent();
    lab.wait_for_backends_up();
    wait_role(&lab, 0, "primary")?;
    wait_role(&lab, 1, "replica")?;
    sql(
        &lab,
        0,
        "CREATE TABLE IF NOT EXISTS foobar.bench_heartbeat (id INT PRIMARY KEY, t DATETIME(6) NOT NULL); \
         REPLACE INTO foobar.bench_heartbeat VALUES (1, NOW(6))",
    )?;
    for n in 0..20 {
        lab.post_through_site(&format!("seed {n}"), &[])
            .map_err(|e| anyhow::anyhow!("seeding posts: {e}"))?;
    }
    let script = lab.dir.join("post.lua");
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\nwrk.body = '{\"author\":\"bench\",\"text\":\"a write through the stack\"}'\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n",
    )?;

    let mut errors = 0;
    let mut write_rates = Vec::new();
    for semi_sync in [true, false] {
        sql(
            &lab,
            0,
            &format!(
                "SET GLOBAL rpl_semi_sync_master_enabled = {}",
                if semi_sync { "ON" } else { "OFF" }
            ),
        )?;
        let read = wrk(&lab, "/api/posts?limit=10", None, duration, connections)?;
        let lag = LagProbe::start(&lab)?;
        let write = wrk(&lab, "/api/posts", Some(&script), duration, connections)?;
        let lag_ms = lag.stop();
        for (case, figures) in [("api_read", &read), ("api_write", &write)] {
            errors += figures.errors;
            println!(
                "{}",
                json!({
                    "bench": "db",
                    "case": case,
                    "semi_sync": semi_sync,
                    "requests_per_second": figures.requests_per_second.round(),
                    "p50_ms": round(figures.latency_us[0] / 1000.0),
                    "p99_ms": round(figures.latency_us[3] / 1000.0),
                    "errors": figures.errors,
                })
            );
        }
        write_rates.push(write.requests_per_second);
        println!(
            "{}",
            json!({
                "bench": "db",
                "case": "replication_lag",
                "semi_sync": semi_sync,
                "p50_ms": percentile(&lag_ms, 0.50),
                "p99_ms": percentile(&lag_ms, 0.99),
                "samples": lag_ms.len(),
            })
        );
    }
    println!(
        "writes with semi-sync / without: {:.2}",
        write_rates[0] / write_rates[1]
    );
    // Semi-sync back on: the replica's node attaches again in semi-sync mode.
    sql(&lab, 0, "SET GLOBAL rpl_semi_sync_master_enabled = ON")?;
    wait_until(Duration::from_secs(20), "semi-sync active again", || {
        let semi = &status(&lab, 0)["server"]["semi_sync"];
        semi["active"] == true && semi["clients"] == 1
    });

    let mut lost_total = 0;
    let mut gaps = Vec::new();
    for round in 1..=rounds {
        let (lost, gap) = primary_crash(&lab, round)?;
        lost_total += lost;
        gaps.push(gap);
    }
    if lost_total > 0 {
        bail!("{lost_total} acknowledged writes lost");
    }
    if errors > 0 {
        bail!("{errors} requests failed under load");
    }
    if let Some(worst) = gaps.iter().max() {
        println!("failover: worst write gap {worst} ms (target 5000)");
    }
    Ok(())
}

/// One failover round; the lost writes and the gap in ms.
fn primary_crash(lab: &Lab, round: u32) -> Result<(usize, u64)> {
    let primary = (0..2)
        .find(|&i| status(lab, i)["role"] == "primary")
        .context("no primary")?;
    let replica = 1 - primary;
    wait_role(lab, replica, "replica")?;
    // A replica still applying the last load's backlog delays its acknowledgements
    // past semi-sync's timeout: start from a caught-up pair, semi-sync on.
    wait_until(
        Duration::from_secs(120),
        "the replica caught up, semi-sync on",
        || {
            let (p, r) = (status(lab, primary), status(lab, replica));
            p["server"]["semi_sync"]["active"] == true
                && p["server"]["gtid_binlog_pos"] == r["server"]["gtid_slave_pos"]
        },
    );
    let run = lab.crash_primary_under_writes(primary, &format!("round {round} write"));
    wait_role(lab, replica, "primary")?;
    let present = sql(
        lab,
        replica,
        &format!("SELECT text FROM foobar.posts WHERE text LIKE 'round {round} write %'"),
    )?;
    let present: HashSet<&str> = present.lines().collect();
    let acknowledged = run.acknowledged();
    let lost = acknowledged
        .iter()
        .filter(|t| !present.contains(*t))
        .count();
    let gap = run.gap().context("writes never came back")?;
    let promoted_ms = run.promoted.map(|p| p.as_millis() as u64);
    println!(
        "{}",
        json!({
            "bench": "db",
            "case": "primary_crash",
            "round": round,
            "acknowledged": acknowledged.len(),
            "acknowledged_lost": lost,
            "gap_ms": gap.as_millis() as u64,
            "promoted_after_ms": promoted_ms,
        })
    );
    // The old primary comes back and rejoins for the next round.
    lab.reconnect_server(primary);
    wait_role(lab, primary, "replica")?;
    wait_until(
        Duration::from_secs(20),
        "semi-sync with the rejoined replica",
        || status(lab, replica)["server"]["semi_sync"]["active"] == true,
    );
    Ok((lost, gap.as_millis() as u64))
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    round(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// Replication lag while it runs: the heartbeat's writer on the primary, its reader
/// on the replica.
struct LagProbe {
    writer: std::process::Child,
    reader: std::process::Child,
    samples: thread::JoinHandle<Vec<f64>>,
}

impl LagProbe {
    fn start(lab: &Lab) -> Result<LagProbe> {
        let loop_sql = |statement: &str, period: &str| {
            format!("while :; do echo \"{statement}\"; sleep {period}; done")
        };
        let client = |i: usize| {
            format!(
                "mariadb --no-defaults --socket={} -uroot -N -B -n",
                socket(lab, i)
            )
        };
        let writer = lab.webs[0]
            .command("bash")
            .arg("-c")
            .arg(format!(
                "{} | {}",
                loop_sql(
                    "REPLACE INTO foobar.bench_heartbeat VALUES (1, NOW(6));",
                    "0.01"
                ),
                client(0)
            ))
            .stdout(Stdio::null())
            .spawn()?;
        let mut reader = lab.webs[1]
            .command("bash")
            .arg("-c")
            .arg(format!(
                "{} | {}",
                loop_sql(
                    "SELECT TIMESTAMPDIFF(MICROSECOND, t, NOW(6)) FROM foobar.bench_heartbeat;",
                    "0.02"
                ),
                client(1)
            ))
            .stdout(Stdio::piped())
            .spawn()?;
        let out = reader.stdout.take().context("the reader's output")?;
        let samples = thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.trim().parse::<f64>().ok())
                .map(|us| us / 1000.0)
                .collect()
        });
        Ok(LagProbe {
            writer,
            reader,
            samples,
        })
    }

    /// Stops it; the lag samples in ms, sorted.
    fn stop(mut self) -> Vec<f64> {
        // The shells' loops end with their pipes: kill each process group's shell
        // and its children.
        for child in [&mut self.writer, &mut self.reader] {
            let _ = Command::new("pkill")
                .args(["-P", &child.id().to_string()])
                .status();
            terminate(child);
        }
        let mut samples = self.samples.join().unwrap_or_default();
        samples.sort_by(f64::total_cmp);
        samples
    }
}

fn socket(lab: &Lab, i: usize) -> String {
    server_dir(&lab.dir, &lab.server_name(i))
        .join("db/mysqld.sock")
        .display()
        .to_string()
}

/// SQL as MariaDB's root on server `i`; the rows as text.
fn sql(lab: &Lab, i: usize, query: &str) -> Result<String> {
    lab.db_sql(i, query).map_err(|e| anyhow::anyhow!(e))
}

/// Server `i`'s database agent's `/status`.
fn status(lab: &Lab, i: usize) -> Value {
    serde_json::from_str(&lab.db_agent(i, "/status").1).unwrap_or(Value::Null)
}

/// Waits until server `i`'s node has `role`; on a timeout, the error shows the end
/// of both nodes' logs.
fn wait_role(lab: &Lab, i: usize, role: &str) -> Result<()> {
    let started = Instant::now();
    while !lab.db_role_is(i, role) {
        if started.elapsed() > Duration::from_secs(60) {
            let tail = |server: usize| {
                let log = lab.log(&lab.server_name(server), "db");
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            };
            bail!(
                "db{} did not become {role} within 60 s; status {}\nserver1:\n{}\nserver2:\n{}",
                i + 1,
                status(lab, i),
                tail(0),
                tail(1)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn wrk(
    lab: &Lab,
    path: &str,
    script: Option<&std::path::Path>,
    duration: u32,
    connections: u32,
) -> Result<Figures> {
    let script = script.map(|s| s.display().to_string());
    let extra: Vec<&str> = match &script {
        Some(script) => vec!["-s", script],
        None => Vec::new(),
    };
    let url = format!("https://{SITE}{path}");
    wrk::run(
        resolving_command(&lab.client, "wrk"),
        connections,
        duration,
        &extra,
        &url,
    )
}
