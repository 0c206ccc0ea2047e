//! The loaded XDP program and typed access to its maps.
//!
//! This is the only place that knows map names and value layouts on the user side;
//! everything above it speaks [`foobar_lb_common`] types.

use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, BorrowedFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key as LpmKey, LpmTrie},
        xdp::DevMapHash,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
    util::nr_cpus,
};
use std::net::IpAddr;

use foobar_lb_common::{
    ACL_SCOPE_COUNT, AclKey, AclRule, AddrUse, Backend, Counters, DEFAULT_FLOW_CAPACITY, Endpoint,
    FAMILY_IPV4, FAMILY_IPV6, FLOW_CLOSED, FlowKey, FlowKey6, FlowState, Iface, MAX_BACKENDS,
    MAX_IFINDEX, NextHop, ReplyTarget, Route, Settings, TrafficStats, VipAddr, VipInfo,
    acl_scope_word, map_names as names, schedule_index,
};
use ipnet::IpNet;

use crate::{
    batch,
    migrate::{MigrateError, Migration},
    pin,
    reconcile::MapState,
    state::address_of,
    topology::words,
};

/// The XDP program object, built by `build.rs`.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/foobar-lb"));
/// The benchmark's floor program (parse nothing, XDP_TX).
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));
/// The packet benchmark's generator (`pktgen`), servers (`sink`) and forward-only
/// control (`forward`); see `foobar-lb-ebpf/src/bin`.
pub static PKTGEN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pktgen"));
/// See [`PKTGEN_OBJECT`].
pub static SINK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sink"));
/// See [`PKTGEN_OBJECT`].
pub static FORWARD_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forward"));
/// Name of the balancing program in [`PROGRAM_OBJECT`].
pub const PROGRAM_NAME: &str = "foobar_lb";

/// What a walk of the flow tables found.
#[derive(Debug, Default)]
pub struct OpenFlows {
    /// Open connections by (backend slot, generation).
    pub open: std::collections::BTreeMap<(u32, u32), u64>,
    /// Connections not over but silent past their timeout: no longer counted.
    pub idle: u64,
}

/// Failures of the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The object could not be loaded (maps created, relocations done).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// The kernel refused or failed the program.
    #[error("program: {0}")]
    Program(#[from] ProgramError),
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// Which map.
        map: &'static str,
        /// What the kernel said.
        source: MapError,
    },
    /// A map expected in the object is missing (object and agent out of step).
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    /// A program expected in the object is missing.
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    /// The devmap refused an interface.
    #[error("redirect map: {0}")]
    TxPort(#[from] aya::maps::xdp::XdpMapError),
    /// Pinning failed.
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    /// Pinned maps of another layout could not be migrated.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// A link could not be held as a file-descriptor link (kernel without bpf_link).
    #[error("the XDP link of {0} is not a bpf_link; this kernel is too old for pinning")]
    NotALink(String),
    /// The CPU count could not be read.
    #[error("counting CPUs: {0}")]
    Cpus(String),
    /// A batched map operation failed.
    #[error("map {map}: batch: {source}")]
    Batch {
        /// Which map.
        map: &'static str,
        /// What the kernel said.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// How to load the data plane.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the flow table (LRU).
    pub flow_capacity: u32,
    /// Where maps and links are pinned; `None` keeps everything private to this
    /// process (tests, benchmarks).
    pub pin_dir: Option<PathBuf>,
    /// Whether the program's debug log lines are emitted at all (each costs a ring
    /// buffer write); off, they cost one load of a global.
    pub debug_log: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            flow_capacity: DEFAULT_FLOW_CAPACITY,
            pin_dir: None,
            debug_log: false,
        }
    }
}

/// aya-log's level numbers: 0 disables every statement, 4 enables up to debug.
const LOG_OFF: u8 = 0;
const LOG_DEBUG: u8 = 4;

/// What attaching to an interface did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// The program was attached where none of ours was.
    New,
    /// Our pinned link was already there; its program was swapped atomically.
    Replaced,
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    resumed: bool,
    /// An upgrade from pinned maps of an older layout, until the links run this program.
    migration: Option<Migration>,
    /// The kernel's id of the loaded program.
    program_id: u32,
}

macro_rules! map {
    ($self:ident, $kind:ident, $name:expr) => {
        $kind::try_from(
            $self
                .ebpf
                .map_mut($name)
                .ok_or(DataplaneError::MissingMap($name))?,
        )
        .map_err(map_err($name))?
    };
}

impl Dataplane {
    /// Loads the object and the program into the kernel (verified, not attached).
    /// With a pin directory, maps already pinned there are reused as they are (their
    /// layout checked first), and new ones are pinned.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let log_level = if options.debug_log {
            LOG_DEBUG
        } else {
            LOG_OFF
        };
        loader
            .map_max_entries(names::FLOWS, options.flow_capacity)
            .map_max_entries(names::FLOWS6, options.flow_capacity)
            .map_max_entries(names::NAT_FLOWS, options.flow_capacity)
            .map_max_entries(names::NAT_FLOWS6, options.flow_capacity)
            .override_global("AYA_LOG_LEVEL", &log_level, false);
        let mut resumed = false;
        let mut migration = None;
        if let Some(dir) = &options.pin_dir {
            pin::prepare_dir(dir)?;
            let maps_dir = pin::maps_dir(dir);
            migration = Migration::prepare(dir, options.flow_capacity)?;
            if migration.as_ref().is_some_and(Migration::redo) {
                // Maps of this layout beside an older one's, which the links do not
                // run yet, are a migration cut short: they are made again.
                pin::remove_all_maps(&maps_dir)?;
            }
            std::fs::create_dir_all(&maps_dir).map_err(|e| pin::PinError::Directory {
                path: maps_dir.clone(),
                message: e.to_string(),
            })?;
            pin::check_pinned_layout(&maps_dir, options.flow_capacity)?;
            resumed = pin::has_pinned_maps(&maps_dir) || migration.is_some();
            for name in names::ALL {
                loader.map_pin_path(name, pin::map_path(&maps_dir, name));
            }
        }
        let loaded = load_verified(&mut loader).and_then(|ebpf| {
            if let (Some(migration), Some(dir)) = (&mut migration, &options.pin_dir) {
                migration.copy(&pin::maps_dir(dir))?;
            }
            Ok(ebpf)
        });
        let mut ebpf = match (loaded, &options.pin_dir) {
            (Err(e), Some(dir)) if migration.as_ref().is_some_and(Migration::redo) => {
                // The old layout stays the only one, as if this build had never run.
                let _ = std::fs::remove_dir_all(pin::maps_dir(dir));
                return Err(e);
            }
            (loaded, _) => loaded?,
        };
        let program_id = program(&mut ebpf)?.info()?.id();
        Ok(Self {
            ebpf,
            pin_dir: options.pin_dir.clone(),
            resumed,
            migration,
            program_id,
        })
    }

    /// Ends an upgrade from maps of an older layout (see [`Migration`]), once this
    /// program is in every pinned link; nothing to do otherwise.
    pub fn finish_migration(&mut self) -> Result<()> {
        match self.migration.take() {
            Some(migration) => Ok(migration.finish()?),
            None => Ok(()),
        }
    }

    /// The reader of the program's aya-log records; `None` if the object has none.
    /// Poll its fd for readability and call `flush()` to emit them through `log`.
    pub fn logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf).ok()
    }

    /// Whether the maps were reopened from pins, with the state of an earlier agent.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The pin directory, if any.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// The kernel's id of the balancing program, as interfaces report what they run.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// The balancing program, for attaching or test runs.
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf)
    }

    /// Attaches the program to an interface.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId> {
        Ok(self.program_mut()?.attach(interface, mode)?)
    }

    /// Attaches the program to an interface through a pinned link, or swaps it into
    /// the link an earlier agent pinned there (no gap in forwarding). Without a pin
    /// directory this is [`Dataplane::attach`].
    pub fn attach_pinned(&mut self, interface: &str, mode: XdpMode) -> Result<Attached> {
        let Some(dir) = self.pin_dir.clone() else {
            self.attach(interface, mode)?;
            return Ok(Attached::New);
        };
        let path = pin::link_path(&dir, interface);
        if path.exists() {
            match self.replace_in_pinned_link(&path) {
                Ok(()) => return Ok(Attached::Replaced),
                // A link whose interface went away cannot be updated: start afresh.
                Err(_) => std::fs::remove_file(&path).map_err(|e| pin::PinError::Directory {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
            }
        }
        let program = self.program_mut()?;
        let id = program.attach(interface, mode)?;
        let link: FdLink = program
            .take_link(id)?
            .try_into()
            .map_err(|_| DataplaneError::NotALink(interface.to_owned()))?;
        // The pin holds the link; our fd closes when `link` drops.
        link.pin(&path).map_err(|e| pin::PinError::Directory {
            path,
            message: e.to_string(),
        })?;
        Ok(Attached::New)
    }

    fn replace_in_pinned_link(&mut self, path: &Path) -> Result<()> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin::PinError::Directory {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|_| DataplaneError::NotALink(path.display().to_string()))?;
        let program = self.program_mut()?;
        let id = program.attach_to_link(link)?;
        // Only the pin keeps the link: dropping this program later must not detach it.
        drop(program.take_link(id)?);
        Ok(())
    }

    /// Detaches from an interface attached with [`Dataplane::attach_pinned`].
    pub fn detach_pinned(&mut self, interface: &str) -> Result<()> {
        if let Some(dir) = &self.pin_dir {
            let path = pin::link_path(dir, interface);
            std::fs::remove_file(&path).map_err(|e| pin::PinError::Directory {
                path,
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Reads back what an earlier agent wrote (a data plane reopened from pins).
    pub fn read_state(&mut self) -> Result<MapState> {
        let mut state = MapState {
            vips: self.vips()?.into_iter().collect(),
            replies: self.replies()?.into_iter().collect(),
            routes: self.routes()?.into_iter().collect(),
            neighbours: self.neighbours()?.into_iter().collect(),
            ..Default::default()
        };
        let backends: Array<_, Backend> = map!(self, Array, names::BACKENDS);
        for id in 0..MAX_BACKENDS {
            let slot = backends.get(&id, 0).map_err(map_err(names::BACKENDS))?;
            if slot != Backend::default() {
                state.backends.insert(id, slot);
            }
        }
        let interfaces: Array<_, Iface> = map!(self, Array, names::INTERFACES);
        for index in 0..MAX_IFINDEX {
            let iface = interfaces
                .get(&index, 0)
                .map_err(map_err(names::INTERFACES))?;
            if iface.roles != 0 {
                state.interfaces.insert(index, iface);
            }
        }
        let addresses: HashMap<_, VipAddr, AddrUse> = map!(self, HashMap, names::VIP_ADDRS);
        state.vip_addresses = addresses
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::VIP_ADDRS))?;
        let addresses: HashMap<_, VipAddr, u32> = map!(self, HashMap, names::BACKEND_ADDRS);
        state.backend_addresses = addresses
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::BACKEND_ADDRS))?;
        let settings: Array<_, Settings> = map!(self, Array, names::SETTINGS);
        state.settings = settings.get(&0, 0).map_err(map_err(names::SETTINGS))?;
        state.acls = self.acls()?.into_iter().collect();
        let scopes: Array<_, u32> = map!(self, Array, names::ACL_SCOPES);
        for scope in 0..ACL_SCOPE_COUNT {
            let flags = scopes.get(&scope, 0).map_err(map_err(names::ACL_SCOPES))?;
            if flags != 0 {
                state.acl_scopes.insert(scope, flags);
            }
        }
        for info in state.vips.values() {
            let schedule = self.schedule(info.id, info.schedule_len)?;
            state.schedules.insert(info.id, schedule);
        }
        Ok(state)
    }

    /// Every VIP in the map, with its entry.
    pub fn vips(&mut self) -> Result<Vec<(Endpoint, VipInfo)>> {
        let m: HashMap<_, Endpoint, VipInfo> = map!(self, HashMap, names::VIPS);
        m.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::VIPS))
    }

    /// Every reply entry: backend endpoint → VIP and ids.
    pub fn replies(&mut self) -> Result<Vec<(Endpoint, ReplyTarget)>> {
        let m: HashMap<_, Endpoint, ReplyTarget> = map!(self, HashMap, names::REPLIES);
        m.iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::REPLIES))
    }

    /// The first `len` slots of a VIP's schedule.
    pub fn schedule(&mut self, vip_id: u32, len: u32) -> Result<Vec<u32>> {
        let m: Array<_, u32> = map!(self, Array, names::SCHEDULES);
        (0..len)
            .map(|slot| m.get(&schedule_index(vip_id, slot), 0))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::SCHEDULES))
    }

    /// Adds or updates a VIP.
    pub fn set_vip(&mut self, vip: &Endpoint, info: &VipInfo) -> Result<()> {
        let mut m: HashMap<_, Endpoint, VipInfo> = map!(self, HashMap, names::VIPS);
        m.insert(vip, info, 0).map_err(map_err(names::VIPS))
    }

    /// Removes a VIP; new packets for it pass to the kernel.
    pub fn remove_vip(&mut self, vip: &Endpoint) -> Result<()> {
        let mut m: HashMap<_, Endpoint, VipInfo> = map!(self, HashMap, names::VIPS);
        m.remove(vip).map_err(map_err(names::VIPS))
    }

    /// Sets how many VIPs use an address and whether it is open (no VIP removes it).
    pub fn set_vip_address(&mut self, addr: &VipAddr, use_: &AddrUse) -> Result<()> {
        let mut m: HashMap<_, VipAddr, AddrUse> = map!(self, HashMap, names::VIP_ADDRS);
        if use_.vips == 0 {
            m.remove(addr).map_err(map_err(names::VIP_ADDRS))
        } else {
            m.insert(addr, use_, 0).map_err(map_err(names::VIP_ADDRS))
        }
    }

    /// Adds or changes an access-list rule of a scope (0 global, `1 + vip id`).
    pub fn set_acl(&mut self, scope: u32, prefix: &IpNet, rule: &AclRule) -> Result<()> {
        let mut m: LpmTrie<_, AclKey, AclRule> = map!(self, LpmTrie, names::ACLS);
        m.insert(&acl_key(scope, prefix), rule, 0)
            .map_err(map_err(names::ACLS))
    }

    /// Removes an access-list rule.
    pub fn remove_acl(&mut self, scope: u32, prefix: &IpNet) -> Result<()> {
        let mut m: LpmTrie<_, AclKey, AclRule> = map!(self, LpmTrie, names::ACLS);
        match m.remove(&acl_key(scope, prefix)) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(names::ACLS)),
        }
    }

    /// Every access-list rule, by scope and prefix.
    pub fn acls(&mut self) -> Result<Vec<((u32, IpNet), AclRule)>> {
        let m: LpmTrie<_, AclKey, AclRule> = map!(self, LpmTrie, names::ACLS);
        let mut rules = Vec::new();
        for entry in m.iter() {
            let (k, rule) = entry.map_err(map_err(names::ACLS))?;
            let data = k.data();
            let word = u32::from_be(data.scope);
            let family = (word & 0xff) as u8;
            let addr = address_of(&data.addr, family);
            if let Ok(net) = IpNet::new(addr, (k.prefix_len() - 32) as u8) {
                rules.push(((word >> 8, net), rule));
            }
        }
        Ok(rules)
    }

    /// Sets a scope's access-list flags.
    pub fn set_acl_scope(&mut self, scope: u32, flags: u32) -> Result<()> {
        let mut m: Array<_, u32> = map!(self, Array, names::ACL_SCOPES);
        m.set(scope, flags, 0).map_err(map_err(names::ACL_SCOPES))
    }

    /// Packets an access-list rule id decided, summed over CPUs.
    pub fn acl_stats(&mut self, id: u32) -> Result<u64> {
        let m: PerCpuArray<_, u64> = map!(self, PerCpuArray, names::ACL_STATS);
        let per_cpu = m.get(&id, 0).map_err(map_err(names::ACL_STATS))?;
        Ok(per_cpu.iter().sum())
    }

    /// Zeroes a rule id's counters before it counts for a new rule.
    pub fn reset_acl_stats(&mut self, id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e.to_string()))?;
        let zeros = PerCpuValues::try_from(vec![0u64; cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let mut m: PerCpuArray<&mut MapData, u64> = map!(self, PerCpuArray, names::ACL_STATS);
        m.set(id, zeros, 0).map_err(map_err(names::ACL_STATS))
    }

    /// Sets how many NAT backends use an address (0 removes it).
    pub fn set_backend_address_uses(&mut self, addr: &VipAddr, uses: u32) -> Result<()> {
        let mut m: HashMap<_, VipAddr, u32> = map!(self, HashMap, names::BACKEND_ADDRS);
        if uses == 0 {
            m.remove(addr).map_err(map_err(names::BACKEND_ADDRS))
        } else {
            m.insert(addr, uses, 0)
                .map_err(map_err(names::BACKEND_ADDRS))
        }
    }

    /// Writes a backend slot.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let mut m: Array<_, Backend> = map!(self, Array, names::BACKENDS);
        m.set(id, backend, 0).map_err(map_err(names::BACKENDS))
    }

    /// Writes the slots of a VIP's schedule that differ from `previous`.
    /// Returns how many slots were written.
    pub fn write_schedule(
        &mut self,
        vip_id: u32,
        schedule: &[u32],
        previous: &[u32],
    ) -> Result<usize> {
        let (slots, backends): (Vec<u32>, Vec<u32>) = schedule
            .iter()
            .enumerate()
            .filter(|&(slot, backend)| previous.get(slot) != Some(backend))
            .map(|(slot, &backend)| (schedule_index(vip_id, slot as u32), backend))
            .unzip();
        let fd = self.map_fd(names::SCHEDULES)?;
        batch::update(fd, &slots, &backends, 8192).map_err(|source| DataplaneError::Batch {
            map: names::SCHEDULES,
            source,
        })?;
        Ok(slots.len())
    }

    /// The round-robin cursor of a VIP: how many flows it has scheduled.
    pub fn rr_cursor(&mut self, vip_id: u32) -> Result<u32> {
        let m: Array<_, u32> = map!(self, Array, names::RR_CURSORS);
        m.get(&vip_id, 0).map_err(map_err(names::RR_CURSORS))
    }

    /// Sets the round-robin cursor of a VIP.
    pub fn set_rr_cursor(&mut self, vip_id: u32, value: u32) -> Result<()> {
        let mut m: Array<_, u32> = map!(self, Array, names::RR_CURSORS);
        m.set(vip_id, value, 0).map_err(map_err(names::RR_CURSORS))
    }

    /// Tells the data plane how to rewrite replies coming from a backend endpoint.
    pub fn set_reply(&mut self, backend: &Endpoint, target: &ReplyTarget) -> Result<()> {
        let mut m: HashMap<_, Endpoint, ReplyTarget> = map!(self, HashMap, names::REPLIES);
        m.insert(backend, target, 0)
            .map_err(map_err(names::REPLIES))
    }

    /// Stops rewriting replies from a backend endpoint.
    pub fn remove_reply(&mut self, backend: &Endpoint) -> Result<()> {
        let mut m: HashMap<_, Endpoint, ReplyTarget> = map!(self, HashMap, names::REPLIES);
        m.remove(backend).map_err(map_err(names::REPLIES))
    }

    /// Lets the program redirect packets out of an interface.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        let mut m: DevMapHash<_> = map!(self, DevMapHash, names::TX_PORTS);
        Ok(m.insert(ifindex, ifindex, None, 0)?)
    }

    /// Sets a flow-table entry (tests and takeovers).
    pub fn set_flow(&mut self, key: &FlowKey, flow: &FlowState) -> Result<()> {
        let mut m: HashMap<_, FlowKey, FlowState> = map!(self, HashMap, names::FLOWS);
        m.insert(key, flow, 0).map_err(map_err(names::FLOWS))
    }

    /// Removes a flow-table entry (tests: an eviction).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut m: HashMap<_, FlowKey, FlowState> = map!(self, HashMap, names::FLOWS);
        match m.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(names::FLOWS)),
        }
    }

    /// The flow-table entry of a flow, if any.
    pub fn flow(&mut self, key: &FlowKey) -> Result<Option<FlowState>> {
        let m: HashMap<_, FlowKey, FlowState> = map!(self, HashMap, names::FLOWS);
        match m.get(key, 0) {
            Ok(flow) => Ok(Some(flow)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::FLOWS)(e)),
        }
    }

    /// Writes many flow-table entries at once (tests and benchmarks).
    pub fn set_flows(&mut self, flows: &[(FlowKey, FlowState)]) -> Result<()> {
        let (keys, values): (Vec<FlowKey>, Vec<FlowState>) = flows.iter().copied().unzip();
        let fd = self.map_fd(names::FLOWS)?;
        batch::update(fd, &keys, &values, 8192).map_err(|source| DataplaneError::Batch {
            map: names::FLOWS,
            source,
        })
    }

    /// Sets an IPv6 flow-table entry (tests and benchmarks).
    pub fn set_flow6(&mut self, key: &FlowKey6, flow: &FlowState) -> Result<()> {
        let mut m: HashMap<_, FlowKey6, FlowState> = map!(self, HashMap, names::FLOWS6);
        m.insert(key, flow, 0).map_err(map_err(names::FLOWS6))
    }

    /// Visits every flow-table entry, thousands per system call. The table keeps
    /// changing meanwhile; the agent never does this while it answers requests.
    pub fn for_each_flow(&mut self, each: impl FnMut(&FlowKey, &FlowState)) -> Result<()> {
        let fd = self.map_fd(names::FLOWS)?;
        batch::for_each(fd, 4096, each).map_err(|source| DataplaneError::Batch {
            map: names::FLOWS,
            source,
        })
    }

    /// Walks both flow tables and counts the open connections per backend slot and
    /// generation: neither over nor `idle` (silent past its timeout). Thousands of
    /// entries per system call; nothing is removed (an idle flow that speaks again
    /// keeps its backend; the LRU makes room when the table fills).
    pub fn count_open_flows(&mut self, idle: impl Fn(&FlowState, u8) -> bool) -> Result<OpenFlows> {
        let mut count = OpenFlows::default();
        self.count_table::<FlowKey>(names::FLOWS, |k| k.proto, &idle, &mut count)?;
        self.count_table::<FlowKey6>(names::FLOWS6, |k| k.proto, &idle, &mut count)?;
        Ok(count)
    }

    fn count_table<K: aya::Pod + Default>(
        &mut self,
        name: &'static str,
        proto: fn(&K) -> u8,
        idle: &impl Fn(&FlowState, u8) -> bool,
        count: &mut OpenFlows,
    ) -> Result<()> {
        let fd = self.map_fd(name)?;
        batch::for_each(fd, 4096, |key: &K, flow: &FlowState| {
            if flow.flags & FLOW_CLOSED != 0 {
                return;
            }
            if idle(flow, proto(key)) {
                count.idle += 1;
            } else {
                *count
                    .open
                    .entry((flow.backend_id, flow.generation))
                    .or_default() += 1;
            }
        })
        .map_err(|source| DataplaneError::Batch { map: name, source })
    }

    /// The description of an interface the program runs on.
    pub fn set_interface(&mut self, ifindex: u32, iface: &Iface) -> Result<()> {
        let mut m: Array<_, Iface> = map!(self, Array, names::INTERFACES);
        m.set(ifindex, iface, 0).map_err(map_err(names::INTERFACES))
    }

    /// The program's knobs.
    pub fn set_settings(&mut self, settings: &Settings) -> Result<()> {
        let mut m: Array<_, Settings> = map!(self, Array, names::SETTINGS);
        m.set(0, settings, 0).map_err(map_err(names::SETTINGS))
    }

    /// Adds or changes a client-side route.
    pub fn set_route(&mut self, prefix: &IpNet, route: &Route) -> Result<()> {
        match prefix {
            IpNet::V4(net) => {
                let mut m: LpmTrie<_, u32, Route> = map!(self, LpmTrie, names::ROUTES);
                let key = LpmKey::new(net.prefix_len().into(), words(net.addr().into())[0]);
                m.insert(&key, route, 0).map_err(map_err(names::ROUTES))
            }
            IpNet::V6(net) => {
                let mut m: LpmTrie<_, [u32; 4], Route> = map!(self, LpmTrie, names::ROUTES6);
                let key = LpmKey::new(net.prefix_len().into(), words(net.addr().into()));
                m.insert(&key, route, 0).map_err(map_err(names::ROUTES6))
            }
        }
    }

    /// Removes a client-side route.
    pub fn remove_route(&mut self, prefix: &IpNet) -> Result<()> {
        let removed = match prefix {
            IpNet::V4(net) => {
                let mut m: LpmTrie<_, u32, Route> = map!(self, LpmTrie, names::ROUTES);
                m.remove(&LpmKey::new(
                    net.prefix_len().into(),
                    words(net.addr().into())[0],
                ))
            }
            IpNet::V6(net) => {
                let mut m: LpmTrie<_, [u32; 4], Route> = map!(self, LpmTrie, names::ROUTES6);
                m.remove(&LpmKey::new(
                    net.prefix_len().into(),
                    words(net.addr().into()),
                ))
            }
        };
        match removed {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(names::ROUTES)),
        }
    }

    /// Every client-side route, both families.
    pub fn routes(&mut self) -> Result<Vec<(IpNet, Route)>> {
        let mut routes = Vec::new();
        let m: LpmTrie<_, u32, Route> = map!(self, LpmTrie, names::ROUTES);
        for entry in m.iter() {
            let (k, v) = entry.map_err(map_err(names::ROUTES))?;
            let addr = address_of(&[k.data(), 0, 0, 0], FAMILY_IPV4);
            if let Ok(net) = IpNet::new(addr, k.prefix_len() as u8) {
                routes.push((net, v));
            }
        }
        let m: LpmTrie<_, [u32; 4], Route> = map!(self, LpmTrie, names::ROUTES6);
        for entry in m.iter() {
            let (k, v) = entry.map_err(map_err(names::ROUTES6))?;
            let addr = address_of(&k.data(), FAMILY_IPV6);
            if let Ok(net) = IpNet::new(addr, k.prefix_len() as u8) {
                routes.push((net, v));
            }
        }
        Ok(routes)
    }

    /// Adds or changes a client-side next hop.
    pub fn set_neighbour(&mut self, addr: &IpAddr, hop: &NextHop) -> Result<()> {
        let key = words(*addr);
        if addr.is_ipv4() {
            let mut m: HashMap<_, u32, NextHop> = map!(self, HashMap, names::NEIGHBOURS);
            m.insert(key[0], hop, 0).map_err(map_err(names::NEIGHBOURS))
        } else {
            let mut m: HashMap<_, [u32; 4], NextHop> = map!(self, HashMap, names::NEIGHBOURS6);
            m.insert(key, hop, 0).map_err(map_err(names::NEIGHBOURS6))
        }
    }

    /// Removes a client-side next hop.
    pub fn remove_neighbour(&mut self, addr: &IpAddr) -> Result<()> {
        let key = words(*addr);
        let removed = if addr.is_ipv4() {
            let mut m: HashMap<_, u32, NextHop> = map!(self, HashMap, names::NEIGHBOURS);
            m.remove(&key[0])
        } else {
            let mut m: HashMap<_, [u32; 4], NextHop> = map!(self, HashMap, names::NEIGHBOURS6);
            m.remove(&key)
        };
        match removed {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other.map_err(map_err(names::NEIGHBOURS)),
        }
    }

    /// Every client-side next hop, both families.
    pub fn neighbours(&mut self) -> Result<Vec<(IpAddr, NextHop)>> {
        let mut all = Vec::new();
        let m: HashMap<_, u32, NextHop> = map!(self, HashMap, names::NEIGHBOURS);
        for entry in m.iter() {
            let (k, v) = entry.map_err(map_err(names::NEIGHBOURS))?;
            all.push((address_of(&[k, 0, 0, 0], FAMILY_IPV4), v));
        }
        let m: HashMap<_, [u32; 4], NextHop> = map!(self, HashMap, names::NEIGHBOURS6);
        for entry in m.iter() {
            let (k, v) = entry.map_err(map_err(names::NEIGHBOURS6))?;
            all.push((address_of(&k, FAMILY_IPV6), v));
        }
        Ok(all)
    }

    /// A backend slot as written.
    pub fn backend(&mut self, id: u32) -> Result<Backend> {
        let m: Array<_, Backend> = map!(self, Array, names::BACKENDS);
        m.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// The file descriptor of a map, for the batched operations.
    fn map_fd(&self, name: &'static str) -> Result<BorrowedFd<'_>> {
        match self.ebpf.map(name) {
            Some(Map::Array(data) | Map::HashMap(data) | Map::LruHashMap(data)) => {
                Ok(data.fd().as_fd())
            }
            Some(_) => Err(DataplaneError::MissingMap(name)),
            None => Err(DataplaneError::MissingMap(name)),
        }
    }

    /// Global counters, summed over CPUs.
    pub fn counters(&mut self) -> Result<Counters> {
        let m: PerCpuArray<_, Counters> = map!(self, PerCpuArray, names::COUNTERS);
        let per_cpu = m.get(&0, 0).map_err(map_err(names::COUNTERS))?;
        Ok(per_cpu.iter().fold(Counters::default(), |mut sum, c| {
            sum.add(c);
            sum
        }))
    }

    /// Traffic counters of a VIP id, summed over CPUs.
    pub fn vip_stats(&mut self, vip_id: u32) -> Result<TrafficStats> {
        self.traffic(names::VIP_STATS, vip_id)
    }

    /// Traffic counters of a backend id, summed over CPUs.
    pub fn backend_stats(&mut self, backend_id: u32) -> Result<TrafficStats> {
        self.traffic(names::BACKEND_STATS, backend_id)
    }

    /// Zeroes the counters of a VIP id about to be (re)used.
    pub fn reset_vip_stats(&mut self, vip_id: u32) -> Result<()> {
        self.reset_traffic(names::VIP_STATS, vip_id)
    }

    /// Zeroes the counters of a backend id about to be (re)used.
    pub fn reset_backend_stats(&mut self, backend_id: u32) -> Result<()> {
        self.reset_traffic(names::BACKEND_STATS, backend_id)
    }

    fn traffic(&mut self, name: &'static str, index: u32) -> Result<TrafficStats> {
        let m: PerCpuArray<_, TrafficStats> = map!(self, PerCpuArray, name);
        let per_cpu = m.get(&index, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(TrafficStats::default(), |mut sum, s| {
            sum.add(s);
            sum
        }))
    }

    fn reset_traffic(&mut self, name: &'static str, index: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e.to_string()))?;
        let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); cpus])
            .map_err(|e| DataplaneError::Cpus(e.to_string()))?;
        let mut m: PerCpuArray<&mut MapData, TrafficStats> = map!(self, PerCpuArray, name);
        m.set(index, zeros, 0).map_err(map_err(name))
    }
}

/// The trie key of a rule: its scope word, matched whole, then its prefix.
fn acl_key(scope: u32, prefix: &IpNet) -> LpmKey<AclKey> {
    let family = match prefix {
        IpNet::V4(_) => FAMILY_IPV4,
        IpNet::V6(_) => FAMILY_IPV6,
    };
    let data = AclKey {
        scope: acl_scope_word(scope, family),
        addr: words(prefix.addr()),
    };
    LpmKey::new(32 + u32::from(prefix.prefix_len()), data)
}

/// The object loaded and its balancing program verified. The verifier gives up with
/// EAGAIN when a signal arrives while it runs (a child exiting, a SIGHUP): it is
/// tried again, as libbpf does.
fn load_verified(loader: &mut EbpfLoader<'_>) -> Result<Ebpf> {
    let mut ebpf = loader.load(PROGRAM_OBJECT)?;
    let mut attempts = 5;
    loop {
        match program(&mut ebpf)?.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts > 1 =>
            {
                attempts -= 1;
            }
            other => break other?,
        }
    }
    Ok(ebpf)
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(DataplaneError::MissingProgram(PROGRAM_NAME))?;
    Ok(program.try_into()?)
}

/// Loads the benchmark's floor program (parse nothing, XDP_TX). The returned object
/// must be kept alive while the program is used.
pub fn load_floor() -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(FLOOR_OBJECT)?;
    let floor: &mut Xdp = ebpf
        .program_mut("floor")
        .ok_or(DataplaneError::MissingProgram("floor"))?
        .try_into()?;
    floor.load()?;
    Ok(ebpf)
}
