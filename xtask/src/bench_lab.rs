//! `cargo xtask bench lab`: requests/s and latency through foobar-lb against the
//! usual alternatives, on the same lab with the same client, in one run.
//!
//! Setups, in this order (each leaves the balancer namespace as it found it):
//! - `direct`: the client to one web server, routed by the balancer's kernel;
//! - `nftables`: DNAT round robin (`numgen inc`) in the balancer's namespace;
//! - `haproxy`: HAProxy `mode tcp`, round robin, in the balancer's namespace;
//! - `foobar-lb`: the XDP balancer, round robin;
//! - `active_active`, on a second lab: the client behind a router that spreads the
//!   flows by ECMP over the balancers announcing the VIP over BGP (Maglev, DSR over
//!   IPIP, the servers answering through the router), with 3, 2 and 1 balancers (the
//!   others crashed, as in `bench failover --bgp`; the rows come out 1, 2, 3).
//!
//! Each runs twice: with keep-alive connections (the forwarding path) and with a new
//! connection per request (`Connection: close`: the new-flow path, and a proxy's
//! accept/connect cost). One JSON object per line per setup and mode (and number of
//! balancers).
//!
//! On 2 cores the `active_active` rows show what ECMP and the router's extra hop cost,
//! not a gain: wrk, the router, every balancer and the servers share the same two
//! CPUs, so a balancer more brings no CPU more. On real machines each balancer brings
//! its own CPUs and NIC, and the figure to look at is one balancer's, times N.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{
    bench_bgp::wait_for_next_hops,
    wrk::{self, Figures},
};
use foobar_lab::bgp::{BgpLab, BgpSpec};
use foobar_lab::lab::{Lab, LabSpec, VIP, VIP_PORT, WEB_PORT, terminate, wait_until, web_addr};
use foobar_lab::netns::{Netns, unique_name};

/// wrk's settings.
pub struct Load {
    /// Seconds per run.
    pub duration: u32,
    /// Open connections.
    pub connections: u32,
}

pub fn run(load: &Load) -> Result<()> {
    let mut lab = Lab::up(LabSpec {
        prefix: unique_name("bench"),
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
        ha: false,
        stack: false,
        router: false,
    });
    // With a new connection per request the servers close first; their TIME_WAIT
    // sockets from one setup's run would collide with the next setup's SYNs from the
    // same client ports. Keeping none makes every setup start alike.
    for ns in lab.webs.iter().chain([&lab.client, lab.lb()]) {
        ok(ns
            .command("sysctl")
            .args(["-qw", "net.ipv4.tcp_max_tw_buckets=0"]))?;
    }
    let vip = format!("http://{VIP}:{VIP_PORT}/");
    let direct = format!("http://{}:{WEB_PORT}/", web_addr(0));
    let mut results = Vec::new();

    results.push(("direct", measure(&lab.client, load, &direct)?));

    let nft = lab.dir.join("nft.conf");
    std::fs::write(
        &nft,
        format!(
            "table ip fblb_bench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    \
             ip daddr {VIP} tcp dport {VIP_PORT} dnat to numgen inc mod 2 map \
             {{ 0 : {} . {WEB_PORT}, 1 : {} . {WEB_PORT} }}\n  }}\n}}\n",
            web_addr(0),
            web_addr(1)
        ),
    )?;
    ok(lab.lb().command("nft").arg("-f").arg(&nft))?;
    let nft_results = measure(&lab.client, load, &vip);
    ok(lab
        .lb()
        .command("nft")
        .args(["delete", "table", "ip", "fblb_bench"]))?;
    results.push(("nftables", nft_results?));

    let config = lab.dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 2\n  maxconn 4000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend www\n  bind {VIP}:{VIP_PORT}\n  default_backend webs\n\
             backend webs\n  balance roundrobin\n  server web1 {}:{WEB_PORT}\n  server web2 {}:{WEB_PORT}\n",
            web_addr(0),
            web_addr(1)
        ),
    )?;
    let mut haproxy = lab
        .lb()
        .command("haproxy")
        .args(["-db", "-f"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(10), "haproxy", || lab.get().is_some())
    }));
    let haproxy_results = ready
        .map_err(|_| anyhow::anyhow!("haproxy did not answer"))
        .and_then(|()| measure(&lab.client, load, &vip));
    terminate(&mut haproxy);
    results.push(("haproxy", haproxy_results?));

    lab.start_agent();
    results.push(("foobar-lb", measure(&lab.client, load, &vip)?));
    let stats = lab.cli_ok(&["-o", "json", "stats"]);
    drop(lab);

    for (setup, by_mode) in &results {
        for (mode, f) in by_mode {
            print_row(setup, "", mode, load, f);
        }
    }
    let rps = |setup: &str, mode: &str| {
        results
            .iter()
            .find(|(s, _)| *s == setup)
            .and_then(|(_, m)| m.iter().find(|(m, _)| *m == mode))
            .map(|(_, f)| f.requests_per_second)
            .unwrap_or(f64::NAN)
    };
    for mode in ["keepalive", "close"] {
        let ours = rps("foobar-lb", mode);
        println!(
            "{mode}: foobar-lb / direct {:.2}, / nftables {:.2}, / haproxy {:.2}",
            ours / rps("direct", mode),
            ours / rps("nftables", mode),
            ours / rps("haproxy", mode),
        );
    }
    // Proof the foobar-lb figures went through XDP: redirects were counted.
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let redirects = stats["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "redirect"))
        .and_then(|c| c["value"].as_u64())
        .unwrap_or(0);
    println!("foobar-lb redirected {redirects} packets in XDP during its runs");
    if redirects == 0 {
        bail!("foobar-lb's runs did not go through the XDP program");
    }
    active_active(load)
}

/// Prints one JSON row: `extra` is more fields, each after a comma, or nothing.
fn print_row(setup: &str, extra: &str, mode: &str, load: &Load, f: &Figures) {
    println!(
        "{{\"bench\":\"lab\",\"setup\":\"{setup}\"{extra},\"mode\":\"{mode}\",\"connections\":{},\
         \"duration_s\":{},\"requests\":{},\"errors\":{},\"requests_per_second\":{:.0},\
         \"latency_us\":{{\"p50\":{:.0},\"p75\":{:.0},\"p90\":{:.0},\"p99\":{:.0}}}}}",
        load.connections,
        load.duration,
        f.requests,
        f.errors,
        f.requests_per_second,
        f.latency_us[0],
        f.latency_us[1],
        f.latency_us[2],
        f.latency_us[3],
    );
}

/// Balancers of the active-active lab.
const ACTIVE_ACTIVE: usize = 3;

/// The `active_active` rows: wrk through 3, 2 and 1 balancers of one BGP lab, the
/// router's ECMP spreading the flows; printed 1, 2, 3, with the ratios to one.
fn active_active(load: &Load) -> Result<()> {
    let mut lab = BgpLab::up(BgpSpec {
        prefix: unique_name("bench-aa"),
        balancers: ACTIVE_ACTIVE,
        webs: 2,
        persistent: false,
        bin_dir: "target/release".into(),
    });
    // As above: no TIME_WAIT sockets carried from one run into the next. The
    // balancers and the router only forward.
    for ns in lab.webs.iter().chain([&lab.client]) {
        ok(ns
            .command("sysctl")
            .args(["-qw", "net.ipv4.tcp_max_tw_buckets=0"]))?;
    }
    let url = format!("http://{}/", lab.vip());
    wait_for_next_hops(
        &lab,
        ACTIVE_ACTIVE,
        "the router to route over every balancer",
    )?;
    let mut results = vec![(ACTIVE_ACTIVE, measure(&lab.client, load, &url)?)];
    // Proof the router spread the flows: every balancer forwarded in XDP.
    for b in &lab.balancers {
        let stats: serde_json::Value = serde_json::from_str(&b.cli_ok(&["-o", "json", "stats"]))?;
        let forwarded: u64 = stats["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "tx" || c["name"] == "redirect")
            .filter_map(|c| c["value"].as_u64())
            .sum();
        if forwarded == 0 {
            bail!(
                "{} forwarded nothing: the router did not spread the flows",
                b.name
            );
        }
    }
    // Fewer balancers: the last ones crash, and the router stops routing over them.
    for n in (1..ACTIVE_ACTIVE).rev() {
        lab.crash_balancer(n);
        wait_for_next_hops(&lab, n, "the router to drop the crashed balancer")?;
        results.push((n, measure(&lab.client, load, &url)?));
    }
    drop(lab);

    results.sort_by_key(|(n, _)| *n);
    for (n, by_mode) in &results {
        for (mode, f) in by_mode {
            print_row(
                "active_active",
                &format!(",\"balancers\":{n}"),
                mode,
                load,
                f,
            );
        }
    }
    let rps = |n: usize, mode: &str| {
        results
            .iter()
            .find(|(k, _)| *k == n)
            .and_then(|(_, m)| m.iter().find(|(m, _)| *m == mode))
            .map(|(_, f)| f.requests_per_second)
            .unwrap_or(f64::NAN)
    };
    for mode in ["keepalive", "close"] {
        let one = rps(1, mode);
        let ratios: Vec<String> = (2..=ACTIVE_ACTIVE)
            .map(|n| format!("{n} / 1 {:.2}", rps(n, mode) / one))
            .collect();
        println!("active_active {mode}: balancers {}", ratios.join(", "));
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Both modes against `url`, from `client`.
fn measure(client: &Netns, load: &Load, url: &str) -> Result<Vec<(&'static str, Figures)>> {
    Ok(vec![
        ("keepalive", wrk(client, load, url, false)?),
        ("close", wrk(client, load, url, true)?),
    ])
}

fn wrk(client: &Netns, load: &Load, url: &str, close: bool) -> Result<Figures> {
    let extra: &[&str] = if close {
        &["-H", "Connection: close"]
    } else {
        &[]
    };
    wrk::run(
        client.command("wrk"),
        load.connections,
        load.duration,
        extra,
        url,
    )
}
