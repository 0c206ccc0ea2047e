//! Active connections per backend, and the least-connections schedules made from them.
//!
//! The data plane counts, per backend and CPU, the flow-table entries it made
//! (`opened_flows`) and the connections it saw end (`closed_flows`: FIN both ways,
//! an RST, the client's FIN in DSR). Their difference is the backend's active
//! connections, read without walking the table, except for what ends unseen: flows
//! silent past their idle timeout, flows pushed out of a full table, flows moved to
//! another backend. Every few seconds the agent counts the table's open flows once and
//! re-anchors each backend's count on them (an offset); the counters carry it between
//! two counts. An idle flow is only no longer counted: its entry stays, and if it
//! speaks again it keeps its backend (and is counted again from the next count).
//!
//! Least connections is planned here, not in the kernel: every few milliseconds the
//! planner turns the counts into the ring of the next new flows' backends (as live
//! counts would choose them while nothing closes), and the kernel takes ring slots as
//! it does for round robin. A new flow costs what a round-robin one does, whatever
//! the number of backends; the choice lags the counts by at most one period.

use std::collections::BTreeMap;

use foobar_lb_common::{Endpoint, FLOW_CLOCK_SHIFT, PROTO_UDP, TrafficStats};
use tracing::{debug, warn};

use crate::{reconcile::Balancer, schedule, state::Scheduler};

/// How often the least-connections rings are planned again (when the counts moved).
pub const PLAN_EVERY: std::time::Duration = std::time::Duration::from_millis(10);
/// How often the open flows are counted in the tables.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The agent's side of connection counting.
#[derive(Default)]
pub struct Connections {
    /// Per backend slot: its generation and what its counters count that is not open
    /// (opened − closed − open at the last count of the table).
    offsets: BTreeMap<u32, (u32, i64)>,
    /// Per least-connections VIP id: the counts and cursor its ring was planned from,
    /// and the ring written (an apply may have written another since).
    planned: BTreeMap<u32, (Vec<u64>, u32, Vec<u32>)>,
}

impl Connections {
    /// A backend slot's active connections, from its counters.
    pub fn active(&self, balancer: &Balancer, id: u32, stats: &TrafficStats) -> u64 {
        let counted = stats.opened_flows as i64 - stats.closed_flows as i64;
        let generation = balancer.state().backends.get(&id).map(|b| b.generation);
        let offset = match self.offsets.get(&id) {
            Some(&(at, offset)) if Some(at) == generation => offset,
            _ => 0,
        };
        (counted - offset).max(0) as u64
    }

    /// A backend slot's active connections, its counters read now.
    pub fn active_now(&self, balancer: &mut Balancer, id: u32) -> Option<u64> {
        let stats = balancer.dataplane().backend_stats(id).ok()?;
        Some(self.active(balancer, id, &stats))
    }

    /// Counts the open flows in the tables (silent ones past their timeouts, in
    /// seconds, are not) and re-anchors every backend's count on them.
    pub fn sweep(&mut self, balancer: &mut Balancer, tcp_idle: u32, udp_idle: u32) {
        // The counters are read first: a flow that opens during the walk may be
        // missed by it, and is then counted once too often until the next sweep
        // (never too few: a drain waits rather than ends early).
        let ids: Vec<u32> = balancer.state().backends.keys().copied().collect();
        let before: Vec<(u32, u32, i64)> = ids
            .into_iter()
            .filter_map(|id| {
                let generation = balancer.state().backends.get(&id)?.generation;
                let stats = balancer.dataplane().backend_stats(id).ok()?;
                Some((
                    id,
                    generation,
                    stats.opened_flows as i64 - stats.closed_flows as i64,
                ))
            })
            .collect();
        let now = flow_clock();
        let (tcp, udp) = (ticks(tcp_idle), ticks(udp_idle));
        let counted = balancer.dataplane().count_open_flows(|flow, proto| {
            let limit = if proto == PROTO_UDP { udp } else { tcp };
            // A tick the kernel wrote after `now` was read is not idle.
            (now.wrapping_sub(flow.seen) as i32) > limit as i32
        });
        let counted = match counted {
            Ok(counted) => counted,
            Err(e) => {
                warn!("counting the open flows: {e}");
                return;
            }
        };
        debug!(idle = counted.idle, "open flows counted");
        self.offsets = before
            .into_iter()
            .map(|(id, generation, counters)| {
                let open = counted.open.get(&(id, generation)).copied().unwrap_or(0);
                (id, (generation, counters - open as i64))
            })
            .collect();
    }

    /// Rewrites the ring of every least-connections VIP whose counts or cursor moved
    /// since its last plan, or whose ring an apply wrote since.
    pub fn plan(&mut self, balancer: &mut Balancer, vips: &[Endpoint]) {
        self.planned
            .retain(|id, _| vips.iter().any(|v| balancer.vip_id(v) == Some(*id)));
        for endpoint in vips {
            let Some(vip) = balancer.vip(endpoint) else {
                continue;
            };
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
            if let Some((counts, at, ring)) = self.planned.get(&vip.id)
                && (counts, *at, ring) == (&active, cursor, &vip.schedule)
            {
                continue;
            }
            let wlc = vip.plan.spec.scheduler == Scheduler::Wlc;
            let ring = schedule::least_connections(&vip.plan.weighted(), &active, wlc);
            let ring: Vec<u32> = schedule::from_cursor(&ring, cursor)
                .into_iter()
                .map(|at| vip.backend_ids[at as usize])
                .collect();
            match balancer.rewrite_ring(vip.id, &ring) {
                Ok(_) => {
                    self.planned.insert(vip.id, (active, cursor, ring));
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
