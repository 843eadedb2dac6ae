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
use super::sql::{self, WatchedSession};
use crate::call::Call;
use crate::error::{Error, Reason, Result};
use crate::proto::{self, watch_session_response::Event};
use crate::state::AppState;
use crate::validate::Validator;
use std::time::Duration;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

pub type WatchStream = ReceiverStream<Result<proto::WatchSessionResponse, Status>>;

/// Events buffered per stream before the watcher waits for the client.
const STREAM_BUFFER: usize = 64;
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
enum Step {
    Send(Event),
    Skip,
    /// The change is beyond the next expected one: read on our own.
    Gap,
    End(Error),
}

struct Watcher {
    state: AppState,
    id: Uuid,
    pos: Position,
    /// A final state was sent: the stream ends.
    done: bool,
    deadline: Option<Instant>,
    tx: mpsc::Sender<Result<proto::WatchSessionResponse, Status>>,
}

/// Opens a watch: NOT_FOUND and bad positions are the call's status; the rest
/// is streamed.
pub async fn start(state: &AppState, call: &Call, from: WatchFrom) -> Result<WatchStream> {
    let deadline = call.remaining().map(|left| Instant::now() + left);
    let open_until = deadline.unwrap_or_else(|| Instant::now() + OPEN_RETRY);
    let first = retrying(open_until, || async {
        let mut conn = state.watches.db().conn(&Call::default()).await?;
        sql::watch_position(conn.client().await?, from.id).await
    })
    .await?
    .ok_or_else(|| Error::NotFound(format!("session {} not found", from.id)))?;
    let mut v = Validator::new();
    if from.after_sequence.is_some_and(|s| s > first.log_seq) {
        v.violation(
            "after_sequence",
            &format!("is beyond the session's last log entry ({})", first.log_seq),
        );
    }
    if from
        .after_version
        .is_some_and(|s| s > first.session.version)
    {
        v.violation(
            "after_version",
            &format!(
                "is beyond the session's current version ({})",
                first.session.version
            ),
        );
    }
    v.finish()?;

    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let mut watcher = Watcher {
        state: state.clone(),
        id: from.id,
        pos: Position {
            seq: from.after_sequence.unwrap_or(first.log_seq),
            version: from.after_version.unwrap_or(0),
        },
        done: false,
        deadline,
        tx,
    };
    // A final session changes no more: no feed to join.
    let subscription = (!first.session.status.is_final()).then(|| {
        state.watches.subscribe(
            from.id,
            Position {
                seq: first.log_seq,
                version: first.session.version,
            },
        )
    });
    tokio::spawn(
        async move {
            if let Err(e) = watcher.run(first, subscription).await {
                let _ = watcher.tx.send(Err(e.into())).await;
            }
        }
        .instrument(tracing::Span::current()),
    );
    Ok(ReceiverStream::new(rx))
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

/// Sends the deleted-session status and ends the stream.
fn deleted(id: Uuid) -> Error {
    Error::NotFound(format!("session {id} was deleted"))
}

impl Watcher {
    async fn run(
        &mut self,
        first: WatchedSession,
        subscription: Option<Subscription>,
    ) -> Result<()> {
        // A fresh watch starts at the session's end: only its state is new.
        if self.pos.seq == first.log_seq {
            if first.session.version > self.pos.version {
                self.apply_all([feed::state_change(&first)], true).await?;
            }
        } else {
            self.catch_up().await?;
        }
        let Some(mut sub) = subscription else {
            // Final when opened: what the client missed, then the end.
            if !self.done {
                self.catch_up().await?;
            }
            return Ok(());
        };
        // Changes the feed broadcast before we joined are not in our
        // receiver: read them on our own.
        while !self.done && self.pos.behind(&sub.joined_at) {
            self.catch_up().await?;
        }
        let mut shutdown = self.state.shutdown.clone();
        while !self.done {
            let deadline = self.deadline;
            let batch = tokio::select! {
                _ = self.tx.closed() => return Ok(()),
                _ = shutdown.wait_for(|stopping| *stopping) => {
                    return Err(Error::Unavailable(
                        Reason::ShuttingDown,
                        "the gateway is shutting down; watch again from the last position seen".into(),
                    ));
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => return Err(Error::DeadlineExceeded),
                batch = sub.rx.recv() => batch,
            };
            let in_step = match batch {
                Ok(batch) => self.apply_all(batch.iter().cloned(), false).await?,
                Err(RecvError::Lagged(_)) => false,
                Err(RecvError::Closed) => {
                    return Err(Error::Unavailable(
                        Reason::ShuttingDown,
                        "the gateway is shutting down; watch again from the last position seen"
                            .into(),
                    ));
                }
            };
            if !in_step && !self.done {
                self.catch_up().await?;
            }
        }
        Ok(())
    }

    /// Applies changes in order; false when one showed a gap (the rest is
    /// left to a catch-up read). `read` changes come from our own read,
    /// which is complete from our position: they never show a gap.
    async fn apply_all(
        &mut self,
        changes: impl IntoIterator<Item = Change>,
        read: bool,
    ) -> Result<bool> {
        for change in changes {
            if self.done {
                break;
            }
            match self.step(change, read) {
                Step::Skip => {}
                Step::Send(event) => {
                    let message = proto::WatchSessionResponse { event: Some(event) };
                    if self.tx.send(Ok(message)).await.is_err() {
                        // The client left.
                        self.done = true;
                    }
                }
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
                Step::Send(Event::Session(session))
            }
            Change::Deleted => Step::End(deleted(self.id)),
        }
    }

    /// Reads on our own, from our position up to the session's current one,
    /// riding out a lost connection (retries with backoff until the call's
    /// deadline).
    async fn catch_up(&mut self) -> Result<()> {
        let mut delay = feed::RETRY_FIRST;
        loop {
            match self.read_to_end().await {
                Ok(()) => return Ok(()),
                Err(e) if feed::transient(&e) => {
                    if self.deadline.is_some_and(|d| Instant::now() + delay >= d) {
                        return Err(Error::DeadlineExceeded);
                    }
                    tracing::debug!(session = %self.id, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "a watch could not read its session; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.tx.closed() => {
                            self.done = true;
                            return Ok(());
                        }
                    }
                    delay = (delay * 2).min(feed::RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_to_end(&mut self) -> Result<()> {
        let mut conn = self.state.watches.db().conn(&Call::default()).await?;
        let c = conn.client().await?;
        while !self.done {
            let mut pos = self.pos;
            match feed::read_after(c, self.id, &mut pos).await? {
                Read::Deleted => return Err(deleted(self.id)),
                Read::Changes { changes, caught_up } => {
                    self.apply_all(changes, true).await?;
                    // Past holes in the log, too.
                    self.pos.seq = self.pos.seq.max(pos.seq);
                    if caught_up {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}
