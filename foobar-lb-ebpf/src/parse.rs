//! Header parsing: every read is bounds-checked against the frame, and a malformed
//! frame ends in a counted drop or pass, never in an abort.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use foobar_lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::{
    Verdict,
    family::{Family, V4, V6},
};

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// More-fragments flag and fragment offset of the IPv4 `frags` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;
/// Don't-fragment flag of the IPv4 `frags` field.
const IP_DF: u16 = 0x4000;
/// IPv6 extension headers the balancer walks over.
const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_DESTINATION: u8 = 60;
/// Most IPv6 extension headers walked: a bound for the verifier and for attackers.
const MAX_EXTENSION_HEADERS: usize = 4;

/// The frame's start and end. Read with volatile loads: a function that is not
/// inlined and only reads them would otherwise get them as arguments, truncated to
/// the 32 bits of `xdp_md`'s fields, which the verifier no longer takes for packet
/// pointers.
#[inline(always)]
pub fn bounds(ctx: &XdpContext) -> (usize, usize) {
    unsafe {
        let md = ctx.ctx;
        (
            core::ptr::read_volatile(&(*md).data) as usize,
            core::ptr::read_volatile(&(*md).data_end) as usize,
        )
    }
}

/// The frame's length.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    let (start, end) = bounds(ctx);
    end - start
}

/// Offsets into a frame are below this: an XDP frame fits a page. Offsets kept in
/// the scratch map come back without the bounds the verifier knew; the mask gives
/// them one again (it changes no real offset).
const OFFSET_MASK: usize = 0x3fff;

/// A pointer into the frame to a `T` at `offset`, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let offset = offset & OFFSET_MASK;
    let (start, end) = bounds(ctx);
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Writes the Ethernet addresses found at `from` to the frame's front, swapped, so
/// the frame goes back to its sender.
#[inline(always)]
pub fn turn_around(ctx: &XdpContext, from: usize) -> Result<(), Verdict> {
    move_macs(ctx, from, true)
}

/// Writes the Ethernet addresses found at `from` to the frame's front (swapped or
/// not). Word by word: a copy of the arrays would call `memmove` (the two may overlap).
#[inline(always)]
pub fn move_macs(ctx: &XdpContext, from: usize, swap: bool) -> Result<(), Verdict> {
    let cut = Verdict::of(Reason::DropTruncatedEthernet);
    let old: *const u16 = ptr_at::<[u16; 6]>(ctx, from).ok_or(cut)?.cast();
    let new: *mut u16 = ptr_at::<[u16; 6]>(ctx, 0).ok_or(cut)?.cast();
    unsafe {
        let (a0, a1, a2) = (
            old.read_unaligned(),
            old.add(1).read_unaligned(),
            old.add(2).read_unaligned(),
        );
        let (b0, b1, b2) = (
            old.add(3).read_unaligned(),
            old.add(4).read_unaligned(),
            old.add(5).read_unaligned(),
        );
        let (d, s) = if swap {
            ((b0, b1, b2), (a0, a1, a2))
        } else {
            ((a0, a1, a2), (b0, b1, b2))
        };
        new.write_unaligned(d.0);
        new.add(1).write_unaligned(d.1);
        new.add(2).write_unaligned(d.2);
        new.add(3).write_unaligned(s.0);
        new.add(4).write_unaligned(s.1);
        new.add(5).write_unaligned(s.2);
    }
    Ok(())
}

/// What the data plane needs of an IP packet. Addresses and ports are raw
/// network-order values, as read from the packet. It lives in the per-CPU scratch
/// map, not on the stack, whose 512 bytes the call chain must share.
#[repr(C)]
pub struct Packet<F: Family> {
    /// Offset of the IP header (after Ethernet and at most one VLAN tag).
    pub l3: usize,
    /// Offset of the transport header (after IPv4 options or IPv6 extension headers).
    pub l4: usize,
    pub src: F::Addr,
    pub dst: F::Addr,
    /// Ports of TCP/UDP; 0 for ICMP and fragments.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// The IP packet's length, headers included (host order).
    pub ip_len: u16,
    /// Frame length, for byte counters.
    pub frame_len: u32,
    /// A fragment (ports unknown).
    pub fragment: bool,
    /// May not be fragmented on the way (IPv4 DF; always for IPv6).
    pub dont_fragment: bool,
}

#[inline(always)]
fn drop(reason: Reason) -> Verdict {
    Verdict::of(reason)
}

/// Parses Ethernet (with at most one 802.1Q/802.1ad tag): the ethertype and the
/// offset of what follows. Errs with the verdict for a frame that is not unicast to
/// this interface's `mac`.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext, mac: &[u8; 6]) -> Result<(u16, usize), Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(drop(Reason::DropTruncatedEthernet))?;
    let dst = unsafe { (*eth).dst_addr };
    // The group bit: broadcast and multicast are the kernel's (ARP, VRRP, ND).
    if dst[0] & 1 != 0 {
        return Err(Verdict::of(Reason::PassMulticast));
    }
    if dst != *mac {
        return Err(Verdict::of(Reason::PassOtherMac));
    }
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr =
            ptr_at(ctx, EthHdr::LEN).ok_or(drop(Reason::DropTruncatedEthernet))?;
        let inner = u16::from_be(unsafe { (*vlan).ether_type });
        return Ok((inner, EthHdr::LEN + VlanHdr::LEN));
    }
    Ok((ether_type, EthHdr::LEN))
}

/// IPv4, honouring IHL.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, l3: usize, out: &mut Packet<V4>) -> Result<(), Verdict> {
    let frame_len = frame_len(ctx);
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(drop(Reason::DropTruncatedIpv4))?;
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(drop(Reason::DropBadIpVersion));
    }
    // IHL is 4 bits: the mask also tells the verifier the offset is bounded.
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(drop(Reason::DropBadIhl));
    }
    if l3 + header_len > frame_len {
        return Err(drop(Reason::DropTruncatedIpv4));
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // Ethernet pads short frames, so the frame may be longer than the datagram, never shorter.
    if (tot_len as usize) < header_len || l3 + tot_len as usize > frame_len {
        return Err(drop(Reason::DropBadTotalLength));
    }
    let frags = u16::from_be_bytes(ip.frags);
    *out = Packet {
        l3,
        l4: l3 + header_len,
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tos: ip.tos,
        ip_len: tot_len,
        frame_len: frame_len as u32,
        fragment: frags & IP_MF_AND_OFFSET != 0,
        dont_fragment: frags & IP_DF != 0,
    };
    ports(ctx, out)
}

/// IPv6, walking hop-by-hop, routing, destination-options and fragment headers.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, l3: usize, out: &mut Packet<V6>) -> Result<(), Verdict> {
    let frame_len = frame_len(ctx);
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(drop(Reason::DropTruncatedIpv6))?;
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(drop(Reason::DropBadIpVersion));
    }
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    // A zero payload length is a jumbogram's: not for a balancer on Ethernet.
    if payload_len == 0 || l3 + Ipv6Hdr::LEN + payload_len > frame_len {
        return Err(drop(Reason::DropBadTotalLength));
    }
    let mut next = ip.next_hdr;
    let mut l4 = l3 + Ipv6Hdr::LEN;
    let mut fragment = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION => {
                let ext: *const [u8; 2] =
                    ptr_at(ctx, l4).ok_or(drop(Reason::DropIpv6ExtensionHeaders))?;
                let [following, len] = unsafe { *ext };
                next = following;
                l4 += (len as usize + 1) * 8;
            }
            NEXT_FRAGMENT => {
                let ext: *const [u8; 4] =
                    ptr_at(ctx, l4).ok_or(drop(Reason::DropIpv6ExtensionHeaders))?;
                let ext = unsafe { *ext };
                next = ext[0];
                // Offset and M flag; an atomic fragment (both 0) is a whole packet.
                let offset_and_more = u16::from_be_bytes([ext[2], ext[3]]);
                fragment = offset_and_more & 0xfff9 != 0;
                l4 += 8;
                if offset_and_more & 0xfff8 != 0 {
                    // Not the first fragment: what follows is no header.
                    break;
                }
            }
            _ => break,
        }
    }
    if matches!(
        next,
        NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION | NEXT_FRAGMENT
    ) || l4 > l3 + Ipv6Hdr::LEN + payload_len
    {
        return Err(drop(Reason::DropIpv6ExtensionHeaders));
    }
    *out = Packet {
        l3,
        l4,
        src: unsafe { V6::read(ip.src_addr.as_ptr().cast()) },
        dst: unsafe { V6::read(ip.dst_addr.as_ptr().cast()) },
        sport: 0,
        dport: 0,
        proto: next,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        ip_len: (Ipv6Hdr::LEN + payload_len) as u16,
        frame_len: frame_len as u32,
        fragment,
        dont_fragment: true,
    };
    ports(ctx, out)
}

/// Reads the ports of TCP and UDP (not of fragments: only the first has them).
#[inline(always)]
fn ports<F: Family>(ctx: &XdpContext, pkt: &mut Packet<F>) -> Result<(), Verdict> {
    if pkt.fragment || (pkt.proto != PROTO_TCP && pkt.proto != PROTO_UDP) {
        return Ok(());
    }
    // Source and destination ports lead both the TCP and the UDP header.
    let ports: *const [u16; 2] = ptr_at(ctx, pkt.l4).ok_or(drop(Reason::DropTruncatedL4))?;
    let [sport, dport] = unsafe { *ports };
    pkt.sport = sport;
    pkt.dport = dport;
    Ok(())
}

/// The TCP/UDP header of a packet we are going to rewrite, checked whole.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Offset of the checksum field.
    pub check: u16,
    /// A SYN without ACK: the first packet of a TCP connection.
    pub syn: bool,
    /// A FIN or RST: the sender is closing the connection.
    pub closing: bool,
    /// An RST: the connection is over at once.
    pub reset: bool,
    /// UDP (its checksum may be 0: none).
    pub udp: bool,
}

impl L4 {
    /// No transport header to rewrite (an ICMP error carried to a DSR backend).
    pub const NONE: L4 = L4 {
        check: 0,
        syn: false,
        closing: false,
        reset: false,
        udp: false,
    };
}

/// Validates the L4 header of a packet that is ours (for a VIP, or a backend's reply).
#[inline(always)]
pub fn l4<F: Family>(ctx: &XdpContext, pkt: &Packet<F>) -> Result<L4, Verdict> {
    if pkt.proto == PROTO_UDP {
        ptr_at::<UdpHdr>(ctx, pkt.l4).ok_or(drop(Reason::DropTruncatedL4))?;
        return Ok(L4 {
            check: (pkt.l4 + 6) as u16,
            syn: false,
            closing: false,
            reset: false,
            udp: true,
        });
    }
    let tcp: *const TcpHdr = ptr_at(ctx, pkt.l4).ok_or(drop(Reason::DropTruncatedL4))?;
    let tcp = unsafe { &*tcp };
    let data_offset = tcp.doff() as usize * 4;
    if data_offset < TcpHdr::LEN || pkt.l4 - pkt.l3 + data_offset > pkt.ip_len as usize {
        return Err(drop(Reason::DropBadTcpDataOffset));
    }
    Ok(L4 {
        check: (pkt.l4 + 16) as u16,
        syn: tcp.syn() != 0 && tcp.ack() == 0,
        closing: tcp.fin() != 0 || tcp.rst() != 0,
        reset: tcp.rst() != 0,
        udp: false,
    })
}
