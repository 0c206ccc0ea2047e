//! Steering: which backend a client packet goes to, and which VIP a reply comes from.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{maps::PerCpuArray, programs::XdpContext};
use aya_log_ebpf::debug;
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, Endpoint, FAMILY_IPV4, FlowKey, FlowState, Reason, ReplyTarget,
    SCHED_MAGLEV, TrafficStats, VipInfo, hash::flow_hash_v4, schedule_index,
};

use crate::{
    BACKEND_STATS, BACKENDS, FLOWS, REPLIES, RR_CURSORS, SCHEDULES, VIP_STATS, VIPS, Verdict,
    count, forward, nat,
    parse::{self, Packet},
};

/// The whole decision for one frame.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let pkt = parse::parse(ctx)?;
    let to = Endpoint::ipv4(pkt.dst, pkt.dport, pkt.proto);
    if let Some(vip) = unsafe { VIPS.get(to) } {
        return to_backend(ctx, &pkt, vip);
    }
    let from = Endpoint::ipv4(pkt.src, pkt.sport, pkt.proto);
    if let Some(target) = unsafe { REPLIES.get(from) } {
        return to_client(ctx, &pkt, target);
    }
    Err(Verdict::of(Reason::PassNotVip))
}

/// A client packet for a VIP: find its backend, rewrite its destination, forward it.
#[inline(always)]
fn to_backend(ctx: &XdpContext, pkt: &Packet, vip: &VipInfo) -> Result<Verdict, Verdict> {
    let l4 = parse::l4(ctx, pkt)?;
    let key = FlowKey {
        src: [pkt.src, 0, 0, 0],
        dst: [pkt.dst, 0, 0, 0],
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_IPV4,
        _pad: [0; 2],
    };
    // A SYN opens a new connection: it is always scheduled, so a reused 5-tuple
    // does not inherit an old flow's backend (Katran does the same).
    let known = if l4.syn {
        None
    } else {
        unsafe { FLOWS.get(key) }.map(|flow| flow.backend_id)
    };
    let pinned = match known {
        Some(id) => match active_backend(id) {
            Some(backend) => {
                count(Reason::FlowHit);
                Some((id, backend))
            }
            None => {
                count(Reason::FlowBackendGone);
                // Rare (after a backend removal): worth a debug line, gated by AYA_LOG_LEVEL.
                debug!(ctx, "flow's backend {} is gone: scheduling it again", id);
                None
            }
        },
        None => {
            if !l4.syn {
                count(Reason::FlowMissNonSyn);
            }
            None
        }
    };
    let (backend_id, backend) = match pinned {
        Some(found) => found,
        None => {
            let Some(id) = schedule(vip, pkt) else {
                debug!(
                    ctx,
                    "VIP {} has no backend in its schedule: dropping", vip.id
                );
                return Err(Verdict::of(Reason::DropNoBackend));
            };
            let backend = active_backend(id).ok_or(Verdict::of(Reason::DropNoBackend))?;
            let flow = FlowState {
                backend_id: id,
                vip_id: vip.id,
            };
            // Failing to insert (map full of locked entries) only costs stickiness.
            let _ = FLOWS.insert(key, flow, 0);
            count(Reason::FlowNew);
            (id, backend)
        }
    };
    let traffic = if pinned.is_some() {
        Traffic::Forward
    } else {
        Traffic::NewFlow
    };

    nat::rewrite_destination(
        ctx,
        pkt,
        &l4,
        backend.endpoint.addr[0],
        backend.endpoint.port,
    )?;
    account(&VIP_STATS, vip.id, pkt.frame_len, traffic);
    account(&BACKEND_STATS, backend_id, pkt.frame_len, traffic);
    Ok(forward::forward(
        ctx,
        pkt,
        backend.endpoint.addr[0],
        pkt.src,
    ))
}

/// A backend's reply to a client: rewrite its source to the VIP and forward it.
#[inline(always)]
fn to_client(ctx: &XdpContext, pkt: &Packet, target: &ReplyTarget) -> Result<Verdict, Verdict> {
    let l4 = parse::l4(ctx, pkt)?;
    let (vip_addr, vip_port) = (target.vip.addr[0], target.vip.port);
    // Routed before the rewrite (only the source changes): a backend answering the
    // balancer itself (a health check) must reach the local stack untouched.
    let route = match forward::route(ctx, pkt, pkt.dst, vip_addr) {
        Err(local) if local.reason == Reason::PassLocal => return Err(local),
        other => other,
    };
    nat::rewrite_source(ctx, pkt, &l4, vip_addr, vip_port)?;
    count(Reason::Reply);
    account(&VIP_STATS, target.vip_id, pkt.frame_len, Traffic::Reply);
    account(
        &BACKEND_STATS,
        target.backend_id,
        pkt.frame_len,
        Traffic::Reply,
    );
    Ok(match route {
        Ok(route) => forward::send(ctx, &route),
        Err(verdict) => verdict,
    })
}

/// Picks a backend for a new flow: one array index, whatever the scheduler.
#[inline(always)]
fn schedule(vip: &VipInfo, pkt: &Packet) -> Option<u32> {
    let len = vip.schedule_len;
    if len == 0 {
        return None;
    }
    let slot = if vip.scheduler == SCHED_MAGLEV {
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

#[inline(always)]
fn active_backend(id: u32) -> Option<Backend> {
    let backend = BACKENDS.get(id)?;
    (backend.flags & BACKEND_ACTIVE != 0).then_some(*backend)
}

/// What a packet counts as in a VIP's or backend's traffic stats.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    /// The first packet of a flow, client to backend.
    NewFlow,
    /// Any later packet, client to backend.
    Forward,
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
    if traffic == Traffic::Reply {
        s.reply_packets += 1;
        s.reply_bytes += bytes as u64;
    } else {
        s.packets += 1;
        s.bytes += bytes as u64;
        s.new_flows += (traffic == Traffic::NewFlow) as u64;
    }
}
