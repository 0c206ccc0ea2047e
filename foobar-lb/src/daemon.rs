//! The daemon: the agent behind a Unix socket, with signals and a rate sampler.
//!
//! [`run`] takes its shutdown as a future, so tests drive it as tokio's mini-redis
//! drives its server; the binary passes SIGTERM/SIGINT.

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    agent::{Agent, AgentError, AgentOptions, BackendKey, OnExit},
    api::{ApiError, ErrorKind, MAX_REQUEST_BYTES, Reply, Request},
    bgp::{self, BgpStatus, BgpView, Speaker, Wanted},
    connections,
    health::{self, HealthCheck},
    http, topology,
    vrrp::{
        self, VrrpConfig, VrrpView,
        handoff::{self, Start},
        instance::Exit,
    },
};

/// How often counters are sampled for rates.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How long a burst of route and neighbour changes may last before it is read.
const TOPOLOGY_SETTLE: Duration = Duration::from_millis(20);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Agent options (configuration file, pin directory).
    pub agent: AgentOptions,
    /// The control socket.
    pub socket: PathBuf,
    /// What happens to the data plane on exit.
    pub on_exit: OnExit,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The agent could not start.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The failover router could not start.
    #[error(transparent)]
    Vrrp(#[from] crate::vrrp::instance::VrrpError),
    /// The BGP speaker (BIRD) could not start.
    #[error(transparent)]
    Bgp(#[from] bgp::BgpError),
    /// The control socket could not be set up.
    #[error("control socket {path}: {message}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

type Shared = Arc<Mutex<Agent>>;

/// Runs until `shutdown` completes: starts the agent, serves the control socket,
/// reloads on SIGHUP, samples counters, then exits as `on_exit` says.
pub async fn run(
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let socket_error = |message: String| DaemonError::Socket {
        path: options.socket.clone(),
        message,
    };
    let listener = bind(&options.socket).await.map_err(socket_error)?;
    // How the failover router starts depends on how the last agent left (see
    // vrrp::handoff). One that stepped aside for this restart is resumed as MASTER now,
    // not after the agent's start: loading and verifying the program can take longer
    // than the peer waits before it takes over. Safe, because the last agent left the
    // program attached from the pins, forwarding with the same maps meanwhile.
    let vrrp_view = VrrpView::default();
    let (faults, tracked) = watch::channel(Vec::new());
    let planned = plan_vrrp(&options);
    let mut vrrp = match &planned {
        Some((config, start @ Start::Resume { .. })) => {
            match vrrp::instance::spawn(config.clone(), vrrp_view.clone(), tracked.clone(), *start)
            {
                Ok(running) => Some(running),
                Err(e) => {
                    let _ = std::fs::remove_file(&options.socket);
                    return Err(e.into());
                }
            }
        }
        _ => None,
    };
    // A BIRD that cannot run (missing, or refusing the configuration the agent writes)
    // refuses the start before the data plane is touched.
    let bgp_ipv6 = match preflight_bgp(&options).await {
        Ok(ipv6) => ipv6,
        Err(e) => {
            if let Some(vrrp) = vrrp.take() {
                vrrp.stop(Exit::HandOver, Duration::from_secs(3)).await;
            }
            let _ = std::fs::remove_file(&options.socket);
            return Err(e.into());
        }
    };
    let agent_options = options.agent.clone();
    let mut agent = match tokio::task::spawn_blocking(move || Agent::start(&agent_options)).await {
        Ok(Ok(agent)) => agent,
        Ok(Err(e)) => {
            // A resumed MASTER whose agent cannot start hands over.
            if let Some(vrrp) = vrrp.take() {
                vrrp.stop(Exit::HandOver, Duration::from_secs(3)).await;
            }
            let _ = std::fs::remove_file(&options.socket);
            return Err(e.into());
        }
        Err(join) => panic!("agent start panicked: {join}"),
    };
    if let Some(logger) = agent.ebpf_logger() {
        tokio::spawn(drain_ebpf_log(logger));
    }
    // Bound now, while a failure can still leave the data plane as `--on-exit` says.
    let metrics = match agent.metrics_listen() {
        None => None,
        Some(at) => match http::bind(at) {
            Ok(listener) => Some((at, listener)),
            Err(e) => {
                abandon_start(agent, vrrp, &options).await;
                return Err(DaemonError::Socket {
                    path: PathBuf::from(at.to_string()),
                    message: format!("metrics listener: {e}"),
                });
            }
        },
    };
    // Tracked faults flow to the VRRP router, which turns them into a priority, and
    // what to announce to the BGP speaker.
    let (now_faults, now_wanted) = agent.tracking();
    faults.send_replace(now_faults);
    let (wanted, wanted_rx) = watch::channel(now_wanted.unwrap_or_default());
    if vrrp.is_none()
        && let Some(config) = agent.vrrp_config().cloned()
    {
        let start = planned.map_or(Start::Fresh, |(_, start)| start);
        match vrrp::instance::spawn(config, vrrp_view.clone(), tracked, start) {
            Ok(running) => vrrp = Some(running),
            Err(e) => {
                abandon_start(agent, None, &options).await;
                return Err(e.into());
            }
        }
    }
    if vrrp.is_some() {
        agent.show_vrrp(vrrp_view);
    }
    // BIRD starts once the data plane is attached; a BIRD that cannot run (missing,
    // or refusing its configuration) keeps the agent from starting.
    let mut speaker = None;
    if let Some(config) = agent.bgp_config().cloned() {
        let view: BgpView = Arc::new(Mutex::new(BgpStatus::new(&config)));
        match Speaker::start(config, &options.socket, bgp_ipv6, view.clone(), wanted_rx).await {
            Ok(started) => {
                agent.show_bgp(view);
                speaker = Some(started);
            }
            Err(e) => {
                abandon_start(agent, vrrp, &options).await;
                return Err(e.into());
            }
        }
    }
    let agent: Shared = Arc::new(Mutex::new(agent));
    let http_task = match metrics {
        Some((at, listener)) => {
            info!(%at, "serving /metrics, /status.json and the status page");
            let health_changes = lock(&agent).health_changes();
            Some(AbortOnDrop(tokio::spawn(http::serve(
                listener,
                Arc::downgrade(&agent),
                health_changes,
            ))))
        }
        None => None,
    };
    info!(socket = %options.socket.display(), "ready");

    // Next hops follow the kernel's routes and neighbours.
    let (topologies, mut topology) = mpsc::channel(1);
    let _watcher = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = topology::watch(TOPOLOGY_SETTLE, topologies).await {
            error!("watching routes and neighbours stopped: {e}; next hops are no longer updated");
        }
    }));

    // Least-connections rings follow the counts; idle flows are forgotten.
    let planner = AbortOnDrop(tokio::spawn(every(
        connections::PLAN_EVERY,
        agent.clone(),
        Agent::plan_least_connections,
    )));
    let sweeper = AbortOnDrop(tokio::spawn(every(
        connections::SWEEP_EVERY,
        agent.clone(),
        Agent::sweep_flows,
    )));
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| socket_error(e.to_string()))?;
    let mut sampler = tokio::time::interval(SAMPLE_EVERY);
    let (results, mut checked) = mpsc::unbounded_channel();
    let mut checkers = Checkers::new(results);
    checkers.sync(&agent).await;
    // Served requests say when the VIPs may have changed, so the checks follow.
    let changed = Arc::new(Notify::new());
    // Its connections hold the agent weakly: an idle client does not hold up shutdown.
    let _control = AbortOnDrop(tokio::spawn(accept_control(
        listener,
        Arc::downgrade(&agent),
        changed.clone(),
    )));
    // systemd (Type=notify) counts the start as done only now: attached, answering.
    crate::systemd::ready();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = changed.notified() => {
                checkers.sync(&agent).await;
                track(&agent, &faults, &wanted).await;
            }
            Some((key, check, result)) = checked.recv() => {
                let shared = agent.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    lock(&shared).record_check(&key, &check, result)
                })
                .await;
                track(&agent, &faults, &wanted).await;
            }
            _ = hangup.recv() => {
                let shared = agent.clone();
                let result = tokio::task::spawn_blocking(move || lock(&shared).reload()).await;
                match result {
                    Ok(Ok(changed)) => info!(?changed, "SIGHUP: reloaded"),
                    Ok(Err(e)) => error!("SIGHUP: reload refused, the old state keeps running: {e}"),
                    Err(e) => error!("SIGHUP: reload panicked: {e}"),
                }
                checkers.sync(&agent).await;
                track(&agent, &faults, &wanted).await;
            }
            Some(fresh) = topology.recv() => {
                let shared = agent.clone();
                let _ = tokio::task::spawn_blocking(move || lock(&shared).topology_changed(fresh)).await;
            }
            _ = sampler.tick() => {
                let shared = agent.clone();
                let _ = tokio::task::spawn_blocking(move || lock(&shared).sample()).await;
                track(&agent, &faults, &wanted).await;
            }
        }
    }
    info!("shutting down");
    crate::systemd::stopping();
    // Withdrawn from the routers first, while the data plane still forwards: the
    // flows move to the other balancers before this one stops (both on a restart and
    // on a stop: a restarted agent announces again once it runs).
    if let Some(speaker) = speaker.take() {
        speaker.stop().await;
    }
    // A real stop first hands the VIPs over (priority 0), while the data plane still
    // forwards. A restart keeps them and the mastership: the router goes on
    // advertising through the cleanup and steps aside last, leaving the next agent a
    // note to resume from (see vrrp::handoff). The next agent must start after this
    // one has exited, as systemd's restart and the lab's do.
    let restart = options.on_exit.is_restart(options.agent.pin_dir.is_some());
    if !restart && let Some(vrrp) = vrrp.take() {
        vrrp.stop(Exit::HandOver, Duration::from_secs(3)).await;
    }
    checkers.stop();
    drop(http_task);
    // They hold the agent too.
    drop((planner, sweeper));
    let _ = std::fs::remove_file(&options.socket);
    // Connections still being served hold clones; wait for them briefly.
    for _ in 0..50 {
        if Arc::strong_count(&agent) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match Arc::try_unwrap(agent) {
        Ok(agent) => agent
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(options.on_exit),
        Err(_) => warn!("control connections still open; exiting without cleanup"),
    }
    // A restart: the last advertisement goes out as late as it can, so the next agent
    // has the backup's whole master-down interval to resume in.
    if let Some(vrrp) = vrrp {
        let note = handoff::note_path(&options.socket);
        vrrp.stop(Exit::Restart(note), Duration::from_secs(3)).await;
    }
    Ok(())
}

/// A start that fails once the data plane is attached: a resumed VRRP master hands
/// over, the control socket goes, and the data plane is left as any exit leaves it
/// (`--on-exit`), not dropped half-way.
async fn abandon_start(agent: Agent, vrrp: Option<vrrp::instance::Running>, options: &RunOptions) {
    if let Some(vrrp) = vrrp {
        vrrp.stop(Exit::HandOver, Duration::from_secs(3)).await;
    }
    let _ = std::fs::remove_file(&options.socket);
    agent.shutdown(options.on_exit);
}

/// How the failover router starts, decided before the agent's start (see
/// [`handoff::plan_start`]); `None` without `[vrrp]`. The file is read here for
/// `[vrrp]` alone: the agent reads and checks it again.
fn plan_vrrp(options: &RunOptions) -> Option<(VrrpConfig, Start)> {
    let config = crate::config::Config::load(&options.agent.config)
        .ok()?
        .vrrp?;
    let start = handoff::plan_start(
        &config,
        &handoff::note_path(&options.socket),
        options.agent.pin_dir.as_deref(),
    );
    Some((config, start))
}

/// Checks BIRD for the file's `[bgp]`, if any (see [`bgp::speaker::preflight`]), and
/// says whether the speaker gets the IPv6 channel, from the same reading of the file
/// (see [`bgp::BgpConfig::announces_ipv6`]). A file that does not load is left to the
/// agent's start, which says why.
async fn preflight_bgp(options: &RunOptions) -> Result<bool, bgp::BgpError> {
    let Ok(config) = crate::config::Config::load(&options.agent.config) else {
        return Ok(false);
    };
    let Some(announcer) = &config.bgp else {
        return Ok(false);
    };
    let candidates = announcer.candidates(&config.vips, config.vrrp.as_ref());
    let ipv6 = announcer.announces_ipv6(&config.vips, config.vrrp.as_ref());
    bgp::speaker::preflight(announcer, &options.socket, &candidates, ipv6).await?;
    Ok(ipv6)
}

/// Passes what tracking finds to the VRRP router and the BGP speaker when it changed.
async fn track(
    agent: &Shared,
    faults: &watch::Sender<Vec<String>>,
    wanted: &watch::Sender<Wanted>,
) {
    let agent = agent.clone();
    if let Ok((now, announce)) = tokio::task::spawn_blocking(move || lock(&agent).tracking()).await
    {
        faults.send_if_modified(|old| {
            let changed = *old != now;
            *old = now;
            changed
        });
        if let Some(announce) = announce {
            wanted.send_if_modified(|old| {
                let changed = *old != announce;
                *old = announce;
                changed
            });
        }
    }
}

/// Emits the program's log records through `log` (and so through tracing) as they come.
async fn drain_ebpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for
    // as long as it lives, and the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("not reading the program's log: {e}");
            return;
        }
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Stops a task when dropped (the HTTP listener ends with the daemon).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A check result: which backend, with which check, and how it went.
type Checked = (BackendKey, HealthCheck, health::CheckResult);

/// One task per checked backend, each probing on its own interval.
struct Checkers {
    running: HashMap<BackendKey, (HealthCheck, JoinHandle<()>)>,
    results: mpsc::UnboundedSender<Checked>,
}

impl Checkers {
    fn new(results: mpsc::UnboundedSender<Checked>) -> Self {
        Self {
            running: HashMap::new(),
            results,
        }
    }

    /// Starts the checks the agent wants and stops the others (a changed check is
    /// restarted). Checks run concurrently and never hold the agent while probing.
    async fn sync(&mut self, agent: &Shared) {
        let agent = agent.clone();
        let Ok(wanted) = tokio::task::spawn_blocking(move || lock(&agent).checks()).await else {
            return;
        };
        let wanted: HashMap<BackendKey, HealthCheck> = wanted.into_iter().collect();
        self.running.retain(|key, (check, task)| {
            let keep = wanted.get(key) == Some(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, check) in wanted {
            if self.running.contains_key(&key) {
                continue;
            }
            let results = self.results.clone();
            let (k, c) = (key.clone(), check.clone());
            let task = tokio::spawn(async move {
                let mut ticks = tokio::time::interval(c.interval());
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let result = health::probe(&c, k.1).await;
                    if results.send((k.clone(), c.clone(), result)).is_err() {
                        return;
                    }
                }
            });
            self.running.insert(key, (check, task));
        }
    }

    fn stop(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
    }
}

/// Calls `work` on the agent every `period`, off the async threads, forever.
async fn every(period: Duration, agent: Shared, work: fn(&mut Agent)) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let shared = agent.clone();
        let _ = tokio::task::spawn_blocking(move || work(&mut lock(&shared))).await;
    }
}

fn lock(agent: &Shared) -> std::sync::MutexGuard<'_, Agent> {
    // A panic inside one request must not take the control API down with it.
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the control socket, root-only from its first instant; refuses when another
/// daemon answers there.
async fn bind(path: &Path) -> Result<UnixListener, String> {
    if UnixStream::connect(path).await.is_ok() {
        return Err("another foobar-lb daemon is listening there".into());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("removing the stale socket: {e}"));
        }
        _ => {}
    }
    // bind creates the socket file with the mode the umask leaves: under 0o177 it is
    // 0600 from the start, where a chmod after the bind left a moment in which any
    // local user could connect. The umask is the process's: this runs first in `run`,
    // before the daemon starts anything that creates files, and restores it at once.
    // SAFETY: umask cannot fail and changes nothing but the process's mask.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    bound.map_err(|e| e.to_string())
}

/// Accepts control connections until aborted, backing off when accepting fails (out
/// of file descriptors) instead of spinning. No connection limit: only root can
/// connect.
async fn accept_control(listener: UnixListener, agent: Weak<Mutex<Agent>>, changed: Arc<Notify>) {
    let mut backoff = http::AcceptBackoff::new("control socket");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff.succeeded();
                tokio::spawn(serve(stream, agent.clone(), changed.clone()));
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// Serves one connection: request lines in, reply lines out. It holds the agent only
/// while serving a request, so that a client idle between requests does not keep a
/// stopping daemon from cleaning up; once the agent is gone, requests are refused.
async fn serve(stream: UnixStream, agent: Weak<Mutex<Agent>>, changed: Arc<Notify>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1)).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                debug!("control connection: {e}");
                return;
            }
        };
        let reply = match (serde_json::from_str::<Request>(&line), agent.upgrade()) {
            (Err(e), _) => Err(ApiError::new(
                ErrorKind::BadRequest,
                None,
                format!("not a request: {e}"),
            )),
            (Ok(_), None) => Err(ApiError::new(
                ErrorKind::Dataplane,
                None,
                "the agent is stopping",
            )),
            (Ok(request), Some(agent)) => {
                debug!(?request, "control request");
                tokio::task::spawn_blocking(move || lock(&agent).handle(request))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ApiError::new(
                            ErrorKind::Dataplane,
                            None,
                            format!("the request failed inside the agent: {e}"),
                        ))
                    })
            }
        };
        if matches!(reply, Ok(Reply::Changed(_))) {
            changed.notify_one();
        }
        let mut out =
            serde_json::to_string::<Result<Reply, ApiError>>(&reply).expect("replies serialize");
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}
