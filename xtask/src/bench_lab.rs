//! `cargo xtask bench lab`: requests/s and latency through foobar-lb against the
//! usual alternatives, on the same lab with the same client, in one run.
//!
//! Setups, in this order (each leaves the balancer namespace as it found it):
//! - `direct`: the client to one web server, routed by the balancer's kernel;
//! - `nftables`: DNAT round robin (`numgen inc`) in the balancer's namespace;
//! - `haproxy`: HAProxy `mode tcp`, round robin, in the balancer's namespace;
//! - `foobar-lb`: the XDP balancer, round robin.
//!
//! Each runs twice: with keep-alive connections (the forwarding path) and with a new
//! connection per request (`Connection: close`: the new-flow path, and a proxy's
//! accept/connect cost). One JSON object per line per setup and mode.

use std::{process::Command, time::Duration};

use anyhow::{Context, Result, bail};

use crate::wrk::{self, Figures};
use foobar_lab::lab::{Lab, LabSpec, VIP, VIP_PORT, WEB_PORT, terminate, wait_until, web_addr};
use foobar_lab::netns::unique_name;

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

    results.push(("direct", measure(&lab, load, &direct)?));

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
    let nft_results = measure(&lab, load, &vip);
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
        .and_then(|()| measure(&lab, load, &vip));
    terminate(&mut haproxy);
    results.push(("haproxy", haproxy_results?));

    lab.start_agent();
    results.push(("foobar-lb", measure(&lab, load, &vip)?));
    let stats = lab.cli_ok(&["-o", "json", "stats"]);
    drop(lab);

    for (setup, by_mode) in &results {
        for (mode, f) in by_mode {
            println!(
                "{{\"bench\":\"lab\",\"setup\":\"{setup}\",\"mode\":\"{mode}\",\"connections\":{},\
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
    Ok(())
}

fn ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Both modes against `url`.
fn measure(lab: &Lab, load: &Load, url: &str) -> Result<Vec<(&'static str, Figures)>> {
    Ok(vec![
        ("keepalive", wrk(lab, load, url, false)?),
        ("close", wrk(lab, load, url, true)?),
    ])
}

fn wrk(lab: &Lab, load: &Load, url: &str, close: bool) -> Result<Figures> {
    let extra: &[&str] = if close {
        &["-H", "Connection: close"]
    } else {
        &[]
    };
    wrk::run(
        lab.client.command("wrk"),
        load.connections,
        load.duration,
        extra,
        url,
    )
}
