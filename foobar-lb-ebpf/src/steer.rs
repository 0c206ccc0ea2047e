//! Steering: which backend a client packet goes to, and which VIP a reply comes from.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::programs::XdpContext;
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, Endpoint, FAMILY_IPV4, FlowKey, FlowState, Reason, SCHED_MAGLEV,
    TrafficStats, VipInfo, hash::flow_hash_v4, schedule_index,
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
    let to = Endpoint {
        addr: [pkt.dst, 0, 0, 0],
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_IPV4,
    };
    if let Some(vip) = unsafe { VIPS.get(to) } {
        return to_backend(ctx, &pkt, vip);
    }
    let from = Endpoint {
        addr: [pkt.src, 0, 0, 0],
        port: pkt.sport,
        proto: pkt.proto,
        family: FAMILY_IPV4,
    };
    if let Some(target) = unsafe { REPLIES.get(from) } {
        return to_client(
            ctx,
            &pkt,
            target.vip.addr[0],
            target.vip.port,
            target.vip_id,
            target.backend_id,
        );
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
            let id = schedule(vip, pkt).ok_or(Verdict::of(Reason::DropNoBackend))?;
            let backend = active_backend(id).ok_or(Verdict::of(Reason::DropNoBackend))?;
            let flow = FlowState {
                backend_id: id,
                vip_id: vip.id,
            };
            // Failing to insert (map full of locked entries) only costs stickiness.
            let _ = FLOWS.insert(key, flow, 0);
            count(Reason::FlowNew);
            add_new_flow(&VIP_STATS, vip.id);
            add_new_flow(&BACKEND_STATS, id);
            (id, backend)
        }
    };

    nat::rewrite_destination(
        ctx,
        pkt,
        &l4,
        backend.endpoint.addr[0],
        backend.endpoint.port,
    )?;
    add_packet(&VIP_STATS, vip.id, pkt.frame_len, false);
    add_packet(&BACKEND_STATS, backend_id, pkt.frame_len, false);
    Ok(forward::forward(
        ctx,
        pkt,
        backend.endpoint.addr[0],
        pkt.src,
    ))
}

/// A backend's reply to a client: rewrite its source to the VIP and forward it.
#[inline(always)]
fn to_client(
    ctx: &XdpContext,
    pkt: &Packet,
    vip_addr: u32,
    vip_port: u16,
    vip_id: u32,
    backend_id: u32,
) -> Result<Verdict, Verdict> {
    let l4 = parse::l4(ctx, pkt)?;
    nat::rewrite_source(ctx, pkt, &l4, vip_addr, vip_port)?;
    count(Reason::Reply);
    add_packet(&VIP_STATS, vip_id, pkt.frame_len, true);
    add_packet(&BACKEND_STATS, backend_id, pkt.frame_len, true);
    Ok(forward::forward(ctx, pkt, pkt.dst, vip_addr))
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

#[inline(always)]
fn add_new_flow(stats: &aya_ebpf::maps::PerCpuArray<TrafficStats>, index: u32) {
    if let Some(s) = stats.get_ptr_mut(index) {
        unsafe { (*s).new_flows += 1 };
    }
}

#[inline(always)]
fn add_packet(
    stats: &aya_ebpf::maps::PerCpuArray<TrafficStats>,
    index: u32,
    bytes: u32,
    reply: bool,
) {
    if let Some(s) = stats.get_ptr_mut(index) {
        let s = unsafe { &mut *s };
        if reply {
            s.reply_packets += 1;
            s.reply_bytes += bytes as u64;
        } else {
            s.packets += 1;
            s.bytes += bytes as u64;
        }
    }
}
