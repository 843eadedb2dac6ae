//! Everything that touches PostgreSQL below the areas' SQL functions: the
//! pool, per-call statement timeouts, traced statements, SQLSTATE mapping,
//! migrations and the embedded server.

pub mod coalesce;
pub mod driven;
pub mod embedded;
mod error;
pub mod migrate;
pub mod notify;
mod query;
pub mod replica;
pub mod shared;
pub mod tls;

pub use query::Stmt;
pub use tls::{PgConfig, PgTls, SslMode};

use crate::call::Call;
use crate::error::{Error, Reason, Result};
use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Timeouts,
};
use deadpool_postgres::{Hook, Metrics};
use deadpool_postgres::{HookError, TimeoutType};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tracing::Instrument;

/// How a short read reaches the database (see [`Db::read_conn`]).
pub enum ReadConn {
    /// A pooled connection of its own (or a replica's).
    Own(Box<Conn>),
    /// A shared connection, and the time left before the call's deadline
    /// when it is below the longest statement timeout.
    Shared(shared::Lease, Option<Duration>),
}

/// Runs `$body`, a short read (one or a few statements outside a
/// transaction) that evaluates to a `Result`, with `$c` bound to the client
/// [`Db::read_conn`] gives. On a shared connection the call's deadline is
/// kept here rather than by `statement_timeout`: past it the read ends with
/// DEADLINE_EXCEEDED and its statement, abandoned, is cancelled in the
/// server (see [`shared`]); a read that lost its connection (a terminated
/// backend, a restart) runs once more on another, as reads have no effect
/// to repeat. `$body` may be evaluated twice. When every shared connection
/// is full the read takes a pooled connection like any other call.
macro_rules! short_read {
    ($db:expr, $call:expr, |$c:ident| $body:block) => {{
        match $crate::db::Db::read_conn($db, $call).await? {
            $crate::db::ReadConn::Own(mut conn) => {
                let $c = conn.client().await?;
                async { $body }.await
            }
            $crate::db::ReadConn::Shared(lease, timeout) => {
                $crate::db::shared::within(timeout, async {
                    let first = {
                        let $c = lease.client();
                        async { $body }.await
                    };
                    if !$crate::db::shared::lost_connection(&first) {
                        lease.finish();
                        return first;
                    }
                    let Some(lease) = lease.retry().await? else {
                        return first;
                    };
                    let second = {
                        let $c = lease.client();
                        async { $body }.await
                    };
                    lease.finish();
                    second
                })
                .await
            }
        }
    }};
}
pub(crate) use short_read;

/// `application_name` of every connection the gateway opens.
pub const APPLICATION_NAME: &str = "verdict";

/// The shared database handle of a gateway: a pool plus the knowledge of
/// whether the schema is ready.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    ready: Arc<AtomicBool>,
    max_statement_timeout: Duration,
    max_waiting: usize,
    /// Connections handed to calls so far: every statement a call runs goes
    /// through one, so a call that did not raise this did not touch the
    /// database.
    acquired: Arc<AtomicU64>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    /// Read endpoints the read RPCs may use (see [`replica`]).
    replicas: Option<replica::Replicas>,
    /// Connections concurrent short reads share (see [`shared`]).
    shared: Option<Arc<shared::SharedReads>>,
}

/// How long an idle pooled connection is kept by default before it is
/// closed, so that a replica without traffic gives its slots back to the
/// database's `max_connections` for the replicas that have traffic.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a pooled connection lives at most by default: connections are
/// renewed over time (a failover, a changed setting, a rebalanced
/// connection pooler reach every one eventually).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// A connection idle at least this long is checked with an empty query
/// before a call gets it: long enough that a busy pool never pays the round
/// trip, short enough that a backend terminated (or a server failed over)
/// while the connection sat idle is found before a call uses it.
pub const VERIFY_AFTER_IDLE: Duration = Duration::from_millis(500);
/// For this long after any call saw a connection die (a FATAL from the
/// server, a closed socket), every pooled connection is checked before
/// reuse, however recently it was used: the connection that carried the
/// FATAL may not have noticed its own close yet when it is handed out
/// again, and its siblings may have died with it (a failover, a restart).
pub const VERIFY_AFTER_CONNECTION_ERROR: Duration = Duration::from_secs(5);

/// Milliseconds since [`since`]'s origin at the last connection-level error
/// (0: none yet).
static LAST_CONNECTION_ERROR_MS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

fn since() -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// Records that a call saw a connection die (called by the error mapping).
pub(crate) fn note_connection_error() {
    let now = since().as_millis() as u64 + 1;
    LAST_CONNECTION_ERROR_MS.store(now, std::sync::atomic::Ordering::Relaxed);
}

/// The clock of [`note_connection_error`], in milliseconds (never 0).
pub(crate) fn connection_clock_ms() -> u64 {
    since().as_millis() as u64 + 1
}

/// Whether a call saw a connection die at or after `clock_ms` (a reading of
/// [`connection_clock_ms`]).
pub(crate) fn connection_error_since(clock_ms: u64) -> bool {
    LAST_CONNECTION_ERROR_MS.load(std::sync::atomic::Ordering::Relaxed) >= clock_ms
}

/// Whether a connection died within `window`.
fn connection_error_within(window: Duration) -> bool {
    let last = LAST_CONNECTION_ERROR_MS.load(std::sync::atomic::Ordering::Relaxed);
    last != 0 && (since().as_millis() as u64 + 1).saturating_sub(last) <= window.as_millis() as u64
}

/// Longest the check of an idle connection may take before the connection
/// is given up on (a peer that vanished without closing the socket).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sizes and lifetimes of the pool (see [`Db::with_settings`]).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_size: usize,
    /// Calls that may wait for a connection at once; more are refused.
    pub max_waiting: usize,
    pub wait_timeout: Duration,
    pub max_statement_timeout: Duration,
    /// An idle connection is closed after this long unused.
    pub idle_timeout: Duration,
    /// A connection is closed (when idle) after this long open.
    pub max_lifetime: Duration,
}

/// Pool statistics, for health and admin reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
    pub max_size: usize,
}

/// Connection settings shared by the pool, migrations, the health probe and
/// the notification listener.
pub fn connection_config(
    mut config: tokio_postgres::Config,
    max_statement_timeout: Duration,
) -> tokio_postgres::Config {
    config.application_name(APPLICATION_NAME);
    // The ceiling every statement runs under unless a call lowers it; and
    // UTC, so calendar buckets (days, weeks, months) never depend on the
    // server's configured time zone. No JIT (issue 18): the aggregates'
    // estimates (generate_series counts 1000 rows) pass jit_above_cost, and
    // compiling cost seconds for a coverage trend doing 0.35 s of work.
    config.options(format!(
        "-c statement_timeout={} -c TimeZone=UTC -c jit=off",
        max_statement_timeout.as_millis()
    ));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives_idle(Duration::from_secs(30));
    config
}

impl Db {
    /// A lazy pool: no connection is made until the first call needs one.
    /// Every connection uses the TLS of `pg` (a bare `tokio_postgres::Config`
    /// gets its `sslmode`: disable, prefer or require).
    pub fn new(
        pg: impl Into<PgConfig>,
        max_size: usize,
        wait_timeout: Duration,
        max_statement_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::with_limits(
            pg,
            max_size,
            max_size * 4,
            wait_timeout,
            max_statement_timeout,
        )
    }

    /// A lazy pool that refuses calls at once while `max_waiting` calls
    /// already wait for a connection.
    pub fn with_limits(
        pg: impl Into<PgConfig>,
        max_size: usize,
        max_waiting: usize,
        wait_timeout: Duration,
        max_statement_timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::with_settings(
            pg,
            PoolSettings {
                max_size,
                max_waiting,
                wait_timeout,
                max_statement_timeout,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                max_lifetime: DEFAULT_MAX_LIFETIME,
            },
        )
    }

    /// A lazy pool with every setting given. Idle connections are closed by
    /// [`Db::maintain`] (which the gateway runs); a connection older than
    /// `max_lifetime` is closed instead of being handed out, and one idle
    /// for [`VERIFY_AFTER_IDLE`] is checked with an empty query first.
    pub fn with_settings(pg: impl Into<PgConfig>, settings: PoolSettings) -> anyhow::Result<Self> {
        Self::build(pg.into(), settings, true)
    }

    /// A pool on a read endpoint (a standby): like [`Db::with_settings`],
    /// except that a read-only server is what it expects.
    pub fn read_only(pg: impl Into<PgConfig>, settings: PoolSettings) -> anyhow::Result<Self> {
        Self::build(pg.into(), settings, false)
    }

    /// This pool, with read RPCs served by `replicas` when they can.
    pub fn with_replicas(mut self, replicas: replica::Replicas) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// The read endpoints, when configured.
    pub fn replicas(&self) -> Option<&replica::Replicas> {
        self.replicas.as_ref()
    }

    /// `writable`: a pooled connection to a server that no longer accepts
    /// writes (a demoted primary, a standby reached after a failover) is
    /// closed at its check instead of being reused.
    fn build(pg: PgConfig, settings: PoolSettings, writable: bool) -> anyhow::Result<Self> {
        let max_lifetime = settings.max_lifetime;
        let pool = new_pool(
            &pg,
            settings.max_size,
            settings.wait_timeout,
            max_lifetime,
            writable,
            false,
        )?;
        Ok(Db {
            pool,
            ready: Arc::new(AtomicBool::new(false)),
            max_statement_timeout: settings.max_statement_timeout,
            max_waiting: settings.max_waiting,
            acquired: Arc::new(AtomicU64::new(0)),
            idle_timeout: settings.idle_timeout,
            max_lifetime,
            replicas: None,
            shared: None,
        })
    }

    /// This pool, with up to `connections` more connections that concurrent
    /// reads share (see [`shared`]); 0: none, every read takes a pooled
    /// connection of its own.
    pub fn with_shared_reads(mut self, pg: &PgConfig, connections: usize) -> anyhow::Result<Self> {
        self.shared = match connections {
            0 => None,
            n => Some(shared::SharedReads::new(
                new_pool(pg, n, Duration::from_secs(5), self.max_lifetime, true, true)?,
                pg.config().clone(),
                pg.tls().connector(),
                n,
                self.max_lifetime,
            )),
        };
        Ok(self)
    }

    /// Closes idle connections unused for the idle timeout or older than the
    /// maximum lifetime, for as long as the gateway runs.
    pub async fn maintain(self) {
        let every = (self.idle_timeout.min(self.max_lifetime) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(15));
        loop {
            tokio::time::sleep(every).await;
            let (idle, lifetime) = (self.idle_timeout, self.max_lifetime);
            let removed = self
                .pool
                .retain(|_, m| m.last_used() < idle && m.age() < lifetime)
                .removed
                .len();
            if removed > 0 {
                tracing::debug!(closed = removed, "closed idle pooled connections");
            }
            if let Some(shared) = &self.shared {
                shared.close_idle(idle);
            }
        }
    }

    /// Whether a call could get a connection now: `true` while the pool
    /// holds any connection (idle ones are checked before a call gets
    /// them; busy ones are working), otherwise whether a new one can be
    /// made and answers within `timeout`. `false` when none can be made
    /// (the database refuses more connections, or is unreachable). The
    /// connection made here stays in the pool for the next call, and is
    /// closed after the idle timeout like any other: an idle gateway holds
    /// at most one.
    pub async fn can_connect(&self, timeout: Duration) -> bool {
        if self.pool.status().size > 0 {
            return true;
        }
        let timeouts = Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        match self.pool.timeout_get(&timeouts).await {
            Ok(client) => matches!(
                tokio::time::timeout(timeout, client.simple_query("")).await,
                Ok(Ok(_))
            ),
            // Every connection became busy meanwhile: they work.
            Err(PoolError::Timeout(TimeoutType::Wait)) => true,
            Err(e) => {
                tracing::debug!(error = %e, "the pool cannot get a connection");
                false
            }
        }
    }

    /// A second, separate pool on the same database (e.g. for watches, so
    /// their reads never queue behind request traffic) that opens its gates
    /// together with this one.
    pub fn sibling(
        &self,
        pg: impl Into<PgConfig>,
        max_size: usize,
        max_waiting: usize,
        wait_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut db = Self::with_limits(
            pg,
            max_size,
            max_waiting,
            wait_timeout,
            self.max_statement_timeout,
        )?;
        db.ready = self.ready.clone();
        Ok(db)
    }

    /// Marks the schema as migrated: calls may use the database from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.pool.status();
        PoolStats {
            size: s.size,
            available: s.available,
            waiting: s.waiting,
            max_size: s.max_size,
        }
    }

    pub fn close(&self) {
        self.pool.close();
        if let Some(shared) = &self.shared {
            shared.close();
        }
        if let Some(replicas) = &self.replicas {
            replicas.close();
        }
    }

    /// How many calls may wait for a connection before more are shed.
    pub fn max_waiting(&self) -> usize {
        self.max_waiting
    }

    /// How many times calls took a pooled connection (see the field).
    pub fn connections_acquired(&self) -> u64 {
        self.acquired.load(Ordering::Relaxed)
    }

    /// A pooled connection for one call. The time spent waiting for it is the
    /// `db.pool.acquire` span.
    /// A read RPC's connection may come from a read replica (see
    /// [`replica`]).
    pub async fn conn(&self, call: &Call) -> Result<Conn> {
        if let Some(replicas) = &self.replicas
            && self.is_ready()
            && let Some(conn) = replica::route(replicas, call).await
        {
            return Ok(conn);
        }
        self.conn_here(call).await
    }

    /// The connection for a short read of one or a few statements outside
    /// a transaction (a lookup by key, a keyset page): one shared with
    /// concurrent reads when it can be (see [`shared`]: without read
    /// endpoints, and with the shared connections on), else one of its own
    /// as [`Db::conn`] gives. Use it through [`short_read!`], which keeps the
    /// call's deadline and runs a read that lost its shared connection once
    /// more.
    pub async fn read_conn(&self, call: &Call) -> Result<ReadConn> {
        let Some(shared) = self.shared.as_ref().filter(|_| self.replicas.is_none()) else {
            return Ok(ReadConn::Own(Box::new(self.conn(call).await?)));
        };
        if !self.is_ready() {
            return Err(Error::Unavailable(
                Reason::DatabaseUnavailable,
                "the gateway has not finished connecting to and migrating the database".into(),
            ));
        }
        let timeout = self.statement_timeout(call)?;
        match shared.lease().await? {
            Some(lease) => {
                self.acquired.fetch_add(1, Ordering::Relaxed);
                Ok(ReadConn::Shared(lease, timeout))
            }
            None => Ok(ReadConn::Own(Box::new(self.conn_here(call).await?))),
        }
    }

    /// A connection of this pool itself (never a replica's).
    pub(crate) async fn conn_here(&self, call: &Call) -> Result<Conn> {
        if !self.is_ready() {
            return Err(Error::Unavailable(
                Reason::DatabaseUnavailable,
                "the gateway has not finished connecting to and migrating the database".into(),
            ));
        }
        let timeout = self.statement_timeout(call)?;
        self.acquired.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "db.pool.acquire",
            db.system.name = "postgresql",
            db.pool.size = tracing::field::Empty,
            db.pool.waiting = tracing::field::Empty
        );
        let status = self.pool.status();
        span.record("db.pool.size", status.size as i64);
        span.record("db.pool.waiting", status.waiting as i64);
        if status.available == 0 && status.waiting >= self.max_waiting {
            // Shed load: queueing more would only grow memory and latency.
            return Err(Error::ResourceExhausted(
                Reason::PoolExhausted,
                "too many calls are waiting for a database connection; retry later".into(),
            ));
        }
        let waiting = std::time::Instant::now();
        let got = self.pool.get().instrument(span).await;
        crate::observability::pool_wait(
            waiting.elapsed(),
            matches!(got, Err(PoolError::Timeout(_))),
        );
        let object = got?;
        Ok(Conn {
            object: Some(object),
            lowered_timeout: timeout,
            session_timeout_set: false,
            max_statement_timeout: self.max_statement_timeout,
        })
    }

    /// The statement timeout for this call: its remaining deadline, capped by
    /// the configured maximum. `None` when the maximum (the connection
    /// default) applies.
    fn statement_timeout(&self, call: &Call) -> Result<Option<Duration>> {
        match call.remaining() {
            Some(left) if left.is_zero() => Err(Error::DeadlineExceeded),
            Some(left) if left < self.max_statement_timeout => {
                // Leave a margin so PostgreSQL cancels the statement (and the
                // caller hears DEADLINE_EXCEEDED from us) before the trace
                // layer's deadline abandons the call with the query still running.
                let margin = left / 10 + Duration::from_millis(2);
                Ok(Some(
                    left.saturating_sub(margin).max(Duration::from_millis(1)),
                ))
            }
            _ => Ok(None),
        }
    }
}

/// A pooled connection bound to one call's deadline.
///
/// Use [`Conn::client`] for statements outside a transaction and
/// [`Conn::begin`] for a transaction; either applies the call's deadline as
/// PostgreSQL's `statement_timeout` so a query outliving its caller is
/// cancelled in the server, not merely abandoned.
pub struct Conn {
    object: Option<Object>,
    lowered_timeout: Option<Duration>,
    session_timeout_set: bool,
    max_statement_timeout: Duration,
}

impl Conn {
    fn object(&self) -> &Object {
        self.object.as_ref().expect("object is present until drop")
    }

    /// The connection for statements outside a transaction. A deadline below
    /// the maximum is set for the session and restored when the connection
    /// goes back to the pool.
    pub async fn client(&mut self) -> Result<&deadpool_postgres::Client> {
        if let Some(timeout) = self.lowered_timeout
            && !self.session_timeout_set
        {
            self.session_timeout_set = true;
            send_ahead(
                self.object()
                    .batch_execute(&format!("SET statement_timeout = {}", timeout.as_millis())),
            )?;
        }
        Ok(self.object())
    }

    /// The connection for a write that is one statement (its own
    /// transaction, one round trip instead of BEGIN … COMMIT): like
    /// [`Conn::client`], and the call's reply carries a consistency token
    /// as after [`Conn::begin`].
    pub async fn write_client(&mut self) -> Result<&deadpool_postgres::Client> {
        replica::note_write();
        self.client().await
    }

    /// Begins a transaction; a deadline below the maximum becomes its
    /// `SET LOCAL statement_timeout`. Dropping the transaction without
    /// `commit` rolls it back.
    pub async fn begin(&mut self) -> Result<deadpool_postgres::Transaction<'_>> {
        let timeout = self.lowered_timeout;
        let object = self.object.as_mut().expect("object is present until drop");
        replica::note_write();
        let tx = object.transaction().await?;
        set_local_timeout(&tx, timeout)?;
        Ok(tx)
    }
}

impl Conn {
    /// Begins a REPEATABLE READ, READ ONLY transaction: every statement in it
    /// sees one snapshot (exports, consistent multi-table reads).
    pub async fn begin_snapshot(&mut self) -> Result<deadpool_postgres::Transaction<'_>> {
        let timeout = self.lowered_timeout;
        let object = self.object.as_mut().expect("object is present until drop");
        let tx = object
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        set_local_timeout(&tx, timeout)?;
        Ok(tx)
    }

    /// The underlying client, for tools that need `&mut` (migrations).
    pub fn client_mut(&mut self) -> &mut tokio_postgres::Client {
        let object = self.object.as_mut().expect("object is present until drop");
        &mut *object
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.session_timeout_set {
            return;
        }
        // Restore the connection's default before another call gets it. The
        // reset queues behind anything still running on the connection.
        if let Some(object) = self.object.take() {
            let sql = format!(
                "SET statement_timeout = {}",
                self.max_statement_timeout.as_millis()
            );
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if object.batch_execute(&sql).await.is_err() {
                        // Never hand out a connection in an unknown state.
                        drop(Object::take(object));
                    }
                });
            } else {
                drop(Object::take(object));
            }
        }
    }
}

/// Applies a call's lowered statement timeout to the transaction it began.
fn set_local_timeout(
    tx: &deadpool_postgres::Transaction<'_>,
    timeout: Option<Duration>,
) -> Result<()> {
    if let Some(timeout) = timeout {
        send_ahead(tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis()
        )))?;
    }
    Ok(())
}

/// Sends a `SET` (the future of its `batch_execute`) without waiting for
/// its reply: it goes out on the connection now, ahead of the call's own
/// statements, which PostgreSQL runs after it, in the same round trip; the
/// connection reads its reply and drops it. A `SET` of a timeout has no
/// server-side failure of its own (a broken connection fails the statements
/// after it as well); a request that cannot be sent at all fails here.
fn send_ahead(
    set: impl std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>,
) -> Result<()> {
    let mut set = std::pin::pin!(set);
    // tokio-postgres sends a simple query on the first poll, before it
    // waits for the reply.
    match set
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(done) => done.map_err(Error::from),
        std::task::Poll::Pending => Ok(()),
    }
}

/// Connects one connection outside the pool (with the TLS of `config`),
/// driving it on a task of its own.
pub async fn connect_direct(
    config: &PgConfig,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect().await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "direct connection closed");
        }
    });
    Ok(client)
}

/// The pool's check of an idle connection before a call gets it: one past
/// its lifetime is closed; one idle for [`VERIFY_AFTER_IDLE`] must answer an
/// empty query (a backend terminated, a restarted or failed-over server,
/// a vanished peer), otherwise it is closed and the pool takes another.
async fn check_before_reuse(
    client: &mut ClientWrapper,
    metrics: &Metrics,
    max_lifetime: Duration,
    writable: bool,
) -> Result<(), HookError> {
    if metrics.age() >= max_lifetime {
        return Err(HookError::message(
            "connection reached its maximum lifetime",
        ));
    }
    if client.is_closed() {
        return Err(HookError::message("connection closed"));
    }
    if metrics.last_used() < VERIFY_AFTER_IDLE
        && !connection_error_within(VERIFY_AFTER_CONNECTION_ERROR)
    {
        return Ok(());
    }
    // On a primary pool the check also asks whether the server still takes
    // writes (one round trip either way): after a failover the old
    // primary's connections must not be reused even if it answers.
    let check = if writable {
        client.simple_query("SHOW transaction_read_only")
    } else {
        client.simple_query("")
    };
    match tokio::time::timeout(VERIFY_TIMEOUT, check).await {
        Ok(Ok(messages)) if writable && read_only(&messages) => {
            tracing::debug!("a pooled connection reaches a read-only server; replaced");
            Err(HookError::message(
                "the server no longer accepts writes (a failover?)",
            ))
        }
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "an idle pooled connection failed its check; replaced");
            Err(HookError::Backend(e))
        }
        Err(_) => Err(HookError::message(
            "an idle pooled connection did not answer",
        )),
    }
}

/// Whether `SHOW transaction_read_only` answered `on`.
fn read_only(messages: &[tokio_postgres::SimpleQueryMessage]) -> bool {
    messages.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("on"),
        _ => false,
    })
}

/// A pool of connections to `pg`: created on demand, each checked before
/// reuse (see [`check_before_reuse`]), connects and checks bounded to 5 s.
/// `batch_reads`: the pool of the shared read connections, whose reads
/// written together share a Sync ([`coalesce`]).
fn new_pool(
    pg: &PgConfig,
    max_size: usize,
    wait_timeout: Duration,
    max_lifetime: Duration,
    writable: bool,
    batch_reads: bool,
) -> anyhow::Result<Pool> {
    let manager = Manager::from_connect(
        pg.config().clone(),
        driven::Connect {
            tls: pg.tls().connector(),
            batch_reads,
        },
        ManagerConfig {
            // Only checks that the connection is not known closed: no
            // round trip for a connection that was just in use.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait_timeout))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .pre_recycle(Hook::async_fn(move |client, metrics| {
            Box::pin(
                async move { check_before_reuse(client, metrics, max_lifetime, writable).await },
            )
        }))
        .build()?)
}
