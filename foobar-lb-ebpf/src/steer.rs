//! Steering: which backend a client packet goes to, and which VIP a reply comes from.
//!
//! On a client-side interface the flow table is asked first: a packet of a known flow
//! needs only its entry and the backend slot it names (no VIP lookup, no schedule).
//! The slot's generation tells whether the flow's backend is still the one it was
//! scheduled onto. A miss goes to the VIP's schedule. On a backend-side interface, a
//! packet from a backend endpoint is a reply, rewritten to come from its VIP.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, maps::PerCpuArray, maps::lpm_trie::Key, programs::XdpContext,
};
use aya_log_ebpf::debug;
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, Endpoint, FLOW_CLOSING, FLOW_ESTABLISHED, FlowKey, FlowState,
    PROTO_UDP, ROLE_BACKEND, ROLE_CLIENT, ROUTE_GATEWAY, ROUTE_LOCAL, Reason, ReplyTarget,
    SCHED_MAGLEV, TrafficStats, VipInfo, hash::flow_hash_v4, schedule_index,
};

use crate::{
    BACKEND_STATS, BACKENDS, Events, FLOOD, FLOWS, INTERFACES, NEIGHBOURS, REPLIES, ROUTES,
    RR_CURSORS, SCHEDULES, SETTINGS, VIP_STATS, VIPS, Verdict,
    forward::{self, ask_fib, valid},
    nat,
    parse::{self, L4, Packet},
};

/// The whole decision for one frame.
#[inline(always)]
pub fn balance(ctx: &XdpContext, events: &mut Events) -> Result<Verdict, Verdict> {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let iface = match INTERFACES.get(ingress) {
        Some(iface) if iface.roles != 0 => iface,
        _ => return Err(Verdict::of(Reason::PassNotOurInterface)),
    };
    let pkt = parse::parse(ctx, iface)?;
    if iface.roles & ROLE_CLIENT != 0 {
        let key = FlowKey::new(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
        if let Some(flow) = FLOWS.get_ptr_mut(key) {
            return established(ctx, &pkt, &key, unsafe { &mut *flow }, events);
        }
        if let Some(vip) = unsafe { VIPS.get(Endpoint::ipv4(pkt.dst, pkt.dport, pkt.proto)) } {
            let l4 = parse::l4(ctx, &pkt)?;
            if !opens(&pkt, &l4) {
                events.note(Reason::FlowMissNonSyn);
            }
            return new_flow(ctx, &pkt, &l4, &key, vip, events);
        }
    }
    if let Some(target) = unsafe { REPLIES.get(Endpoint::ipv4(pkt.src, pkt.sport, pkt.proto)) } {
        // Replies come from the backend side; one from a client is forged.
        if iface.roles & ROLE_BACKEND == 0 {
            return Err(Verdict::of(Reason::DropForgedReply));
        }
        return to_client(ctx, &pkt, target, events);
    }
    Err(Verdict::of(Reason::PassNotVip))
}

/// Whether a packet may start a flow: a TCP SYN, or any UDP datagram.
#[inline(always)]
fn opens(pkt: &Packet, l4: &L4) -> bool {
    l4.syn || pkt.proto == PROTO_UDP
}

/// A packet of a known flow.
#[inline(always)]
fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    key: &FlowKey,
    flow: &mut FlowState,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    let l4 = parse::l4(ctx, pkt)?;
    let backend = match BACKENDS.get(flow.backend_id) {
        Some(b) if b.flags & BACKEND_ACTIVE != 0 && b.generation == flow.generation => b,
        _ => {
            events.note(Reason::FlowBackendGone);
            debug!(
                ctx,
                "flow's backend {} is gone: scheduling it again", flow.backend_id
            );
            return reschedule(ctx, pkt, &l4, key, events);
        }
    };
    if l4.syn {
        // A SYN on an established 5-tuple opens a new connection; before that, it is
        // the same SYN again (a retransmission), which must reach the same backend.
        if flow.flags & FLOW_ESTABLISHED != 0 {
            events.note(Reason::FlowReused);
            return reschedule(ctx, pkt, &l4, key, events);
        }
        events.note(Reason::SynRetransmit);
    } else if flow.flags & FLOW_ESTABLISHED == 0 {
        flow.flags |= FLOW_ESTABLISHED;
    }
    let closed = l4.closing && flow.flags & FLOW_CLOSING == 0;
    if closed {
        flow.flags |= FLOW_CLOSING;
    }
    forward_to(
        ctx,
        pkt,
        &l4,
        flow.backend_id,
        backend,
        Traffic::Forward { closed },
        events,
    )
}

/// A known flow that needs a backend again: back to its VIP's schedule.
#[inline(always)]
fn reschedule(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    key: &FlowKey,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    match unsafe { VIPS.get(Endpoint::ipv4(pkt.dst, pkt.dport, pkt.proto)) } {
        Some(vip) => new_flow(ctx, pkt, l4, key, vip, events),
        None => Err(Verdict::of(Reason::PassNotVip)),
    }
}

/// A client packet without a (usable) flow: schedule it, remember it, forward it.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    key: &FlowKey,
    vip: &VipInfo,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    let opening = opens(pkt, l4);
    let Some(id) = schedule(vip, pkt, opening) else {
        debug!(
            ctx,
            "VIP {} has no backend in its schedule: dropping", vip.id
        );
        return Err(Verdict::of(Reason::DropNoBackend));
    };
    let backend = match BACKENDS.get(id) {
        Some(b) if b.flags & BACKEND_ACTIVE != 0 => b,
        _ => return Err(Verdict::of(Reason::DropNoBackend)),
    };
    events.note(Reason::FlowNew);
    // During a flood of new flows, a Maglev VIP's flows are not remembered: the hash
    // gives them the same backend on every packet, and the table keeps its
    // established flows. Round robin needs the table to keep a flow where it went.
    if flooding() && vip.scheduler == SCHED_MAGLEV {
        events.note(Reason::FlowInsertSkipped);
    } else {
        let flags = if l4.syn { 0 } else { FLOW_ESTABLISHED };
        let state = FlowState {
            backend_id: id,
            generation: backend.generation,
            flags: flags | if l4.closing { FLOW_CLOSING } else { 0 },
            _pad: 0,
        };
        if FLOWS.insert(key, state, 0).is_err() {
            events.note(Reason::FlowInsertFailed);
        }
    }
    forward_to(
        ctx,
        pkt,
        l4,
        id,
        backend,
        Traffic::NewFlow { closed: l4.closing },
        events,
    )
}

/// Rewrites a client packet for `backend` and sends it there.
#[inline(always)]
fn forward_to(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &L4,
    id: u32,
    backend: &Backend,
    traffic: Traffic,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    let addr = backend.endpoint.addr[0];
    nat::rewrite_destination(ctx, pkt, l4, addr, backend.endpoint.port)?;
    account(&VIP_STATS, backend.vip_id, pkt.frame_len, traffic);
    account(&BACKEND_STATS, id, pkt.frame_len, traffic);
    let hop = match valid(&backend.next_hop) {
        Some(hop) => *hop,
        // A rewritten packet the kernel would not forward has nowhere to go.
        None => ask_fib(ctx, pkt, addr, pkt.src, events).map_err(|v| {
            if v.reason == Reason::PassLocal {
                Verdict::of(Reason::DropNoRoute)
            } else {
                v
            }
        })?,
    };
    Ok(forward::send(ctx, pkt, &hop))
}

/// A backend's reply to a client: rewrite its source to the VIP and forward it.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    pkt: &Packet,
    target: &ReplyTarget,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    let l4 = parse::l4(ctx, pkt)?;
    let (vip_addr, vip_port) = (target.vip.addr[0], target.vip.port);
    // Routed before the rewrite (only the source changes): a backend answering the
    // balancer itself (a health check) must reach the local stack untouched.
    let hop = match client_hop(ctx, pkt, vip_addr, events) {
        Err(local) if local.reason == Reason::PassLocal => return Err(local),
        other => other,
    };
    nat::rewrite_source(ctx, pkt, &l4, vip_addr, vip_port)?;
    events.note(Reason::Reply);
    account(&VIP_STATS, target.vip_id, pkt.frame_len, Traffic::Reply);
    account(
        &BACKEND_STATS,
        target.backend_id,
        pkt.frame_len,
        Traffic::Reply,
    );
    Ok(match hop {
        Ok(hop) => forward::send(ctx, pkt, &hop),
        Err(verdict) => verdict,
    })
}

/// The next hop toward a client. A client on the link is a neighbour itself (one
/// lookup); for any other, the client side's routes (mirrored by the agent) say
/// whether it is this machine or behind a gateway, whose neighbour entry serves every
/// client behind it. Anything unknown goes to the kernel's FIB.
#[inline(always)]
fn client_hop(
    ctx: &XdpContext,
    pkt: &Packet,
    vip_addr: u32,
    events: &mut Events,
) -> Result<foobar_lb_common::NextHop, Verdict> {
    if let Some(hop) = unsafe { NEIGHBOURS.get(pkt.dst) }.and_then(valid) {
        return Ok(*hop);
    }
    if let Some(route) = ROUTES.get(Key::new(32, pkt.dst)) {
        if route.kind == ROUTE_LOCAL {
            return Err(Verdict::of(Reason::PassLocal));
        }
        let next = if route.kind == ROUTE_GATEWAY {
            route.gateway
        } else {
            pkt.dst
        };
        if let Some(hop) = unsafe { NEIGHBOURS.get(next) }.and_then(valid) {
            return Ok(*hop);
        }
    }
    ask_fib(ctx, pkt, pkt.dst, vip_addr, events)
}

/// Picks a backend for a new flow: one array index, whatever the scheduler. Round
/// robin takes the next ring slot for a packet that opens a flow; any other packet
/// (a flow the table lost) is placed by its hash, so its backend does not depend on
/// how many flows came before.
#[inline(always)]
fn schedule(vip: &VipInfo, pkt: &Packet, opening: bool) -> Option<u32> {
    let len = vip.schedule_len;
    if len == 0 {
        return None;
    }
    let slot = if vip.scheduler == SCHED_MAGLEV || !opening {
        flow_hash_v4(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto) % len
    } else {
        // One cursor per VIP shared by all CPUs, so consecutive new flows take
        // consecutive ring slots whatever CPU they arrive on.
        let cursor = RR_CURSORS.get_ptr_mut(vip.id)?;
        let ticket = unsafe { take_ticket(cursor) };
        ticket % len
    };
    SCHEDULES.get(schedule_index(vip.id, slot)).copied()
}

/// Whether this CPU sees a flood of new flows: more than the configured number in
/// the current one-second window.
#[inline(always)]
fn flooding() -> bool {
    let threshold = match SETTINGS.get(0) {
        Some(s) if s.flood_threshold != 0 => s.flood_threshold as u64,
        _ => return false,
    };
    let Some(window) = FLOOD.get_ptr_mut(0) else {
        return false;
    };
    let window = unsafe { &mut *window };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(window.started_ns) > 1_000_000_000 {
        window.started_ns = now;
        window.new_flows = 0;
    }
    window.new_flows += 1;
    window.new_flows > threshold
}

/// Atomically takes the next value of a shared cursor.
///
/// `core::sync::atomic` is not offered for the BPF target; the intrinsic gives the
/// BPF atomic fetch-and-add (CPU v3, see `bpf-linker-v3`). SeqCst on purpose: LLVM 22
/// lowers a *relaxed* fetch-add to the plain `lock add`, dropping the fetch flag while
/// still using the register as the old value (seen in the object: imm 0 vs 0x01).
#[inline(always)]
unsafe fn take_ticket(cursor: *mut u32) -> u32 {
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(cursor, 1) }
}

/// What a packet counts as in a VIP's or backend's traffic stats.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// The first packet of a flow, client to backend (and whether it closes it).
    NewFlow { closed: bool },
    /// Any later packet, client to backend (and whether it is the flow's first FIN/RST).
    Forward { closed: bool },
    /// Backend to client.
    Reply,
}

/// Counts one packet with one lookup of this CPU's stats entry.
#[inline(always)]
fn account(stats: &PerCpuArray<TrafficStats>, index: u32, bytes: u32, traffic: Traffic) {
    let Some(s) = stats.get_ptr_mut(index) else {
        return;
    };
    let s = unsafe { &mut *s };
    match traffic {
        Traffic::Reply => {
            s.reply_packets += 1;
            s.reply_bytes += bytes as u64;
        }
        Traffic::NewFlow { closed } | Traffic::Forward { closed } => {
            s.packets += 1;
            s.bytes += bytes as u64;
            s.new_flows += matches!(traffic, Traffic::NewFlow { .. }) as u64;
            s.closed_flows += closed as u64;
        }
    }
}
