//! The node's role in the pair and every change of it: opening writes, replicating,
//! fencing, promoting (by hand or automatically), rejoining after a failure, and
//! refusing a node that holds transactions the primary lacks.
//!
//! The rule that keeps the pair from having two primaries: a majority of three
//! voters, the two nodes and the balancers (the witness). A node is writable only
//! while the balancers keep checking it (every check of `/primary`, passed or not,
//! renews a lease of `lease_ms`): a primary whose lease runs out stops taking
//! writes, and no node opens writes without one. A replica promotes itself only
//! when it cannot see a primary itself *and* the balancers have seen the primary's
//! checks fail for longer than the lease. A primary cut off from the balancers has
//! then stopped taking writes before the replica opens them; one the balancers still
//! see is never replaced.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use hyper::Method;
use mysql_async::{Conn, Pool, prelude::Queryable};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    config::{Config, Failover, InitialRole, Replication},
    gtid,
    mariadb::ServerError,
    peer::{self, WitnessView},
    server_state::{self, ReplicaState, SemiSync, Snapshot},
};

/// How long the agent waits for its peer's answers.
const PEER_LIMIT: Duration = Duration::from_millis(300);
/// How long a promotion by hand tries to fence the old primary through its agent.
const FENCE_LIMIT: Duration = Duration::from_secs(3);
/// The same for an automatic one, which runs only when the old primary's agent has
/// not answered for a lease already: it must not hold the promotion long.
const AUTO_FENCE_LIMIT: Duration = Duration::from_millis(500);
/// How long a promotion waits for replication to apply what the primary had.
const APPLY_LIMIT: Duration = Duration::from_secs(20);
/// How long the witness must have seen the primary down beyond the lease.
const WITNESS_MARGIN: Duration = Duration::from_millis(200);

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Writable.
    Primary,
    /// Replicating from the primary, read-only.
    Replica,
    /// Read-only and not replicating: starting, fenced, or waiting for a primary.
    Fenced,
    /// Holds transactions the primary lacks: kept out until an operator rebuilds it.
    Diverged,
}

impl Role {
    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Fenced => "fenced",
            Role::Diverged => "diverged",
        }
    }
}

/// Counted events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Promotions of this node.
    pub promotions: u64,
    /// Automatic promotions refused (semi-sync had fallen back on the primary).
    pub promotions_refused: u64,
    /// Times this node stopped taking writes because its lease ran out.
    pub lease_fences: u64,
    /// Times its peer fenced it (promoting itself).
    pub peer_fences: u64,
    /// Times MariaDB exited by itself and was started again.
    pub mariadb_restarts: u64,
}

/// What `/status` shows, and what the peer reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's name.
    pub name: String,
    /// MariaDB's `server_id`.
    pub server_id: u32,
    /// Its role.
    pub role: Role,
    /// Where its MariaDB listens.
    pub mysql: SocketAddr,
    /// Whether MariaDB answered the last tick.
    pub mysql_up: bool,
    /// The server's state at the last tick.
    pub server: Snapshot,
    /// Why an automatic promotion was refused, while it is.
    pub promotion_blocked: Option<String>,
    /// Why the node is kept out of replication.
    pub diverged: Option<String>,
    /// Counted events.
    pub counters: Counters,
}

/// Mutable state, held briefly.
struct State {
    role: Role,
    mysql_up: bool,
    snapshot: Snapshot,
    /// Data directory created on this start: the pair may be new.
    new_pair: bool,
    /// The last check of `/primary`.
    lease_renewed: Option<Instant>,
    primary_lost_since: Option<Instant>,
    witness_down_since: Option<Instant>,
    /// Whether semi-sync was active on the primary when last seen.
    primary_semi_sync: Option<bool>,
    /// Since when the primary has had semi-sync on but this replica attached
    /// asynchronously.
    attached_async_since: Option<Instant>,
    promotion_blocked: Option<String>,
    diverged: Option<String>,
    counters: Counters,
}

/// The node agent's shared state.
pub struct Node {
    config: Config,
    repl_password: Option<String>,
    pool: Pool,
    state: Mutex<State>,
    /// Serialises role changes (ticks, `/promote`, `/fence`).
    changing: tokio::sync::Mutex<()>,
}

/// Why a role change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// Refused, with why.
    #[error("{0}")]
    Refused(String),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<mysql_async::Error> for RoleError {
    fn from(e: mysql_async::Error) -> Self {
        RoleError::Server(e.into())
    }
}

impl Node {
    /// A node over MariaDB reached through `pool`; `new_pair`: its data directory
    /// was created on this start.
    pub fn new(config: Config, pool: Pool, new_pair: bool) -> std::io::Result<Node> {
        let repl_password = match &config.replication {
            Some(repl) => Some(
                std::fs::read_to_string(&repl.password_file)?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Node {
            config,
            repl_password,
            pool,
            state: Mutex::new(State {
                role: Role::Fenced,
                mysql_up: false,
                snapshot: Snapshot::default(),
                new_pair,
                lease_renewed: None,
                primary_lost_since: None,
                witness_down_since: None,
                primary_semi_sync: None,
                attached_async_since: None,
                promotion_blocked: None,
                diverged: None,
                counters: Counters::default(),
            }),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.state().role
    }

    fn set_role(&self, role: Role) {
        let mut state = self.state();
        if state.role != role {
            info!(from = state.role.name(), to = role.name(), "role");
            state.role = role;
        }
        state.new_pair &= role == Role::Fenced;
        if role == Role::Primary {
            state.promotion_blocked = None;
        }
    }

    /// The token that authorises `/promote` and `/fence`: the replication password.
    pub fn token(&self) -> Option<&str> {
        self.repl_password.as_deref()
    }

    /// The status.
    pub fn status(&self) -> NodeStatus {
        let state = self.state();
        NodeStatus {
            name: self.config.name.clone(),
            server_id: self.config.server_id,
            role: state.role,
            mysql: self.config.listen,
            mysql_up: state.mysql_up,
            server: state.snapshot.clone(),
            promotion_blocked: state.promotion_blocked.clone(),
            diverged: state.diverged.clone(),
            counters: state.counters.clone(),
        }
    }

    /// `/primary`: whether this node takes writes. A check renews the lease.
    pub fn check_primary(&self) -> bool {
        let mut state = self.state();
        state.lease_renewed = Some(Instant::now());
        state.role == Role::Primary && state.mysql_up && !state.snapshot.read_only
    }

    /// `/replica`: whether this node replicates, both threads running, lag within
    /// the bound.
    pub fn check_replica(&self) -> bool {
        let state = self.state();
        let max_lag = self.config.replication.as_ref().map_or(0, |r| r.max_lag_s);
        state.role == Role::Replica
            && state.mysql_up
            && state.snapshot.replication.as_ref().is_some_and(|r| {
                r.io_running == "Yes"
                    && r.sql_running
                    && r.lag_seconds.is_some_and(|l| l <= max_lag)
            })
    }

    /// MariaDB exited and is being started again: read-only until the pair decides.
    pub fn mariadb_restarting(&self) {
        let mut state = self.state();
        state.counters.mariadb_restarts += 1;
        state.mysql_up = false;
        state.role = match state.role {
            Role::Diverged => Role::Diverged,
            _ => Role::Fenced,
        };
        state.new_pair = false;
    }

    /// Whether this node holds the lease (always, without automatic failover).
    fn leased(&self, repl: &Replication) -> bool {
        let Some(failover) = &repl.failover else {
            return true;
        };
        self.state()
            .lease_renewed
            .is_some_and(|t| t.elapsed() <= Duration::from_millis(failover.lease_ms))
    }

    async fn conn(&self) -> Result<Conn, ServerError> {
        match tokio::time::timeout(Duration::from_secs(2), self.pool.get_conn()).await {
            Ok(conn) => Ok(conn?),
            Err(_) => Err(ServerError::NotReady(Duration::from_secs(2))),
        }
    }

    /// One look at the server, the peer and (for a replica) the witness, and what
    /// follows from them. Runs every few hundred milliseconds.
    pub async fn tick(&self) {
        let snapshot = match self.conn().await {
            Ok(mut conn) => Snapshot::read(&mut conn).await,
            Err(e) => Err(e),
        };
        {
            let mut state = self.state();
            match snapshot {
                Ok(snapshot) => {
                    state.mysql_up = true;
                    state.snapshot = snapshot;
                }
                Err(e) => {
                    if state.mysql_up {
                        warn!("MariaDB does not answer: {e}");
                    }
                    state.mysql_up = false;
                    return;
                }
            }
        }
        let Some(repl) = self.config.replication.as_ref() else {
            // A single server: always the primary, without semi-sync.
            if self.role() != Role::Primary {
                let _guard = self.changing.lock().await;
                match self.open_writes(false).await {
                    Ok(()) => self.set_role(Role::Primary),
                    Err(e) => warn!("opening writes: {e}"),
                }
            }
            return;
        };
        // The peer and the witness asked together: a dead peer costs one deadline.
        let witness = async {
            match (&repl.failover, self.role()) {
                (Some(f), Role::Replica) => {
                    Some(peer::witness(f.witness, &f.write_vip, repl.peer.mysql).await)
                }
                _ => None,
            }
        };
        let (peer, witness) = tokio::join!(self.peer_status(repl), witness);
        let _guard = self.changing.lock().await;
        let outcome = match self.role() {
            Role::Primary => self.as_primary(repl, peer.as_ref()).await,
            Role::Replica => self.as_replica(repl, peer.as_ref(), witness).await,
            Role::Fenced => self.as_fenced(repl, peer.as_ref()).await,
            Role::Diverged => Ok(()),
        };
        if let Err(e) = outcome {
            warn!(role = self.role().name(), "{e}");
        }
    }

    async fn peer_status(&self, repl: &Replication) -> Option<NodeStatus> {
        let (status, body) =
            peer::request(repl.peer.agent, Method::GET, "/status", None, PEER_LIMIT)
                .await
                .ok()?;
        (status == 200)
            .then(|| serde_json::from_slice(&body).ok())
            .flatten()
    }

    /// The peer, if it is a writable primary.
    fn writable(peer: Option<&NodeStatus>) -> Option<&NodeStatus> {
        peer.filter(|p| p.role == Role::Primary && p.mysql_up && !p.server.read_only)
    }

    async fn open_writes(&self, semi_sync: bool) -> Result<(), ServerError> {
        let mut conn = self.conn().await?;
        if semi_sync {
            server_state::open_writes(&mut conn).await
        } else {
            conn.query_drop("SET GLOBAL read_only = OFF").await?;
            Ok(())
        }
    }

    async fn as_primary(
        &self,
        repl: &Replication,
        peer: Option<&NodeStatus>,
    ) -> Result<(), RoleError> {
        let lease_over = !self.leased(repl);
        let other_primary = Self::writable(peer).is_some();
        if lease_over || other_primary {
            let mut conn = self.conn().await?;
            server_state::fence(&mut conn).await?;
            if other_primary {
                error!("the peer is a writable primary too: stopping writes here");
            } else {
                warn!("no balancer has checked this primary within the lease: stopping writes");
                self.state().counters.lease_fences += 1;
            }
            self.set_role(Role::Fenced);
            return Ok(());
        }
        // Semi-sync an operator turned off stays off: visible in `/status` and
        // `/metrics`, and it keeps the replica from promoting itself.
        Ok(())
    }

    async fn as_replica(
        &self,
        repl: &Replication,
        peer: Option<&NodeStatus>,
        witness: Option<WitnessView>,
    ) -> Result<(), RoleError> {
        let snapshot = self.state().snapshot.clone();
        if let Some(primary) = Self::writable(peer) {
            {
                let mut state = self.state();
                state.primary_lost_since = None;
                state.primary_semi_sync = Some(primary.server.semi_sync.active);
                if primary.server.semi_sync.active {
                    state.promotion_blocked = None;
                }
            }
            let replication = snapshot.replication.as_ref();
            if let Some(r) = replication
                && r.io_error.0 == 1236
            {
                return self.diverge(primary, &r.io_error.1);
            }
            // Pointed at the primary; a thread an operator stopped stays stopped.
            if replication.is_none_or(|r| r.primary != primary.mysql.to_string()) {
                self.replicate_from(repl, primary.mysql, false).await?;
                return Ok(());
            }
            // A primary that turned semi-sync on after this replica attached waits
            // for acknowledgements it never gets: attach again, in semi-sync mode.
            let semi = &primary.server.semi_sync;
            let attached_async = semi.enabled
                && semi.clients == 0
                && replication.is_some_and(|r| r.io_running == "Yes");
            let since = {
                let mut state = self.state();
                if attached_async {
                    Some(*state.attached_async_since.get_or_insert_with(Instant::now))
                } else {
                    state.attached_async_since = None;
                    None
                }
            };
            if since.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                info!("attaching to the primary again in semi-sync mode");
                let mut conn = self.conn().await?;
                conn.query_drop("STOP SLAVE IO_THREAD").await?;
                conn.query_drop("START SLAVE IO_THREAD").await?;
                self.state().attached_async_since = None;
            }
            return Ok(());
        }
        let Some(failover) = &repl.failover else {
            return Ok(());
        };
        let lost = *self
            .state()
            .primary_lost_since
            .get_or_insert_with(Instant::now);
        let down = witness == Some(WitnessView::Down);
        let witnessed = {
            let mut state = self.state();
            if down {
                Some(*state.witness_down_since.get_or_insert_with(Instant::now))
            } else {
                state.witness_down_since = None;
                None
            }
        };
        let lease = Duration::from_millis(failover.lease_ms);
        let Some(witnessed) = witnessed else {
            return Ok(());
        };
        if lost.elapsed() < lease || witnessed.elapsed() < lease + WITNESS_MARGIN {
            return Ok(());
        }
        if self.state().primary_semi_sync != Some(true) {
            let mut state = self.state();
            if state.promotion_blocked.is_none() {
                let why = "the primary was last seen with semi-sync fallen back to asynchronous, \
                           so it may hold acknowledged writes this replica lacks: not promoting \
                           by itself; `foobar-db promote --force` accepts that loss";
                error!("{why}");
                state.promotion_blocked = Some(why.into());
                state.counters.promotions_refused += 1;
            }
            return Ok(());
        }
        warn!(primary = %repl.peer.mysql, "the primary is gone and the balancers agree: promoting");
        self.promote_locked(repl, Some(failover), false, true).await
    }

    async fn as_fenced(
        &self,
        repl: &Replication,
        peer: Option<&NodeStatus>,
    ) -> Result<(), RoleError> {
        let snapshot = self.state().snapshot.clone();
        if let Some(primary) = Self::writable(peer) {
            let mine = gtid::parse(&snapshot.gtid_binlog_pos).map_err(RoleError::Refused)?;
            let theirs =
                gtid::parse(&primary.server.gtid_binlog_state).map_err(RoleError::Refused)?;
            let errant = gtid::errant(&mine, &theirs);
            if !errant.is_empty() {
                let list: Vec<String> = errant.iter().map(ToString::to_string).collect();
                return self.diverge(primary, &format!("transactions {}", list.join(",")));
            }
            info!(primary = %primary.mysql, position = snapshot.gtid_binlog_pos, "joining as a replica");
            self.replicate_from(repl, primary.mysql, !mine.is_empty())
                .await?;
            self.set_role(Role::Replica);
            return Ok(());
        }
        // A new pair's first primary opens writes once the peer answers, is no
        // primary, and holds nothing: a rebuilt node never becomes a second primary.
        let new_pair = self.state().new_pair;
        if new_pair
            && repl.initial_role == InitialRole::Primary
            && self.leased(repl)
            && snapshot.gtid_binlog_pos.is_empty()
            && peer.is_some_and(|p| p.role != Role::Primary && p.server.gtid_binlog_pos.is_empty())
        {
            info!("a new pair: opening writes as its first primary");
            self.open_writes(true).await?;
            self.set_role(Role::Primary);
        }
        Ok(())
    }

    fn diverge(&self, primary: &NodeStatus, what: &str) -> Result<(), RoleError> {
        let why = format!(
            "this node holds {what} that the primary {} lacks, so it cannot replicate from \
             it; it stays read-only. To rejoin: stop foobar-db, move {} aside (its binary \
             logs keep those transactions for mariadb-binlog), start foobar-db: it rebuilds \
             from the primary",
            primary.mysql,
            self.config.state_dir.join("data").display(),
        );
        error!("{why}");
        let mut state = self.state();
        state.diverged = Some(why);
        state.role = Role::Diverged;
        Ok(())
    }

    async fn replicate_from(
        &self,
        repl: &Replication,
        primary: SocketAddr,
        demote: bool,
    ) -> Result<(), ServerError> {
        let mut conn = self.conn().await?;
        let password = self.repl_password.as_deref().unwrap_or_default();
        let tls_ca = self.config.tls.as_ref().map(|tls| tls.ca.as_path());
        server_state::replicate_from(&mut conn, primary, &repl.user, password, demote, tls_ca).await
    }

    /// `/fence`, by a peer promoting itself: stop writes and say how far this
    /// server's binary log goes, so the peer can wait until it has all of it.
    pub async fn fence_for_peer(&self) -> Result<String, RoleError> {
        let _guard = self.changing.lock().await;
        let mut conn = self.conn().await?;
        server_state::fence(&mut conn).await?;
        let position: String = conn
            .query_first("SELECT @@gtid_binlog_pos")
            .await?
            .unwrap_or_default();
        if self.role() == Role::Primary {
            self.state().counters.peer_fences += 1;
            warn!(position, "fenced by the peer");
            self.set_role(Role::Fenced);
        }
        Ok(position)
    }

    /// `foobar-db promote`: makes this replica the primary (see [`Node`]). Without
    /// `force`, a primary that cannot be fenced must be seen down by the witness.
    pub async fn promote(&self, force: bool) -> Result<(), RoleError> {
        let Some(repl) = self.config.replication.as_ref() else {
            return Err(RoleError::Refused(
                "a single node is always the primary".into(),
            ));
        };
        let _guard = self.changing.lock().await;
        match self.role() {
            Role::Primary => return Ok(()),
            Role::Diverged => {
                return Err(RoleError::Refused(
                    self.state().diverged.clone().unwrap_or_default(),
                ));
            }
            _ => {}
        }
        // Without a witness (and without force) the old primary must be fenced.
        self.promote_locked(repl, repl.failover.as_ref(), force, false)
            .await
    }

    /// The promotion's steps, role changes already serialised:
    /// 0. hold the lease (unless `force`);
    /// 1. fence the old primary through its agent; unreachable, it must be seen down
    ///    by the witness (unless `force`);
    /// 2. wait until replication has applied all the old primary had (fenced: its
    ///    binary log position; unreachable: what the IO thread received, the IO
    ///    thread stopped first so that position is final);
    /// 3. stop and forget replication; 4. open writes with semi-sync.
    async fn promote_locked(
        &self,
        repl: &Replication,
        witness: Option<&Failover>,
        force: bool,
        automatic: bool,
    ) -> Result<(), RoleError> {
        if !force && !self.leased(repl) {
            return Err(RoleError::Refused(
                "no balancer checks this node's /primary: it would take writes no one sends \
                 it, and without the lease it must not. Not promoting; --force promotes anyway"
                    .into(),
            ));
        }
        let started = Instant::now();
        let mut conn = self.conn().await?;
        let fence = peer::request(
            repl.peer.agent,
            Method::POST,
            "/fence",
            self.token(),
            if automatic {
                AUTO_FENCE_LIMIT
            } else {
                FENCE_LIMIT
            },
        );
        // Automatic: the old primary's agent has not answered for a lease, so it is
        // most likely gone; the IO thread is stopped meanwhile (stopping a semi-sync
        // one waits out a connection to the dead primary), and started again if the
        // fence works after all.
        let (answer, io_stopped) = if automatic {
            let (answer, stopped) = tokio::join!(fence, conn.query_drop("STOP SLAVE IO_THREAD"));
            stopped?;
            (answer, true)
        } else {
            (fence.await, false)
        };
        let fenced = match answer {
            Ok((200, body)) => {
                if io_stopped {
                    conn.query_drop("START SLAVE IO_THREAD").await?;
                }
                Some(String::from_utf8_lossy(&body).trim().to_owned())
            }
            Ok((status, body)) => {
                return Err(RoleError::Refused(format!(
                    "the old primary's agent refused to fence it ({status}: {}): not promoting",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            Err(e) => {
                let seen_down = match witness {
                    Some(f) => {
                        peer::witness(f.witness, &f.write_vip, repl.peer.mysql).await
                            == WitnessView::Down
                    }
                    None => false,
                };
                if !force && !seen_down {
                    return Err(RoleError::Refused(format!(
                        "the old primary cannot be fenced ({e}) and the balancers do not see it \
                         down: it may still take writes. Not promoting; --force promotes anyway"
                    )));
                }
                if !force && self.state().primary_semi_sync != Some(true) {
                    return Err(RoleError::Refused(format!(
                        "the old primary cannot be fenced ({e}) and was last seen with semi-sync \
                         fallen back to asynchronous: it may hold acknowledged writes this node \
                         lacks. Not promoting; --force accepts that loss"
                    )));
                }
                None
            }
        };
        info!(fenced = fenced.is_some(), elapsed = ?started.elapsed(), "fencing the old primary");
        let target = match fenced {
            Some(position) => position,
            None => {
                if !io_stopped {
                    conn.query_drop("STOP SLAVE IO_THREAD").await?;
                }
                info!(elapsed = ?started.elapsed(), "replication's IO thread stopped");
                let snapshot = Snapshot::read(&mut conn).await?;
                snapshot
                    .replication
                    .map(|r: ReplicaState| r.gtid_io_pos)
                    .unwrap_or_default()
            }
        };
        info!(
            target,
            "waiting for replication to apply the old primary's transactions"
        );
        if !server_state::wait_applied(&mut conn, &target, APPLY_LIMIT).await? {
            let snapshot = Snapshot::read(&mut conn).await?;
            return Err(RoleError::Refused(format!(
                "replication did not apply {target} within {APPLY_LIMIT:?} (applied: {}, SQL \
                 thread: {:?}): not promoted",
                snapshot.gtid_slave_pos,
                snapshot.replication.map(|r| r.sql_error),
            )));
        }
        conn.query_drop("STOP SLAVE").await?;
        conn.query_drop("RESET SLAVE ALL").await?;
        server_state::open_writes(&mut conn).await?;
        self.state().counters.promotions += 1;
        self.set_role(Role::Primary);
        info!(position = target, elapsed = ?started.elapsed(), "promoted: this node is the primary");
        Ok(())
    }

    /// The Prometheus text of the node (classic text format).
    pub fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let status = self.status();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP foobar_db_{name} {help}");
            let _ = writeln!(out, "# TYPE foobar_db_{name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "foobar_db_{name}{labels} {value}");
            }
        };
        let roles = [Role::Primary, Role::Replica, Role::Fenced, Role::Diverged].map(|r| {
            (
                format!("{{role=\"{}\"}}", r.name()),
                (r == status.role) as u8 as f64,
            )
        });
        metric(
            "role",
            "gauge",
            "The node's role (1 for the current one)",
            &roles,
        );
        let one = |v: f64| [(String::new(), v)];
        metric(
            "mariadb_up",
            "gauge",
            "Whether MariaDB answered the last tick",
            &one(status.mysql_up as u8 as f64),
        );
        metric(
            "read_only",
            "gauge",
            "Whether MariaDB is read-only",
            &one(status.server.read_only as u8 as f64),
        );
        let SemiSync {
            enabled,
            active,
            clients,
            acknowledged,
            unacknowledged,
            fallbacks,
        } = status.server.semi_sync;
        metric(
            "semi_sync_enabled",
            "gauge",
            "Semi-sync enabled on this server as a primary",
            &one(enabled as u8 as f64),
        );
        metric(
            "semi_sync_active",
            "gauge",
            "1: commits wait for a replica; 0 while enabled: fallen back to asynchronous (acknowledged writes may be lost)",
            &one(active as u8 as f64),
        );
        metric(
            "semi_sync_asynchronous",
            "gauge",
            "1 while semi-sync is enabled but fallen back to asynchronous",
            &one((enabled && !active) as u8 as f64),
        );
        metric(
            "semi_sync_clients",
            "gauge",
            "Replicas attached in semi-sync mode",
            &one(clients as f64),
        );
        metric(
            "semi_sync_acknowledged_commits_total",
            "counter",
            "Commits a replica acknowledged",
            &one(acknowledged as f64),
        );
        metric(
            "semi_sync_unacknowledged_commits_total",
            "counter",
            "Commits no replica acknowledged (asynchronous)",
            &one(unacknowledged as f64),
        );
        metric(
            "semi_sync_fallbacks_total",
            "counter",
            "Times semi-sync fell back to asynchronous",
            &one(fallbacks as f64),
        );
        let replication = status.server.replication.as_ref();
        metric(
            "replication_running",
            "gauge",
            "Both replication threads running",
            &one(replication.is_some_and(|r| r.io_running == "Yes" && r.sql_running) as u8 as f64),
        );
        if let Some(lag) = replication.and_then(|r| r.lag_seconds) {
            metric(
                "replication_lag_seconds",
                "gauge",
                "Seconds_Behind_Master",
                &one(lag as f64),
            );
        }
        let c = &status.counters;
        metric(
            "promotions_total",
            "counter",
            "Promotions of this node",
            &one(c.promotions as f64),
        );
        metric(
            "promotions_refused_total",
            "counter",
            "Automatic promotions refused: semi-sync had fallen back on the primary",
            &one(c.promotions_refused as f64),
        );
        metric(
            "lease_fences_total",
            "counter",
            "Times this primary stopped writes: no balancer check within the lease",
            &one(c.lease_fences as f64),
        );
        metric(
            "peer_fences_total",
            "counter",
            "Times the peer fenced this primary",
            &one(c.peer_fences as f64),
        );
        metric(
            "mariadb_restarts_total",
            "counter",
            "Times MariaDB exited by itself and was started again",
            &one(c.mariadb_restarts as f64),
        );
        out.push_str(&foobar_node::firewall::metrics_text("foobar_db"));
        out
    }
}
