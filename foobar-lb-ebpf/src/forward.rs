//! Sending a rewritten packet on. The next hop (egress interface, both MACs, MTU) is
//! normally known already: the agent resolved it from the kernel's routes and
//! neighbours and wrote it into the backend's slot or the client side's neighbour
//! map. Without a valid one the kernel's FIB is asked (`bpf_fib_lookup`), which costs
//! about 100 ns, and routes and ARP stay the kernel's job.
//!
//! The balancer forwards as a middlebox, as Katran and Cilium's XDP balancer do: the
//! TTL is left alone. A packet is rewritten at most once (its new destination is no
//! VIP), so the balancer cannot loop it.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use foobar_lb_common::{NEXT_HOP_VALID, NextHop, Reason};
use network_types::eth::EthHdr;

use crate::{
    Events, TX_PORTS, Verdict,
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;
const _: () = assert!(size_of::<FibParams>() == 64);

/// A next hop the agent resolved, if it may be used.
#[inline(always)]
pub fn valid(hop: &NextHop) -> Option<&NextHop> {
    (hop.flags & NEXT_HOP_VALID != 0).then_some(hop)
}

/// Asks the kernel's FIB for the next hop of `src` → `dst`. The error is the verdict
/// when it is not to be sent on by us: next hop unresolved, too big for the route's
/// MTU, or "not forwarded" (`PassLocal`), which the kernel answers both for its own
/// addresses and for no route at all.
#[inline(always)]
pub fn ask_fib(
    ctx: &XdpContext,
    pkt: &Packet,
    dst: u32,
    src: u32,
    events: &mut Events,
) -> Result<NextHop, Verdict> {
    events.note(Reason::NextHopFib);
    let mut params = MaybeUninit::<FibParams>::uninit();
    let fib = params.as_mut_ptr();
    // Eight word stores: zeroing with `mem::zeroed` compiles to a byte-by-byte memset
    // loop (20-36 ns), and the helper reads fields we do not set. Volatile, so LLVM
    // does not turn them back into a memset.
    let words = fib.cast::<u64>();
    for i in 0..8 {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let rc = unsafe {
        (*fib).family = AF_INET;
        (*fib).l4_protocol = pkt.proto;
        (*fib).ifindex = (*ctx.ctx).ingress_ifindex;
        (*fib).__bindgen_anon_1.tot_len = pkt.tot_len;
        (*fib).__bindgen_anon_2.tos = pkt.tos;
        (*fib).__bindgen_anon_3.ipv4_src = src;
        (*fib).__bindgen_anon_4.ipv4_dst = dst;
        bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0)
    };
    let fib = unsafe { &*fib };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: fib.ifindex,
            // The lookup checked the size against the route's MTU already.
            mtu: u16::MAX,
            flags: NEXT_HOP_VALID,
            smac: fib.smac,
            dmac: fib.dmac,
        }),
        // The kernel forwards the rewritten packet itself and resolves the neighbour.
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Verdict::of(Reason::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Verdict::of(Reason::PassTooBig)),
        BPF_FIB_LKUP_RET_NOT_FWDED => Err(Verdict::of(Reason::PassLocal)),
        _ => Err(Verdict::of(Reason::DropNoRoute)),
    }
}

/// Sends a packet to `hop`: XDP_TX back out of the interface it came in on, or a
/// redirect. Too big for the egress MTU, or an egress we may not redirect to: the
/// kernel gets it (MACs untouched, so its stack takes it).
#[inline(always)]
pub fn send(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> Verdict {
    if pkt.tot_len > hop.mtu {
        return Verdict::of(Reason::PassTooBig);
    }
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (action, reason) = if hop.ifindex == ingress {
        (XDP_TX, Reason::Tx)
    } else {
        match TX_PORTS.redirect(hop.ifindex, XDP_PASS as u64) {
            Ok(action) => (action, Reason::Redirect),
            Err(_) => return Verdict::of(Reason::PassNotTxPort),
        }
    };
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::of(Reason::DropTruncatedEthernet);
    };
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
    }
    Verdict { action, reason }
}
