//! `cargo xtask lab up|down|status` and `cargo xtask demo`.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Result, bail};
use foobar_lab::{
    lab::{
        self, ADVERT_INTERVAL_MS, LB_CLIENT_IF, LB_SERVER_IF, Lab, LabSpec, VIP, VIP_PORT,
        wait_until, web_addr,
    },
    stack::{self, DNS_ADDR, SITE},
};

/// Namespace prefix of the persistent lab.
const PREFIX: &str = "fblb-lab";

fn spec(persistent: bool, ha: bool, stack: bool) -> LabSpec {
    LabSpec {
        prefix: PREFIX.into(),
        webs: 2,
        persistent,
        bin_dir: PathBuf::from("target/debug"),
        ha,
        stack,
        router: false,
    }
}

fn pids_file() -> PathBuf {
    std::env::temp_dir().join(PREFIX).join("pids")
}

fn is_up() -> bool {
    std::path::Path::new(&format!("/run/netns/{PREFIX}-net")).exists()
}

/// The balancers of the running lab, by their directories.
fn balancer_names() -> Vec<String> {
    ["lb", "lb1", "lb2"]
        .into_iter()
        .filter(|name| socket(name).exists())
        .map(String::from)
        .collect()
}

fn socket(balancer: &str) -> PathBuf {
    std::env::temp_dir()
        .join(PREFIX)
        .join(balancer)
        .join("control.sock")
}

fn cli_line(balancer: &str) -> String {
    format!(
        "sudo target/debug/foobar-lb --socket {}",
        socket(balancer).display()
    )
}

/// Builds the lab and leaves it running.
pub fn up(ha: bool, stack: bool) -> Result<()> {
    if is_up() {
        bail!("the lab is already up; `cargo xtask lab down` first");
    }
    if ha && stack {
        bail!("--ha and --stack do not go together yet: choose one");
    }
    let mut lab = Lab::up(spec(true, ha, stack));
    if ha {
        for (i, priority) in [150, 100].into_iter().enumerate() {
            let b = &mut lab.balancers[i];
            b.write_config(&lab::ha_config(2, priority, true));
            b.start_agent();
        }
        wait_until(Duration::from_secs(10), "lb1 to become MASTER", || {
            lab.balancers[0].holds_vip()
        });
    } else {
        lab.start_agent();
    }
    let agent_pids: Vec<u32> = lab.balancers.iter().filter_map(|b| b.agent_pid()).collect();
    let pids = lab.detach_processes();
    std::fs::write(
        pids_file(),
        pids.iter().map(|p| format!("{p}\n")).collect::<String>(),
    )?;
    let first = if ha { "lb1" } else { "lb" };
    if stack {
        lab.wait_for_backends_up();
        println!(
            "lab up: the foobar.com stack: client {PREFIX}-client 10.0.0.2 (DNS {DNS_ADDR}) → \
             {SITE} = VIP {VIP}:80 and :443 on {PREFIX}-lb → server1 {}, server2 {} (foobar-web :80 :443, \
             foobar-app :8000, foobar-db: MariaDB primary on server1, replica on server2, through the write VIP {} and read VIP {}:3306)\n",
            web_addr(0),
            web_addr(1),
            stack::db_write_vip(),
            stack::db_read_vip(),
        );
        println!("try:");
        println!(
            "  sudo ip netns exec {PREFIX}-client curl --cacert {} https://{SITE}/api/posts",
            lab.pki.as_ref().expect("stack").ca_cert().display()
        );
        println!("  {} status", cli_line(first));
        println!("  cargo xtask lab down");
        return Ok(());
    }
    if ha {
        println!(
            "lab up: client {PREFIX}-client 10.0.0.2 → VIP {VIP}:{VIP_PORT} on the VRRP master of \
             {PREFIX}-lb1 (priority 150) and {PREFIX}-lb2 (100), adverts every \
             {ADVERT_INTERVAL_MS} ms → web1 {}:8080, web2 {}:8080, maglev\n",
            web_addr(0),
            web_addr(1)
        );
    } else {
        println!(
            "lab up: client {PREFIX}-client 10.0.0.2 → VIP {VIP}:{VIP_PORT} on {PREFIX}-lb \
             ({LB_CLIENT_IF}, {LB_SERVER_IF}) → web1 {}:8080, web2 {}:8080, round robin\n",
            web_addr(0),
            web_addr(1)
        );
    }
    println!("try:");
    println!("  sudo ip netns exec {PREFIX}-client curl -s http://{VIP}/");
    println!("  {} status", cli_line(first));
    println!(
        "  {} backend drain www {}:8080",
        cli_line(first),
        web_addr(0)
    );
    if ha {
        println!(
            "  sudo kill -9 {}        # crash lb1's agent: lb2 takes the VIP over",
            agent_pids[0]
        );
        println!("  {} status", cli_line("lb2"));
    }
    println!("  cargo xtask lab down");
    Ok(())
}

/// Stops every lab process and removes the namespaces and pins.
pub fn down() -> Result<()> {
    if let Ok(pids) = std::fs::read_to_string(pids_file()) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: signalling a pid we started; a stale one is at worst ESRCH.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let gone = lab::delete_namespaces(&format!("{PREFIX}-"));
    for name in ["lb", "lb1", "lb2"] {
        lab::remove_pins(&PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{name}")));
    }
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(PREFIX));
    let _ = std::fs::remove_dir_all(lab::resolv_dir(&format!("{PREFIX}-client")));
    println!("lab down: removed {} namespaces", gone.len());
    Ok(())
}

/// Shows what runs.
pub fn status() -> Result<()> {
    if !is_up() {
        println!("the lab is down (`cargo xtask lab up`)");
        return Ok(());
    }
    for name in balancer_names() {
        println!("== {name}");
        let status = Command::new("target/debug/foobar-lb")
            .arg("--socket")
            .arg(socket(&name))
            .arg("status")
            .status()?;
        if !status.success() {
            println!("(the agent of {name} does not answer)");
        }
    }
    Ok(())
}

/// The README's first command: the seed's whole flow through the balancer.
pub fn demo() -> Result<()> {
    if is_up() {
        down()?;
    }
    println!(
        "== building the foobar.com lab: client, DNS, balancer (XDP on veth), server1 and server2 \
         (foobar-web, foobar-app, foobar-db: a MariaDB primary and its replica)"
    );
    let mut lab = Lab::up(spec(false, false, true));
    lab.start_agent();
    lab.wait_for_backends_up();
    println!("{}\n", lab.cli_ok(&["status"]));

    let site = format!("https://{SITE}");
    println!("== the client resolves {SITE} through the lab's DNS ({DNS_ADDR}):");
    let resolved = stack::resolving_command(&lab.client, "getent")
        .args(["hosts", SITE])
        .output()?;
    println!("  {}", String::from_utf8_lossy(&resolved.stdout).trim());

    println!("\n== GET {site}/ over HTTPS through the VIP:");
    let page = ok(lab.site_curl(&[
        "-f",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version} %{size_download} bytes",
        &format!("{site}/"),
    ]))?;
    println!("  {page}");

    println!("\n== POST {site}/api/posts, then read it back:");
    let posted = ok(lab.site_curl(&[
        "-f",
        "-H",
        "Content-Type: application/json",
        "-d",
        "{\"author\":\"demo\",\"text\":\"Hello from the foobar.com lab\"}",
        &format!("{site}/api/posts"),
    ]))?;
    println!("  created: {posted}");
    let listed = ok(lab.site_curl(&["-f", &format!("{site}/api/posts?limit=1")]))?;
    println!("  newest:  {listed}");

    println!("\n== 6 requests, each on a new connection (round robin over the servers):");
    requests(&lab, &site, 6)?;

    let server1 = format!("{}", web_addr(0));
    println!("\n== draining server1 on both VIPs (open connections keep it, new ones do not):");
    for (vip, port) in [("www", 80), ("www-tls", 443)] {
        println!(
            "  {}",
            lab.cli_ok(&["backend", "drain", vip, &format!("{server1}:{port}")])
                .trim()
        );
    }
    requests(&lab, &site, 4)?;
    println!("\n== server1 back in:");
    for (vip, port) in [("www", 80), ("www-tls", 443)] {
        lab.cli_ok(&["backend", "weight", vip, &format!("{server1}:{port}"), "1"]);
    }
    requests(&lab, &site, 2)?;

    println!("\n{}", lab.cli_ok(&["status"]));
    println!("== removing the lab");
    drop(lab);
    println!("done. `cargo xtask lab up --stack` keeps one running to play with.");
    Ok(())
}

fn ok(out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn requests(lab: &Lab, site: &str, n: usize) -> Result<()> {
    for i in 1..=n {
        match lab.served_by(&format!("{site}/")) {
            Some(server) => println!("  request {i}: answered by {server}"),
            None => bail!(
                "request {i} through the VIP failed; agent log:\n{}",
                lab.agent_log()
            ),
        }
    }
    Ok(())
}
