//! Everything that touches PostgreSQL below the areas' SQL functions: the
//! pool, per-call statement timeouts, traced statements, SQLSTATE mapping,
//! migrations and the embedded server.

pub mod embedded;
mod error;
pub mod migrate;
pub mod notify;
mod query;
pub mod tls;

pub use query::Stmt;
pub use tls::{PgConfig, PgTls, SslMode};

use crate::call::Call;
use crate::error::{Error, Reason, Result};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tracing::Instrument;

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
    // server's configured time zone.
    config.options(format!(
        "-c statement_timeout={} -c TimeZone=UTC",
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
        let pg = pg.into();
        let manager = Manager::from_config(
            pg.config().clone(),
            pg.tls().connector(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(wait_timeout))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()?;
        Ok(Db {
            pool,
            ready: Arc::new(AtomicBool::new(false)),
            max_statement_timeout,
            max_waiting,
            acquired: Arc::new(AtomicU64::new(0)),
        })
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
    }

    /// How many times calls took a pooled connection (see the field).
    pub fn connections_acquired(&self) -> u64 {
        self.acquired.load(Ordering::Relaxed)
    }

    /// A pooled connection for one call. The time spent waiting for it is the
    /// `db.pool.acquire` span.
    pub async fn conn(&self, call: &Call) -> Result<Conn> {
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
        let object = self.pool.get().instrument(span).await?;
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
                // caller hears DEADLINE_EXCEEDED from us) before the transport's
                // own timer abandons the call with the query still running.
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
            self.object()
                .batch_execute(&format!("SET statement_timeout = {}", timeout.as_millis()))
                .await?;
        }
        Ok(self.object())
    }

    /// Begins a transaction; a deadline below the maximum becomes its
    /// `SET LOCAL statement_timeout`. Dropping the transaction without
    /// `commit` rolls it back.
    pub async fn begin(&mut self) -> Result<deadpool_postgres::Transaction<'_>> {
        let timeout = self.lowered_timeout;
        let object = self.object.as_mut().expect("object is present until drop");
        let tx = object.transaction().await?;
        set_local_timeout(&tx, timeout).await?;
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
        set_local_timeout(&tx, timeout).await?;
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
async fn set_local_timeout(
    tx: &deadpool_postgres::Transaction<'_>,
    timeout: Option<Duration>,
) -> Result<()> {
    if let Some(timeout) = timeout {
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            timeout.as_millis()
        ))
        .await?;
    }
    Ok(())
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
