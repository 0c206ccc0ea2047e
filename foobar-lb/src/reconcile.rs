//! Turning a desired state into the fewest map writes, make-before-break.
//!
//! Order matters because the data plane reads while we write: new backends are
//! written before any schedule names them, schedules before the VIP entry that
//! exposes their length, and removed backends are retired last. Ids of removed VIPs
//! and backends are reused last-freed-last, and their flows are purged, so a stale
//! flow never lands on a stranger.

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
};

use foobar_lb_common::{
    BACKEND_ACTIVE, Backend, Endpoint, MAX_BACKENDS, MAX_VIPS, ReplyTarget, SCHED_MAGLEV, SCHED_RR,
    VipAddr, VipInfo, hash::flow_hash_v4,
};

use crate::{
    dataplane::{Dataplane, DataplaneError},
    state::{DesiredState, PlannedVip, Scheduler, StateError},
};

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The desired state is invalid; nothing was changed.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] StateError),
    /// The kernel refused a map write part-way.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// VIPs added.
    pub vips_added: usize,
    /// VIPs removed.
    pub vips_removed: usize,
    /// Backends added.
    pub backends_added: usize,
    /// Backends removed.
    pub backends_removed: usize,
    /// Schedule slots rewritten.
    pub slots_written: usize,
    /// Flows purged because their backend was removed.
    pub flows_purged: usize,
}

/// A VIP as it is in the maps.
#[derive(Clone, Debug)]
pub struct AppliedVip {
    /// Its index in the per-VIP arrays.
    pub id: u32,
    /// The plan it was written from.
    pub plan: PlannedVip,
    /// Backend ids, in the order of `plan.backends`.
    pub backend_ids: Vec<u32>,
    /// The schedule as written: backend ids per slot.
    pub schedule: Vec<u32>,
}

impl AppliedVip {
    /// The id of one of its backends.
    pub fn backend_id(&self, backend: &Endpoint) -> Option<u32> {
        let i = self.plan.backends.iter().position(|b| b == backend)?;
        Some(self.backend_ids[i])
    }

    fn endpoint_of(&self, backend_id: u32) -> Option<Endpoint> {
        let i = self.backend_ids.iter().position(|&id| id == backend_id)?;
        Some(self.plan.backends[i])
    }
}

/// The data plane together with what has been written into it.
pub struct Balancer {
    dataplane: Dataplane,
    vips: BTreeMap<Endpoint, AppliedVip>,
    free_vip_ids: VecDeque<u32>,
    free_backend_ids: VecDeque<u32>,
}

impl Balancer {
    /// Takes over a freshly loaded data plane (empty maps).
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            dataplane,
            vips: BTreeMap::new(),
            free_vip_ids: (0..MAX_VIPS).collect(),
            free_backend_ids: (0..MAX_BACKENDS).collect(),
        }
    }

    /// Takes over a data plane whose maps were reopened from pins: what an earlier
    /// agent wrote is read back (VIP ids, backend ids, schedules), so the next
    /// [`Balancer::apply`] writes only what differs and keeps every flow.
    pub fn adopt(mut dataplane: Dataplane) -> Result<Self, DataplaneError> {
        let replies = dataplane.replies()?;
        let mut vips = BTreeMap::new();
        for (endpoint, info) in dataplane.vips()? {
            let mut backends: Vec<(u32, Endpoint)> = replies
                .iter()
                .filter(|(_, target)| target.vip_id == info.id && target.vip == endpoint)
                .map(|(backend, target)| (target.backend_id, *backend))
                .collect();
            backends.sort();
            let schedule = dataplane.schedule(info.id, info.schedule_len)?;
            let scheduler = if info.scheduler == SCHED_MAGLEV {
                Scheduler::Maglev
            } else {
                Scheduler::Rr
            };
            let plan = PlannedVip::adopted(endpoint, scheduler, &backends);
            let backend_ids = backends.iter().map(|&(id, _)| id).collect();
            vips.insert(
                endpoint,
                AppliedVip {
                    id: info.id,
                    plan,
                    backend_ids,
                    schedule,
                },
            );
        }
        let used_vips: std::collections::BTreeSet<u32> = vips.values().map(|v| v.id).collect();
        let used_backends: std::collections::BTreeSet<u32> = vips
            .values()
            .flat_map(|v| v.backend_ids.iter().copied())
            .collect();
        Ok(Self {
            dataplane,
            vips,
            free_vip_ids: (0..MAX_VIPS).filter(|id| !used_vips.contains(id)).collect(),
            free_backend_ids: (0..MAX_BACKENDS)
                .filter(|id| !used_backends.contains(id))
                .collect(),
        })
    }

    /// The data plane, for attaching, counters and tests.
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// The VIPs as applied.
    pub fn vips(&self) -> impl Iterator<Item = &AppliedVip> {
        self.vips.values()
    }

    /// One applied VIP.
    pub fn vip(&self, endpoint: &Endpoint) -> Option<&AppliedVip> {
        self.vips.get(endpoint)
    }

    /// Makes the maps match `desired`, or changes nothing if it is invalid.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport, ApplyError> {
        let plans = desired.plan()?;
        // Refuse before writing anything if the new backends do not fit beside the old.
        let needed = plans
            .iter()
            .flat_map(|p| p.backends.iter().map(move |b| (p, b)))
            .filter(|(p, b)| {
                self.vips
                    .get(&p.endpoint)
                    .and_then(|o| o.backend_id(b))
                    .is_none()
            })
            .count();
        if needed > self.free_backend_ids.len() {
            return Err(StateError {
                field: "vips".into(),
                message: format!(
                    "{needed} new backends but {} free slots while the old ones drain; apply the change in two steps",
                    self.free_backend_ids.len()
                ),
            }
            .into());
        }
        let mut report = ApplyReport::default();
        let mut free_vips = self.free_vip_ids.clone();
        let mut free_backends = self.free_backend_ids.clone();
        // Ids retired now only become reusable after this apply.
        let mut retired_vips = Vec::new();
        let mut retired_backends = Vec::new();

        let mut next: BTreeMap<Endpoint, AppliedVip> = BTreeMap::new();
        for plan in plans {
            let old = self.vips.get(&plan.endpoint);
            let id = match old {
                Some(old) => old.id,
                None => {
                    // plan() bounds the VIP count, and ids of VIPs kept are not free.
                    let id = free_vips
                        .pop_front()
                        .expect("VIP count is bounded by plan()");
                    self.dataplane.reset_vip_stats(id)?;
                    self.dataplane.set_rr_cursor(id, 0)?;
                    report.vips_added += 1;
                    id
                }
            };
            let mut backend_ids = Vec::with_capacity(plan.backends.len());
            for backend in &plan.backends {
                let kept = old.and_then(|old| old.backend_id(backend));
                let backend_id = match kept {
                    Some(backend_id) => backend_id,
                    None => {
                        let backend_id = free_backends.pop_front().expect("counted above");
                        self.dataplane.reset_backend_stats(backend_id)?;
                        self.dataplane.set_backend(
                            backend_id,
                            &Backend {
                                endpoint: *backend,
                                flags: BACKEND_ACTIVE,
                            },
                        )?;
                        self.dataplane.set_reply(
                            backend,
                            &ReplyTarget {
                                vip: plan.endpoint,
                                vip_id: id,
                                backend_id,
                            },
                        )?;
                        report.backends_added += 1;
                        backend_id
                    }
                };
                backend_ids.push(backend_id);
            }
            let schedule: Vec<u32> = plan
                .schedule
                .iter()
                .map(|&i| backend_ids[i as usize])
                .collect();
            let previous = old.map(|o| o.schedule.as_slice()).unwrap_or(&[]);
            report.slots_written += self.dataplane.write_schedule(id, &schedule, previous)?;
            let info = VipInfo {
                id,
                schedule_len: schedule.len() as u32,
                scheduler: match plan.spec.scheduler {
                    Scheduler::Rr => SCHED_RR,
                    Scheduler::Maglev => SCHED_MAGLEV,
                },
                flags: 0,
            };
            self.dataplane.set_vip(&plan.endpoint, &info)?;
            next.insert(
                plan.endpoint,
                AppliedVip {
                    id,
                    plan,
                    backend_ids,
                    schedule,
                },
            );
        }

        // Retire what is no longer wanted: VIPs first, then backends. A backend
        // endpoint that moved to another VIP keeps the reply entry written for it above.
        let wanted: std::collections::BTreeSet<&Endpoint> =
            next.values().flat_map(|v| &v.plan.backends).collect();
        for (endpoint, old) in &self.vips {
            let kept = next.get(endpoint);
            if kept.is_none() {
                self.dataplane.remove_vip(endpoint)?;
                retired_vips.push(old.id);
                report.vips_removed += 1;
            }
            for (backend, &backend_id) in old.plan.backends.iter().zip(&old.backend_ids) {
                if kept.and_then(|k| k.backend_id(backend)).is_none() {
                    self.dataplane
                        .set_backend(backend_id, &Backend::default())?;
                    if !wanted.contains(backend) {
                        self.dataplane.remove_reply(backend)?;
                    }
                    retired_backends.push(backend_id);
                    report.backends_removed += 1;
                }
            }
        }
        if !retired_backends.is_empty() {
            report.flows_purged = self.dataplane.remove_flows_of(&retired_backends)?;
        }
        self.write_vip_addresses(&next)?;

        free_vips.extend(retired_vips);
        free_backends.extend(retired_backends);
        self.free_vip_ids = free_vips;
        self.free_backend_ids = free_backends;
        self.vips = next;
        Ok(report)
    }

    /// Rewrites the VIP address use counts that changed (fragments to a VIP address
    /// are dropped, others passed).
    fn write_vip_addresses(
        &mut self,
        next: &BTreeMap<Endpoint, AppliedVip>,
    ) -> Result<(), DataplaneError> {
        let uses = |vips: &BTreeMap<Endpoint, AppliedVip>| {
            let mut uses: BTreeMap<VipAddr, u32> = BTreeMap::new();
            for ep in vips.keys() {
                *uses.entry(VipAddr { addr: ep.addr }).or_default() += 1;
            }
            uses
        };
        let (before, after) = (uses(&self.vips), uses(next));
        for (addr, &n) in &after {
            if before.get(addr) != Some(&n) {
                self.dataplane.set_vip_address_uses(addr, n)?;
            }
        }
        for addr in before.keys().filter(|a| !after.contains_key(a)) {
            self.dataplane.set_vip_address_uses(addr, 0)?;
        }
        Ok(())
    }

    /// Removes the flows pinned to one backend of a VIP (a down backend with
    /// `on_backend_down = "reset"`); returns how many.
    pub fn purge_flows(
        &mut self,
        vip: &Endpoint,
        backend: &Endpoint,
    ) -> Result<usize, DataplaneError> {
        let Some(id) = self.vips.get(vip).and_then(|v| v.backend_id(backend)) else {
            return Ok(0);
        };
        self.dataplane.remove_flows_of(&[id])
    }

    /// The simulator: which backend a new flow from `client:port` to `vip` would get,
    /// computed from the schedule as written, without the kernel.
    pub fn explain(
        &mut self,
        vip: &Endpoint,
        client: Ipv4Addr,
        client_port: u16,
    ) -> Result<Option<Endpoint>, DataplaneError> {
        let Some(applied) = self.vips.get(vip) else {
            return Ok(None);
        };
        let len = applied.schedule.len() as u32;
        if len == 0 {
            return Ok(None);
        }
        let slot = match applied.plan.spec.scheduler {
            Scheduler::Maglev => {
                let src = u32::from_ne_bytes(client.octets());
                flow_hash_v4(src, vip.addr[0], client_port.to_be(), vip.port, vip.proto) % len
            }
            // The next ring slot is wherever the shared cursor stands now.
            Scheduler::Rr => self.dataplane.rr_cursor(applied.id)? % len,
        };
        let applied = &self.vips[vip];
        Ok(applied.endpoint_of(applied.schedule[slot as usize]))
    }
}
