//! A running virtual router: the state machine driven by the socket, its timer and
//! the tracked faults, acting on the addresses, and publishing what it does.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    VrrpConfig,
    handoff::{self, Note, Start},
    net::{self, Addresses, AdvertSocket, Announcer, Interface},
    packet::{Advertisement, Rejection, split_ipv4},
    router::{Action, Role, Router, RouterParams, Takeover},
};

/// What the router shows the status page, `foobar-lb status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VrrpStatus {
    /// The interface advertisements use.
    pub interface: String,
    /// The virtual router.
    pub vrid: u8,
    /// Where we stand.
    pub role: Role,
    /// The priority we advertise now (lowered while faults are tracked).
    pub priority: u8,
    /// The configured priority.
    pub configured_priority: u8,
    /// Our advertisement interval.
    pub advert_interval_ms: u32,
    /// Whether we preempt a lower-priority master.
    pub preempt: bool,
    /// Our address on the link.
    pub primary: Option<Ipv4Addr>,
    /// The current master, as far as we know.
    pub master: Option<Ipv4Addr>,
    /// The addresses that move, as `address/prefix dev interface`.
    pub addresses: Vec<String>,
    /// Why the priority is lowered, if it is.
    pub faults: Vec<String>,
    /// Entries into each role.
    pub transitions: BTreeMap<Role, u64>,
    /// Advertisements sent.
    pub adverts_sent: u64,
    /// Valid advertisements received.
    pub adverts_received: u64,
    /// Packets refused, by reason label.
    pub rejected: BTreeMap<String, u64>,
    /// Why we last became master.
    pub last_takeover: Option<Takeover>,
    /// Seconds since the last change of role.
    pub seconds_in_role: f64,
    #[serde(skip)]
    role_since: Option<std::time::Instant>,
}

impl VrrpStatus {
    /// A copy for a reader, with the time in role filled in.
    pub fn snapshot(&self) -> VrrpStatus {
        let mut copy = self.clone();
        copy.seconds_in_role = self
            .role_since
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        copy
    }
}

/// The router's status, shared with the agent.
pub type VrrpView = Arc<Mutex<VrrpStatus>>;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    /// The interface is missing or has no address to send from.
    #[error("vrrp.interface: {0}")]
    Interface(String),
    /// The socket could not be opened.
    #[error("vrrp: opening the advertisement socket on {interface}: {source}")]
    Socket {
        /// The interface.
        interface: String,
        /// The error.
        source: std::io::Error,
    },
}

/// How a router ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A real stop: a MASTER says priority 0, so the peer takes over after its skew,
    /// and releases the addresses.
    HandOver,
    /// A restart, the data plane forwarding meanwhile: a MASTER keeps the addresses,
    /// advertises once more and leaves the note at this path, so that the next agent
    /// resumes as MASTER (see [`handoff`]).
    Restart(PathBuf),
}

/// Stops a running router and waits.
pub struct Running {
    stop: Option<oneshot::Sender<Exit>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Asks the router to stop as `exit` says and waits up to `limit` for it.
    pub async fn stop(mut self, exit: Exit, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(exit);
        }
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            warn!("vrrp: did not stop in time");
            self.task.abort();
        }
    }
}

/// Starts the router as `start` says ([`handoff::plan_start`] decides): as BACKUP
/// (first removing addresses a crashed run left behind), or as MASTER resuming from a
/// restart. `faults` carries what tracking found; each change moves the priority.
pub fn spawn(
    config: VrrpConfig,
    view: VrrpView,
    faults: watch::Receiver<Vec<String>>,
    start: Start,
) -> Result<Running, VrrpError> {
    let link = net::interface(&config.interface)
        .map_err(|e| VrrpError::Interface(format!("{}: {e}", config.interface)))?
        .ok_or_else(|| {
            VrrpError::Interface(format!(
                "{}: no such interface in this network namespace",
                config.interface
            ))
        })?;
    let moving: BTreeSet<Ipv4Addr> = config.addresses().iter().map(|(_, a)| a.addr()).collect();
    let primary = link
        .networks
        .iter()
        .map(|n| n.addr())
        .find(|a| !moving.contains(a))
        .ok_or_else(|| {
            VrrpError::Interface(format!(
                "{} has no IPv4 address of its own to send advertisements from",
                config.interface
            ))
        })?;
    let socket = AdvertSocket::open(&config.interface, link.index, primary).map_err(|source| {
        VrrpError::Socket {
            interface: config.interface.clone(),
            source,
        }
    })?;
    let router = Router::new(
        RouterParams {
            interval: config.interval(),
            preempt: config.preempt,
            primary,
        },
        config.effective_priority(&faults.borrow()),
    );
    {
        let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
        *v = VrrpStatus {
            interface: config.interface.clone(),
            vrid: config.vrid,
            configured_priority: config.priority,
            advert_interval_ms: config.advert_interval_ms,
            preempt: config.preempt,
            primary: Some(primary),
            addresses: config
                .addresses()
                .iter()
                .map(|(dev, a)| format!("{a} dev {dev}"))
                .collect(),
            rejected: Rejection::ALL
                .iter()
                .map(|r| (r.label().to_owned(), 0))
                .collect(),
            ..VrrpStatus::default()
        };
    }
    let addresses = Addresses::open().map_err(|source| VrrpError::Socket {
        interface: config.interface.clone(),
        source,
    })?;
    let announcer = Announcer::open().map_err(|source| VrrpError::Socket {
        interface: config.interface.clone(),
        source,
    })?;
    let (stop, stopped) = oneshot::channel();
    let instance = Instance {
        addresses,
        announcer,
        advertised: config.addresses().iter().map(|(_, a)| a.addr()).collect(),
        config,
        router,
        socket,
        primary,
        view,
        start,
    };
    let task = tokio::spawn(instance.run(faults, stopped));
    Ok(Running {
        stop: Some(stop),
        task,
    })
}

struct Instance {
    addresses: Addresses,
    announcer: Announcer,
    config: VrrpConfig,
    router: Router,
    socket: AdvertSocket,
    primary: Ipv4Addr,
    /// The address list we advertise and expect.
    advertised: Vec<Ipv4Addr>,
    view: VrrpView,
    start: Start,
}

impl Instance {
    async fn run(
        mut self,
        mut faults: watch::Receiver<Vec<String>>,
        mut stop: oneshot::Receiver<Exit>,
    ) {
        let now = std::time::Instant::now();
        // A run killed as MASTER, or one that restarted too late to resume, left its
        // addresses: a BACKUP starts without them.
        let first = match self.start {
            Start::Resume { .. } => self.router.resume(now),
            Start::Fresh => {
                self.release().await;
                self.router.start(now)
            }
            Start::Late => {
                self.release().await;
                self.router.start_yielding(now)
            }
        };
        self.perform(first).await;
        self.publish(Role::Initialize);
        match self.start {
            Start::Resume { last_advert } => info!(
                interface = self.config.interface,
                vrid = self.config.vrid,
                priority = self.router.priority(),
                primary = %self.primary,
                silent_ms = handoff::since_boot().saturating_sub(last_advert).as_millis() as u64,
                "vrrp: MASTER resumed, the addresses kept; advertising again after the restart"
            ),
            _ => info!(
                interface = self.config.interface,
                vrid = self.config.vrid,
                priority = self.router.priority(),
                primary = %self.primary,
                "vrrp: BACKUP, waiting {:?} for a master",
                self.router.master_down_interval()
            ),
        }
        let mut buf = vec![0u8; 2048];
        let exit = loop {
            let before = self.router.role();
            let deadline = self
                .router
                .deadline()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let actions = tokio::select! {
                // Dropped unasked: the daemon is going; hand over as a real stop does.
                exit = &mut stop => break exit.unwrap_or(Exit::HandOver),
                received = self.socket.recv(&mut buf) => match received {
                    Ok(n) => self.receive(&buf[..n]),
                    Err(e) => {
                        warn!("vrrp: receiving: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Vec::new()
                    }
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.router.on_timer(std::time::Instant::now())
                }
                Ok(()) = faults.changed() => {
                    let now_faults = faults.borrow_and_update().clone();
                    let priority = self.config.effective_priority(&now_faults);
                    if priority != self.router.priority() {
                        warn!(?now_faults, priority, "vrrp: tracked state changed the priority");
                    }
                    self.lock().faults = now_faults;
                    self.router.set_priority(std::time::Instant::now(), priority)
                }
            };
            self.perform(actions).await;
            self.publish(before);
        };
        let before = self.router.role();
        match exit {
            Exit::Restart(note) if before == Role::Master => self.step_aside(&note).await,
            _ => {
                let last = self.router.shutdown();
                self.perform(last).await;
                info!("vrrp: stopped");
            }
        }
        self.publish(before);
    }

    /// Ends a MASTER for a restart, keeping the addresses. The note goes first,
    /// stamped before the final advertisement, so that the age the next agent reads
    /// never understates how long the backup has waited; then that advertisement, at
    /// our priority. Without a note the next agent would start as BACKUP and drop the
    /// addresses anyway, so then we hand over as a real stop does.
    async fn step_aside(&mut self, note: &Path) {
        if let Err(e) = handoff::write(note, &Note::now(&self.config)) {
            warn!(
                path = %note.display(),
                "vrrp: cannot leave the next agent a note ({e}); handing over instead"
            );
            let last = self.router.shutdown();
            self.perform(last).await;
            return;
        }
        let last = self.router.suspend();
        self.perform(last).await;
        info!(
            window = ?handoff::resume_window(self.config.interval()),
            "vrrp: stepped aside for a restart, keeping the addresses; the next agent \
             resumes as MASTER if it starts within the window, or the peer takes over"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VrrpStatus> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reject(&self, why: Rejection, from: Option<Ipv4Addr>) -> Vec<Action> {
        let mut view = self.lock();
        let count = view.rejected.entry(why.label().to_owned()).or_default();
        *count += 1;
        if *count == 1 {
            warn!(
                reason = why.label(),
                ?from,
                "vrrp: refused a packet (first of its kind)"
            );
        } else {
            debug!(reason = why.label(), ?from, "vrrp: refused a packet");
        }
        Vec::new()
    }

    /// Checks a received packet fully, then hands it to the state machine.
    fn receive(&mut self, packet: &[u8]) -> Vec<Action> {
        let (ip, message) = match split_ipv4(packet) {
            Ok(parts) => parts,
            Err(why) => return self.reject(why, None),
        };
        if ip.source == self.primary {
            return Vec::new();
        }
        let advert = match Advertisement::decode(&ip, message) {
            Ok(advert) => advert,
            Err(why) => return self.reject(why, Some(ip.source)),
        };
        if advert.vrid != self.config.vrid {
            return self.reject(Rejection::Vrid, Some(ip.source));
        }
        let on_link = net::interface(&self.config.interface)
            .ok()
            .flatten()
            .is_some_and(|i| i.networks.iter().any(|n| n.contains(&ip.source)));
        if !on_link {
            return self.reject(Rejection::SourceNotOnLink, Some(ip.source));
        }
        let theirs: BTreeSet<&Ipv4Addr> = advert.addresses.iter().collect();
        let ours: BTreeSet<&Ipv4Addr> = self.advertised.iter().collect();
        if theirs != ours {
            return self.reject(Rejection::AddressList, Some(ip.source));
        }
        self.lock().adverts_received += 1;
        self.router
            .on_advertisement(std::time::Instant::now(), ip.source, &advert)
    }

    async fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Advertise(priority) => self.advertise(priority),
                Action::TakeAddresses => self.take().await,
                Action::ReleaseAddresses => self.release().await,
            }
        }
    }

    fn advertise(&mut self, priority: u8) {
        let advert = Advertisement {
            vrid: self.config.vrid,
            priority,
            interval_cs: (self.config.advert_interval_ms / 10) as u16,
            addresses: self.advertised.clone(),
        };
        match self.socket.send(&advert.encode(self.primary)) {
            Ok(()) => self.lock().adverts_sent += 1,
            Err(e) => debug!("vrrp: sending an advertisement: {e}"),
        }
    }

    /// Every moving address with its interface as it is now; a missing interface is
    /// logged and skipped.
    fn links(&self) -> Vec<(Interface, String, Ipv4Net)> {
        let mut links = Vec::new();
        for (dev, address) in self.config.addresses() {
            match net::interface(&dev) {
                Ok(Some(link)) => links.push((link, dev, address)),
                Ok(None) => warn!("vrrp: {dev} is gone; {address} left alone"),
                Err(e) => warn!("vrrp: {dev}: {e}"),
            }
        }
        links
    }

    /// Adds every address, then announces each on its interface.
    async fn take(&mut self) {
        let started = std::time::Instant::now();
        let links = self.links();
        for (link, dev, address) in &links {
            if let Err(e) = self.addresses.add(link.index, *address).await {
                warn!("vrrp: adding {address} to {dev}: {e}");
            }
        }
        for (link, dev, address) in &links {
            // A few copies: one lost frame must not strand a neighbour.
            for _ in 0..3 {
                if let Err(e) = self.announcer.announce(link, address.addr()) {
                    warn!("vrrp: gratuitous ARP for {address} on {dev}: {e}");
                    break;
                }
            }
        }
        info!(
            addresses = links.len(),
            "vrrp: addresses taken and announced in {:?}",
            started.elapsed()
        );
    }

    async fn release(&mut self) {
        for (link, dev, address) in self.links() {
            if let Err(e) = self.addresses.remove(link.index, address).await {
                warn!("vrrp: removing {address} from {dev}: {e}");
            }
        }
    }

    /// Copies the router's state to the view; logs and counts a change of role.
    fn publish(&self, before: Role) {
        let role = self.router.role();
        let mut view = self.lock();
        view.role = role;
        view.priority = self.router.priority();
        view.master = self.router.master();
        view.last_takeover = self.router.last_takeover();
        if role != before || view.role_since.is_none() {
            view.role_since = Some(std::time::Instant::now());
            *view.transitions.entry(role).or_default() += 1;
            if role != before {
                info!(
                    from = before.label(),
                    to = role.label(),
                    priority = view.priority,
                    master = ?view.master,
                    because = ?view.last_takeover.filter(|_| role == Role::Master),
                    "vrrp: {}",
                    role.label().to_uppercase()
                );
            }
        }
    }
}
