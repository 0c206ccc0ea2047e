//! `cargo xtask bench dataplane`: ns per packet of each data-plane path under
//! BPF_PROG_TEST_RUN, one JSON object per line.
//!
//! test_run with `repeat` runs the program again on the frame it left behind, so
//! every case is made idempotent: its backend *is* the VIP's own address and port,
//! so the rewrite writes the bytes that are already there, and the next hop's MACs
//! are the ones the frame already carries. That each run really took the path is
//! proven, not assumed: the path's own counter must grow by exactly `repeat`.

use std::process::ExitCode;

use aya::programs::{TestRun, TestRunOptions};
use foobar_lb::dataplane::load_floor;
use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, FlowKey, FlowState, Reason, ReplyTarget, SCHED_MAGLEV, SCHED_RR,
    VipInfo, reason::xdp_action,
};
use tests::{
    packet::{Frame, Tcp},
    packet_lab::*,
};

/// A MAC for the VIP address as a neighbour, so the idempotent rewrite has a next hop.
const VIP_NEIGHBOUR_MAC: [u8; 6] = [0x02, 0x71, 0, 0, 0, 100];

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    action: u32,
    /// The counter that proves the path; None for the floor program.
    proof: Option<Reason>,
}

fn main() -> ExitCode {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|r| r.parse().expect("repeat: a number"))
        .unwrap_or(1_000_000);
    assert!(repeat >= 2, "repeat must be at least 2");
    let mut lab = PacketLab::new();
    let mac = VIP_NEIGHBOUR_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    lab.ns.ip(&[
        "neigh",
        "replace",
        &VIP.to_string(),
        "lladdr",
        &mac,
        "dev",
        "lbc",
        "nud",
        "permanent",
    ]);

    // Two VIPs on VIP:80 (maglev) and VIP:81 (rr), each the backend of itself.
    let endpoint = |port| {
        foobar_lb::state::endpoint(VIP.into(), port, foobar_lb::state::Protocol::Tcp).unwrap()
    };
    let (maglev_vip, rr_vip) = (endpoint(80), endpoint(81));
    let dp = lab.balancer.dataplane();
    for (id, vip, scheduler, len) in [
        (0, maglev_vip, SCHED_MAGLEV, 65_537u32),
        (1, rr_vip, SCHED_RR, 1),
    ] {
        dp.set_backend(
            id,
            &Backend {
                endpoint: vip,
                flags: BACKEND_ACTIVE,
            },
        )
        .unwrap();
        dp.write_schedule(id, &vec![id; len as usize], &[]).unwrap();
        dp.set_vip(
            &vip,
            &VipInfo {
                id,
                schedule_len: len,
                scheduler,
                flags: 0,
            },
        )
        .unwrap();
        dp.set_reply(
            &vip,
            &ReplyTarget {
                vip,
                vip_id: id,
                backend_id: id,
            },
        )
        .unwrap();
    }
    // The established case's flow.
    let flow = FlowKey {
        src: [u32::from_ne_bytes(CLIENT.octets()), 0, 0, 0],
        dst: maglev_vip.addr,
        sport: 40_000u16.to_be(),
        dport: maglev_vip.port,
        proto: maglev_vip.proto,
        family: maglev_vip.family,
        _pad: [0; 2],
    };
    dp.set_flow(
        &flow,
        &FlowState {
            backend_id: 0,
            vip_id: 0,
        },
    )
    .unwrap();

    // Frames already carrying what the path writes: the MACs of the next hop.
    let toward = |frame: Frame, dst_mac| {
        Frame {
            src_mac: LB_CLIENT_MAC,
            dst_mac,
            ..frame
        }
        .build()
    };
    let cases = [
        Case {
            name: "floor",
            frame: toward(
                Frame::tcp(CLIENT, 40_000, VIP, 80, Tcp::Ack),
                VIP_NEIGHBOUR_MAC,
            ),
            action: xdp_action::TX,
            proof: None,
        },
        Case {
            name: "non_vip_pass",
            frame: Frame::tcp(CLIENT, 40_000, REMOTE_CLIENT, 80, Tcp::Ack).build(),
            action: xdp_action::PASS,
            proof: Some(Reason::PassNotVip),
        },
        Case {
            name: "new_flow_maglev",
            frame: toward(
                Frame::tcp(CLIENT, 40_001, VIP, 80, Tcp::Syn),
                VIP_NEIGHBOUR_MAC,
            ),
            action: xdp_action::TX,
            proof: Some(Reason::FlowNew),
        },
        Case {
            name: "new_flow_rr",
            frame: toward(
                Frame::tcp(CLIENT, 40_002, VIP, 81, Tcp::Syn),
                VIP_NEIGHBOUR_MAC,
            ),
            action: xdp_action::TX,
            proof: Some(Reason::FlowNew),
        },
        Case {
            name: "established_flow",
            frame: toward(
                Frame::tcp(CLIENT, 40_000, VIP, 80, Tcp::Ack),
                VIP_NEIGHBOUR_MAC,
            ),
            action: xdp_action::TX,
            proof: Some(Reason::FlowHit),
        },
        Case {
            // From the backend (here the VIP endpoint itself) back to the client.
            name: "reply",
            frame: toward(Frame::tcp(VIP, 80, CLIENT, 40_000, Tcp::Ack), CLIENT_MAC),
            action: xdp_action::TX,
            proof: Some(Reason::Reply),
        },
    ];

    let floor = load_floor().expect("load the floor program");
    let mut figures = std::collections::BTreeMap::new();
    let mut failed = false;
    for case in &cases {
        let before = lab.counters();
        let (action, ns) = if case.proof.is_none() {
            let program: &aya::programs::Xdp = floor.program("floor").unwrap().try_into().unwrap();
            let mut out = vec![0u8; case.frame.len() + 256];
            let r = program
                .test_run(TestRunOptions {
                    data_in: Some(&case.frame),
                    data_out: Some(&mut out),
                    repeat,
                    ..Default::default()
                })
                .expect("test_run");
            (r.return_value, r.duration.as_nanos() as f64)
        } else {
            let (out, duration) = lab.run_repeated(Side::Client, &case.frame, repeat);
            (out.action, duration.as_nanos() as f64)
        };
        let after = lab.counters();
        let proven = match case.proof {
            None => true,
            Some(reason) => after.get(reason) - before.get(reason) == repeat as u64,
        };
        if action != case.action || !proven {
            eprintln!(
                "case {}: action {} (want {}), counter {:?} grew by {} (want {repeat}): the measurement took another path",
                case.name,
                action_name(action),
                action_name(case.action),
                case.proof,
                case.proof
                    .map(|r| after.get(r) - before.get(r))
                    .unwrap_or(0),
            );
            failed = true;
        }
        figures.insert(case.name, ns);
        println!(
            "{}",
            serde_json::json!({
                "case": case.name,
                "ns_per_packet": (ns * 10.0).round() / 10.0,
                "packets_per_second": (1e9 / ns).round(),
                "repeat": repeat,
                "proven": proven,
            })
        );
    }
    let over_floor = figures["established_flow"] - figures["floor"];
    println!(
        "{}",
        serde_json::json!({ "case": "established_flow_over_floor", "ns_per_packet": (over_floor * 10.0).round() / 10.0, "target_ns": 40 })
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
