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
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams,
        xdp_action::{XDP_PASS, XDP_TX},
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use foobar_lb_common::{NEXT_HOP_VALID, NextHop, Reason};
use network_types::eth::EthHdr;

use crate::{
    Events, SCRATCH, Status, TX_PORTS, Verdict,
    family::Family,
    parse::{Packet, ptr_at},
};

const _: () = assert!(size_of::<FibParams>() == 64);

/// A next hop the agent resolved, if it may be used.
#[inline(always)]
pub fn valid(hop: &NextHop) -> Option<&NextHop> {
    (hop.flags & NEXT_HOP_VALID != 0).then_some(hop)
}

/// Asks the kernel's FIB for the next hop of a packet of `(protocol, dst, src)`. The
/// error is the verdict when it is not to be sent on by us: next hop unresolved, or
/// "not forwarded" (`PassLocal`), which the kernel answers both for its own addresses
/// and for no route at all. The size is checked by the caller against the MTU
/// returned.
#[inline(always)]
pub fn ask_fib<F: Family>(
    ctx: &XdpContext,
    route: &(u8, F::Addr, F::Addr),
    events: &mut Events,
) -> Result<NextHop, Verdict> {
    // Written when the lookup goes on (left uninitialised: zeroing it calls memset).
    let mut hop = MaybeUninit::<NextHop>::uninit();
    lookup_fib::<F>(ctx, route, events, &mut hop).check()?;
    Ok(unsafe { hop.assume_init() })
}

/// [`ask_fib`], not inlined: it is the slow path.
#[inline(never)]
fn lookup_fib<F: Family>(
    ctx: &XdpContext,
    route: &(u8, F::Addr, F::Addr),
    events: &mut Events,
    hop: &mut MaybeUninit<NextHop>,
) -> Status {
    match fib::<F>(ctx, route, events) {
        Ok(found) => {
            hop.write(found);
            Status::GO_ON
        }
        Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn fib<F: Family>(
    ctx: &XdpContext,
    route: &(u8, F::Addr, F::Addr),
    events: &mut Events,
) -> Result<NextHop, Verdict> {
    let &(proto, dst, src) = route;
    events.note(Reason::NextHopFib);
    // The parameters live in the scratch map (64 bytes the stack has not to spare).
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Verdict::of(Reason::DropNoRoute));
    };
    let fib: *mut FibParams = unsafe { &mut (*scratch).fib };
    // Eight word stores: the helper reads fields we do not set. Volatile, so LLVM
    // does not turn them into a memset call. A zero length skips the FIB's own MTU
    // check: it reports the route's MTU instead.
    let words = fib.cast::<u64>();
    for i in 0..8 {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let rc = unsafe {
        (*fib).family = F::AF;
        (*fib).l4_protocol = proto;
        (*fib).ifindex = (*ctx.ctx).ingress_ifindex;
        let (src, dst) = (F::words(src), F::words(dst));
        if F::HEADER_LEN == 20 {
            (*fib).__bindgen_anon_3.ipv4_src = src[0];
            (*fib).__bindgen_anon_4.ipv4_dst = dst[0];
        } else {
            (*fib).__bindgen_anon_3.ipv6_src = src;
            (*fib).__bindgen_anon_4.ipv6_dst = dst;
        }
        bpf_fib_lookup(ctx.ctx.cast(), fib, size_of::<FibParams>() as i32, 0)
    };
    let fib = unsafe { &*fib };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(NextHop {
            ifindex: fib.ifindex,
            mtu: match unsafe { fib.__bindgen_anon_1.mtu_result } {
                0 => u16::MAX,
                mtu => mtu,
            },
            flags: NEXT_HOP_VALID,
            smac: fib.smac,
            dmac: fib.dmac,
        }),
        // The kernel forwards the rewritten packet itself and resolves the neighbour.
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Verdict::of(Reason::PassNoNeighbour)),
        BPF_FIB_LKUP_RET_NOT_FWDED => Err(Verdict::of(Reason::PassLocal)),
        _ => Err(Verdict::of(Reason::DropNoRoute)),
    }
}

/// Whether a packet fits its next hop once `overhead` bytes (an outer header) are added.
pub enum Fit {
    Fits,
    /// Too big, but IPv4 without DF and unchanged in size: the kernel may fragment it.
    Fragment,
    /// Too big: the sender must be told this MTU (what fits before the overhead).
    TooBig(u16),
}

#[inline(always)]
pub fn fit<F: Family>(pkt: &Packet<F>, overhead: u16, mtu: u16) -> Fit {
    if pkt.ip_len as u32 + overhead as u32 <= mtu as u32 {
        Fit::Fits
    } else if overhead == 0 && !pkt.dont_fragment {
        Fit::Fragment
    } else {
        // IPv6 senders ignore an MTU below 1280: announcing less would black-hole.
        let floor = if F::HEADER_LEN == 20 { 68 } else { 1280 };
        Fit::TooBig(mtu.saturating_sub(overhead).max(floor))
    }
}

/// Sends a frame to `hop`: XDP_TX back out of the interface it came in on, or a
/// redirect; an egress we may not redirect to leaves it to the kernel (MACs
/// untouched, so its stack takes it).
#[inline(always)]
pub fn send(ctx: &XdpContext, hop: &NextHop) -> Verdict {
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
    Verdict {
        action,
        reason: reason as u32,
    }
}
