//! Packet cases through BPF_PROG_TEST_RUN: map state, input frame, expected action,
//! expected output frame (fields and checksums read back with etherparse).
//!
//! Each test gets its own namespace with a two-armed balancer's interfaces, so the
//! program's FIB lookups and redirects see a real routing table.

use std::net::{IpAddr, Ipv4Addr};

use foobar_lb::{
    edge::{Acl, NewFlowLimit},
    state::{BackendSpec, DesiredState, Protocol, Scheduler, VipSpec},
};
use foobar_lb_common::{Reason, reason::xdp_action::*};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tests::{
    packet::{Frame, L4, Parsed, Tcp, parse, v4},
    packet_lab::*,
};

// ---------------------------------------------------------------- helpers

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT, sport, VIP, 80, Tcp::Syn)
}

fn ack(sport: u16) -> Frame {
    Frame::tcp(CLIENT, sport, VIP, 80, Tcp::Ack)
}

/// Runs a frame from the client side and expects it forwarded to a backend.
fn forwarded(lab: &mut PacketLab, frame: &Frame) -> Parsed {
    let out = lab.run(Side::Client, &frame.build());
    assert_eq!(action_name(out.action), "REDIRECT", "{frame:?}");
    parse(&out.packet)
}

/// Index of the backend a forwarded packet went to.
fn backend_index(p: &Parsed) -> u8 {
    (0..BACKENDS)
        .find(|&i| v4(backend_addr(i)) == p.dst)
        .unwrap_or_else(|| panic!("{} is no backend", p.dst))
}

/// Expects `frame` to leave untouched with `action`, counted under `reason`.
fn untouched(lab: &mut PacketLab, side: Side, frame: &[u8], action: u32, reason: Reason) {
    let before = lab.count(reason);
    let out = lab.run(side, frame);
    assert_eq!(action_name(out.action), action_name(action), "{reason:?}");
    assert_eq!(out.packet, frame, "frame changed");
    assert_eq!(lab.count(reason), before + 1, "counter {reason:?}");
}

/// A backend's reply to a client.
fn reply(backend: u8, client: Ipv4Addr, client_port: u16) -> Frame {
    Frame {
        src_mac: backend_mac(backend),
        dst_mac: [0x02, 0xfb, 0, 0, 1, 0x01],
        ..Frame::tcp(
            backend_addr(backend),
            BACKEND_PORT,
            client,
            client_port,
            Tcp::SynAck,
        )
    }
}

/// The flow-table key of the client's TCP flow from `sport` to `VIP:80`.
fn flow_key(sport: u16) -> foobar_lb_common::FlowKey {
    foobar_lb_common::FlowKey::new(
        u32::from_ne_bytes(CLIENT.octets()),
        u32::from_ne_bytes(VIP.octets()),
        sport.to_be(),
        80u16.to_be(),
        6,
    )
}

fn outcome_total(lab: &mut PacketLab) -> u64 {
    let c = lab.counters();
    Reason::ALL
        .iter()
        .filter(|r| r.action().is_some())
        .map(|&r| c.get(r))
        .sum()
}

/// Offsets in an untagged IPv4 frame.
const IP: usize = 14;
const TCP: usize = 34;

// ---------------------------------------------------------------- not ours: passed untouched

#[test]
fn arp_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000).build();
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassNotIp);
}

#[test]
fn ipv4_bytes_under_the_ipv6_ethertype_are_dropped() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000).build();
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    untouched(
        &mut lab,
        Side::Client,
        &frame,
        DROP,
        Reason::DropBadIpVersion,
    );
}

#[test]
fn unknown_ethertype_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000).build();
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassNotIp);
}

#[test]
fn icmp_neither_echo_nor_error_to_vip_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000).build();
    frame[IP + 9] = 1; // ICMP
    frame[TCP] = 13; // timestamp request
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassIcmp);
}

#[test]
fn tcp_to_other_address_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let frame = Frame::tcp(CLIENT, 1000, Ipv4Addr::new(10, 0, 0, 1), 80, Tcp::Syn).build();
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassNotVip);
}

#[test]
fn traffic_from_a_non_backend_port_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut r = reply(0, CLIENT, 1000);
    r.sport = 22; // the backend host, but not the backend service
    untouched(
        &mut lab,
        Side::Backend,
        &r.build(),
        PASS,
        Reason::PassNotVip,
    );
}

#[test]
fn fragment_not_for_a_vip_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = Frame::udp(CLIENT, 1000, Ipv4Addr::new(10, 0, 0, 1), 53).build();
    frame[IP + 6] = 0x20; // more fragments
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassFragment);
}

#[test]
fn removed_vip_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &syn(1000));
    lab.apply(vec![]);
    untouched(
        &mut lab,
        Side::Client,
        &syn(1001).build(),
        PASS,
        Reason::PassNotVip,
    );
}

// ---------------------------------------------------------------- forwarding and rewrite

#[test]
fn syn_is_rewritten_to_the_backend_and_redirected() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let input = syn(40_000);
    let p = forwarded(&mut lab, &input);
    assert_eq!((p.src, p.sport), (v4(CLIENT), 40_000), "source kept");
    assert_eq!(
        (p.dst, p.dport),
        (v4(backend_addr(0)), BACKEND_PORT),
        "destination NATed"
    );
    assert_eq!(
        p.src_mac, LB_BACKEND_MAC,
        "leaves by the backend-side interface"
    );
    assert_eq!(
        p.dst_mac,
        backend_mac(0),
        "next hop from the neighbour table"
    );
    assert_eq!(p.ttl, input.ttl, "a middlebox: TTL untouched");
    assert_eq!(p.payload, input.payload);
    assert_eq!(lab.count(Reason::Redirect), 1);
    assert_eq!(lab.count(Reason::FlowNew), 1);
}

#[test]
fn udp_is_rewritten_with_a_correct_checksum() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Maglev,
        &[1, 1],
    )]);
    let p = forwarded(&mut lab, &Frame::udp(CLIENT, 5353, VIP, 53));
    assert_eq!(p.dport, BACKEND_PORT);
    assert_ne!(p.udp_checksum, Some(0));
}

#[test]
fn udp_without_checksum_keeps_checksum_zero() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Rr,
        &[1],
    )]);
    let mut frame = Frame::udp(CLIENT, 5353, VIP, 53);
    frame.l4 = L4::UdpNoChecksum;
    let p = forwarded(&mut lab, &frame);
    assert_eq!(p.udp_checksum, Some(0));
    assert_eq!(p.dst, backend_addr(0));
}

#[test]
fn checksums_stay_right_over_many_random_flows() {
    let mut lab = PacketLab::new();
    lab.apply(vec![
        vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Maglev, &[1, 2, 3]),
        VipSpec {
            backends: (3..6)
                .map(|i| BackendSpec {
                    address: backend_addr(i).into(),
                    port: 5300 + i as u16,
                    weight: 1,
                })
                .collect(),
            ..vip_spec("dns", VIP, 53, Protocol::Udp, Scheduler::Maglev, &[])
        },
    ]);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let src = Ipv4Addr::from(rng.random::<u32>() & 0x0000_ffff | 0xc612_0000); // 198.18.x.x
        let sport = rng.random_range(1..=u16::MAX);
        let mut frame = if rng.random() {
            Frame::tcp(src, sport, VIP, 80, Tcp::Syn)
        } else {
            Frame::udp(src, sport, VIP, 53)
        };
        frame.src_mac = CLIENT_MAC;
        frame.payload = (0..rng.random_range(0..200))
            .map(|_| rng.random())
            .collect();
        frame.ttl = rng.random_range(2..=255);
        // forwarded() parses the output, which checks both checksums.
        let first = forwarded(&mut lab, &frame);
        assert_eq!(
            forwarded(&mut lab, &frame).dst,
            first.dst,
            "maglev is deterministic"
        );
    }
}

#[test]
fn ip_options_are_honoured_and_kept() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000);
    frame.ip_options = vec![0x01, 0x01, 0x01, 0x00]; // NOP NOP NOP EOL
    let p = forwarded(&mut lab, &frame);
    assert_eq!(p.ip_options, frame.ip_options);
    assert_eq!((p.dst, p.dport), (v4(backend_addr(0)), BACKEND_PORT));
}

#[test]
fn longest_ip_options_are_honoured() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000);
    frame.ip_options = vec![0x01; 40];
    let p = forwarded(&mut lab, &frame);
    assert_eq!(p.ip_options.len(), 40);
    assert_eq!(p.dport, BACKEND_PORT);
}

#[test]
fn vlan_tagged_frames_are_steered_and_keep_their_tag() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000);
    frame.vlan = Some(42);
    let p = forwarded(&mut lab, &frame);
    assert_eq!(p.vlan, Some(42));
    assert_eq!(p.dst, backend_addr(0));
}

#[test]
fn ttl_one_is_forwarded_as_is() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = syn(1000);
    frame.ttl = 1;
    let p = forwarded(&mut lab, &frame);
    assert_eq!((p.ttl, p.dst), (1, v4(backend_addr(0))));
}

#[test]
fn ethernet_padding_after_the_datagram_is_fine() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut frame = Frame::tcp(CLIENT, 1000, VIP, 80, Tcp::Syn);
    frame.payload.clear(); // 54 bytes: a NIC pads it to 60
    let mut bytes = frame.build();
    bytes.resize(60, 0);
    let out = lab.run(Side::Client, &bytes);
    assert_eq!(out.action, REDIRECT);
    assert_eq!(parse(&out.packet).dst, backend_addr(0));
}

#[test]
fn backend_on_the_client_side_is_reached_by_xdp_tx() {
    let mut lab = PacketLab::new();
    lab.apply(vec![VipSpec {
        backends: vec![BackendSpec {
            address: SAME_SIDE_BACKEND.into(),
            port: 8080,
            weight: 1,
        }],
        ..vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[])
    }]);
    let out = lab.run(Side::Client, &syn(1000).build());
    assert_eq!(action_name(out.action), "TX");
    let p = parse(&out.packet);
    assert_eq!((p.dst, p.src_mac), (v4(SAME_SIDE_BACKEND), LB_CLIENT_MAC));
    assert_eq!(lab.count(Reason::Tx), 1);
}

#[test]
fn unresolved_next_hop_is_left_to_the_kernel_rewritten() {
    let mut lab = PacketLab::new();
    lab.apply(vec![VipSpec {
        backends: vec![BackendSpec {
            address: UNRESOLVED_BACKEND.into(),
            port: 8080,
            weight: 1,
        }],
        ..vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[])
    }]);
    let out = lab.run(Side::Client, &syn(1000).build());
    assert_eq!(action_name(out.action), "PASS");
    let p = parse(&out.packet);
    assert_eq!(
        (p.dst, p.dport),
        (v4(UNRESOLVED_BACKEND), 8080),
        "the kernel forwards the NATed packet"
    );
    assert_eq!(p.dst_mac, LB_CLIENT_MAC, "MACs left to the kernel");
    assert_eq!(lab.count(Reason::PassNoNeighbour), 1);
}

#[test]
fn unroutable_backend_is_dropped() {
    let mut lab = PacketLab::new();
    lab.apply(vec![VipSpec {
        backends: vec![BackendSpec {
            address: UNROUTABLE_BACKEND.into(),
            port: 8080,
            weight: 1,
        }],
        ..vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[])
    }]);
    let out = lab.run(Side::Client, &syn(1000).build());
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropNoRoute), 1);
}

#[test]
fn egress_outside_the_redirect_map_is_left_to_the_kernel() {
    let mut lab = PacketLab::new();
    lab.apply(vec![VipSpec {
        backends: vec![BackendSpec {
            address: OFF_MAP_BACKEND.into(),
            port: 8080,
            weight: 1,
        }],
        ..vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[])
    }]);
    let out = lab.run(Side::Client, &syn(1000).build());
    assert_eq!(action_name(out.action), "PASS");
    let p = parse(&out.packet);
    assert_eq!(
        (p.dst, p.dst_mac),
        (v4(OFF_MAP_BACKEND), LB_CLIENT_MAC),
        "MACs untouched for the stack"
    );
    assert_eq!(lab.count(Reason::PassNotTxPort), 1);
}

// ---------------------------------------------------------------- round robin

#[test]
fn rr_takes_backends_in_turn() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1, 1]);
    let order: Vec<u8> = (0..9)
        .map(|i| backend_index(&forwarded(&mut lab, &syn(1000 + i))))
        .collect();
    assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
}

#[test]
fn rr_interleaves_weights_smoothly() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[3, 1]);
    let order: Vec<u8> = (0..8)
        .map(|i| backend_index(&forwarded(&mut lab, &syn(1000 + i))))
        .collect();
    assert_eq!(order, [0, 0, 1, 0, 0, 0, 1, 0]);
}

#[test]
fn rr_shares_are_exact_over_whole_rings() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[5, 3, 2]);
    let mut counts = [0u32; 3];
    for i in 0..100 {
        counts[backend_index(&forwarded(&mut lab, &syn(2000 + i))) as usize] += 1;
    }
    assert_eq!(counts, [50, 30, 20]);
}

#[test]
fn rr_cursor_is_per_vip() {
    let mut lab = PacketLab::new();
    lab.apply(vec![
        vip_spec("a", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[1, 1]),
        VipSpec {
            backends: (2..4)
                .map(|i| BackendSpec {
                    address: backend_addr(i).into(),
                    port: 9000,
                    weight: 1,
                })
                .collect(),
            ..vip_spec("b", VIP, 443, Protocol::Tcp, Scheduler::Rr, &[])
        },
    ]);
    let a1 = backend_index(&forwarded(&mut lab, &syn(1)));
    let b1 = backend_index(&forwarded(
        &mut lab,
        &Frame::tcp(CLIENT, 2, VIP, 443, Tcp::Syn),
    ));
    let a2 = backend_index(&forwarded(&mut lab, &syn(3)));
    assert_eq!((a1, b1, a2), (0, 2, 1));
}

// ---------------------------------------------------------------- maglev

#[test]
fn maglev_matches_the_user_space_simulator() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1, 2, 1, 3]);
    let vip = foobar_lb::state::endpoint(VIP.into(), 80, Protocol::Tcp);
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..1000 {
        let client = Ipv4Addr::from(0xc612_0000 | rng.random::<u32>() & 0xffff);
        let port = rng.random_range(1024..=u16::MAX);
        let expected = lab
            .balancer
            .explain(&vip, client.into(), port)
            .unwrap()
            .expect("a backend");
        let p = forwarded(&mut lab, &Frame::tcp(client, port, VIP, 80, Tcp::Syn));
        assert_eq!(
            p.dst,
            Ipv4Addr::from(expected.addr[0].to_ne_bytes()),
            "{client}:{port}"
        );
    }
}

#[test]
fn maglev_gives_the_same_flow_the_same_backend_on_any_balancer() {
    let mut a = PacketLab::with_vip(Scheduler::Maglev, &[1, 1, 1, 1]);
    let mut b = PacketLab::with_vip(Scheduler::Maglev, &[1, 1, 1, 1]);
    for port in 3000..3200 {
        let first = forwarded(&mut a, &syn(port)).dst;
        assert_eq!(
            forwarded(&mut a, &syn(port)).dst,
            first,
            "same balancer, again"
        );
        assert_eq!(forwarded(&mut b, &syn(port)).dst, first, "another balancer");
    }
}

#[test]
fn maglev_removal_moves_only_the_removed_backends_new_flows() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1, 1, 1]);
    let before: Vec<u8> = (0..400)
        .map(|p| backend_index(&forwarded(&mut lab, &syn(5000 + p))))
        .collect();
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Maglev,
        &[1, 1, 1],
    )]);
    let mut moved_elsewhere = 0;
    for (p, &was) in (0..400).zip(&before) {
        let now = backend_index(&forwarded(&mut lab, &syn(5000 + p)));
        if was == 3 {
            assert_ne!(now, 3);
        } else if now != was {
            moved_elsewhere += 1;
        }
    }
    // Maglev is not perfectly minimal: allow the 1% the table bound allows.
    assert!(
        moved_elsewhere <= 4,
        "{moved_elsewhere} flows of surviving backends moved"
    );
}

// ---------------------------------------------------------------- flow table

#[test]
fn established_flow_hits_the_flow_table() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let first = forwarded(&mut lab, &syn(1000)).dst;
    for _ in 0..5 {
        assert_eq!(forwarded(&mut lab, &ack(1000)).dst, first);
    }
    // Hits are not counted in the kernel: they are packets minus new flows.
    assert_eq!(lab.count(Reason::FlowNew), 1);
    assert_eq!(lab.count(Reason::Redirect), 6);
}

#[test]
fn flows_stick_when_backends_are_added() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let pinned: Vec<IpAddr> = (0..20)
        .map(|p| forwarded(&mut lab, &syn(1000 + p)).dst)
        .collect();
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Rr,
        &[1, 1, 1, 1],
    )]);
    for (p, dst) in (0..20).zip(&pinned) {
        assert_eq!(forwarded(&mut lab, &ack(1000 + p)).dst, *dst);
    }
}

#[test]
fn maglev_flows_stick_when_the_table_changes() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1]);
    let pinned: Vec<IpAddr> = (0..50)
        .map(|p| forwarded(&mut lab, &syn(1000 + p)).dst)
        .collect();
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Maglev,
        &[1, 1, 1, 1, 1],
    )]);
    let mut table_moved = 0;
    for (p, dst) in (0..50).zip(&pinned) {
        assert_eq!(
            forwarded(&mut lab, &ack(1000 + p)).dst,
            *dst,
            "established flow kept"
        );
        table_moved += (forwarded(&mut lab, &syn(1000 + p)).dst != *dst) as u32;
    }
    assert!(
        table_moved > 0,
        "the new table moves some new flows (else this proves nothing)"
    );
}

#[test]
fn non_syn_without_flow_is_scheduled_and_counted() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1]);
    let p = forwarded(&mut lab, &ack(1234));
    assert!(backend_index(&p) < 2);
    assert_eq!(lab.count(Reason::FlowMissNonSyn), 1);
    assert_eq!(lab.count(Reason::FlowNew), 1);
    forwarded(&mut lab, &ack(1234));
    assert_eq!(
        lab.count(Reason::FlowNew),
        1,
        "the second packet hit the flow"
    );
}

#[test]
fn syn_reschedules_a_reused_tuple() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let first = forwarded(&mut lab, &syn(1000)).dst;
    assert_eq!(forwarded(&mut lab, &ack(1000)).dst, first, "established");
    let again = forwarded(&mut lab, &syn(1000)).dst;
    assert_ne!(first, again, "a new connection takes the next ring slot");
    assert_eq!(lab.count(Reason::FlowReused), 1);
    assert_eq!(
        forwarded(&mut lab, &ack(1000)).dst,
        again,
        "and the flow follows it"
    );
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_on_a_round_robin_vip() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1, 1]);
    let first = forwarded(&mut lab, &syn(1000)).dst;
    // Other connections move the cursor on meanwhile.
    forwarded(&mut lab, &syn(2000));
    for _ in 0..3 {
        assert_eq!(
            forwarded(&mut lab, &syn(1000)).dst,
            first,
            "the same SYN again"
        );
    }
    assert_eq!(lab.count(Reason::SynRetransmit), 3);
    assert_eq!(lab.count(Reason::FlowNew), 2);
    assert_eq!(forwarded(&mut lab, &ack(1000)).dst, first);
}

#[test]
fn a_round_robin_flow_the_table_lost_is_placed_by_its_hash_not_the_cursor() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1, 1]);
    // The same lost flow, seen after different numbers of other new flows, lands on
    // the same backend each time.
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..5u16 {
        for n in 0..round {
            forwarded(&mut lab, &syn(3000 + round * 10 + n));
        }
        let lost = forwarded(&mut lab, &ack(4000)).dst;
        seen.insert(lost);
        // Forget it again, as an eviction would.
        lab.balancer
            .dataplane()
            .remove_flow(&flow_key(4000))
            .unwrap();
    }
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(lab.count(Reason::FlowMissNonSyn), 5);
}

#[test]
fn rst_of_a_known_flow_reaches_its_backend() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let first = forwarded(&mut lab, &syn(1000)).dst;
    let rst = Frame::tcp(CLIENT, 1000, VIP, 80, Tcp::Rst);
    assert_eq!(forwarded(&mut lab, &rst).dst, first);
}

#[test]
fn flows_of_a_removed_backend_are_rescheduled_by_its_generation() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    forwarded(&mut lab, &syn(1000)); // backend 0
    let on_1 = forwarded(&mut lab, &syn(1001));
    assert_eq!(backend_index(&on_1), 1);
    let report = lab.balancer.apply(&foobar_lb::state::DesiredState {
        vips: vec![vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[1])],
        ..Default::default()
    });
    assert_eq!(report.unwrap().backends_removed, 1);
    // No flow entry was deleted: the slot's generation moved on, so its flow is
    // scheduled again on its next packet.
    assert_eq!(forwarded(&mut lab, &ack(1001)).dst, backend_addr(0));
    assert_eq!(lab.count(Reason::FlowBackendGone), 1);
    assert_eq!(forwarded(&mut lab, &ack(1000)).dst, backend_addr(0));
    assert_eq!(
        lab.count(Reason::FlowBackendGone),
        1,
        "backend 0's flow was never disturbed"
    );
}

#[test]
fn drained_backend_keeps_its_flows_and_gets_no_new_ones() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    forwarded(&mut lab, &syn(1000));
    assert_eq!(backend_index(&forwarded(&mut lab, &syn(1001))), 1);
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Rr,
        &[1, 0],
    )]);
    assert_eq!(
        backend_index(&forwarded(&mut lab, &ack(1001))),
        1,
        "existing flow kept"
    );
    for p in 0..10 {
        assert_eq!(
            backend_index(&forwarded(&mut lab, &syn(2000 + p))),
            0,
            "new flows avoid it"
        );
    }
}

#[test]
fn all_drained_drops_new_flows_but_keeps_old_ones() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1]);
    forwarded(&mut lab, &syn(1000));
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Maglev,
        &[0],
    )]);
    assert_eq!(forwarded(&mut lab, &ack(1000)).dst, backend_addr(0));
    untouched(
        &mut lab,
        Side::Client,
        &syn(1001).build(),
        DROP,
        Reason::DropNoBackend,
    );
}

#[test]
fn vip_without_backends_drops() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[]);
    untouched(
        &mut lab,
        Side::Client,
        &syn(1000).build(),
        DROP,
        Reason::DropNoBackend,
    );
}

#[test]
fn refused_change_leaves_the_data_plane_as_it_was() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let mut bad = vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[1, 1, 1]);
    bad.backends[2].weight = 10_000;
    let err = lab
        .balancer
        .apply(&foobar_lb::state::DesiredState {
            vips: vec![bad],
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("vips[0].backends[2].weight"),
        "{err}"
    );
    let order: Vec<u8> = (0..4)
        .map(|i| backend_index(&forwarded(&mut lab, &syn(1000 + i))))
        .collect();
    assert_eq!(order, [0, 1, 0, 1], "still the old two backends");
}

// ---------------------------------------------------------------- replies

#[test]
fn reply_source_is_rewritten_to_the_vip() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &syn(40_000));
    let out = lab.run(Side::Backend, &reply(0, CLIENT, 40_000).build());
    assert_eq!(action_name(out.action), "REDIRECT");
    let p = parse(&out.packet);
    assert_eq!((p.src, p.sport), (v4(VIP), 80));
    assert_eq!((p.dst, p.dport), (v4(CLIENT), 40_000));
    assert_eq!((p.src_mac, p.dst_mac), (LB_CLIENT_MAC, CLIENT_MAC));
    assert_eq!(lab.count(Reason::Reply), 1);
}

#[test]
fn a_backend_answering_the_balancer_itself_is_passed_untouched() {
    // A health check's answer: from the backend endpoint, to the balancer's own address.
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let frame = reply(0, Ipv4Addr::new(10, 1, 0, 1), 45_000).build();
    let out = lab.run(Side::Backend, &frame);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(out.packet, frame);
    assert_eq!(lab.count(Reason::PassLocal), 1);
    assert_eq!(lab.count(Reason::Reply), 0);
}

#[test]
fn reply_of_an_unseen_flow_is_rewritten_too() {
    // A balancer that just took over has an empty flow table.
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1]);
    let out = lab.run(Side::Backend, &reply(1, CLIENT, 50_000).build());
    assert_eq!(out.action, REDIRECT);
    assert_eq!(parse(&out.packet).src, VIP);
}

#[test]
fn reply_to_a_remote_client_goes_via_its_router() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let out = lab.run(Side::Backend, &reply(0, REMOTE_CLIENT, 1234).build());
    assert_eq!(out.action, REDIRECT);
    let p = parse(&out.packet);
    assert_eq!(
        (p.dst, p.dst_mac, p.src),
        (v4(REMOTE_CLIENT), CLIENT_MAC, v4(VIP))
    );
}

#[test]
fn udp_reply_is_rewritten_with_checksum() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Rr,
        &[1],
    )]);
    let r = Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::udp(backend_addr(0), BACKEND_PORT, CLIENT, 5353)
    };
    let out = lab.run(Side::Backend, &r.build());
    assert_eq!(out.action, REDIRECT);
    let p = parse(&out.packet);
    assert_eq!((p.src, p.sport), (v4(VIP), 53));
    assert_ne!(p.udp_checksum, Some(0));
}

#[test]
fn udp_reply_without_checksum_keeps_zero() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Rr,
        &[1],
    )]);
    let mut r = Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::udp(backend_addr(0), BACKEND_PORT, CLIENT, 5353)
    };
    r.l4 = L4::UdpNoChecksum;
    let out = lab.run(Side::Backend, &r.build());
    assert_eq!(parse(&out.packet).udp_checksum, Some(0));
}

#[test]
fn reply_from_a_removed_backend_passes() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    lab.apply(vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Rr,
        &[1],
    )]);
    untouched(
        &mut lab,
        Side::Backend,
        &reply(1, CLIENT, 1000).build(),
        PASS,
        Reason::PassNotVip,
    );
}

// ---------------------------------------------------------------- counters

#[test]
fn every_packet_ends_in_exactly_one_outcome() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let frames = [
        syn(1).build(),
        ack(1).build(),
        Frame::tcp(CLIENT, 1, Ipv4Addr::new(1, 1, 1, 1), 80, Tcp::Syn).build(),
        reply(0, CLIENT, 1).build(),
        syn(1).build()[..20].to_vec(),
    ];
    for f in &frames {
        lab.run(Side::Client, f);
    }
    assert_eq!(outcome_total(&mut lab), frames.len() as u64);
}

#[test]
fn vip_and_backend_traffic_counters_are_exact() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    let frame = syn(1000);
    let len = frame.build().len() as u64;
    forwarded(&mut lab, &frame);
    for _ in 0..3 {
        forwarded(&mut lab, &ack(1000));
    }
    lab.run(Side::Backend, &reply(0, CLIENT, 1000).build());
    let vip_id = lab.balancer.vips().next().unwrap().id;
    let dp = lab.balancer.dataplane();
    let vip = dp.vip_stats(vip_id).unwrap();
    assert_eq!((vip.packets, vip.new_flows, vip.reply_packets), (4, 1, 1));
    assert_eq!(vip.bytes, len + 3 * ack(1000).build().len() as u64);
    let b0 = dp.backend_stats(0).unwrap();
    let b1 = dp.backend_stats(1).unwrap();
    assert_eq!((b0.packets, b0.new_flows, b0.reply_packets), (4, 1, 1));
    assert_eq!(b1.packets, 0);
}

// ---------------------------------------------------------------- malformed input

/// A valid SYN to the VIP, to be damaged.
fn vip_syn() -> Vec<u8> {
    syn(1000).build()
}

fn dropped(frame: &[u8], reason: Reason) {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    untouched(&mut lab, Side::Client, frame, DROP, reason);
}

#[test]
fn truncated_vlan_tag_drops() {
    let mut f = vip_syn();
    f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    dropped(&f[..16], Reason::DropTruncatedEthernet);
}

#[test]
fn truncated_ipv4_header_drops_at_every_length() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let f = vip_syn();
    for cut in IP..IP + 20 {
        untouched(
            &mut lab,
            Side::Client,
            &f[..cut.max(14)],
            DROP,
            Reason::DropTruncatedIpv4,
        );
    }
}

#[test]
fn ihl_below_five_drops() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    for ihl in 0..5 {
        let mut f = vip_syn();
        f[IP] = 0x40 | ihl;
        untouched(&mut lab, Side::Client, &f, DROP, Reason::DropBadIhl);
    }
}

#[test]
fn ihl_beyond_the_frame_drops() {
    let mut f = vip_syn();
    f[IP] = 0x4f; // 60-byte header
    dropped(&f[..IP + 40], Reason::DropTruncatedIpv4);
}

#[test]
fn wrong_ip_version_drops() {
    let mut f = vip_syn();
    f[IP] = 0x65;
    dropped(&f, Reason::DropBadIpVersion);
}

#[test]
fn total_length_below_header_drops() {
    let mut f = vip_syn();
    f[IP + 2..IP + 4].copy_from_slice(&16u16.to_be_bytes());
    dropped(&f, Reason::DropBadTotalLength);
}

#[test]
fn total_length_beyond_frame_drops() {
    let mut f = vip_syn();
    let len = (f.len() - IP + 1) as u16;
    f[IP + 2..IP + 4].copy_from_slice(&len.to_be_bytes());
    dropped(&f, Reason::DropBadTotalLength);
}

#[test]
fn first_fragment_to_a_vip_drops() {
    let mut f = vip_syn();
    f[IP + 6] = 0x20; // MF, offset 0
    dropped(&f, Reason::DropFragment);
}

#[test]
fn later_fragment_to_a_vip_drops() {
    let mut f = vip_syn();
    f[IP + 6..IP + 8].copy_from_slice(&185u16.to_be_bytes()); // offset 1480, last
    dropped(&f, Reason::DropFragment);
}

#[test]
fn truncated_tcp_header_drops_at_every_length() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let f = Frame {
        payload: vec![],
        ..syn(1000)
    }
    .build();
    for l4_len in 0..20usize {
        let mut cut = f[..TCP + l4_len].to_vec();
        cut[IP + 2..IP + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        untouched(&mut lab, Side::Client, &cut, DROP, Reason::DropTruncatedL4);
    }
}

#[test]
fn tcp_data_offset_below_five_drops() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    for doff in 0..5u8 {
        let mut f = vip_syn();
        f[TCP + 12] = doff << 4;
        untouched(
            &mut lab,
            Side::Client,
            &f,
            DROP,
            Reason::DropBadTcpDataOffset,
        );
    }
}

#[test]
fn tcp_data_offset_beyond_packet_drops() {
    let mut f = Frame {
        payload: vec![],
        ..syn(1000)
    }
    .build();
    f[TCP + 12] = 0xf0; // 60-byte TCP header in a 20-byte segment
    dropped(&f, Reason::DropBadTcpDataOffset);
}

#[test]
fn truncated_udp_header_drops() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Rr,
        &[1],
    )]);
    let f = Frame {
        payload: vec![],
        ..Frame::udp(CLIENT, 1000, VIP, 53)
    }
    .build();
    for l4_len in 4..8usize {
        let mut cut = f[..TCP + l4_len].to_vec();
        cut[IP + 2..IP + 4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        untouched(&mut lab, Side::Client, &cut, DROP, Reason::DropTruncatedL4);
    }
}

#[test]
fn truncated_reply_drops() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let mut f = Frame {
        payload: vec![],
        ..reply(0, CLIENT, 1000)
    }
    .build();
    f.truncate(TCP + 10);
    f[IP + 2..IP + 4].copy_from_slice(&30u16.to_be_bytes());
    untouched(&mut lab, Side::Backend, &f, DROP, Reason::DropTruncatedL4);
}

#[test]
fn no_case_aborts() {
    // Every frame of the cases above, plus random cuts of valid frames: never ABORTED.
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1]);
    let valid = [vip_syn(), ack(7).build(), reply(0, CLIENT, 7).build()];
    for f in &valid {
        for cut in 14..=f.len() {
            let out = lab.run(Side::Client, &f[..cut]);
            assert_ne!(out.action, ABORTED, "cut at {cut}");
        }
    }
    assert!(
        lab.count(Reason::Redirect) > 0,
        "the uncut frames were forwarded"
    );
}

// ---------------------------------------------------------------- the fast path's rules

#[test]
fn unicast_for_another_mac_passes_untouched() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let frame = Frame {
        dst_mac: [0x02, 0x99, 0, 0, 0, 1],
        ..syn(1000)
    };
    untouched(
        &mut lab,
        Side::Client,
        &frame.build(),
        PASS,
        Reason::PassOtherMac,
    );
    assert_eq!(lab.count(Reason::FlowNew), 0);
}

#[test]
fn broadcast_and_multicast_pass_untouched() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    for dst_mac in [[0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 0x12]] {
        let frame = Frame {
            dst_mac,
            ..syn(1000)
        };
        untouched(
            &mut lab,
            Side::Client,
            &frame.build(),
            PASS,
            Reason::PassMulticast,
        );
    }
}

#[test]
fn an_interface_without_a_role_passes_everything() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    untouched(
        &mut lab,
        Side::Other,
        &syn(1000).build(),
        PASS,
        Reason::PassNotOurInterface,
    );
}

#[test]
fn a_backend_source_forged_on_the_client_side_is_dropped_not_translated() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let forged = Frame {
        src_mac: CLIENT_MAC,
        dst_mac: LB_CLIENT_MAC,
        ..reply(0, CLIENT, 1000)
    };
    untouched(
        &mut lab,
        Side::Client,
        &forged.build(),
        DROP,
        Reason::DropForgedReply,
    );
    assert_eq!(lab.count(Reason::Reply), 0);
}

#[test]
fn known_next_hops_need_no_fib_lookup() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let p = forwarded(&mut lab, &syn(1000));
    assert_eq!((p.dst_mac, p.src_mac), (backend_mac(0), LB_BACKEND_MAC));
    let out = lab.run(Side::Backend, &reply(0, CLIENT, 1000).build());
    assert_eq!(action_name(out.action), "REDIRECT");
    let p = parse(&out.packet);
    assert_eq!(
        (p.dst_mac, p.src_mac, p.src),
        (CLIENT_MAC, LB_CLIENT_MAC, v4(VIP))
    );
    // A client behind a router: the router's neighbour entry serves it.
    let out = lab.run(Side::Backend, &reply(0, REMOTE_CLIENT, 1000).build());
    assert_eq!(parse(&out.packet).dst_mac, CLIENT_MAC);
    assert_eq!(lab.count(Reason::NextHopFib), 0);
}

#[test]
fn a_neighbour_that_changes_its_mac_is_followed() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    let moved = [0x02, 0xbe, 0xee, 0, 0, 11];
    let mac: Vec<String> = moved.iter().map(|b| format!("{b:02x}")).collect();
    lab.ns.ip(&[
        "neigh",
        "replace",
        &backend_addr(0).to_string(),
        "lladdr",
        &mac.join(":"),
        "dev",
        "lbb",
        "nud",
        "permanent",
    ]);
    lab.reread_topology();
    assert_eq!(forwarded(&mut lab, &syn(1000)).dst_mac, moved);
    // Gone: the program asks the FIB (which finds no neighbour: the kernel resolves).
    lab.ns
        .ip(&["neigh", "del", &backend_addr(0).to_string(), "dev", "lbb"]);
    lab.reread_topology();
    let out = lab.run(Side::Client, &ack(1000).build());
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(lab.count(Reason::PassNoNeighbour), 1);
    assert_eq!(lab.count(Reason::NextHopFib), 1);
}

#[test]
fn a_packet_without_df_bigger_than_the_egress_mtu_goes_to_the_kernel_to_fragment() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    lab.ns.ip(&["link", "set", "lbb", "mtu", "1000"]);
    lab.reread_topology();
    let big = Frame {
        payload: vec![b'x'; 1200],
        dont_fragment: false,
        ..syn(1000)
    };
    let out = lab.run(Side::Client, &big.build());
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(lab.count(Reason::PassTooBig), 1);
    // Rewritten for its backend: the kernel fragments it.
    assert_eq!(parse(&out.packet).dst, v4(backend_addr(0)));
    let small = forwarded(&mut lab, &ack(1000));
    assert_eq!(small.dst, v4(backend_addr(0)));
}

#[test]
fn during_a_new_flow_flood_new_flows_are_placed_by_hash_and_not_inserted() {
    // UDP: the flood mode without cookies (TCP SYNs of NAT VIPs get cookies, see
    // below; DSR and full NAT VIPs do not).
    let mut lab = PacketLab::new();
    lab.apply(vec![
        vip_spec("m", VIP, 80, Protocol::Udp, Scheduler::Maglev, &[1, 1]),
        VipSpec {
            backends: vec![BackendSpec {
                address: backend_addr(5).into(),
                port: BACKEND_PORT,
                weight: 1,
            }],
            ..vip_spec("r", VIP, 81, Protocol::Udp, Scheduler::Rr, &[])
        },
    ]);
    lab.set_settings(foobar_lb_common::Settings {
        flood_threshold: 3,
        ..lab.balancer.environment().settings
    });
    let datagram = |sport, port| Frame::udp(CLIENT, sport, VIP, port);
    let maglev: Vec<IpAddr> = (0..10)
        .map(|p| forwarded(&mut lab, &datagram(2000 + p, 80)).dst)
        .collect();
    // Past the threshold, new flows are not remembered...
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 7);
    // ...yet every later packet of theirs reaches the same backend, by the hash.
    for (p, dst) in (0..10).zip(&maglev) {
        assert_eq!(forwarded(&mut lab, &datagram(2000 + p, 80)).dst, *dst);
    }
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 7 + 7);
    // Round robin too: placed by the hash over its ring, not remembered.
    let dst = forwarded(&mut lab, &datagram(3000, 81)).dst;
    assert_eq!(forwarded(&mut lab, &datagram(3000, 81)).dst, dst);
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 7 + 7 + 2);
}

#[test]
fn a_flow_closed_by_its_client_is_counted_once() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    forwarded(&mut lab, &syn(1000));
    forwarded(&mut lab, &ack(1000));
    forwarded(&mut lab, &Frame::tcp(CLIENT, 1000, VIP, 80, Tcp::Fin));
    forwarded(&mut lab, &Frame::tcp(CLIENT, 1000, VIP, 80, Tcp::Rst));
    let id = lab.balancer.vips().next().unwrap().id;
    let vip = lab.balancer.dataplane().vip_stats(id).unwrap();
    assert_eq!((vip.new_flows, vip.closed_flows), (1, 1));
}

#[test]
fn a_failed_apply_is_repaired_by_the_next() {
    let mut lab = PacketLab::with_vip(Scheduler::Maglev, &[1, 1]);
    let bigger = vec![vip_spec(
        "web",
        VIP,
        80,
        Protocol::Tcp,
        Scheduler::Maglev,
        &[1, 1, 1, 1],
    )];
    for writes in [0, 1, 2, 3, 4, 5, 6] {
        lab.balancer.inject_failure_after(writes);
        let desired = foobar_lb::state::DesiredState {
            vips: bigger.clone(),
            ..Default::default()
        };
        assert!(
            lab.balancer.apply(&desired).is_err(),
            "failure after {writes} writes"
        );
        // What the agent believes matches what the maps hold, write for write.
        let read = lab.balancer.dataplane().read_state().unwrap();
        assert_eq!(&read, lab.balancer.state(), "after {writes} writes");
        lab.apply(vec![vip_spec(
            "web",
            VIP,
            80,
            Protocol::Tcp,
            Scheduler::Maglev,
            &[1, 1],
        )]);
    }
    lab.apply(bigger);
    let read = lab.balancer.dataplane().read_state().unwrap();
    assert_eq!(&read, lab.balancer.state());
    let spread: std::collections::BTreeSet<IpAddr> = (0..40)
        .map(|p| forwarded(&mut lab, &syn(5000 + p)).dst)
        .collect();
    assert_eq!(spread.len(), 4, "all four backends serve after the repair");
}

#[test]
fn forty_vips_swapped_for_forty_others_fit_in_sixty_four_ids() {
    let mut lab = PacketLab::new();
    let vips = |first: u8| -> Vec<VipSpec> {
        (0..40)
            .map(|n| {
                vip_spec(
                    &format!("v{first}-{n}"),
                    Ipv4Addr::new(10, 0, first, n + 1),
                    80,
                    Protocol::Tcp,
                    Scheduler::Rr,
                    &[],
                )
            })
            .map(|mut v| {
                v.backends = vec![BackendSpec {
                    address: Ipv4Addr::new(10, 1, first, 1).into(),
                    port: 1000
                        + v.address
                            .to_string()
                            .rsplit('.')
                            .next()
                            .unwrap()
                            .parse::<u16>()
                            .unwrap(),
                    weight: 1,
                }];
                v
            })
            .collect()
    };
    lab.apply(vips(10));
    let report = lab
        .balancer
        .apply(&foobar_lb::state::DesiredState {
            vips: vips(20),
            ..Default::default()
        })
        .expect("the swap fits by removing first");
    assert_eq!((report.vips_added, report.vips_removed), (40, 40));
    let read = lab.balancer.dataplane().read_state().unwrap();
    assert_eq!(read.vips.len(), 40);
    assert!(read.vips.keys().all(|ep| ep.addr[0].to_ne_bytes()[2] == 20));
    assert_eq!(&read, lab.balancer.state());
}

// ---------------------------------------------------------------- edge protection

/// The one-VIP setup of [`PacketLab::with_vip`], with edge rules.
fn with_edge(
    scheduler: Scheduler,
    weights: &[u32],
    edit: impl FnOnce(&mut DesiredState),
) -> PacketLab {
    let mut lab = PacketLab::new();
    let mut state = DesiredState {
        vips: vec![vip_spec("web", VIP, 80, Protocol::Tcp, scheduler, weights)],
        ..Default::default()
    };
    edit(&mut state);
    lab.apply_state(state);
    lab
}

fn acl(allow: &[&str], deny: &[&str]) -> Acl {
    Acl {
        allow: allow.iter().map(|s| s.parse().unwrap()).collect(),
        deny: deny.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// Expects `frame` from the client side refused (dropped), unchanged, under `reason`.
fn refused(lab: &mut PacketLab, frame: &Frame, reason: Reason) {
    untouched(lab, Side::Client, &frame.build(), DROP, reason);
}

#[test]
fn a_vip_address_is_closed_to_what_is_for_none_of_its_vips() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1]);
    refused(
        &mut lab,
        &Frame::tcp(CLIENT, 1000, VIP, 443, Tcp::Syn),
        Reason::DropClosedAddress,
    );
    refused(
        &mut lab,
        &Frame::udp(CLIENT, 1000, VIP, 80),
        Reason::DropClosedAddress,
    );
    let mut gre = syn(1000).build();
    gre[IP + 9] = 47;
    untouched(
        &mut lab,
        Side::Client,
        &gre,
        DROP,
        Reason::DropClosedAddress,
    );
    // ICMP that is neither an echo nor an error about a flow passes (echoes are
    // answered, see the ICMP cases), and so does anything for another address.
    let other = Frame::tcp(CLIENT, 1000, Ipv4Addr::new(10, 0, 0, 1), 443, Tcp::Syn).build();
    untouched(&mut lab, Side::Client, &other, PASS, Reason::PassNotVip);
}

#[test]
fn an_open_vip_address_passes_what_is_for_none_of_its_vips() {
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.edge.open_addresses = vec![VIP.into()];
    });
    let frame = Frame::tcp(CLIENT, 1000, VIP, 443, Tcp::Syn).build();
    untouched(&mut lab, Side::Client, &frame, PASS, Reason::PassNotVip);
    let mut gre = syn(1000).build();
    gre[IP + 9] = 47;
    untouched(&mut lab, Side::Client, &gre, PASS, Reason::PassNotTcpUdp);
    let udp = Frame::udp(CLIENT, 1000, VIP, 80).build();
    untouched(&mut lab, Side::Client, &udp, PASS, Reason::PassNotVip);
}

#[test]
fn a_global_deny_drops_a_source_and_counts_the_rule() {
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.edge.acl = acl(&[], &["10.0.0.0/24"]);
    });
    refused(&mut lab, &syn(1000), Reason::DropAcl);
    assert_eq!(lab.count(Reason::FlowNew), 0, "no flow for a denied source");
    let rules = lab.balancer.dataplane().acls().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        lab.balancer.dataplane().acl_stats(rules[0].1.id).unwrap(),
        1
    );
    // Another source is not matched.
    let other = Frame::tcp(Ipv4Addr::new(10, 0, 1, 9), 1000, VIP, 80, Tcp::Syn);
    forwarded(&mut lab, &other);
}

#[test]
fn an_allow_list_keeps_out_whoever_it_does_not_name() {
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.vips[0].acl = acl(&[&format!("{CLIENT}/32")], &[]);
    });
    forwarded(&mut lab, &syn(1000));
    let stranger = Frame::tcp(Ipv4Addr::new(10, 0, 0, 3), 1000, VIP, 80, Tcp::Syn);
    refused(&mut lab, &stranger, Reason::DropAcl);
}

#[test]
fn the_longest_matching_prefix_decides() {
    // A deny inside an allow.
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.vips[0].acl = acl(&["10.0.0.0/8"], &["10.0.0.0/24"]);
    });
    refused(&mut lab, &syn(1000), Reason::DropAcl);
    forwarded(
        &mut lab,
        &Frame::tcp(Ipv4Addr::new(10, 9, 0, 1), 1000, VIP, 80, Tcp::Syn),
    );
    // An allow inside a deny.
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.vips[0].acl = acl(&[&format!("{CLIENT}/32")], &["10.0.0.0/8"]);
    });
    forwarded(&mut lab, &syn(1000));
    refused(
        &mut lab,
        &Frame::tcp(Ipv4Addr::new(10, 0, 0, 3), 1000, VIP, 80, Tcp::Syn),
        Reason::DropAcl,
    );
}

#[test]
fn the_global_list_and_the_vips_must_both_let_a_source_in() {
    let mut lab = with_edge(Scheduler::Rr, &[1], |s| {
        s.edge.acl = acl(&[], &[&format!("{CLIENT}/32")]);
        s.vips[0].acl = acl(&["10.0.0.0/8"], &[]);
    });
    refused(&mut lab, &syn(1000), Reason::DropAcl);
    forwarded(
        &mut lab,
        &Frame::tcp(Ipv4Addr::new(10, 0, 0, 3), 1000, VIP, 80, Tcp::Syn),
    );
}

#[test]
fn rules_of_one_family_never_match_the_other() {
    // A deny of every IPv4 source leaves IPv6 alone, and the other way round.
    let mut lab = PacketLab::new();
    let mut state = DesiredState {
        vips: vec![
            mode_vip(
                Family::V4,
                Default::default(),
                80,
                Protocol::Tcp,
                Scheduler::Rr,
                &[1],
            ),
            mode_vip(
                Family::V6,
                Default::default(),
                80,
                Protocol::Tcp,
                Scheduler::Rr,
                &[1],
            ),
        ],
        ..Default::default()
    };
    state.edge.acl = acl(&[], &["0.0.0.0/0"]);
    lab.apply_state(state.clone());
    let v6 = Frame::tcp(Family::V6.client(), 1000, Family::V6.vip(), 80, Tcp::Syn);
    assert_eq!(
        action_name(lab.run(Side::Client, &v6.build()).action),
        "REDIRECT"
    );
    refused(&mut lab, &syn(1000), Reason::DropAcl);
    state.edge.acl = acl(&[], &["::/0"]);
    lab.apply_state(state);
    assert_eq!(
        action_name(lab.run(Side::Client, &syn(2000).build()).action),
        "REDIRECT"
    );
    refused(
        &mut lab,
        &Frame::tcp(Family::V6.client(), 2000, Family::V6.vip(), 80, Tcp::Syn),
        Reason::DropAcl,
    );
}

#[test]
fn a_changed_list_cuts_an_established_flow_and_keeps_rule_counters() {
    let mut state = DesiredState {
        vips: vec![vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[1])],
        ..Default::default()
    };
    state.edge.acl = acl(&[], &["192.0.2.0/24"]);
    let mut lab = PacketLab::new();
    lab.apply_state(state.clone());
    forwarded(&mut lab, &syn(1000));
    forwarded(&mut lab, &ack(1000));
    let kept = lab.balancer.dataplane().acls().unwrap()[0].1;
    state.edge.acl = acl(&[], &["192.0.2.0/24", &format!("{CLIENT}/32")]);
    lab.apply_state(state.clone());
    refused(&mut lab, &ack(1000), Reason::DropAcl);
    let rules = lab.balancer.dataplane().acls().unwrap();
    assert_eq!(rules.len(), 2);
    assert!(
        rules.iter().any(|r| r.1 == kept),
        "an unchanged rule keeps its id"
    );
    state.edge.acl = Acl::default();
    lab.apply_state(state);
    assert!(lab.balancer.dataplane().acls().unwrap().is_empty());
    forwarded(&mut lab, &ack(1000));
}

#[test]
fn a_source_over_its_new_flow_limit_is_dropped_and_established_flows_are_not() {
    let mut lab = with_edge(Scheduler::Rr, &[1, 1], |s| {
        s.vips[0].new_flow_limit = Some(NewFlowLimit {
            rate: 1,
            burst: Some(2),
            prefix_v4: 24,
            prefix_v6: 64,
        });
    });
    forwarded(&mut lab, &syn(1000));
    forwarded(&mut lab, &syn(1001));
    refused(&mut lab, &syn(1002), Reason::DropSourceLimit);
    // The same /24 is the same source; another /24 is not.
    refused(
        &mut lab,
        &Frame::tcp(Ipv4Addr::new(10, 0, 0, 3), 1000, VIP, 80, Tcp::Syn),
        Reason::DropSourceLimit,
    );
    forwarded(
        &mut lab,
        &Frame::tcp(Ipv4Addr::new(10, 0, 1, 3), 1000, VIP, 80, Tcp::Syn),
    );
    // Packets of flows it opened, and their retransmitted SYNs, pass.
    forwarded(&mut lab, &ack(1000));
    forwarded(&mut lab, &syn(1001));
}

#[test]
fn a_flood_places_round_robin_flows_by_hash_without_remembering_them() {
    let mut lab = PacketLab::new();
    lab.apply(vec![vip_spec(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        Scheduler::Rr,
        &[1, 1, 1],
    )]);
    lab.set_settings(foobar_lb_common::Settings {
        flood_threshold: 10,
        ..lab.balancer.environment().settings
    });
    let datagram = |sport| Frame::udp(CLIENT, sport, VIP, 53);
    for port in 0..10 {
        forwarded(&mut lab, &datagram(3000 + port));
    }
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 0);
    // Over the threshold: placed by the hash, the same for every packet of a flow,
    // which the table never holds.
    let first = forwarded(&mut lab, &datagram(1000)).dst;
    for _ in 0..3 {
        assert_eq!(forwarded(&mut lab, &datagram(1000)).dst, first);
    }
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 4, "not remembered");
}

// ---------------------------------------------------------------- SYN cookies

/// A TCP field (host order) of an untagged IPv4 frame.
fn tcp_u32(frame: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(frame[TCP + at..TCP + at + 4].try_into().unwrap())
}

/// Sets a TCP field of an untagged IPv4 frame, its checksum kept right.
fn set_tcp_u32(frame: &mut [u8], at: usize, value: u32) {
    use foobar_lb_common::checksum::replace4;
    let old = u32::from_ne_bytes(frame[TCP + at..TCP + at + 4].try_into().unwrap());
    frame[TCP + at..TCP + at + 4].copy_from_slice(&value.to_be_bytes());
    let new = u32::from_ne_bytes(value.to_be_bytes());
    let check = u16::from_ne_bytes([frame[TCP + 16], frame[TCP + 17]]);
    frame[TCP + 16..TCP + 18].copy_from_slice(&replace4(check, old, new).to_ne_bytes());
}

const SEQ: usize = 4;
const ACK_NO: usize = 8;

#[test]
fn during_a_flood_syns_get_cookies_and_only_a_proven_ack_opens_a_flow() {
    let mut lab = PacketLab::with_vip(Scheduler::Rr, &[1, 1]);
    lab.set_settings(foobar_lb_common::Settings {
        flood_threshold: 1,
        ..lab.balancer.environment().settings
    });
    forwarded(&mut lab, &syn(900));
    // Over the threshold: the balancer answers, remembering nothing.
    let out = lab.run(Side::Client, &syn(1000).build());
    assert_eq!(action_name(out.action), "TX");
    assert_eq!(lab.count(Reason::SynCookie), 1);
    let answer = parse(&out.packet);
    assert_eq!((answer.src, answer.dst), (v4(VIP), v4(CLIENT)));
    assert_eq!((answer.sport, answer.dport), (80, 1000));
    assert_eq!(out.packet[TCP + 13], 0x12, "SYN+ACK");
    assert_eq!(tcp_u32(&out.packet, ACK_NO), 1001, "the client's ISN + 1");
    assert_eq!(&out.packet[TCP + 14..TCP + 16], &[0, 0], "a zero window");
    assert_eq!(
        &out.packet[TCP + 20..TCP + 24],
        &[2, 4, 0x05, 0xb4],
        "MSS 1460"
    );
    assert_eq!(out.packet.len(), TCP + 24);
    let cookie = tcp_u32(&out.packet, SEQ);
    assert_eq!(
        lab.balancer.dataplane().flow(&flow_key(1000)).unwrap(),
        None
    );

    // A wrong acknowledgement proves nothing: no flow, placed by its hash.
    let mut wrong = ack(1000).build();
    set_tcp_u32(&mut wrong, SEQ, 1001);
    set_tcp_u32(&mut wrong, ACK_NO, cookie ^ 0x5a5a_5a5a);
    let out = lab.run(Side::Client, &wrong);
    assert_eq!(action_name(out.action), "REDIRECT");
    assert_eq!(lab.count(Reason::SynCookieValid), 0);
    assert_eq!(
        lab.balancer.dataplane().flow(&flow_key(1000)).unwrap(),
        None
    );

    // The right one opens the flow, and becomes the backend's SYN.
    let mut proof = ack(1000).build();
    set_tcp_u32(&mut proof, SEQ, 1001);
    set_tcp_u32(&mut proof, ACK_NO, cookie.wrapping_add(1));
    let out = lab.run(Side::Client, &proof);
    assert_eq!(action_name(out.action), "REDIRECT");
    assert_eq!(lab.count(Reason::SynCookieValid), 1);
    let to_backend = parse(&out.packet);
    let backend = backend_index(&to_backend);
    assert_eq!(out.packet[TCP + 13], 0x02, "a SYN");
    assert_eq!(tcp_u32(&out.packet, SEQ), 1000, "the client's ISN");
    assert_eq!(&out.packet[TCP + 20..TCP + 24], &[2, 4, 0x05, 0xb4]);
    assert!(
        lab.balancer
            .dataplane()
            .flow(&flow_key(1000))
            .unwrap()
            .is_some()
    );

    // Until the backend answers, the client's packets wait; the proof again (the
    // backend's SYN may have been lost) sends the SYN again.
    let mut early = ack(1000).build();
    set_tcp_u32(&mut early, ACK_NO, cookie ^ 0x5a5a_5a5a);
    let out = lab.run(Side::Client, &early);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropSynProxyPending), 1);
    let out = lab.run(Side::Client, &proof);
    assert_eq!(action_name(out.action), "REDIRECT");
    assert_eq!(out.packet[TCP + 13], 0x02, "the SYN again");
    assert_eq!(tcp_u32(&out.packet, SEQ), 1000);

    // The backend's SYN-ACK becomes the ACK that opens the client's window.
    let backend_isn = 7_000_000u32;
    let mut syn_ack = reply(backend, CLIENT, 1000).build();
    set_tcp_u32(&mut syn_ack, SEQ, backend_isn);
    set_tcp_u32(&mut syn_ack, ACK_NO, 1001);
    let out = lab.run(Side::Backend, &syn_ack);
    assert_eq!(action_name(out.action), "REDIRECT", "to the client");
    let to_client = parse(&out.packet);
    assert_eq!((to_client.src, to_client.sport), (v4(VIP), 80));
    assert_eq!(out.packet[TCP + 13], 0x10, "an ACK");
    assert_eq!(tcp_u32(&out.packet, SEQ), cookie.wrapping_add(1));
    assert_eq!(tcp_u32(&out.packet, ACK_NO), 1001);

    // From then on the sequence numbers are shifted, both ways.
    let mut data = ack(1000).build();
    set_tcp_u32(&mut data, SEQ, 1001);
    set_tcp_u32(&mut data, ACK_NO, cookie.wrapping_add(1 + 500));
    let out = lab.run(Side::Client, &data);
    assert_eq!(action_name(out.action), "REDIRECT");
    parse(&out.packet);
    assert_eq!(tcp_u32(&out.packet, ACK_NO), backend_isn + 1 + 500);
    let mut answer = reply(backend, CLIENT, 1000).build();
    answer[TCP + 13] = 0x10;
    let fix = u16::from_ne_bytes([answer[TCP + 16], answer[TCP + 17]]);
    let fixed = foobar_lb_common::checksum::replace2(
        fix,
        u16::from_ne_bytes([answer[TCP + 12], 0x12]),
        u16::from_ne_bytes([answer[TCP + 12], 0x10]),
    );
    answer[TCP + 16..TCP + 18].copy_from_slice(&fixed.to_ne_bytes());
    set_tcp_u32(&mut answer, SEQ, backend_isn + 1);
    let out = lab.run(Side::Backend, &answer);
    parse(&out.packet);
    assert_eq!(tcp_u32(&out.packet, SEQ), cookie.wrapping_add(1));

    // A client whose ACK was lost sends zero-window probes (one sequence number
    // back): a probe proves the cookie as well, and tells its ISN right.
    let out = lab.run(Side::Client, &syn(1100).build());
    assert_eq!(action_name(out.action), "TX");
    let other_cookie = tcp_u32(&out.packet, SEQ);
    let mut probe = ack(1100).build();
    set_tcp_u32(&mut probe, SEQ, 1000);
    set_tcp_u32(&mut probe, ACK_NO, other_cookie.wrapping_add(1));
    let out = lab.run(Side::Client, &probe);
    assert_eq!(action_name(out.action), "REDIRECT");
    assert_eq!(out.packet[TCP + 13], 0x02, "a SYN");
    assert_eq!(tcp_u32(&out.packet, SEQ), 1000, "the client's ISN");

    // The backend's SYN-ACK sent again (it never got the client's ACK): answered.
    let out = lab.run(Side::Backend, &syn_ack);
    assert_eq!(action_name(out.action), "TX");
    assert_eq!(lab.count(Reason::SynProxyAck), 1);
    let ack_back = parse(&out.packet);
    assert_eq!((ack_back.src, ack_back.sport), (v4(CLIENT), 1000));
    assert_eq!(ack_back.dst, v4(backend_addr(backend)));
    assert_eq!(out.packet[TCP + 13], 0x10);
    assert_eq!(tcp_u32(&out.packet, SEQ), 1001);
    assert_eq!(tcp_u32(&out.packet, ACK_NO), backend_isn + 1);
}
