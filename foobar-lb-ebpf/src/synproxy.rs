//! SYN cookies for NAT VIPs during a flood of new flows: the balancer answers a SYN
//! itself with the kernel's SYN cookie and remembers nothing; only a client whose ACK
//! proves its cookie gets a flow, and the backend a SYN (made from that ACK). The
//! backend's SYN-ACK becomes the ACK that opens the client's window; from then on the
//! flow's sequence numbers differ by a delta kept in its entry: added to what the
//! backend sends, taken from what the client acknowledges. A flood of random-source
//! SYNs thus ends at the balancer, as XDP_TX SYN-ACKs, without a map write.
//!
//! The SYN-ACK offers a zero window and only an MSS option, so the client sends no
//! data before the backend exists, and neither end uses window scaling, SACK or
//! timestamps (the kernel's own SYN cookies without timestamps make the same
//! trade). Backends that speak first (MySQL, SMTP) wait for the client's ACK: the
//! balancer gives it to them when they send their SYN-ACK again.

use aya_ebpf::{
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_csum_diff, bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    },
    programs::XdpContext,
};
use foobar_lb_common::{
    FLOW_ESTABLISHED, FLOW_SEQ_ADJUSTED, FLOW_SYN_SENT, PROTO_TCP, Reason, checksum,
};

use crate::{
    PROXIED, REPLIES, SCRATCH, Status, Verdict,
    family::Family,
    parse::{self, Packet, ptr_at},
    steer,
};

/// TCP header fields, as offsets from its start.
const SEQ_AT: usize = 4;
const ACK_AT: usize = 8;
const FLAGS_AT: usize = 13;
const CHECK_AT: usize = 16;
/// A TCP header with an MSS option and nothing else.
const WITH_MSS: usize = 24;
/// A TCP header without options.
const BARE: usize = 20;

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Room in the scratch map for a copy of a TCP header with an MSS option: what a
/// cookie is made for, or checked on (a probe's, one sequence number on).
pub struct SynScratch {
    header: [u8; WITH_MSS],
}

/// A TCP packet's flags; 0 when it is cut short (parsing checked it is not).
#[inline(always)]
pub fn flags<F: Family>(ctx: &XdpContext, pkt: &Packet<F>) -> u8 {
    // Read with the data offset before them: a bounds check of one byte compiles to
    // a comparison the verifier does not follow.
    match ptr_at::<[u8; 2]>(ctx, pkt.l4 + FLAGS_AT - 1) {
        Some(both) => unsafe { (*both)[1] },
        None => 0,
    }
}

/// A TCP packet's sequence or acknowledgement number (host order).
#[inline(always)]
fn read_u32(ctx: &XdpContext, at: usize) -> Option<u32> {
    ptr_at::<u32>(ctx, at).map(|p| u32::from_be(unsafe { p.read_unaligned() }))
}

/// Writes the TCP header (24 bytes with an MSS option, or 20 bare) at `l4` and its
/// checksum over the pseudo-header of `src` → `dst`; the frame ends after it.
#[inline(always)]
fn write_tcp<F: Family>(
    ctx: &XdpContext,
    l4: usize,
    (src, dst): (F::Addr, F::Addr),
    words: [u32; 5],
    mss: u16,
) -> Result<(), Verdict> {
    let no_room = Verdict::of(Reason::DropNoRoom);
    let len = if mss != 0 { WITH_MSS } else { BARE };
    let tcp: *mut [u32; 5] = ptr_at(ctx, l4).ok_or(no_room)?;
    let tcp: *mut u32 = tcp.cast();
    unsafe {
        for (i, word) in words.into_iter().enumerate() {
            tcp.add(i).write_unaligned(word);
        }
        if mss != 0 {
            let option: *mut u32 = ptr_at(ctx, l4 + BARE).ok_or(no_room)?;
            option.write_unaligned(u32::from_ne_bytes([2, 4, (mss >> 8) as u8, mss as u8]));
        }
        let tcp: *mut u32 = if mss != 0 {
            ptr_at::<[u32; 6]>(ctx, l4).ok_or(no_room)?.cast()
        } else {
            tcp
        };
        let seed = F::pseudo_sum(src, dst, PROTO_TCP, len as u16);
        let sum = bpf_csum_diff(core::ptr::null_mut(), 0, tcp, len as u32, seed);
        let check: *mut u16 = ptr_at(ctx, l4 + CHECK_AT).ok_or(no_room)?;
        check.write_unaligned(!checksum::fold(sum as u32));
    }
    Ok(())
}

/// The third word of a TCP header: data offset, flags, window (as written).
#[inline(always)]
fn offset_flags_window(len: usize, flags: u8, window: u16) -> u32 {
    let window = window.to_be_bytes();
    u32::from_ne_bytes([(len as u8 / 4) << 4, flags, window[0], window[1]])
}

/// Sizes the frame to end `len` bytes after the transport header.
#[inline(always)]
fn end_after(ctx: &XdpContext, l4: usize, len: usize, frame_len: u32) -> Result<(), Verdict> {
    let delta = (l4 + len) as i32 - frame_len as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(Verdict::of(Reason::DropNoRoom));
    }
    Ok(())
}

/// The parsed packet, a client's TCP packet that missed the flow table, for a NAT
/// VIP whose access lists let its source in: a SYN is counted in the flood window
/// and, during a flood, answered with a cookie (a verdict; [`Status::CALM`] or
/// [`Status::FLOODED`] when it goes on); an ACK that proves a cookie is
/// [`Status::PROVEN`]. Anything else goes on ([`Status::GO_ON`]).
#[inline(never)]
pub fn cookie_step<F: Family>(ctx: &XdpContext) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::GO_ON;
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    let flags = flags(ctx, pkt) & (SYN | ACK | RST | FIN);
    if flags == SYN {
        if !steer::flooding() {
            return Status::CALM;
        }
        let answered = answer_syn::<F>(ctx);
        if answered == Status::NOT_OURS {
            return Status::FLOODED;
        }
        return answered;
    }
    if flags == ACK && cookies_recent() {
        return proves_cookie::<F>(ctx);
    }
    Status::GO_ON
}

/// Whether a cookie was sent in the last two minutes (they are valid that long): an
/// ACK that misses the table is checked only then.
#[inline(always)]
fn cookies_recent() -> bool {
    match PROXIED.get(COOKIE_SENT) {
        Some(&sent) if sent != 0 => {
            unsafe { bpf_ktime_get_ns() }.wrapping_sub(sent) < 120_000_000_000
        }
        _ => false,
    }
}

/// Answers the parsed packet, a SYN, with a SYN-ACK whose sequence number is its
/// cookie, back where it came from. Not ours (the caller goes on without a
/// cookie): IP options or IPv6 extension headers, or the kernel would not make one.
#[inline(always)]
fn answer_syn<F: Family>(ctx: &XdpContext) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::NOT_OURS;
    };
    let scratch = unsafe { &mut *scratch };
    let pkt = F::packet(scratch);
    let (l3, l4, frame_len) = (pkt.l3, pkt.l4, pkt.frame_len);
    let (client, vip, client_port, vip_port) = (pkt.src, pkt.dst, pkt.sport, pkt.dport);
    if l4 != l3 + F::HEADER_LEN {
        return Status::NOT_OURS;
    }
    // The cookie is made for a copy of the SYN's header whose only option is the
    // largest MSS: the client's own is not passed on (the backend is offered the
    // balancer's), and at the cookie's last MSS index an acknowledgement one off
    // (a zero-window probe) no longer passes for the handshake's ACK.
    let header = scratch.syn.header.as_mut_ptr();
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, l4 as u32, header.cast(), 20) } != 0 {
        return Status::NOT_OURS;
    }
    unsafe {
        *header.add(12) = 0x60;
        header
            .add(20)
            .cast::<u32>()
            .write_unaligned(u32::from_ne_bytes([2, 4, 0xff, 0xff]));
    }
    let Some(ip) = F::fixed_header(ctx, l3) else {
        return Status::NOT_OURS;
    };
    let cookie = unsafe { F::syn_cookie(ip, header, WITH_MSS as u32) };
    if cookie < 0 {
        return Status::NOT_OURS;
    }
    if let Some(sent) = PROXIED.get_ptr_mut(COOKIE_SENT) {
        unsafe { *sent = bpf_ktime_get_ns() };
    }
    let Some(client_seq) = read_u32(ctx, l4 + SEQ_AT) else {
        return Status::NOT_OURS;
    };
    let words = [
        (vip_port as u32) | (client_port as u32) << 16,
        (cookie as u32).to_be(),
        client_seq.wrapping_add(1).to_be(),
        offset_flags_window(WITH_MSS, SYN | ACK, 0),
        0,
    ];
    Status::verdict(
        match write_syn_ack::<F>(ctx, (l3, l4, frame_len), (vip, client), words) {
            Ok(()) => Verdict::of(Reason::SynCookie),
            Err(v) => v,
        },
    )
}

#[inline(always)]
fn write_syn_ack<F: Family>(
    ctx: &XdpContext,
    (l3, l4, frame_len): (usize, usize, u32),
    (src, dst): (F::Addr, F::Addr),
    words: [u32; 5],
) -> Result<(), Verdict> {
    end_after(ctx, l4, WITH_MSS, frame_len)?;
    parse::turn_around(ctx, 0)?;
    F::write_header(ctx, l3, WITH_MSS as u16, PROTO_TCP, src, dst)?;
    write_tcp::<F>(ctx, l4, (src, dst), words, F::MSS)
}

/// Whether the parsed packet, an ACK that missed the flow table, acknowledges a SYN
/// cookie this balancer gave: [`Status::PROVEN`] for the handshake's ACK (or the
/// first data), [`Status::PROBE_PROVEN`] for a zero-window probe (its sequence
/// number one less: the client's ACK was lost, and the window the balancer offered
/// is closed), [`Status::GO_ON`] otherwise.
#[inline(always)]
fn proves_cookie<F: Family>(ctx: &XdpContext) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::GO_ON;
    };
    let scratch = unsafe { &mut *scratch };
    let pkt = F::packet(scratch);
    let (l3, l4) = (pkt.l3, pkt.l4);
    if l4 != l3 + F::HEADER_LEN {
        return Status::GO_ON;
    }
    let Some(ip) = F::fixed_header(ctx, l3) else {
        return Status::GO_ON;
    };
    let Some(tcp) = ptr_at::<[u8; 20]>(ctx, l4) else {
        return Status::GO_ON;
    };
    if unsafe { F::check_cookie(ip, tcp.cast()) } == 0 {
        return Status::PROVEN;
    }
    // A probe: checked as the ACK it stands for, one sequence number on.
    let header = scratch.syn.header.as_mut_ptr();
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, l4 as u32, header.cast(), 20) } != 0 {
        return Status::GO_ON;
    }
    let seq: *mut u32 = unsafe { header.add(SEQ_AT) }.cast();
    unsafe { seq.write_unaligned(u32::from_be(seq.read_unaligned()).wrapping_add(1).to_be()) };
    let Some(ip) = F::fixed_header(ctx, l3) else {
        return Status::GO_ON;
    };
    if unsafe { F::check_cookie(ip, header) } == 0 {
        return Status::PROBE_PROVEN;
    }
    Status::GO_ON
}

/// Makes the parsed packet, a client's ACK that proved its cookie (or a probe,
/// whose sequence number is one less), into the SYN the backend gets (the client's
/// initial sequence number, an MSS option, no data); the caller rewrites and sends it
/// as any packet of the flow. The parsed lengths follow.
#[inline(never)]
pub fn ack_into_syn<F: Family>(ctx: &XdpContext, probe: bool) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::verdict(Verdict::of(Reason::DropNoRoom));
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    let (l3, l4) = (pkt.l3, pkt.l4);
    // Each field on its own: a tuple of options leaves LLVM values undefined on the
    // ways out, in registers the verifier has never seen written.
    let Some(header) = ptr_at::<[u32; 4]>(ctx, l4) else {
        return Status::verdict(Verdict::of(Reason::DropTruncatedL4));
    };
    let header = unsafe { header.read_unaligned() };
    let (ports, seq) = (header[0], u32::from_be(header[1]));
    let window = u16::from_be((header[3] >> 16) as u16);
    let words = [
        ports,
        seq.wrapping_sub(if probe { 0 } else { 1 }).to_be(),
        0,
        offset_flags_window(WITH_MSS, SYN, window),
        0,
    ];
    let result = end_after(ctx, l4, WITH_MSS, pkt.frame_len)
        .and_then(|()| F::write_header(ctx, l3, WITH_MSS as u16, PROTO_TCP, pkt.src, pkt.dst))
        .and_then(|()| write_tcp::<F>(ctx, l4, (pkt.src, pkt.dst), words, F::MSS));
    pkt.ip_len = (F::HEADER_LEN + WITH_MSS) as u16;
    pkt.frame_len = (l4 + WITH_MSS) as u32;
    Status::of(result)
}

/// Makes the parsed packet, a backend's SYN-ACK of a flow whose cookie was `cookie`,
/// into the ACK the client waits for (its window opened; options gone); the caller
/// sends it as any reply. Returns the flow's delta.
#[inline(always)]
pub fn syn_ack_to_client<F: Family>(ctx: &XdpContext, cookie: u32) -> u64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    let (l3, l4) = (pkt.l3, pkt.l4);
    let Some(header) = ptr_at::<[u32; 4]>(ctx, l4) else {
        return 0;
    };
    let header = unsafe { header.read_unaligned() };
    let (ports, seq, ack) = (header[0], u32::from_be(header[1]), u32::from_be(header[2]));
    let window = u16::from_be((header[3] >> 16) as u16);
    if l4 != l3 + F::HEADER_LEN {
        return 0;
    }
    let delta = cookie.wrapping_sub(seq);
    let words = [
        ports,
        cookie.wrapping_add(1).to_be(),
        ack.to_be(),
        offset_flags_window(BARE, ACK, window),
        0,
    ];
    let result = end_after(ctx, l4, BARE, pkt.frame_len)
        .and_then(|()| F::write_header(ctx, l3, BARE as u16, PROTO_TCP, pkt.src, pkt.dst))
        .and_then(|()| write_tcp::<F>(ctx, l4, (pkt.src, pkt.dst), words, 0));
    pkt.ip_len = (F::HEADER_LEN + BARE) as u16;
    pkt.frame_len = (l4 + BARE) as u32;
    match result {
        Ok(()) => 1 << 32 | delta as u64,
        Err(_) => 0,
    }
}

/// Answers the parsed packet, a backend's SYN-ACK sent again, with the client's ACK
/// (which the backend never got: the client acknowledged the cookie, not it), back
/// to the backend.
#[inline(always)]
pub fn answer_syn_ack<F: Family>(ctx: &XdpContext) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::verdict(Verdict::of(Reason::DropNoRoom));
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    let (l3, l4, frame_len) = (pkt.l3, pkt.l4, pkt.frame_len);
    let (backend, client) = (pkt.src, pkt.dst);
    let Some(header) = ptr_at::<[u32; 3]>(ctx, l4) else {
        return Status::verdict(Verdict::of(Reason::DropTruncatedL4));
    };
    let header = unsafe { header.read_unaligned() };
    let ports = [header[0] as u16, (header[0] >> 16) as u16];
    let (seq, ack) = (u32::from_be(header[1]), u32::from_be(header[2]));
    if l4 != l3 + F::HEADER_LEN {
        return Status::verdict(Verdict::of(Reason::DropNoRoom));
    }
    let words = [
        (ports[1] as u32) | (ports[0] as u32) << 16,
        ack.to_be(),
        seq.wrapping_add(1).to_be(),
        offset_flags_window(BARE, ACK, u16::MAX),
        0,
    ];
    let result = end_after(ctx, l4, BARE, frame_len)
        .and_then(|()| parse::turn_around(ctx, 0))
        .and_then(|()| F::write_header(ctx, l3, BARE as u16, PROTO_TCP, client, backend))
        .and_then(|()| write_tcp::<F>(ctx, l4, (client, backend), words, 0));
    Status::verdict(match result {
        Ok(()) => Verdict::of(Reason::SynProxyAck),
        Err(v) => v,
    })
}

/// Adds `delta` to the TCP field at `at` (a sequence or acknowledgement number) of
/// the packet whose transport checksum is at `check_at`.
#[inline(always)]
pub fn shift(ctx: &XdpContext, at: usize, check_at: usize, delta: u32) -> Result<(), Verdict> {
    let cut = Verdict::of(Reason::DropTruncatedL4);
    let field: *mut u32 = ptr_at(ctx, at).ok_or(cut)?;
    let check: *mut u16 = ptr_at(ctx, check_at).ok_or(cut)?;
    unsafe {
        let old = field.read_unaligned();
        let new = u32::from_be(old).wrapping_add(delta).to_be();
        field.write_unaligned(new);
        check.write_unaligned(checksum::replace4(check.read_unaligned(), old, new));
    }
    Ok(())
}

/// The parsed packet, a client's TCP packet toward a backend that has flows opened
/// by SYN cookies: if its flow is one, its acknowledgement loses the flow's delta.
#[inline(never)]
pub fn shift_client_ack<F: Family>(ctx: &XdpContext, check_at: usize) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::GO_ON;
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    let key = F::key(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    let Some(flow) = (unsafe { F::flows().get(key) }) else {
        return Status::GO_ON;
    };
    if flow.flags & FLOW_SEQ_ADJUSTED == 0 {
        return Status::GO_ON;
    }
    let less = 0u32.wrapping_sub(flow.seq);
    Status::of(shift(ctx, pkt.l4 + ACK_AT, check_at, less))
}

/// `PROXIED` entries: flows were opened by cookies (non-zero), and when a cookie was
/// last sent (ns).
const OPENED: u32 = 0;
const COOKIE_SENT: u32 = 1;

/// Whether flows have been opened by SYN cookies in this data plane's life (their
/// packets may need adjusting; without any, nothing else is looked up). It is never
/// cleared: a flow's end is not always seen.
#[inline(always)]
pub fn live() -> bool {
    matches!(PROXIED.get(OPENED), Some(opened) if *opened != 0)
}

/// A flow was opened by a SYN cookie.
#[inline(always)]
pub fn flow_opened() {
    if let Some(opened) = PROXIED.get_ptr_mut(OPENED) {
        unsafe { *opened = 1 };
    }
}

/// The parsed packet, a TCP packet from the backend side while flows opened by SYN
/// cookies are open: if it is a NAT backend's reply of one, its SYN-ACK becomes the
/// ACK the client waits for (or, sent again, is answered: a verdict), and its
/// sequence number gains the flow's delta. Then it goes on as any reply.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is passed where it is, in the scratch map, not copied to the stack"
)]
pub fn reply_step<F: Family>(ctx: &XdpContext) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::GO_ON;
    };
    let scratch = unsafe { &mut *scratch };
    let pkt = F::packet(scratch);
    let (client, client_port, l4) = (pkt.dst, pkt.dport, pkt.l4);
    let backend = F::endpoint(pkt.src, pkt.sport, pkt.proto);
    let Some(target) = (unsafe { REPLIES.get(backend) }) else {
        return Status::GO_ON;
    };
    let key = &mut F::nat_scratch(scratch).flow;
    let vip = F::from_words(&target.vip.addr);
    F::set_key(key, client, vip, [client_port, target.vip.port], PROTO_TCP);
    let Some(flow) = F::flows().get_ptr_mut(&*key) else {
        return Status::GO_ON;
    };
    let flow = unsafe { &mut *flow };
    let Some(header) = ptr_at::<[u8; 2]>(ctx, l4 + FLAGS_AT - 1) else {
        return Status::GO_ON;
    };
    let flags = unsafe { (*header)[1] };
    let syn_ack = flags & (SYN | ACK) == SYN | ACK;
    if flow.flags & FLOW_SYN_SENT != 0 {
        if flags & RST != 0 {
            // The backend refused the SYN: the client hears it in the cookie's
            // sequence space (the one it acknowledged), and the flow is over.
            let Some(seq) = read_u32(ctx, l4 + SEQ_AT) else {
                return Status::GO_ON;
            };
            let shifted = shift(
                ctx,
                l4 + SEQ_AT,
                l4 + CHECK_AT,
                flow.seq.wrapping_add(1).wrapping_sub(seq),
            );
            steer::count_over(flow);
            let _ = F::flows().remove(&*key);
            return Status::of(shifted);
        }
        if syn_ack {
            let done = syn_ack_to_client::<F>(ctx, flow.seq);
            if done >> 32 == 0 {
                return Status::verdict(Verdict::of(Reason::DropNoRoom));
            }
            flow.seq = done as u32;
            flow.flags = (flow.flags & !FLOW_SYN_SENT) | FLOW_SEQ_ADJUSTED | FLOW_ESTABLISHED;
        }
        return Status::GO_ON;
    }
    if flow.flags & FLOW_SEQ_ADJUSTED == 0 {
        return Status::GO_ON;
    }
    if syn_ack {
        return answer_syn_ack::<F>(ctx);
    }
    Status::of(shift(ctx, l4 + SEQ_AT, l4 + CHECK_AT, flow.seq))
}

/// A TCP packet's acknowledgement number (host order), 0 when cut short.
#[inline(always)]
pub fn ack_number(ctx: &XdpContext, l4: usize) -> u32 {
    read_u32(ctx, l4 + ACK_AT).unwrap_or(0)
}
