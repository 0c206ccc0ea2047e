//! The database: two endpoints (writes to the primary, reads from a replica), the
//! schema migrations, the queries, and a supervisor that keeps each endpoint's health
//! so requests fail fast with 503 while it is away and succeed again by themselves
//! once it is back. Reads go to the primary while the replica is away, and a client
//! reads its own writes: a write answers its GTID, which a later read waits for on
//! the replica (briefly, then it reads from the primary). Each server worker has connection pools of its own ([`Pools`]),
//! used only on its thread; health, deadlines and metrics are shared ([`Db`]).

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mysql_async::{
    Conn, OptsBuilder, Params, Pool, PoolConstraints, PoolOpts, SslOpts, prelude::Queryable,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::Database;

/// A post as stored and as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Post {
    /// Its id, increasing with time.
    pub id: u64,
    /// Who wrote it.
    pub author: String,
    /// What they wrote.
    pub text: String,
    /// When, RFC 3339 in UTC with microseconds.
    pub created_at: String,
}

/// Why the database could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The endpoint is down or refused us.
    #[error("the database ({role}) is unavailable: {message}")]
    Unavailable {
        /// `write` or `read`.
        role: &'static str,
        /// What happened.
        message: String,
    },
    /// A query took longer than its deadline.
    #[error("the database ({role}) did not answer in time")]
    Timeout {
        /// `write` or `read`.
        role: &'static str,
    },
    /// The schema has not been created yet (the primary was never reachable).
    #[error("the database schema is not ready yet")]
    NotReady,
}

/// A file of `[database]` that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {path}: {source}")]
pub struct UnreadableFile {
    /// The configuration field naming it.
    pub field: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

/// The error of reading `path`, the file of `field`.
fn unreadable(field: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UnreadableFile {
    let path = path.to_owned();
    move |source| UnreadableFile {
        field,
        path,
        source,
    }
}

/// The permission bits of `path` when its group or others may read or write it.
fn readable_by_others(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// The schema, one step per version; a step is applied once, in order, by the first
/// node that gets the migration lock.
const MIGRATIONS: &[(u32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS posts (
        id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
        author VARCHAR(64) NOT NULL,
        text VARCHAR(2000) NOT NULL,
        created_at DATETIME(6) NOT NULL
    ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci",
)];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    reason: &'static str,
}

/// How long a health ping of an endpoint may take.
const PING_LIMIT: Duration = Duration::from_millis(250);

/// How long a read waits on the replica for the client's last write.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_millis(500);

/// Whether `value` looks like a GTID position (`0-1-42`, comma-separated): what a
/// client's cookie may hand back.
pub fn is_gtid_list(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 200
        && value.split(',').all(|gtid| {
            let parts: Vec<&str> = gtid.split('-').collect();
            parts.len() == 3
                && parts.iter().all(|p| {
                    !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit())
                })
        })
}

/// One endpoint (write or read) and what the supervisor knows of it.
struct Endpoint {
    role: &'static str,
    addr: SocketAddr,
    up: AtomicBool,
    failed_pings: AtomicU32,
    /// Times it went down: the workers' pools are made again after one (their
    /// connections are flows to a server that may be gone).
    outages: AtomicUsize,
}

/// Both endpoints, their deadlines, health and metrics.
pub struct Db {
    write: Endpoint,
    read: Endpoint,
    opts: OptsBuilder,
    pool_max: usize,
    connect_timeout: Duration,
    query_timeout: Duration,
    schema_ready: AtomicBool,
    queries: Family<QueryLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    up: Family<EndpointLabels, Gauge>,
    fallbacks: Family<FallbackLabels, Counter>,
}

/// What `/healthz` shows of the database.
#[derive(Clone, Debug, Serialize)]
pub struct DbHealth {
    /// The write endpoint answers.
    pub write: bool,
    /// The read endpoint answers.
    pub read: bool,
    /// The schema is in place.
    pub schema_ready: bool,
}

fn query_histogram() -> Histogram {
    Histogram::new([
        0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 3.0,
    ])
}

impl Db {
    /// The database of `config` (nothing is connected yet); metrics go to `registry`.
    pub fn new(config: &Database, registry: &mut Registry) -> Result<Arc<Self>, UnreadableFile> {
        let password = std::fs::read_to_string(&config.password_file)
            .map_err(unreadable("database.password_file", &config.password_file))?
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        if let Some(mode) = readable_by_others(&config.password_file) {
            warn!(
                file = %config.password_file.display(),
                mode = %format!("{mode:o}"),
                "a password file others may read: chmod 600 it"
            );
        }
        let mut opts = OptsBuilder::default()
            .user(Some(config.user.clone()))
            .pass(Some(password))
            .db_name(Some(config.name.clone()))
            .tcp_nodelay(true)
            // Loopback would otherwise silently use the Unix socket.
            .prefer_socket(false);
        if let Some(ca) = &config.tls_ca {
            // Read once here, so a missing file stops the start rather than every
            // connection. Only this CA is trusted, not the public roots; the name
            // checked is the address connected to (an IP address: the VIP's).
            let ca = std::fs::read(ca).map_err(unreadable("database.tls_ca", ca))?;
            opts = opts.ssl_opts(
                SslOpts::default()
                    .with_root_certs(vec![ca.into()])
                    .with_disable_built_in_roots(true),
            );
        }
        let endpoint = |role, addr| Endpoint {
            role,
            addr,
            up: AtomicBool::new(false),
            failed_pings: AtomicU32::new(0),
            outages: AtomicUsize::new(0),
        };
        let queries = Family::<QueryLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            query_histogram,
        );
        let up = Family::<EndpointLabels, Gauge>::default();
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "db_read_fallbacks",
            "Reads served by the primary: the replica away, or behind the client's last write",
            fallbacks.clone(),
        );
        registry.register(
            "db_queries",
            "Database queries by endpoint (write, read) and outcome (ok, error, timeout, unavailable)",
            queries.clone(),
        );
        registry.register(
            "db_query_duration_seconds",
            "Time of a database query, connection included",
            latency.clone(),
        );
        registry.register(
            "db_up",
            "Whether the endpoint answered its last checks",
            up.clone(),
        );
        Ok(Arc::new(Self {
            write: endpoint("write", config.write),
            read: endpoint("read", config.read.unwrap_or(config.write)),
            opts,
            pool_max: config.pool_max,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            query_timeout: Duration::from_millis(config.query_timeout_ms),
            schema_ready: AtomicBool::new(false),
            queries,
            latency,
            up,
            fallbacks,
        }))
    }

    /// Checks both endpoints every fifth of a second and creates the schema once
    /// the primary answers; runs until the process ends.
    pub async fn supervise(self: Arc<Self>) {
        let pools = self.pools(1, 2);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.schema_ready.load(Ordering::Relaxed) {
                match pools.migrate().await {
                    Ok(applied) => {
                        info!(applied, "schema ready");
                        self.schema_ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => warn!("schema not ready: {e}"),
                }
            }
            let (write, read) = tokio::join!(self.ping(&self.write), self.ping(&self.read));
            self.mark(&self.write, write);
            self.mark(&self.read, read);
        }
    }

    /// Whether `endpoint` answers, on a connection of its own: a pooled one may be
    /// a flow the balancer has moved away from a failed server, which would hang
    /// until the query deadline instead of telling.
    async fn ping(&self, endpoint: &Endpoint) -> bool {
        let opts = self
            .opts
            .clone()
            .ip_or_hostname(endpoint.addr.ip().to_string())
            .tcp_port(endpoint.addr.port());
        // The write endpoint must take writes: a server still read-only (starting,
        // fenced, a replica) is not the primary yet.
        let writes = std::ptr::eq(endpoint, &self.write);
        let ping = async {
            let mut conn = Conn::new(opts).await?;
            let read_only: Option<bool> = conn.query_first("SELECT @@read_only").await?;
            conn.disconnect().await?;
            Ok::<_, mysql_async::Error>(!(writes && read_only != Some(false)))
        };
        matches!(tokio::time::timeout(PING_LIMIT, ping).await, Ok(Ok(true)))
    }

    /// Two failed checks in a row take an endpoint down; one success brings it back.
    fn mark(&self, endpoint: &Endpoint, ok: bool) {
        let was_up = endpoint.up.load(Ordering::Relaxed);
        let up = if ok {
            endpoint.failed_pings.store(0, Ordering::Relaxed);
            true
        } else {
            endpoint.failed_pings.fetch_add(1, Ordering::Relaxed) + 1 < 2 && was_up
        };
        if up != was_up {
            endpoint.up.store(up, Ordering::Relaxed);
            if !up {
                endpoint.outages.fetch_add(1, Ordering::Relaxed);
            }
            if up {
                info!(endpoint = endpoint.role, addr = %endpoint.addr, "database up");
            } else {
                warn!(endpoint = endpoint.role, addr = %endpoint.addr, "database down: answering 503");
            }
        }
        self.up
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.role,
            })
            .set(up as i64);
    }

    /// Health for `/healthz`.
    pub fn health(&self) -> DbHealth {
        DbHealth {
            write: self.write.up.load(Ordering::Relaxed),
            read: self.read.up.load(Ordering::Relaxed),
            schema_ready: self.schema_ready.load(Ordering::Relaxed),
        }
    }

    /// Connection pools to both endpoints for one worker, `1/workers` of the configured
    /// connections each (at least `floor`).
    pub fn pools(self: &Arc<Self>, workers: usize, floor: usize) -> Pools {
        let max = (self.pool_max / workers.max(1)).max(floor);
        Pools {
            db: self.clone(),
            write: Mutex::new((0, self.pool(self.write.addr, max))),
            read: Mutex::new((0, self.pool(self.read.addr, max))),
            max,
        }
    }

    /// A pool of at most `max` connections to `addr`.
    fn pool(&self, addr: SocketAddr, max: usize) -> Pool {
        let constraints = PoolConstraints::new(0, max).expect("max is above 0");
        Pool::new(
            self.opts
                .clone()
                .ip_or_hostname(addr.ip().to_string())
                .tcp_port(addr.port())
                // A reset on every return to the pool would also drop the prepared
                // statements, so every query would be prepared again: 3× the work.
                .pool_opts(
                    PoolOpts::default()
                        .with_constraints(constraints)
                        .with_reset_connection(false)
                        // Without it, a connection above the pool's minimum (0) is
                        // closed as soon as it is idle: one connection per query.
                        .with_inactive_connection_ttl(Duration::from_secs(60)),
                ),
        )
    }

    /// Runs `query` on a connection of `pool` to `endpoint` within the deadlines,
    /// counting it.
    async fn run<T, F, Fut>(&self, endpoint: &Endpoint, pool: &Pool, query: F) -> Result<T, DbError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, mysql_async::Error>>,
    {
        let started = Instant::now();
        let role = endpoint.role;
        let outcome = async {
            let conn = match tokio::time::timeout(self.connect_timeout, pool.get_conn()).await {
                Err(_) => {
                    return Err(DbError::Unavailable {
                        role,
                        message: "timed out connecting".into(),
                    });
                }
                Ok(Err(e)) => {
                    return Err(DbError::Unavailable {
                        role,
                        message: e.to_string(),
                    });
                }
                Ok(Ok(conn)) => conn,
            };
            match tokio::time::timeout(self.query_timeout, query(conn)).await {
                Err(_) => Err(DbError::Timeout { role }),
                Ok(Err(e)) => Err(DbError::Unavailable {
                    role,
                    message: e.to_string(),
                }),
                Ok(Ok(value)) => Ok(value),
            }
        }
        .await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(DbError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        self.queries
            .get_or_create(&QueryLabels {
                endpoint: role,
                outcome: label,
            })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels { endpoint: role })
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// The endpoint for a request, unless it is known to be away (then fail at once).
    fn usable<'a>(&self, endpoint: &'a Endpoint) -> Result<&'a Endpoint, DbError> {
        if !self.schema_ready.load(Ordering::Relaxed) {
            return Err(DbError::NotReady);
        }
        if !endpoint.up.load(Ordering::Relaxed) {
            self.queries
                .get_or_create(&QueryLabels {
                    endpoint: endpoint.role,
                    outcome: "unavailable",
                })
                .inc();
            return Err(DbError::Unavailable {
                role: endpoint.role,
                message: "failed its last checks".into(),
            });
        }
        Ok(endpoint)
    }
}

/// A worker's connections to both endpoints, each with its endpoint's outage count
/// when it was made.
pub struct Pools {
    db: Arc<Db>,
    write: Mutex<(usize, Pool)>,
    read: Mutex<(usize, Pool)>,
    max: usize,
}

impl Pools {
    /// The pool of `endpoint`, made again if the endpoint has been down since.
    fn of(&self, endpoint: &Endpoint) -> Pool {
        let slot = if std::ptr::eq(endpoint, &self.db.write) {
            &self.write
        } else {
            &self.read
        };
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let outages = endpoint.outages.load(Ordering::Relaxed);
        if slot.0 != outages {
            let old = std::mem::replace(&mut slot.1, self.db.pool(endpoint.addr, self.max));
            slot.0 = outages;
            tokio::spawn(old.disconnect());
        }
        slot.1.clone()
    }

    /// Stores a new post; its id and time come from the primary's commit. Also
    /// answers the commit's GTID, for the client's next reads.
    pub async fn insert_post(&self, author: &str, text: &str) -> Result<(Post, String), DbError> {
        let endpoint = self.db.usable(&self.db.write)?;
        let created_at = chrono::Utc::now().naive_utc();
        let (author_owned, text_owned) = (author.to_owned(), text.to_owned());
        let (id, gtid) = self
            .db
            .run(endpoint, &self.of(endpoint), |mut conn| async move {
                conn.exec_drop(
                    "INSERT INTO posts (author, text, created_at) VALUES (?, ?, ?)",
                    (author_owned, text_owned, created_at),
                )
                .await?;
                let id = conn.last_insert_id().unwrap_or(0);
                let gtid: Option<String> = conn.query_first("SELECT @@last_gtid").await?;
                Ok((id, gtid.unwrap_or_default()))
            })
            .await?;
        let post = Post {
            id,
            author: author.to_owned(),
            text: text.to_owned(),
            created_at: rfc3339(created_at),
        };
        Ok((post, gtid))
    }

    /// One post; `after`: the client's last write, which the answer must include.
    pub async fn post(&self, id: u64, after: Option<&str>) -> Result<Option<Post>, DbError> {
        let rows = self
            .read(
                "SELECT id, author, text, created_at FROM posts WHERE id = ?",
                (id,).into(),
                after,
            )
            .await?;
        Ok(rows.into_iter().next().map(post_of))
    }

    /// The newest `limit` posts older than `before` (all if none), newest first.
    pub async fn posts(
        &self,
        before: Option<u64>,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Post>, DbError> {
        let before = before.unwrap_or(u64::MAX);
        let rows = self
            .read(
                "SELECT id, author, text, created_at FROM posts WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before, limit).into(),
                after,
            )
            .await?;
        Ok(rows.into_iter().map(post_of).collect())
    }

    /// A read: on the replica, once it has applied `after` (waited for briefly);
    /// on the primary when the replica is away or behind.
    async fn read(
        &self,
        sql: &'static str,
        params: Params,
        after: Option<&str>,
    ) -> Result<Vec<PostRow>, DbError> {
        let fallback = match self.db.usable(&self.db.read) {
            Err(DbError::NotReady) => return Err(DbError::NotReady),
            Err(_) => "replica_away",
            Ok(endpoint) => {
                let after = after.map(str::to_owned);
                let replica_params = params.clone();
                let rows = self
                    .db
                    .run(endpoint, &self.of(endpoint), |mut conn| async move {
                        if let Some(gtid) = after {
                            let reached: Option<i64> = conn
                                .exec_first(
                                    "SELECT MASTER_GTID_WAIT(?, ?)",
                                    (gtid, READ_YOUR_WRITES_WAIT.as_secs_f64()),
                                )
                                .await?;
                            if reached != Some(0) {
                                return Ok(None);
                            }
                        }
                        conn.exec(sql, replica_params).await.map(Some)
                    })
                    .await;
                match rows {
                    Ok(Some(rows)) => return Ok(rows),
                    Ok(None) => "replica_behind",
                    Err(_) => "replica_failed",
                }
            }
        };
        self.db
            .fallbacks
            .get_or_create(&FallbackLabels { reason: fallback })
            .inc();
        let endpoint = self.db.usable(&self.db.write)?;
        self.db
            .run(endpoint, &self.of(endpoint), |mut conn| async move {
                conn.exec(sql, params).await
            })
            .await
    }

    /// Applies the migrations not applied yet, under a lock so two nodes starting
    /// together do not race; returns how many it applied.
    async fn migrate(&self) -> Result<usize, DbError> {
        self.db
            .run(
                &self.db.write,
                &self.of(&self.db.write),
                |mut conn| async move {
                    conn.query_drop(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version INT UNSIGNED NOT NULL PRIMARY KEY,
                    applied_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
                ) ENGINE=InnoDB",
                    )
                    .await?;
                    let locked: Option<i64> = conn
                        .query_first("SELECT GET_LOCK('foobar_migrations', 2)")
                        .await?;
                    if locked != Some(1) {
                        return Err(mysql_async::Error::Other(
                            "another node is migrating".into(),
                        ));
                    }
                    let applied: Vec<u32> =
                        conn.query("SELECT version FROM schema_migrations").await?;
                    let mut count = 0;
                    for &(version, sql) in MIGRATIONS {
                        if applied.contains(&version) {
                            continue;
                        }
                        conn.query_drop(sql).await?;
                        conn.exec_drop(
                            "INSERT INTO schema_migrations (version) VALUES (?)",
                            (version,),
                        )
                        .await?;
                        count += 1;
                    }
                    conn.query_drop("DO RELEASE_LOCK('foobar_migrations')")
                        .await?;
                    Ok(count)
                },
            )
            .await
    }

    /// Closes the pools.
    pub async fn close(&self) {
        for endpoint in [&self.db.write, &self.db.read] {
            let _ = self.of(endpoint).disconnect().await;
        }
    }
}

type PostRow = (u64, String, String, chrono::NaiveDateTime);

fn post_of((id, author, text, created_at): PostRow) -> Post {
    Post {
        id,
        author,
        text,
        created_at: rfc3339(created_at),
    }
}

fn rfc3339(t: chrono::NaiveDateTime) -> String {
    t.and_utc().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}
