//! wrk, run and its output read into figures.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// One wrk run's figures.
pub struct Figures {
    /// Requests per second over the run.
    pub requests_per_second: f64,
    /// 50, 75, 90, 99th percentile latency in µs.
    pub latency_us: [f64; 4],
    /// Requests completed.
    pub requests: u64,
    /// Socket errors and non-2xx/3xx answers.
    pub errors: u64,
}

/// Runs `wrk` (a command made in the client's namespace) with two threads,
/// `connections` connections for `duration` seconds against `url`, options `extra`
/// first; its figures, or why it failed.
pub fn run(
    mut wrk: Command,
    connections: u32,
    duration: u32,
    extra: &[&str],
    url: &str,
) -> Result<Figures> {
    let out = wrk
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{duration}s"),
            "--latency",
        ])
        .args(extra)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// Reads `wrk --latency`'s report.
pub fn parse_wrk(text: &str) -> Result<Figures> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix).map(str::trim))
    };
    let requests_per_second: f64 = field("Requests/sec:").context("no Requests/sec")?.parse()?;
    let mut latency_us = [0.0; 4];
    for (i, p) in ["50%", "75%", "90%", "99%"].iter().enumerate() {
        latency_us[i] = duration_us(field(p).context("no latency distribution")?)?;
    }
    let requests = text
        .lines()
        .find_map(|l| l.trim().split(" requests in").next()?.parse().ok())
        .context("no request count")?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and non-2xx answers.
    let mut errors = 0;
    if let Some(list) = field("Socket errors:") {
        errors += list
            .split(',')
            .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = field("Non-2xx or 3xx responses:") {
        errors += n.parse::<u64>().unwrap_or(0);
    }
    Ok(Figures {
        requests_per_second,
        latency_us,
        requests,
        errors,
    })
}

/// "123.45us", "1.20ms", "2.00s" → µs.
fn duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .context("no unit")?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse()?;
    Ok(value
        * match unit {
            "us" => 1.0,
            "ms" => 1e3,
            "s" => 1e6,
            "m" => 60e6,
            other => bail!("unknown unit {other}"),
        })
}
