//! Header parsing: every read is bounds-checked against the frame, and a malformed
//! frame ends in a counted drop or pass, never in an abort.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use foobar_lb_common::{Iface, PROTO_TCP, PROTO_UDP, Reason, VipAddr};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr, vlan::VlanHdr};

use crate::{VIP_ADDRS, Verdict};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// More-fragments flag and fragment offset of the IPv4 `frags` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// A pointer into the frame to a `T` at `offset`, if the whole `T` is inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the data plane needs of an IPv4 TCP/UDP packet. Addresses and ports are
/// raw network-order values (`from_ne_bytes` of the packet's bytes).
pub struct Packet {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the TCP/UDP header (after the IPv4 options).
    pub l4: usize,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tos: u8,
    /// IPv4 total length, host order.
    pub tot_len: u16,
    /// Frame length, for byte counters.
    pub frame_len: u32,
}

#[inline(always)]
fn drop(reason: Reason) -> Verdict {
    Verdict::of(reason)
}

/// Parses Ethernet (with at most one 802.1Q/802.1ad tag), IPv4 honouring IHL, and
/// the ports of TCP/UDP. Errs with the verdict for anything that is not such a packet,
/// or not unicast to the interface it arrived on (`iface`).
#[inline(always)]
pub fn parse(ctx: &XdpContext, iface: &Iface) -> Result<Packet, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(drop(Reason::DropTruncatedEthernet))?;
    let dst = unsafe { (*eth).dst_addr };
    // The group bit: broadcast and multicast are the kernel's (ARP, VRRP).
    if dst[0] & 1 != 0 {
        return Err(Verdict::of(Reason::PassMulticast));
    }
    if dst != iface.mac {
        return Err(Verdict::of(Reason::PassOtherMac));
    }
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(drop(Reason::DropTruncatedEthernet))?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += VlanHdr::LEN;
    }
    if ether_type != ETH_P_IP {
        return Err(Verdict::of(Reason::PassNotIpv4));
    }

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
    let frame_len = ctx.data_end() - ctx.data();
    if l3 + header_len > frame_len {
        return Err(drop(Reason::DropTruncatedIpv4));
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // Ethernet pads short frames, so the frame may be longer than the datagram, never shorter.
    if (tot_len as usize) < header_len || l3 + tot_len as usize > frame_len {
        return Err(drop(Reason::DropBadTotalLength));
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::of(Reason::PassNotTcpUdp));
    }
    let src = u32::from_ne_bytes(ip.src_addr);
    let dst = u32::from_ne_bytes(ip.dst_addr);
    if u16::from_be_bytes(ip.frags) & IP_MF_AND_OFFSET != 0 {
        // Only the first fragment has ports: none can be steered consistently.
        let vip_addr = VipAddr {
            addr: [dst, 0, 0, 0],
        };
        let reason = match unsafe { VIP_ADDRS.get(vip_addr) } {
            Some(_) => Reason::DropFragment,
            None => Reason::PassFragment,
        };
        return Err(Verdict::of(reason));
    }

    let l4 = l3 + header_len;
    // Source and destination ports lead both the TCP and the UDP header.
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(drop(Reason::DropTruncatedL4))?;
    let [sport, dport] = unsafe { *ports };
    Ok(Packet {
        l3,
        l4,
        src,
        dst,
        sport,
        dport,
        proto,
        tos: ip.tos,
        tot_len,
        frame_len: frame_len as u32,
    })
}

/// The TCP/UDP header of a packet we are going to rewrite, checked whole.
pub struct L4 {
    /// Offset of the checksum field.
    pub check: usize,
    /// A SYN without ACK: the first packet of a TCP connection.
    pub syn: bool,
    /// A FIN or RST: the sender is closing the connection.
    pub closing: bool,
}

/// Validates the L4 header of a packet that is ours (for a VIP, or a backend's reply).
#[inline(always)]
pub fn l4(ctx: &XdpContext, pkt: &Packet) -> Result<L4, Verdict> {
    if pkt.proto == PROTO_UDP {
        ptr_at::<UdpHdr>(ctx, pkt.l4).ok_or(drop(Reason::DropTruncatedL4))?;
        return Ok(L4 {
            check: pkt.l4 + 6,
            syn: false,
            closing: false,
        });
    }
    let tcp: *const TcpHdr = ptr_at(ctx, pkt.l4).ok_or(drop(Reason::DropTruncatedL4))?;
    let tcp = unsafe { &*tcp };
    let data_offset = tcp.doff() as usize * 4;
    if data_offset < TcpHdr::LEN || pkt.l4 - pkt.l3 + data_offset > pkt.tot_len as usize {
        return Err(drop(Reason::DropBadTcpDataOffset));
    }
    Ok(L4 {
        check: pkt.l4 + 16,
        syn: tcp.syn() != 0 && tcp.ack() == 0,
        closing: tcp.fin() != 0 || tcp.rst() != 0,
    })
}
