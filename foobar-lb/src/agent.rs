//! The agent: owns the data plane, keeps it equal to the desired state, and answers
//! the control API. Everything here is synchronous; the daemon serialises calls.
//!
//! The running VIPs start as the configuration file says; API changes edit them in
//! place (as HAProxy's runtime API does) until the next reload, which makes the file
//! the truth again. They outlive a restart through the state file ([`crate::persist`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

use foobar_lb_common::{
    ACL_ALLOW, AclRule, NEXT_HOP_VALID, Reason, TrafficStats, reason::xdp_action,
};
use ipnet::IpNet;
use tracing::{error, info, warn};

use crate::{
    api::{
        AclRuleStatus, ApiError, BackendStatus, Changed, Count, ErrorKind, Explanation,
        InterfaceStatus, Reply, Request, Stats, Status, Traffic, TrafficCount, VipStatus,
    },
    bgp::{self, BgpConfig, BgpView},
    config::{Config, ConfigError},
    connections::Connections,
    dataplane::{Attached, Dataplane, DataplaneError, LoadOptions},
    edge::Action,
    health::{BackendHealth, CheckFailure, CheckResult, HealthChanges, HealthCheck, OnDown},
    persist::{self, RuntimeState, StateFile},
    pin,
    reconcile::{AppliedVip, ApplyError, ApplyReport, Balancer, Environment},
    state::{DesiredState, StateError, VipSpec, endpoint, socket_of},
    topology::Topology,
    vrrp::{VrrpConfig, VrrpView},
};

/// How the agent starts.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The configuration file.
    pub config: PathBuf,
    /// Where maps and links are pinned; `None` runs unpinned (the data plane stops
    /// with the agent).
    pub pin_dir: Option<PathBuf>,
    /// Let the program emit its debug log lines (drained by the daemon).
    pub debug_log: bool,
    /// Where changes made through the API are kept for the next start (see
    /// [`crate::persist`]); `None` keeps none: every start is from the file.
    pub state_file: Option<PathBuf>,
}

/// What happens to the data plane when the agent exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Keep forwarding with the pinned program and maps; the next agent takes over. A
    /// restart: a VRRP MASTER keeps its addresses and the next agent resumes as MASTER.
    #[default]
    Keep,
    /// Detach from every interface and remove the pins. A real stop: a VRRP MASTER
    /// hands its addresses over (priority 0).
    Detach,
}

impl OnExit {
    /// Whether exiting so is a restart: the data plane forwards from the pins until
    /// the next agent comes, so the VRRP router keeps the VIPs for it too (see
    /// [`crate::vrrp::handoff`]). Unpinned, nothing forwards: that is a stop.
    pub fn is_restart(self, pinned: bool) -> bool {
        self == OnExit::Keep && pinned
    }
}

/// Why the agent could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration file was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data plane could not be loaded, attached or written.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The VIPs could not be applied.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A configured interface is unusable.
    #[error("dataplane.interfaces: {interface}: {message}")]
    Interface {
        /// The interface.
        interface: String,
        /// What is wrong.
        message: String,
    },
    /// The kernel's links, routes and neighbours could not be read.
    #[error("reading the routing tables over netlink: {0}")]
    Topology(String),
    /// A reload tried to change what only a restart can.
    #[error("{field}: changing it needs a restart of the agent; nothing was changed")]
    NeedsRestart {
        /// The field.
        field: &'static str,
    },
}

/// Whose counters: a VIP id or a backend id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Subject {
    Vip(u32),
    Backend(u32),
}

/// Counters at one instant.
type Snapshot = BTreeMap<Subject, TrafficStats>;

/// Packets/s, bits/s and new flows/s.
#[derive(Clone, Copy, Default)]
struct Rates {
    packets: f64,
    bits: f64,
    new_flows: f64,
}

/// Counter snapshots for rates.
#[derive(Default)]
struct RateMeter {
    last: Option<(Instant, Snapshot)>,
    rates: BTreeMap<Subject, Rates>,
}

/// A backend of a VIP, by VIP name and backend address.
pub type BackendKey = (String, SocketAddr);

/// What failover tracks, from one look at the interfaces and the running VIPs: VRRP
/// turns it into faults (a lower priority), BGP into what to announce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracked {
    /// Why the data plane does not serve everywhere it should, as the kernel reports
    /// the configured interfaces: one missing, down, or not running this agent's
    /// program.
    pub dataplane: Vec<String>,
    /// Each VIP address with its VIPs: the name, and whether it has a usable backend
    /// (up, enabled, weighted).
    pub addresses: BTreeMap<IpAddr, Vec<(String, bool)>>,
    /// The addresses with a health-checked VIP of which a backend has had no check
    /// result yet, with those VIPs' names: BGP does not start announcing them (see
    /// [`bgp::announce::awaiting_first_checks`]). VRRP ignores it.
    pub awaiting_checks: BTreeMap<IpAddr, Vec<String>>,
}

/// The running agent.
pub struct Agent {
    balancer: Balancer,
    config_path: PathBuf,
    config: Config,
    desired: DesiredState,
    health: BTreeMap<BackendKey, BackendHealth>,
    health_changes: HealthChanges,
    disabled: BTreeSet<BackendKey>,
    state_file: Option<StateFile>,
    interfaces: Vec<String>,
    started: Instant,
    rates: RateMeter,
    vrrp: Option<VrrpView>,
    bgp: Option<BgpView>,
    topology: Topology,
    connections: Connections,
}

impl Agent {
    /// Loads the configuration and the data plane (taking over a pinned one), applies
    /// the VIPs, then attaches: a program never sees a half-written state.
    pub fn start(options: &AgentOptions) -> Result<Agent, AgentError> {
        let config = Config::load(&options.config)?;
        warn_if_full_nat_ports_are_the_kernels(&config);
        let dataplane = Dataplane::load(&LoadOptions {
            flow_capacity: config.dataplane.flow_capacity,
            pin_dir: options.pin_dir.clone(),
            debug_log: options.debug_log,
        })?;
        let resumed = dataplane.resumed();
        let balancer = if resumed {
            Balancer::adopt(dataplane)?
        } else {
            Balancer::new(dataplane)
        };
        // Changes made through the API before a restart come back, unless the file
        // was edited since: then the file wins (see `persist`).
        let state_file = options
            .state_file
            .clone()
            .map(|path| StateFile::new(path, &options.config));
        let from_file = config.desired_state();
        let restored = state_file.as_ref().and_then(|f| f.restore(&from_file));
        let was_restored = restored.is_some();
        let runtime = restored.unwrap_or_else(|| RuntimeState {
            desired: from_file,
            disabled: BTreeSet::new(),
        });
        let mut agent = Agent {
            balancer,
            config_path: options.config.clone(),
            config: config.clone(),
            desired: runtime.desired,
            health: BTreeMap::new(),
            health_changes: HealthChanges::default(),
            disabled: runtime.disabled,
            state_file,
            interfaces: config.dataplane.interface_names(),
            started: Instant::now(),
            rates: RateMeter::default(),
            vrrp: None,
            bgp: None,
            topology: Topology::read_blocking().map_err(|e| AgentError::Topology(e.to_string()))?,
            connections: Connections::default(),
        };
        // One plan for the VIPs, the interfaces and the next hops, written before the
        // program is attached (or, when it was forwarding already from pins, as one
        // change that writes only what differs).
        let env = agent.environment()?;
        agent.interfaces.clear();
        agent.balancer.stage_environment(env);
        let report = agent.apply_initial(was_restored)?;
        info!(resumed, ?report, "VIPs applied");
        let (attached, _) = agent.attach_all(&config)?;
        info!(interfaces = ?attached, "attached");
        // Links an earlier agent pinned for interfaces no longer configured.
        if let Some(dir) = agent.balancer.dataplane().pin_dir().map(PathBuf::from) {
            for stale in pin::pinned_interfaces(&dir) {
                if !agent.interfaces.contains(&stale) {
                    agent.balancer.dataplane().detach_pinned(&stale)?;
                    info!(interface = stale, "detached: no longer configured");
                }
            }
        }
        // After an upgrade of the maps' layout, every link now runs this program.
        agent.balancer.dataplane().finish_migration()?;
        // Tracking reads which program each interface runs from the topology, read
        // before the program was attached; attaching through a BPF link tells netlink
        // nothing, so read it again now.
        agent.refresh_topology();
        Ok(agent)
    }

    /// Applies the state the agent starts with. A restored runtime state the data
    /// plane refuses (nothing is written then) gives way to the file's: the state
    /// file never keeps the agent from starting.
    fn apply_initial(&mut self, restored: bool) -> Result<ApplyReport, AgentError> {
        match self.balancer.apply(&self.effective(&self.desired)) {
            Err(ApplyError::Invalid(e)) if restored => {
                warn!(
                    "the saved runtime state is refused ({e}); starting from the configuration file"
                );
                if let Some(file) = &self.state_file {
                    file.set_aside();
                }
                self.desired = self.config.desired_state();
                self.disabled.clear();
                Ok(self.balancer.apply(&self.desired)?)
            }
            applied => Ok(applied?),
        }
    }

    /// The count of backends' up/down changes, for a cache of what `status` shows.
    pub fn health_changes(&self) -> HealthChanges {
        self.health_changes.clone()
    }

    /// Where the metrics listener should be, if anywhere.
    pub fn metrics_listen(&self) -> Option<SocketAddr> {
        self.config.metrics.listen
    }

    /// The failover configuration, if this balancer has a peer.
    pub fn vrrp_config(&self) -> Option<&VrrpConfig> {
        self.config.vrrp.as_ref()
    }

    /// Where the running VRRP router publishes its state, for `status` and `/metrics`.
    pub fn show_vrrp(&mut self, view: VrrpView) {
        self.vrrp = Some(view);
    }

    /// The BGP announcements, if this balancer has routers to announce to.
    pub fn bgp_config(&self) -> Option<&BgpConfig> {
        self.config.bgp.as_ref()
    }

    /// Where the running BGP speaker publishes its state, for `status` and `/metrics`.
    pub fn show_bgp(&mut self, view: BgpView) {
        self.bgp = Some(view);
    }

    /// What makes this balancer a worse MASTER than its peer right now: an interface
    /// of the data plane missing, down or not attached, or a VIP the router moves
    /// without a usable backend (all down, disabled or drained).
    pub fn track_faults(&mut self) -> Vec<String> {
        self.tracking().0
    }

    /// What tracking finds now, from one look: the VRRP router's faults (see
    /// [`Agent::track_faults`]), and what the BGP speaker should announce (`None`
    /// without `[bgp]`; see [`bgp::announce`]).
    pub fn tracking(&mut self) -> (Vec<String>, Option<bgp::Wanted>) {
        if self.config.vrrp.is_none() && self.config.bgp.is_none() {
            return (Vec::new(), None);
        }
        let tracked = self.tracked();
        let (vrrp_config, bgp_config) = (self.config.vrrp.as_ref(), self.config.bgp.as_ref());
        let faults = vrrp_config.map_or_else(Vec::new, |router| {
            let mut faults = tracked.dataplane.clone();
            for (address, vips) in &tracked.addresses {
                let moved = matches!(address, IpAddr::V4(a) if router.vips.contains(a));
                for (name, usable) in vips {
                    if moved && !usable {
                        faults.push(format!("vip {name} has no usable backend"));
                    }
                }
            }
            faults
        });
        let wanted = bgp_config.map(|announcer| {
            let candidates = announcer.candidates(&self.desired.vips, vrrp_config);
            bgp::decide(&candidates, &tracked)
        });
        (faults, wanted)
    }

    /// Whether the data plane serves on every configured interface, as the kernel
    /// reports them (`interface_states`: a link removed or down, or running another
    /// program, is a fault), which VIPs of each address have a usable backend
    /// (not all down, disabled or drained), and which still wait for first checks.
    pub fn tracked(&mut self) -> Tracked {
        let mut tracked = Tracked::default();
        for state in self.interface_states() {
            let name = &state.name;
            let fault = if !self.topology.links.values().any(|l| l.name == *name) {
                format!("interface {name} is missing")
            } else if !state.running {
                format!("interface {name} is down")
            } else if !state.attached {
                format!("interface {name} does not run the balancer's program")
            } else {
                continue;
            };
            tracked.dataplane.push(fault);
        }
        tracked.awaiting_checks =
            bgp::announce::awaiting_first_checks(&self.desired.vips, &self.health);
        for vip in self.effective(&self.desired).vips {
            let usable = vip.backends.iter().any(|b| b.weight > 0);
            tracked
                .addresses
                .entry(vip.address)
                .or_default()
                .push((vip.name, usable));
        }
        tracked
    }

    /// The reader of the program's log records, for the daemon to drain.
    pub fn ebpf_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.balancer.dataplane().logger()
    }

    /// Attaches to the configured interfaces not attached yet; on failure detaches the
    /// ones attached by this call and changes nothing. Returns (attached, detached).
    fn attach_all(&mut self, config: &Config) -> Result<(Vec<String>, Vec<String>), AgentError> {
        let mode = config.dataplane.xdp_mode.mode();
        let mut attached = Vec::new();
        for interface in &config.dataplane.interface_names() {
            if self.interfaces.contains(interface) {
                continue;
            }
            let result = ifindex(interface).and_then(|index| {
                let dp = self.balancer.dataplane();
                dp.add_tx_port(index)?;
                Ok(dp.attach_pinned(interface, mode)?)
            });
            match result {
                Ok(how) => {
                    accept_local_sources(interface);
                    if how == Attached::Replaced {
                        info!(interface, "took over the pinned link: no forwarding gap");
                    }
                    attached.push(interface.clone());
                    self.interfaces.push(interface.clone());
                }
                Err(e) => {
                    for done in &attached {
                        let _ = self.balancer.dataplane().detach_pinned(done);
                        self.interfaces.retain(|i| i != done);
                    }
                    return Err(e);
                }
            }
        }
        let mut detached = Vec::new();
        for interface in self.interfaces.clone() {
            if !config.dataplane.interface_names().contains(&interface) {
                self.balancer.dataplane().detach_pinned(&interface)?;
                self.interfaces.retain(|i| *i != interface);
                detached.push(interface);
            }
        }
        Ok((attached, detached))
    }

    /// Re-reads the configuration file and applies it whole, or changes nothing.
    pub fn reload(&mut self) -> Result<Changed, AgentError> {
        let config = Config::load(&self.config_path)?;
        if config.dataplane.flow_capacity != self.config.dataplane.flow_capacity {
            return Err(AgentError::NeedsRestart {
                field: "dataplane.flow_capacity",
            });
        }
        if config.metrics != self.config.metrics {
            return Err(AgentError::NeedsRestart {
                field: "metrics.listen",
            });
        }
        if config.vrrp != self.config.vrrp {
            return Err(AgentError::NeedsRestart { field: "vrrp" });
        }
        if config.bgp != self.config.bgp {
            return Err(AgentError::NeedsRestart { field: "bgp" });
        }
        let desired = config.desired_state();
        // Validate before touching interfaces; apply validates again, cheaply.
        desired.plan().map_err(|source| ConfigError::Invalid {
            path: self.config_path.clone(),
            source,
        })?;
        let (attached, detached) = self.attach_all(&config)?;
        if !attached.is_empty() {
            // As at start: tracking sees the new interfaces run the program.
            self.refresh_topology();
        }
        let previous = std::mem::replace(&mut self.config, config.clone());
        if let Err(e) = self.write_environment() {
            self.config = previous;
            return Err(e);
        }
        let report = self.balancer.apply(&self.effective(&desired))?;
        self.config = config;
        self.desired = desired;
        self.forget_gone_backends();
        info!(?report, ?attached, ?detached, "reloaded");
        // The file is the truth again: the state file keeps only what it cannot say
        // (disables), against the file as read now.
        if let Some(file) = &mut self.state_file {
            file.config_reloaded();
        }
        let mut reloaded = changed(report, attached, detached);
        reloaded.not_persisted = self.persist();
        Ok(reloaded)
    }

    /// Ends the agent: with [`OnExit::Detach`] the data plane goes too.
    pub fn shutdown(mut self, on_exit: OnExit) {
        let dir = self.balancer.dataplane().pin_dir().map(PathBuf::from);
        match (on_exit, dir) {
            (OnExit::Keep, Some(dir)) => {
                info!(pin_dir = %dir.display(), "exiting; the data plane keeps forwarding")
            }
            (OnExit::Detach, Some(dir)) => match pin::remove_all(&dir) {
                Ok(()) => info!(pin_dir = %dir.display(), "detached and unpinned"),
                Err(e) => warn!(pin_dir = %dir.display(), "unpinning: {e}"),
            },
            (_, None) => info!("exiting; unpinned data plane stops with the agent"),
        }
    }

    /// Answers one control request.
    pub fn handle(&mut self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::Status => self.status().map(Reply::Status),
            Request::Stats => self.stats().map(Reply::Stats),
            Request::Explain {
                vip,
                client,
                client_port,
            } => {
                let i = self.find_vip(&vip)?;
                let spec = &self.desired.vips[i];
                let ep = endpoint(spec.address, spec.port, spec.protocol);
                let scheduler = spec.scheduler;
                let backend = self
                    .balancer
                    .explain(&ep, client, client_port)
                    .map_err(dataplane_error)?
                    .map(|b| {
                        let (address, port, _) = socket_of(&b);
                        SocketAddr::new(address, port)
                    });
                Ok(Reply::Explained(Explanation {
                    vip,
                    backend,
                    scheduler,
                }))
            }
            Request::Reload => self.reload().map(Reply::Changed).map_err(|e| {
                let field = match &e {
                    AgentError::Config(c) => c.field().map(str::to_owned),
                    AgentError::NeedsRestart { field } => Some((*field).to_owned()),
                    _ => None,
                };
                let message = match (&e, &field) {
                    (AgentError::Config(ConfigError::Invalid { path, source }), _) => {
                        format!("{}: {}", path.display(), source.message)
                    }
                    _ => e.to_string(),
                };
                ApiError::new(ErrorKind::Invalid, field, message)
            }),
            Request::VipAdd { vip } => self.change(|state| {
                state.vips.push(vip);
                Ok(())
            }),
            Request::VipRemove { vip } => {
                let i = self.find_vip(&vip)?;
                self.change(|state| {
                    state.vips.remove(i);
                    Ok(())
                })
            }
            Request::BackendAdd { vip, backend } => {
                let i = self.find_vip(&vip)?;
                let at = SocketAddr::new(backend.address, backend.port);
                if self.find_backend(i, at).is_ok() {
                    return Err(ApiError::new(
                        ErrorKind::Invalid,
                        Some("backend".into()),
                        format!(
                            "{at} is already a backend of {vip}; change its weight with `foobar-lb backend weight`"
                        ),
                    ));
                }
                self.change(|state| {
                    state.vips[i].backends.push(backend);
                    Ok(())
                })
            }
            Request::BackendRemove { vip, backend } => {
                let i = self.find_vip(&vip)?;
                let b = self.find_backend(i, backend)?;
                self.change(|state| {
                    state.vips[i].backends.remove(b);
                    Ok(())
                })
            }
            Request::AclAdd {
                vip,
                action,
                prefix,
            } => {
                let i = vip.as_deref().map(|v| self.find_vip(v)).transpose()?;
                self.change(|state| {
                    let acl = match i {
                        Some(i) => &mut state.vips[i].acl,
                        None => &mut state.edge.acl,
                    };
                    acl.allow.retain(|n| *n != prefix);
                    acl.deny.retain(|n| *n != prefix);
                    acl.list_mut(action).push(prefix);
                    Ok(())
                })
            }
            Request::AclRemove { vip, prefix } => {
                let i = vip.as_deref().map(|v| self.find_vip(v)).transpose()?;
                self.change(|state| {
                    let (acl, list) = match i {
                        Some(i) => {
                            let vip = &mut state.vips[i];
                            (&mut vip.acl, vip.name.clone())
                        }
                        None => (&mut state.edge.acl, "the global list".to_owned()),
                    };
                    let before = acl.rules().count();
                    acl.allow.retain(|n| *n != prefix);
                    acl.deny.retain(|n| *n != prefix);
                    if acl.rules().count() == before {
                        return Err(ApiError::new(
                            ErrorKind::NotFound,
                            Some("prefix".into()),
                            format!("{prefix} is not in the access list of {list}"),
                        ));
                    }
                    Ok(())
                })
            }
            Request::AclList => self.acl_rules().map(Reply::Acl),
            Request::RunningConfig => Ok(Reply::RunningConfig(Box::new(persist::running_config(
                &self.config_path,
                &self.config,
                &self.runtime(),
            )))),
            Request::BackendDisable { vip, backend } => self.set_disabled(&vip, backend, true),
            Request::BackendEnable { vip, backend } => self.set_disabled(&vip, backend, false),
            Request::BackendSetWeight {
                vip,
                backend,
                weight,
            } => {
                let i = self.find_vip(&vip)?;
                let b = self.find_backend(i, backend)?;
                self.change(|state| {
                    state.vips[i].backends[b].weight = weight;
                    Ok(())
                })
            }
        }
    }

    /// Applies an edited copy of the running state, or refuses it and keeps the old.
    fn change(
        &mut self,
        edit: impl FnOnce(&mut DesiredState) -> Result<(), ApiError>,
    ) -> Result<Reply, ApiError> {
        let mut next = self.desired.clone();
        edit(&mut next)?;
        // Validate what was asked for, not only its effective form (a weight of 300
        // on a down backend is still wrong).
        next.plan()?;
        // The file's start-only sections hold for API changes too (BGP's hash rule).
        self.config.check_desired(&next)?;
        let report = self.balancer.apply(&self.effective(&next))?;
        info!(?report, "changed through the API");
        self.desired = next;
        self.forget_gone_backends();
        let mut done = changed(report, Vec::new(), Vec::new());
        done.not_persisted = self.persist();
        Ok(Reply::Changed(done))
    }

    /// Sets a backend's admin state; the maps follow, or nothing changes.
    fn set_disabled(
        &mut self,
        vip: &str,
        backend: SocketAddr,
        disabled: bool,
    ) -> Result<Reply, ApiError> {
        let i = self.find_vip(vip)?;
        self.find_backend(i, backend)?;
        let key = (self.desired.vips[i].name.clone(), backend);
        let before = self.disabled.clone();
        if disabled {
            self.disabled.insert(key);
        } else {
            self.disabled.remove(&key);
        }
        match self.reapply() {
            Ok(report) => {
                info!(%backend, disabled, "admin state changed");
                let mut done = changed(report, Vec::new(), Vec::new());
                done.not_persisted = self.persist();
                Ok(Reply::Changed(done))
            }
            Err(e) => {
                self.disabled = before;
                Err(e.into())
            }
        }
    }

    /// What the API has changed: the running VIPs and the disabled backends.
    fn runtime(&self) -> RuntimeState {
        RuntimeState {
            desired: self.desired.clone(),
            disabled: self.disabled.clone(),
        }
    }

    /// Writes the runtime state to the state file, after the change is applied (the
    /// data plane never waits for a disk); says why it could not, for the reply.
    fn persist(&self) -> Option<String> {
        let file = self.state_file.as_ref()?;
        match file.record(&self.runtime(), &self.config.desired_state()) {
            Ok(()) => None,
            Err(e) => {
                error!("{e}: the change runs, but a restart of the agent forgets it");
                Some(e.to_string())
            }
        }
    }

    /// Rewrites the maps for the running state under the current health and admin
    /// flags (after one of them changed).
    fn reapply(&mut self) -> Result<ApplyReport, ApplyError> {
        let effective = self.effective(&self.desired);
        self.balancer.apply(&effective)
    }

    /// The state written to the maps: as desired, but backends that are down or
    /// disabled get weight 0 (no new flows; their open flows stay, or are reset).
    fn effective(&self, desired: &DesiredState) -> DesiredState {
        let mut effective = desired.clone();
        for vip in &mut effective.vips {
            for b in &mut vip.backends {
                let key = (vip.name.clone(), SocketAddr::new(b.address, b.port));
                let down = self.health.get(&key).is_some_and(|h| !h.up);
                if down || self.disabled.contains(&key) {
                    b.weight = 0;
                }
            }
        }
        effective
    }

    /// Drops health and admin state of backends no longer configured.
    fn forget_gone_backends(&mut self) {
        let present: BTreeSet<BackendKey> = self.backend_keys().collect();
        self.health.retain(|k, _| present.contains(k));
        self.disabled.retain(|k| present.contains(k));
    }

    fn backend_keys(&self) -> impl Iterator<Item = BackendKey> + '_ {
        self.desired.vips.iter().flat_map(|v| {
            v.backends
                .iter()
                .map(|b| (v.name.clone(), SocketAddr::new(b.address, b.port)))
        })
    }

    /// Every backend to check, with its VIP's check.
    pub fn checks(&self) -> Vec<(BackendKey, HealthCheck)> {
        self.desired
            .vips
            .iter()
            .filter_map(|v| v.health_check.as_ref().map(|c| (v, c)))
            .flat_map(|(v, c)| {
                v.backends.iter().map(move |b| {
                    (
                        (v.name.clone(), SocketAddr::new(b.address, b.port)),
                        c.clone(),
                    )
                })
            })
            .collect()
    }

    /// Records one check result of a backend (checked with `check`); when its state
    /// flips, the schedules are rewritten without it (or with it again). A check this
    /// machine could not run is logged and counted, and changes nothing.
    pub fn record_check(&mut self, key: &BackendKey, check: &HealthCheck, result: CheckResult) {
        // A result for a check that has since changed or gone is stale.
        let Some(vip) = self.desired.vips.iter().find(|v| v.name == key.0) else {
            return;
        };
        if vip.health_check.as_ref() != Some(check) || !self.backend_keys().any(|k| k == *key) {
            return;
        }
        let on_down = vip.on_backend_down;
        let endpoints = Some((
            endpoint(vip.address, vip.port, vip.protocol),
            endpoint(key.1.ip(), key.1.port(), vip.protocol),
        ));
        let health = self.health.entry(key.clone()).or_default();
        let skipped_before = health.skipped_in_a_row;
        let flipped = health.record(&result, check.rise, check.fall);
        // Once per run of skipped checks, not per probe: when descriptors run out,
        // every probe of every backend fails alike.
        match (&result, skipped_before) {
            (Err(CheckFailure::Local(why)), 0) => warn!(
                vip = key.0, backend = %key.1, reason = %why,
                "health check skipped: this machine could not run it; the backend keeps its state"
            ),
            (Err(CheckFailure::Local(_)), _) => {}
            (_, 0) => {}
            (_, skipped) => {
                info!(vip = key.0, backend = %key.1, skipped, "health checks run again")
            }
        }
        let Some(up) = flipped else {
            return;
        };
        self.health_changes.record();
        let why = health.last_error.clone().unwrap_or_default();
        if up {
            info!(vip = key.0, backend = %key.1, "backend up: back in the schedule");
        } else {
            warn!(vip = key.0, backend = %key.1, reason = why, "backend down: out of the schedule");
        }
        match self.reapply() {
            Ok(report) => info!(?report, "applied the health change"),
            Err(e) => error!("applying the health change: {e}"),
        }
        if !up
            && on_down == OnDown::Reset
            && let Some((vip_ep, backend_ep)) = endpoints
        {
            match self.balancer.reset_flows(&vip_ep, &backend_ep) {
                Ok(_) => info!(backend = %key.1, "reset the flows of a down backend"),
                Err(e) => error!("resetting flows of {}: {e}", key.1),
            }
        }
    }

    /// Reads the kernel's tables again now (after attaching, which netlink does not
    /// announce) and takes what changed; keeps the last reading when they cannot be
    /// read, until the daemon's watcher sends the next.
    fn refresh_topology(&mut self) {
        match Topology::read_blocking() {
            Ok(fresh) => self.topology_changed(fresh),
            Err(e) => warn!(
                "reading the interfaces after attaching: {e}; tracking waits for the next change"
            ),
        }
    }

    /// What the kernel's tables say changed: next hops and the client side's routes
    /// and neighbours are written again where they differ.
    pub fn topology_changed(&mut self, topology: Topology) {
        if topology == self.topology {
            return;
        }
        self.topology = topology;
        match self.write_environment() {
            Ok(report) if report != ApplyReport::default() => {
                info!(
                    ?report,
                    "next hops follow the kernel's routes and neighbours"
                )
            }
            Ok(_) => {}
            Err(e) => error!("writing next hops: {e}"),
        }
    }

    /// Writes what the data plane needs besides the VIPs: the interfaces it runs on
    /// (MAC, role), the next hops from the kernel's tables, the flood threshold.
    fn write_environment(&mut self) -> Result<ApplyReport, AgentError> {
        let env = self.environment()?;
        Ok(self.balancer.set_environment(env)?)
    }

    /// The environment of the interfaces attached (their role, from the configuration)
    /// in the current topology.
    fn environment(&self) -> Result<Environment, AgentError> {
        let mut interfaces = Vec::new();
        for entry in &self.config.dataplane.interfaces {
            if self.interfaces.iter().any(|i| i == entry.name()) {
                interfaces.push((ifindex(entry.name())?, entry.role().bits()));
            }
        }
        let dp = &self.config.dataplane;
        let mut env = Environment::new(self.topology.clone(), &interfaces, dp.settings());
        env.ipip_sources = (Some(dp.ipip_source.into()), Some(dp.ipip6_source.into()));
        Ok(env)
    }

    /// Index of a VIP by name or `address:port`.
    fn find_vip(&self, key: &str) -> Result<usize, ApiError> {
        let by_address: Option<SocketAddr> = key.parse().ok();
        self.desired
            .vips
            .iter()
            .position(|v| v.name == key || by_address == Some(SocketAddr::new(v.address, v.port)))
            .ok_or_else(|| {
                let known: Vec<&str> = self.desired.vips.iter().map(|v| v.name.as_str()).collect();
                ApiError::new(
                    ErrorKind::NotFound,
                    Some("vip".into()),
                    format!(
                        "no VIP named {key:?}; known: {}",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })
    }

    fn find_backend(&self, vip: usize, at: SocketAddr) -> Result<usize, ApiError> {
        let spec = &self.desired.vips[vip];
        spec.backends
            .iter()
            .position(|b| SocketAddr::new(b.address, b.port) == at)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::NotFound,
                    Some("backend".into()),
                    format!("{at} is not a backend of {}", spec.name),
                )
            })
    }

    /// Counts the open flows and re-anchors the active connection counts on them.
    pub fn sweep_flows(&mut self) {
        let dp = &self.config.dataplane;
        let (tcp, udp) = (dp.tcp_idle_timeout, dp.udp_idle_timeout);
        self.connections.sweep(&mut self.balancer, tcp, udp);
    }

    /// Plans the least-connections rings again where the counts moved.
    pub fn plan_least_connections(&mut self) {
        let vips = self.balancer.least_connections_vips();
        if !vips.is_empty() {
            self.connections.plan(&mut self.balancer, &vips);
        }
    }

    /// Takes a counter sample; rates are the difference to the previous one.
    pub fn sample(&mut self) {
        let now = Instant::now();
        let mut snapshot = BTreeMap::new();
        let ids: Vec<(u32, Vec<u32>)> = self
            .balancer
            .vips()
            .map(|v| (v.id, v.backend_ids.clone()))
            .collect();
        let dp = self.balancer.dataplane();
        for (vip_id, backend_ids) in ids {
            if let Ok(s) = dp.vip_stats(vip_id) {
                snapshot.insert(Subject::Vip(vip_id), s);
            }
            for id in backend_ids {
                if let Ok(s) = dp.backend_stats(id) {
                    snapshot.insert(Subject::Backend(id), s);
                }
            }
        }
        if let Some((then, last)) = &self.rates.last {
            let dt = now.duration_since(*then).as_secs_f64().max(1e-3);
            self.rates.rates = snapshot
                .iter()
                .map(|(key, s)| {
                    let before = last.get(key).copied().unwrap_or_default();
                    let packets = (s.packets + s.reply_packets)
                        .saturating_sub(before.packets + before.reply_packets);
                    let bytes =
                        (s.bytes + s.reply_bytes).saturating_sub(before.bytes + before.reply_bytes);
                    let flows = s.new_flows.saturating_sub(before.new_flows);
                    (
                        *key,
                        Rates {
                            packets: packets as f64 / dt,
                            bits: bytes as f64 * 8.0 / dt,
                            new_flows: flows as f64 / dt,
                        },
                    )
                })
                .collect();
        }
        self.rates.last = Some((now, snapshot));
    }

    fn traffic(&self, key: Subject, stats: TrafficStats, active_flows: u64) -> Traffic {
        let rates = self.rates.rates.get(&key).copied().unwrap_or_default();
        Traffic {
            packets: stats.packets,
            bytes: stats.bytes,
            new_flows: stats.new_flows,
            reply_packets: stats.reply_packets,
            reply_bytes: stats.reply_bytes,
            active_flows,
            packets_per_second: rates.packets,
            bits_per_second: rates.bits,
            new_flows_per_second: rates.new_flows,
        }
    }

    /// Each running VIP with what was written for it.
    fn running(&self) -> Vec<(VipSpec, AppliedVip)> {
        self.desired
            .vips
            .iter()
            .map(|spec| {
                let ep = endpoint(spec.address, spec.port, spec.protocol);
                let applied = self.balancer.vip(&ep).expect("running VIPs are applied");
                (spec.clone(), applied.clone())
            })
            .collect()
    }

    /// Everything `status` shows; the flow table is never walked (active connections
    /// are the counters' opened minus closed, see [`Connections`]).
    fn status(&mut self) -> Result<Status, ApiError> {
        let mut total_flows = 0;
        let mut vips = Vec::new();
        for (spec, applied) in self.running() {
            let dp = self.balancer.dataplane();
            let vip_stats = dp.vip_stats(applied.id).map_err(dataplane_error)?;
            let mut backends = Vec::new();
            let mut vip_active = 0;
            for b in &spec.backends {
                let bep = endpoint(b.address, b.port, spec.protocol);
                let id = applied.backend_id(&bep).expect("applied");
                let stats = self
                    .balancer
                    .dataplane()
                    .backend_stats(id)
                    .map_err(dataplane_error)?;
                let slots = applied.schedule.iter().filter(|&&s| s == id).count();
                let active = self.connections.active(&self.balancer, id, &stats);
                vip_active += active;
                let key = (spec.name.clone(), SocketAddr::new(b.address, b.port));
                let health = self.health.get(&key).cloned().unwrap_or_default();
                let disabled = self.disabled.contains(&key);
                let checked = spec.health_check.is_some();
                let state = if disabled {
                    "disabled"
                } else if checked && !health.up {
                    "down"
                } else if b.weight == 0 {
                    "draining"
                } else {
                    "active"
                };
                backends.push(BackendStatus {
                    address: SocketAddr::new(b.address, b.port),
                    weight: b.weight,
                    state: state.into(),
                    health: if !checked {
                        "unchecked".into()
                    } else if health.up {
                        "up".into()
                    } else {
                        "down".into()
                    },
                    last_check: match health.last_ok {
                        None => None,
                        Some(true) => Some("ok".into()),
                        Some(false) => health.last_error.clone(),
                    },
                    check_latency_ms: health.last_latency_ms,
                    health_transitions: health.transitions,
                    checks_skipped: health.skipped,
                    share: if applied.schedule.is_empty() {
                        0.0
                    } else {
                        slots as f64 / applied.schedule.len() as f64
                    },
                    next_hop: self.next_hop_of(id),
                    traffic: self.traffic(Subject::Backend(id), stats, active),
                });
            }
            vips.push(VipStatus {
                name: spec.name.clone(),
                address: SocketAddr::new(spec.address, spec.port),
                protocol: spec.protocol,
                scheduler: spec.scheduler,
                schedule_len: applied.schedule.len(),
                traffic: self.traffic(Subject::Vip(applied.id), vip_stats, vip_active),
                backends,
            });
            total_flows += vip_active;
        }
        let dataplane = self.interface_states();
        let dp = self.balancer.dataplane();
        Ok(Status {
            config: self.config_path.clone(),
            interfaces: self.interfaces.clone(),
            xdp_mode: format!("{:?}", self.config.dataplane.xdp_mode).to_lowercase(),
            pin_dir: dp.pin_dir().map(PathBuf::from),
            resumed: dp.resumed(),
            uptime_seconds: self.started.elapsed().as_secs(),
            flows: total_flows,
            flow_capacity: self.config.dataplane.flow_capacity,
            changed_since_reload: self.desired != self.config.desired_state(),
            vips,
            vrrp: self
                .vrrp
                .as_ref()
                .map(|v| Box::new(v.lock().unwrap_or_else(|p| p.into_inner()).snapshot())),
            bgp: self
                .bgp
                .as_ref()
                .map(|v| Box::new(bgp::status::lock(v).clone())),
            dataplane,
        })
    }

    /// Each configured interface as the kernel last reported it (the topology is
    /// read again on every link change): running, and running this agent's program.
    fn interface_states(&mut self) -> Vec<InterfaceStatus> {
        let ours = self.balancer.dataplane().program_id();
        self.config
            .dataplane
            .interface_names()
            .into_iter()
            .map(|name| {
                let link = self.topology.links.values().find(|l| l.name == name);
                InterfaceStatus {
                    running: link.is_some_and(|l| l.running),
                    attached: link.is_some_and(|l| l.xdp_program == ours),
                    name,
                }
            })
            .collect()
    }

    fn stats(&mut self) -> Result<Stats, ApiError> {
        let counters = self
            .balancer
            .dataplane()
            .counters()
            .map_err(dataplane_error)?;
        let count = |r: &Reason| Count {
            name: r.name().into(),
            value: counters.get(*r),
        };
        let actions = [
            ("drop", xdp_action::DROP),
            ("pass", xdp_action::PASS),
            ("tx", xdp_action::TX),
            ("redirect", xdp_action::REDIRECT),
        ]
        .iter()
        .map(|&(name, action)| Count {
            name: name.into(),
            value: Reason::ALL
                .iter()
                .filter(|r| r.action() == Some(action))
                .map(|r| counters.get(*r))
                .sum(),
        })
        .collect();
        let mut vips = Vec::new();
        let mut backends = Vec::new();
        for (spec, applied) in self.running() {
            let dp = self.balancer.dataplane();
            let s = dp.vip_stats(applied.id).map_err(dataplane_error)?;
            vips.push(traffic_count(spec.name.clone(), s));
            for (b, &id) in applied.plan.backends.iter().zip(&applied.backend_ids) {
                let s = dp.backend_stats(id).map_err(dataplane_error)?;
                let (address, port, _) = socket_of(b);
                backends.push(traffic_count(
                    format!("{}/{}", spec.name, SocketAddr::new(address, port)),
                    s,
                ));
            }
        }
        Ok(Stats {
            actions,
            outcomes: Reason::ALL
                .iter()
                .filter(|r| r.action().is_some())
                .map(count)
                .collect(),
            events: Reason::ALL
                .iter()
                .filter(|r| r.action().is_none())
                .map(count)
                .collect(),
            vips,
            backends,
            acl: self.acl_rules()?,
        })
    }

    /// The running access-list rules, global first, with their counters.
    fn acl_rules(&mut self) -> Result<Vec<AclRuleStatus>, ApiError> {
        let names: BTreeMap<u32, String> = self
            .running()
            .into_iter()
            .map(|(spec, applied)| (1 + applied.id, spec.name))
            .collect();
        let rules: Vec<((u32, IpNet), AclRule)> = self
            .balancer
            .state()
            .acls
            .iter()
            .map(|(k, r)| (*k, *r))
            .collect();
        let mut out = Vec::with_capacity(rules.len());
        for ((scope, prefix), rule) in rules {
            let list = match scope {
                0 => "global".to_owned(),
                s => names
                    .get(&s)
                    .cloned()
                    .unwrap_or_else(|| format!("vip {}", s - 1)),
            };
            let action = if rule.action == ACL_ALLOW {
                Action::Allow
            } else {
                Action::Deny
            };
            let packets = self
                .balancer
                .dataplane()
                .acl_stats(rule.id)
                .map_err(dataplane_error)?;
            out.push(AclRuleStatus {
                list,
                action,
                prefix,
                packets,
            });
        }
        Ok(out)
    }
}

impl Agent {
    /// A backend slot's next hop as written, for people.
    fn next_hop_of(&self, id: u32) -> Option<String> {
        let hop = self.balancer.state().backends.get(&id)?.next_hop;
        if hop.flags & NEXT_HOP_VALID == 0 {
            return None;
        }
        let interface = self
            .topology
            .links
            .get(&hop.ifindex)
            .map_or_else(|| hop.ifindex.to_string(), |l| l.name.clone());
        let mac: Vec<String> = hop.dmac.iter().map(|b| format!("{b:02x}")).collect();
        Some(format!("{interface} {}", mac.join(":")))
    }
}

fn traffic_count(name: String, s: TrafficStats) -> TrafficCount {
    TrafficCount {
        name,
        packets: s.packets,
        bytes: s.bytes,
        new_flows: s.new_flows,
        reply_packets: s.reply_packets,
        reply_bytes: s.reply_bytes,
    }
}

fn changed(maps: ApplyReport, attached: Vec<String>, detached: Vec<String>) -> Changed {
    Changed {
        maps,
        interfaces_attached: attached,
        interfaces_detached: detached,
        not_persisted: None,
    }
}

impl From<StateError> for ApiError {
    fn from(s: StateError) -> Self {
        ApiError::new(ErrorKind::Invalid, Some(s.field), s.message)
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Invalid(s) => s.into(),
            ApplyError::Dataplane(d) => dataplane_error(d),
            ApplyError::Injected => {
                ApiError::new(ErrorKind::Dataplane, None, "injected failure".to_owned())
            }
        }
    }
}

fn dataplane_error(e: DataplaneError) -> ApiError {
    ApiError::new(ErrorKind::Dataplane, None, e.to_string())
}

/// Lets the kernel forward packets whose source is one of its own addresses when they
/// arrive on `interface`. The program hands the kernel rewritten packets whose next hop
/// is not resolved yet (`pass_no_neighbour`) so that it resolves it; a reply rewritten
/// to come from a VIP this machine holds would otherwise be dropped as a martian, and
/// the neighbour never resolved. A new VRRP master meets exactly that: its clients
/// learnt its address from gratuitous ARP and never asked it anything.
fn accept_local_sources(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    if let Err(e) = std::fs::write(&path, "1") {
        warn!("{path}: {e}; replies to unresolved clients may be dropped");
    }
}

/// The index of an interface in this network namespace.
fn ifindex(name: &str) -> Result<u32, AgentError> {
    let bad = |message: String| AgentError::Interface {
        interface: name.to_owned(),
        message,
    };
    let c_name = CString::new(name).map_err(|_| bad("not an interface name".into()))?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(bad(format!(
            "no such interface in this network namespace ({})",
            std::io::Error::last_os_error()
        )));
    }
    Ok(index)
}

/// Full NAT's source ports must not be ones the kernel hands out to the balancer's
/// own connections (health checks), or their answers could be taken for a flow's.
fn warn_if_full_nat_ports_are_the_kernels(config: &Config) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut ports = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    let (Some(first), Some(last)) = (ports.next(), ports.next()) else {
        return;
    };
    let kernels = crate::config::PortRange { first, last };
    let ours = config.dataplane.fullnat_ports;
    let full_nat = config
        .vips
        .iter()
        .any(|v| v.forwarding == crate::state::Forwarding::Fullnat);
    if full_nat && ours.overlaps(&kernels) {
        warn!(
            fullnat_ports = %String::from(ours),
            ip_local_port_range = %String::from(kernels),
            "full NAT's source ports overlap the kernel's ephemeral ports: set \
             dataplane.fullnat_ports clear of them, or reserve them with \
             net.ipv4.ip_local_reserved_ports"
        );
    }
}
