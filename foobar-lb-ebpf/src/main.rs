//! The foobar-lb XDP data plane.
//!
//! One program, `foobar_lb`, attached to the balancer's client-side and backend-side
//! interfaces. A client packet of a known flow goes straight to its backend (one flow
//! lookup, one backend slot); a new one is scheduled by its VIP; a backend's reply
//! gets its source rewritten back to the VIP; anything else passes to the kernel
//! untouched. Every decision that can be made ahead of time (the schedules, which
//! endpoints are backends, where each backend's next hop is and what MAC it has, the
//! client side's routes and neighbours) is made by the agent and written into the
//! maps below.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic fetch-add for the round-robin cursor"
)]

mod forward;
mod nat;
mod parse;
mod steer;

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use foobar_lb_common::{
    Backend, Counters, DEFAULT_FLOW_CAPACITY, Endpoint, FloodWindow, FlowKey, FlowState, Iface,
    MAX_BACKENDS, MAX_IFINDEX, MAX_NEIGHBOURS, MAX_ROUTES, MAX_TX_PORTS, MAX_VIPS, NextHop, Reason,
    ReplyTarget, Route, SCHEDULE_STRIDE, Settings, TrafficStats, VipAddr, VipInfo,
    reason::{EVENT_COUNT, FIRST_EVENT},
};

#[map]
static INTERFACES: Array<Iface> = Array::with_max_entries(MAX_IFINDEX, 0);
#[map]
static VIPS: HashMap<Endpoint, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static VIP_ADDRS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_VIPS, 0);
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
static REPLIES: HashMap<Endpoint, ReplyTarget> = HashMap::with_max_entries(MAX_BACKENDS, 0);
#[map]
static ROUTES: LpmTrie<u32, Route> = LpmTrie::with_max_entries(MAX_ROUTES, 0);
#[map]
static NEIGHBOURS: HashMap<u32, NextHop> = HashMap::with_max_entries(MAX_NEIGHBOURS, 0);
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map]
static FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(1, 0);
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
    reason: Reason,
}

impl Verdict {
    /// The verdict of an outcome reason (each outcome has exactly one action).
    #[inline(always)]
    pub const fn of(reason: Reason) -> Self {
        let action = match reason.action() {
            Some(action) => action,
            None => aya_ebpf::bindings::xdp_action::XDP_PASS,
        };
        Self { action, reason }
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
fn count(outcome: Reason, events: Events) {
    // Index 0 always exists; the verifier wants the check.
    let Some(c) = COUNTERS.get_ptr_mut(0) else {
        return;
    };
    let c = unsafe { &mut *c };
    c.by_reason[outcome as usize] += 1;
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
