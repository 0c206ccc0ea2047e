//! The VRRPv3 state machine (RFC 5798 §6.4), pure: events and the time go in, what to
//! do comes out. The caller owns the socket, the addresses and the clock.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::packet::Advertisement;

/// Where a router stands.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not started, or stopped.
    #[default]
    Initialize,
    /// Watching the master's advertisements.
    Backup,
    /// Owning the addresses and advertising.
    Master,
}

impl Role {
    /// Every role, for exporting zeroes.
    pub const ALL: [Role; 3] = [Role::Initialize, Role::Backup, Role::Master];

    /// The name used in logs, metrics and the status page.
    pub fn label(self) -> &'static str {
        match self {
            Role::Initialize => "initialize",
            Role::Backup => "backup",
            Role::Master => "master",
        }
    }
}

/// Why a backup became master.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Takeover {
    /// No advertisement for the master-down interval: the master died or was cut off.
    MasterDown,
    /// The master said it was stopping (priority 0).
    MasterStopped,
    /// We outrank the master and preempt it.
    Preempted,
    /// The last agent stepped aside for a restart as MASTER, keeping the addresses,
    /// and we carried on before the backup noticed (see [`super::handoff`]).
    Resumed,
}

/// Whether a backup leaves the role to a master it outranks: after a restart too slow
/// to resume, the peer that took over meanwhile keeps it, since taking it back would
/// be a second failover for one restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Yielding {
    /// Preemption as configured.
    No,
    /// To the first master heard, once it is.
    ToFirstMaster,
    /// To this master while it advertises at least this priority: a lower one means it
    /// tracks a fault, and then we preempt as configured.
    To(Ipv4Addr, u8),
}

/// What the caller must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority.
    Advertise(u8),
    /// Take the addresses: add them and announce them with gratuitous ARP.
    TakeAddresses,
    /// Give the addresses up.
    ReleaseAddresses,
}

/// What the router is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterParams {
    /// Our advertisement interval.
    pub interval: Duration,
    /// Whether a higher-priority backup takes over from a lower-priority master.
    pub preempt: bool,
    /// Our own address on the link: breaks priority ties (the higher address wins).
    pub primary: Ipv4Addr,
}

/// One virtual router as seen by one of its routers.
#[derive(Clone, Debug)]
pub struct Router {
    params: RouterParams,
    priority: u8,
    role: Role,
    /// The interval the current master advertises with (learnt from it).
    master_interval: Duration,
    /// When the running timer fires: Master_Down_Timer as backup, Adver_Timer as master.
    deadline: Option<Instant>,
    /// Who the master is, as far as we know.
    master: Option<Ipv4Addr>,
    /// Why the running Master_Down_Timer would make us master.
    pending: Takeover,
    /// Why we last became master.
    last_takeover: Option<Takeover>,
    /// Whether we spare a master we outrank.
    yielding: Yielding,
}

impl Router {
    /// A router in `Initialize` with the given priority (1..=254).
    pub fn new(params: RouterParams, priority: u8) -> Router {
        Router {
            master_interval: params.interval,
            params,
            priority,
            role: Role::Initialize,
            deadline: None,
            master: None,
            pending: Takeover::MasterDown,
            last_takeover: None,
            yielding: Yielding::No,
        }
    }

    /// Why we last became master.
    pub fn last_takeover(&self) -> Option<Takeover> {
        self.last_takeover
    }

    /// Where we stand.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The priority we advertise.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The current master's address (ours when we are master).
    pub fn master(&self) -> Option<Ipv4Addr> {
        match self.role {
            Role::Master => Some(self.params.primary),
            _ => self.master,
        }
    }

    /// When [`Router::on_timer`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Skew_Time: lower priorities wait longer, so the best backup wins the race.
    fn skew(&self) -> Duration {
        self.master_interval * (256 - u32::from(self.priority)) / 256
    }

    /// Master_Down_Interval: three missed advertisements and the skew.
    pub fn master_down_interval(&self) -> Duration {
        self.master_interval * 3 + self.skew()
    }

    /// Startup: as backup, waiting for a master (priority 255, the address owner, is
    /// never configured here: the addresses are virtual).
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        self.become_backup(now, None);
        Vec::new()
    }

    /// Startup after a restart too slow to resume: as backup, but sparing the master
    /// that took over meanwhile even where preemption would take the role back.
    pub fn start_yielding(&mut self, now: Instant) -> Vec<Action> {
        self.yielding = Yielding::ToFirstMaster;
        self.start(now)
    }

    /// Startup after a restart that kept the addresses: MASTER at once, advertising
    /// now, before the backup's Master_Down_Timer (started by the last agent's final
    /// advertisement) runs out. The addresses never moved, so there is nothing to take
    /// or announce.
    pub fn resume(&mut self, now: Instant) -> Vec<Action> {
        self.role = Role::Master;
        self.last_takeover = Some(Takeover::Resumed);
        self.master = None;
        self.deadline = Some(now + self.params.interval);
        vec![Action::Advertise(self.priority)]
    }

    fn become_backup(&mut self, now: Instant, master: Option<(Ipv4Addr, Duration)>) {
        if let Some((address, interval)) = master {
            self.master = Some(address);
            self.master_interval = interval;
        } else {
            self.master = None;
            self.master_interval = self.params.interval;
        }
        self.role = Role::Backup;
        self.pending = Takeover::MasterDown;
        self.deadline = Some(now + self.master_down_interval());
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.role = Role::Master;
        self.last_takeover = Some(self.pending);
        // The master we spared is gone: from now on, the RFC's rules.
        self.yielding = Yielding::No;
        self.master = None;
        self.deadline = Some(now + self.params.interval);
        vec![Action::Advertise(self.priority), Action::TakeAddresses]
    }

    /// The running timer fired (or is late).
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match (self.role, self.deadline) {
            (_, Some(at)) if at > now => Vec::new(),
            (Role::Backup, _) => self.become_master(now),
            (Role::Master, _) => {
                self.deadline = Some(now + self.params.interval);
                vec![Action::Advertise(self.priority)]
            }
            (Role::Initialize, _) => Vec::new(),
        }
    }

    /// A valid advertisement for our virtual router arrived from `source`.
    pub fn on_advertisement(
        &mut self,
        now: Instant,
        source: Ipv4Addr,
        advert: &Advertisement,
    ) -> Vec<Action> {
        let interval = Duration::from_millis(u64::from(advert.interval_cs) * 10);
        match self.role {
            Role::Initialize => Vec::new(),
            Role::Backup => {
                let spared = self.spares(source, advert.priority);
                if advert.priority == 0 {
                    // The master is leaving: take over after the skew only.
                    self.deadline = Some(now + self.skew());
                    self.pending = Takeover::MasterStopped;
                } else if !self.params.preempt || advert.priority >= self.priority || spared {
                    self.become_backup(now, Some((source, interval)));
                } else {
                    // We preempt: let Master_Down_Timer run out.
                    self.pending = Takeover::Preempted;
                }
                Vec::new()
            }
            Role::Master => {
                if advert.priority == 0 {
                    // Another master leaving: make sure the backups hear us at once.
                    self.deadline = Some(now + self.params.interval);
                    vec![Action::Advertise(self.priority)]
                } else if advert.priority > self.priority
                    || (advert.priority == self.priority && source > self.params.primary)
                {
                    self.become_backup(now, Some((source, interval)));
                    vec![Action::ReleaseAddresses]
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Whether a backup leaves the role to `master` even where it outranks it (see
    /// [`Yielding`]). Asked on every advertisement, so that the master spared is the
    /// first one heard, whichever priority it had then.
    fn spares(&mut self, master: Ipv4Addr, priority: u8) -> bool {
        match self.yielding {
            Yielding::No => false,
            // A master leaving (priority 0) is not one to spare.
            Yielding::ToFirstMaster if priority > 0 => {
                self.yielding = Yielding::To(master, priority);
                true
            }
            Yielding::To(spared, floor) if spared == master && priority >= floor => true,
            Yielding::ToFirstMaster | Yielding::To(..) => {
                // It left, weakened (a tracked fault), or another router took over.
                self.yielding = Yielding::No;
                false
            }
        }
    }

    /// Our priority changed (tracking). A master says so at once.
    pub fn set_priority(&mut self, now: Instant, priority: u8) -> Vec<Action> {
        if priority == self.priority {
            return Vec::new();
        }
        self.priority = priority;
        match self.role {
            Role::Master => {
                self.deadline = Some(now + self.params.interval);
                vec![Action::Advertise(priority)]
            }
            _ => Vec::new(),
        }
    }

    /// Graceful stop: a master sends priority 0 so a backup takes over after its skew
    /// instead of the whole master-down interval.
    pub fn shutdown(&mut self) -> Vec<Action> {
        let was = self.role;
        self.role = Role::Initialize;
        self.deadline = None;
        match was {
            Role::Master => vec![Action::Advertise(0), Action::ReleaseAddresses],
            _ => Vec::new(),
        }
    }

    /// Stop for a restart: a master keeps its addresses and advertises once more at
    /// its priority, not 0 (which would hand the role over at once), so that the
    /// backup's Master_Down_Timer starts afresh and the next agent has all of it to
    /// resume (see [`super::handoff`]).
    pub fn suspend(&mut self) -> Vec<Action> {
        let was = self.role;
        self.role = Role::Initialize;
        self.deadline = None;
        match was {
            Role::Master => vec![Action::Advertise(self.priority)],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
    const MS: Duration = Duration::from_millis(1);

    fn router(priority: u8, preempt: bool) -> Router {
        Router::new(
            RouterParams {
                interval: 100 * MS,
                preempt,
                primary: ME,
            },
            priority,
        )
    }

    fn advert(priority: u8) -> Advertisement {
        Advertisement {
            vrid: 51,
            priority,
            interval_cs: 10,
            addresses: vec![],
        }
    }

    /// A router that became master alone, and the time it did.
    fn master(priority: u8, preempt: bool) -> (Router, Instant) {
        let t0 = Instant::now();
        let mut r = router(priority, preempt);
        r.start(t0);
        let t = t0 + r.master_down_interval();
        assert_eq!(
            r.on_timer(t),
            vec![Action::Advertise(priority), Action::TakeAddresses]
        );
        (r, t)
    }

    #[test]
    fn master_down_interval_is_three_intervals_and_the_skew() {
        // (256 - 150) * 100 ms / 256 = 41.40625 ms.
        let r = router(150, true);
        assert_eq!(r.master_down_interval(), Duration::from_nanos(341_406_250));
        assert!(router(254, true).master_down_interval() < r.master_down_interval());
    }

    #[test]
    fn a_lone_router_becomes_master_after_the_master_down_interval() {
        let t0 = Instant::now();
        let mut r = router(150, true);
        assert!(r.start(t0).is_empty());
        assert_eq!(r.role(), Role::Backup);
        assert!(r.on_timer(t0 + 340 * MS).is_empty());
        assert_eq!(r.role(), Role::Backup);
        let (r, t) = master(150, true);
        assert_eq!(r.role(), Role::Master);
        assert_eq!(r.last_takeover(), Some(Takeover::MasterDown));
        assert_eq!(r.deadline(), Some(t + 100 * MS));
    }

    #[test]
    fn a_master_advertises_every_interval() {
        let (mut r, t) = master(150, true);
        assert!(r.on_timer(t + 50 * MS).is_empty());
        assert_eq!(r.on_timer(t + 100 * MS), vec![Action::Advertise(150)]);
        assert_eq!(r.deadline(), Some(t + 200 * MS));
    }

    #[test]
    fn adverts_keep_a_backup_waiting() {
        let t0 = Instant::now();
        let mut r = router(100, true);
        r.start(t0);
        for i in 1..=10 {
            assert!(
                r.on_advertisement(t0 + i * 100 * MS, PEER, &advert(200))
                    .is_empty()
            );
            assert!(r.on_timer(t0 + i * 100 * MS + 50 * MS).is_empty());
        }
        assert_eq!(r.role(), Role::Backup);
        assert_eq!(r.master(), Some(PEER));
    }

    #[test]
    fn priority_zero_hands_over_after_the_skew_only() {
        let t0 = Instant::now();
        let mut r = router(100, true);
        r.start(t0);
        r.on_advertisement(t0, PEER, &advert(200));
        r.on_advertisement(t0 + 10 * MS, PEER, &advert(0));
        // Skew: (256 - 100) * 100 ms / 256 = 60.9 ms.
        assert!(r.on_timer(t0 + 70 * MS).is_empty());
        assert!(r.on_timer(t0 + 71 * MS).contains(&Action::TakeAddresses));
        assert_eq!(r.last_takeover(), Some(Takeover::MasterStopped));
    }

    #[test]
    fn a_higher_priority_takes_over_from_a_master() {
        let (mut r, t) = master(100, true);
        assert_eq!(
            r.on_advertisement(t, PEER, &advert(200)),
            vec![Action::ReleaseAddresses]
        );
        assert_eq!(r.role(), Role::Backup);
        // A lower one is ignored by a master.
        let (mut r, t) = master(100, true);
        assert!(r.on_advertisement(t, PEER, &advert(50)).is_empty());
        assert_eq!(r.role(), Role::Master);
    }

    #[test]
    fn equal_priorities_are_broken_by_the_higher_address() {
        let (mut r, t) = master(100, true);
        // PEER (10.0.0.4) > ME (10.0.0.3): we yield.
        assert_eq!(
            r.on_advertisement(t, PEER, &advert(100)),
            vec![Action::ReleaseAddresses]
        );
        let (mut r, t) = master(100, true);
        assert!(
            r.on_advertisement(t, Ipv4Addr::new(10, 0, 0, 2), &advert(100))
                .is_empty()
        );
    }

    #[test]
    fn preemption_decides_whether_a_better_backup_takes_over() {
        let t0 = Instant::now();
        let mut eager = router(200, true);
        let mut polite = router(200, false);
        eager.start(t0);
        polite.start(t0);
        let mut t = t0;
        for _ in 0..10 {
            t += 100 * MS;
            eager.on_advertisement(t, PEER, &advert(100));
            polite.on_advertisement(t, PEER, &advert(100));
            eager.on_timer(t);
            polite.on_timer(t);
        }
        assert_eq!(eager.role(), Role::Master);
        assert_eq!(eager.last_takeover(), Some(Takeover::Preempted));
        assert_eq!(polite.role(), Role::Backup);
    }

    #[test]
    fn a_master_announces_a_priority_change_at_once() {
        let (mut r, t) = master(150, true);
        assert_eq!(r.set_priority(t, 100), vec![Action::Advertise(100)]);
        assert!(r.set_priority(t, 100).is_empty());
    }

    #[test]
    fn shutdown_sends_priority_zero_and_releases() {
        let (mut r, _) = master(150, true);
        assert_eq!(
            r.shutdown(),
            vec![Action::Advertise(0), Action::ReleaseAddresses]
        );
        assert_eq!(r.role(), Role::Initialize);
        let mut backup = router(100, true);
        backup.start(Instant::now());
        assert!(backup.shutdown().is_empty());
    }

    #[test]
    fn suspending_for_a_restart_keeps_the_addresses_and_advertises_once_more() {
        let (mut r, _) = master(150, true);
        assert_eq!(r.suspend(), vec![Action::Advertise(150)]);
        assert_eq!(r.role(), Role::Initialize);
        assert_eq!(r.deadline(), None);
        let mut backup = router(100, true);
        backup.start(Instant::now());
        assert!(backup.suspend().is_empty());
    }

    #[test]
    fn a_resumed_router_is_master_at_once_and_advertises_on_schedule() {
        let t0 = Instant::now();
        let mut r = router(150, true);
        assert_eq!(r.resume(t0), vec![Action::Advertise(150)]);
        assert_eq!(r.role(), Role::Master);
        assert_eq!(r.master(), Some(ME));
        assert_eq!(r.last_takeover(), Some(Takeover::Resumed));
        assert_eq!(r.on_timer(t0 + 100 * MS), vec![Action::Advertise(150)]);
        // A peer that took over meanwhile is resolved as between two masters.
        assert_eq!(
            r.on_advertisement(t0 + 150 * MS, PEER, &advert(200)),
            vec![Action::ReleaseAddresses]
        );
        assert_eq!(r.role(), Role::Backup);
    }

    /// Advertisements from PEER every 100 ms with the given priorities; the router's
    /// role after each.
    fn hear(r: &mut Router, from: Instant, priorities: &[u8]) -> Vec<Role> {
        let mut roles = Vec::new();
        for (i, &p) in priorities.iter().enumerate() {
            let t = from + (i as u32 + 1) * 100 * MS;
            r.on_timer(t);
            r.on_advertisement(t, PEER, &advert(p));
            roles.push(r.role());
        }
        roles
    }

    #[test]
    fn a_late_restart_spares_the_master_that_took_over_until_it_weakens() {
        let t0 = Instant::now();
        let mut r = router(150, true);
        assert!(r.start_yielding(t0).is_empty());
        // PEER (100) took over while we restarted: we outrank it but leave it be.
        assert!(
            hear(&mut r, t0, &[100; 20])
                .iter()
                .all(|&role| role == Role::Backup)
        );
        assert_eq!(r.master(), Some(PEER));
        // It tracks a fault (priority 50): now we preempt as configured.
        let t = t0 + 2000 * MS;
        hear(&mut r, t, &[50; 5]);
        assert_eq!(r.role(), Role::Master);
        assert_eq!(r.last_takeover(), Some(Takeover::Preempted));
    }

    #[test]
    fn sparing_ends_when_the_spared_master_leaves_or_none_is_there() {
        let t0 = Instant::now();
        let mut r = router(150, true);
        r.start_yielding(t0);
        hear(&mut r, t0, &[100, 100, 0]);
        assert!(r.on_timer(t0 + 400 * MS).contains(&Action::TakeAddresses));
        assert_eq!(r.last_takeover(), Some(Takeover::MasterStopped));
        // Back to the RFC's rules: a lower-priority master is ignored.
        assert!(
            r.on_advertisement(t0 + 450 * MS, PEER, &advert(100))
                .is_empty()
        );
        assert_eq!(r.role(), Role::Master);

        let mut alone = router(150, true);
        alone.start_yielding(t0);
        let t = t0 + alone.master_down_interval();
        assert!(alone.on_timer(t).contains(&Action::TakeAddresses));
        assert_eq!(alone.last_takeover(), Some(Takeover::MasterDown));
    }
}
