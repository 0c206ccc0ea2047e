//! Turning a desired state into map writes, in two steps:
//!
//! - [`plan`] is pure: from what the maps hold ([`MapState`]) and what they should hold
//!   (the VIPs, the interfaces, the kernel's topology, the settings) it assigns ids and
//!   lists the writes, in an order that never exposes a half-written state: backends
//!   before the schedules that name them, schedules before the VIP entry that gives
//!   their length, removals last. When the ids of what stays and what comes do not fit
//!   side by side (a swap of 40 VIPs for 40 others needs 80 of 64 ids), what goes is
//!   removed first, and only the ids it frees are reused. Nothing is written unless
//!   the whole plan was made.
//! - [`Balancer::apply`] executes the writes, recording each in its [`MapState`] as it
//!   succeeds: a failure part-way leaves a model that matches the maps, and the next
//!   apply writes what is missing.
//!
//! A backend slot is never reused without bumping its generation, so flows remembered
//! for the slot's previous backend are scheduled again instead of landing on a
//! stranger, and no flow entry ever has to be found and deleted.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use foobar_lb_common::{
    ACL_ANY, ACL_DEFAULT_DENY, ACL_RULES, ADDR_OPEN, AclRule, AddrUse, BACKEND_ACTIVE, Backend,
    Endpoint, FAMILY_IPV6, Iface, MAX_ACL_RULES, MAX_BACKENDS, MAX_IFINDEX, MAX_VIPS, NextHop,
    ReplyTarget, Route, SCHED_LEAST_CONN, SCHED_MAGLEV, SCHED_RR, Settings, VipAddr, VipInfo,
    hash::{HASH_FLOW, HASH_SOURCE, vip_hash_v4, vip_hash_v6},
};
use ipnet::IpNet;

use crate::{
    dataplane::{Dataplane, DataplaneError},
    edge::{Action, EdgeSpec},
    state::{DesiredState, Forwarding, PlannedVip, Scheduler, StateError, address_of},
    topology::{Topology, words},
};

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The desired state is invalid; nothing was changed.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] StateError),
    /// The kernel refused a map write part-way; the next apply repairs what is missing.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// A failure injected by a test, after as many writes as it asked for.
    #[error("injected failure after the planned writes asked for")]
    Injected,
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// VIPs added.
    pub vips_added: usize,
    /// VIPs removed.
    pub vips_removed: usize,
    /// Backends added.
    pub backends_added: usize,
    /// Backends removed.
    pub backends_removed: usize,
    /// Schedule slots rewritten.
    pub slots_written: usize,
    /// Backend slots rewritten for another next hop.
    pub next_hops_written: usize,
    /// Client-side routes and neighbours written or removed.
    pub client_side_written: usize,
    /// Full-NAT or GUE backends no address of this machine routes to: written without
    /// a source (the data plane drops their packets) until a route appears.
    pub backends_without_source: usize,
}

/// What the agent has written into the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// `VIPS`.
    pub vips: BTreeMap<Endpoint, VipInfo>,
    /// `BACKENDS`, the slots ever written (retired ones keep their generation).
    pub backends: BTreeMap<u32, Backend>,
    /// `REPLIES`.
    pub replies: BTreeMap<Endpoint, ReplyTarget>,
    /// `SCHEDULES`, by VIP id.
    pub schedules: BTreeMap<u32, Vec<u32>>,
    /// `VIP_ADDRS`.
    pub vip_addresses: BTreeMap<VipAddr, AddrUse>,
    /// `ACLS`, by scope (0 global, `1 + vip id`) and prefix.
    pub acls: BTreeMap<(u32, IpNet), AclRule>,
    /// `ACL_SCOPES`, the scopes with flags.
    pub acl_scopes: BTreeMap<u32, u32>,
    /// `BACKEND_ADDRS`: NAT backends' addresses.
    pub backend_addresses: BTreeMap<VipAddr, u32>,
    /// `INTERFACES`, the ones with a role.
    pub interfaces: BTreeMap<u32, Iface>,
    /// `ROUTES` and `ROUTES6`.
    pub routes: BTreeMap<IpNet, Route>,
    /// `NEIGHBOURS` and `NEIGHBOURS6`.
    pub neighbours: BTreeMap<IpAddr, NextHop>,
    /// `SETTINGS`.
    pub settings: Settings,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Zeroes a VIP id's counters and round-robin cursor before it serves a new VIP.
    FreshVipId(u32),
    /// Zeroes a backend id's counters before it serves a new backend.
    FreshBackendId(u32),
    /// Writes a backend slot.
    SetBackend(u32, Backend),
    /// Writes a reply entry.
    SetReply(Endpoint, ReplyTarget),
    /// Removes a reply entry.
    RemoveReply(Endpoint),
    /// Writes a VIP's schedule (the slots that differ from what is there).
    WriteSchedule(u32, Vec<u32>),
    /// Writes a VIP entry.
    SetVip(Endpoint, VipInfo),
    /// Removes a VIP entry.
    RemoveVip(Endpoint),
    /// Sets how many VIPs use an address and whether it is open (no VIP removes it).
    SetVipAddress(VipAddr, AddrUse),
    /// Zeroes an access-list rule id's counters before it counts for a new rule.
    FreshAclRule(u32),
    /// Writes an access-list rule of a scope.
    SetAcl(u32, IpNet, AclRule),
    /// Removes an access-list rule.
    RemoveAcl(u32, IpNet),
    /// Writes a scope's access-list flags.
    SetAclScope(u32, u32),
    /// Sets how many NAT backends use an address (0 removes it).
    SetBackendAddress(VipAddr, u32),
    /// Writes an interface's entry (`roles` 0: not ours any more).
    SetInterface(u32, Iface),
    /// Writes a client-side route.
    SetRoute(IpNet, Route),
    /// Removes a client-side route.
    RemoveRoute(IpNet),
    /// Writes a client-side neighbour.
    SetNeighbour(IpAddr, NextHop),
    /// Removes a client-side neighbour.
    RemoveNeighbour(IpAddr),
    /// Writes the settings.
    SetSettings(Settings),
}

impl MapState {
    /// Records a write that succeeded.
    fn record(&mut self, op: &Op) {
        match op {
            Op::FreshVipId(_) | Op::FreshBackendId(_) | Op::FreshAclRule(_) => {}
            Op::SetBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::SetReply(ep, t) => {
                self.replies.insert(*ep, *t);
            }
            Op::RemoveReply(ep) => {
                self.replies.remove(ep);
            }
            Op::WriteSchedule(id, slots) => {
                self.schedules.insert(*id, slots.clone());
            }
            Op::SetVip(ep, info) => {
                self.vips.insert(*ep, *info);
            }
            Op::RemoveVip(ep) => {
                if let Some(info) = self.vips.remove(ep) {
                    self.schedules.remove(&info.id);
                }
            }
            Op::SetVipAddress(addr, use_) if use_.vips == 0 => {
                self.vip_addresses.remove(addr);
            }
            Op::SetVipAddress(addr, use_) => {
                self.vip_addresses.insert(*addr, *use_);
            }
            Op::SetAcl(scope, net, rule) => {
                self.acls.insert((*scope, *net), *rule);
            }
            Op::RemoveAcl(scope, net) => {
                self.acls.remove(&(*scope, *net));
            }
            Op::SetAclScope(scope, 0) => {
                self.acl_scopes.remove(scope);
            }
            Op::SetAclScope(scope, flags) => {
                self.acl_scopes.insert(*scope, *flags);
            }
            Op::SetBackendAddress(addr, 0) => {
                self.backend_addresses.remove(addr);
            }
            Op::SetBackendAddress(addr, n) => {
                self.backend_addresses.insert(*addr, *n);
            }
            Op::SetInterface(index, iface) if iface.roles == 0 => {
                self.interfaces.remove(index);
            }
            Op::SetInterface(index, iface) => {
                self.interfaces.insert(*index, *iface);
            }
            Op::SetRoute(key, route) => {
                self.routes.insert(*key, *route);
            }
            Op::RemoveRoute(key) => {
                self.routes.remove(key);
            }
            Op::SetNeighbour(addr, hop) => {
                self.neighbours.insert(*addr, *hop);
            }
            Op::RemoveNeighbour(addr) => {
                self.neighbours.remove(addr);
            }
            Op::SetSettings(settings) => self.settings = *settings,
        }
    }

    /// The id of a VIP.
    pub fn vip_id(&self, vip: &Endpoint) -> Option<u32> {
        self.vips.get(vip).map(|v| v.id)
    }

    /// The id of a backend of a VIP.
    pub fn backend_id(&self, vip: &Endpoint, backend: &Endpoint) -> Option<u32> {
        let vip_id = self.vip_id(vip)?;
        self.backends
            .iter()
            .find(|(_, b)| {
                b.flags & BACKEND_ACTIVE != 0 && b.vip_id == vip_id && b.endpoint == *backend
            })
            .map(|(&id, _)| id)
    }

    /// Every active backend slot by (VIP, backend endpoint).
    fn backend_ids(&self) -> BTreeMap<(Endpoint, Endpoint), u32> {
        let vips: BTreeMap<u32, Endpoint> = self.vips.iter().map(|(ep, v)| (v.id, *ep)).collect();
        self.backends
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_ACTIVE != 0)
            .filter_map(|(&id, b)| Some(((*vips.get(&b.vip_id)?, b.endpoint), id)))
            .collect()
    }

    /// The next generation of a slot: one more than it ever had.
    fn next_generation(&self, id: u32) -> u32 {
        self.backends
            .get(&id)
            .map_or(1, |b| b.generation.wrapping_add(1))
    }
}

/// What the maps should hold besides the VIPs.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// The interfaces the program runs on, by ifindex.
    pub interfaces: BTreeMap<u32, Iface>,
    /// The kernel's links, addresses, routes and neighbours.
    pub topology: Topology,
    /// The program's knobs.
    pub settings: Settings,
    /// The prefixes IPIP outer sources are taken from (IPv4, IPv6); none: the
    /// balancer's own address toward the backend.
    pub ipip_sources: (Option<IpNet>, Option<IpNet>),
}

impl Environment {
    /// The environment of interfaces `(ifindex, roles)` in `topology` (which gives
    /// their MACs).
    pub fn new(topology: Topology, interfaces: &[(u32, u32)], settings: Settings) -> Self {
        let interfaces = interfaces
            .iter()
            .map(|&(index, roles)| {
                let mac = topology
                    .links
                    .get(&index)
                    .map(|l| l.mac)
                    .unwrap_or_default();
                (
                    index,
                    Iface {
                        roles,
                        mac,
                        _pad: [0; 2],
                    },
                )
            })
            .collect();
        Self {
            interfaces,
            topology,
            settings,
            ipip_sources: (None, None),
        }
    }

    /// The source a backend's packets leave with: the balancer's own address toward
    /// it (full NAT, GUE), or for IPIP the base of the configured prefix.
    fn source(&self, forwarding: Forwarding, backend: &Endpoint) -> Option<[u32; 4]> {
        let addr = address_of(&backend.addr, backend.family);
        let prefix = if backend.family == FAMILY_IPV6 {
            self.ipip_sources.1
        } else {
            self.ipip_sources.0
        };
        match (forwarding, prefix) {
            (Forwarding::Nat, _) => Some([0; 4]),
            (Forwarding::DsrIpip, Some(prefix)) => Some(words(prefix.network())),
            _ => self.topology.source_for(addr).map(words),
        }
    }
}

/// The writes that take the maps from one state to another, and what they amount to.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// In the order they must be made.
    pub ops: Vec<Op>,
    /// What the writes change.
    pub report: ApplyReport,
}

/// Plans the writes from `current` to the VIPs of `desired` in `env`; refuses
/// (writing nothing) what does not fit.
pub fn plan(
    current: &MapState,
    desired: &[PlannedVip],
    edge: &EdgeSpec,
    env: &Environment,
) -> Result<Plan, StateError> {
    let refuse = |field: &str, message: String| StateError {
        field: field.into(),
        message,
    };
    if desired.len() > MAX_VIPS as usize {
        return Err(refuse(
            "vips",
            format!("{} VIPs, at most {MAX_VIPS}", desired.len()),
        ));
    }
    let total: usize = desired.iter().map(|p| p.backends.len()).sum();
    if total > MAX_BACKENDS as usize {
        return Err(refuse(
            "vips",
            format!("{total} backends in all, at most {MAX_BACKENDS}"),
        ));
    }
    if let Some(index) = env.interfaces.keys().find(|&&i| i >= MAX_IFINDEX) {
        return Err(refuse(
            "dataplane.interfaces",
            format!("ifindex {index} is beyond the {MAX_IFINDEX} the program can look up"),
        ));
    }
    let mut b = Builder {
        sim: current.clone(),
        plan: Plan::default(),
    };

    // Ids: what stays keeps its id; what comes takes a free one, or, when none is
    // free, one that what goes gives back (it goes first, then).
    let wanted: BTreeSet<Endpoint> = desired.iter().map(|p| p.endpoint).collect();
    let current_ids = current.backend_ids();
    let kept_backend =
        |p: &PlannedVip, backend: &Endpoint| current_ids.get(&(p.endpoint, *backend)).copied();
    let mut free_vips: Vec<u32> = (0..MAX_VIPS)
        .filter(|id| !current.vips.values().any(|v| v.id == *id))
        .rev()
        .collect();
    let mut leaving_vips: Vec<(Endpoint, u32)> = current
        .vips
        .iter()
        .filter(|(ep, _)| !wanted.contains(ep))
        .map(|(ep, v)| (*ep, v.id))
        .collect();
    let active: BTreeSet<u32> = current_ids.values().copied().collect();
    let mut free_backends: Vec<u32> = (0..MAX_BACKENDS)
        .filter(|id| !active.contains(id))
        .rev()
        .collect();
    let staying: BTreeSet<u32> = desired
        .iter()
        .flat_map(|p| p.backends.iter().filter_map(move |be| kept_backend(p, be)))
        .collect();
    let mut leaving_backends: Vec<u32> = active.difference(&staying).copied().collect();

    let mut vip_ids = BTreeMap::new();
    let mut backend_ids: BTreeMap<(Endpoint, Endpoint), u32> = BTreeMap::new();
    for p in desired {
        let id = match current.vip_id(&p.endpoint) {
            Some(id) => id,
            None => match free_vips.pop() {
                Some(id) => id,
                None => {
                    let (ep, id) = leaving_vips
                        .pop()
                        .expect("counted: what goes frees enough ids");
                    b.remove_vip(ep);
                    id
                }
            },
        };
        vip_ids.insert(p.endpoint, id);
        for backend in &p.backends {
            let id = match kept_backend(p, backend) {
                Some(id) => id,
                None => match free_backends.pop() {
                    Some(id) => id,
                    None => {
                        let id = leaving_backends
                            .pop()
                            .expect("counted: what goes frees enough ids");
                        b.retire_backend(id);
                        id
                    }
                },
            };
            backend_ids.insert((p.endpoint, *backend), id);
        }
    }

    // Make: backends, their reply entries, schedules, then the VIP entries.
    for p in desired {
        let vip_id = vip_ids[&p.endpoint];
        let forwarding = p.spec.forwarding;
        let mut ids = Vec::with_capacity(p.backends.len());
        for backend in &p.backends {
            let id = backend_ids[&(p.endpoint, *backend)];
            ids.push(id);
            let addr = address_of(&backend.addr, backend.family);
            let next_hop = env.topology.next_hop(addr).unwrap_or_default();
            // Without an address to send from, full NAT and GUE cannot reach it.
            let sourced = env.source(forwarding, backend);
            if sourced.is_none() {
                b.plan.report.backends_without_source += 1;
            }
            let source = sourced.unwrap_or_default();
            let written = b.sim.backends.get(&id).copied();
            let kept = kept_backend(p, backend).is_some();
            // A flow keeps its backend only while the way there stays the same: the
            // mode, and full NAT's source address (its flows' ports belong to it).
            let same_way = written.is_some_and(|w| {
                w.forwarding == forwarding.code()
                    && (forwarding != Forwarding::Fullnat || w.source == source)
            });
            let slot = Backend {
                endpoint: *backend,
                flags: BACKEND_ACTIVE,
                generation: match written {
                    Some(w) if kept && same_way => w.generation,
                    _ => b.sim.next_generation(id),
                },
                vip_id,
                forwarding: forwarding.code(),
                next_hop,
                source,
            };
            if !kept {
                b.push(Op::FreshBackendId(id));
                b.plan.report.backends_added += 1;
            } else if written.is_some_and(|w| w.next_hop != slot.next_hop) {
                b.plan.report.next_hops_written += 1;
            }
            if written != Some(slot) {
                b.push(Op::SetBackend(id, slot));
            }
            // Only NAT replies are mapped back by the backend's endpoint: full NAT's
            // by their flow, and DSR backends answer clients themselves.
            if forwarding == Forwarding::Nat {
                let target = ReplyTarget {
                    vip: p.endpoint,
                    vip_id,
                    backend_id: id,
                };
                if b.sim.replies.get(backend) != Some(&target) {
                    b.push(Op::SetReply(*backend, target));
                }
            }
        }
        let schedule: Vec<u32> = p.schedule.iter().map(|&i| ids[i as usize]).collect();
        let is_new = current.vip_id(&p.endpoint).is_none();
        if is_new {
            b.push(Op::FreshVipId(vip_id));
            b.plan.report.vips_added += 1;
        }
        let previous = b.sim.schedules.get(&vip_id).cloned().unwrap_or_default();
        let changed = schedule
            .iter()
            .enumerate()
            .filter(|(slot, backend)| previous.get(*slot) != Some(backend))
            .count();
        if changed > 0 || previous.len() != schedule.len() {
            b.plan.report.slots_written += changed;
            b.push(Op::WriteSchedule(vip_id, schedule.clone()));
        }
        let limit = p.spec.new_flow_limit.as_ref();
        let info = VipInfo {
            id: vip_id,
            schedule_len: schedule.len() as u32,
            scheduler: match p.spec.scheduler {
                Scheduler::Rr => SCHED_RR,
                Scheduler::Lc | Scheduler::Wlc => SCHED_LEAST_CONN,
                Scheduler::Maglev | Scheduler::Sh => SCHED_MAGLEV,
            },
            forwarding: forwarding.code(),
            limit_interval_ns: limit.map_or(0, |l| l.interval_ns()),
            limit_prefix_v4: limit.map_or(0, |l| l.prefix_v4),
            limit_prefix_v6: limit.map_or(0, |l| l.prefix_v6),
            hash_prefix_v4: p.spec.hash_prefix_v4,
            hash_prefix_v6: p.spec.hash_prefix_v6,
            limit_burst_ns: limit.map_or(0, |l| l.burst_ns()),
            hash: if p.spec.scheduler.uses_ring() {
                HASH_FLOW
            } else {
                p.spec.flow_hash().code()
            },
            _pad: 0,
        };
        if b.sim.vips.get(&p.endpoint) != Some(&info) {
            b.push(Op::SetVip(p.endpoint, info));
        }
    }

    // Break: what is no longer wanted.
    for (ep, _) in leaving_vips {
        b.remove_vip(ep);
    }
    for id in leaving_backends {
        b.retire_backend(id);
    }
    let target_endpoints: BTreeSet<Endpoint> = desired
        .iter()
        .filter(|p| p.spec.forwarding == Forwarding::Nat)
        .flat_map(|p| p.backends.iter().copied())
        .collect();
    let stale_replies: Vec<Endpoint> = b
        .sim
        .replies
        .keys()
        .filter(|ep| !target_endpoints.contains(ep))
        .copied()
        .collect();
    for ep in stale_replies {
        b.push(Op::RemoveReply(ep));
    }
    b.plan.report.vips_removed = current
        .vips
        .keys()
        .filter(|ep| !wanted.contains(ep))
        .count();
    b.plan.report.backends_removed = active.len() - staying.len();

    // The addresses of the VIPs: closed but for their VIP endpoints, unless open.
    let open: BTreeSet<[u32; 4]> = edge.open_addresses.iter().map(|a| words(*a)).collect();
    let mut uses: BTreeMap<VipAddr, AddrUse> = BTreeMap::new();
    for p in desired {
        let addr = VipAddr {
            addr: p.endpoint.addr,
        };
        let use_ = uses.entry(addr).or_default();
        use_.vips += 1;
        use_.flags = if open.contains(&addr.addr) {
            ADDR_OPEN
        } else {
            0
        };
    }
    let gone: Vec<VipAddr> = b
        .sim
        .vip_addresses
        .keys()
        .filter(|a| !uses.contains_key(a))
        .copied()
        .collect();
    for addr in gone {
        b.push(Op::SetVipAddress(addr, AddrUse::default()));
    }
    for (addr, use_) in uses {
        if b.sim.vip_addresses.get(&addr) != Some(&use_) {
            b.push(Op::SetVipAddress(addr, use_));
        }
    }
    plan_acls(&mut b, desired, edge, &vip_ids);
    // The addresses of NAT backends (fragments from them are dropped, not leaked).
    let mut uses: BTreeMap<VipAddr, u32> = BTreeMap::new();
    for p in desired
        .iter()
        .filter(|p| p.spec.forwarding == Forwarding::Nat)
    {
        for backend in &p.backends {
            *uses.entry(VipAddr { addr: backend.addr }).or_default() += 1;
        }
    }
    let gone: Vec<VipAddr> = b
        .sim
        .backend_addresses
        .keys()
        .filter(|a| !uses.contains_key(a))
        .copied()
        .collect();
    for addr in gone {
        b.push(Op::SetBackendAddress(addr, 0));
    }
    for (addr, n) in uses {
        if b.sim.backend_addresses.get(&addr) != Some(&n) {
            b.push(Op::SetBackendAddress(addr, n));
        }
    }

    // Where the program runs, the client side's next hops, the knobs.
    for (&index, iface) in &env.interfaces {
        if b.sim.interfaces.get(&index) != Some(iface) {
            b.push(Op::SetInterface(index, *iface));
        }
    }
    let dropped: Vec<u32> = b
        .sim
        .interfaces
        .keys()
        .filter(|i| !env.interfaces.contains_key(i))
        .copied()
        .collect();
    for index in dropped {
        b.push(Op::SetInterface(index, Iface::default()));
    }
    let client_side: Vec<u32> = env
        .interfaces
        .iter()
        .filter(|(_, i)| i.roles & foobar_lb_common::ROLE_CLIENT != 0)
        .map(|(&index, _)| index)
        .collect();
    let (routes, neighbours) = env.topology.client_side(&client_side);
    let before = b.plan.ops.len();
    let stale: Vec<IpNet> = b
        .sim
        .routes
        .keys()
        .filter(|k| !routes.contains_key(k))
        .copied()
        .collect();
    for key in stale {
        b.push(Op::RemoveRoute(key));
    }
    for (key, route) in routes {
        if b.sim.routes.get(&key) != Some(&route) {
            b.push(Op::SetRoute(key, route));
        }
    }
    let stale: Vec<IpAddr> = b
        .sim
        .neighbours
        .keys()
        .filter(|k| !neighbours.contains_key(k))
        .copied()
        .collect();
    for addr in stale {
        b.push(Op::RemoveNeighbour(addr));
    }
    for (addr, hop) in neighbours {
        if b.sim.neighbours.get(&addr) != Some(&hop) {
            b.push(Op::SetNeighbour(addr, hop));
        }
    }
    b.plan.report.client_side_written = b.plan.ops.len() - before;
    if b.sim.settings != env.settings {
        b.push(Op::SetSettings(env.settings));
    }
    Ok(b.plan)
}

/// The access lists: rules added or changed first, then each scope's flags, then the
/// rules that go. A rule keeps its id (and counter) while its scope and prefix stay.
fn plan_acls(
    b: &mut Builder,
    desired: &[PlannedVip],
    edge: &EdgeSpec,
    vip_ids: &BTreeMap<Endpoint, u32>,
) {
    let mut wanted: BTreeMap<(u32, IpNet), Action> = BTreeMap::new();
    wanted.extend(edge.acl.rules().map(|(net, action)| ((0, net), action)));
    for p in desired {
        let scope = 1 + vip_ids[&p.endpoint];
        wanted.extend(
            p.spec
                .acl
                .rules()
                .map(|(net, action)| ((scope, net), action)),
        );
    }
    let mut flags: BTreeMap<u32, u32> = BTreeMap::new();
    for (&(scope, _), action) in &wanted {
        let f = flags.entry(scope).or_default();
        *f |= ACL_RULES;
        if *action == Action::Allow {
            *f |= ACL_DEFAULT_DENY;
        }
    }
    if !wanted.is_empty() {
        *flags.entry(0).or_default() |= ACL_ANY;
    }
    let leaving: Vec<(u32, IpNet)> = b
        .sim
        .acls
        .keys()
        .filter(|k| !wanted.contains_key(k))
        .copied()
        .collect();
    let used: BTreeSet<u32> = b.sim.acls.values().map(|r| r.id).collect();
    let mut free: Vec<u32> = (0..MAX_ACL_RULES)
        .filter(|id| !used.contains(id))
        .rev()
        .collect();
    let mut leaving_ids = leaving.clone();
    for (&key, action) in &wanted {
        let rule = match b.sim.acls.get(&key) {
            Some(rule) => AclRule {
                action: action.code(),
                ..*rule
            },
            None => {
                let id = match free.pop() {
                    Some(id) => id,
                    None => {
                        // Counted: no more rules than ids, so what goes frees enough.
                        let gone = leaving_ids.pop().expect("a leaving rule");
                        let id = b.sim.acls[&gone].id;
                        b.push(Op::RemoveAcl(gone.0, gone.1));
                        id
                    }
                };
                b.push(Op::FreshAclRule(id));
                AclRule {
                    id,
                    action: action.code(),
                }
            }
        };
        if b.sim.acls.get(&key) != Some(&rule) {
            b.push(Op::SetAcl(key.0, key.1, rule));
        }
    }
    let scopes: BTreeSet<u32> = flags
        .keys()
        .chain(b.sim.acl_scopes.keys())
        .copied()
        .collect();
    for scope in scopes {
        let f = flags.get(&scope).copied().unwrap_or(0);
        if b.sim.acl_scopes.get(&scope).copied().unwrap_or(0) != f {
            b.push(Op::SetAclScope(scope, f));
        }
    }
    for key in leaving {
        if b.sim.acls.contains_key(&key) {
            b.push(Op::RemoveAcl(key.0, key.1));
        }
    }
}

/// A plan being made, and the state it leads to.
struct Builder {
    sim: MapState,
    plan: Plan,
}

impl Builder {
    fn push(&mut self, op: Op) {
        self.sim.record(&op);
        self.plan.ops.push(op);
    }

    fn remove_vip(&mut self, ep: Endpoint) {
        if self.sim.vips.contains_key(&ep) {
            self.push(Op::RemoveVip(ep));
        }
    }

    /// Takes a slot out of service: its flows, whatever their generation, go back to
    /// their VIPs' schedules.
    fn retire_backend(&mut self, id: u32) {
        let Some(slot) = self.sim.backends.get(&id).copied() else {
            return;
        };
        if slot.flags & BACKEND_ACTIVE == 0 {
            return;
        }
        let retired = Backend {
            flags: 0,
            generation: self.sim.next_generation(id),
            ..slot
        };
        self.push(Op::SetBackend(id, retired));
        if self
            .sim
            .replies
            .get(&slot.endpoint)
            .is_some_and(|t| t.backend_id == id)
        {
            self.push(Op::RemoveReply(slot.endpoint));
        }
    }
}

/// A VIP as applied: its ids and schedule, for status and the simulator.
#[derive(Clone, Debug)]
pub struct AppliedVip {
    /// Its index in the per-VIP arrays.
    pub id: u32,
    /// The plan it was written from.
    pub plan: PlannedVip,
    /// Backend ids, in the order of `plan.backends`.
    pub backend_ids: Vec<u32>,
    /// The schedule as written: backend ids per slot.
    pub schedule: Vec<u32>,
}

impl AppliedVip {
    /// The id of one of its backends.
    pub fn backend_id(&self, backend: &Endpoint) -> Option<u32> {
        let i = self.plan.backends.iter().position(|b| b == backend)?;
        Some(self.backend_ids[i])
    }

    fn endpoint_of(&self, backend_id: u32) -> Option<Endpoint> {
        let i = self.backend_ids.iter().position(|&id| id == backend_id)?;
        Some(self.plan.backends[i])
    }
}

/// The data plane together with what has been written into it.
pub struct Balancer {
    dataplane: Dataplane,
    state: MapState,
    plans: BTreeMap<Endpoint, PlannedVip>,
    edge: EdgeSpec,
    env: Environment,
    fail_after: Option<usize>,
}

impl Balancer {
    /// Takes over a freshly loaded data plane (empty maps).
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            dataplane,
            state: MapState::default(),
            plans: BTreeMap::new(),
            edge: EdgeSpec::default(),
            env: Environment::default(),
            fail_after: None,
        }
    }

    /// Takes over a data plane whose maps were reopened from pins: what an earlier
    /// agent wrote is read back, so the next [`Balancer::apply`] writes only what
    /// differs and keeps every flow.
    pub fn adopt(mut dataplane: Dataplane) -> Result<Self, DataplaneError> {
        let state = dataplane.read_state()?;
        let mut plans = BTreeMap::new();
        for (endpoint, info) in &state.vips {
            let mut backends: Vec<(u32, Endpoint)> = state
                .backends
                .iter()
                .filter(|(_, b)| b.flags & BACKEND_ACTIVE != 0 && b.vip_id == info.id)
                .map(|(&id, b)| (id, b.endpoint))
                .collect();
            backends.sort();
            // (Weighted least connections reads back as least connections: they
            // differ in the agent only.)
            let scheduler = match (info.scheduler, info.hash) {
                (SCHED_MAGLEV, HASH_SOURCE) => Scheduler::Sh,
                (SCHED_MAGLEV, _) => Scheduler::Maglev,
                (SCHED_LEAST_CONN, _) => Scheduler::Lc,
                _ => Scheduler::Rr,
            };
            let forwarding = Forwarding::from_code(info.forwarding);
            plans.insert(
                *endpoint,
                PlannedVip::adopted(*endpoint, scheduler, forwarding, &backends),
            );
        }
        Ok(Self {
            dataplane,
            state,
            plans,
            edge: EdgeSpec::default(),
            env: Environment::default(),
            fail_after: None,
        })
    }

    /// The data plane, for attaching, counters and tests.
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// What has been written.
    pub fn state(&self) -> &MapState {
        &self.state
    }

    /// Makes the next apply fail after `writes` writes (tests of recovery).
    pub fn inject_failure_after(&mut self, writes: usize) {
        self.fail_after = Some(writes);
    }

    /// The VIPs as applied.
    pub fn vips(&self) -> impl Iterator<Item = AppliedVip> + '_ {
        self.plans.keys().filter_map(|ep| self.vip(ep))
    }

    /// The VIPs whose rings follow their connection counts (no schedule copied).
    pub fn least_connections_vips(&self) -> Vec<Endpoint> {
        self.plans
            .iter()
            .filter(|(_, p)| p.spec.scheduler.counts_connections())
            .map(|(ep, _)| *ep)
            .collect()
    }

    /// A VIP's id, if it is applied.
    pub fn vip_id(&self, endpoint: &Endpoint) -> Option<u32> {
        self.state.vip_id(endpoint)
    }

    /// One applied VIP.
    pub fn vip(&self, endpoint: &Endpoint) -> Option<AppliedVip> {
        let plan = self.plans.get(endpoint)?;
        let id = self.state.vip_id(endpoint)?;
        let backend_ids = plan
            .backends
            .iter()
            .map(|b| self.state.backend_id(endpoint, b))
            .collect::<Option<Vec<u32>>>()?;
        Some(AppliedVip {
            id,
            plan: plan.clone(),
            backend_ids,
            schedule: self.state.schedules.get(&id).cloned().unwrap_or_default(),
        })
    }

    /// Makes the maps match `desired` in the current environment, or changes nothing
    /// if it is invalid.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport, ApplyError> {
        let plans = desired.plan()?;
        self.apply_plans(plans, desired.edge.clone())
    }

    /// Changes the environment (interfaces, topology, settings) and writes what it
    /// changes for the VIPs applied last.
    pub fn set_environment(&mut self, env: Environment) -> Result<ApplyReport, ApplyError> {
        self.env = env;
        let plans: Vec<PlannedVip> = self.plans.values().cloned().collect();
        self.apply_plans(plans, self.edge.clone())
    }

    /// Sets the environment the next [`Balancer::apply`] plans for, writing nothing
    /// now (the agent's start: one plan for everything).
    pub fn stage_environment(&mut self, env: Environment) {
        self.env = env;
    }

    /// The environment the maps were last planned for.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    fn apply_plans(
        &mut self,
        plans: Vec<PlannedVip>,
        edge: EdgeSpec,
    ) -> Result<ApplyReport, ApplyError> {
        let planned = plan(&self.state, &plans, &edge, &self.env)?;
        for op in &planned.ops {
            if let Some(n) = self.fail_after.as_mut() {
                if *n == 0 {
                    self.fail_after = None;
                    return Err(ApplyError::Injected);
                }
                *n -= 1;
            }
            self.execute(op)?;
            self.state.record(op);
        }
        self.fail_after = None;
        self.plans = plans.into_iter().map(|p| (p.endpoint, p)).collect();
        self.edge = edge;
        Ok(planned.report)
    }

    fn execute(&mut self, op: &Op) -> Result<(), DataplaneError> {
        let dp = &mut self.dataplane;
        match op {
            Op::FreshVipId(id) => {
                dp.reset_vip_stats(*id)?;
                dp.set_rr_cursor(*id, 0)
            }
            Op::FreshBackendId(id) => dp.reset_backend_stats(*id),
            Op::SetBackend(id, b) => dp.set_backend(*id, b),
            Op::SetReply(ep, t) => dp.set_reply(ep, t),
            Op::RemoveReply(ep) => dp.remove_reply(ep),
            Op::WriteSchedule(id, slots) => {
                let previous = self
                    .state
                    .schedules
                    .get(id)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                dp.write_schedule(*id, slots, previous).map(|_| ())
            }
            Op::SetVip(ep, info) => dp.set_vip(ep, info),
            Op::RemoveVip(ep) => dp.remove_vip(ep),
            Op::SetVipAddress(addr, use_) => dp.set_vip_address(addr, use_),
            Op::FreshAclRule(id) => dp.reset_acl_stats(*id),
            Op::SetAcl(scope, net, rule) => dp.set_acl(*scope, net, rule),
            Op::RemoveAcl(scope, net) => dp.remove_acl(*scope, net),
            Op::SetAclScope(scope, flags) => dp.set_acl_scope(*scope, *flags),
            Op::SetBackendAddress(addr, n) => dp.set_backend_address_uses(addr, *n),
            Op::SetInterface(index, iface) => dp.set_interface(*index, iface),
            Op::SetRoute(prefix, route) => dp.set_route(prefix, route),
            Op::RemoveRoute(prefix) => dp.remove_route(prefix),
            Op::SetNeighbour(addr, hop) => dp.set_neighbour(addr, hop),
            Op::RemoveNeighbour(addr) => dp.remove_neighbour(addr),
            Op::SetSettings(settings) => dp.set_settings(settings),
        }
    }

    /// Rewrites a VIP's ring of the same length (least connections' plan), the slots
    /// that differ only. Returns how many were written.
    pub fn rewrite_ring(&mut self, vip_id: u32, ring: &[u32]) -> Result<usize, DataplaneError> {
        let previous = self
            .state
            .schedules
            .get(&vip_id)
            .cloned()
            .unwrap_or_default();
        if previous.len() != ring.len() {
            // A change of the VIP is being applied; its plan comes next time.
            return Ok(0);
        }
        let written = self.dataplane.write_schedule(vip_id, ring, &previous)?;
        self.state.schedules.insert(vip_id, ring.to_vec());
        Ok(written)
    }

    /// Sends the flows of one backend of a VIP back to the schedule (a down backend
    /// with `on_backend_down = "reset"`): its slot's generation moves on. Returns
    /// whether there was such a backend.
    pub fn reset_flows(
        &mut self,
        vip: &Endpoint,
        backend: &Endpoint,
    ) -> Result<bool, DataplaneError> {
        let Some(id) = self.state.backend_id(vip, backend) else {
            return Ok(false);
        };
        let Some(slot) = self.state.backends.get(&id).copied() else {
            return Ok(false);
        };
        let op = Op::SetBackend(
            id,
            Backend {
                generation: self.state.next_generation(id),
                ..slot
            },
        );
        self.execute(&op)?;
        self.state.record(&op);
        Ok(true)
    }

    /// The simulator: which backend a new flow from `client:port` to `vip` would get,
    /// computed from the schedule as written, without the kernel.
    pub fn explain(
        &mut self,
        vip: &Endpoint,
        client: IpAddr,
        client_port: u16,
    ) -> Result<Option<Endpoint>, DataplaneError> {
        let Some(applied) = self.vip(vip) else {
            return Ok(None);
        };
        let len = applied.schedule.len() as u32;
        if len == 0 {
            return Ok(None);
        }
        let spec = &applied.plan.spec;
        let slot = if spec.scheduler.uses_ring() {
            // The next ring slot is wherever the shared cursor stands now.
            self.dataplane.rr_cursor(applied.id)? % len
        } else {
            let (src, sport) = (words(client), client_port.to_be());
            let fields = spec.flow_hash().code();
            let hash = if vip.family == FAMILY_IPV6 {
                let tuple = (src, vip.addr, sport, vip.port, vip.proto);
                vip_hash_v6(fields, spec.hash_prefix_v6, tuple)
            } else {
                let tuple = (src[0], vip.addr[0], sport, vip.port, vip.proto);
                vip_hash_v4(fields, spec.hash_prefix_v4, tuple)
            };
            hash % len
        };
        Ok(applied.endpoint_of(applied.schedule[slot as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendSpec, Protocol, VipSpec};

    fn vip(n: u8, backends: &[u8]) -> VipSpec {
        VipSpec {
            name: format!("v{n}"),
            address: std::net::Ipv4Addr::new(10, 0, 0, n).into(),
            port: 80,
            protocol: Protocol::Tcp,
            scheduler: Scheduler::Rr,
            forwarding: Forwarding::Nat,
            maglev_table_size: crate::schedule::DEFAULT_MAGLEV_SIZE,
            hash: None,
            hash_prefix_v4: 32,
            hash_prefix_v6: 128,
            backends: backends
                .iter()
                .map(|&b| BackendSpec {
                    address: std::net::Ipv4Addr::new(10, 1, n, b).into(),
                    port: 8080,
                    weight: 1,
                })
                .collect(),
            health_check: None,
            on_backend_down: Default::default(),
            acl: Default::default(),
            new_flow_limit: None,
        }
    }

    fn planned(vips: Vec<VipSpec>) -> Vec<PlannedVip> {
        DesiredState {
            vips,
            ..Default::default()
        }
        .plan()
        .unwrap()
    }

    /// Plans and "executes" (records) the writes.
    fn step(state: &mut MapState, vips: Vec<VipSpec>) -> Plan {
        let plan = plan(
            state,
            &planned(vips),
            &EdgeSpec::default(),
            &Environment::default(),
        )
        .unwrap();
        for op in &plan.ops {
            state.record(op);
        }
        plan
    }

    #[test]
    fn a_swap_that_does_not_fit_side_by_side_removes_first() {
        let mut state = MapState::default();
        step(&mut state, (1..=40).map(|n| vip(n, &[1, 2])).collect());
        assert_eq!(state.vips.len(), 40);
        let plan = step(&mut state, (101..=140).map(|n| vip(n, &[1])).collect());
        assert_eq!(state.vips.len(), 40);
        assert!(
            state
                .vips
                .keys()
                .all(|ep| ep.addr[0].to_ne_bytes()[3] > 100)
        );
        assert_eq!((plan.report.vips_added, plan.report.vips_removed), (40, 40));
        // Never more than 64 VIP entries at once, and every VIP entry written after
        // its schedule and backends.
        let mut live = MapState::default();
        let mut most = 0;
        let mut replay = MapState::default();
        step(&mut replay, (1..=40).map(|n| vip(n, &[1, 2])).collect());
        live.clone_from(&replay);
        for op in &plan.ops {
            live.record(op);
            most = most.max(live.vips.len());
            if let Op::SetVip(_, info) = op {
                let schedule = &live.schedules[&info.id];
                assert_eq!(schedule.len() as u32, info.schedule_len);
                for id in schedule {
                    assert_eq!(live.backends[id].flags, BACKEND_ACTIVE);
                }
            }
        }
        assert!(most <= MAX_VIPS as usize, "{most}");
        // The ids freed were reused only after their VIPs were removed; the slots
        // reused have a new generation.
        for b in state
            .backends
            .values()
            .filter(|b| b.flags == BACKEND_ACTIVE)
        {
            assert!(b.generation >= 1);
        }
    }

    #[test]
    fn reused_slots_get_a_new_generation() {
        let mut state = MapState::default();
        step(&mut state, vec![vip(1, &[1])]);
        let first = state.backends[&0];
        step(&mut state, vec![vip(1, &[2])]);
        // The new backend took a never-used slot; the old one is retired.
        assert_eq!(state.backends[&0].flags, 0);
        assert!(state.backends[&0].generation > first.generation);
        step(
            &mut state,
            vec![vip(1, &[2]), vip(2, &(1..=255).collect::<Vec<_>>())],
        );
        assert!(state.backends.values().filter(|b| b.flags != 0).count() == 256);
    }

    #[test]
    fn a_plan_that_changes_nothing_writes_nothing() {
        let mut state = MapState::default();
        step(&mut state, vec![vip(1, &[1, 2, 3])]);
        let again = step(&mut state, vec![vip(1, &[1, 2, 3])]);
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn refuses_what_cannot_fit_at_all() {
        let state = MapState::default();
        let too_many: Vec<VipSpec> = (0..65).map(|n| vip(n, &[])).collect();
        let plans: Vec<PlannedVip> = too_many
            .iter()
            .map(|v| planned(vec![v.clone()]).remove(0))
            .collect();
        let refused = plan(
            &state,
            &plans,
            &EdgeSpec::default(),
            &Environment::default(),
        )
        .unwrap_err();
        assert_eq!(refused.field, "vips");
    }

    #[test]
    fn access_lists_keep_rule_ids_and_add_before_they_remove() {
        let mut state = MapState::default();
        let vips = planned(vec![vip(1, &[1])]);
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let mut edge = EdgeSpec::default();
        edge.acl.deny = vec![net("192.0.2.0/24")];
        let apply = |state: &mut MapState, edge: &EdgeSpec| {
            let p = plan(state, &vips, edge, &Environment::default()).unwrap();
            for op in &p.ops {
                state.record(op);
            }
            p.ops
        };
        apply(&mut state, &edge);
        let kept = state.acls[&(0, net("192.0.2.0/24"))];
        assert_eq!(state.acl_scopes.get(&0), Some(&(ACL_ANY | ACL_RULES)));

        // A VIP's allow list: its scope defaults to deny; the global rule keeps its id.
        let mut with_vip_list = edge.clone();
        let mut vips_with_list = vips.clone();
        vips_with_list[0].spec.acl.allow = vec![net("10.0.0.0/8")];
        let p = plan(
            &state,
            &vips_with_list,
            &with_vip_list,
            &Environment::default(),
        )
        .unwrap();
        for op in &p.ops {
            state.record(op);
        }
        assert_eq!(state.acls[&(0, net("192.0.2.0/24"))], kept);
        let scope = 1 + state.vips.values().next().unwrap().id;
        assert_eq!(
            state.acl_scopes.get(&scope),
            Some(&(ACL_RULES | ACL_DEFAULT_DENY))
        );

        // A replaced rule: the new one is written before the old one goes.
        with_vip_list.acl.deny = vec![net("198.51.100.0/24")];
        let ops = plan(
            &state,
            &vips_with_list,
            &with_vip_list,
            &Environment::default(),
        )
        .unwrap()
        .ops;
        let set = ops
            .iter()
            .position(|op| matches!(op, Op::SetAcl(0, n, _) if *n == net("198.51.100.0/24")));
        let removed = ops
            .iter()
            .position(|op| matches!(op, Op::RemoveAcl(0, n) if *n == net("192.0.2.0/24")));
        assert!(set.unwrap() < removed.unwrap(), "{ops:?}");

        // No rule left: every scope is cleared.
        let ops = apply(&mut state, &EdgeSpec::default());
        assert!(
            ops.iter().any(|op| matches!(op, Op::SetAclScope(0, 0))),
            "{ops:?}"
        );
        assert!(state.acls.is_empty() && state.acl_scopes.is_empty());
    }
}
