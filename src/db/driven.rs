//! Database connections whose queued statements go out early (issue 13).
//!
//! A tokio-postgres connection is a future of its own, run as a task: a
//! call queues its statement with the client, which wakes the connection's
//! task, and the statement is written when that task next runs. On a
//! single-threaded runtime that is after every other task already woken,
//! so the calls that arrived together (the streams of one HTTP/2 read,
//! the replies of one database read) each queue their statement first, and
//! the connection then writes them all in one go: the database idles while
//! the gateway prepares the whole group, and the gateway idles while the
//! database runs it. The calls move round in lock-step.
//!
//! Here each connection's task is run through a `Driven` that the calls
//! can also poll. A statement that has queued its messages and waits
//! ([`flushed`]) counts itself; every [`WRITE_EVERY`]th statement queued
//! on a thread since a connection last ran polls every connection woken on
//! that thread, which writes what is queued on them. The database so gets
//! its first statements while the gateway prepares the next calls, and
//! each write still carries more than one statement when calls come in
//! groups (a write per statement costs a system call and a server wake-up
//! each).
//!
//! Measured from outside (`../shared/bench/side-by-side.sh`'s setup, h2load
//! GetSession for 3 s per build, the builds alternated ten times on one
//! PostgreSQL, means):
//! - 8 calls on one HTTP/2 connection: 26.9k calls/s at 26.4 µs of gateway
//!   CPU per call when statements are written at their connection's turn,
//!   29.7k at 25.3 µs with this, 29.2k at 26.8 µs when every statement is
//!   written at once;
//! - 8 connections of one call each: 28.3k at 28.1 µs, 27.5k at 28.8 µs,
//!   28.2k at 30.5 µs (another run of the same builds had the first two
//!   equal at 28.1k).
//!
//! The connection's own task still drives it whenever it is woken: an
//! extra poll from a call finds nothing to do and returns, so correctness
//! never depends on the calls' polls.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use tokio::task::JoinHandle;

type ConnFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One connection's future, polled by its task and by the calls.
struct Driven {
    /// The connection; `None` once it has ended or its task was dropped.
    conn: Mutex<Option<ConnFuture>>,
    /// The task that runs the connection.
    task: AtomicWaker,
    /// On this or another thread's list of connections to poll.
    listed: AtomicBool,
}

thread_local! {
    /// Connections woken on this thread since a call last polled them.
    static WOKEN: RefCell<Vec<Weak<Driven>>> = const { RefCell::new(Vec::new()) };
    /// Statements queued on this thread since a connection last ran.
    static QUEUED: Cell<usize> = const { Cell::new(0) };
}

/// Every how many statements queued on a thread the woken connections
/// are polled (see the module).
pub const WRITE_EVERY: usize = 2;

/// Most connections a thread's list holds.
const MOST_LISTED: usize = 1024;

impl Wake for Driven {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.listed.swap(true, Ordering::AcqRel) {
            // A runtime being torn down has no list: the task's wake below
            // is then all there is, as it always may be.
            // A thread that wakes connections but runs no statement never
            // empties its list: past a bound, the dead entries go, and a
            // connection not listed is still run by its task.
            let _ = WOKEN.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    if w.len() >= MOST_LISTED {
                        w.retain(|d| d.strong_count() > 0);
                    }
                    if w.len() < MOST_LISTED {
                        w.push(Arc::downgrade(self));
                    }
                }
            });
        }
        self.task.wake();
    }
}

impl Driven {
    /// Polls the connection once. Its wakers are always `this`, so that
    /// whatever wakes it later lists it and wakes its task.
    fn poll_conn(this: &Arc<Self>, conn: &mut Option<ConnFuture>) -> Poll<()> {
        let Some(fut) = conn.as_mut() else {
            return Poll::Ready(());
        };
        let waker = Waker::from(this.clone());
        let mut cx = Context::from_waker(&waker);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(()) => {
                *conn = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Clears the connection when its task ends or is dropped (its client
/// aborts it on drop): the connection's wakers refer to the [`Driven`],
/// which must not keep the connection alive.
struct Clear(Arc<Driven>);

impl Drop for Clear {
    fn drop(&mut self) {
        let conn = self.0.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(conn);
    }
}

/// Runs `conn` as a task whose work the calls on this thread can also do
/// (see the module).
pub fn spawn(conn: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
    let driven = Arc::new(Driven {
        conn: Mutex::new(Some(Box::pin(conn))),
        task: AtomicWaker::new(),
        listed: AtomicBool::new(false),
    });
    let clear = Clear(driven);
    tokio::spawn(std::future::poll_fn(move |cx| {
        let driven = &clear.0;
        driven.task.register(cx.waker());
        // It writes whatever is queued on it now.
        let _ = QUEUED.try_with(|q| q.set(0));
        driven.listed.store(false, Ordering::Release);
        let mut conn = driven.conn.lock().unwrap_or_else(|p| p.into_inner());
        Driven::poll_conn(driven, &mut conn)
    }))
}

/// Polls the connections woken on this thread since the last time, each
/// once, unless its task (on another thread) is polling it right now.
fn poll_woken() {
    let woken = WOKEN
        .try_with(|w| w.try_borrow_mut().map(|mut w| std::mem::take(&mut *w)))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    for driven in woken.iter().filter_map(Weak::upgrade) {
        driven.listed.store(false, Ordering::Release);
        let Ok(mut conn) = driven.conn.try_lock() else {
            continue;
        };
        if Driven::poll_conn(&driven, &mut conn).is_ready() {
            // Ended: its task completes when it next runs.
            driven.task.wake();
        }
    }
    // Keep the list's allocation for next time.
    let mut woken = woken;
    woken.clear();
    let _ = WOKEN.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut()
            && w.is_empty()
        {
            *w = woken;
        }
    });
}

/// `statement`, which queues its messages with a connection's client and
/// waits for the replies: when it first waits it counts itself, and if it
/// is the [`WRITE_EVERY`]th, the connections woken since (its own among
/// them) are polled, so that what is queued on them is written now.
pub fn flushed<F: Future>(statement: F) -> Flushed<F> {
    Flushed {
        statement,
        counted: false,
    }
}

pin_project_lite::pin_project! {
    /// See [`flushed`].
    pub struct Flushed<F> {
        #[pin]
        statement: F,
        counted: bool,
    }
}

impl<F: Future> Future for Flushed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let polled = this.statement.poll(cx);
        if polled.is_pending() && !*this.counted {
            *this.counted = true;
            let queued = QUEUED.try_with(|q| {
                let n = q.get() + 1;
                q.set(if n >= WRITE_EVERY { 0 } else { n });
                n
            });
            if queued.is_ok_and(|n| n >= WRITE_EVERY) {
                poll_woken();
            }
        }
        polled
    }
}

/// Opens connections whose tasks are [`spawn`]ed here: deadpool's own
/// connect, but for the task.
pub struct Connect {
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The reads written together share a Sync (`super::coalesce`): for
    /// the shared read connections, which run nothing else.
    pub batch_reads: bool,
}

impl deadpool_postgres::Connect for Connect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>,
    > {
        let tls = self.tls.clone();
        let pg_config = pg_config.clone();
        let batch_reads = self.batch_reads;
        Box::pin(async move {
            // Where this can open the socket itself (see `coalesce`); else
            // as tokio-postgres connects.
            if batch_reads && let Some(connected) = super::coalesce::connect(&pg_config, &tls).await
            {
                let (client, connection) = connected?;
                return Ok((client, run(connection)));
            }
            let (client, connection) = pg_config.connect(tls).await?;
            Ok((client, run(connection)))
        })
    }
}

/// Runs a connection's half as a [`spawn`]ed task, logging how it ended.
fn run(
    connection: impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) -> JoinHandle<()> {
    spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection ended with an error");
        }
    })
}
