//! Active connections per backend, and the least-connections schedules made from them.
//!
//! The data plane counts, per backend and CPU, the flow-table entries it made
//! (`opened_flows`) and the connections it saw end (`closed_flows`: FIN both ways,
//! an RST, the client's FIN in DSR). Their difference is the backend's active
//! connections, read without walking the table, except for what ends unseen: flows
//! silent past their idle timeout, flows pushed out of a full table, flows moved to
//! another backend. The sweep walks the table every few seconds, forgets the idle
//! ones and re-anchors each backend's count on what it found open, so an error never
//! outlives one sweep.
//!
//! Least connections is planned here, not in the kernel: every few milliseconds the
//! planner turns the counts into the ring of the next new flows' backends (as live
//! counts would choose them while nothing closes), and the kernel takes ring slots as
//! it does for round robin. A new flow costs what a round-robin one does, whatever
//! the number of backends; the choice lags the counts by at most one period.

use std::collections::BTreeMap;

use foobar_lb_common::{FLOW_CLOCK_SHIFT, PROTO_UDP, TrafficStats};
use tracing::{info, warn};

use crate::{
    reconcile::{AppliedVip, Balancer},
    schedule::{self, Weighted},
    state::Scheduler,
};

/// How often the least-connections rings are planned again (when the counts moved).
pub const PLAN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);
/// How often the flow tables are swept.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The agent's side of connection counting.
#[derive(Default)]
pub struct Connections {
    /// Per backend slot: its generation and what its counters count that is not open
    /// (opened − closed − open at the last sweep).
    offsets: BTreeMap<u32, (u32, u64)>,
    /// Per least-connections VIP id: the counts and cursor its ring was planned from.
    planned: BTreeMap<u32, (Vec<u64>, u32)>,
}

impl Connections {
    /// A backend slot's active connections, from its counters.
    pub fn active(&self, balancer: &Balancer, id: u32, stats: &TrafficStats) -> u64 {
        let counted = stats.opened_flows.saturating_sub(stats.closed_flows);
        let generation = balancer.state().backends.get(&id).map(|b| b.generation);
        match self.offsets.get(&id) {
            Some(&(at, offset)) if Some(at) == generation => counted.saturating_sub(offset),
            _ => counted,
        }
    }

    /// A backend slot's active connections, its counters read now.
    pub fn active_now(&self, balancer: &mut Balancer, id: u32) -> Option<u64> {
        let stats = balancer.dataplane().backend_stats(id).ok()?;
        Some(self.active(balancer, id, &stats))
    }

    /// Forgets flows idle past their timeouts (seconds) and re-anchors every
    /// backend's count on the open flows found.
    pub fn sweep(&mut self, balancer: &mut Balancer, tcp_idle: u32, udp_idle: u32) {
        let now = flow_clock();
        let (tcp, udp) = (ticks(tcp_idle), ticks(udp_idle));
        let swept = balancer.dataplane().sweep_flows(|flow, proto| {
            let limit = if proto == PROTO_UDP { udp } else { tcp };
            // A tick the kernel wrote after `now` was read is not idle.
            (now.wrapping_sub(flow.seen) as i32) > limit as i32
        });
        let swept = match swept {
            Ok(swept) => swept,
            Err(e) => {
                warn!("sweeping the flow tables: {e}");
                return;
            }
        };
        if swept.forgotten > 0 {
            info!(flows = swept.forgotten, "idle flows forgotten");
        }
        let ids: Vec<u32> = balancer.vips().flat_map(|v| v.backend_ids).collect();
        self.offsets.clear();
        for id in ids {
            let Some(generation) = balancer.state().backends.get(&id).map(|b| b.generation) else {
                continue;
            };
            let Ok(stats) = balancer.dataplane().backend_stats(id) else {
                continue;
            };
            let open = swept.open.get(&(id, generation)).copied().unwrap_or(0);
            let counted = stats.opened_flows.saturating_sub(stats.closed_flows);
            self.offsets
                .insert(id, (generation, counted.saturating_sub(open)));
        }
    }

    /// Rewrites the ring of every least-connections VIP whose counts or cursor moved
    /// since its last plan.
    pub fn plan(&mut self, balancer: &mut Balancer) {
        let vips: Vec<AppliedVip> = balancer
            .vips()
            .filter(|v| v.plan.spec.scheduler.counts_connections())
            .collect();
        self.planned
            .retain(|id, _| vips.iter().any(|v| v.id == *id));
        for vip in vips {
            let Some(active) = vip
                .backend_ids
                .iter()
                .map(|&id| self.active_now(balancer, id))
                .collect::<Option<Vec<u64>>>()
            else {
                continue;
            };
            let Ok(cursor) = balancer.dataplane().rr_cursor(vip.id) else {
                continue;
            };
            let basis = (active, cursor);
            if self.planned.get(&vip.id) == Some(&basis) {
                continue;
            }
            let weighted: Vec<Weighted> = vip
                .plan
                .backends
                .iter()
                .zip(&vip.plan.spec.backends)
                .map(|(&endpoint, b)| Weighted {
                    endpoint,
                    weight: b.weight,
                })
                .collect();
            let wlc = vip.plan.spec.scheduler == Scheduler::Wlc;
            let ring = schedule::least_connections(&weighted, &basis.0, wlc);
            let ring: Vec<u32> = schedule::from_cursor(&ring, basis.1)
                .into_iter()
                .map(|at| vip.backend_ids[at as usize])
                .collect();
            match balancer.rewrite_ring(vip.id, &ring) {
                Ok(_) => {
                    self.planned.insert(vip.id, basis);
                }
                Err(e) => warn!(vip = vip.plan.spec.name, "planning least connections: {e}"),
            }
        }
    }
}

/// The data plane's flow clock now (`bpf_ktime_get_coarse_ns` is this clock).
fn flow_clock() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    (ns >> FLOW_CLOCK_SHIFT) as u32
}

/// Flow-clock ticks in `seconds`, rounded up.
fn ticks(seconds: u32) -> u32 {
    ((seconds as u64 * 1_000_000_000).div_ceil(1 << FLOW_CLOCK_SHIFT)) as u32
}
