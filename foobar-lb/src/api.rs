//! The control API: one JSON request per line on a Unix socket, one JSON reply line.
//!
//! ```text
//! → {"op":"backend_set_weight","vip":"www","backend":"10.1.0.11:8080","weight":0}
//! ← {"Ok":{"changed":{"slots_written":3,...}}}
//! ```
//! The CLI is a thin client of this; anything else may speak it too.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    bgp::BgpStatus,
    config::Config,
    edge::Action,
    persist::DisabledBackend,
    reconcile::ApplyReport,
    state::{BackendSpec, Protocol, Scheduler, VipSpec},
    vrrp::VrrpStatus,
};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/foobar-lb/control.sock";
/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// VIPs, backends, flows and rates.
    Status,
    /// Counters per VIP, backend, XDP action and reason.
    Stats,
    /// Adds a VIP.
    VipAdd {
        /// The VIP, backends included.
        vip: VipSpec,
    },
    /// Removes a VIP by name or `address:port`.
    VipRemove {
        /// Name or `address:port`.
        vip: String,
    },
    /// Adds a backend to a VIP.
    BackendAdd {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// The backend.
        backend: BackendSpec,
    },
    /// Removes a backend; its flows are purged.
    BackendRemove {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// `address:port` of the backend.
        backend: SocketAddr,
    },
    /// Changes a backend's weight; 0 drains it (no new flows, open ones stay).
    BackendSetWeight {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// `address:port` of the backend.
        backend: SocketAddr,
        /// New weight.
        weight: u32,
    },
    /// Takes a backend out of scheduling whatever its health says (maintenance).
    BackendDisable {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// `address:port` of the backend.
        backend: SocketAddr,
    },
    /// Gives a disabled backend back to its health checks.
    BackendEnable {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// `address:port` of the backend.
        backend: SocketAddr,
    },
    /// Which backend a new flow would get.
    Explain {
        /// Name or `address:port` of the VIP.
        vip: String,
        /// Client address.
        client: IpAddr,
        /// Client port.
        client_port: u16,
    },
    /// Re-reads the configuration file.
    Reload,
    /// Adds a rule to a VIP's access list or the global one (a prefix already listed
    /// takes the new action).
    AclAdd {
        /// Name or `address:port` of the VIP; none: the global list.
        #[serde(default)]
        vip: Option<String>,
        /// Allow or deny.
        action: Action,
        /// The sources it matches.
        prefix: IpNet,
    },
    /// Removes a rule from a VIP's access list or the global one.
    AclRemove {
        /// Name or `address:port` of the VIP; none: the global list.
        #[serde(default)]
        vip: Option<String>,
        /// The rule's prefix.
        prefix: IpNet,
    },
    /// Every access-list rule with the packets it decided.
    AclList,
    /// The running state as a configuration file holds it (for `foobar-lb save`).
    RunningConfig,
}

/// A refused request: what was wrong, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}{message}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ApiError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    /// What to do about it, for people.
    pub message: String,
}

/// Kinds of refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was not understood.
    BadRequest,
    /// A VIP or backend named does not exist.
    NotFound,
    /// The change is invalid; nothing was changed.
    Invalid,
    /// The kernel refused a write.
    Dataplane,
}

impl ApiError {
    /// An error with a field.
    pub fn new(kind: ErrorKind, field: Option<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            field,
            message: message.into(),
        }
    }
}

/// The successful answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// For `status`.
    Status(Status),
    /// For `stats`.
    Stats(Stats),
    /// For every change: what it wrote.
    Changed(Changed),
    /// For `explain`.
    Explained(Explanation),
    /// For `acl list`.
    Acl(Vec<AclRuleStatus>),
    /// For `running_config`.
    RunningConfig(Box<RunningConfig>),
}

/// The running state as a configuration: what `foobar-lb save` writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningConfig {
    /// The configuration file the agent loaded.
    pub config_file: PathBuf,
    /// Its settings (`[dataplane]`, `[metrics]`, `[vrrp]`) with the running VIPs and
    /// `[edge]` section, changes through the API included.
    pub config: Config,
    /// Backends disabled through the API (admin state: no configuration field holds it).
    pub disabled: Vec<DisabledBackend>,
}

/// An access-list rule as running, with what it decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRuleStatus {
    /// `global`, or the VIP's name.
    pub list: String,
    /// Allow or deny.
    pub action: Action,
    /// The sources it matches.
    pub prefix: IpNet,
    /// Packets it decided (it was their source's longest match).
    pub packets: u64,
}

/// What a change did to the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// VIPs, backends, slots and flows written or removed.
    #[serde(flatten)]
    pub maps: ApplyReport,
    /// Interfaces attached.
    pub interfaces_attached: Vec<String>,
    /// Interfaces detached.
    pub interfaces_detached: Vec<String>,
    /// Why the change could not be written to the state file: it runs, but a restart
    /// of the agent forgets it. None when it was written (or no state file is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_persisted: Option<String>,
}

/// The answer of `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The VIP asked about.
    pub vip: String,
    /// The backend a new flow would get; `None` when the VIP has no backend in its
    /// schedule (the packet would be dropped).
    pub backend: Option<SocketAddr>,
    /// How it was chosen.
    pub scheduler: Scheduler,
}

/// Packet, byte and flow counts with their current rates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets towards backends.
    pub packets: u64,
    /// Bytes towards backends.
    pub bytes: u64,
    /// Flows scheduled.
    pub new_flows: u64,
    /// Reply packets towards clients.
    pub reply_packets: u64,
    /// Reply bytes towards clients.
    pub reply_bytes: u64,
    /// Entries in the flow table now.
    pub active_flows: u64,
    /// Packets per second both ways, over the last sampling interval.
    pub packets_per_second: f64,
    /// Bits per second both ways.
    pub bits_per_second: f64,
    /// New flows per second.
    pub new_flows_per_second: f64,
}

/// A backend as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// `address:port`.
    pub address: SocketAddr,
    /// Configured weight (0: draining).
    pub weight: u32,
    /// `active`, `draining` (weight 0), `down` (failed its checks) or `disabled`.
    pub state: String,
    /// `up`, `down`, or `unchecked` when its VIP has no health check.
    pub health: String,
    /// `ok`, or why the last check failed; `None` before the first.
    pub last_check: Option<String>,
    /// Latency of the last successful check, ms.
    pub check_latency_ms: Option<f64>,
    /// Up↔down changes so far.
    pub health_transitions: u64,
    /// Checks not run because this machine could not (descriptors, buffers or
    /// addresses ran out): they count neither for nor against the backend.
    #[serde(default)]
    pub checks_skipped: u64,
    /// Share of the VIP's schedule slots, 0 to 1.
    pub share: f64,
    /// Where the data plane sends its packets, `<interface> <MAC>`, as resolved from
    /// the kernel's routes and neighbours; `None`: not resolved (the kernel's FIB is
    /// asked per packet until it is).
    #[serde(default)]
    pub next_hop: Option<String>,
    /// Its traffic.
    pub traffic: Traffic,
}

/// A VIP as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    /// Name.
    pub name: String,
    /// `address:port`.
    pub address: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// rr or maglev.
    pub scheduler: Scheduler,
    /// Slots in its schedule.
    pub schedule_len: usize,
    /// Its traffic.
    pub traffic: Traffic,
    /// Its backends, in configuration order.
    pub backends: Vec<BackendStatus>,
}

/// The answer of `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The configuration file.
    pub config: PathBuf,
    /// Attached interfaces.
    pub interfaces: Vec<String>,
    /// XDP mode asked for.
    pub xdp_mode: String,
    /// Where maps and links are pinned.
    pub pin_dir: Option<PathBuf>,
    /// Whether this agent took over a running data plane.
    pub resumed: bool,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// Entries in the flow table.
    pub flows: u64,
    /// Capacity of the flow table.
    pub flow_capacity: u32,
    /// Whether the running VIPs differ from the file (changed through the API).
    pub changed_since_reload: bool,
    /// The VIPs.
    pub vips: Vec<VipStatus>,
    /// The failover router, when one is configured.
    #[serde(default)]
    pub vrrp: Option<Box<VrrpStatus>>,
    /// The BGP speaker, when `[bgp]` is configured.
    #[serde(default)]
    pub bgp: Option<Box<BgpStatus>>,
    /// Each configured data-plane interface, as the kernel reports it.
    #[serde(default)]
    pub dataplane: Vec<InterfaceStatus>,
}

/// A configured data-plane interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Its name.
    pub name: String,
    /// Whether it exists, is up and has a carrier.
    pub running: bool,
    /// Whether the kernel reports this agent's program attached to it.
    pub attached: bool,
}

/// One counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// What is counted.
    pub name: String,
    /// How many.
    pub value: u64,
}

/// Counters of one VIP or backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCount {
    /// VIP name, or `vip/address:port` for a backend.
    pub name: String,
    /// Packets towards backends.
    pub packets: u64,
    /// Bytes towards backends.
    pub bytes: u64,
    /// Flows scheduled.
    pub new_flows: u64,
    /// Reply packets.
    pub reply_packets: u64,
    /// Reply bytes.
    pub reply_bytes: u64,
}

/// The answer of `stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Packets per XDP action.
    pub actions: Vec<Count>,
    /// Packets per outcome (why each was passed, dropped or sent).
    pub outcomes: Vec<Count>,
    /// Flow-table events.
    pub events: Vec<Count>,
    /// Per VIP.
    pub vips: Vec<TrafficCount>,
    /// Per backend.
    pub backends: Vec<TrafficCount>,
    /// Per access-list rule.
    #[serde(default)]
    pub acl: Vec<AclRuleStatus>,
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "the foobar-lb daemon is not running (nothing listens on {0}); start it with \
         `sudo foobar-lb run --config /etc/foobar-lb/foobar-lb.toml`, or point --socket at its socket"
    )]
    NotRunning(PathBuf),
    /// The socket is root's.
    #[error("permission denied on {0}: the control socket is root's only; run this with sudo")]
    PermissionDenied(PathBuf),
    /// Any other I/O failure.
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The daemon answered something we do not understand.
    #[error("the daemon's answer is not understood ({0}); is it the same version as this CLI?")]
    Protocol(String),
    /// The daemon refused the request.
    #[error(transparent)]
    Refused(#[from] ApiError),
}

/// Sends one request and waits for its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_owned())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.to_owned()),
        _ => ClientError::Io {
            path: socket.to_owned(),
            source,
        },
    };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    // A status walk of a full flow table takes a while; a hung daemon must not hang us.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    let reply: Result<Reply, ApiError> =
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(reply?)
}
