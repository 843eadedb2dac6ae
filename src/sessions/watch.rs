//! WatchSession: the current state, then every committed change, in commit
//! order, resumable from the last position the client saw.
//!
//! Each watcher first reads on its own from its position (its request's
//! `after_sequence` / `after_version`, or the session's current position)
//! until it reaches the session's shared feed (`feed.rs`), then follows the
//! feed. Every change carries its position, so a watcher drops what it
//! already sent and notices a gap (it fell behind the feed, or joined late):
//! it then reads on its own again. A notification is only a hint, so a lost,
//! coalesced or replayed one can delay an event but never lose or duplicate
//! it.

use super::feed::{self, Change, Position, Read, Subscription};
use super::sql;
use crate::call::Call;
use crate::error::{Error, Reason, Result};
use crate::proto::{self, watch_session_response::Event};
use crate::state::AppState;
use crate::validate::Validator;
use futures::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

/// The response stream of WatchSession. The watcher is driven by the
/// stream itself (no task of its own), so a change fanned out to thousands
/// of watchers wakes each stream once.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchSessionResponse, Status>> + Send>>;
/// How long opening a watch retries a database that is away, without a
/// call deadline.
const OPEN_RETRY: Duration = Duration::from_secs(10);

/// A validated WatchSession call.
#[derive(Debug, Clone, Copy)]
pub struct WatchFrom {
    pub id: Uuid,
    pub after_sequence: Option<i64>,
    pub after_version: Option<i64>,
}

impl TryFrom<proto::WatchSessionRequest> for WatchFrom {
    type Error = Error;

    fn try_from(r: proto::WatchSessionRequest) -> Result<Self> {
        let mut v = Validator::new();
        let id = v.uuid("id", &r.id);
        if r.after_sequence.is_some_and(|s| s < 0) {
            v.violation("after_sequence", "must not be negative");
        }
        if r.after_version.is_some_and(|s| s < 1) {
            v.violation("after_version", "must be at least 1");
        }
        v.finish()?;
        Ok(WatchFrom {
            id,
            after_sequence: r.after_sequence,
            after_version: r.after_version,
        })
    }
}

/// What the watcher does with one change.
#[allow(clippy::large_enum_variant)] // lives for one match, never stored
enum Step {
    Send(Event),
    Skip,
    /// The change is beyond the next expected one: read on our own.
    Gap,
    End(Error),
}

struct Watcher {
    state: AppState,
    /// The call's project: every read names it.
    project: Uuid,
    id: Uuid,
    pos: Position,
    /// Events decided but not yet taken by the stream.
    outbox: VecDeque<Event>,
    /// A final state was queued: the stream ends after the outbox.
    done: bool,
    /// The stream ended (error sent, or done and drained).
    finished: bool,
    /// Our own reads must run before following the feed.
    behind: bool,
    /// `None` for a session that was final when the watch opened.
    subscription: Option<Subscription>,
    deadline: Option<Instant>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Opens a watch of a session of the call's project: NOT_FOUND (also for a
/// session of another project) and bad positions are the call's status; the
/// rest is streamed.
pub async fn start(state: &AppState, call: &Call, from: WatchFrom) -> Result<WatchStream> {
    let project = call.project()?;
    let deadline = call.remaining().map(|left| Instant::now() + left);
    let open_until = deadline.unwrap_or_else(|| Instant::now() + OPEN_RETRY);
    let first = retrying(open_until, || async {
        let mut conn = state.watches.db().conn(&Call::default()).await?;
        sql::watch_position(conn.client().await?, project, from.id).await
    })
    .await?
    .ok_or_else(|| Error::NotFound(format!("session {} not found", from.id)))?;
    let mut v = Validator::new();
    if from.after_sequence.is_some_and(|s| s > first.log_seq) {
        v.violation(
            "after_sequence",
            format!("is beyond the session's last log entry ({})", first.log_seq),
        );
    }
    if from
        .after_version
        .is_some_and(|s| s > first.session.version)
    {
        v.violation(
            "after_version",
            format!(
                "is beyond the session's current version ({})",
                first.session.version
            ),
        );
    }
    v.finish()?;

    // A final session changes no more: no feed to join.
    let subscription = (!first.session.status.is_final()).then(|| {
        state.watches.subscribe(
            project,
            from.id,
            Position {
                seq: first.log_seq,
                version: first.session.version,
            },
        )
    });
    let mut watcher = Watcher {
        state: state.clone(),
        project,
        id: from.id,
        pos: Position {
            seq: from.after_sequence.unwrap_or(first.log_seq),
            version: from.after_version.unwrap_or(0),
        },
        outbox: VecDeque::new(),
        done: false,
        finished: false,
        behind: true,
        subscription,
        deadline,
        shutdown: state.shutdown.clone(),
    };
    // A fresh watch starts at the session's end: only its state is new, and
    // it is already read.
    if watcher.pos.seq == first.log_seq {
        if first.session.version > watcher.pos.version {
            watcher.apply_all([feed::state_change(&first)], true)?;
        }
        watcher.behind = watcher.caught_up_with_feed() == Some(false);
    }
    let span = tracing::Span::current();
    Ok(Box::pin(futures::stream::unfold(
        watcher,
        move |mut watcher| {
            let span = span.clone();
            async move {
                let item = watcher.next().await?;
                Some((item, watcher))
            }
            .instrument(span)
        },
    )))
}

/// Runs `read` until it succeeds, fails for good, or `until` passes,
/// pausing with capped exponential backoff between transient failures.
async fn retrying<T, F, Fut>(until: Instant, mut read: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = feed::RETRY_FIRST;
    loop {
        match read().await {
            Ok(value) => return Ok(value),
            Err(e) if feed::transient(&e) && Instant::now() + delay < until => {
                tracing::debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "watch read failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(feed::RETRY_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

fn deleted(id: Uuid) -> Error {
    Error::NotFound(format!("session {id} was deleted"))
}

fn shutting_down() -> Error {
    Error::Unavailable(
        Reason::ShuttingDown,
        "the gateway is shutting down; watch again from the last position seen".into(),
    )
}

impl Watcher {
    /// The next message of the stream; `None` once it ended.
    async fn next(&mut self) -> Option<Result<proto::WatchSessionResponse, Status>> {
        loop {
            if let Some(event) = self.outbox.pop_front() {
                return Some(Ok(proto::WatchSessionResponse { event: Some(event) }));
            }
            if self.finished || self.done {
                return None;
            }
            if let Err(e) = self.advance().await {
                self.finished = true;
                return Some(Err(e.into()));
            }
        }
    }

    /// Whether our position reached the feed's position when we joined
    /// (every later change arrives through the feed); `None` without a feed.
    fn caught_up_with_feed(&self) -> Option<bool> {
        self.subscription
            .as_ref()
            .map(|sub| !self.pos.behind(&sub.joined_at))
    }

    /// Queues the next events: from our own read while we are behind, else
    /// from the feed.
    async fn advance(&mut self) -> Result<()> {
        if self.behind {
            let caught_up = self.catch_up().await?;
            if caught_up {
                match self.caught_up_with_feed() {
                    // Final when opened: what the client missed, then the end.
                    None => self.finished = true,
                    // Changes the feed sent before we joined are not in our
                    // receiver: read them on our own.
                    Some(with_feed) => self.behind = !with_feed,
                }
            }
            return Ok(());
        }
        let deadline = self.deadline;
        let Some(sub) = self.subscription.as_mut() else {
            self.finished = true;
            return Ok(());
        };
        let batch = tokio::select! {
            _ = self.shutdown.wait_for(|stopping| *stopping) => return Err(shutting_down()),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => return Err(Error::DeadlineExceeded),
            batch = sub.rx.recv() => batch,
        };
        match batch {
            Ok(batch) => {
                if !self.apply_all(batch.iter().cloned(), false)? {
                    self.behind = true;
                }
            }
            // Fell behind the feed: read on our own, then rejoin.
            Err(RecvError::Lagged(_)) => self.behind = true,
            Err(RecvError::Closed) => return Err(shutting_down()),
        }
        Ok(())
    }

    /// Queues changes in order; false when one showed a gap (the rest is
    /// left to our own read). `read` changes come from our own read, which
    /// is complete from our position: they never show a gap.
    fn apply_all(&mut self, changes: impl IntoIterator<Item = Change>, read: bool) -> Result<bool> {
        for change in changes {
            if self.done {
                break;
            }
            match self.step(change, read) {
                Step::Skip => {}
                Step::Send(event) => self.outbox.push_back(event),
                Step::Gap => return Ok(false),
                Step::End(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn step(&mut self, change: Change, read: bool) -> Step {
        match change {
            Change::Log(entry) if entry.sequence <= self.pos.seq => Step::Skip,
            Change::Log(entry) if read || entry.sequence == self.pos.seq + 1 => {
                self.pos.seq = entry.sequence;
                Step::Send(Event::LogEntry(entry))
            }
            Change::Log(_) => Step::Gap,
            Change::State { version, .. } if version <= self.pos.version => Step::Skip,
            Change::State { state_log_seq, .. } if !read && state_log_seq > self.pos.seq => {
                Step::Gap
            }
            Change::State {
                session,
                version,
                is_final,
                ..
            } => {
                self.pos.version = version;
                self.done = is_final;
                Step::Send(Event::Session(*session))
            }
            Change::Deleted => Step::End(deleted(self.id)),
        }
    }

    /// One read of our own from our position (at most one batch of log
    /// entries), riding out a lost connection: retries with backoff until
    /// the call's deadline. True once we reached the session's position.
    async fn catch_up(&mut self) -> Result<bool> {
        let mut delay = feed::RETRY_FIRST;
        loop {
            match self.read_once().await {
                Ok(caught_up) => return Ok(caught_up),
                Err(e) if feed::transient(&e) => {
                    if self.deadline.is_some_and(|d| Instant::now() + delay >= d) {
                        return Err(Error::DeadlineExceeded);
                    }
                    if *self.shutdown.borrow() {
                        return Err(shutting_down());
                    }
                    tracing::debug!(session = %self.id, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "a watch could not read its session; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(feed::RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_once(&mut self) -> Result<bool> {
        let mut conn = self.state.watches.db().conn(&Call::default()).await?;
        let c = conn.client().await?;
        let mut pos = self.pos;
        match feed::read_after(c, self.project, self.id, &mut pos).await? {
            Read::Deleted => Err(deleted(self.id)),
            Read::Changes { changes, caught_up } => {
                self.apply_all(changes, true)?;
                // Past holes in the log, too.
                self.pos.seq = self.pos.seq.max(pos.seq);
                Ok(caught_up || self.done)
            }
        }
    }
}
