//! Sending a rewritten packet on: the kernel's FIB and neighbour tables give the
//! egress interface and both MAC addresses, so routes and ARP stay the kernel's job.
//!
//! The balancer forwards as a middlebox, as Katran and Cilium's XDP balancer do: the
//! TTL is left alone. A packet is rewritten at most once (its new destination is no
//! VIP), so the balancer cannot loop it.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action::XDP_PASS,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use foobar_lb_common::Reason;
use network_types::eth::EthHdr;

use crate::{
    TX_PORTS, Verdict,
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;

/// Where the kernel would send a packet: egress interface and both MACs.
pub struct Route {
    fib: FibParams,
    ingress: u32,
}

/// Routes a packet from `src` to `dst`; the error is the verdict when it is not to be
/// sent on by us: next hop unresolved, or "not forwarded" (`PassLocal`), which the
/// kernel answers both for its own addresses and for no route at all.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &Packet, dst: u32, src: u32) -> Result<Route, Verdict> {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut fib: FibParams = unsafe { zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = pkt.tot_len;
    fib.__bindgen_anon_2.tos = pkt.tos;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    let rc = unsafe { bpf_fib_lookup(ctx.ctx.cast(), &mut fib, size_of::<FibParams>() as i32, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(Route { fib, ingress }),
        // The kernel forwards the rewritten packet itself and resolves the neighbour.
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Verdict::of(Reason::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_NOT_FWDED => Err(Verdict::of(Reason::PassLocal)),
        _ => Err(Verdict::of(Reason::DropNoRoute)),
    }
}

/// Sends a packet out on its route: XDP_TX back out of its interface, or a redirect.
#[inline(always)]
pub fn send(ctx: &XdpContext, route: &Route) -> Verdict {
    let fib = &route.fib;
    let (action, reason) = if fib.ifindex == route.ingress {
        (aya_ebpf::bindings::xdp_action::XDP_TX, Reason::Tx)
    } else {
        match TX_PORTS.redirect(fib.ifindex, XDP_PASS as u64) {
            Ok(action) => (action, Reason::Redirect),
            // Left to the kernel with its MACs untouched, so the stack accepts it.
            Err(_) => return Verdict::of(Reason::PassNotTxPort),
        }
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::of(Reason::DropTruncatedEthernet);
    };
    unsafe {
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    Verdict { action, reason }
}

/// Routes a packet rewritten to `src` → `dst` and sends it. A rewritten packet that
/// the kernel would not forward has nowhere to go: dropped.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, dst: u32, src: u32) -> Verdict {
    match route(ctx, pkt, dst, src) {
        Ok(route) => send(ctx, &route),
        Err(verdict) if verdict.reason == Reason::PassLocal => Verdict::of(Reason::DropNoRoute),
        Err(verdict) => verdict,
    }
}
