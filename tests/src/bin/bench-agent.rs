//! `cargo xtask bench agent`: how the agent answers while the data plane is big.
//!
//! On the lab's balancer: the flow table is filled with a million flows (written into
//! the pinned map, as if that many clients were connected), then `status` is asked
//! over the control socket again and again and timed; it must not walk the table.
//! Then 40 VIPs are replaced by 40 others in one reload (80 of 64 VIP ids if made
//! side by side) and the reload is timed. One JSON line per figure.

use std::{
    os::fd::AsFd,
    process::ExitCode,
    time::{Duration, Instant},
};

use aya::maps::MapData;
use foobar_lb::api::{self, Reply, Request};
use foobar_lb_common::{FLOW_ESTABLISHED, FlowKey, FlowState, map_names};
use serde_json::json;
use tests::lab::{DATAPLANE_INTERFACES, Lab, LabSpec, web_addr};

const FLOWS: u32 = 1_000_000;

/// A configuration with `vips` VIPs on addresses 10.0.`third`.x, each over both web
/// servers on a port of its own.
fn config(vips: u8, third: u8) -> String {
    let mut text = format!(
        "[dataplane]\ninterfaces = {DATAPLANE_INTERFACES}\nxdp_mode = \"native\"\nflow_capacity = {}\n",
        3 * FLOWS
    );
    for n in 0..vips {
        let port = 10_000 + third as u16 * 100 + n as u16;
        text += &format!(
            "\n[[vips]]\nname = \"v{third}-{n}\"\naddress = \"10.0.{third}.{}\"\nport = 80\nscheduler = \"maglev\"\n\
             backends = [{{ address = \"{}\", port = {port} }}, {{ address = \"{}\", port = {port} }}]\n",
            n + 1,
            web_addr(0),
            web_addr(1)
        );
    }
    text
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn main() -> ExitCode {
    let mut spec = LabSpec::for_test("bagent", 2);
    spec.bin_dir = "target/release".into();
    let mut lab = Lab::up(spec);
    lab.write_config(&config(40, 1));
    lab.start_agent();
    let socket = lab.socket();

    // A million flows in the pinned flow table.
    let pinned = foobar_lb::pin::maps_dir(&lab.balancer().pin_dir).join(map_names::FLOWS);
    let flows = MapData::from_pin(&pinned).expect("the pinned flow table");
    let (keys, values): (Vec<FlowKey>, Vec<FlowState>) = (0..FLOWS)
        .map(|n| {
            let client = u32::from_ne_bytes([172, 16 + (n >> 16) as u8, (n >> 8) as u8, n as u8]);
            (
                FlowKey::new(
                    client,
                    u32::from_ne_bytes([10, 0, 1, 1]),
                    (n as u16).to_be(),
                    80u16.to_be(),
                    6,
                ),
                FlowState {
                    backend_id: 0,
                    generation: 1,
                    flags: FLOW_ESTABLISHED,
                    nat_port: 0,
                    seq: 0,
                    seen: 0,
                },
            )
        })
        .unzip();
    let filled = Instant::now();
    foobar_lb::batch::update(flows.fd().as_fd(), &keys, &values, 8192)
        .expect("write a million flows");
    let fill_time = filled.elapsed();
    let mut counted = 0u64;
    foobar_lb::batch::for_each::<FlowKey, FlowState>(flows.fd().as_fd(), 8192, |_, _| counted += 1)
        .expect("count the flows");

    let mut times: Vec<Duration> = (0..30)
        .map(|_| {
            let asked = Instant::now();
            match api::call(&socket, &Request::Status) {
                Ok(Reply::Status(_)) => asked.elapsed(),
                other => panic!("status: {other:?}"),
            }
        })
        .collect();
    times.sort();
    println!(
        "{}",
        json!({
            "bench": "agent",
            "case": "status",
            "flows_in_table": counted,
            "p50_ms": millis(times[times.len() / 2]),
            "max_ms": millis(*times.last().unwrap()),
            "target_ms": 50,
            "fill_ms": millis(fill_time),
        })
    );

    // 40 VIPs for 40 others, in one reload.
    lab.write_config(&config(40, 2));
    let asked = Instant::now();
    let reply = api::call(&socket, &Request::Reload);
    let took = asked.elapsed();
    let ok = matches!(reply, Ok(Reply::Changed(_)));
    let status = match api::call(&socket, &Request::Status) {
        Ok(Reply::Status(status)) => status,
        other => panic!("status: {other:?}"),
    };
    let swapped = status.vips.len() == 40 && status.vips.iter().all(|v| v.name.starts_with("v2-"));
    println!(
        "{}",
        json!({ "bench": "agent", "case": "reload_40_vips_for_40_others", "ms": millis(took), "applied": ok && swapped })
    );
    if ok && swapped {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
