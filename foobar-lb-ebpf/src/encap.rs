//! Direct server return: the client's packet goes to its backend untouched, inside an
//! outer IP header (IPIP, or IPv6 in IPv6) or IP and UDP (GUE, variant 1: the inner IP
//! header follows the UDP header directly). The backend decapsulates it
//! (`foobar-lb decap`), finds the VIP on its loopback, and answers the client itself.
//!
//! The outer header varies with the flow so that a backend's receive-side scaling
//! spreads flows over its queues: an IPIP outer source takes bits of the flow hash
//! (the agent gives the prefix they fill), a GUE source port is the hash.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use foobar_lb_common::{Backend, PROTO_UDP, Reason, checksum};

use crate::{
    SETTINGS, Status, Verdict,
    family::Family,
    parse::{self, Packet, ptr_at},
};

/// The UDP header of GUE.
pub const UDP_LEN: usize = 8;
/// IPv4 DF, for the outer header of an inner packet that has it.
const IP_DF: u16 = 0x4000;
/// The outer header's TTL / hop limit.
const OUTER_TTL: u8 = 64;

/// Writes an IPv4 header without options at `at`: its first word (version, IHL,
/// TOS), total length, flags, TTL and protocol (each as written in the packet),
/// addresses, and its checksum; identification 0. Word by word into the packet,
/// summing as it goes: no header on the stack.
#[inline(always)]
pub fn write_ipv4(
    ctx: &XdpContext,
    at: usize,
    [first, length, flags, ttl_proto]: [u16; 4],
    src: u32,
    dst: u32,
) -> Result<(), Verdict> {
    let h: *mut u16 = ptr_at::<[u16; 10]>(ctx, at)
        .ok_or(Verdict::of(Reason::DropNoRoom))?
        .cast();
    let words = [
        first,
        length,
        0,
        flags,
        ttl_proto,
        0,
        src as u16,
        (src >> 16) as u16,
        dst as u16,
        (dst >> 16) as u16,
    ];
    let mut sum = 0u32;
    for (i, word) in words.into_iter().enumerate() {
        sum += word as u32;
        unsafe { h.add(i).write_unaligned(word) };
    }
    unsafe { h.add(5).write_unaligned(!checksum::fold(sum)) };
    Ok(())
}

/// Writes an IPv6 header at `at`: its first two words (version, class, flow label;
/// payload length, next header, hop limit) as written in the packet, and addresses.
#[inline(always)]
pub fn write_ipv6(
    ctx: &XdpContext,
    at: usize,
    [first, second]: [u32; 2],
    src: &[u32; 4],
    dst: &[u32; 4],
) -> Result<(), Verdict> {
    let h: *mut u32 = ptr_at::<[u32; 10]>(ctx, at)
        .ok_or(Verdict::of(Reason::DropNoRoom))?
        .cast();
    unsafe {
        h.write_unaligned(first);
        h.add(1).write_unaligned(second);
        for i in 0..4 {
            h.add(2 + i).write_unaligned(src[i]);
            h.add(6 + i).write_unaligned(dst[i]);
        }
    }
    Ok(())
}

/// The bytes an encapsulation adds.
#[inline(always)]
pub const fn overhead<F: Family>(gue: bool) -> usize {
    F::HEADER_LEN + if gue { UDP_LEN } else { 0 }
}

/// Puts the packet inside an outer header to `backend`. The Ethernet header (and a
/// VLAN tag) move to the new front; the MACs are the sender's to write. Not inlined:
/// its frame would add to the caller's.
#[inline(never)]
pub fn encapsulate<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    backend: &Backend,
    gue: bool,
) -> Status {
    Status::of(write_outer(ctx, pkt, backend, gue))
}

#[inline(always)]
fn write_outer<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    backend: &Backend,
    gue: bool,
) -> Result<(), Verdict> {
    let settings = SETTINGS.get(0).ok_or(Verdict::of(Reason::DropNoRoom))?;
    let hash = F::hash(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    let room = overhead::<F>(gue);
    let no_room = Verdict::of(Reason::DropNoRoom);
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(room as i32)) } != 0 {
        return Err(no_room);
    }
    // Every packet pointer is void after the adjustment: each is checked again.
    let l2 = pkt.l3;
    // The MACs too: the sender writes new ones, but a frame left to the kernel
    // (its next hop unresolved) must still be addressed to this host.
    parse::move_macs(ctx, room, false)?;
    if l2 > 14 {
        // The VLAN tag (TPID and TCI) moves with the Ethernet header.
        let from: *const u32 = ptr_at(ctx, room + 12).ok_or(no_room)?;
        let to: *mut u32 = ptr_at(ctx, 12).ok_or(no_room)?;
        unsafe { to.write_unaligned(from.read_unaligned()) };
    }
    let ether_type: *mut u16 = ptr_at(ctx, l2 - 2).ok_or(no_room)?;
    unsafe { ether_type.write_unaligned(F::ETHER_TYPE.to_be()) };

    let inner_len = pkt.ip_len as usize;
    let (proto, payload_len) = if gue {
        (PROTO_UDP, inner_len + UDP_LEN)
    } else {
        (F::IN_IP, inner_len)
    };
    let mut source = backend.source;
    if !gue {
        // The flow's hash fills the host bits of the configured prefix.
        let (word, spread) = if F::HEADER_LEN == 20 {
            (0, settings.ipip_spread_v4)
        } else {
            (3, settings.ipip_spread_v6)
        };
        source[word] = (source[word] & !spread) | (hash & spread);
    }
    let dst = backend.endpoint.addr;
    if F::HEADER_LEN == 20 {
        let first = u16::from_be_bytes([0x45, pkt.tos]).to_be();
        let length = ((F::HEADER_LEN + payload_len) as u16).to_be();
        let ttl_proto = u16::from_be_bytes([OUTER_TTL, proto]).to_be();
        // Always DF: a fragmented outer packet could not be decapsulated.
        let header = [first, length, IP_DF.to_be(), ttl_proto];
        write_ipv4(ctx, l2, header, source[0], dst[0])?;
    } else {
        // Version 6, the inner traffic class, the flow hash as flow label.
        let first = (0x6000_0000 | (pkt.tos as u32) << 20 | (hash & 0x000f_ffff)).to_be();
        let second = ((payload_len as u32) << 16 | (proto as u32) << 8 | OUTER_TTL as u32).to_be();
        write_ipv6(ctx, l2, [first, second], &source, &dst)?;
    }
    if gue {
        let udp: *mut [u16; 4] = ptr_at(ctx, l2 + F::HEADER_LEN).ok_or(no_room)?;
        // Source ports from 32768 up, by flow; no checksum (RFC 6935 for tunnels
        // over IPv6): the inner packet has its own.
        let sport = 0x8000 | (hash as u16 ^ (hash >> 16) as u16);
        let header = [
            sport.to_be(),
            settings.gue_port,
            ((inner_len + UDP_LEN) as u16).to_be(),
            0,
        ];
        unsafe { udp.write_unaligned(header) };
    }
    Ok(())
}
