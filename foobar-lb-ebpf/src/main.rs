//! The foobar-lb XDP data plane.
//!
//! One program, `foobar_lb`, attached to the balancer's client-side and backend-side
//! interfaces. A client packet for a VIP is steered to a backend (flow table first,
//! the VIP's schedule for a new flow) and its destination rewritten; a backend's reply
//! gets its source rewritten back to the VIP; anything else passes to the kernel
//! untouched. Every decision that can be made ahead of time (the schedules, which
//! endpoints are backends) is made by the agent and written into the maps below.
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
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use foobar_lb_common::{
    Backend, Counters, DEFAULT_FLOW_CAPACITY, Endpoint, FlowKey, FlowState, MAX_BACKENDS,
    MAX_TX_PORTS, MAX_VIPS, Reason, ReplyTarget, SCHEDULE_STRIDE, TrafficStats, VipAddr, VipInfo,
};

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
#[map]
static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
#[map]
static REPLIES: HashMap<Endpoint, ReplyTarget> = HashMap::with_max_entries(MAX_BACKENDS, 0);
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(MAX_TX_PORTS, 0);
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

/// This CPU's counters; `None` cannot happen for index 0 but the verifier wants the check.
#[inline(always)]
fn counters() -> Option<&'static mut Counters> {
    COUNTERS.get_ptr_mut(0).map(|c| unsafe { &mut *c })
}

/// Counts an event or an outcome.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = counters() {
        c.by_reason[reason as usize] += 1;
    }
}

#[xdp]
pub fn foobar_lb(ctx: XdpContext) -> u32 {
    let verdict = match steer::balance(&ctx) {
        Ok(v) | Err(v) => v,
    };
    count(verdict.reason);
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
