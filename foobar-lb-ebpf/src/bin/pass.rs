//! Passes every frame. The lab attaches it to the bridge ports that face the
//! balancers: a veth delivers the frames its peer sends with XDP_TX only when it runs
//! an XDP program itself (with GRO alone they wait in its ring until something else
//! wakes it). No maps, so iproute2 can load it (`ip link set dev X xdp obj ...`).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
