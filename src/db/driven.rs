//! Database connections whose queued statements go out at once (issue 13).
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
//! Here each connection's task is run through a [`Driven`] that the calls
//! can also poll: a statement's future, once it has queued its messages
//! and waits ([`flushed`]), polls every connection woken on this thread
//! since (the one it queued on among them), so the statement is written
//! before the next call is prepared and the database works while the
//! gateway does. Measured from outside (h2load GetSession, one connection
//! with 8 calls in flight, `../shared/bench/side-by-side.sh`'s setup,
//! alternating with the same build that writes at the task's turn), the
//! gateway answered about 8 % more calls per second, at the same rate
//! with 8 connections of 1 call each.
//!
//! The connection's own task still drives it whenever it is woken: an
//! extra poll from a call finds nothing to do and returns, so correctness
//! never depends on the calls' polls.

use std::cell::RefCell;
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
}

impl Wake for Driven {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.listed.swap(true, Ordering::AcqRel) {
            // A runtime being torn down has no list: the task's wake below
            // is then all there is, as it always may be.
            let _ = WOKEN.try_with(|w| {
                if let Ok(mut w) = w.try_borrow_mut() {
                    w.push(Arc::downgrade(self));
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
/// waits for the replies: each time it waits, the connections woken since
/// (its own among them) are polled, so that its messages are written now.
pub fn flushed<F: Future>(statement: F) -> Flushed<F> {
    Flushed { statement }
}

pin_project_lite::pin_project! {
    /// See [`flushed`].
    pub struct Flushed<F> {
        #[pin]
        statement: F,
    }
}

impl<F: Future> Future for Flushed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = self.project().statement.poll(cx);
        if polled.is_pending() {
            poll_woken();
        }
        polled
    }
}

/// Opens connections whose tasks are [`spawn`]ed here: deadpool's own
/// connect, but for the task.
pub struct Connect<T>(pub T);

impl<T> deadpool_postgres::Connect for Connect<T>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> futures::future::BoxFuture<
        '_,
        Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>,
    > {
        let tls = self.0.clone();
        let pg_config = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = pg_config.connect(tls).await?;
            let task = spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "database connection ended with an error");
                }
            });
            Ok((client, task))
        })
    }
}
