//! The foobar-lb XDP data plane.
//!
//! One program, `foobar_lb`, attached to the balancer's client-side and backend-side
//! interfaces, for IPv4 and IPv6. A client packet of a known flow goes straight to its
//! backend (one flow lookup, one backend slot); a new one is scheduled by its VIP; it
//! leaves by the VIP's forwarding mode: NAT, full NAT, or encapsulated for direct
//! server return. A NAT backend's reply gets the VIP back as its source (and full NAT's
//! the client as its destination); ICMP about VIP flows is steered and translated;
//! anything else passes to the kernel untouched. Every decision that can be made ahead of time (the schedules, which
//! endpoints are backends, where each backend's next hop is and what MAC it has, the
//! client side's routes and neighbours) is made by the agent and written into the
//! maps below.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic fetch-add for the round-robin cursor, fetch-or for flow flags"
)]

mod conn;
mod edge;
mod encap;
mod family;
mod forward;
mod icmp;
mod nat;
mod parse;
mod rate;
mod steer;
mod synproxy;

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use foobar_lb_common::{
    ACL_SCOPE_COUNT, AclKey, AclRule, AddrUse, Backend, Counters, DEFAULT_FLOW_CAPACITY, Endpoint,
    FlowKey, FlowKey6, FlowState, Iface, MAX_ACL_RULES, MAX_BACKENDS, MAX_IFINDEX, MAX_NEIGHBOURS,
    MAX_ROUTES, MAX_TX_PORTS, MAX_VIPS, NatTarget, NextHop, RateWindow, Reason, ReplyTarget, Route,
    SCHEDULE_STRIDE, SOURCE_LIMIT_CAPACITY, Settings, SourceKey, TrafficStats, VipAddr, VipInfo,
    reason::{EVENT_COUNT, FIRST_EVENT},
};

#[map]
static INTERFACES: Array<Iface> = Array::with_max_entries(MAX_IFINDEX, 0);
#[map]
static VIPS: HashMap<Endpoint, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static VIP_ADDRS: HashMap<VipAddr, AddrUse> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static ACLS: LpmTrie<AclKey, AclRule> = LpmTrie::with_max_entries(MAX_ACL_RULES, 0);
#[map]
static ACL_SCOPES: Array<u32> = Array::with_max_entries(ACL_SCOPE_COUNT, 0);
#[map]
static ACL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_ACL_RULES, 0);
/// One LRU list for all CPUs: a source's flows may arrive on any of them.
#[map]
static SOURCE_LIMITS: LruHashMap<SourceKey, u64> =
    LruHashMap::with_max_entries(SOURCE_LIMIT_CAPACITY, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static SCHEDULES: Array<u32> = Array::with_max_entries(MAX_VIPS * SCHEDULE_STRIDE, 0);
#[map]
static RR_CURSORS: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);
/// LRU lists per CPU (no common LRU lock); lookups still see every CPU's entries.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, BPF_F_NO_COMMON_LRU);
#[map]
static FLOWS6: LruHashMap<FlowKey6, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, BPF_F_NO_COMMON_LRU);
/// Full NAT's reverse entries; one LRU list for all CPUs, as a flow's two directions
/// may be handled by different CPUs.
#[map]
static NAT_FLOWS: LruHashMap<FlowKey, NatTarget> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
#[map]
static NAT_FLOWS6: LruHashMap<FlowKey6, NatTarget> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
#[map]
static REPLIES: HashMap<Endpoint, ReplyTarget> = HashMap::with_max_entries(MAX_BACKENDS, 0);
#[map]
static BACKEND_ADDRS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);
#[map]
static ROUTES: LpmTrie<u32, Route> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static ROUTES6: LpmTrie<[u32; 4], Route> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static NEIGHBOURS: HashMap<u32, NextHop> = HashMap::with_max_entries(MAX_NEIGHBOURS, 0);
#[map]
static NEIGHBOURS6: HashMap<[u32; 4], NextHop> = HashMap::with_max_entries(MAX_NEIGHBOURS, 0);
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
/// SYN cookies: whether flows were opened by them, when one was last sent.
#[map]
static PROXIED: Array<u64> = Array::with_max_entries(2, 0);
#[map]
static FLOOD: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);
#[map]
static ICMP_RATE: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);
/// Room the program uses instead of its stack: the call chain shares 512 bytes.
pub struct Scratch {
    v4: parse::Packet<family::V4>,
    v6: parse::Packet<family::V6>,
    quoted4: icmp::Quoted<family::V4>,
    quoted6: icmp::Quoted<family::V6>,
    nat4: family::NatScratch<family::V4>,
    nat6: family::NatScratch<family::V6>,
    fib: aya_ebpf::bindings::bpf_fib_lookup,
    edge: edge::EdgeScratch,
    syn: synproxy::SynScratch,
}
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
#[map]
static VIP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// What to do with a packet, and why.
#[derive(Clone, Copy)]
pub struct Verdict {
    action: u32,
    /// A [`Reason`], as its number (it may have crossed a function boundary packed).
    reason: u32,
}

impl Verdict {
    /// The verdict of an outcome reason (each outcome has exactly one action).
    #[inline(always)]
    pub const fn of(reason: Reason) -> Self {
        let action = match reason.action() {
            Some(action) => action,
            None => aya_ebpf::bindings::xdp_action::XDP_PASS,
        };
        Self {
            action,
            reason: reason as u32,
        }
    }

    /// Whether this is the verdict of `reason`.
    #[inline(always)]
    pub fn is(&self, reason: Reason) -> bool {
        self.reason == reason as u32
    }
}

/// What a function that is not inlined returns: one register. (An aggregate would be
/// returned through memory, leaving a stale value in r0 that the verifier may refuse
/// as a pointer into the callee's stack.) Zero means go on; [`Status::NOT_OURS`] that
/// the packet was not the function's to handle; anything else is a verdict, packed.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Status(u64);

impl Status {
    /// Done, go on.
    pub const GO_ON: Status = Status(0);
    /// Not this function's packet.
    pub const NOT_OURS: Status = Status(1);
    /// ICMP, for the ICMP functions.
    pub const ICMP: Status = Status(2);
    /// A client's ACK proved its SYN cookie (see `synproxy`).
    pub const PROVEN: Status = Status(3);
    /// A SYN counted in the flood window, no flood (see `synproxy`).
    pub const CALM: Status = Status(4);
    /// A SYN counted in the flood window during a flood, without a cookie.
    pub const FLOODED: Status = Status(5);
    /// A client's zero-window probe proved its SYN cookie (see `synproxy`).
    pub const PROBE_PROVEN: Status = Status(6);
    const VERDICT: u64 = 1 << 63;
    const TOO_BIG: u64 = 1 << 62;

    /// Too big for the way on: the caller answers with ICMP, announcing this MTU.
    #[inline(always)]
    pub const fn too_big(mtu: u16) -> Status {
        Status(Self::TOO_BIG | mtu as u64)
    }

    /// The MTU of a [`Status::too_big`].
    #[inline(always)]
    pub fn mtu(self) -> Option<u16> {
        (self.0 & Self::TOO_BIG != 0).then_some(self.0 as u16)
    }

    /// A verdict.
    #[inline(always)]
    pub const fn verdict(v: Verdict) -> Status {
        Status(Self::VERDICT | (v.action as u64) << 32 | v.reason as u64)
    }

    /// The status of a result.
    #[inline(always)]
    pub fn of(result: Result<(), Verdict>) -> Status {
        match result {
            Ok(()) => Status::GO_ON,
            Err(v) => Status::verdict(v),
        }
    }

    /// The verdict, if it is one.
    #[inline(always)]
    pub fn into_verdict(self) -> Option<Verdict> {
        (self.0 & Self::VERDICT != 0).then_some(Verdict {
            action: (self.0 >> 32) as u32 & 0xff,
            reason: self.0 as u32,
        })
    }

    /// `Err` with the verdict, `Ok` otherwise (go on, or not ours).
    #[inline(always)]
    pub fn check(self) -> Result<Status, Verdict> {
        match self.into_verdict() {
            Some(v) => Err(v),
            None => Ok(self),
        }
    }
}

/// The events of one packet, counted together with its outcome in one lookup of the
/// counters at the end.
#[derive(Clone, Copy, Default)]
pub struct Events(u16);

impl Events {
    /// Notes an event reason.
    #[inline(always)]
    pub fn note(&mut self, reason: Reason) {
        self.0 |= 1 << (reason as usize - FIRST_EVENT);
    }
}

/// Counts a packet's outcome and events: one lookup of this CPU's counters.
#[inline(always)]
fn count(outcome: u32, events: Events) {
    // Index 0 always exists; the verifier wants the check.
    let Some(c) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    let c = unsafe { &mut *c };
    // A verdict made in another function reaches here through memory, where the
    // verifier loses its bounds; the compiler knows them (an enum) and would drop a
    // plain check. The volatile read keeps the check, and the check tells the verifier.
    let index = unsafe { core::ptr::read_volatile(&outcome) } as usize;
    if let Some(counter) = c.by_reason.get_mut(index) {
        *counter += 1;
    }
    if events.0 != 0 {
        for i in 0..EVENT_COUNT {
            if events.0 & (1 << i) != 0 {
                c.by_reason[FIRST_EVENT + i] += 1;
            }
        }
    }
}

#[xdp]
pub fn foobar_lb(ctx: XdpContext) -> u32 {
    let mut events = Events::default();
    let verdict = match steer::balance(&ctx, &mut events) {
        Ok(v) | Err(v) => v,
    };
    count(verdict.reason, events);
    verdict.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
