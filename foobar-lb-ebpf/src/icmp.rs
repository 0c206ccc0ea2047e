//! ICMP at the balancer, for both families:
//! - an echo request to a VIP address is answered here (rate-limited);
//! - an error from the client side that quotes a VIP flow's packet toward the client
//!   (path MTU discovery, time exceeded) goes on to that flow's backend, translated
//!   as the backend sent the packet, or encapsulated for DSR;
//! - an error from the backend side that quotes a packet the balancer translated (NAT,
//!   full NAT) is translated back, outer and inner headers, so the client matches it;
//! - a packet too big for its next hop is answered with "fragmentation needed" or
//!   "packet too big", quoting it as it arrived.
//!
//! Checksums are updated incrementally: ICMP's covers the quoted headers (and for
//! ICMPv6 the outer addresses); the quoted transport checksum is left as quoted, as
//! no receiver checks it on a truncated quote.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, FORWARD_DSR_GUE, FORWARD_DSR_IPIP, FORWARD_FULLNAT, PROTO_TCP,
    PROTO_UDP, ROLE_BACKEND, ROLE_CLIENT, Reason, SCHED_MAGLEV, VipAddr, checksum, schedule_index,
};

use crate::{
    BACKENDS, Events, ICMP_RATE, REPLIES, SCHEDULES, SCRATCH, SETTINGS, Scratch, Status, VIP_ADDRS,
    VIPS, Verdict, encap,
    family::Family,
    forward,
    nat::End,
    parse::{self, Packet, ptr_at},
    rate, steer,
};

/// Bytes of the offending packet a "too big" answer quotes: the IP header and the
/// start of TCP (ports and sequence number, which the sender's stack checks).
const QUOTE: usize = 64;
/// The fixed part of an ICMP message: type, code, checksum, four more bytes.
const ICMP_HEADER: usize = 8;

/// ICMP types, per family.
struct Types {
    echo_request: u8,
    echo_reply: u8,
}

#[inline(always)]
fn types<F: Family>() -> Types {
    if F::HEADER_LEN == 20 {
        Types {
            echo_request: 8,
            echo_reply: 0,
        }
    } else {
        Types {
            echo_request: 128,
            echo_reply: 129,
        }
    }
}

/// Errors that quote the packet they are about: destination unreachable (with
/// fragmentation needed), time exceeded, and for IPv6 packet too big.
#[inline(always)]
fn is_error<F: Family>(icmp_type: u8) -> bool {
    if F::HEADER_LEN == 20 {
        icmp_type == 3 || icmp_type == 11
    } else {
        icmp_type == 1 || icmp_type == 2 || icmp_type == 3
    }
}

/// What became of an ICMP packet.
pub enum Outcome {
    /// Answered, translated or passed: this verdict.
    Done(Verdict),
    /// An error about a DSR flow: to be encapsulated, as the flow's packets are, to
    /// this backend slot (by the caller).
    Encapsulate(u32),
}

/// An ICMP packet that arrived on an interface with `roles`. Classifying it and
/// translating an error are functions of their own, called one after the other, so
/// that their stack frames do not add up.
#[inline(always)]
pub fn handle<F: Family>(
    ctx: &XdpContext,
    roles: u32,
    pkt: &Packet<F>,
    events: &mut Events,
) -> Result<Outcome, Verdict> {
    if let Some(answer) = classify(ctx, pkt).into_verdict() {
        return Ok(Outcome::Done(answer));
    }
    if roles & ROLE_CLIENT != 0 {
        let mut encapsulate = 0;
        match to_backend(ctx, pkt, events, &mut encapsulate) {
            Status::GO_ON => return Ok(Outcome::Encapsulate(encapsulate)),
            Status::NOT_OURS => {}
            done => {
                return done
                    .check()
                    .map(|_| Outcome::Done(Verdict::of(Reason::PassIcmp)));
            }
        }
    }
    if roles & ROLE_BACKEND != 0
        && let Some(verdict) = to_client(ctx, pkt, events).into_verdict()
    {
        return Ok(Outcome::Done(verdict));
    }
    Ok(Outcome::Done(Verdict::of(Reason::PassIcmp)))
}

/// Answers an echo request to a VIP, passes what is not an error that quotes a
/// TCP/UDP packet, and parses the quote of one into the scratch map (go on).
#[inline(never)]
fn classify<F: Family>(ctx: &XdpContext, pkt: &Packet<F>) -> Status {
    match classify_icmp(ctx, pkt) {
        Ok(None) => Status::GO_ON,
        Ok(Some(v)) | Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn classify_icmp<F: Family>(ctx: &XdpContext, pkt: &Packet<F>) -> Result<Option<Verdict>, Verdict> {
    let header: *const [u8; 2] = ptr_at(ctx, pkt.l4).ok_or(Verdict::of(Reason::DropTruncatedL4))?;
    let [icmp_type, _code] = unsafe { *header };
    if icmp_type == types::<F>().echo_request {
        let vip = VipAddr {
            addr: F::words(pkt.dst),
        };
        if unsafe { VIP_ADDRS.get(vip) }.is_none() {
            return Err(Verdict::of(Reason::PassIcmp));
        }
        return echo_reply(ctx, pkt).map(Some);
    }
    if !is_error::<F>(icmp_type) {
        return Err(Verdict::of(Reason::PassIcmp));
    }
    let inner = F::quoted(scratch()?);
    quoted(ctx, pkt, inner)?;
    Ok(None)
}

/// The per-CPU scratch map.
#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, Verdict> {
    let scratch = SCRATCH
        .get_ptr_mut(0)
        .ok_or(Verdict::of(Reason::DropNoRoom))?;
    Ok(unsafe { &mut *scratch })
}

/// Answers an echo request: addresses and MACs swapped, the type turned, back out.
#[inline(always)]
fn echo_reply<F: Family>(ctx: &XdpContext, pkt: &Packet<F>) -> Result<Verdict, Verdict> {
    if rate_limited() {
        return Err(Verdict::of(Reason::DropIcmpRateLimited));
    }
    let truncated = Verdict::of(Reason::DropTruncatedL4);
    let src: *mut F::Addr = ptr_at(ctx, pkt.l3 + F::SRC_AT).ok_or(truncated)?;
    let dst: *mut F::Addr = ptr_at(ctx, pkt.l3 + F::DST_AT).ok_or(truncated)?;
    let icmp: *mut [u8; 2] = ptr_at(ctx, pkt.l4).ok_or(truncated)?;
    let check: *mut u16 = ptr_at(ctx, pkt.l4 + 2).ok_or(truncated)?;
    unsafe {
        // Swapping the addresses changes neither the IPv4 header's sum nor ICMPv6's
        // pseudo-header sum.
        src.write_unaligned(pkt.dst);
        dst.write_unaligned(pkt.src);
        let old = u16::from_ne_bytes(*icmp);
        let new = [types::<F>().echo_reply, (*icmp)[1]];
        *icmp = new;
        check.write_unaligned(checksum::replace2(
            check.read_unaligned(),
            old,
            u16::from_ne_bytes(new),
        ));
    }
    swap_macs(ctx)?;
    Ok(Verdict::of(Reason::IcmpEchoReply))
}

/// Whether this CPU has sent its share of ICMP this second.
#[inline(always)]
fn rate_limited() -> bool {
    let limit = match SETTINGS.get(0) {
        Some(s) => s.icmp_rate,
        None => 0,
    };
    rate::over(&ICMP_RATE, limit)
}

/// Sends the frame back where it came from.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Result<(), Verdict> {
    parse::turn_around(ctx, 0)
}

/// The header an ICMP error quotes (a TCP/UDP packet of the same family).
#[repr(C)]
pub struct Quoted<F: Family> {
    l3: usize,
    l4: usize,
    src: F::Addr,
    dst: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
}

/// Parses the quoted packet into `out`. Not TCP/UDP of this family: not ours; cut
/// short: dropped.
#[inline(always)]
fn quoted<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    out: &mut Quoted<F>,
) -> Result<(), Verdict> {
    let cut = Verdict::of(Reason::DropTruncatedIcmp);
    let l3 = pkt.l4 + ICMP_HEADER;
    let first: *const [u8; 10] = ptr_at(ctx, l3).ok_or(cut)?;
    let first = unsafe { *first };
    let (version, header_len, proto) = if F::HEADER_LEN == 20 {
        (4, (first[0] & 0x0f) as usize * 4, first[9])
    } else {
        // A quote's extension headers are not walked: TCP/UDP must follow directly.
        (6, F::HEADER_LEN, first[6])
    };
    if first[0] >> 4 != version || header_len < F::HEADER_LEN {
        return Err(Verdict::of(Reason::PassIcmp));
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::of(Reason::PassIcmp));
    }
    let src: *const F::Addr = ptr_at(ctx, l3 + F::SRC_AT).ok_or(cut)?;
    let dst: *const F::Addr = ptr_at(ctx, l3 + F::DST_AT).ok_or(cut)?;
    let l4 = l3 + header_len;
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(cut)?;
    let [sport, dport] = unsafe { *ports };
    // Field by field: a whole-struct copy into the map would call memmove.
    out.l3 = l3;
    out.l4 = l4;
    out.src = unsafe { F::read(src) };
    out.dst = unsafe { F::read(dst) };
    out.sport = sport;
    out.dport = dport;
    out.proto = proto;
    Ok(())
}

/// An error from the client side about a packet a VIP flow sent the client: on to
/// the flow's backend. Not ours: no VIP flow of ours; go on: to be encapsulated to
/// backend `encapsulate`.
#[inline(never)]
fn to_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    events: &mut Events,
    encapsulate: &mut u32,
) -> Status {
    match error_to_backend(ctx, pkt, events) {
        Ok(None) => Status::NOT_OURS,
        Ok(Some(Outcome::Encapsulate(id))) => {
            *encapsulate = id;
            Status::GO_ON
        }
        Ok(Some(Outcome::Done(v))) | Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn error_to_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    events: &mut Events,
) -> Result<Option<Outcome>, Verdict> {
    let inner = F::quoted(scratch()?);
    // The quoted packet went VIP → client: its flow is the other way round.
    let key = F::key(inner.dst, inner.src, inner.dport, inner.sport, inner.proto);
    // (generation: the slot's backend is still the flow's).
    let (id, nat_port, generation) = match F::flows().get_ptr(key) {
        Some(flow) => unsafe {
            (
                (*flow).backend_id,
                (*flow).nat_port,
                Some((*flow).generation),
            )
        },
        None => match maglev_backend::<F>(inner) {
            Some(id) => (id, 0, None),
            None => return Ok(None),
        },
    };
    let backend: &Backend = match BACKENDS.get(id) {
        Some(b)
            if b.flags & BACKEND_ACTIVE != 0 && generation.is_none_or(|g| g == b.generation) =>
        {
            b
        }
        _ => return Ok(None),
    };
    if backend.forwarding == FORWARD_DSR_IPIP || backend.forwarding == FORWARD_DSR_GUE {
        return Ok(Some(Outcome::Encapsulate(id)));
    }
    let fullnat = backend.forwarding == FORWARD_FULLNAT;
    if fullnat && nat_port == 0 {
        // No flow remembered: the port it left with is unknown.
        return Ok(None);
    }
    // Unresolved next hop: translated all the same, and left to the kernel.
    let hop = match steer::backend_hop::<F>(ctx, pkt.proto, backend, pkt.src, events) {
        Ok(hop) => Some(hop),
        Err(v) if v.is(Reason::PassNoNeighbour) => None,
        Err(v) => return Err(v),
    };
    let backend_addr = F::from_words(&backend.endpoint.addr);
    let mut edit = Edit::new(ctx, pkt, inner)?;
    edit.outer(ctx, pkt, End::Destination, pkt.dst, backend_addr)?;
    edit.inner_addr(ctx, inner, End::Source, inner.src, backend_addr)?;
    edit.inner_port(ctx, inner, End::Source, inner.sport, backend.endpoint.port)?;
    if fullnat {
        let source = F::from_words(&backend.source);
        edit.inner_addr(ctx, inner, End::Destination, inner.dst, source)?;
        edit.inner_port(ctx, inner, End::Destination, inner.dport, nat_port)?;
    }
    edit.finish(ctx)?;
    events.note(Reason::IcmpToBackend);
    Ok(Some(Outcome::Done(match hop {
        Some(hop) => forward::send(ctx, &hop),
        None => Verdict::of(Reason::PassNoNeighbour),
    })))
}

/// The backend a Maglev VIP's schedule gives the flow of a quoted packet (a flow not
/// remembered during a flood).
#[inline(always)]
fn maglev_backend<F: Family>(inner: &Quoted<F>) -> Option<u32> {
    let vip = unsafe { VIPS.get(F::endpoint(inner.src, inner.sport, inner.proto)) }?;
    if vip.scheduler != SCHED_MAGLEV || vip.schedule_len == 0 {
        return None;
    }
    let hash = F::vip_hash(
        vip,
        inner.dst,
        inner.src,
        inner.dport,
        inner.sport,
        inner.proto,
    );
    SCHEDULES
        .get(schedule_index(vip.id, hash % vip.schedule_len))
        .copied()
}

/// An error from the backend side about a packet the balancer translated for a
/// backend: back to the client, as if about the packet the client sent. `None`: not
/// about a translated packet.
#[inline(never)]
fn to_client<F: Family>(ctx: &XdpContext, pkt: &Packet<F>, events: &mut Events) -> Status {
    match error_to_client(ctx, pkt, events) {
        Ok(None) => Status::NOT_OURS,
        Ok(Some(v)) | Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn error_to_client<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    events: &mut Events,
) -> Result<Option<Verdict>, Verdict> {
    let inner = F::quoted(scratch()?);
    // The quoted packet went from one of full NAT's ports (its reverse entry names
    // the flow), or to a NAT backend's endpoint.
    let key = F::key(inner.dst, inner.src, inner.dport, inner.sport, inner.proto);
    let nat = if steer::in_fullnat_range(inner.sport) {
        F::nat_flows().get_ptr(key)
    } else {
        None
    };
    let fullnat = nat.is_some();
    let (client, client_port, vip, vip_port) = match nat {
        Some(nat) => {
            let nat = unsafe { &*nat };
            (
                F::from_words(&nat.client),
                nat.client_port,
                F::from_words(&nat.vip),
                nat.vip_port,
            )
        }
        None => {
            let endpoint = F::endpoint(inner.dst, inner.dport, inner.proto);
            let Some(target) = (unsafe { REPLIES.get(endpoint) }) else {
                return Ok(None);
            };
            (
                inner.src,
                inner.sport,
                F::from_words(&target.vip.addr),
                target.vip.port,
            )
        }
    };
    // Unresolved next hop: translated all the same, and left to the kernel.
    let hop = match steer::client_hop::<F>(ctx, pkt.proto, client, vip, events) {
        Ok(hop) => Some(hop),
        Err(v) if v.is(Reason::PassNoNeighbour) => None,
        Err(v) => return Err(v),
    };
    let mut edit = Edit::new(ctx, pkt, inner)?;
    edit.inner_addr(ctx, inner, End::Destination, inner.dst, vip)?;
    edit.inner_port(ctx, inner, End::Destination, inner.dport, vip_port)?;
    if fullnat {
        edit.inner_addr(ctx, inner, End::Source, inner.src, client)?;
        edit.inner_port(ctx, inner, End::Source, inner.sport, client_port)?;
        edit.outer(ctx, pkt, End::Destination, pkt.dst, client)?;
    }
    // The backend's own error speaks for the VIP; a router's keeps its address.
    if pkt.src == inner.dst {
        edit.outer(ctx, pkt, End::Source, pkt.src, vip)?;
    }
    edit.finish(ctx)?;
    events.note(Reason::IcmpToClient);
    Ok(Some(match hop {
        Some(hop) => forward::send(ctx, &hop),
        None => Verdict::of(Reason::PassNoNeighbour),
    }))
}

/// Rewrites of an ICMP error's outer and quoted headers, keeping its checksums.
struct Edit {
    /// Offset of the ICMP checksum, and its value as edited.
    icmp_at: usize,
    icmp: u16,
    /// Offset of the quoted IPv4 header's checksum, its value as quoted and as edited.
    inner_at: usize,
    inner_quoted: u16,
    inner: u16,
    v4: bool,
}

impl Edit {
    #[inline(always)]
    fn new<F: Family>(
        ctx: &XdpContext,
        pkt: &Packet<F>,
        inner: &Quoted<F>,
    ) -> Result<Self, Verdict> {
        let cut = Verdict::of(Reason::DropTruncatedIcmp);
        let icmp: *const u16 = ptr_at(ctx, pkt.l4 + 2).ok_or(cut)?;
        let v4 = F::HEADER_LEN == 20;
        let inner_quoted = if v4 {
            let check: *const u16 = ptr_at(ctx, inner.l3 + 10).ok_or(cut)?;
            unsafe { check.read_unaligned() }
        } else {
            0
        };
        Ok(Self {
            icmp_at: pkt.l4 + 2,
            icmp: unsafe { icmp.read_unaligned() },
            inner_at: inner.l3 + 10,
            inner_quoted,
            inner: inner_quoted,
            v4,
        })
    }

    /// Changes an outer address.
    #[inline(always)]
    fn outer<F: Family>(
        &mut self,
        ctx: &XdpContext,
        pkt: &Packet<F>,
        end: End,
        old: F::Addr,
        new: F::Addr,
    ) -> Result<(), Verdict> {
        let at = pkt.l3
            + if end == End::Source {
                F::SRC_AT
            } else {
                F::DST_AT
            };
        let addr: *mut F::Addr = ptr_at(ctx, at).ok_or(Verdict::of(Reason::DropTruncatedIcmp))?;
        unsafe { addr.write_unaligned(new) };
        F::header_checksum(ctx, pkt.l3, old, new)?;
        if !self.v4 {
            // ICMPv6's pseudo-header.
            self.icmp = F::replace_addr(self.icmp, old, new, false);
        }
        Ok(())
    }

    /// Changes an address of the quoted header.
    #[inline(always)]
    fn inner_addr<F: Family>(
        &mut self,
        ctx: &XdpContext,
        inner: &Quoted<F>,
        end: End,
        old: F::Addr,
        new: F::Addr,
    ) -> Result<(), Verdict> {
        let at = inner.l3
            + if end == End::Source {
                F::SRC_AT
            } else {
                F::DST_AT
            };
        let addr: *mut F::Addr = ptr_at(ctx, at).ok_or(Verdict::of(Reason::DropTruncatedIcmp))?;
        unsafe { addr.write_unaligned(new) };
        if self.v4 {
            self.inner = F::replace_addr(self.inner, old, new, false);
        }
        self.icmp = F::replace_addr(self.icmp, old, new, false);
        Ok(())
    }

    /// Changes a port of the quoted header.
    #[inline(always)]
    fn inner_port<F: Family>(
        &mut self,
        ctx: &XdpContext,
        inner: &Quoted<F>,
        end: End,
        old: u16,
        new: u16,
    ) -> Result<(), Verdict> {
        let at = inner.l4 + if end == End::Source { 0 } else { 2 };
        let port: *mut u16 = ptr_at(ctx, at).ok_or(Verdict::of(Reason::DropTruncatedIcmp))?;
        unsafe { port.write_unaligned(new) };
        self.icmp = checksum::replace2(self.icmp, old, new);
        Ok(())
    }

    /// Writes the checksums.
    #[inline(always)]
    fn finish(mut self, ctx: &XdpContext) -> Result<(), Verdict> {
        let cut = Verdict::of(Reason::DropTruncatedIcmp);
        if self.v4 {
            let inner: *mut u16 = ptr_at(ctx, self.inner_at).ok_or(cut)?;
            unsafe { inner.write_unaligned(self.inner) };
            // The quoted header's checksum is part of the ICMP message.
            self.icmp = checksum::replace2(self.icmp, self.inner_quoted, self.inner);
        }
        let icmp: *mut u16 = ptr_at(ctx, self.icmp_at).ok_or(cut)?;
        unsafe { icmp.write_unaligned(self.icmp) };
        Ok(())
    }
}

/// Answers a packet too big for its next hop, whose MTU (less what the balancer
/// would add) is `mtu`: an ICMP "fragmentation needed" (IPv4) or "packet too big"
/// (IPv6) from the packet's destination back to its source, quoting its first bytes.
/// The frame is rebuilt in place and sent back out.
#[inline(always)]
pub fn too_big<F: Family>(ctx: &XdpContext, pkt: &Packet<F>, mtu: u16) -> Verdict {
    answer_too_big(ctx, pkt, mtu)
        .into_verdict()
        .unwrap_or(Verdict::of(Reason::DropNoRoom))
}

#[inline(never)]
fn answer_too_big<F: Family>(ctx: &XdpContext, pkt: &Packet<F>, mtu: u16) -> Status {
    Status::verdict(match build_too_big(ctx, pkt, mtu) {
        Ok(()) => Verdict::of(Reason::IcmpTooBig),
        Err(verdict) => verdict,
    })
}

#[inline(always)]
fn build_too_big<F: Family>(ctx: &XdpContext, pkt: &Packet<F>, mtu: u16) -> Result<(), Verdict> {
    let no_room = Verdict::of(Reason::DropNoRoom);
    if (pkt.ip_len as usize) < QUOTE {
        return Err(no_room);
    }
    if rate_limited() {
        return Err(Verdict::of(Reason::DropIcmpRateLimited));
    }
    let l2 = pkt.l3;
    // Keep the L2 header and the quote, then make room for the new IP and ICMP headers
    // in front of the quote (the old IP header becomes the quoted one).
    let keep = l2 + QUOTE;
    let shrink = keep as i32 - pkt.frame_len as i32;
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, shrink) } != 0 {
        return Err(no_room);
    }
    let room = F::HEADER_LEN + ICMP_HEADER;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(room as i32)) } != 0 {
        return Err(no_room);
    }
    // Every packet pointer is void after the adjustments: each is checked again.
    parse::turn_around(ctx, room)?;
    if l2 > 14 {
        let from: *const u32 = ptr_at(ctx, room + 12).ok_or(no_room)?;
        let to: *mut u32 = ptr_at(ctx, 12).ok_or(no_room)?;
        unsafe { to.write_unaligned(from.read_unaligned()) };
    }
    let ether_type: *mut u16 = ptr_at(ctx, l2 - 2).ok_or(no_room)?;
    unsafe { ether_type.write_unaligned(F::ETHER_TYPE.to_be()) };

    let icmp_len = (ICMP_HEADER + QUOTE) as u16;
    let (src, dst) = (F::words(pkt.dst), F::words(pkt.src));
    let mut seed = 0u32;
    if F::HEADER_LEN == 20 {
        // Precedence "internetwork control", as the kernel sends its ICMP.
        let first = u16::from_be_bytes([0x45, 0xc0]).to_be();
        let length = (F::HEADER_LEN as u16 + icmp_len).to_be();
        let ttl_proto = u16::from_be_bytes([64, foobar_lb_common::PROTO_ICMP]).to_be();
        encap::write_ipv4(ctx, l2, [first, length, 0, ttl_proto], src[0], dst[0])?;
    } else {
        let first = 0x6000_0000u32.to_be();
        let second = ((icmp_len as u32) << 16 | (F::ICMP as u32) << 8 | 64).to_be();
        encap::write_ipv6(ctx, l2, [first, second], &src, &dst)?;
        // ICMPv6's pseudo-header: addresses, length, next header.
        // Indexed, not iterated: the verifier follows a counted loop.
        for i in 0..4 {
            seed += (src[i] & 0xffff) + (src[i] >> 16) + (dst[i] & 0xffff) + (dst[i] >> 16);
        }
        seed += icmp_len.to_be() as u32 + (F::ICMP as u16).to_be() as u32;
    }
    let icmp: *mut [u32; (ICMP_HEADER + QUOTE) / 4] =
        ptr_at(ctx, l2 + F::HEADER_LEN).ok_or(no_room)?;
    let header: *mut [u32; 2] = icmp.cast();
    let (icmp_type, code) = if F::HEADER_LEN == 20 {
        (3u8, 4u8)
    } else {
        (2, 0)
    };
    // IPv4: two unused bytes then the MTU; IPv6: a 32-bit MTU. The same bytes.
    let mtu_field = (mtu as u32).to_be();
    unsafe {
        header.write_unaligned([u32::from_ne_bytes([icmp_type, code, 0, 0]), mtu_field]);
        let sum = bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            icmp.cast(),
            (ICMP_HEADER + QUOTE) as u32,
            seed,
        );
        let check = !checksum::fold(sum as u32);
        let check_at: *mut u16 = ptr_at(ctx, l2 + F::HEADER_LEN + 2).ok_or(no_room)?;
        check_at.write_unaligned(check);
    }
    Ok(())
}
