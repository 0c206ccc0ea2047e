//! The `foobar-lb` binary: the daemon (`run`) and the CLI that talks to it.

use std::{
    io::{IsTerminal, Write},
    process::ExitCode,
};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use foobar_lb::{
    agent::AgentOptions,
    api::{self, Reply},
    cli::{BackendCommand, Cli, Command, DecapArgs, Output, RunArgs, VipCommand, XdpModeArg},
    config::XdpModeSetting,
    daemon::{self, RunOptions},
    decap::{self, DecapOptions},
    persist, render,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match &cli.command {
        Command::Run(args) => return run(args, &cli),
        Command::Decap(args) => return run_decap(args),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "foobar-lb", &mut stdout);
            return Ok(());
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut stdout)?;
            return Ok(());
        }
        Command::Save { file: Some(file) } => return save_to(&cli, file),
        _ => {}
    }
    let request = cli
        .command
        .request()
        .expect("client commands have requests");
    let reply = api::call(&cli.socket, &request)?;
    if let Reply::Changed(api::Changed {
        not_persisted: Some(why),
        ..
    }) = &reply
    {
        eprintln!("warning: applied, but a restart of the agent will forget it: {why}");
    }
    let drain_wait = match &cli.command {
        Command::Backend(BackendCommand::Drain {
            vip,
            backend,
            wait: true,
            timeout,
        }) => Some((vip, *backend, std::time::Duration::from_secs(*timeout))),
        _ => None,
    };
    match cli.output {
        Output::Table => {
            writeln!(stdout, "{}", table_of(&cli.command, &reply)?)?;
            if let Some((vip, backend, timeout)) = drain_wait {
                stdout.flush()?;
                let waited = wait_drained(&cli.socket, vip, backend, timeout)?;
                writeln!(
                    stdout,
                    "{backend} drained: no active connection after {waited:.1?}"
                )?;
            }
        }
        Output::Json => {
            let mut json = json_of(&cli.command, &reply);
            if let Some((vip, backend, timeout)) = drain_wait {
                let waited = wait_drained(&cli.socket, vip, backend, timeout)?;
                json["drained_after_seconds"] = serde_json::json!(waited.as_secs_f64());
            }
            writeln!(stdout, "{}", serde_json::to_string_pretty(&json)?)?;
        }
    }
    Ok(())
}

/// Polls the agent until a backend has no active connection, or `timeout` passes.
fn wait_drained(
    socket: &std::path::Path,
    vip: &str,
    backend: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    let started = std::time::Instant::now();
    loop {
        let Reply::Status(status) = api::call(socket, &api::Request::Status)? else {
            bail!("the agent answered a status request with something else");
        };
        let active = selected(&status.vips, Some(vip))
            .iter()
            .flat_map(|v| &v.backends)
            .find(|b| b.address == backend)
            .map(|b| b.traffic.active_flows)
            .with_context(|| format!("{vip} has no backend {backend} any more"))?;
        if active == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= timeout {
            bail!("{backend}: {active} connections still active after {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The part of a reply a command shows, as JSON.
fn json_of(command: &Command, reply: &Reply) -> serde_json::Value {
    let value = |v: &dyn erased::Json| v.json();
    match (command, reply) {
        (Command::Vip(VipCommand::List), Reply::Status(s)) => value(&s.vips),
        (Command::Backend(BackendCommand::List { vip }), Reply::Status(s)) => {
            value(&selected(&s.vips, vip.as_deref()))
        }
        (_, Reply::Status(s)) => value(s),
        (_, Reply::Stats(s)) => value(s),
        (_, Reply::Changed(c)) => value(c),
        (_, Reply::Explained(e)) => value(e),
        (_, Reply::Acl(rules)) => value(rules),
        (_, Reply::RunningConfig(running)) => value(running),
    }
}

/// The part of a reply a command shows, for people.
fn table_of(command: &Command, reply: &Reply) -> anyhow::Result<String> {
    Ok(match (command, reply) {
        (Command::Vip(VipCommand::List), Reply::Status(s)) => render::vips(&s.vips),
        (Command::Backend(BackendCommand::List { vip }), Reply::Status(s)) => {
            let shown = selected(&s.vips, vip.as_deref());
            if let (Some(vip), true) = (vip, shown.is_empty()) {
                let known: Vec<&str> = s.vips.iter().map(|v| v.name.as_str()).collect();
                bail!("vip: no VIP named {vip:?}; known: {}", known.join(", "));
            }
            render::backends(&shown)
        }
        (_, Reply::Status(s)) => render::status(s),
        (_, Reply::Stats(s)) => render::stats(s),
        (_, Reply::Changed(c)) => render::changed(c),
        (_, Reply::Explained(e)) => render::explanation(e),
        (_, Reply::Acl(rules)) => render::acl(rules),
        // `save` to stdout: the configuration file itself (without its last newline,
        // which the caller adds).
        (_, Reply::RunningConfig(running)) => {
            persist::config_file_text(running)?.trim_end().to_owned()
        }
    })
}

/// `save FILE`: the running state as a configuration file, replacing FILE atomically
/// (its permissions kept).
fn save_to(cli: &Cli, file: &std::path::Path) -> anyhow::Result<()> {
    let Reply::RunningConfig(running) = api::call(&cli.socket, &api::Request::RunningConfig)?
    else {
        bail!("the agent answered a running-config request with something else");
    };
    let text = persist::config_file_text(&running)?;
    let mode = std::fs::metadata(file).map_or(0o644, |m| {
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777
    });
    persist::write_atomically(file, text.as_bytes(), mode)
        .with_context(|| format!("writing {}", file.display()))?;
    let backends: usize = running.config.vips.iter().map(|v| v.backends.len()).sum();
    match cli.output {
        Output::Table => println!(
            "saved {} VIPs and {backends} backends to {}",
            running.config.vips.len(),
            file.display()
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "file": file,
                "vips": running.config.vips.len(),
                "backends": backends,
                "disabled": running.disabled,
            })
        ),
    }
    Ok(())
}

fn selected(vips: &[api::VipStatus], vip: Option<&str>) -> Vec<api::VipStatus> {
    vips.iter()
        .filter(|v| vip.is_none_or(|k| v.name == k || v.address.to_string() == k))
        .cloned()
        .collect()
}

mod erased {
    /// Anything serializable, as a JSON value.
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("API types serialize")
        }
    }
}

/// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Refuses `run` or `decap` without what they need of the kernel: root's capabilities,
/// or just the ones below, as the systemd unit grants them. Checked on the effective
/// set, not on the user id: root in a container may lack them, and a service need not
/// be root. CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel allows.
fn require_root(command: &str) -> anyhow::Result<()> {
    let mut needed = vec![
        (CAP_BPF, "CAP_BPF (BPF programs and maps)"),
        (
            CAP_PERFMON,
            "CAP_PERFMON (the verifier refuses the program's pointer arithmetic without it)",
        ),
        (
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN (attaching XDP, addresses, sysctls)",
        ),
    ];
    if command == "run" {
        needed.push((CAP_NET_RAW, "CAP_NET_RAW (VRRP and ARP sockets)"));
    }
    let effective = effective_capabilities()?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|&(cap, _)| {
            !(has(cap) || (matches!(cap, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN)))
        })
        .map(|(_, name)| name)
        .collect();
    if !missing.is_empty() {
        bail!(
            "foobar-lb {command} needs root: it loads BPF programs and attaches them to \
             interfaces, and this process lacks {}; try sudo",
            missing.join(", ")
        );
    }
    Ok(())
}

/// This process's effective capabilities (`CapEff` of /proc/self/status), as bits.
fn effective_capabilities() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .context("/proc/self/status has no CapEff line")?;
    u64::from_str_radix(hex.trim(), 16).with_context(|| format!("CapEff {:?}", hex.trim()))
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Until SIGTERM or SIGINT. The handlers are installed now, in the runtime's context,
/// not at the future's first poll: a signal that arrives while the agent starts up
/// stops it cleanly instead of killing it.
fn until_stopped() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

fn run(args: &RunArgs, cli: &Cli) -> anyhow::Result<()> {
    require_root("run")?;
    init_logging();
    let options = RunOptions {
        agent: AgentOptions {
            config: args.config.clone(),
            pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
            debug_log: tracing::level_filters::LevelFilter::current()
                >= tracing::level_filters::LevelFilter::DEBUG,
            state_file: (!args.no_state_file).then(|| args.state_file.clone()),
        },
        socket: cli.socket.clone(),
        on_exit: args.on_exit,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stopped = {
        let _context = runtime.enter();
        until_stopped()
    };
    runtime.block_on(daemon::run(options, stopped))?;
    Ok(())
}

fn run_decap(args: &DecapArgs) -> anyhow::Result<()> {
    require_root("decap")?;
    init_logging();
    let options = DecapOptions {
        interfaces: args.interfaces.clone(),
        vips: args.vips.clone(),
        gue_port: args.gue_port,
        xdp_mode: match args.xdp_mode {
            XdpModeArg::Auto => XdpModeSetting::Auto,
            XdpModeArg::Native => XdpModeSetting::Native,
            XdpModeArg::Generic => XdpModeSetting::Generic,
        }
        .mode(),
        configure_loopback: !args.no_loopback,
        sources: args.sources.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let stopped = {
        let _context = runtime.enter();
        until_stopped()
    };
    let counters = runtime.block_on(decap::run(options, stopped))?;
    println!(
        "{}",
        serde_json::to_string(&decap::counters_json(&counters))?
    );
    Ok(())
}
