//! Packet cases (BPF_PROG_TEST_RUN) for the schedulers and the connection state of
//! flow entries: when a connection counts as active, and which backend least
//! connections, source hashing and the hash choices pick, against the user-space
//! simulator.

use std::net::Ipv4Addr;

use foobar_lb::{
    connections::Connections,
    schedule::{self, Weighted},
    state::{FlowHash, Forwarding, Protocol, Scheduler, VipSpec, endpoint},
};
use foobar_lb_common::{FLOW_CLOSED, FLOW_CLOSING, FLOW_REPLY_CLOSING, FlowKey, TrafficStats};
use tests::{
    packet::{Frame, Parsed, Tcp, parse, v4},
    packet_lab::*,
};

// ---------------------------------------------------------------- helpers

fn from_client(sport: u16, tcp: Tcp) -> Frame {
    Frame::tcp(CLIENT, sport, VIP, 80, tcp)
}

/// A backend's segment to the client's port.
fn from_backend(backend: u8, client_port: u16, tcp: Tcp) -> Frame {
    Frame {
        src_mac: backend_mac(backend),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::tcp(
            backend_addr(backend),
            BACKEND_PORT,
            CLIENT,
            client_port,
            tcp,
        )
    }
}

fn forwarded(lab: &mut PacketLab, frame: &Frame) -> Parsed {
    let out = lab.run(Side::Client, &frame.build());
    assert_eq!(action_name(out.action), "REDIRECT", "{frame:?}");
    parse(&out.packet)
}

fn replied(lab: &mut PacketLab, frame: &Frame) {
    let out = lab.run(Side::Backend, &frame.build());
    assert_eq!(action_name(out.action), "REDIRECT", "{frame:?}");
}

fn backend_of(p: &Parsed) -> u8 {
    (0..BACKENDS)
        .find(|&i| v4(backend_addr(i)) == p.dst)
        .unwrap_or_else(|| panic!("{} is no backend", p.dst))
}

fn stats(lab: &mut PacketLab, backend: u32) -> TrafficStats {
    lab.balancer.dataplane().backend_stats(backend).unwrap()
}

/// (opened, closed) of backend slot `backend`.
fn opened_closed(lab: &mut PacketLab, backend: u32) -> (u64, u64) {
    let s = stats(lab, backend);
    (s.opened_flows, s.closed_flows)
}

fn flow_key(client: Ipv4Addr, sport: u16) -> FlowKey {
    FlowKey::new(
        u32::from_ne_bytes(client.octets()),
        u32::from_ne_bytes(VIP.octets()),
        sport.to_be(),
        80u16.to_be(),
        6,
    )
}

fn flags(lab: &mut PacketLab, sport: u16) -> u16 {
    let key = flow_key(CLIENT, sport);
    lab.balancer
        .dataplane()
        .flow(&key)
        .unwrap()
        .expect("flow")
        .flags
}

/// A lab with one TCP VIP on :80 by `scheduler` over backends of these weights.
fn lab_with(scheduler: Scheduler, weights: &[u32]) -> PacketLab {
    PacketLab::with_vip(scheduler, weights)
}

/// Plans the lab's least-connections rings, as the agent does every 10 ms.
fn plan(planner: &mut Connections, lab: &mut PacketLab) {
    let vips = lab.balancer.least_connections_vips();
    planner.plan(&mut lab.balancer, &vips);
}

fn with_hash(scheduler: Scheduler, hash: Option<FlowHash>, prefix: u8, weights: &[u32]) -> VipSpec {
    VipSpec {
        hash,
        hash_prefix_v4: prefix,
        ..vip_spec("web", VIP, 80, Protocol::Tcp, scheduler, weights)
    }
}

// ---------------------------------------------------------------- connection state

#[test]
fn a_connection_counts_from_its_syn_until_fin_both_ways() {
    let mut lab = lab_with(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &from_client(1000, Tcp::Syn));
    assert_eq!(opened_closed(&mut lab, 0), (1, 0), "the SYN opens it");
    replied(&mut lab, &from_backend(0, 1000, Tcp::SynAck));
    forwarded(&mut lab, &from_client(1000, Tcp::Ack));
    forwarded(&mut lab, &from_client(1000, Tcp::Fin));
    assert_eq!(opened_closed(&mut lab, 0), (1, 0), "one end closed");
    assert_eq!(
        flags(&mut lab, 1000) & (FLOW_CLOSING | FLOW_CLOSED),
        FLOW_CLOSING
    );
    replied(&mut lab, &from_backend(0, 1000, Tcp::Fin));
    assert_eq!(opened_closed(&mut lab, 0), (1, 1), "both ends closed");
    assert_ne!(flags(&mut lab, 1000) & FLOW_CLOSED, 0);
    // The last ACKs and a FIN sent again count nothing more.
    forwarded(&mut lab, &from_client(1000, Tcp::Ack));
    replied(&mut lab, &from_backend(0, 1000, Tcp::Fin));
    forwarded(&mut lab, &from_client(1000, Tcp::Fin));
    assert_eq!(opened_closed(&mut lab, 0), (1, 1));
    let vip_id = lab.balancer.vips().next().unwrap().id;
    let vip = lab.balancer.dataplane().vip_stats(vip_id).unwrap();
    assert_eq!(
        (vip.opened_flows, vip.closed_flows),
        (1, 1),
        "the VIP's too"
    );
}

#[test]
fn the_backend_may_close_first() {
    let mut lab = lab_with(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &from_client(1001, Tcp::Syn));
    forwarded(&mut lab, &from_client(1001, Tcp::Ack));
    replied(&mut lab, &from_backend(0, 1001, Tcp::Fin));
    assert_eq!(opened_closed(&mut lab, 0), (1, 0));
    assert_eq!(
        flags(&mut lab, 1001) & FLOW_REPLY_CLOSING,
        FLOW_REPLY_CLOSING
    );
    forwarded(&mut lab, &from_client(1001, Tcp::Fin));
    assert_eq!(opened_closed(&mut lab, 0), (1, 1));
}

#[test]
fn an_rst_from_either_end_ends_the_connection_at_once() {
    let mut lab = lab_with(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &from_client(1002, Tcp::Syn));
    forwarded(&mut lab, &from_client(1002, Tcp::Rst));
    assert_eq!(opened_closed(&mut lab, 0), (1, 1), "the client's RST");
    forwarded(&mut lab, &from_client(1003, Tcp::Syn));
    replied(&mut lab, &from_backend(0, 1003, Tcp::Rst));
    assert_eq!(opened_closed(&mut lab, 0), (2, 2), "the backend's RST");
    // A reply for no known flow closes nothing (and is still translated).
    replied(&mut lab, &from_backend(0, 1999, Tcp::Rst));
    assert_eq!(opened_closed(&mut lab, 0), (2, 2));
}

#[test]
fn a_reused_tuple_ends_the_connection_before_it() {
    let mut lab = lab_with(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &from_client(1004, Tcp::Syn));
    forwarded(&mut lab, &from_client(1004, Tcp::Ack));
    forwarded(&mut lab, &from_client(1004, Tcp::Syn));
    assert_eq!(opened_closed(&mut lab, 0), (2, 1));
    assert_eq!(
        flags(&mut lab, 1004) & FLOW_CLOSED,
        0,
        "the new one is open"
    );
}

#[test]
fn a_dsr_connection_ends_with_the_clients_fin() {
    let mut lab = PacketLab::new();
    lab.apply(vec![mode_vip(
        Family::V4,
        Forwarding::DsrIpip,
        80,
        Protocol::Tcp,
        Scheduler::Rr,
        &[1],
    )]);
    let syn = Frame::tcp(CLIENT, 1005, VIP, 80, Tcp::Syn).build();
    assert_eq!(action_name(lab.run(Side::Client, &syn).action), "REDIRECT");
    let fin = Frame::tcp(CLIENT, 1005, VIP, 80, Tcp::Fin).build();
    assert_eq!(action_name(lab.run(Side::Client, &fin).action), "REDIRECT");
    assert_eq!(
        opened_closed(&mut lab, 0),
        (1, 1),
        "its replies are never seen"
    );
}

#[test]
fn a_flow_entry_notes_when_it_was_last_seen() {
    let mut lab = lab_with(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &from_client(1006, Tcp::Syn));
    let key = flow_key(CLIENT, 1006);
    let mut flow = lab.balancer.dataplane().flow(&key).unwrap().unwrap();
    assert_ne!(flow.seen, 0, "stamped when made");
    // An entry the clock has left behind is stamped again by its next packet.
    flow.seen = 1;
    lab.balancer.dataplane().set_flow(&key, &flow).unwrap();
    forwarded(&mut lab, &from_client(1006, Tcp::Ack));
    let now = lab.balancer.dataplane().flow(&key).unwrap().unwrap();
    assert!(now.seen > 1, "{}", now.seen);
}

// ---------------------------------------------------------------- least connections

/// The backends of a least-connections VIP as the planner weighs them.
fn weighted(lab: &PacketLab) -> Vec<Weighted> {
    lab.balancer.vips().next().unwrap().plan.weighted()
}

#[test]
fn least_connections_sends_new_flows_to_the_backends_with_fewest() {
    let mut lab = lab_with(Scheduler::Lc, &[1, 1, 1]);
    let mut planner = Connections::default();
    // From zeros: one each in turn.
    let first: Vec<u8> = (0..6)
        .map(|p| backend_of(&forwarded(&mut lab, &from_client(2000 + p, Tcp::Syn))))
        .collect();
    assert_eq!(first, [0, 1, 2, 0, 1, 2]);
    // Backends 0 and 1 lose both their connections; 2 keeps two.
    for p in [2000, 2001, 2003, 2004] {
        forwarded(&mut lab, &from_client(p, Tcp::Rst));
    }
    plan(&mut planner, &mut lab);
    let active: Vec<u64> = (0..3)
        .map(|b| planner.active_now(&mut lab.balancer, b).unwrap())
        .collect();
    assert_eq!(active, [0, 0, 2]);
    let expected = schedule::least_connections(&weighted(&lab), &active, false);
    let next: Vec<u8> = (0..8)
        .map(|p| backend_of(&forwarded(&mut lab, &from_client(2100 + p, Tcp::Syn))))
        .collect();
    assert_eq!(next, [0, 1, 0, 1, 0, 1, 2, 0]);
    assert_eq!(
        next,
        expected[..8].iter().map(|&b| b as u8).collect::<Vec<_>>(),
        "the simulator's picks"
    );
}

#[test]
fn weighted_least_connections_fills_by_weight_from_the_live_counts() {
    let mut lab = lab_with(Scheduler::Wlc, &[3, 1]);
    let mut planner = Connections::default();
    // From zeros the ring follows the weights: 3 to backend 0 for 1 to backend 1.
    let first: Vec<u8> = (0..8)
        .map(|p| backend_of(&forwarded(&mut lab, &from_client(3000 + p, Tcp::Syn))))
        .collect();
    assert_eq!(first.iter().filter(|&&b| b == 0).count(), 6, "{first:?}");
    // Backend 0 loses all six; backend 1 keeps its two.
    for (p, &b) in (3000..).zip(&first) {
        if b == 0 {
            forwarded(&mut lab, &from_client(p, Tcp::Rst));
        }
    }
    plan(&mut planner, &mut lab);
    let active: Vec<u64> = (0..2)
        .map(|b| planner.active_now(&mut lab.balancer, b).unwrap())
        .collect();
    assert_eq!(active, [0, 2]);
    // Backend 0 takes every new flow until, with one more, it would have more per
    // unit of weight than backend 1: nine in a row (the zero-count ring would have
    // given backend 1 two of these eight).
    let next: Vec<u8> = (0..8)
        .map(|p| backend_of(&forwarded(&mut lab, &from_client(3100 + p, Tcp::Syn))))
        .collect();
    let expected = schedule::least_connections(&weighted(&lab), &active, true);
    assert_eq!(next, [0; 8]);
    assert_eq!(
        next,
        expected[..8].iter().map(|&b| b as u8).collect::<Vec<_>>(),
        "the simulator's picks"
    );
}

#[test]
fn idle_flows_stop_counting_and_keep_their_backend() {
    let mut lab = lab_with(Scheduler::Lc, &[1]);
    let mut planner = Connections::default();
    for p in [4000, 4001, 4002] {
        forwarded(&mut lab, &from_client(p, Tcp::Syn));
    }
    planner.sweep(&mut lab.balancer, 900, 300);
    assert_eq!(planner.active_now(&mut lab.balancer, 0), Some(3));
    // One goes silent for longer than the timeout (its tick set back an hour).
    let key = flow_key(CLIENT, 4001);
    let mut flow = lab.balancer.dataplane().flow(&key).unwrap().unwrap();
    flow.seen = flow.seen.wrapping_sub(3600);
    lab.balancer.dataplane().set_flow(&key, &flow).unwrap();
    planner.sweep(&mut lab.balancer, 900, 300);
    assert_eq!(
        planner.active_now(&mut lab.balancer, 0),
        Some(2),
        "the idle one"
    );
    // Its entry stays: when it speaks again it keeps its backend, and counts again.
    assert!(lab.balancer.dataplane().flow(&key).unwrap().is_some());
    forwarded(&mut lab, &from_client(4001, Tcp::Ack));
    planner.sweep(&mut lab.balancer, 900, 300);
    assert_eq!(planner.active_now(&mut lab.balancer, 0), Some(3));
    // Flows that ended unseen (the table lost them) are not counted after a sweep.
    lab.balancer
        .dataplane()
        .remove_flow(&flow_key(CLIENT, 4002))
        .unwrap();
    assert_eq!(
        planner.active_now(&mut lab.balancer, 0),
        Some(3),
        "until the sweep"
    );
    planner.sweep(&mut lab.balancer, 900, 300);
    assert_eq!(planner.active_now(&mut lab.balancer, 0), Some(2));
}

// ---------------------------------------------------------------- source hashing

#[test]
fn source_hashing_keeps_a_client_on_one_backend_and_matches_the_simulator() {
    let mut lab = lab_with(Scheduler::Sh, &[1, 1, 1, 1]);
    let vip = endpoint(VIP.into(), 80, Protocol::Tcp);
    let mut used = [false; 4];
    for c in 0..100u32 {
        let client = Ipv4Addr::from(0xc612_0000 | (c * 7));
        let expected = lab
            .balancer
            .explain(&vip, client.into(), 1)
            .unwrap()
            .unwrap();
        for port in [1024, 2000, 40_000, 65_000] {
            let p = forwarded(&mut lab, &Frame::tcp(client, port, VIP, 80, Tcp::Syn));
            assert_eq!(
                p.dst,
                v4(Ipv4Addr::from(expected.addr[0].to_ne_bytes())),
                "{client}:{port}"
            );
            used[backend_of(&p) as usize] = true;
        }
    }
    assert_eq!(used, [true; 4], "every backend gets clients");
}

#[test]
fn source_hashing_by_prefix_keeps_a_network_together() {
    let mut lab = PacketLab::new();
    lab.apply(vec![with_hash(Scheduler::Sh, None, 24, &[1, 1, 1, 1])]);
    for net in 0..20u32 {
        let base = 0xc612_0000 | (net << 8);
        let first = forwarded(
            &mut lab,
            &Frame::tcp(Ipv4Addr::from(base | 1), 5000, VIP, 80, Tcp::Syn),
        )
        .dst;
        for host in [2, 77, 254] {
            let p = forwarded(
                &mut lab,
                &Frame::tcp(Ipv4Addr::from(base | host), 5000, VIP, 80, Tcp::Syn),
            );
            assert_eq!(p.dst, first, "{net}.{host}");
        }
    }
}

#[test]
fn source_hashing_moves_only_the_clients_of_a_removed_backend() {
    let mut lab = lab_with(Scheduler::Sh, &[1, 1, 1, 1]);
    let clients: Vec<Ipv4Addr> = (0..400u32)
        .map(|c| Ipv4Addr::from(0xc613_0000 | c))
        .collect();
    let before: Vec<u8> = clients
        .iter()
        .map(|&c| {
            backend_of(&forwarded(
                &mut lab,
                &Frame::tcp(c, 1000, VIP, 80, Tcp::Syn),
            ))
        })
        .collect();
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Sh,
        &[1, 1, 1],
    )]);
    let mut moved = 0;
    for (port, (&c, &was)) in (2000..).zip(clients.iter().zip(&before)) {
        let now = backend_of(&forwarded(
            &mut lab,
            &Frame::tcp(c, port, VIP, 80, Tcp::Syn),
        ));
        if was == 3 {
            assert_ne!(now, 3);
        } else if now != was {
            moved += 1;
        }
    }
    assert!(
        moved <= 4,
        "{moved} clients of the remaining backends moved"
    );
}

#[test]
fn a_destination_port_hash_sends_every_client_to_one_backend() {
    let mut lab = PacketLab::new();
    lab.apply(vec![with_hash(
        Scheduler::Maglev,
        Some(FlowHash::DestinationPort),
        32,
        &[1, 1, 1, 1],
    )]);
    let first = forwarded(&mut lab, &from_client(1, Tcp::Syn)).dst;
    for c in 0..50u32 {
        let client = Ipv4Addr::from(0xc612_0000 | c);
        let p = forwarded(
            &mut lab,
            &Frame::tcp(client, 1000 + c as u16, VIP, 80, Tcp::Syn),
        );
        assert_eq!(p.dst, first);
    }
}

#[test]
fn a_hash_on_a_ring_scheduler_is_refused_whole() {
    let mut lab = lab_with(Scheduler::Rr, &[1, 1]);
    let bad = with_hash(Scheduler::Lc, Some(FlowHash::Source), 32, &[1, 1]);
    let err = lab.balancer.apply(&foobar_lb::state::DesiredState {
        vips: vec![bad],
        ..Default::default()
    });
    let err = err.expect_err("refused").to_string();
    assert!(err.contains("vips[0].hash"), "{err}");
    // Still round robin.
    let a = backend_of(&forwarded(&mut lab, &from_client(10, Tcp::Syn)));
    let b = backend_of(&forwarded(&mut lab, &from_client(11, Tcp::Syn)));
    assert_ne!(a, b);
}
