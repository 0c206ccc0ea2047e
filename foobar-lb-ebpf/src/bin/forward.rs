//! The packet benchmark's control: forwarding without balancing. Every frame gets the
//! configured MACs and is redirected out of the configured interface: what XDP on this
//! lab can carry at best, with no lookup of a flow, VIP or backend.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};

/// [egress ifindex (as two u32: index then 0), destination MAC, source MAC] packed in
/// 16 bytes: ifindex u32, dmac [u8; 6], smac [u8; 6].
#[map]
static TARGET: Array<[u8; 16]> = Array::with_max_entries(1, 0);
/// The egress interface, slot 0.
#[map]
static EGRESS: DevMap = DevMap::with_max_entries(1, 0);

#[xdp]
pub fn forward(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 > end {
        return xdp_action::XDP_DROP;
    }
    let Some(target) = TARGET.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let eth = start as *mut [u8; 12];
    let mut macs = [0u8; 12];
    macs.copy_from_slice(&target[4..16]);
    unsafe { eth.write_unaligned(macs) };
    EGRESS.redirect(0, 0).unwrap_or(xdp_action::XDP_ABORTED)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
