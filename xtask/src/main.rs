//! `cargo xtask`: setup, test and benchmarks for foobar-lb.

mod bench_bgp;
mod bench_db;
mod bench_failover;
mod bench_lab;
mod bench_stack;
mod lab;
mod package;
mod setup;
mod wrk;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Setup, tests and benchmarks for foobar-lb")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): nightly rust-src,
    /// bpf-linker linked against the nightly's LLVM, Debian packages.
    Setup,
    /// Everything CI checks: fmt, clippy (user and eBPF side), unit tests, packet
    /// tests, the random-frame run and the end-to-end lab tests. Runs setup first;
    /// needs root.
    Test,
    /// See the balancer work: builds the foobar.com lab, resolves www.foobar.com,
    /// fetches the site over HTTPS through the VIP, posts and reads back, shows the
    /// requests spread over the servers, drains one live, and removes the lab. Runs
    /// setup first; needs root.
    Demo,
    /// The netns lab: client, balancer (or two, with --ha; or three and more behind a
    /// router, with --bgp) and two web servers.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Build the Debian package (dpkg-deb): the release binary in /usr/sbin, the
    /// systemd unit, an example /etc/foobar-lb/foobar-lb.toml, the man page and the
    /// bash, zsh and fish completions. Prints the .deb's path
    /// (target/package/foobar-lb_<version>_<arch>.deb). Runs setup first.
    Package,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the lab and start the agent and web servers; leaves them running.
    Up {
        /// Two balancers, lb1 (priority 150) and lb2 (100), failing the VIP over with
        /// VRRP (100 ms adverts).
        #[arg(long)]
        ha: bool,
        /// The whole foobar.com stack: DNS, HTTPS, web and application nodes on
        /// server1 and server2, MariaDB on server1.
        #[arg(long)]
        stack: bool,
        /// Active-active balancers: the client behind a router (BIRD) that spreads the
        /// VIP's flows by ECMP over every balancer announcing it over BGP (BFD every
        /// 50 ms × 3); Maglev and DSR over IPIP, the servers answering through the
        /// router.
        #[arg(long, conflicts_with_all = ["ha", "stack"])]
        bgp: bool,
        /// How many balancers the --bgp lab has: 3 to 8 (default 3).
        #[arg(long, requires = "bgp", value_parser = clap::value_parser!(u64).range(3..=8))]
        balancers: Option<u64>,
    },
    /// Stop the lab's processes and remove its namespaces and pins.
    Down,
    /// Show the lab's agent status.
    Status,
    /// A rolling deploy of the running stack lab's site under whatever load it has:
    /// builds the binaries, then for server1 and server2 in turn drains it on the www
    /// and www-tls VIPs, waits until the balancer sees no connection left to it, stops
    /// its web and application nodes (lame ducks: they send their last clients away
    /// cleanly), starts the new ones, waits for their health checks and puts it back.
    Deploy {
        /// Seconds to wait for a drained server's connections to end before its nodes
        /// are stopped anyway (clients that keep connections alive hold them).
        #[arg(long, default_value_t = 10)]
        drain_timeout: u64,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// ns per packet of each data-plane path under BPF_PROG_TEST_RUN, as JSON lines.
    Dataplane {
        /// Runs per case.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
    },
    /// packets/s through foobar-lb, nftables DNAT and a forward-only XDP control, from
    /// an XDP packet generator on real veths, as JSON lines.
    Packets {
        /// Frames each setup is sent (nftables gets a quarter: it is slower).
        #[arg(long, default_value_t = 20_000_000)]
        frames: u32,
    },
    /// How the agent answers while the data plane is big: `status` with a million
    /// flows in the table, a reload that swaps 40 VIPs for 40 others; as JSON lines.
    Agent,
    /// requests/s and latency through foobar-lb, nftables DNAT, HAProxy (mode tcp)
    /// and straight to a server, with wrk on the lab, as JSON lines.
    Lab {
        /// Seconds per wrk run (8 runs in all).
        #[arg(long, default_value_t = 10)]
        duration: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
    },
    /// requests/s and latency of the web tier, foobar-web beside nginx in the same run:
    /// static page and API read, over HTTP and HTTPS, through the VIP, as JSON lines.
    Stack {
        /// Seconds per wrk run (8 runs per round).
        #[arg(long, default_value_t = 5)]
        duration: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Rounds: each runs every case once with each web server, alternating.
        #[arg(long, default_value_t = 2)]
        rounds: u32,
    },
    /// The database tier through the whole stack: API reads and writes with semi-sync
    /// on and off, replication lag under the write load, and rounds of a primary crash
    /// (acknowledged writes lost, the write gap), as JSON lines.
    Db {
        /// Seconds per wrk run (4 runs).
        #[arg(long, default_value_t = 5)]
        duration: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 16)]
        connections: u32,
        /// Primary crashes, alternating between the servers.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Legitimate clients during a random-source SYN flood (hping3), through
    /// foobar-lb and through nftables DNAT behind its SYN proxy, as JSON lines.
    Flood {
        /// Seconds each setup is flooded.
        #[arg(long, default_value_t = 10)]
        duration: u32,
    },
    /// The gap a client sees when the VRRP master crashes, fails back or stops, and a
    /// dead backend's time to removal, on an HA lab, as JSON lines. With --bgp: one of
    /// three active-active balancers crashing, on a BGP lab.
    Failover {
        /// Rounds of each case.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Active-active instead of VRRP: three balancers announce the VIP over BGP to
        /// a router with ECMP; each round crashes one (round k: balancer k % 3), with
        /// 24 keep-alive connections held and a probe opening a connection every 10 ms:
        /// how long new connections to the dead one failed, and how many held
        /// connections broke.
        #[arg(long)]
        bgp: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::ensure(),
        Task::Test => test(),
        Task::Demo => {
            prepare_lab()?;
            lab::demo()
        }
        Task::Package => {
            setup::ensure()?;
            println!("{}", package::build()?.display());
            Ok(())
        }
        Task::Lab { action } => match action {
            LabAction::Up {
                ha,
                stack,
                bgp,
                balancers,
            } => {
                prepare_lab()?;
                if bgp {
                    lab::up_bgp(balancers.unwrap_or(3) as usize)
                } else {
                    lab::up(ha, stack)
                }
            }
            LabAction::Down => {
                require_root("the lab lives in network namespaces")?;
                lab::down()
            }
            LabAction::Status => lab::status(),
            LabAction::Deploy { drain_timeout } => {
                lab::require_stack()?;
                prepare_lab()?;
                lab::deploy(std::time::Duration::from_secs(drain_timeout))
            }
        },
        Task::Bench {
            which: Bench::Dataplane { repeat },
        } => {
            setup::ensure()?;
            require_root("the benchmark loads BPF programs")?;
            cargo(&NODE_BINS)?;
            run(Command::new("target/debug/bench-dataplane").arg(repeat.to_string()))
        }
        Task::Bench {
            which: Bench::Agent,
        } => {
            prepare_bench()?;
            run(&mut Command::new("target/release/bench-agent"))
        }
        Task::Bench {
            which: Bench::Packets { frames },
        } => {
            prepare_bench()?;
            run(Command::new("target/release/bench-packets").arg(frames.to_string()))
        }
        Task::Bench {
            which: Bench::Lab {
                duration,
                connections,
            },
        } => {
            prepare_bench()?;
            bench_lab::run(&bench_lab::Load {
                duration,
                connections,
            })
        }
        Task::Bench {
            which:
                Bench::Stack {
                    duration,
                    connections,
                    rounds,
                },
        } => {
            prepare_bench()?;
            bench_stack::run(duration, connections, rounds)
        }
        Task::Bench {
            which:
                Bench::Db {
                    duration,
                    connections,
                    rounds,
                },
        } => {
            prepare_bench()?;
            bench_db::run(duration, connections, rounds)
        }
        Task::Bench {
            which: Bench::Flood { duration },
        } => {
            prepare_bench()?;
            run(Command::new("target/release/bench-flood").arg(duration.to_string()))
        }
        Task::Bench {
            which: Bench::Failover { rounds, bgp },
        } => {
            prepare_bench()?;
            if bgp {
                bench_bgp::run(rounds)
            } else {
                bench_failover::run(rounds)
            }
        }
    }
}

/// Setup, root, and release servers and agent for the benchmarks that run the lab: a
/// debug web server would be what is measured.
fn prepare_bench() -> Result<()> {
    setup::ensure()?;
    require_root("the benchmark creates network namespaces and attaches XDP programs")?;
    cargo(&["build", "--release", "--bins"])
}

/// Setup, root, and the binaries the lab runs.
fn prepare_lab() -> Result<()> {
    setup::ensure()?;
    require_root("the lab creates network namespaces and attaches XDP programs")?;
    cargo(&NODE_BINS)
}

/// The lab's programs: the balancer and the nodes behind it. Always the whole
/// workspace: building a subset would unify the dependencies' features differently
/// and rebuild them (and the eBPF object) at every switch.
const NODE_BINS: [&str; 2] = ["build", "--bins"];

fn test() -> Result<()> {
    setup::ensure()?;
    require_root("the packet tests load BPF programs and create network namespaces")?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "foobar-lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The eBPF crate only builds for the BPF target, with the nightly.
    cargo(&[
        "+nightly",
        "clippy",
        "-p",
        "foobar-lb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ])?;
    build_next_layout()?;
    // The end-to-end tests run the agent's and the nodes' binaries from target/debug.
    cargo(&NODE_BINS)?;
    cargo_test(&["test", "--workspace", "--exclude", "foobar-lb-ebpf"])
}

/// The upgrade test's second build of the agent, whose pinned maps have the next
/// layout (the `layout-test` feature), as `target/debug/foobar-lb-next-layout`. The
/// normal build that follows puts `target/debug/foobar-lb` back.
fn build_next_layout() -> Result<()> {
    cargo(&[
        "build",
        "-p",
        "foobar-lb",
        "--bin",
        "foobar-lb",
        "--features",
        "layout-test",
    ])?;
    std::fs::copy(
        "target/debug/foobar-lb",
        "target/debug/foobar-lb-next-layout",
    )?;
    Ok(())
}

/// Runs `cargo test`, echoing its output, and ends with one total over all test
/// binaries (cargo prints a result per binary, the last often a doc-test's "0 passed").
fn cargo_test(args: &[&str]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new("cargo")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim()
                                .rsplit(' ')
                                .next()
                                .unwrap_or("0")
                                .parse::<u64>()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo {args:?} failed: {status}");
    }
    Ok(())
}

fn require_root(why: &str) -> Result<()> {
    let uid = String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?;
    if uid.trim() != "0" {
        bail!("run as root: {why}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args))
}

/// Runs a command, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
