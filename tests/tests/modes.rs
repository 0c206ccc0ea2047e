//! Packet cases of every forwarding mode (NAT, full NAT, DSR in IPIP and in GUE) in
//! both families, through BPF_PROG_TEST_RUN: the same cases for each pair, each with
//! its expected output frame read back by etherparse, outer and inner headers and
//! every checksum (`tests::packet::parse` verifies them).

use std::net::IpAddr;

use foobar_lb::state::{Forwarding, Protocol, Scheduler};
use foobar_lb_common::Reason;
use ipnet::IpNet;
use tests::{
    packet::{Frame, IcmpError, Parsed, Tcp, parse},
    packet_lab::*,
};

/// A balancer with two VIPs of `mode` in `family`: TCP :80 by round robin over one
/// backend, UDP :53 by Maglev over one.
fn setup(family: Family, mode: Forwarding) -> PacketLab {
    let mut lab = PacketLab::new();
    lab.apply(vec![
        mode_vip(family, mode, 80, Protocol::Tcp, Scheduler::Rr, &[1]),
        mode_vip(family, mode, 53, Protocol::Udp, Scheduler::Maglev, &[1]),
    ]);
    lab
}

fn syn(family: Family, sport: u16) -> Frame {
    Frame::tcp(family.client(), sport, family.vip(), 80, Tcp::Syn)
}

fn ack(family: Family, sport: u16) -> Frame {
    Frame::tcp(family.client(), sport, family.vip(), 80, Tcp::Ack)
}

/// The port a backend sees the VIP's traffic on.
fn backend_port(mode: Forwarding, vip_port: u16) -> u16 {
    if mode.is_dsr() {
        vip_port
    } else {
        BACKEND_PORT
    }
}

/// Runs `frame` from the client side and expects it sent to backend 0 in `mode`,
/// checking every header; returns the output.
fn to_backend(lab: &mut PacketLab, family: Family, mode: Forwarding, frame: &Frame) -> Parsed {
    let out = lab.run(Side::Client, &frame.build());
    assert_eq!(action_name(out.action), "REDIRECT", "{mode:?} {frame:?}");
    let p = parse(&out.packet);
    assert_eq!((p.dst_mac, p.src_mac), (backend_mac(0), LB_BACKEND_MAC));
    assert_eq!(p.payload, frame.payload, "payload");
    let backend = family.backend(0);
    match mode {
        Forwarding::Nat => {
            assert!(p.outer.is_none());
            assert_eq!((p.src, p.sport), (frame.src, frame.sport), "source kept");
            assert_eq!((p.dst, p.dport), (backend, backend_port(mode, frame.dport)));
        }
        Forwarding::Fullnat => {
            assert!(p.outer.is_none());
            assert_eq!(p.src, family.lb_backend_side(), "the balancer's address");
            assert!((10_000..=32_767).contains(&p.sport), "port {}", p.sport);
            assert_eq!((p.dst, p.dport), (backend, backend_port(mode, frame.dport)));
        }
        Forwarding::DsrIpip | Forwarding::DsrGue => {
            let outer = p.outer.clone().expect("encapsulated");
            assert_eq!(outer.dst, backend);
            assert_eq!(outer.ttl, 64);
            // The inner packet is the client's, untouched.
            assert_eq!(
                (p.src, p.sport, p.dst, p.dport),
                (frame.src, frame.sport, frame.dst, frame.dport)
            );
            assert_eq!(p.ttl, frame.ttl);
            if mode == Forwarding::DsrIpip {
                let prefix: IpNet = match family {
                    Family::V4 => "172.16.0.0/16".parse().unwrap(),
                    Family::V6 => "100::/64".parse().unwrap(),
                };
                assert!(prefix.contains(&outer.src), "outer source {}", outer.src);
                let proto = if family == Family::V4 { 4 } else { 41 };
                assert_eq!((outer.proto, outer.udp), (proto, None));
            } else {
                assert_eq!(outer.src, family.lb_backend_side());
                assert_eq!(outer.proto, 17);
                let (sport, dport, check) = outer.udp.expect("GUE's UDP header");
                assert!(sport >= 32_768, "GUE source port {sport}");
                assert_eq!((dport, check), (6080, 0), "GUE port, no UDP checksum");
            }
            if family == Family::V4 {
                assert!(
                    outer.dont_fragment,
                    "a fragmented outer packet could not be decapsulated"
                );
            }
        }
    }
    p
}

/// The reply backend 0 sends to what it received (`seen`, a forwarded packet).
fn backend_reply(family: Family, seen: &Parsed) -> Frame {
    Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::tcp(
            family.backend(0),
            seen.dport,
            seen.src,
            seen.sport,
            Tcp::SynAck,
        )
    }
}

/// What the client receives of a reply, checked: from the VIP, to it.
fn check_to_client(family: Family, p: &Parsed, client_port: u16, vip_port: u16) {
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_CLIENT_MAC));
    assert_eq!((p.src, p.sport), (family.vip(), vip_port), "from the VIP");
    assert_eq!(
        (p.dst, p.dport),
        (family.client(), client_port),
        "to the client"
    );
}

fn established_flow_is_kept(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let first = to_backend(&mut lab, family, mode, &syn(family, 40_000));
    let second = to_backend(&mut lab, family, mode, &ack(family, 40_000));
    assert_eq!(
        (first.src, first.sport),
        (second.src, second.sport),
        "same source"
    );
    assert_eq!(lab.count(Reason::FlowNew), 1);
    let event = match mode {
        Forwarding::Nat => None,
        Forwarding::Fullnat => Some(Reason::FullNat),
        Forwarding::DsrIpip => Some(Reason::EncapIpip),
        Forwarding::DsrGue => Some(Reason::EncapGue),
    };
    if let Some(event) = event {
        assert_eq!(lab.count(event), 2, "{event:?}");
    }
}

fn flows_get_distinct_sources(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let sources: std::collections::BTreeSet<(IpAddr, u16)> = (0..50)
        .map(|i| {
            let p = to_backend(&mut lab, family, mode, &syn(family, 41_000 + i));
            match &p.outer {
                Some(outer) => (outer.src, outer.udp.map_or(0, |u| u.0)),
                None => (p.src, p.sport),
            }
        })
        .collect();
    match mode {
        // NAT keeps the client's; full NAT allocates one per flow.
        Forwarding::Nat | Forwarding::Fullnat => assert_eq!(sources.len(), 50),
        // DSR spreads flows over outer sources (IPIP) or source ports (GUE).
        _ => assert!(sources.len() > 40, "{} distinct", sources.len()),
    }
}

fn udp_is_forwarded(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let frame = Frame::udp(family.client(), 5353, family.vip(), 53);
    let p = to_backend(&mut lab, family, mode, &frame);
    assert!(p.udp_checksum.is_some());
    let again = to_backend(&mut lab, family, mode, &frame);
    assert_eq!(p.sport, again.sport);
}

fn vlan_tag_is_kept(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let frame = Frame {
        vlan: Some(7),
        ..syn(family, 40_000)
    };
    let p = to_backend(&mut lab, family, mode, &frame);
    assert_eq!(p.vlan, Some(7));
}

fn replies_come_back_from_the_vip(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let seen = to_backend(&mut lab, family, mode, &syn(family, 40_000));
    let reply = backend_reply(family, &seen).build();
    let out = lab.run(Side::Backend, &reply);
    if mode.is_dsr() {
        // A DSR backend answers from the VIP itself: nothing for the balancer.
        assert_eq!(action_name(out.action), "PASS");
        assert_eq!(out.packet, reply);
        return;
    }
    assert_eq!(action_name(out.action), "REDIRECT");
    check_to_client(family, &parse(&out.packet), 40_000, 80);
    assert_eq!(lab.count(Reason::Reply), 1);
}

fn too_big_is_answered_with_icmp(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let mtu: u16 = if family == Family::V4 && !mode.is_dsr() {
        1000
    } else {
        1400
    };
    lab.ns.ip(&["link", "set", "lbb", "mtu", &mtu.to_string()]);
    lab.reread_topology();
    let overhead = match mode {
        Forwarding::DsrIpip => family.header_len() as u16,
        Forwarding::DsrGue => family.header_len() as u16 + 8,
        _ => 0,
    };
    // A full-size segment that fits the path before the balancer adds its header.
    let big = syn(family, 40_000).sized(mtu as usize - overhead as usize + 10);
    let out = lab.run(Side::Client, &big.build());
    assert_eq!(action_name(out.action), "TX", "back out the way it came");
    let p = parse(&out.packet);
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_CLIENT_MAC));
    assert_eq!((p.src, p.dst), (family.vip(), family.client()));
    let icmp = p.icmp.expect("ICMP");
    let (kind, code) = if family == Family::V4 { (3, 4) } else { (2, 0) };
    assert_eq!((icmp.kind, icmp.code), (kind, code));
    assert_eq!(icmp.mtu(), u32::from(mtu - overhead), "the MTU that fits");
    let quoted = icmp.quoted.expect("the packet quoted");
    assert_eq!(
        (quoted.src, quoted.sport, quoted.dst, quoted.dport),
        (family.client(), 40_000, family.vip(), 80),
        "quoted as the client sent it"
    );
    assert_eq!(lab.count(Reason::IcmpTooBig), 1);
    // What fits still goes through.
    to_backend(&mut lab, family, mode, &syn(family, 40_001));
}

fn icmp_from_the_client_side_reaches_the_backend(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let seen = to_backend(&mut lab, family, mode, &syn(family, 40_000));
    // The reply as it left toward the client, and a router's "too big" about it.
    let reply = Frame::tcp(family.vip(), 80, family.client(), 40_000, Tcp::Ack).sized(1400);
    let error = Frame::icmp_error(
        family.remote_client(),
        family.vip(),
        IcmpError::TooBig(1300),
        &reply,
        64,
    );
    let out = lab.run(Side::Client, &error.build());
    assert_eq!(action_name(out.action), "REDIRECT");
    let p = parse(&out.packet);
    assert_eq!(p.dst_mac, backend_mac(0));
    let icmp = p.icmp.clone().expect("ICMP");
    let quoted = icmp.quoted.clone().expect("quoted");
    match mode {
        Forwarding::Nat | Forwarding::Fullnat => {
            assert!(p.outer.is_none());
            assert_eq!((p.src, p.dst), (family.remote_client(), family.backend(0)));
            // Quoted as the backend sent it.
            assert_eq!(
                (quoted.src, quoted.sport, quoted.dst, quoted.dport),
                (seen.dst, seen.dport, seen.src, seen.sport)
            );
        }
        _ => {
            // Encapsulated as the flow's packets are, untouched inside.
            assert_eq!(p.outer.expect("encapsulated").dst, family.backend(0));
            assert_eq!((p.src, p.dst), (family.remote_client(), family.vip()));
            assert_eq!(
                (quoted.src, quoted.sport, quoted.dst, quoted.dport),
                (family.vip(), 80, family.client(), 40_000)
            );
        }
    }
    assert_eq!(icmp.mtu(), 1300);
    assert_eq!(lab.count(Reason::IcmpToBackend), 1);
}

fn icmp_from_the_backend_side_reaches_the_client(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let frame = Frame::udp(family.client(), 5353, family.vip(), 53);
    let seen = to_backend(&mut lab, family, mode, &frame);
    if mode.is_dsr() {
        // A DSR backend's errors go to the client directly: an echo to the VIP
        // is this mode's ICMP case, answered by the balancer itself.
        return echo_to_the_vip_is_answered(family, mode);
    }
    // The backend's "port unreachable" about the datagram it received.
    let received = Frame::udp(seen.src, seen.sport, seen.dst, seen.dport);
    let error = Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::icmp_error(
            family.backend(0),
            seen.src,
            IcmpError::PortUnreachable,
            &received,
            200,
        )
    };
    let out = lab.run(Side::Backend, &error.build());
    assert_eq!(action_name(out.action), "REDIRECT");
    let p = parse(&out.packet);
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_CLIENT_MAC));
    assert_eq!(
        (p.src, p.dst),
        (family.vip(), family.client()),
        "from the VIP"
    );
    let quoted = p.icmp.expect("ICMP").quoted.expect("quoted");
    assert_eq!(
        (quoted.src, quoted.sport, quoted.dst, quoted.dport),
        (family.client(), 5353, family.vip(), 53),
        "quoted as the client sent it"
    );
    assert_eq!(lab.count(Reason::IcmpToClient), 1);
}

fn echo_to_the_vip_is_answered(family: Family, mode: Forwarding) {
    let mut lab = setup(family, mode);
    let echo = Frame::echo(family.client(), family.vip());
    let out = lab.run(Side::Client, &echo.build());
    assert_eq!(action_name(out.action), "TX");
    let p = parse(&out.packet);
    assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_CLIENT_MAC));
    assert_eq!((p.src, p.dst), (family.vip(), family.client()));
    let icmp = p.icmp.expect("ICMP");
    assert_eq!(icmp.kind, if family == Family::V4 { 0 } else { 129 });
    assert_eq!(p.payload, echo.payload);
    assert_eq!(lab.count(Reason::IcmpEchoReply), 1);
}

macro_rules! cases {
    ($($module:ident: $family:expr, $mode:expr;)+) => {$(
        mod $module {
            use super::*;

            #[test]
            fn established_flow_is_kept() {
                super::established_flow_is_kept($family, $mode);
            }
            #[test]
            fn flows_get_distinct_sources() {
                super::flows_get_distinct_sources($family, $mode);
            }
            #[test]
            fn udp_is_forwarded() {
                super::udp_is_forwarded($family, $mode);
            }
            #[test]
            fn vlan_tag_is_kept() {
                super::vlan_tag_is_kept($family, $mode);
            }
            #[test]
            fn replies_come_back_from_the_vip() {
                super::replies_come_back_from_the_vip($family, $mode);
            }
            #[test]
            fn too_big_is_answered_with_icmp() {
                super::too_big_is_answered_with_icmp($family, $mode);
            }
            #[test]
            fn icmp_from_the_client_side_reaches_the_backend() {
                super::icmp_from_the_client_side_reaches_the_backend($family, $mode);
            }
            #[test]
            fn icmp_from_the_backend_side_reaches_the_client() {
                super::icmp_from_the_backend_side_reaches_the_client($family, $mode);
            }
            #[test]
            fn echo_to_the_vip_is_answered() {
                super::echo_to_the_vip_is_answered($family, $mode);
            }
        }
    )+};
}

cases! {
    nat_v4: Family::V4, Forwarding::Nat;
    nat_v6: Family::V6, Forwarding::Nat;
    fullnat_v4: Family::V4, Forwarding::Fullnat;
    fullnat_v6: Family::V6, Forwarding::Fullnat;
    dsr_ipip_v4: Family::V4, Forwarding::DsrIpip;
    dsr_ipip_v6: Family::V6, Forwarding::DsrIpip;
    dsr_gue_v4: Family::V4, Forwarding::DsrGue;
    dsr_gue_v6: Family::V6, Forwarding::DsrGue;
}

// ---------------------------------------------------------------- IPv6 headers

#[test]
fn ipv6_extension_headers_are_walked_and_kept() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000);
    let with = tests::packet::with_ipv6_extensions(&frame.build(), &[0, 60, 43], 0);
    let out = lab.run(Side::Client, &with);
    assert_eq!(action_name(out.action), "REDIRECT");
    let p = parse(&out.packet);
    assert_eq!((p.dst, p.dport), (Family::V6.backend(0), BACKEND_PORT));
    assert_eq!(out.packet.len(), with.len(), "the extension headers stay");
}

#[test]
fn more_ipv6_extension_headers_than_walked_are_dropped() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000).build();
    let with = tests::packet::with_ipv6_extensions(&frame, &[60, 60, 60, 60, 60], 0);
    let out = lab.run(Side::Client, &with);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropIpv6ExtensionHeaders), 1);
}

#[test]
fn an_ipv6_extension_header_cut_short_is_dropped() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000).build();
    let mut with = tests::packet::with_ipv6_extensions(&frame, &[0], 0);
    // The hop-by-hop header claims 255 more units of 8 bytes.
    with[14 + 40 + 1] = 255;
    let out = lab.run(Side::Client, &with);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropIpv6ExtensionHeaders), 1);
}

#[test]
fn an_ipv6_fragment_to_a_vip_is_dropped() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000).build();
    // Offset 1 (in 8-byte units), more fragments.
    let with = tests::packet::with_ipv6_extensions(&frame, &[44], 1 << 3 | 1);
    let out = lab.run(Side::Client, &with);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropFragment), 1);
}

#[test]
fn an_ipv6_atomic_fragment_is_a_whole_packet() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000).build();
    let with = tests::packet::with_ipv6_extensions(&frame, &[44], 0);
    let out = lab.run(Side::Client, &with);
    assert_eq!(action_name(out.action), "REDIRECT");
}

#[test]
fn a_truncated_ipv6_header_is_dropped() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let frame = syn(Family::V6, 40_000).build();
    for len in [15, 30, 14 + 39] {
        let out = lab.run(Side::Client, &frame[..len]);
        assert_eq!(action_name(out.action), "DROP", "{len}");
    }
    assert_eq!(lab.count(Reason::DropTruncatedIpv6), 3);
}

#[test]
fn an_ipv6_payload_length_beyond_the_frame_is_dropped() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    let mut frame = syn(Family::V6, 40_000).build();
    frame[18..20].copy_from_slice(&2000u16.to_be_bytes());
    let out = lab.run(Side::Client, &frame);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropBadTotalLength), 1);
}

#[test]
fn neighbour_discovery_is_the_kernels() {
    let mut lab = setup(Family::V6, Forwarding::Nat);
    // A solicitation to the solicited-node group: multicast.
    let mut solicitation = Frame::echo(Family::V6.client(), Family::V6.vip()).build();
    solicitation[0..6].copy_from_slice(&[0x33, 0x33, 0xff, 0, 0, 1]);
    let out = lab.run(Side::Client, &solicitation);
    assert_eq!(action_name(out.action), "PASS");
    // An advertisement, unicast to the balancer: ICMPv6 type 136.
    let mut advertisement = Frame::echo(Family::V6.client(), Family::V6.vip()).build();
    advertisement[14 + 40] = 136;
    let out = lab.run(Side::Client, &advertisement);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(out.packet, advertisement);
    assert_eq!(lab.count(Reason::PassMulticast), 1);
    assert_eq!(lab.count(Reason::PassIcmp), 1);
}

// ---------------------------------------------------------------- full NAT

#[test]
fn full_nat_runs_out_of_ports_cleanly() {
    let mut lab = setup(Family::V4, Forwarding::Fullnat);
    let settings = lab.balancer.environment().settings;
    lab.set_settings(foobar_lb_common::Settings {
        fullnat_port_min: 20_000,
        fullnat_port_count: 2,
        ..settings
    });
    let ports: std::collections::BTreeSet<u16> = (0..2)
        .map(|i| {
            to_backend(
                &mut lab,
                Family::V4,
                Forwarding::Fullnat,
                &syn(Family::V4, 40_000 + i),
            )
            .sport
        })
        .collect();
    assert_eq!(ports, [20_000, 20_001].into());
    let out = lab.run(Side::Client, &syn(Family::V4, 40_002).build());
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropNoNatPort), 1);
    // The two flows keep theirs.
    let again = to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &ack(Family::V4, 40_001),
    );
    assert!(ports.contains(&again.sport));
}

#[test]
fn full_nat_takes_back_the_ports_of_flows_that_are_over() {
    let mut lab = setup(Family::V4, Forwarding::Fullnat);
    let settings = lab.balancer.environment().settings;
    lab.set_settings(foobar_lb_common::Settings {
        fullnat_port_min: 20_000,
        fullnat_port_count: 2,
        ..settings
    });
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &syn(Family::V4, 40_000),
    );
    let second = to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &syn(Family::V4, 40_001),
    );
    // The second flow closes: its port is free for a third once none is.
    let fin = Frame::tcp(CLIENT, 40_001, VIP, 80, Tcp::Fin);
    to_backend(&mut lab, Family::V4, Forwarding::Fullnat, &fin);
    let third = to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &syn(Family::V4, 40_002),
    );
    assert_eq!(third.sport, second.sport);
    // Its replies reach the third client, not the second.
    let reply = backend_reply(Family::V4, &third).build();
    let out = lab.run(Side::Backend, &reply);
    check_to_client(Family::V4, &parse(&out.packet), 40_002, 80);
    // The first, still open, keeps its port: a fourth finds none.
    let out = lab.run(Side::Client, &syn(Family::V4, 40_003).build());
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropNoNatPort), 1);
}

#[test]
fn a_full_nat_backend_talking_to_the_balancer_itself_is_the_kernels() {
    let mut lab = setup(Family::V4, Forwarding::Fullnat);
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &syn(Family::V4, 40_000),
    );
    // A health check's answer: to the balancer's address, on a port it did not give.
    let answer = Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::tcp(
            Family::V4.backend(0),
            BACKEND_PORT,
            LB_BACKEND_SIDE,
            45_000,
            Tcp::SynAck,
        )
    }
    .build();
    let out = lab.run(Side::Backend, &answer);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(out.packet, answer);
    assert_eq!(lab.count(Reason::PassNotVip), 1);
}

#[test]
fn a_vip_changing_mode_moves_its_flows_to_the_new_way() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Nat,
        &syn(Family::V4, 40_000),
    );
    lab.apply(vec![
        mode_vip(
            Family::V4,
            Forwarding::Fullnat,
            80,
            Protocol::Tcp,
            Scheduler::Rr,
            &[1],
        ),
        mode_vip(
            Family::V4,
            Forwarding::Fullnat,
            53,
            Protocol::Udp,
            Scheduler::Maglev,
            &[1],
        ),
    ]);
    // The flow's slot has a new generation: scheduled again, in full NAT.
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Fullnat,
        &ack(Family::V4, 40_000),
    );
    assert_eq!(lab.count(Reason::FlowBackendGone), 1);
}

// ---------------------------------------------------------------- fragments

#[test]
fn a_fragment_of_a_nat_backends_reply_is_dropped_not_leaked() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    let mut reply = Frame {
        src_mac: backend_mac(0),
        dst_mac: LB_BACKEND_MAC,
        ..Frame::udp(Family::V4.backend(0), BACKEND_PORT, CLIENT, 5353)
    }
    .build();
    reply[14 + 6] |= 0x20; // more fragments
    let out = lab.run(Side::Backend, &reply);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropReplyFragment), 1);
    // A fragment from elsewhere is the kernel's.
    let mut other = Frame::udp(CLIENT, 5353, REMOTE_CLIENT, 53).build();
    other[14 + 6] |= 0x20;
    let out = lab.run(Side::Client, &other);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(lab.count(Reason::PassFragment), 1);
}

// ---------------------------------------------------------------- ICMP

#[test]
fn icmp_answers_are_rate_limited() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    let settings = lab.balancer.environment().settings;
    lab.set_settings(foobar_lb_common::Settings {
        icmp_rate: 2,
        ..settings
    });
    let echo = Frame::echo(CLIENT, VIP).build();
    let actions: Vec<&str> = (0..3)
        .map(|_| action_name(lab.run(Side::Client, &echo).action))
        .collect();
    assert_eq!(actions, ["TX", "TX", "DROP"]);
    assert_eq!(lab.count(Reason::DropIcmpRateLimited), 1);
}

#[test]
fn an_echo_to_another_address_is_the_kernels() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    let echo = Frame::echo(CLIENT, std::net::Ipv4Addr::new(10, 0, 0, 1)).build();
    let out = lab.run(Side::Client, &echo);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(out.packet, echo);
    assert_eq!(lab.count(Reason::PassIcmp), 1);
}

#[test]
fn an_icmp_error_about_no_known_flow_is_the_kernels() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    let about = Frame::tcp(REMOTE_CLIENT, 80, CLIENT, 40_000, Tcp::Ack);
    let error =
        Frame::icmp_error(REMOTE_CLIENT, CLIENT, IcmpError::TimeExceeded, &about, 64).build();
    let out = lab.run(Side::Client, &error);
    assert_eq!(action_name(out.action), "PASS");
    assert_eq!(out.packet, error);
}

#[test]
fn an_icmp_error_with_its_quote_cut_short_is_dropped() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Nat,
        &syn(Family::V4, 40_000),
    );
    let reply = Frame::tcp(VIP, 80, CLIENT, 40_000, Tcp::Ack);
    // The quoted IPv4 header, without the ports after it.
    let error = Frame::icmp_error(REMOTE_CLIENT, VIP, IcmpError::TooBig(1200), &reply, 20).build();
    let out = lab.run(Side::Client, &error);
    assert_eq!(action_name(out.action), "DROP");
    assert_eq!(lab.count(Reason::DropTruncatedIcmp), 1);
}

#[test]
fn a_path_mtu_error_for_a_maglev_flow_not_remembered_finds_its_backend() {
    let mut lab = setup(Family::V4, Forwarding::Nat);
    // UDP :53 is Maglev; with the table skipped (flood), the hash still finds it.
    let settings = lab.balancer.environment().settings;
    lab.set_settings(foobar_lb_common::Settings {
        flood_threshold: 1,
        ..settings
    });
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Nat,
        &Frame::udp(CLIENT, 5000, VIP, 53),
    );
    to_backend(
        &mut lab,
        Family::V4,
        Forwarding::Nat,
        &Frame::udp(CLIENT, 5001, VIP, 53),
    );
    assert_eq!(lab.count(Reason::FlowInsertSkipped), 1);
    let reply = Frame::udp(VIP, 53, CLIENT, 5001).sized(1400);
    let error = Frame::icmp_error(REMOTE_CLIENT, VIP, IcmpError::TooBig(1300), &reply, 64).build();
    let out = lab.run(Side::Client, &error);
    assert_eq!(action_name(out.action), "REDIRECT");
    assert_eq!(parse(&out.packet).dst, Family::V4.backend(0));
}
