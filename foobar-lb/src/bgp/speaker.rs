//! BIRD as the agent's child: started with a checked `bird.conf`, told of every change
//! of the announced addresses (`configure`), read every second for its sessions,
//! started again with a back-off when it exits, and on a clean stop made to withdraw
//! everything before it is stopped.

use std::{
    collections::BTreeSet,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::{oneshot, watch},
    task::JoinHandle,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, error, info, warn};

use super::{
    announce::{self, Wanted},
    bird,
    config::BgpConfig,
    control::{self, ControlError},
    status::{BgpView, SessionState, SessionStatus, SpeakerState, VipAnnouncement, lock},
};

/// How often BIRD's sessions are read.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for one answer on BIRD's control socket.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a started BIRD to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for `bird -p` to check a configuration.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for BIRD to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// The first wait before starting an exited BIRD again; it doubles up to the next.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// The longest wait before starting an exited BIRD again.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A BIRD that ran this long before it exited starts again after the first wait.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Why the speaker could not start; the agent refuses to start then.
#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    /// The BIRD binary is missing.
    #[error("[bgp]: {0} not found: install bird2 (Debian's BIRD 2 package), or set bgp.bird")]
    NotInstalled(PathBuf),
    /// The BIRD binary is not an executable file.
    #[error("[bgp]: {0} is not an executable file (bgp.bird)")]
    NotExecutable(PathBuf),
    /// A file or directory could not be written, or BIRD not run.
    #[error("[bgp]: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `bird -p` refused the generated configuration.
    #[error("[bgp]: BIRD refused the configuration written to {path}: {message}")]
    Refused {
        /// The file.
        path: PathBuf,
        /// BIRD's words.
        message: String,
    },
    /// BIRD exited or did not answer at start.
    #[error("[bgp]: BIRD did not start: {0}")]
    Start(String),
}

/// The files of one BIRD: all in the run directory.
#[derive(Clone, Debug)]
struct Paths {
    bird: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    /// A new configuration, checked before it replaces `conf`.
    next: PathBuf,
    ctl: PathBuf,
    pid: PathBuf,
}

impl Paths {
    fn new(config: &BgpConfig, control_socket: &Path) -> Paths {
        let dir = config.run_dir(control_socket);
        Paths {
            bird: config.bird.clone(),
            conf: dir.join("bird.conf"),
            next: dir.join("bird.conf.new"),
            ctl: dir.join("bird.ctl"),
            pid: dir.join("bird.pid"),
            dir,
        }
    }
}

/// The running speaker: BIRD and the task that drives it.
pub struct Speaker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    limit: Duration,
}

impl Speaker {
    /// Writes and checks `bird.conf` for what `wanted` says now, starts BIRD and waits
    /// until it answers, then follows `wanted` until [`Speaker::stop`]. `control_socket`
    /// is the agent's, beside which the run directory goes by default.
    pub async fn start(
        config: BgpConfig,
        control_socket: &Path,
        view: BgpView,
        mut wanted: watch::Receiver<Wanted>,
    ) -> Result<Speaker, BgpError> {
        let paths = Paths::new(&config, control_socket);
        check_installed(&paths.bird)?;
        create_run_dir(&paths.dir)?;
        // Withdrawing, waiting, then stopping BIRD, with room for slow answers.
        let limit =
            Duration::from_millis(u64::from(config.withdraw_wait_ms)) + Duration::from_secs(20);
        let mut supervisor = Supervisor {
            config,
            paths,
            view,
            wanted: Wanted::new(),
            announced: BTreeSet::new(),
            ipv6: false,
            written: false,
            pending: false,
        };
        let now = wanted.borrow_and_update().clone();
        supervisor.apply(&now, false).await?;
        let mut child = spawn_bird(&supervisor.paths).map_err(|source| BgpError::Io {
            what: "starting",
            path: supervisor.paths.bird.clone(),
            source,
        })?;
        if let Err(why) = wait_ready(&mut child, &supervisor.paths.ctl).await {
            terminate(&mut child).await;
            return Err(BgpError::Start(why));
        }
        info!(
            run_dir = %supervisor.paths.dir.display(),
            neighbours = supervisor.config.neighbours.len(),
            "bgp: BIRD started"
        );
        lock(&supervisor.view).speaker = SpeakerState::Running;
        supervisor.publish(true);
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(supervisor.supervise(child, wanted, stopped));
        Ok(Speaker {
            stop: Some(stop),
            task,
            limit,
        })
    }

    /// The clean stop: withdraws every announcement, waits `withdraw_wait_ms` for the
    /// routers to move the flows elsewhere, then stops BIRD (SIGTERM, then SIGKILL).
    /// Call it before the data plane stops forwarding.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(self.limit, &mut self.task)
            .await
            .is_err()
        {
            warn!("bgp: the speaker did not stop in time; killing BIRD");
            // Aborting drops the child, which kills it.
            self.task.abort();
        }
    }
}

impl Drop for Speaker {
    /// A daemon that fails after the start takes its BIRD with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks that BIRD is installed and takes the configuration the agent will write
/// (with every address of `candidates` announced, so that each line is checked):
/// run before the data plane is touched, since a speaker refused after it would leave
/// the program attached for nothing.
pub async fn preflight(
    config: &BgpConfig,
    control_socket: &Path,
    candidates: &BTreeSet<IpAddr>,
) -> Result<(), BgpError> {
    let paths = Paths::new(config, control_socket);
    check_installed(&paths.bird)?;
    create_run_dir(&paths.dir)?;
    let ipv6 = candidates.iter().any(IpAddr::is_ipv6);
    let text = bird::config_text(config, candidates, ipv6);
    let next = paths.next.clone();
    blocking(move || write_synced(&next, text.as_bytes()))
        .await
        .map_err(|source| BgpError::Io {
            what: "writing",
            path: paths.next.clone(),
            source,
        })?;
    check(&paths.bird, &paths.next).await?;
    // A refused one stays, for the operator to read.
    let _ = std::fs::remove_file(&paths.next);
    Ok(())
}

/// Drives one BIRD.
struct Supervisor {
    config: BgpConfig,
    paths: Paths,
    view: BgpView,
    /// What the agent last asked for.
    wanted: Wanted,
    /// The addresses `bird.conf` announces.
    announced: BTreeSet<IpAddr>,
    /// Whether `bird.conf` has the IPv6 protocol and channels.
    ipv6: bool,
    /// Whether `bird.conf` was written by this agent.
    written: bool,
    /// `bird.conf` changed and the running BIRD has not read it yet.
    pending: bool,
}

impl Supervisor {
    async fn supervise(
        mut self,
        child: Child,
        mut wanted: watch::Receiver<Wanted>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut child = Some(child);
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut backoff = RESTART_FIRST;
        let mut started = Instant::now();
        let mut restart_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                status = async {
                    match child.as_mut() {
                        Some(c) => c.wait().await,
                        None => std::future::pending().await,
                    }
                } => {
                    child = None;
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = RESTART_FIRST;
                    }
                    self.exited(status, backoff);
                    restart_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(RESTART_MAX);
                }
                () = async {
                    match restart_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    restart_at = None;
                    lock(&self.view).speaker_restarts += 1;
                    match spawn_bird(&self.paths) {
                        Ok(c) => {
                            info!("bgp: BIRD started again");
                            child = Some(c);
                            started = Instant::now();
                            // It reads the current bird.conf as it starts.
                            self.pending = false;
                        }
                        Err(e) => {
                            let bird = self.paths.bird.display();
                            error!("bgp: starting {bird} again: {e}; next try in {backoff:?}");
                            restart_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(RESTART_MAX);
                        }
                    }
                }
                changed = wanted.changed() => {
                    // The daemon is gone without stopping us: stop as cleanly as we can.
                    if changed.is_err() {
                        break;
                    }
                    let now = wanted.borrow_and_update().clone();
                    if let Err(e) = self.apply(&now, child.is_some()).await {
                        error!("bgp: {e}; BIRD keeps its last configuration");
                    }
                }
                _ = poll.tick() => {
                    if child.is_some() {
                        self.poll().await;
                    }
                }
            }
        }
        self.stop(child).await;
    }

    /// Follows what the agent asks for: when the announced set changes, logs and
    /// counts each change, rewrites `bird.conf` and tells a running BIRD.
    async fn apply(&mut self, wanted: &Wanted, running: bool) -> Result<(), BgpError> {
        let next = announce::announced(wanted);
        let ipv6 = wanted.keys().any(IpAddr::is_ipv6);
        let changed = next != self.announced || ipv6 != self.ipv6;
        if changed {
            let added: Vec<IpAddr> = next.difference(&self.announced).copied().collect();
            let removed: Vec<IpAddr> = self.announced.difference(&next).copied().collect();
            for address in &added {
                info!(
                    %address,
                    "bgp: announcing: the data plane serves it and a VIP on it has a usable backend"
                );
            }
            for address in &removed {
                let reason = wanted
                    .get(address)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| "no longer an address to announce".to_owned());
                warn!(%address, %reason, "bgp: withdrawing");
            }
            {
                let mut view = lock(&self.view);
                view.announcements += added.len() as u64;
                view.withdrawals += removed.len() as u64;
            }
            self.announced = next;
            self.ipv6 = ipv6;
        }
        self.wanted = wanted.clone();
        self.publish(running);
        if changed || !self.written {
            self.install().await?;
            self.written = true;
            self.pending = running;
        }
        if self.pending {
            self.reconfigure().await;
        }
        Ok(())
    }

    /// Shows each address and whether it is announced.
    fn publish(&self, running: bool) {
        let vips = self
            .wanted
            .iter()
            .map(|(address, why_not)| {
                let announced = self.announced.contains(address);
                let reason = match (why_not, announced, running) {
                    (Some(why), _, _) => why.clone(),
                    (None, true, true) => String::new(),
                    (None, true, false) => "BIRD is not running".to_owned(),
                    (None, false, _) => "the agent is stopping".to_owned(),
                };
                VipAnnouncement {
                    address: *address,
                    announced: announced && running,
                    reason,
                }
            })
            .collect();
        lock(&self.view).vips = vips;
    }

    /// Writes `bird.conf` for the announced set: to a new file, checked by `bird -p`,
    /// then renamed over the old one, so that BIRD never reads a refused or partial one.
    async fn install(&self) -> Result<(), BgpError> {
        let text = bird::config_text(&self.config, &self.announced, self.ipv6);
        let next = self.paths.next.clone();
        blocking(move || write_synced(&next, text.as_bytes()))
            .await
            .map_err(|source| BgpError::Io {
                what: "writing",
                path: self.paths.next.clone(),
                source,
            })?;
        check(&self.paths.bird, &self.paths.next).await?;
        let (next, conf) = (self.paths.next.clone(), self.paths.conf.clone());
        blocking(move || rename_synced(&next, &conf))
            .await
            .map_err(|source| BgpError::Io {
                what: "replacing",
                path: self.paths.conf.clone(),
                source,
            })
    }

    /// Tells BIRD to read `bird.conf` again; the static protocol takes the new routes
    /// and the sessions carry on. Returns whether BIRD took it.
    async fn reconfigure(&mut self) -> bool {
        match control::command(&self.paths.ctl, "configure", COMMAND_TIMEOUT).await {
            Ok(reply) => {
                debug!(reply = %reply.text(), "bgp: BIRD read the new configuration");
                self.pending = false;
                true
            }
            Err(e @ ControlError::Refused { .. }) => {
                // Checked before: trying again would fail again.
                error!("bgp: {e}");
                self.pending = false;
                false
            }
            Err(e) => {
                warn!("bgp: telling BIRD of the new announcements: {e}; trying again soon");
                false
            }
        }
    }

    /// Reads the sessions (and tells BIRD of a configuration it missed).
    async fn poll(&mut self) {
        if self.pending {
            self.reconfigure().await;
        }
        let ctl = &self.paths.ctl;
        let protocols = match control::command(ctl, "show protocols", COMMAND_TIMEOUT).await {
            Ok(reply) => control::parse_protocols(&reply),
            Err(e) => {
                debug!("bgp: reading BIRD's protocols: {e}");
                return;
            }
        };
        let bfd = if self.config.bfd.is_some() {
            match control::command(ctl, "show bfd sessions", COMMAND_TIMEOUT).await {
                Ok(reply) => control::parse_bfd_sessions(&reply),
                Err(e) => {
                    debug!("bgp: reading BIRD's BFD sessions: {e}");
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let sessions: Vec<SessionStatus> = self
            .config
            .neighbours
            .iter()
            .map(|n| SessionStatus::from_bird(&self.config, n, &protocols, &bfd))
            .collect();
        let was_running = {
            let mut view = lock(&self.view);
            for (old, new) in view.sessions.iter().zip(&sessions) {
                log_session_change(old, new);
            }
            view.sessions = sessions;
            std::mem::replace(&mut view.speaker, SpeakerState::Running) == SpeakerState::Running
        };
        if !was_running {
            self.publish(true);
        }
    }

    /// BIRD exited: its sessions went down with it.
    fn exited(&self, status: io::Result<ExitStatus>, backoff: Duration) {
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        error!(
            %status,
            "bgp: BIRD exited; its sessions are down and the routers send this balancer \
             nothing; starting it again in {backoff:?}"
        );
        {
            let mut view = lock(&self.view);
            view.speaker = SpeakerState::Restarting;
            view.sessions = self
                .config
                .neighbours
                .iter()
                .map(|n| SessionStatus::down(&self.config, n, "BIRD is not running"))
                .collect();
        }
        self.publish(false);
    }

    /// The clean stop: withdraw, wait, stop BIRD.
    async fn stop(mut self, child: Option<Child>) {
        let Some(mut child) = child else {
            return;
        };
        let had = !self.announced.is_empty();
        let mut withdrawn = false;
        if had {
            for address in &self.announced {
                info!(%address, "bgp: withdrawing: the agent is stopping");
            }
            lock(&self.view).withdrawals += self.announced.len() as u64;
            self.announced.clear();
            self.publish(true);
            match self.install().await {
                Ok(()) => withdrawn = self.reconfigure().await,
                Err(e) => error!("bgp: {e}"),
            }
        }
        let wait = Duration::from_millis(u64::from(self.config.withdraw_wait_ms));
        if withdrawn {
            info!(
                ?wait,
                "bgp: withdrawn; waiting for the routers to move the flows"
            );
            tokio::time::sleep(wait).await;
        }
        terminate(&mut child).await;
        if had && !withdrawn {
            // BIRD's Cease on SIGTERM withdrew them instead: the routers still need
            // the time before the data plane stops.
            tokio::time::sleep(wait).await;
        }
        let _ = std::fs::remove_file(&self.paths.ctl);
    }
}

/// Logs a session coming up or going down.
fn log_session_change(old: &SessionStatus, new: &SessionStatus) {
    let up = SessionState::Established;
    if old.state == new.state {
        return;
    }
    if new.state == up {
        info!(neighbour = %new.neighbour, "bgp: session established");
    } else if old.state == up {
        warn!(
            neighbour = %new.neighbour,
            state = new.state.label(),
            info = %new.info,
            "bgp: session down"
        );
    }
}

/// Creates the run directory, root's alone: it holds BIRD's control socket.
fn create_run_dir(dir: &Path) -> Result<(), BgpError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BgpError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })
}

/// Refuses a BIRD that is not there, with what to do about it.
fn check_installed(bird: &Path) -> Result<(), BgpError> {
    match std::fs::metadata(bird) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(BgpError::NotInstalled(bird.to_owned()))
        }
        Err(source) => Err(BgpError::Io {
            what: "reading",
            path: bird.to_owned(),
            source,
        }),
        Ok(m) if !m.is_file() || m.permissions().mode() & 0o111 == 0 => {
            Err(BgpError::NotExecutable(bird.to_owned()))
        }
        Ok(_) => Ok(()),
    }
}

/// `bird -p -c <file>`: BIRD's own parser on a configuration, before it is used.
async fn check(bird: &Path, file: &Path) -> Result<(), BgpError> {
    let refused = |message: String| BgpError::Refused {
        path: file.to_owned(),
        message,
    };
    let mut command = Command::new(bird);
    command
        .arg("-p")
        .arg("-c")
        .arg(file)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(CHECK_TIMEOUT, command.output())
        .await
        .map_err(|_| refused(format!("`bird -p` gave no answer within {CHECK_TIMEOUT:?}")))?
        .map_err(|source| BgpError::Io {
            what: "running",
            path: bird.to_owned(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let mut words = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if words.is_empty() {
        words = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    }
    if words.is_empty() {
        words = output.status.to_string();
    }
    Err(refused(words))
}

/// Starts `bird -f -c bird.conf -s bird.ctl -P bird.pid`, its output to the log.
fn spawn_bird(paths: &Paths) -> io::Result<Child> {
    // A BIRD left by a killed agent died with it (below); its socket file stays.
    match std::fs::remove_file(&paths.ctl) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // SAFETY: getpid cannot fail and has no side effect.
    let parent = unsafe { libc::getpid() };
    let mut command = Command::new(&paths.bird);
    command
        .arg("-f")
        .arg("-c")
        .arg(&paths.conf)
        .arg("-s")
        .arg(&paths.ctl)
        .arg("-P")
        .arg(&paths.pid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C meant for the agent must not stop BIRD
        // before the agent has withdrawn the routes.
        .process_group(0);
    // A SIGKILLed agent takes its BIRD with it: the sessions drop, and the routers
    // (at once with BFD) stop sending flows to a balancer nobody manages. The signal
    // follows the death of the forking thread, not the process: this runs on the
    // daemon's main thread or a runtime worker, which live as long as the agent, and
    // never on a blocking-pool thread, which ends when idle.
    let in_child = move || -> io::Result<()> {
        // SAFETY: prctl with an option and a signal number: no memory is passed.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The agent died before the prctl: nobody would deliver the signal.
        // SAFETY: getppid cannot fail.
        if unsafe { libc::getppid() } != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec; it calls only
    // async-signal-safe functions (prctl, getppid) and allocates nothing.
    unsafe { command.pre_exec(in_child) };
    let mut child = command.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward(out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward(err));
    }
    Ok(child)
}

/// Waits until BIRD answers on its control socket, or fails saying why.
async fn wait_ready(child: &mut Child, ctl: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if control::answers(ctl, Duration::from_millis(500)).await {
            return Ok(());
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(format!(
                    "it exited ({status}) before answering on {}; its words are in the log above",
                    ctl.display()
                ));
            }
            Ok(None) => {}
            Err(e) => return Err(format!("waiting for it: {e}")),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer on {} within {START_TIMEOUT:?}",
                ctl.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM (BIRD sends its peers a Cease and exits), then SIGKILL if it lingers.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill(2) on our child, not reaped yet (`id` says so), so the pid
        // cannot be another process's.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) => info!(%status, "bgp: BIRD stopped"),
        Ok(Err(e)) => warn!("bgp: waiting for BIRD to stop: {e}"),
        Err(_) => {
            warn!("bgp: BIRD did not stop within {STOP_TIMEOUT:?}; killing it");
            if let Err(e) = child.kill().await {
                warn!("bgp: killing BIRD: {e}");
            }
        }
    }
}

/// BIRD's output, line by line, into the agent's log at the level BIRD gave it.
async fn forward(reader: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log_bird_line(&line);
    }
}

/// `2024-05-01 10:21:43.381 <WARN> text` (BIRD's `log stderr`), or `bird: text`
/// before its configuration is read.
fn log_bird_line(line: &str) {
    let (class, text) = match line.find(" <").zip(line.find("> ")) {
        Some((open, close)) if open < close => (&line[open + 2..close], &line[close + 2..]),
        _ => ("", line.strip_prefix("bird: ").unwrap_or(line)),
    };
    match class {
        "ERR" | "FATAL" | "BUG" => error!("bird: {text}"),
        "WARN" | "AUTH" | "" => warn!("bird: {text}"),
        "DBG" | "TRACE" => debug!("bird: {text}"),
        _ => info!("bird: {text}"),
    }
}

/// Runs file work off the async threads.
async fn blocking(work: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Writes a whole file and flushes it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Renames `from` over `to` and makes the rename durable.
fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    match to.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}
