//! IPv4 and IPv6 behind one trait, so that steering, NAT, encapsulation and ICMP are
//! written once and compiled twice: each family keeps its own flow table with its own
//! key (16 bytes for IPv4, 40 for IPv6), so IPv4 pays nothing for IPv6.

use aya_ebpf::{
    helpers::generated::{
        bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
        bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6,
    },
    maps::{LruHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use foobar_lb_common::{
    Endpoint, FlowKey, FlowKey6, FlowState, NatTarget, NextHop, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_IPIP, PROTO_IPV6, Route, VipInfo, checksum,
    hash::{flow_hash_v4, flow_hash_v6, vip_hash_v4, vip_hash_v6},
};

use crate::{
    FLOWS, FLOWS6, NAT_FLOWS, NAT_FLOWS6, NEIGHBOURS, NEIGHBOURS6, ROUTES, ROUTES6, Scratch,
    Verdict, encap,
    icmp::Quoted,
    parse::{self, Packet, ptr_at},
};
use foobar_lb_common::Reason;

/// An address family: its header layout and its maps.
pub trait Family {
    /// An address as read from the packet (network-order words).
    type Addr: Copy + PartialEq + 'static;
    /// Its flow-table key.
    type Key: Copy + 'static;
    /// Ethertype of its packets.
    const ETHER_TYPE: u16;
    /// Offset of the source address in the IP header.
    const SRC_AT: usize;
    /// Offset of the destination address in the IP header.
    const DST_AT: usize;
    /// Length of the (fixed) IP header the balancer writes.
    const HEADER_LEN: usize;
    /// Its ICMP's protocol number.
    const ICMP: u8;
    /// The protocol number of this family's packets inside an IP tunnel.
    const IN_IP: u8;
    /// `AF_INET` or `AF_INET6`, for the FIB.
    const AF: u8;
    /// [`foobar_lb_common::FAMILY_IPV4`] or `FAMILY_IPV6`.
    const FAMILY: u8;
    /// Bits in an address.
    const BITS: u32;

    /// The address as four words (IPv4 in word 0).
    fn words(addr: Self::Addr) -> [u32; 4];
    /// Reads an address from the packet, word by word (a copy of the whole array
    /// into map memory would call memmove).
    ///
    /// # Safety
    /// `at` must point to a whole address inside the frame.
    unsafe fn read(at: *const Self::Addr) -> Self::Addr;
    /// The address of four words.
    fn from_words(words: &[u32; 4]) -> Self::Addr;
    /// A VIP or backend endpoint.
    fn endpoint(addr: Self::Addr, port: u16, proto: u8) -> Endpoint;
    /// A flow's key.
    fn key(src: Self::Addr, dst: Self::Addr, sport: u16, dport: u16, proto: u8) -> Self::Key;
    /// A flow's hash (the Maglev slot, the outer source of DSR).
    fn hash(src: Self::Addr, dst: Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;
    /// A flow's hash over the fields its VIP chose (the slot of a new flow).
    fn vip_hash(
        vip: &VipInfo,
        src: Self::Addr,
        dst: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> u32;
    /// The flow table.
    fn flows() -> &'static LruHashMap<Self::Key, FlowState>;
    /// Full NAT's reverse entries.
    fn nat_flows() -> &'static LruHashMap<Self::Key, NatTarget>;
    /// A client-side neighbour.
    fn neighbour(addr: Self::Addr) -> Option<&'static NextHop>;
    /// The client-side route to an address.
    fn route(addr: Self::Addr) -> Option<&'static Route>;
    /// Parses the IP header at `l3` and the ports after it into `out`.
    fn parse(ctx: &XdpContext, l3: usize, out: &mut Packet<Self>) -> Result<(), Verdict>
    where
        Self: Sized;
    /// This family's packet in the scratch map.
    fn packet(scratch: &mut Scratch) -> &mut Packet<Self>
    where
        Self: Sized;
    /// The header an ICMP error quotes, in the scratch map.
    fn quoted(scratch: &mut Scratch) -> &mut Quoted<Self>
    where
        Self: Sized;
    /// Full NAT's keys and entry while it allocates a port, in the scratch map.
    fn nat_scratch(scratch: &mut Scratch) -> &mut NatScratch<Self>
    where
        Self: Sized;
    /// Writes a flow key in place, field by field (a whole-struct copy into map
    /// memory would call memcpy).
    fn set_key(out: &mut Self::Key, src: Self::Addr, dst: Self::Addr, ports: [u16; 2], proto: u8);
    /// A transport checksum after an address in its pseudo-header changed.
    fn replace_addr(check: u16, old: Self::Addr, new: Self::Addr, udp: bool) -> u16;
    /// Updates the IP header's own checksum (IPv4) after an address changed from `old`
    /// to `new`; IPv6 has none.
    fn header_checksum(
        ctx: &XdpContext,
        l3: usize,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), Verdict>;
    /// The MSS the balancer offers in a SYN cookie's SYN-ACK and asks of a backend
    /// in the SYN it sends for the client: an Ethernet path's.
    const MSS: u16;
    /// The kernel's SYN cookie for a SYN (`bpf_tcp_raw_gen_syncookie_*`): the cookie in
    /// the low 32 bits; negative: none. `ip` is the fixed header in the packet.
    ///
    /// # Safety
    /// `ip` must point to a whole fixed IP header, `tcp` to `tcp_len` bytes.
    unsafe fn syn_cookie(ip: *mut u8, tcp: *mut u8, tcp_len: u32) -> i64;
    /// Whether an ACK's acknowledgement is a cookie this host gave its SYN (0: it is).
    ///
    /// # Safety
    /// `ip` must point to a whole fixed IP header, `tcp` to a 20-byte TCP header.
    unsafe fn check_cookie(ip: *mut u8, tcp: *mut u8) -> i64;
    /// The fixed IP header at `l3`, checked to be inside the frame.
    fn fixed_header(ctx: &XdpContext, l3: usize) -> Option<*mut u8>;
    /// The transport pseudo-header's sum (addresses, protocol, length), unfolded.
    fn pseudo_sum(src: Self::Addr, dst: Self::Addr, proto: u8, len: u16) -> u32 {
        let (src, dst) = (Self::words(src), Self::words(dst));
        let mut sum = (proto as u16).to_be() as u32 + len.to_be() as u32;
        for i in 0..4 {
            sum += (src[i] & 0xffff) + (src[i] >> 16) + (dst[i] & 0xffff) + (dst[i] >> 16);
        }
        sum
    }
    /// Writes the IP header of a packet of `payload` bytes from `src` to `dst` at `l3`.
    fn write_header(
        ctx: &XdpContext,
        l3: usize,
        payload: u16,
        proto: u8,
        src: Self::Addr,
        dst: Self::Addr,
    ) -> Result<(), Verdict>;
}

/// What full NAT's port allocation builds: the reverse key it claims, the forward
/// key of the flow that holds a port already, and the reverse entry.
#[repr(C)]
pub struct NatScratch<F: Family> {
    pub reverse: F::Key,
    pub flow: F::Key,
    pub target: NatTarget,
}

/// Writes four words in place, one by one: into map memory, a copy of the array
/// calls memcpy.
#[inline(always)]
pub fn set_words(out: &mut [u32; 4], words: [u32; 4]) {
    let [a, b, c, d] = words;
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
}

/// Byte 10 of the IPv4 header.
const IPV4_CHECK_AT: usize = 10;

/// IPv4.
pub struct V4;

impl Family for V4 {
    type Addr = u32;
    type Key = FlowKey;
    const ETHER_TYPE: u16 = 0x0800;
    const SRC_AT: usize = 12;
    const DST_AT: usize = 16;
    const HEADER_LEN: usize = 20;
    const ICMP: u8 = PROTO_ICMP;
    const IN_IP: u8 = PROTO_IPIP;
    const AF: u8 = 2;
    const FAMILY: u8 = foobar_lb_common::FAMILY_IPV4;
    const BITS: u32 = 32;

    #[inline(always)]
    fn words(addr: u32) -> [u32; 4] {
        [addr, 0, 0, 0]
    }
    #[inline(always)]
    unsafe fn read(at: *const u32) -> u32 {
        unsafe { at.read_unaligned() }
    }
    #[inline(always)]
    fn from_words(words: &[u32; 4]) -> u32 {
        words[0]
    }
    #[inline(always)]
    fn endpoint(addr: u32, port: u16, proto: u8) -> Endpoint {
        Endpoint::ipv4(addr, port, proto)
    }
    #[inline(always)]
    fn key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
        FlowKey::new(src, dst, sport, dport, proto)
    }
    #[inline(always)]
    fn hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash_v4(src, dst, sport, dport, proto)
    }
    #[inline(always)]
    fn vip_hash(vip: &VipInfo, src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        vip_hash_v4(
            vip.hash,
            vip.hash_prefix_v4,
            (src, dst, sport, dport, proto),
        )
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey, FlowState> {
        &FLOWS
    }
    #[inline(always)]
    fn nat_flows() -> &'static LruHashMap<FlowKey, NatTarget> {
        &NAT_FLOWS
    }
    #[inline(always)]
    fn neighbour(addr: u32) -> Option<&'static NextHop> {
        unsafe { NEIGHBOURS.get(addr) }
    }
    #[inline(always)]
    fn route(addr: u32) -> Option<&'static Route> {
        ROUTES.get(Key::new(32, addr))
    }
    #[inline(always)]
    fn parse(ctx: &XdpContext, l3: usize, out: &mut Packet<Self>) -> Result<(), Verdict> {
        parse::ipv4(ctx, l3, out)
    }
    #[inline(always)]
    fn packet(scratch: &mut Scratch) -> &mut Packet<Self> {
        &mut scratch.v4
    }
    #[inline(always)]
    fn quoted(scratch: &mut Scratch) -> &mut Quoted<Self> {
        &mut scratch.quoted4
    }
    #[inline(always)]
    fn nat_scratch(scratch: &mut Scratch) -> &mut NatScratch<Self> {
        &mut scratch.nat4
    }
    #[inline(always)]
    fn set_key(out: &mut FlowKey, src: u32, dst: u32, [sport, dport]: [u16; 2], proto: u8) {
        out.src = src;
        out.dst = dst;
        out.sport = sport;
        out.dport = dport;
        out.proto = proto;
        out._pad1 = 0;
        out._pad2 = 0;
    }
    #[inline(always)]
    fn replace_addr(check: u16, old: u32, new: u32, udp: bool) -> u16 {
        if udp {
            checksum::udp_replace4(check, old, new)
        } else {
            checksum::replace4(check, old, new)
        }
    }
    #[inline(always)]
    fn header_checksum(ctx: &XdpContext, l3: usize, old: u32, new: u32) -> Result<(), Verdict> {
        let check: *mut u16 =
            ptr_at(ctx, l3 + IPV4_CHECK_AT).ok_or(Verdict::of(Reason::DropTruncatedIpv4))?;
        unsafe { check.write_unaligned(checksum::replace4(check.read_unaligned(), old, new)) };
        Ok(())
    }
    const MSS: u16 = 1460;
    #[inline(always)]
    unsafe fn syn_cookie(ip: *mut u8, tcp: *mut u8, tcp_len: u32) -> i64 {
        unsafe { bpf_tcp_raw_gen_syncookie_ipv4(ip.cast(), tcp.cast(), tcp_len) }
    }
    #[inline(always)]
    unsafe fn check_cookie(ip: *mut u8, tcp: *mut u8) -> i64 {
        unsafe { bpf_tcp_raw_check_syncookie_ipv4(ip.cast(), tcp.cast()) }
    }
    #[inline(always)]
    fn fixed_header(ctx: &XdpContext, l3: usize) -> Option<*mut u8> {
        ptr_at::<[u8; 20]>(ctx, l3).map(|p| p.cast())
    }
    #[inline(always)]
    fn write_header(
        ctx: &XdpContext,
        l3: usize,
        payload: u16,
        proto: u8,
        src: u32,
        dst: u32,
    ) -> Result<(), Verdict> {
        let first = u16::from_be_bytes([0x45, 0]).to_be();
        let length = (20 + payload).to_be();
        let dont_fragment = 0x4000u16.to_be();
        let ttl_proto = u16::from_be_bytes([64, proto]).to_be();
        encap::write_ipv4(ctx, l3, [first, length, dont_fragment, ttl_proto], src, dst)
    }
}

/// IPv6.
pub struct V6;

impl Family for V6 {
    type Addr = [u32; 4];
    type Key = FlowKey6;
    const ETHER_TYPE: u16 = 0x86dd;
    const SRC_AT: usize = 8;
    const DST_AT: usize = 24;
    const HEADER_LEN: usize = 40;
    const ICMP: u8 = PROTO_ICMPV6;
    const IN_IP: u8 = PROTO_IPV6;
    const AF: u8 = 10;
    const FAMILY: u8 = foobar_lb_common::FAMILY_IPV6;
    const BITS: u32 = 128;

    #[inline(always)]
    fn words(addr: [u32; 4]) -> [u32; 4] {
        addr
    }
    #[inline(always)]
    unsafe fn read(at: *const [u32; 4]) -> [u32; 4] {
        let word = at.cast::<u32>();
        unsafe {
            [
                word.read_unaligned(),
                word.add(1).read_unaligned(),
                word.add(2).read_unaligned(),
                word.add(3).read_unaligned(),
            ]
        }
    }
    #[inline(always)]
    fn from_words(words: &[u32; 4]) -> [u32; 4] {
        *words
    }
    #[inline(always)]
    fn endpoint(addr: [u32; 4], port: u16, proto: u8) -> Endpoint {
        Endpoint::ipv6(addr, port, proto)
    }
    #[inline(always)]
    fn key(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> FlowKey6 {
        FlowKey6::new(src, dst, sport, dport, proto)
    }
    #[inline(always)]
    fn hash(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash_v6(src, dst, sport, dport, proto)
    }
    #[inline(always)]
    fn vip_hash(
        vip: &VipInfo,
        src: [u32; 4],
        dst: [u32; 4],
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> u32 {
        vip_hash_v6(
            vip.hash,
            vip.hash_prefix_v6,
            (src, dst, sport, dport, proto),
        )
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey6, FlowState> {
        &FLOWS6
    }
    #[inline(always)]
    fn nat_flows() -> &'static LruHashMap<FlowKey6, NatTarget> {
        &NAT_FLOWS6
    }
    #[inline(always)]
    fn neighbour(addr: [u32; 4]) -> Option<&'static NextHop> {
        unsafe { NEIGHBOURS6.get(addr) }
    }
    #[inline(always)]
    fn route(addr: [u32; 4]) -> Option<&'static Route> {
        ROUTES6.get(Key::new(128, addr))
    }
    #[inline(always)]
    fn parse(ctx: &XdpContext, l3: usize, out: &mut Packet<Self>) -> Result<(), Verdict> {
        parse::ipv6(ctx, l3, out)
    }
    #[inline(always)]
    fn packet(scratch: &mut Scratch) -> &mut Packet<Self> {
        &mut scratch.v6
    }
    #[inline(always)]
    fn quoted(scratch: &mut Scratch) -> &mut Quoted<Self> {
        &mut scratch.quoted6
    }
    #[inline(always)]
    fn nat_scratch(scratch: &mut Scratch) -> &mut NatScratch<Self> {
        &mut scratch.nat6
    }
    #[inline(always)]
    fn set_key(
        out: &mut FlowKey6,
        src: [u32; 4],
        dst: [u32; 4],
        [sport, dport]: [u16; 2],
        proto: u8,
    ) {
        set_words(&mut out.src, src);
        set_words(&mut out.dst, dst);
        out.sport = sport;
        out.dport = dport;
        out.proto = proto;
        out._pad1 = 0;
        out._pad2 = 0;
    }
    #[inline(always)]
    fn replace_addr(check: u16, old: [u32; 4], new: [u32; 4], udp: bool) -> u16 {
        if udp {
            checksum::udp_replace16(check, old, new)
        } else {
            checksum::replace16(check, old, new)
        }
    }
    #[inline(always)]
    fn header_checksum(_: &XdpContext, _: usize, _: [u32; 4], _: [u32; 4]) -> Result<(), Verdict> {
        Ok(())
    }
    const MSS: u16 = 1440;
    #[inline(always)]
    unsafe fn syn_cookie(ip: *mut u8, tcp: *mut u8, tcp_len: u32) -> i64 {
        unsafe { bpf_tcp_raw_gen_syncookie_ipv6(ip.cast(), tcp.cast(), tcp_len) }
    }
    #[inline(always)]
    unsafe fn check_cookie(ip: *mut u8, tcp: *mut u8) -> i64 {
        unsafe { bpf_tcp_raw_check_syncookie_ipv6(ip.cast(), tcp.cast()) }
    }
    #[inline(always)]
    fn fixed_header(ctx: &XdpContext, l3: usize) -> Option<*mut u8> {
        ptr_at::<[u8; 40]>(ctx, l3).map(|p| p.cast())
    }
    #[inline(always)]
    fn write_header(
        ctx: &XdpContext,
        l3: usize,
        payload: u16,
        proto: u8,
        src: [u32; 4],
        dst: [u32; 4],
    ) -> Result<(), Verdict> {
        let first = 0x6000_0000u32.to_be();
        let second = ((payload as u32) << 16 | (proto as u32) << 8 | 64).to_be();
        encap::write_ipv6(ctx, l3, [first, second], &src, &dst)
    }
}
