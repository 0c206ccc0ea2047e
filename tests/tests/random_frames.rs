//! A million random and mutated frames through the program for each forwarding mode:
//! none is ABORTED, and each ends in exactly one outcome counter.

use std::net::{Ipv4Addr, Ipv6Addr};

use foobar_lb::{
    edge::NewFlowLimit,
    state::{DesiredState, Forwarding, Protocol, Scheduler},
};
use foobar_lb_common::{Reason, reason::xdp_action};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tests::{
    packet::{Frame, IcmpError, L4, Tcp, with_ipv6_extensions},
    packet_lab::*,
};

const FRAMES: u64 = 1_000_000;

/// A valid frame of some kind the balancer cares about, of either family.
fn seed_frame(rng: &mut StdRng, mode: Forwarding) -> (Side, Frame) {
    let family = if rng.random() { Family::V4 } else { Family::V6 };
    let (client, vip) = (family.client(), family.vip());
    let backend_port = if mode.is_dsr() { 80 } else { BACKEND_PORT };
    let sport = rng.random();
    let mut frame = match rng.random_range(0..9) {
        0 => Frame::tcp(client, sport, vip, 80, Tcp::Syn),
        1 => Frame::tcp(client, sport, vip, 80, Tcp::Ack),
        2 => Frame::udp(client, sport, vip, 53),
        3 => Frame {
            src_mac: backend_mac(0),
            ..Frame::tcp(family.backend(0), backend_port, client, sport, Tcp::Ack)
        },
        4 => match family {
            Family::V4 => Frame::tcp(
                client,
                sport,
                Ipv4Addr::from(rng.random::<u32>()),
                rng.random(),
                Tcp::Syn,
            ),
            Family::V6 => Frame::tcp(
                client,
                sport,
                Ipv6Addr::from(rng.random::<u128>()),
                rng.random(),
                Tcp::Syn,
            ),
        },
        5 => Frame::echo(client, vip),
        6 => {
            let about = Frame::tcp(vip, 80, client, sport, Tcp::Ack);
            let error = [IcmpError::TooBig(1280), IcmpError::TimeExceeded][rng.random_range(0..2)];
            Frame::icmp_error(
                family.remote_client(),
                vip,
                error,
                &about,
                rng.random_range(8..80),
            )
        }
        7 => {
            let about = Frame::udp(client, sport, family.backend(0), backend_port);
            Frame {
                src_mac: backend_mac(0),
                ..Frame::icmp_error(
                    family.backend(0),
                    client,
                    IcmpError::PortUnreachable,
                    &about,
                    rng.random_range(8..80),
                )
            }
        }
        _ => Frame {
            l4: L4::UdpNoChecksum,
            ..Frame::udp(client, sport, vip, 53)
        },
    };
    if rng.random_ratio(1, 4) {
        frame.vlan = Some(rng.random_range(1..4095));
    }
    if family == Family::V4 && rng.random_ratio(1, 4) {
        frame.ip_options = vec![1; 4 * rng.random_range(1..=10)];
    }
    frame.payload = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
    let side = if rng.random() {
        Side::Client
    } else {
        Side::Backend
    };
    frame.dst_mac = match side {
        Side::Backend => LB_BACKEND_MAC,
        _ => LB_CLIENT_MAC,
    };
    (side, frame)
}

macro_rules! modes {
    ($($name:ident: $mode:expr;)+) => {$(
        #[test]
        fn $name() {
            a_million_random_and_mutated_frames_never_abort($mode);
        }
    )+};
}

modes! {
    nat_never_aborts: Forwarding::Nat;
    fullnat_never_aborts: Forwarding::Fullnat;
    dsr_ipip_never_aborts: Forwarding::DsrIpip;
    dsr_gue_never_aborts: Forwarding::DsrGue;
}

fn a_million_random_and_mutated_frames_never_abort(mode: Forwarding) {
    let mut lab = PacketLab::new();
    let mut vips = Vec::new();
    for family in [Family::V4, Family::V6] {
        vips.push(mode_vip(
            family,
            mode,
            80,
            Protocol::Tcp,
            Scheduler::Rr,
            &[1, 2],
        ));
        vips.push(mode_vip(
            family,
            mode,
            53,
            Protocol::Udp,
            Scheduler::Maglev,
            &[],
        ));
    }
    // Edge rules loaded: a global deny, per-VIP allow lists, new-flow limits.
    let mut state = DesiredState {
        vips,
        ..Default::default()
    };
    state.edge.acl.deny = vec![
        "10.0.0.128/25".parse().unwrap(),
        "fd00::8000/113".parse().unwrap(),
    ];
    for vip in &mut state.vips {
        vip.acl.allow = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/16".parse().unwrap()];
        vip.new_flow_limit = Some(NewFlowLimit {
            rate: 200,
            burst: Some(50),
            prefix_v4: 24,
            prefix_v6: 64,
        });
    }
    lab.apply_state(state);
    // A low flood threshold: SYNs of NAT VIPs get cookies, ACKs that miss are checked.
    lab.set_settings(foobar_lb_common::Settings {
        flood_threshold: 1000,
        ..lab.balancer.environment().settings
    });
    let mut rng = StdRng::seed_from_u64(0x00fb_1b00 ^ mode.code() as u64);
    let mut actions = [0u64; 5];
    for i in 0..FRAMES {
        let (side, bytes) = if i % 4 == 0 {
            // Pure noise, of any length the kernel's test_run accepts (>= 14 bytes).
            let len = rng.random_range(14..256);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            bytes[0..6].copy_from_slice(&LB_CLIENT_MAC);
            match rng.random_range(0..3) {
                0 => bytes[12..14].copy_from_slice(&0x0800u16.to_be_bytes()),
                1 => bytes[12..14].copy_from_slice(&0x86ddu16.to_be_bytes()),
                _ => {}
            }
            (Side::Client, bytes)
        } else {
            let (side, frame) = seed_frame(&mut rng, mode);
            let mut bytes = frame.build();
            if frame.is_ipv6() && rng.random_ratio(1, 4) {
                let kinds: Vec<u8> = (0..rng.random_range(1..6))
                    .map(|_| [0, 43, 44, 60][rng.random_range(0..4)])
                    .collect();
                bytes = with_ipv6_extensions(&bytes, &kinds, rng.random());
            }
            for _ in 0..rng.random_range(0..4) {
                let at = rng.random_range(0..bytes.len().min(80));
                bytes[at] = rng.random();
            }
            if rng.random_ratio(1, 3) {
                bytes.truncate(rng.random_range(14..=bytes.len()));
            }
            (side, bytes)
        };
        let out = lab.run(side, &bytes);
        assert_ne!(out.action, xdp_action::ABORTED, "frame {i}: {bytes:02x?}");
        assert!(
            out.action <= xdp_action::REDIRECT,
            "frame {i}: action {}",
            out.action
        );
        actions[out.action as usize] += 1;
    }
    let counters = lab.counters();
    let outcomes: u64 = Reason::ALL
        .iter()
        .filter(|r| r.action().is_some())
        .map(|&r| counters.get(r))
        .sum();
    assert_eq!(outcomes, FRAMES, "every frame counted exactly once");
    for action in [xdp_action::DROP, xdp_action::PASS, xdp_action::REDIRECT] {
        assert!(
            actions[action as usize] > 0,
            "the run reached action {action}"
        );
    }
    println!(
        "{mode:?}: {FRAMES} frames, none aborted; by action [aborted, drop, pass, tx, redirect]: {actions:?}"
    );
    for r in Reason::ALL {
        println!("  {:<28} {}", r.name(), counters.get(r));
    }
}
