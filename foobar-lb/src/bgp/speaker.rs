//! BIRD as the agent's child: started with a checked `bird.conf`, told of every change
//! of the announced addresses (`configure`, tried again with a back-off until BIRD
//! takes it), read every second for its sessions, started again with a back-off when
//! it exits, and on a clean stop made to withdraw everything before it is stopped.

use std::{
    collections::BTreeSet,
    io::{self, Write},
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Stdio,
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
    announce::{Want, Wanted},
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
/// The first wait before trying again a change BIRD did not take (a failed write,
/// check or `configure`); it doubles up to [`RESTART_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// How long after BIRD exits the agent's stop may come and the exit still count as
/// part of it (systemd may signal BIRD and the agent at once).
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Why an IPv6 address is not announced by a BIRD started without the IPv6 channel.
const NO_IPV6_CHANNEL: &str = "no IPv6 channel: restart to announce IPv6";

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
    /// is the agent's, beside which the run directory goes by default. `ipv6` says
    /// whether `bird.conf` has the IPv6 static protocol and channels, for the
    /// speaker's life (see [`BgpConfig::announces_ipv6`]): adding them later would
    /// reset every session.
    pub async fn start(
        config: BgpConfig,
        control_socket: &Path,
        ipv6: bool,
        view: BgpView,
        mut wanted: watch::Receiver<Wanted>,
    ) -> Result<Speaker, BgpError> {
        let paths = Paths::new(&config, control_socket);
        check_installed(&paths.bird)?;
        create_run_dir(&paths.dir)?;
        // Withdrawing, waiting, then stopping BIRD, with room for slow answers.
        let limit =
            Duration::from_millis(u64::from(config.withdraw_wait_ms)) + Duration::from_secs(20);
        let mut supervisor = Supervisor::new(config, paths, view, ipv6);
        supervisor.wanted = wanted.borrow_and_update().clone();
        let first = supervisor.target();
        supervisor.install(&first).await?;
        supervisor.installed = Some(first);
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
        supervisor.running = true;
        lock(&supervisor.view).speaker = SpeakerState::Running;
        // It read `bird.conf` as it started.
        supervisor.took();
        supervisor.publish();
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
    /// A BIRD that is gone already (stopped with the agent) withdrew its routes as it
    /// exited: the rest of the wait since then still passes. Call it before the data
    /// plane stops forwarding.
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
/// the program attached for nothing. `ipv6` as for [`Speaker::start`].
pub async fn preflight(
    config: &BgpConfig,
    control_socket: &Path,
    candidates: &BTreeSet<IpAddr>,
    ipv6: bool,
) -> Result<(), BgpError> {
    let paths = Paths::new(config, control_socket);
    check_installed(&paths.bird)?;
    create_run_dir(&paths.dir)?;
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

/// Drives one BIRD. What it says BIRD announces is what BIRD has read: a change
/// counts once BIRD took it, and one BIRD did not take (a write, a check or a
/// `configure` that failed) is tried again from the poll, with a back-off.
struct Supervisor {
    config: BgpConfig,
    paths: Paths,
    view: BgpView,
    /// What the agent last asked for.
    wanted: Wanted,
    /// Whether `bird.conf` has the IPv6 static protocol and channels: fixed at start.
    ipv6: bool,
    /// The addresses the `bird.conf` written by this agent announces; none before
    /// the first is written.
    installed: Option<BTreeSet<IpAddr>>,
    /// The addresses BIRD announces: what the running BIRD last read (or, once it
    /// exited, what it had).
    announced: BTreeSet<IpAddr>,
    /// Whether a BIRD runs (it may not answer yet).
    running: bool,
    /// When BIRD exited, until one runs again.
    exited_at: Option<Instant>,
    /// `bird.conf` changed and the running BIRD has not read it yet.
    pending: bool,
    /// Why the last attempt to bring BIRD to what the agent asks failed.
    failure: Option<String>,
    /// When to try that again.
    retry_at: Option<Instant>,
    /// The wait before the try after that.
    retry_wait: Duration,
    /// The agent is stopping: nothing is to be announced.
    stopping: bool,
}

impl Supervisor {
    fn new(config: BgpConfig, paths: Paths, view: BgpView, ipv6: bool) -> Supervisor {
        Supervisor {
            config,
            paths,
            view,
            wanted: Wanted::new(),
            ipv6,
            installed: None,
            announced: BTreeSet::new(),
            running: false,
            exited_at: None,
            pending: false,
            failure: None,
            retry_at: None,
            retry_wait: RETRY_FIRST,
            stopping: false,
        }
    }

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
                    let exited = Instant::now();
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    self.bird_exited(exited);
                    // A stop of the service signals BIRD with the agent (systemd's
                    // control-group kill): the agent's stop follows in a moment, and
                    // this exit is part of it, neither a fault nor one to restart.
                    let stopping = tokio::select! {
                        _ = &mut stop => true,
                        () = tokio::time::sleep(EXIT_GRACE) => false,
                    };
                    if stopping {
                        info!(%status, "bgp: BIRD exited as the agent stops");
                        break;
                    }
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = RESTART_FIRST;
                    }
                    let at = exited + backoff;
                    let again = at.saturating_duration_since(Instant::now());
                    error!(
                        %status,
                        "bgp: BIRD exited; its sessions are down and the routers send this \
                         balancer nothing; starting it again in {again:?}"
                    );
                    restart_at = Some(at);
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
                            self.running = true;
                            self.exited_at = None;
                            // It reads the current bird.conf as it starts.
                            self.took();
                            self.publish();
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
                    self.wanted = wanted.borrow_and_update().clone();
                    // A new request is tried at once, whatever the back-off.
                    self.sync().await;
                }
                _ = poll.tick() => {
                    if self.retry_due(Instant::now()) {
                        self.sync().await;
                    }
                    if child.is_some() {
                        self.poll().await;
                    }
                }
            }
        }
        self.stop(child).await;
    }

    /// What BIRD should announce: the addresses the agent asks for, and the ones it
    /// holds back that are announced already; IPv6 ones only with the IPv6 channel;
    /// nothing once the agent stops.
    fn target(&self) -> BTreeSet<IpAddr> {
        if self.stopping {
            return BTreeSet::new();
        }
        let current = self.installed.as_ref();
        self.wanted
            .iter()
            .filter(|(address, want)| {
                (address.is_ipv4() || self.ipv6)
                    && match want {
                        Want::Announce => true,
                        Want::Hold(_) => current.is_some_and(|c| c.contains(*address)),
                        Want::Withdraw(_) => false,
                    }
            })
            .map(|(address, _)| *address)
            .collect()
    }

    /// Whether BIRD is not where the agent asks it to be.
    fn dirty(&self) -> bool {
        self.installed.as_ref() != Some(&self.target()) || (self.pending && self.running)
    }

    /// Whether a change BIRD did not take is to be tried again now.
    fn retry_due(&self, now: Instant) -> bool {
        self.dirty() && self.retry_at.is_none_or(|at| now >= at)
    }

    /// Brings BIRD to [`Self::target`]; on a failure, BIRD keeps what it has, the
    /// status says so, and the poll tries again after a back-off.
    async fn sync(&mut self) {
        match self.try_sync().await {
            Ok(()) => {
                if self.failure.take().is_some() {
                    info!("bgp: BIRD took the configuration it had missed");
                }
                self.retry_at = None;
                self.retry_wait = RETRY_FIRST;
            }
            Err(why) => {
                let wait = self.retry_wait;
                let announced = &self.announced;
                error!("bgp: {why}; BIRD still announces {announced:?}; trying again in {wait:?}");
                self.failure = Some(why);
                self.retry_at = Some(Instant::now() + wait);
                self.retry_wait = (wait * 2).min(RESTART_MAX);
            }
        }
        self.publish();
    }

    /// Writes `bird.conf` when it differs from the target, then tells a running BIRD.
    async fn try_sync(&mut self) -> Result<(), String> {
        let target = self.target();
        if self.installed.as_ref() != Some(&target) {
            self.install(&target).await.map_err(|e| e.to_string())?;
            self.installed = Some(target);
            // A BIRD that does not run reads it when it starts again.
            self.pending = self.running;
        }
        if self.pending && self.running {
            self.reconfigure().await?;
        }
        Ok(())
    }

    /// BIRD read the installed `bird.conf`: what it announces changes now. Logs and
    /// counts each address announced or withdrawn.
    fn took(&mut self) {
        self.pending = false;
        let now = self.installed.clone().unwrap_or_default();
        if now == self.announced {
            return;
        }
        let added: Vec<IpAddr> = now.difference(&self.announced).copied().collect();
        let removed: Vec<IpAddr> = self.announced.difference(&now).copied().collect();
        for address in &added {
            info!(
                %address,
                "bgp: announced: the data plane serves it and a VIP on it has a usable backend"
            );
        }
        for address in &removed {
            let reason = self.why_not(address);
            if self.stopping {
                info!(%address, %reason, "bgp: withdrawn");
            } else {
                warn!(%address, %reason, "bgp: withdrawn");
            }
        }
        {
            let mut view = lock(&self.view);
            view.announcements += added.len() as u64;
            view.withdrawals += removed.len() as u64;
        }
        self.announced = now;
    }

    /// Why `address` is not to be announced (empty when it is).
    fn why_not(&self, address: &IpAddr) -> String {
        if self.stopping {
            return "the agent is stopping".to_owned();
        }
        match self.wanted.get(address) {
            None => "no longer an address to announce".to_owned(),
            Some(Want::Hold(why) | Want::Withdraw(why)) => why.clone(),
            Some(Want::Announce) if address.is_ipv6() && !self.ipv6 => NO_IPV6_CHANNEL.to_owned(),
            Some(Want::Announce) => String::new(),
        }
    }

    /// Shows each address, whether BIRD has its route, and why not (or why it still
    /// has one the agent asks to withdraw).
    fn publish(&self) {
        let answering = lock(&self.view).speaker == SpeakerState::Running;
        let failure = self
            .failure
            .as_ref()
            .map_or_else(String::new, |f| format!(": {f}"));
        let vips = self
            .wanted
            .iter()
            .map(|(address, want)| {
                let has = self.running && answering && self.announced.contains(address);
                let why = self.why_not(address);
                let reason = match (has, why.is_empty()) {
                    (true, true) => String::new(),
                    // Held: announced already, and it stays.
                    (true, false) if matches!(want, Want::Hold(_)) && !self.stopping => {
                        String::new()
                    }
                    (true, false) => {
                        format!("{why}; BIRD has not withdrawn it yet{failure}")
                    }
                    (false, false) => why,
                    (false, true) if !(self.running && answering) => {
                        "BIRD is not running".to_owned()
                    }
                    (false, true) => {
                        format!("BIRD has not read the configuration announcing it yet{failure}")
                    }
                };
                VipAnnouncement {
                    address: *address,
                    announced: has,
                    reason,
                }
            })
            .collect();
        lock(&self.view).vips = vips;
    }

    /// Writes `bird.conf` announcing `addresses`: to a new file, checked by `bird -p`,
    /// then renamed over the old one, so that BIRD never reads a refused or partial one.
    async fn install(&self, addresses: &BTreeSet<IpAddr>) -> Result<(), BgpError> {
        let text = bird::config_text(&self.config, addresses, self.ipv6);
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
    /// and the sessions carry on. A refusal leaves BIRD on its last configuration.
    async fn reconfigure(&mut self) -> Result<(), String> {
        match control::command(&self.paths.ctl, "configure", COMMAND_TIMEOUT).await {
            Ok(reply) => {
                debug!(reply = %reply.text(), "bgp: BIRD read the new configuration");
                self.took();
                Ok(())
            }
            Err(e @ ControlError::Refused { .. }) => {
                Err(format!("{e}; BIRD runs on with its last configuration"))
            }
            Err(e) => Err(format!("telling BIRD of the new configuration: {e}")),
        }
    }

    /// Reads the sessions.
    async fn poll(&mut self) {
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
            self.publish();
        }
    }

    /// BIRD exited: its sessions, and so its routes, went with it.
    fn bird_exited(&mut self, at: Instant) {
        self.running = false;
        self.exited_at = Some(at);
        // A change it had not read is in `bird.conf`, for the next one.
        self.pending = false;
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
        self.publish();
    }

    /// Whether the routers may still send this balancer flows for an address: BIRD
    /// announces one, or may (it was told of one, and the answer did not come).
    fn had_routes(&self) -> bool {
        !self.announced.is_empty()
            || (self.pending && self.installed.as_ref().is_some_and(|i| !i.is_empty()))
    }

    /// The clean stop: withdraw, wait, stop BIRD. The wait passes whenever routes
    /// were announced, so that the data plane forwards while the routers move the
    /// flows elsewhere.
    async fn stop(mut self, child: Option<Child>) {
        let wait = Duration::from_millis(u64::from(self.config.withdraw_wait_ms));
        let had = self.had_routes();
        self.stopping = true;
        let Some(mut child) = child else {
            // BIRD is gone already: its routes went as it exited (a Cease on SIGTERM,
            // or the routers' BFD or hold timer). The routers get the wait from then.
            let since = self.exited_at.map_or(Duration::MAX, |at| at.elapsed());
            let left = wait.saturating_sub(since);
            if had && !left.is_zero() {
                info!(
                    ?left,
                    "bgp: BIRD is gone and its routes with it; waiting for the routers to move the flows"
                );
                tokio::time::sleep(left).await;
            }
            self.announced.clear();
            self.publish();
            let _ = std::fs::remove_file(&self.paths.ctl);
            return;
        };
        let mut withdrawn = false;
        if had {
            info!("bgp: withdrawing every address: the agent is stopping");
            match self.try_sync().await {
                Ok(()) => withdrawn = true,
                Err(e) => warn!("bgp: withdrawing: {e}; stopping BIRD withdraws them instead"),
            }
            self.publish();
        }
        if withdrawn {
            info!(
                ?wait,
                "bgp: withdrawn; waiting for the routers to move the flows"
            );
            tokio::time::sleep(wait).await;
        }
        terminate(&mut child).await;
        self.running = false;
        if !withdrawn {
            // Its Cease withdrew what it still announced.
            lock(&self.view).withdrawals += self.announced.len() as u64;
        }
        self.announced.clear();
        self.publish();
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{io::AsyncWriteExt, net::UnixListener};

    use super::*;
    use crate::bgp::status::BgpStatus;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn set(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().copied().map(ip).collect()
    }

    /// A supervisor in a run directory of its own, whose `bird -p` is `bird`: `true`
    /// takes every configuration, `false` refuses it. As after its start: BIRD runs,
    /// answers, and announces `announced`, which `bird.conf` holds.
    fn supervisor(name: &str, bird: &str, announced: &[&str]) -> (Supervisor, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("foobar-lb-speaker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let config: BgpConfig = toml::from_str(&format!(
            r#"
            local_as = 65001
            announce_from = "10.0.0.3"
            bird = "{bird}"
            run_dir = "{}"

            [[neighbours]]
            address = "10.0.0.254"
            remote_as = 65000
            "#,
            dir.display()
        ))
        .unwrap_or_else(|e| panic!("a [bgp] section: {e}"));
        let paths = Paths::new(&config, Path::new("/nonexistent/control.sock"));
        let view: BgpView = Arc::new(Mutex::new(BgpStatus::new(&config)));
        let mut s = Supervisor::new(config, paths, view, false);
        s.installed = Some(set(announced));
        s.announced = set(announced);
        s.running = true;
        lock(&s.view).speaker = SpeakerState::Running;
        (s, dir)
    }

    /// Answers on BIRD's control socket as BIRD does: its greeting, then `reply` (as it
    /// is when the command comes) to every command.
    fn fake_bird(ctl: &Path, reply: Arc<Mutex<String>>) -> JoinHandle<()> {
        let listener =
            UnixListener::bind(ctl).unwrap_or_else(|e| panic!("binding {}: {e}", ctl.display()));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    if write.write_all(b"0001 BIRD 2.0.12 ready.\n").await.is_err() {
                        return;
                    }
                    while let Ok(Some(_)) = lines.next_line().await {
                        let answer = reply.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        })
    }

    #[tokio::test]
    async fn a_failed_install_is_retried_and_nothing_changes_until_it_succeeds() {
        let (mut s, dir) = supervisor("install", "false", &["10.0.0.100"]);
        let reply = Arc::new(Mutex::new("0003 Reconfigured\n".to_owned()));
        let bird = fake_bird(&s.paths.ctl, reply);
        let withdraw = Want::Withdraw("no usable backend in vip www".into());
        s.wanted = Wanted::from([(ip("10.0.0.100"), withdraw)]);

        // `bird -p` refuses the new file: BIRD keeps the route, and says so.
        let before = Instant::now();
        s.sync().await;
        let after = Instant::now();
        assert_eq!(s.announced, set(&["10.0.0.100"]), "BIRD still announces it");
        assert_eq!(
            s.installed,
            Some(set(&["10.0.0.100"])),
            "bird.conf is the old one"
        );
        assert!(s.failure.is_some(), "the failure is kept for the status");
        let vips = lock(&s.view).vips.clone();
        assert!(vips[0].announced, "{vips:?}");
        assert!(
            vips[0].reason.starts_with("no usable backend in vip www")
                && vips[0].reason.contains("BIRD has not withdrawn it yet"),
            "{vips:?}"
        );
        assert_eq!(lock(&s.view).withdrawals, 0);

        // Tried again by the poll once the back-off has passed, not before; a second
        // failure doubles it.
        assert!(!s.retry_due(before), "not before the back-off");
        assert!(s.retry_due(after + RETRY_FIRST), "due after the back-off");
        let before = Instant::now();
        s.sync().await;
        let after = Instant::now();
        assert_eq!(s.announced, set(&["10.0.0.100"]));
        assert!(!s.retry_due(before + RETRY_FIRST), "the back-off doubled");
        assert!(s.retry_due(after + RETRY_FIRST * 2));

        // The check passes now: written, read by BIRD, withdrawn and counted once.
        s.paths.bird = PathBuf::from("true");
        assert!(s.retry_due(after + RETRY_FIRST * 2));
        s.sync().await;
        assert!(s.announced.is_empty(), "{:?}", s.announced);
        assert_eq!(s.installed, Some(BTreeSet::new()));
        assert!(s.failure.is_none() && s.retry_at.is_none() && !s.pending);
        assert!(!s.retry_due(after + RESTART_MAX), "nothing left to do");
        let conf = std::fs::read_to_string(&s.paths.conf)
            .unwrap_or_else(|e| panic!("{}: {e}", s.paths.conf.display()));
        assert!(!conf.contains("10.0.0.100"), "{conf}");
        let view = lock(&s.view).clone();
        assert_eq!(view.withdrawals, 1);
        assert!(!view.vips[0].announced);
        assert_eq!(view.vips[0].reason, "no usable backend in vip www");
        bird.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_refused_configure_keeps_birds_last_configuration() {
        let (mut s, dir) = supervisor("configure", "true", &["10.0.0.100"]);
        let reply = Arc::new(Mutex::new(
            "0002-Reading configuration from bird.conf\n8002 bird.conf:1:1 out of memory\n"
                .to_owned(),
        ));
        let bird = fake_bird(&s.paths.ctl, reply.clone());
        s.wanted = Wanted::from([
            (ip("10.0.0.100"), Want::Announce),
            (ip("10.0.0.101"), Want::Announce),
        ]);
        s.sync().await;
        // The file is written, but BIRD did not read it.
        assert_eq!(s.installed, Some(set(&["10.0.0.100", "10.0.0.101"])));
        assert!(s.pending);
        assert_eq!(s.announced, set(&["10.0.0.100"]));
        let view = lock(&s.view).clone();
        assert_eq!(view.announcements, 0);
        assert!(view.vips[0].announced && view.vips[0].reason.is_empty());
        assert!(!view.vips[1].announced);
        assert!(
            view.vips[1].reason.contains("BIRD has not read")
                && view.vips[1].reason.contains("out of memory"),
            "{:?}",
            view.vips[1]
        );
        assert!(s.retry_due(Instant::now() + RETRY_FIRST));

        // BIRD takes it the next time.
        *reply.lock().unwrap_or_else(|p| p.into_inner()) = "0003 Reconfigured\n".to_owned();
        s.sync().await;
        assert_eq!(s.announced, set(&["10.0.0.100", "10.0.0.101"]));
        assert!(!s.pending && s.failure.is_none());
        let view = lock(&s.view).clone();
        assert_eq!(view.announcements, 1);
        assert!(view.vips.iter().all(|v| v.announced && v.reason.is_empty()));
        bird.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn holds_what_is_announced_and_needs_the_ipv6_channel_for_ipv6() {
        let (mut s, dir) = supervisor("target", "true", &["10.0.0.100"]);
        let waiting = "waiting for the first health checks of vip www".to_owned();
        s.wanted = Wanted::from([
            (ip("10.0.0.100"), Want::Hold(waiting.clone())),
            (ip("10.0.0.101"), Want::Hold(waiting.clone())),
            (ip("10.0.0.102"), Want::Announce),
            (ip("2001:db8::100"), Want::Announce),
        ]);
        // Held: kept where announced, not started elsewhere; IPv6 not without the
        // channel the speaker started with.
        assert_eq!(s.target(), set(&["10.0.0.100", "10.0.0.102"]));
        s.publish();
        let vips = lock(&s.view).vips.clone();
        assert!(vips[0].announced && vips[0].reason.is_empty(), "{vips:?}");
        assert_eq!(
            (vips[1].announced, vips[1].reason.as_str()),
            (false, waiting.as_str())
        );
        assert_eq!(vips[3].address, ip("2001:db8::100"));
        assert_eq!(vips[3].reason, NO_IPV6_CHANNEL);
        s.ipv6 = true;
        assert_eq!(
            s.target(),
            set(&["10.0.0.100", "10.0.0.102", "2001:db8::100"])
        );
        // Nothing is announced once the agent stops.
        s.stopping = true;
        assert!(s.target().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_bird_gone_with_the_agents_stop_is_not_restarted_and_the_wait_passes() {
        let (mut s, dir) = supervisor("stop", "true", &["10.0.0.100"]);
        s.wanted = Wanted::from([(ip("10.0.0.100"), Want::Announce)]);
        let view = s.view.clone();
        let wait = Duration::from_millis(u64::from(s.config.withdraw_wait_ms));
        // A BIRD that exits at once, as one signalled with the agent would.
        let child = Command::new("true")
            .spawn()
            .unwrap_or_else(|e| panic!("running true: {e}"));
        let (stop, stopped) = oneshot::channel();
        let (_wanted, wanted) = watch::channel(s.wanted.clone());
        let started = Instant::now();
        let task = tokio::spawn(s.supervise(child, wanted, stopped));
        while lock(&view).speaker != SpeakerState::Restarting {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the exit was not seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap_or_else(|_| panic!("the speaker did not stop"))
            .unwrap_or_else(|e| panic!("the speaker panicked: {e}"));
        // BIRD exited after `started`; the stop waits until `wait` after its exit.
        assert!(
            started.elapsed() >= wait,
            "stopped {:?} after BIRD's start, before the routers had {wait:?}",
            started.elapsed()
        );
        let status = lock(&view).clone();
        assert_eq!(status.speaker_restarts, 0, "not started again");
        assert_eq!(status.speaker, SpeakerState::Restarting);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
