//! The packet benchmark's generator. Run by BPF_PROG_TEST_RUN in live-frames mode on
//! the client's interface, it sends a frame out of that interface (XDP_TX) again and
//! again, each time from the next of `flows` source ports (so the balancer sees many
//! flows), with the TCP checksum kept right.
//!
//! The headers are written whole from a template each time: a frame's page comes
//! back to the generator after the balancer rewrote it in place (a veth hands pages
//! over), and live-frames mode does not restore its contents.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use foobar_lb_common::checksum;

/// Frames sent so far by this CPU.
#[map]
static SENT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// [first source port, number of flows].
#[map]
static FLOWS: Array<u32> = Array::with_max_entries(2, 0);
/// The first 56 bytes of the frame to send (Ethernet, IPv4 without options, TCP),
/// with the first source port and its checksum.
#[map]
static TEMPLATE: Array<[u64; 7]> = Array::with_max_entries(1, 0);

/// Offset of the TCP source port and checksum in an untagged IPv4 frame without options.
const SPORT: usize = 14 + 20;
const CHECK: usize = SPORT + 16;

#[xdp]
pub fn pktgen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 56 > end {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(template), Some(first), Some(flows), Some(sent)) = (
        TEMPLATE.get(0),
        FLOWS.get(0),
        FLOWS.get(1),
        SENT.get_ptr_mut(0),
    ) else {
        return xdp_action::XDP_ABORTED;
    };
    let words = start as *mut u64;
    for (i, word) in template.iter().enumerate() {
        unsafe { words.add(i).write_unaligned(*word) };
    }
    let sent = unsafe { &mut *sent };
    let port = (*first + (*sent % (*flows).max(1) as u64) as u32) as u16;
    *sent += 1;
    let sport = (start + SPORT) as *mut u16;
    let check = (start + CHECK) as *mut u16;
    unsafe {
        let old = sport.read_unaligned();
        let new = port.to_be();
        sport.write_unaligned(new);
        check.write_unaligned(checksum::replace2(check.read_unaligned(), old, new));
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
