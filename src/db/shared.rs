//! Connections that concurrent short reads share (issue 13).
//!
//! A pooled connection serves one call at a time: each read costs its own
//! round trip, and every round trip wakes a PostgreSQL backend and, for the
//! reply, the gateway. Reads given the same connection are pipelined by
//! tokio-postgres instead: the statements of every read waiting at that
//! moment go out in one write, the backend runs them back to back, and the
//! replies come back together. Measured from outside (h2load GetSession,
//! 8 calls in flight, `../shared/bench/side-by-side.sh`'s setup), one
//! shared connection took the gateway's CPU per call from 52–62 µs to
//! 38–44 µs.
//!
//! The statements pipelined together also share one Sync
//! ([`super::coalesce`]): the backend runs them as a batch and flushes its
//! answers once.
//!
//! Only reads of one or a few short statements outside a transaction use
//! them ([`super::short_read!`]): lookups by key, which cost the server
//! little. (A page of rows does not: pipelined on one connection, the pages
//! of every caller would run on one backend, and ListSessions served 30 %
//! fewer calls per second that way.) A statement
//! that waits (for a lock, an overloaded server) holds up the reads
//! pipelined behind it on its connection, so:
//! - a connection is filled up to [`DEPTH`] reads in flight before the next
//!   one is used, and at most `connections` are opened (lazily);
//! - a read abandoned before its reply (its deadline passed, its caller
//!   left) retires its connection: no new read is given it, and once no read
//!   is left on it every statement still running or queued on it is
//!   cancelled in the server, and the connection is closed;
//! - a read that finds its connection closed (a terminated backend, a
//!   restart) retires it and runs once more on another;
//! - like pooled ones, a shared connection is renewed once it reaches the
//!   pool's maximum lifetime, and after any call saw a connection die (a
//!   failover, a restart: the next read gets one checked by the pool, not
//!   one that may still reach a demoted server).

use crate::error::Result;
use deadpool_postgres::{Object, Pool};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Reads in flight on one connection before the next connection is used.
pub const DEPTH: usize = 16;

/// The shared connections of a pool (see the module).
pub struct SharedReads {
    pool: Pool,
    slots: Box<[Slot]>,
    tls: MakeRustlsConnect,
    /// Where the connections go, for cancels.
    config: Arc<tokio_postgres::Config>,
    max_lifetime: std::time::Duration,
}

#[derive(Default)]
struct Slot {
    conn: Mutex<Option<Arc<SharedConn>>>,
    /// Held while the slot's connection is being made, so that concurrent
    /// reads wait for one connection rather than each making its own.
    connecting: tokio::sync::Mutex<()>,
}

/// One shared connection and what is on it.
struct SharedConn {
    object: Option<Object>,
    in_flight: AtomicUsize,
    /// A read was abandoned on it: cancel what runs, close it at the end.
    abandoned: AtomicBool,
    tls: MakeRustlsConnect,
    config: Arc<tokio_postgres::Config>,
    /// When it was given its slot, by [`super::connection_clock_ms`].
    given_ms: u64,
    /// When it reaches the pool's maximum lifetime, by the same clock.
    renew_ms: u64,
    /// When a read last took it, by the same clock.
    leased_ms: std::sync::atomic::AtomicU64,
}

impl Drop for SharedConn {
    fn drop(&mut self) {
        if let Some(object) = self.object.take()
            && self.abandoned.load(Ordering::Acquire)
        {
            // Not back to the pool: a cancel may still be on its way to it.
            drop(Object::take(object));
        }
    }
}

/// One read's use of a shared connection.
pub struct Lease {
    conn: Arc<SharedConn>,
    slot: usize,
    shared: Arc<SharedReads>,
    done: bool,
}

impl SharedReads {
    /// `pool` holds the connections (at most `connections`); a
    /// connection is renewed after `max_lifetime`.
    pub fn new(
        pool: Pool,
        config: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        connections: usize,
        max_lifetime: std::time::Duration,
    ) -> Arc<Self> {
        Arc::new(SharedReads {
            pool,
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
            tls,
            config: Arc::new(config),
            max_lifetime,
        })
    }

    /// A connection for one read: the first slot with room (fewer than
    /// [`DEPTH`] reads in flight, or not yet connected); `None` when every
    /// connection is full, and the read should queue for the pool like
    /// any other call (which sheds load past its waiting limit).
    pub async fn lease(self: &Arc<Self>) -> Result<Option<Lease>> {
        // One look at each slot, one reading of the clock: the slot's
        // connection when it has room, or the first unconnected slot.
        let now_ms = super::connection_clock_ms();
        let Some((slot, mut found)) =
            self.slots
                .iter()
                .enumerate()
                .find_map(|(i, slot)| match self.current(slot, now_ms) {
                    None => Some((i, None)),
                    Some(c) if c.in_flight.load(Ordering::Relaxed) < DEPTH => Some((i, Some(c))),
                    Some(_) => None,
                })
        else {
            return Ok(None);
        };
        loop {
            let conn = match found.take() {
                Some(conn) => conn,
                None => self.connected(slot).await?,
            };
            conn.in_flight.fetch_add(1, Ordering::AcqRel);
            conn.leased_ms.store(now_ms, Ordering::Relaxed);
            let lease = Lease {
                conn,
                slot,
                shared: self.clone(),
                done: false,
            };
            if !lease.conn.abandoned.load(Ordering::Acquire) {
                return Ok(Some(lease));
            }
            // Retired (and perhaps being drained) since the slot gave it:
            // give it back unused and take the slot's next connection.
            lease.finish();
        }
    }

    /// The slot's open connection, made if there is none.
    async fn connected(&self, slot: usize) -> Result<Arc<SharedConn>> {
        let s = &self.slots[slot];
        if let Some(conn) = self.current(s, super::connection_clock_ms()) {
            return Ok(conn);
        }
        let _making = s.connecting.lock().await;
        if let Some(conn) = self.current(s, super::connection_clock_ms()) {
            return Ok(conn);
        }
        let given_ms = super::connection_clock_ms();
        let object = self.pool.get().await?;
        // Renewed once the pool's connection reaches its maximum lifetime,
        // counted from when the pool made it, by the connection clock.
        let left = self
            .max_lifetime
            .saturating_sub(Object::metrics(&object).age());
        let conn = Arc::new(SharedConn {
            renew_ms: given_ms.saturating_add(left.as_millis() as u64),
            object: Some(object),
            in_flight: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
            tls: self.tls.clone(),
            config: self.config.clone(),
            given_ms,
            leased_ms: std::sync::atomic::AtomicU64::new(given_ms),
        });
        *s.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// No new read goes to `conn` (it stays with the reads it has).
    fn retire(&self, slot: usize, conn: &Arc<SharedConn>) {
        let mut held = self.slots[slot]
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *held = None;
        }
    }

    /// Gives back the connections no read took for `idle` (they close, as
    /// idle pooled ones do) and closes those that came back to the pool
    /// and sat there as long.
    pub fn close_idle(&self, idle: std::time::Duration) {
        let now = super::connection_clock_ms();
        let idle_ms = idle.as_millis() as u64;
        for slot in self.slots.iter() {
            let mut held = slot.conn.lock().unwrap_or_else(|p| p.into_inner());
            if held.as_ref().is_some_and(|c| {
                c.in_flight.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.leased_ms.load(Ordering::Relaxed)) >= idle_ms
            }) && let Some(conn) = held.take()
                && let Some(object) = Arc::into_inner(conn).and_then(|mut c| c.object.take())
            {
                drop(Object::take(object));
            }
        }
        self.pool.retain(|_, m| m.last_used() < idle);
    }

    /// Closes the idle connections and refuses new ones.
    pub fn close(&self) {
        for slot in self.slots.iter() {
            slot.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        self.pool.close();
    }
}

impl SharedReads {
    /// The slot's connection while it may take new reads: not known
    /// closed, younger than the maximum lifetime, and given its slot after
    /// the last connection error any call saw. An older one is taken out of
    /// the slot (it keeps its reads; the pool checks it when it comes back).
    fn current(&self, slot: &Slot, now_ms: u64) -> Option<Arc<SharedConn>> {
        let mut held = slot.conn.lock().unwrap_or_else(|p| p.into_inner());
        let usable = held.as_ref().is_some_and(|c| {
            now_ms < c.renew_ms
                && c.object.as_ref().is_some_and(|o| !o.is_closed())
                && !super::connection_error_since(c.given_ms)
        });
        if usable {
            held.clone()
        } else {
            held.take();
            None
        }
    }
}

impl Lease {
    pub fn client(&self) -> &deadpool_postgres::Client {
        self.conn.object.as_ref().expect("present until drop")
    }

    /// The read is over (with whatever outcome): its reply came.
    pub fn finish(mut self) {
        self.done = true;
    }

    /// The read's connection broke: no new read goes to it, and the read
    /// gets another (`None`: all are full).
    pub async fn retry(mut self) -> Result<Option<Lease>> {
        self.done = true;
        self.shared.retire(self.slot, &self.conn);
        let shared = self.shared.clone();
        drop(self);
        shared.lease().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let left = self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        if !self.done {
            // Abandoned with its statement possibly still running or queued.
            self.conn.abandoned.store(true, Ordering::Release);
            self.shared.retire(self.slot, &self.conn);
        }
        if left == 0
            && self.conn.abandoned.load(Ordering::Acquire)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // No read is left on it: what still runs or waits on it is
            // abandoned, and no new statement is sent to it, so cancelling
            // cannot hit anybody else's.
            runtime.spawn(self.conn.clone().drain());
        }
    }
}

/// How long the drain of an abandoned connection waits for its marker
/// before it cancels the statement running again.
const DRAIN_STEP: std::time::Duration = std::time::Duration::from_millis(25);
/// Most cancels the drain sends: past them the connection is closed as it
/// is, and the server's `statement_timeout` ends what still runs.
const DRAIN_CANCELS: usize = 2 * DEPTH + 8;

impl SharedConn {
    /// Ends every statement still pipelined on this abandoned connection:
    /// an empty query is queued behind them, and the statement running is
    /// cancelled until that marker is answered (a cancel ends only the
    /// statement running; the next one then starts). The connection is
    /// closed when the last reference goes.
    async fn drain(self: Arc<Self>) {
        let Some(client) = self.object.as_ref() else {
            return;
        };
        let token = client.cancel_token();
        let marker = client.simple_query("");
        tokio::pin!(marker);
        for _ in 0..DRAIN_CANCELS {
            if tokio::time::timeout(DRAIN_STEP, &mut marker).await.is_ok() {
                return;
            }
            if let Err(e) = super::coalesce::cancel(&token, &self.config, &self.tls).await {
                tracing::debug!(error = %e, "could not cancel an abandoned shared read");
                return;
            }
        }
    }
}

/// Whether a read's outcome says that its connection is gone.
pub fn lost_connection<T>(outcome: &Result<T>) -> bool {
    matches!(
        outcome,
        Err(crate::error::Error::Unavailable(
            crate::error::Reason::DatabaseUnavailable,
            _
        ))
    )
}

/// `read`, ended with DEADLINE_EXCEEDED once `timeout` (if any) has passed.
pub async fn within<T>(
    timeout: Option<std::time::Duration>,
    read: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match timeout {
        None => read.await,
        Some(left) => match tokio::time::timeout(left, read).await {
            Ok(done) => done,
            Err(_) => {
                crate::observability::statement_timeout();
                Err(crate::error::Error::DeadlineExceeded)
            }
        },
    }
}
