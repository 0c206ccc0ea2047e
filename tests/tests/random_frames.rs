//! A million random and mutated frames through the program: none is ABORTED, and
//! each ends in exactly one outcome counter.

use std::net::Ipv4Addr;

use foobar_lb::state::{Protocol, Scheduler};
use foobar_lb_common::{Reason, reason::xdp_action};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tests::{
    packet::{Frame, L4, Tcp},
    packet_lab::*,
};

const FRAMES: u64 = 1_000_000;

/// A valid frame of some kind the balancer cares about.
fn seed_frame(rng: &mut StdRng) -> (Side, Frame) {
    let sport = rng.random();
    let mut frame = match rng.random_range(0..6) {
        0 => Frame::tcp(CLIENT, sport, VIP, 80, Tcp::Syn),
        1 => Frame::tcp(CLIENT, sport, VIP, 80, Tcp::Ack),
        2 => Frame::udp(CLIENT, sport, VIP, 53),
        3 => Frame {
            src_mac: backend_mac(0),
            ..Frame::tcp(backend_addr(0), BACKEND_PORT, CLIENT, sport, Tcp::Ack)
        },
        4 => Frame::tcp(
            CLIENT,
            sport,
            Ipv4Addr::from(rng.random::<u32>()),
            rng.random(),
            Tcp::Syn,
        ),
        _ => Frame {
            l4: L4::UdpNoChecksum,
            ..Frame::udp(CLIENT, sport, VIP, 53)
        },
    };
    if rng.random_ratio(1, 4) {
        frame.vlan = Some(rng.random_range(1..4095));
    }
    if rng.random_ratio(1, 4) {
        frame.ip_options = vec![1; 4 * rng.random_range(1..=10)];
    }
    frame.payload = (0..rng.random_range(0..64)).map(|_| rng.random()).collect();
    let side = if rng.random() {
        Side::Client
    } else {
        Side::Backend
    };
    (side, frame)
}

#[test]
fn a_million_random_and_mutated_frames_never_abort() {
    let mut lab = PacketLab::new();
    lab.apply(vec![
        vip_spec("web", VIP, 80, Protocol::Tcp, Scheduler::Rr, &[1, 2]),
        vip_spec("dns", VIP, 53, Protocol::Udp, Scheduler::Maglev, &[]),
    ]);
    let mut rng = StdRng::seed_from_u64(0x00fb_1b00);
    let mut actions = [0u64; 5];
    for i in 0..FRAMES {
        let (side, bytes) = if i % 4 == 0 {
            // Pure noise, of any length the kernel's test_run accepts (>= 14 bytes).
            let len = rng.random_range(14..256);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if rng.random() {
                bytes[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            }
            (Side::Client, bytes)
        } else {
            let (side, frame) = seed_frame(&mut rng);
            let mut bytes = frame.build();
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
        "{FRAMES} frames, none aborted; by action [aborted, drop, pass, tx, redirect]: {actions:?}"
    );
    for r in Reason::ALL {
        println!("  {:<28} {}", r.name(), counters.get(r));
    }
}
