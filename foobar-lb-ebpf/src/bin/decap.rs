//! The backend side of direct server return (`foobar-lb decap`): takes the outer
//! header off packets the balancer encapsulated (IPIP, IPv6 in IP, GUE) and hands the
//! client's packet to the kernel as if it had arrived so; the VIP lives on the
//! backend's loopback, and the backend answers the client directly. This kernel has
//! no ipip or fou module: this is the decapsulation.
//!
//! Only packets for a configured VIP are taken out: an encapsulated packet to any
//! other address is dropped, so the program opens no tunnel into the host. Every
//! read is bounds-checked; whatever is not encapsulated passes untouched.
#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use foobar_lb_common::{
    PROTO_IPIP, PROTO_IPV6, PROTO_UDP, VipAddr,
    decap::{DecapCounters, DecapReason, DecapSettings, MAX_DECAP_SOURCES, MAX_DECAP_VIPS},
};

#[map]
static DECAP_VIPS: HashMap<VipAddr, u32> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);
#[map]
static DECAP_SETTINGS: Array<DecapSettings> = Array::with_max_entries(1, 0);
#[map]
static DECAP_SOURCES: LpmTrie<u32, u8> = LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);
#[map]
static DECAP_SOURCES6: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);
#[map]
static DECAP_COUNTERS: PerCpuArray<DecapCounters> = PerCpuArray::with_max_entries(1, 0);

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const UDP_LEN: usize = 8;

#[xdp]
pub fn decap(ctx: XdpContext) -> u32 {
    let (action, reason) = match decapsulate(&ctx) {
        Ok(reason) => (XDP_PASS, reason),
        Err(reason @ DecapReason::PassNotEncapsulated) => (XDP_PASS, reason),
        Err(reason) => (XDP_DROP, reason),
    };
    if let Some(counters) = DECAP_COUNTERS.get_ptr_mut(0) {
        let index = reason as usize;
        if let Some(count) = unsafe { (*counters).by_reason.get_mut(index) } {
            *count += 1;
        }
    }
    action
}

/// A pointer to a `T` at `offset`, if the frame holds it whole.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    // Offsets stay below a page: the mask gives the verifier the bound.
    let offset = offset & 0x3fff;
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, DecapReason> {
    let p: *const T = ptr_at(ctx, offset).ok_or(DecapReason::DropTruncated)?;
    Ok(unsafe { p.read_unaligned() })
}

/// Takes the outer header off an encapsulated packet for a VIP: the reason it was
/// decapsulated, or why not (`PassNotEncapsulated` passes, the others drop).
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> Result<DecapReason, DecapReason> {
    let not_ours = DecapReason::PassNotEncapsulated;
    let mut ether_type = u16::from_be(read::<u16>(ctx, 12).map_err(|_| not_ours)?);
    let mut l3 = ETH_LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = u16::from_be(read::<u16>(ctx, 16).map_err(|_| not_ours)?);
        l3 += 4;
    }
    // The outer header: which protocol follows it, and where.
    let (proto, mut inner) = match ether_type {
        ETH_P_IP => {
            let first: [u8; 10] = read(ctx, l3).map_err(|_| not_ours)?;
            let ihl = (first[0] & 0x0f) as usize * 4;
            if first[0] >> 4 != 4 || ihl < 20 {
                return Err(not_ours);
            }
            let proto = first[9];
            let frags = u16::from_be_bytes([first[6], first[7]]);
            if frags & 0x3fff != 0 {
                // Only a first fragment shows a UDP port; an IP-in-IP one is ours.
                return Err(if proto == PROTO_IPIP || proto == PROTO_IPV6 {
                    DecapReason::DropFragment
                } else {
                    not_ours
                });
            }
            (proto, l3 + ihl)
        }
        // Extension headers are not walked: the balancer adds none.
        ETH_P_IPV6 => (read::<[u8; 8]>(ctx, l3).map_err(|_| not_ours)?[6], l3 + 40),
        _ => return Err(not_ours),
    };
    let settings = DECAP_SETTINGS.get(0).copied().unwrap_or_default();
    let reason = match proto {
        PROTO_IPIP | PROTO_IPV6 => DecapReason::Ipip,
        PROTO_UDP => {
            let gue_port = settings.gue_port;
            let ports: [u16; 2] = read(ctx, inner)?;
            if gue_port == 0 || ports[1] != gue_port {
                return Err(not_ours);
            }
            inner += UDP_LEN;
            DecapReason::Gue
        }
        _ => return Err(not_ours),
    };

    // The inner packet: its family from its version, its destination a VIP.
    // Two bytes read for one: a one-byte bounds check compiles to a comparison the
    // verifier cannot use.
    let version = read::<[u8; 2]>(ctx, inner)?[0] >> 4;
    let (inner_type, vip) = match version {
        4 if proto != PROTO_IPV6 => {
            let dst: u32 = read(ctx, inner + 16)?;
            (ETH_P_IP, [dst, 0, 0, 0])
        }
        6 if proto != PROTO_IPIP => (ETH_P_IPV6, read::<[u32; 4]>(ctx, inner + 24)?),
        _ => return Err(DecapReason::DropBadInner),
    };
    if unsafe { DECAP_VIPS.get(VipAddr { addr: vip }) }.is_none() {
        return Err(DecapReason::DropNotAVip);
    }
    // Only a balancer may send encapsulated packets: anyone else could slip packets
    // with any inner source past the host's filters.
    if settings.check_sources != 0 {
        let known = if ether_type == ETH_P_IP {
            DECAP_SOURCES
                .get(Key::new(32, read::<u32>(ctx, l3 + 12)?))
                .is_some()
        } else {
            DECAP_SOURCES6
                .get(Key::new(128, read::<[u32; 4]>(ctx, l3 + 8)?))
                .is_some()
        };
        if !known {
            return Err(DecapReason::DropUnknownSource);
        }
    }

    // Move the Ethernet header (and tag) up to just before the inner packet, then
    // start the frame there. Word by word: the two places never overlap (the outer
    // header is longer than the Ethernet one), and a copy of arrays calls memmove.
    let outer = inner - l3;
    for i in 0..9 {
        let at = 2 * i;
        if at >= l3 {
            break;
        }
        let word = if at == l3 - 2 {
            inner_type.to_be()
        } else {
            read::<u16>(ctx, at)?
        };
        let to: *mut u16 = ptr_at(ctx, outer + at).ok_or(DecapReason::DropTruncated)?;
        unsafe { to.write_unaligned(word) };
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return Err(DecapReason::DropNoRoom);
    }
    Ok(reason)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
