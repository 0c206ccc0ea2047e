//! Steering: which backend a client packet goes to and how it gets there, and what a
//! packet from a backend becomes.
//!
//! On a client-side interface the flow table is asked first: a packet of a known flow
//! needs only its entry and the backend slot it names (no VIP lookup, no schedule).
//! The slot's generation tells whether the flow's backend is still the one it was
//! scheduled onto; the slot also carries the VIP's forwarding mode. A miss goes to
//! the VIP's schedule. On a backend-side interface, a packet from a backend endpoint
//! is a reply: NAT restores the VIP as its source, full NAT finds its client in the
//! reverse table. DSR backends answer clients themselves.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::MaybeUninit,
};

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32, maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, FLOW_CLOSED, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_SEQ_ADJUSTED,
    FLOW_SYN_SENT, FORWARD_DSR_GUE, FORWARD_DSR_IPIP, FORWARD_FULLNAT, FORWARD_NAT,
    FULLNAT_PORT_TRIES, FlowState, NatTarget, NextHop, PROTO_TCP, PROTO_UDP, ROLE_BACKEND,
    ROLE_CLIENT, ROUTE_GATEWAY, ROUTE_LOCAL, Reason, ReplyTarget, SCHED_LEAST_CONN, SCHED_MAGLEV,
    TrafficStats, VipAddr, VipInfo, schedule_index,
};

use crate::{
    BACKEND_ADDRS, BACKEND_STATS, BACKENDS, Events, FLOOD, INTERFACES, REPLIES, RR_CURSORS,
    SCHEDULES, SCRATCH, SETTINGS, Scratch, Status, VIP_ADDRS, VIP_STATS, VIPS, Verdict, conn, edge,
    encap,
    family::{Family, NatScratch, V4, V6, set_words},
    forward::{self, Fit, ask_fib, valid},
    icmp,
    nat::{self, End},
    parse::{self, L4, Packet},
    rate, synproxy,
};

/// The whole decision for one frame.
#[inline(always)]
pub fn balance(ctx: &XdpContext, events: &mut Events) -> Result<Verdict, Verdict> {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let iface = match INTERFACES.get(ingress) {
        Some(iface) if iface.roles != 0 => iface,
        _ => return Err(Verdict::of(Reason::PassNotOurInterface)),
    };
    let (ether_type, l3) = parse::ethernet(ctx, &iface.mac)?;
    // Index 0 always exists; the verifier wants the check.
    let scratch = SCRATCH
        .get_ptr_mut(0)
        .ok_or(Verdict::of(Reason::DropNoRoom))?;
    let scratch = unsafe { &mut *scratch };
    match ether_type {
        V4::ETHER_TYPE => family::<V4>(ctx, iface.roles, l3, scratch, events),
        V6::ETHER_TYPE => family::<V6>(ctx, iface.roles, l3, scratch, events),
        _ => Err(Verdict::of(Reason::PassNotIp)),
    }
}

/// An IP packet of family `F` at `l3`, arrived on an interface with `roles`. Parsing,
/// ICMP, client packets and backend packets are functions of their own, each with
/// its own stack frame: the verifier allows 512 bytes for the deepest chain of
/// calls, and IPv6 inlined whole would not fit.
#[inline(always)]
fn family<F: Family>(
    ctx: &XdpContext,
    roles: u32,
    l3: usize,
    scratch: &mut Scratch,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    // Parsed, and chosen for if it is a client's packet for a VIP, in one call:
    // (written by `front` when it goes on; left uninitialised: zeroing it would call
    // memset).
    let mut choice = MaybeUninit::<Choice>::uninit();
    let front = front::<F>(ctx, roles, l3, events, &mut choice).check()?;
    let pkt = F::packet(scratch);
    if front == Status::GO_ON {
        let choice = unsafe { choice.assume_init_ref() };
        return verdict_of(deliver(ctx, pkt, choice, events));
    }
    if front == Status::ICMP {
        return match icmp::handle(ctx, roles, pkt, events)? {
            icmp::Outcome::Done(verdict) => Ok(verdict),
            icmp::Outcome::Encapsulate(id) => {
                events.note(Reason::IcmpToBackend);
                let traffic = Traffic::Forward;
                let choice = Choice::new(id, 0, &L4::NONE, traffic);
                verdict_of(deliver(ctx, pkt, &choice, events))
            }
        };
    }
    // Replies of flows opened by SYN cookies are adjusted first (only while there are
    // any: one array lookup).
    if pkt.proto == PROTO_TCP && roles & ROLE_BACKEND != 0 && synproxy::live() {
        let adjusted = synproxy::reply_step::<F>(ctx);
        if let Some(verdict) = adjusted.into_verdict() {
            return Ok(verdict);
        }
    }
    let sent = from_backend(ctx, roles, pkt, events);
    match sent.mtu() {
        Some(mtu) => Ok(icmp::too_big(ctx, pkt, mtu)),
        None => verdict_of(sent),
    }
}

/// The verdict a function that always gives one gave.
#[inline(always)]
fn verdict_of(status: Status) -> Result<Verdict, Verdict> {
    status.into_verdict().ok_or(Verdict::of(Reason::DropNoRoom))
}

/// Parses the packet into the scratch map and, for a client's TCP/UDP packet for a
/// VIP, chooses its backend (go on, the choice in `out`). ICMP: [`Status::ICMP`];
/// anything else TCP/UDP: not ours (a reply, perhaps).
#[inline(never)]
fn front<F: Family>(
    ctx: &XdpContext,
    roles: u32,
    l3: usize,
    events: &mut Events,
    out: &mut MaybeUninit<Choice>,
) -> Status {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Status::verdict(Verdict::of(Reason::DropNoRoom));
    };
    let pkt = F::packet(unsafe { &mut *scratch });
    if let Err(v) = F::parse(ctx, l3, pkt) {
        return Status::verdict(v);
    }
    if pkt.fragment {
        return Status::verdict(fragment(roles, pkt));
    }
    if pkt.proto == F::ICMP {
        return Status::ICMP;
    }
    if pkt.proto != PROTO_TCP && pkt.proto != PROTO_UDP {
        return Status::verdict(edge::not_for_a_vip::<F>(pkt.dst, Reason::PassNotTcpUdp));
    }
    if roles & ROLE_CLIENT == 0 {
        return Status::NOT_OURS;
    }
    choose(ctx, pkt, events, out)
}

/// Where a client packet goes: its backend slot, full NAT's source port, what it
/// counts as, and its checked transport header.
/// (Integers only: a struct of small fields and flags, zeroed, would call memset.)
pub struct Choice {
    id: u32,
    /// Full NAT's port (network order); a word of its own, as the offset below: packed
    /// together, LLVM fills the halves from registers the verifier calls unwritten.
    nat_port: u32,
    /// Offset of the transport checksum.
    check: u32,
    /// [`Choice::UDP`], [`Choice::NEW_FLOW`].
    flags: u32,
}

impl Choice {
    const UDP: u32 = 1;
    const NEW_FLOW: u32 = 2;

    #[inline(always)]
    fn new(id: u32, nat_port: u16, l4: &L4, traffic: Traffic) -> Self {
        let new_flow = traffic == Traffic::NewFlow;
        Self {
            id,
            nat_port: nat_port as u32,
            check: l4.check as u32,
            flags: if l4.udp { Self::UDP } else { 0 } | if new_flow { Self::NEW_FLOW } else { 0 },
        }
    }

    /// What the rewrite needs of the transport header.
    #[inline(always)]
    fn l4(&self) -> L4 {
        L4 {
            check: self.check as u16,
            syn: false,
            closing: false,
            reset: false,
            udp: self.flags & Self::UDP != 0,
        }
    }

    #[inline(always)]
    fn traffic(&self) -> Traffic {
        if self.flags & Self::NEW_FLOW != 0 {
            Traffic::NewFlow
        } else {
            Traffic::Forward
        }
    }
}

/// A TCP/UDP packet from the client side: which backend, if it is for a VIP: the
/// flow table's answer, or its VIP's schedule. Choosing and delivering are functions
/// of their own, called one after the other, so their stack frames do not add up.
#[inline(always)]
fn choose<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    events: &mut Events,
    out: &mut MaybeUninit<Choice>,
) -> Status {
    match choose_backend(ctx, pkt, events) {
        Ok(Some(choice)) => {
            out.write(choice);
            Status::GO_ON
        }
        Ok(None) => Status::NOT_OURS,
        Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn choose_backend<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    events: &mut Events,
) -> Result<Option<Choice>, Verdict> {
    let key = F::key(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    if let Some(flow) = F::flows().get_ptr_mut(key) {
        let l4 = parse::l4(ctx, pkt)?;
        return match established::<F>(ctx, &l4, unsafe { &mut *flow }, events) {
            Ok(Some((id, nat_port, traffic))) => Ok(Some(Choice::new(id, nat_port, &l4, traffic))),
            // A known flow that needs a backend again: its VIP's schedule.
            Ok(None) => schedule_new(ctx, pkt, &key, true, events),
            // Opened by a cookie, its backend silent: the client's ACK again, or its
            // probe, sends the backend its SYN again (it may have been lost).
            Err(pending) if pending.is(Reason::DropSynProxyPending) => {
                let step = synproxy::cookie_step::<F>(ctx).check()?;
                if step != Status::PROVEN && step != Status::PROBE_PROVEN {
                    return Err(pending);
                }
                let id = unsafe { (*flow).backend_id };
                synproxy::ack_into_syn::<F>(ctx, step == Status::PROBE_PROVEN).check()?;
                let traffic = Traffic::Forward;
                Ok(Some(Choice::new(id, 0, &l4, traffic)))
            }
            Err(v) => Err(v),
        };
    }
    schedule_new(ctx, pkt, &key, false, events)
}

/// A client packet without a (usable) flow: its VIP's schedule, if it is for one.
/// (Its own function, called on both ways: with one tail shared, LLVM keeps values
/// undefined on one way in registers the verifier has never seen written.)
#[inline(always)]
fn schedule_new<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    key: &F::Key,
    known: bool,
    events: &mut Events,
) -> Result<Option<Choice>, Verdict> {
    let Some(vip) = (unsafe { VIPS.get(F::endpoint(pkt.dst, pkt.dport, pkt.proto)) }) else {
        return Ok(None);
    };
    edge::admit::<F>(vip.id)?;
    let l4 = parse::l4(ctx, pkt)?;
    // No flow, a NAT VIP: a SYN during a flood may be answered with a cookie, an ACK
    // may prove one.
    let cookie_step = if !known && pkt.proto == PROTO_TCP && vip.forwarding == FORWARD_NAT {
        synproxy::cookie_step::<F>(ctx).check()?
    } else {
        Status::GO_ON
    };
    // An ACK that proved its SYN cookie opens its flow (and its SYN goes to the
    // backend); the cookie was the client's sequence number from the balancer.
    let probe = cookie_step == Status::PROBE_PROVEN;
    let cookie = if cookie_step == Status::PROVEN || probe {
        events.note(Reason::SynCookieValid);
        synproxy::ack_number(ctx, pkt.l4).wrapping_sub(1)
    } else {
        0
    };
    if opens(pkt, &l4) || cookie != 0 {
        // Established flows are never limited: only what opens one is.
        if !edge::within_limit::<F>(vip) {
            return Err(Verdict::of(Reason::DropSourceLimit));
        }
    }
    // The flood window counts every new flow once (a SYN of a NAT VIP was counted
    // when it was asked whether it gets a cookie).
    let flood = match cookie_step {
        Status::FLOODED => true,
        Status::CALM => false,
        _ => flooding(),
    };
    if cookie == 0 && !known && !opens(pkt, &l4) {
        events.note(Reason::FlowMissNonSyn);
    }
    let choice = new_flow(ctx, pkt, &l4, key, vip, flood, cookie, events)?;
    if cookie != 0 {
        synproxy::ack_into_syn::<F>(ctx, probe).check()?;
    }
    Ok(Some(choice))
}

/// Sends a client packet to the backend chosen.
#[inline(never)]
fn deliver<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    choice: &Choice,
    events: &mut Events,
) -> Status {
    let verdict = match BACKENDS.get(choice.id) {
        Some(backend) => forward_to(ctx, pkt, choice, backend, events),
        None => Err(Verdict::of(Reason::DropNoBackend)),
    };
    match verdict {
        Ok(v) | Err(v) => Status::verdict(v),
    }
}

/// A TCP/UDP packet not for a VIP: a reply, if it comes from a backend, rewritten
/// for its client and sent on (or too big: the caller answers).
#[inline(never)]
fn from_backend<F: Family>(
    ctx: &XdpContext,
    roles: u32,
    pkt: &Packet<F>,
    events: &mut Events,
) -> Status {
    let to = match reply_to(ctx, roles, pkt) {
        Ok(to) => to,
        Err(v) => return Status::verdict(v),
    };
    let to = &to;
    if to.l4.closing {
        reply_closes(pkt, to);
    }
    // The entries stay valid for the whole run of the program (RCU).
    let rewrite = if to.nat.is_null() {
        let target = unsafe { &*to.target };
        Rewrite {
            new_source: (F::from_words(&target.vip.addr), target.vip.port),
            new_destination: (pkt.dst, pkt.dport),
            fullnat: false,
            vip_id: target.vip_id,
            backend_id: target.backend_id,
        }
    } else {
        let nat = unsafe { &*to.nat };
        Rewrite {
            new_source: (F::from_words(&nat.vip), nat.vip_port),
            new_destination: (F::from_words(&nat.client), nat.client_port),
            fullnat: true,
            vip_id: nat.vip_id,
            backend_id: nat.backend_id,
        }
    };
    match reply(ctx, pkt, &to.l4, &rewrite, events) {
        Ok(status) => status,
        Err(v) => Status::verdict(v),
    }
}

#[inline(always)]
fn reply_to<F: Family>(ctx: &XdpContext, roles: u32, pkt: &Packet<F>) -> Result<Reply, Verdict> {
    // A full-NAT reply goes to a port the balancer allocated: its reverse entry
    // names the flow. A NAT reply comes from a NAT backend's endpoint.
    let (nat, target) = match fullnat_entry(pkt) {
        Some(nat) => (nat, core::ptr::null()),
        None => {
            let endpoint = F::endpoint(pkt.src, pkt.sport, pkt.proto);
            let Some(target) = (unsafe { REPLIES.get(endpoint) }) else {
                return Err(edge::not_for_a_vip::<F>(pkt.dst, Reason::PassNotVip));
            };
            (core::ptr::null(), target as *const ReplyTarget)
        }
    };
    // Replies come from the backend side; one from a client is forged.
    if roles & ROLE_BACKEND == 0 {
        return Err(Verdict::of(Reason::DropForgedReply));
    }
    let l4 = parse::l4(ctx, pkt)?;
    Ok(Reply { nat, target, l4 })
}

/// A fragment: only the first has ports, so none can be steered or translated.
#[inline(always)]
fn fragment<F: Family>(roles: u32, pkt: &Packet<F>) -> Verdict {
    let to = VipAddr {
        addr: F::words(pkt.dst),
    };
    if unsafe { VIP_ADDRS.get(to) }.is_some() {
        return Verdict::of(Reason::DropFragment);
    }
    let from = VipAddr {
        addr: F::words(pkt.src),
    };
    if roles & ROLE_BACKEND != 0 && unsafe { BACKEND_ADDRS.get(from) }.is_some() {
        return Verdict::of(Reason::DropReplyFragment);
    }
    Verdict::of(Reason::PassFragment)
}

/// Whether a port (network order) is one full NAT allocates.
#[inline(always)]
pub fn in_fullnat_range(port: u16) -> bool {
    match SETTINGS.get(0) {
        Some(s) => u16::from_be(port).wrapping_sub(s.fullnat_port_min) < s.fullnat_port_count,
        None => false,
    }
}

/// Whether a packet may start a flow: a TCP SYN, or any UDP datagram.
#[inline(always)]
fn opens<F: Family>(pkt: &Packet<F>, l4: &L4) -> bool {
    l4.syn || pkt.proto == PROTO_UDP
}

/// A packet of a known flow: its backend, or `None` when it must be scheduled again
/// (the backend is gone, or a SYN opens a new connection on the flow's 5-tuple).
#[inline(always)]
fn established<F: Family>(
    ctx: &XdpContext,
    l4: &L4,
    flow: &mut FlowState,
    events: &mut Events,
) -> Result<Option<(u32, u16, Traffic)>, Verdict> {
    let (one_way, vip_id) = match BACKENDS.get(flow.backend_id) {
        Some(b) if b.flags & BACKEND_ACTIVE != 0 && b.generation == flow.generation => {
            // An access list cuts open flows too.
            edge::admit::<F>(b.vip_id)?;
            (one_way(b), b.vip_id)
        }
        _ => {
            events.note(Reason::FlowBackendGone);
            debug!(
                ctx,
                "flow's backend {} is gone: scheduling it again", flow.backend_id
            );
            return Ok(None);
        }
    };
    if l4.syn {
        // A SYN on an established 5-tuple opens a new connection; before that, it is
        // the same SYN again (a retransmission), which must reach the same backend.
        if flow.flags & FLOW_ESTABLISHED != 0 {
            events.note(Reason::FlowReused);
            // The connection before it is over, whether or not its ends were seen.
            if conn::close(flow, conn::closing_bits(true, true), true) {
                count_flow(vip_id, flow.backend_id, FlowEnd::Closed);
            }
            // A new connection: nothing of a proxied one carries over.
            flow.flags &= !(FLOW_SYN_SENT | FLOW_SEQ_ADJUSTED);
            flow.seq = 0;
            return Ok(None);
        }
        events.note(Reason::SynRetransmit);
    } else if flow.flags & FLOW_ESTABLISHED == 0 {
        conn::set_flags(flow, FLOW_ESTABLISHED);
    }
    conn::touch(flow);
    if flow.flags & FLOW_SYN_SENT != 0 {
        // Opened by a cookie; the backend has not answered its SYN yet.
        return Err(Verdict::of(Reason::DropSynProxyPending));
    }
    if l4.closing && conn::close(flow, conn::closing_bits(true, l4.reset), one_way) {
        count_flow(vip_id, flow.backend_id, FlowEnd::Closed);
    }
    Ok(Some((flow.backend_id, flow.nat_port, Traffic::Forward)))
}

/// A client packet without a (usable) flow: schedule it and remember it.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined: the arguments are registers"
)]
fn new_flow<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    l4: &L4,
    key: &F::Key,
    vip: &VipInfo,
    flood: bool,
    cookie: u32,
    events: &mut Events,
) -> Result<Choice, Verdict> {
    // A proven cookie opens a connection as a SYN does.
    let opening = opens(pkt, l4) || cookie != 0;
    // During a flood of new flows (random-source SYNs, most of them) new flows are
    // placed by their hash and not remembered: their packets find the same backend
    // without an entry, so a flood cannot fill the table and push established flows
    // out. A flow that lives on gets its entry from its first packet after the flood
    // (a miss, placed by the same hash). Full NAT needs the table for its port.
    let hashed = vip.forwarding != FORWARD_FULLNAT
        && vip.scheduler != SCHED_LEAST_CONN
        && flood
        && cookie == 0;
    let Some(id) = schedule(vip, pkt, opening && !hashed) else {
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
    if cookie != 0 && backend.forwarding != FORWARD_NAT {
        // The VIP's mode changed under the handshake: only NAT can carry it.
        return Err(Verdict::of(Reason::DropNoBackend));
    }
    events.note(Reason::FlowNew);
    // The slot's mode, not the VIP's: they differ for a moment while a change of mode
    // is being written, and the packet leaves by the slot's.
    let fullnat = backend.forwarding == FORWARD_FULLNAT;
    let nat_port = if fullnat {
        match allocate_port(pkt, id, backend) {
            0 => return Err(Verdict::of(Reason::DropNoNatPort)),
            port => port as u16,
        }
    } else {
        0
    };
    if hashed && !fullnat {
        events.note(Reason::FlowInsertSkipped);
    } else {
        let closing = if l4.closing {
            conn::born_closing(conn::closing_bits(true, l4.reset), one_way(backend))
        } else {
            0
        };
        let flags = if cookie != 0 {
            FLOW_SYN_SENT
        } else if l4.syn {
            0
        } else {
            FLOW_ESTABLISHED
        };
        let state = FlowState {
            backend_id: id,
            generation: backend.generation,
            flags: flags | closing,
            nat_port,
            seq: cookie,
            seen: conn::now(),
        };
        if F::flows().insert(key, state, 0).is_err() {
            events.note(Reason::FlowInsertFailed);
        } else {
            // Counted here, where it is certain: the packet may still fail below.
            count_flow(backend.vip_id, id, FlowEnd::Opened);
            if closing & FLOW_CLOSED != 0 {
                count_flow(backend.vip_id, id, FlowEnd::Closed);
            }
            if cookie != 0 {
                synproxy::flow_opened();
            }
        }
    }
    Ok(Choice::new(id, nat_port, l4, Traffic::NewFlow))
}

/// Whether a backend's flows are seen from the client's end only (DSR: the backend
/// answers the client itself).
#[inline(always)]
fn one_way(backend: &Backend) -> bool {
    backend.forwarding == FORWARD_DSR_IPIP || backend.forwarding == FORWARD_DSR_GUE
}

/// A connection's start or end, as its VIP's and backend's counters count it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlowEnd {
    Opened,
    Closed,
}

/// Counts a connection opened or over, at once where it is known (whatever becomes of
/// the packet that told it).
#[inline(always)]
fn count_flow(vip_id: u32, backend_id: u32, end: FlowEnd) {
    for (stats, id) in [(&VIP_STATS, vip_id), (&BACKEND_STATS, backend_id)] {
        if let Some(s) = stats.get_ptr_mut(id) {
            let s = unsafe { &mut *s };
            match end {
                FlowEnd::Opened => s.opened_flows += 1,
                FlowEnd::Closed => s.closed_flows += 1,
            }
        }
    }
}

/// Ends a flow whose entry is about to go (its backend refused it): counted over
/// unless it was already.
#[inline(always)]
pub fn count_over(flow: *mut FlowState) {
    if conn::close(flow, conn::closing_bits(true, true), true) {
        let id = unsafe { (*flow).backend_id };
        if let Some(backend) = BACKENDS.get(id) {
            count_flow(backend.vip_id, id, FlowEnd::Closed);
        }
    }
}

/// A backend's FIN or RST: its end of the flow closes, and the connection is counted
/// over if that made it so. (The flow is found by the client's 5-tuple: the reply's
/// destination and the VIP, or full NAT's reverse entry.)
#[inline(never)]
fn reply_closes<F: Family>(pkt: &Packet<F>, to: &Reply) {
    let (key, vip_id, backend_id) = if to.nat.is_null() {
        let target = unsafe { &*to.target };
        let vip = F::from_words(&target.vip.addr);
        let key = F::key(pkt.dst, vip, pkt.dport, target.vip.port, pkt.proto);
        (key, target.vip_id, target.backend_id)
    } else {
        let nat = unsafe { &*to.nat };
        let (client, vip) = (F::from_words(&nat.client), F::from_words(&nat.vip));
        let key = F::key(client, vip, nat.client_port, nat.vip_port, pkt.proto);
        (key, nat.vip_id, nat.backend_id)
    };
    if let Some(flow) = F::flows().get_ptr_mut(key)
        && unsafe { (*flow).backend_id } == backend_id
        && conn::close(flow, conn::closing_bits(false, to.l4.reset), false)
    {
        count_flow(vip_id, backend_id, FlowEnd::Closed);
    }
}

/// Full NAT: a source port toward `backend` that no other flow uses, claimed in the
/// reverse table by an insert that fails if the entry exists (atomic across CPUs).
/// A port held by a flow that is over (closed, moved to another port or backend,
/// or forgotten by the flow table) is taken back when no free one turns up.
/// Returns the port (network order), or 0 when none is free. The keys are built in
/// the scratch map: this function's frame adds to its caller's.
#[inline(never)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the keys are passed where they are, in the scratch map, not copied to the stack"
)]
fn allocate_port<F: Family>(pkt: &Packet<F>, id: u32, backend: &Backend) -> u32 {
    let Some(settings) = SETTINGS.get(0) else {
        return 0;
    };
    let count = settings.fullnat_port_count as u32;
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let nat = F::nat_scratch(unsafe { &mut *scratch });
    if count == 0 {
        return 0;
    }
    let target = &mut nat.target;
    set_words(&mut target.client, F::words(pkt.src));
    set_words(&mut target.vip, F::words(pkt.dst));
    target.client_port = pkt.sport;
    target.vip_port = pkt.dport;
    target.vip_id = backend.vip_id;
    target.backend_id = id;
    let source = F::from_words(&backend.source);
    let backend_addr = F::from_words(&backend.endpoint.addr);
    let start = unsafe { bpf_get_prandom_u32() };
    let mut reusable = 0u16;
    for i in 0..FULLNAT_PORT_TRIES {
        let port = (settings.fullnat_port_min as u32 + start.wrapping_add(i) % count) as u16;
        let port = port.to_be();
        // The reply's 5-tuple: backend → the balancer's address and this port.
        F::set_key(
            &mut nat.reverse,
            backend_addr,
            source,
            [backend.endpoint.port, port],
            pkt.proto,
        );
        if F::nat_flows()
            .insert(&nat.reverse, &nat.target, BPF_NOEXIST as u64)
            .is_ok()
        {
            return port as u32;
        }
        if reusable == 0 && is_over::<F>(nat, port, pkt.proto) {
            reusable = port;
        }
    }
    if reusable != 0 {
        F::set_key(
            &mut nat.reverse,
            backend_addr,
            source,
            [backend.endpoint.port, reusable],
            pkt.proto,
        );
        // Removed, then claimed as a free port: of CPUs doing the same, one wins.
        let _ = F::nat_flows().remove(&nat.reverse);
        if F::nat_flows()
            .insert(&nat.reverse, &nat.target, BPF_NOEXIST as u64)
            .is_ok()
        {
            return reusable as u32;
        }
    }
    0
}

/// Whether the reverse entry at `nat.reverse` belongs to a flow that is over.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the keys are passed where they are, in the scratch map, not copied to the stack"
)]
fn is_over<F: Family>(nat: &mut NatScratch<F>, port: u16, proto: u8) -> bool {
    let Some(entry) = F::nat_flows().get_ptr(&nat.reverse) else {
        // Gone since: free.
        return true;
    };
    let entry = unsafe { &*entry };
    let (client, vip) = (F::from_words(&entry.client), F::from_words(&entry.vip));
    let backend_id = entry.backend_id;
    F::set_key(
        &mut nat.flow,
        client,
        vip,
        [entry.client_port, entry.vip_port],
        proto,
    );
    match F::flows().get_ptr(&nat.flow) {
        None => true,
        Some(flow) => {
            let flow = unsafe { &*flow };
            flow.nat_port != port || flow.backend_id != backend_id || flow.flags & FLOW_CLOSING != 0
        }
    }
}

/// Sends a client packet to its backend, in the VIP's forwarding mode. A packet too
/// big for the way is answered with ICMP before anything in it changes.
#[inline(always)]
fn forward_to<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    choice: &Choice,
    backend: &Backend,
    events: &mut Events,
) -> Result<Verdict, Verdict> {
    let l4 = &choice.l4();
    // A next hop the kernel has not resolved yet: the packet is made for its backend
    // all the same, and the kernel resolves the neighbour and sends it on.
    let hop = match backend_hop::<F>(ctx, pkt.proto, backend, pkt.src, events) {
        Ok(hop) => Some(hop),
        Err(v) if v.is(Reason::PassNoNeighbour) => None,
        Err(v) => return Err(v),
    };
    // Unresolved: the kernel checks the size. (Written out for both cases: a value
    // left undefined on one path ends up read from a register the verifier has
    // never seen written.)
    let mtu = match &hop {
        Some(hop) => hop.mtu,
        None => u16::MAX,
    };
    let fit = |overhead: usize| forward::fit(pkt, overhead as u16, mtu);
    let mut fragment = false;
    let needs_source =
        backend.forwarding == FORWARD_FULLNAT || backend.forwarding == FORWARD_DSR_GUE;
    if needs_source && backend.source == [0; 4] {
        // No address of the balancer routes to the backend (the agent found none).
        return Err(Verdict::of(Reason::DropNoRoute));
    }
    match backend.forwarding {
        FORWARD_DSR_IPIP | FORWARD_DSR_GUE => {
            let gue = backend.forwarding == FORWARD_DSR_GUE;
            if let Fit::TooBig(mtu) = fit(encap::overhead::<F>(gue)) {
                // Never an ICMP error about an ICMP error (RFC 1122).
                if pkt.proto == F::ICMP {
                    return Err(Verdict::of(Reason::DropNoRoom));
                }
                return Ok(icmp::too_big(ctx, pkt, mtu));
            }
            encap::encapsulate(ctx, pkt, backend, gue).check()?;
            events.note(if gue {
                Reason::EncapGue
            } else {
                Reason::EncapIpip
            });
        }
        mode => {
            match fit(0) {
                Fit::TooBig(mtu) => return Ok(icmp::too_big(ctx, pkt, mtu)),
                Fit::Fragment => fragment = true,
                Fit::Fits => {}
            }
            // A flow opened by a SYN cookie: the client acknowledges the cookie's
            // sequence numbers, the backend expects its own.
            if pkt.proto == PROTO_TCP && synproxy::live() {
                synproxy::shift_client_ack::<F>(ctx, l4.check as usize).check()?;
            }
            if mode == FORWARD_FULLNAT {
                if choice.nat_port == 0 {
                    // A flow scheduled before its slot turned full NAT.
                    return Err(Verdict::of(Reason::DropNoNatPort));
                }
                let source = F::from_words(&backend.source);
                nat::rewrite(
                    ctx,
                    pkt,
                    l4,
                    End::Source,
                    (pkt.src, pkt.sport),
                    (source, choice.nat_port as u16),
                )?;
                events.note(Reason::FullNat);
            }
            let addr = F::from_words(&backend.endpoint.addr);
            nat::rewrite(
                ctx,
                pkt,
                l4,
                End::Destination,
                (pkt.dst, pkt.dport),
                (addr, backend.endpoint.port),
            )?;
        }
    }
    account(&VIP_STATS, backend.vip_id, pkt.frame_len, choice.traffic());
    account(&BACKEND_STATS, choice.id, pkt.frame_len, choice.traffic());
    Ok(match hop {
        // IPv4 without DF: the kernel fragments it on the way out.
        Some(_) if fragment => Verdict::of(Reason::PassTooBig),
        Some(hop) => forward::send(ctx, &hop),
        None => Verdict::of(Reason::PassNoNeighbour),
    })
}

/// The next hop toward a backend: cached in its slot, or the kernel's FIB.
#[inline(always)]
pub fn backend_hop<F: Family>(
    ctx: &XdpContext,
    proto: u8,
    backend: &Backend,
    src: F::Addr,
    events: &mut Events,
) -> Result<NextHop, Verdict> {
    if let Some(hop) = valid(&backend.next_hop) {
        return Ok(*hop);
    }
    let addr = F::from_words(&backend.endpoint.addr);
    // A backend the kernel would not forward to has nowhere to go.
    ask_fib::<F>(ctx, &(proto, addr, src), events).map_err(|v| {
        if v.is(Reason::PassLocal) {
            Verdict::of(Reason::DropNoRoute)
        } else {
            v
        }
    })
}

/// A full-NAT backend's reply, to the balancer's address and one of its ports: the
/// reverse entry of the flow it belongs to. `None`: not one (the table is only asked
/// for ports in full NAT's range).
#[inline(always)]
fn fullnat_entry<F: Family>(pkt: &Packet<F>) -> Option<*const NatTarget> {
    if !in_fullnat_range(pkt.dport) {
        return None;
    }
    let key = F::key(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto);
    F::nat_flows().get_ptr(key)
}

/// A reply found: the map entry that says how to rewrite it (pointers: the entries
/// stay for the program's run, and copies would take the stack's room).
pub struct Reply {
    /// Full NAT's reverse entry, or null.
    nat: *const NatTarget,
    /// A NAT backend's reply target, or null.
    target: *const ReplyTarget,
    /// Its transport header, checked.
    l4: L4,
}

/// How a reply is rewritten.
struct Rewrite<F: Family> {
    /// The VIP.
    new_source: (F::Addr, u16),
    /// The client (NAT replies are addressed to it already: only full NAT's change).
    new_destination: (F::Addr, u16),
    fullnat: bool,
    vip_id: u32,
    backend_id: u32,
}

/// Rewrites a backend's reply for its client and sends it (or says it is too big,
/// for the caller to answer).
#[inline(always)]
fn reply<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F>,
    l4: &L4,
    to: &Rewrite<F>,
    events: &mut Events,
) -> Result<Status, Verdict> {
    let client = to.new_destination.0;
    // Routed before the rewrite: a backend answering the balancer itself (a health
    // check) must reach the local stack untouched.
    let hop = match client_hop::<F>(ctx, pkt.proto, client, to.new_source.0, events) {
        Err(local) if local.is(Reason::PassLocal) => return Err(local),
        other => other,
    };
    let mut fragment = false;
    if let Ok(hop) = &hop {
        match forward::fit(pkt, 0, hop.mtu) {
            Fit::TooBig(mtu) => return Ok(Status::too_big(mtu)),
            Fit::Fragment => fragment = true,
            Fit::Fits => {}
        }
    }
    nat::rewrite(
        ctx,
        pkt,
        l4,
        End::Source,
        (pkt.src, pkt.sport),
        to.new_source,
    )?;
    if to.fullnat {
        nat::rewrite(
            ctx,
            pkt,
            l4,
            End::Destination,
            (pkt.dst, pkt.dport),
            to.new_destination,
        )?;
    }
    events.note(Reason::Reply);
    account(&VIP_STATS, to.vip_id, pkt.frame_len, Traffic::Reply);
    account(&BACKEND_STATS, to.backend_id, pkt.frame_len, Traffic::Reply);
    Ok(Status::verdict(match hop {
        Ok(_) if fragment => Verdict::of(Reason::PassTooBig),
        Ok(hop) => forward::send(ctx, &hop),
        Err(verdict) => verdict,
    }))
}

/// The next hop toward a client. A client on the link is a neighbour itself (one
/// lookup); for any other, the client side's routes (mirrored by the agent) say
/// whether it is this machine or behind a gateway, whose neighbour entry serves every
/// client behind it. Anything unknown goes to the kernel's FIB.
#[inline(always)]
pub fn client_hop<F: Family>(
    ctx: &XdpContext,
    proto: u8,
    dst: F::Addr,
    src: F::Addr,
    events: &mut Events,
) -> Result<NextHop, Verdict> {
    if let Some(hop) = F::neighbour(dst).and_then(valid) {
        return Ok(*hop);
    }
    if let Some(route) = F::route(dst) {
        if route.kind == ROUTE_LOCAL {
            return Err(Verdict::of(Reason::PassLocal));
        }
        let next = if route.kind == ROUTE_GATEWAY {
            F::from_words(&route.gateway)
        } else {
            dst
        };
        if let Some(hop) = F::neighbour(next).and_then(valid) {
            return Ok(*hop);
        }
    }
    ask_fib::<F>(ctx, &(proto, dst, src), events)
}

/// Picks a backend for a new flow: one array index, whatever the scheduler. Round
/// robin takes the next ring slot for a packet that opens a flow; any other packet
/// (a flow the table lost) is placed by its hash, so its backend does not depend on
/// how many flows came before.
#[inline(always)]
fn schedule<F: Family>(vip: &VipInfo, pkt: &Packet<F>, opening: bool) -> Option<u32> {
    let len = vip.schedule_len;
    if len == 0 {
        return None;
    }
    let slot = if vip.scheduler == SCHED_MAGLEV || !opening {
        F::vip_hash(vip, pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto) % len
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
/// the current one-second window, or in the one before.
#[inline(always)]
pub fn flooding() -> bool {
    match SETTINGS.get(0) {
        Some(s) if s.flood_threshold != 0 => rate::over_or_was(&FLOOD, s.flood_threshold),
        _ => false,
    }
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
    match traffic {
        Traffic::Reply => {
            s.reply_packets += 1;
            s.reply_bytes += bytes as u64;
        }
        Traffic::NewFlow | Traffic::Forward => {
            s.packets += 1;
            s.bytes += bytes as u64;
            s.new_flows += (traffic == Traffic::NewFlow) as u64;
        }
    }
}
