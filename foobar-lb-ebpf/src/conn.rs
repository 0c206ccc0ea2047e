//! A flow's connection state, kept in its flow-table entry: when it was last seen
//! (the agent forgets flows idle past their timeout) and whether each end has closed.
//! A connection counts as active from its entry's making until it is over: FIN from
//! both ends, an RST from either, or the client's FIN in DSR (whose replies never
//! pass here). Its backend's counters say so once, whichever CPU sees the last end.

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use foobar_lb_common::{
    FLOW_CLOCK_SHIFT, FLOW_CLOSED, FLOW_CLOSING, FLOW_REPLY_CLOSING, FlowState,
};

/// Both ends closed.
const BOTH_ENDS: u16 = FLOW_CLOSING | FLOW_REPLY_CLOSING;

/// The flow clock's tick now (the coarse clock: no clock source is read).
#[inline(always)]
pub fn now() -> u32 {
    (unsafe { bpf_ktime_get_coarse_ns() } >> FLOW_CLOCK_SHIFT) as u32
}

/// Notes a packet of the flow; the entry is written once a tick at most.
#[inline(always)]
pub fn touch(flow: &mut FlowState) {
    let now = now();
    if flow.seen != now {
        flow.seen = now;
    }
}

/// Sets `flags` in a flow entry as one atomic OR (another CPU may be setting others);
/// returns the flags before.
#[inline(always)]
pub fn set_flags(flow: *mut FlowState, flags: u16) -> u16 {
    // The flags are the low half of the word they share with `nat_port`
    // (little-endian), which an OR of flag bits leaves alone.
    let word = unsafe { core::ptr::addr_of_mut!((*flow).flags) }.cast::<u32>();
    // SeqCst: see `take_ticket` in steer.rs (a relaxed fetch-op loses its fetch).
    unsafe { atomic_or::<u32, u32, { AtomicOrdering::SeqCst }>(word, flags as u32) as u16 }
}

/// The closing bits of a FIN (`reset` false) or an RST from one end.
#[inline(always)]
pub fn closing_bits(from_client: bool, reset: bool) -> u16 {
    match (reset, from_client) {
        (true, _) => BOTH_ENDS,
        (false, true) => FLOW_CLOSING,
        (false, false) => FLOW_REPLY_CLOSING,
    }
}

/// An end of the flow closes (`bits` from [`closing_bits`]); `one_way`: only the
/// client's end is ever seen. True if this made the connection over: the caller
/// counts it closed (once: of CPUs racing here, one wins the [`FLOW_CLOSED`] bit).
#[inline(always)]
pub fn close(flow: *mut FlowState, bits: u16, one_way: bool) -> bool {
    let before = set_flags(flow, bits);
    let after = before | bits;
    let over = one_way || after & BOTH_ENDS == BOTH_ENDS;
    if !over || before & FLOW_CLOSED != 0 {
        return false;
    }
    set_flags(flow, FLOW_CLOSED) & FLOW_CLOSED == 0
}

/// The flags a new entry starts with when its first packet closes an end already,
/// with [`FLOW_CLOSED`] if that makes it over.
#[inline(always)]
pub fn born_closing(bits: u16, one_way: bool) -> u16 {
    if bits != 0 && (one_way || bits & BOTH_ENDS == BOTH_ENDS) {
        bits | FLOW_CLOSED
    } else {
        bits
    }
}
