//! Sending a rewritten packet on: the kernel's FIB and neighbour tables give the
//! egress interface and both MAC addresses, so routes and ARP stay the kernel's job.
//!
//! The balancer forwards as a middlebox, as Katran and Cilium's XDP balancer do: the
//! TTL is left alone. A packet is rewritten at most once (its new destination is no
//! VIP), so the balancer cannot loop it.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::XDP_PASS,
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

/// Routes a packet whose addresses are now `src` → `dst` and picks its action.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, dst: u32, src: u32) -> Verdict {
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
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel forwards the rewritten packet itself and resolves the neighbour.
        BPF_FIB_LKUP_RET_NO_NEIGH => return Verdict::of(Reason::PassNoNeighbour),
        _ => return Verdict::of(Reason::DropNoRoute),
    }
    let (action, reason) = if fib.ifindex == ingress {
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
