//! The shared side of WatchSession: one feed per watched session.
//!
//! A notification only says "this session changed". Instead of every watcher
//! re-reading on its own (2,000 watchers on one session would be 2,000 reads
//! per change, each holding a pooled connection), the session's feed reads
//! the delta once, from its shared position, and broadcasts it to every
//! watcher of that session. Watchers that are behind the shared stream (new,
//! resuming, or lagging) read on their own until they reach it, then follow
//! it. The reads use the watch pool, never the pool of request traffic.
//!
//! Positions: log entries follow the per-session `seq` (assigned under the
//! session row's lock, so commits cannot overtake each other and there are
//! no gaps); states follow `version`, and `state_log_seq` places a state
//! between the log entries committed before and after it.

use super::sql::{self, WatchedSession};
use crate::call::Call;
use crate::db::Db;
use crate::db::notify::{Hub, Notice};
use crate::error::{Error, Result};
use crate::proto;
use deadpool_postgres::GenericClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast, watch};
use tracing::Instrument as _;
use uuid::Uuid;

/// Log entries read per catch-up query.
const LOG_BATCH: i64 = 500;
/// Batches a feed keeps for watchers that are momentarily slower; one that
/// falls further behind reads on its own and rejoins.
const FEED_CAPACITY: usize = 256;
/// Watchers per shard of a feed. A batch is handed to one shard at a time,
/// yielding in between, so a change fanned out to thousands of watchers
/// wakes at most this many streams before request traffic gets its turn.
const SHARD: usize = 4;
/// How often an idle feed checks whether anyone still watches.
const RETIRE_CHECK: Duration = Duration::from_secs(2);
/// First and longest pause between retries of a failed read.
pub const RETRY_FIRST: Duration = Duration::from_millis(50);
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// How far a reader of a session's changes got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Log entries up to this sequence were delivered.
    pub seq: i64,
    /// The state of this version was delivered (0: none yet).
    pub version: i64,
}

impl Position {
    /// Whether this position is behind `other` in either dimension.
    pub fn behind(&self, other: &Position) -> bool {
        self.seq < other.seq || self.version < other.version
    }
}

/// One committed change, carrying the position it moves a reader to.
#[derive(Debug, Clone)]
pub enum Change {
    /// A log entry; its `sequence` is its position.
    Log(proto::SessionLogEntry),
    /// A new state of the session.
    State {
        session: Box<proto::Session>,
        version: i64,
        /// Entries up to this sequence committed before this state.
        state_log_seq: i64,
        is_final: bool,
    },
    /// The session is gone.
    Deleted,
}

/// Changes read together, broadcast as one message.
pub type Batch = Arc<Vec<Change>>;

/// The state of a watched session as a change.
pub fn state_change(w: &WatchedSession) -> Change {
    Change::State {
        session: Box::new(w.session.clone().into()),
        version: w.session.version,
        state_log_seq: w.state_log_seq,
        is_final: w.session.status.is_final(),
    }
}

/// What one read found.
pub enum Read {
    Deleted,
    Changes {
        changes: Vec<Change>,
        /// True when `pos` reached the session's current position.
        caught_up: bool,
    },
}

/// Reads the changes of the session `id` of `project` after `pos` (at most
/// [`LOG_BATCH`] log entries, in commit order) and advances `pos` past them.
pub async fn read_after(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    pos: &mut Position,
) -> Result<Read> {
    let Some(w) = sql::watch_position(c, project, id).await? else {
        return Ok(Read::Deleted);
    };
    let mut changes = Vec::new();
    let mut budget = LOG_BATCH;
    // Entries committed before the current state, then the state, then the
    // entries committed after it.
    if pos.seq < w.state_log_seq {
        budget -= read_logs(c, project, id, pos, w.state_log_seq, budget, &mut changes).await?;
    }
    if pos.seq >= w.state_log_seq && w.session.version > pos.version {
        pos.version = w.session.version;
        changes.push(state_change(&w));
    }
    if pos.seq >= w.state_log_seq && pos.seq < w.log_seq && budget > 0 {
        read_logs(c, project, id, pos, w.log_seq, budget, &mut changes).await?;
    }
    let caught_up = pos.seq >= w.log_seq && pos.version >= w.session.version;
    Ok(Read::Changes { changes, caught_up })
}

/// Appends the entries in `(pos.seq, through]` (at most `limit`) and moves
/// `pos` past them; returns how many were read.
async fn read_logs(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    pos: &mut Position,
    through: i64,
    limit: i64,
    changes: &mut Vec<Change>,
) -> Result<i64> {
    let logs = sql::logs_in_range(c, project, id, pos.seq, through, limit).await?;
    let n = logs.len() as i64;
    if n < limit {
        // The whole range was read (entries removed by an integrity repair
        // leave holes that must not stall a reader).
        pos.seq = through;
    } else if let Some(last) = logs.last() {
        pos.seq = last.seq;
    }
    changes.extend(logs.into_iter().map(|e| Change::Log(e.into())));
    Ok(n)
}

/// Whether a failed read is worth retrying (the database or the pool will
/// come back) rather than ending the watch.
pub fn transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Unavailable(..)
            | Error::ResourceExhausted(..)
            | Error::DeadlineExceeded
            | Error::Aborted(..)
    )
}

/// The feeds of a gateway, keyed by session; cheap to clone.
#[derive(Clone)]
pub struct Watches {
    inner: Arc<Inner>,
}

struct Inner {
    /// The watch pool: reads of watches never wait behind request traffic.
    db: Db,
    feeds: Mutex<HashMap<Uuid, Arc<Feed>>>,
    shutdown: watch::Receiver<bool>,
    /// Told whether any feed runs: the listener listens only then.
    hub: Hub,
}

struct Feed {
    /// The project of the session: the feed reads only there, and only
    /// watchers of that project (who read the session there) join it.
    project: Uuid,
    wake: Notify,
    state: Mutex<FeedState>,
}

struct FeedState {
    /// Where the broadcast stream stands: stored before a batch is sent, so
    /// a subscriber reading it receives every change after it.
    pos: Position,
    /// The watchers, [`SHARD`] per channel.
    shards: Vec<broadcast::Sender<Batch>>,
}

impl Feed {
    fn receivers(&self) -> usize {
        lock(&self.state)
            .shards
            .iter()
            .map(|s| s.receiver_count())
            .sum()
    }

    /// Moves the stream to `pos` and hands `batch` to every shard, yielding
    /// between shards.
    async fn publish(&self, pos: Position, batch: Option<Batch>) {
        let shards = {
            let mut state = lock(&self.state);
            state.pos = pos;
            state.shards.retain(|s| s.receiver_count() > 0);
            state.shards.clone()
        };
        let Some(batch) = batch else { return };
        for (i, shard) in shards.iter().enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            // No receiver is not an error: the feed retires soon.
            let _ = shard.send(batch.clone());
        }
    }
}

/// A watcher's membership in a session's feed.
pub struct Subscription {
    pub rx: broadcast::Receiver<Batch>,
    /// The feed's position when the watcher joined: every change after it
    /// arrives through `rx`.
    pub joined_at: Position,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Watches {
    pub fn new(db: Db, shutdown: watch::Receiver<bool>, hub: Hub) -> Self {
        Watches {
            inner: Arc::new(Inner {
                db,
                feeds: Mutex::new(HashMap::new()),
                shutdown,
                hub,
            }),
        }
    }

    /// The watch pool.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Sessions with a running feed (for tests and metrics).
    pub fn feeds(&self) -> usize {
        lock(&self.inner.feeds).len()
    }

    /// Joins the feed of session `id` of `project` (which the caller read
    /// in that project), starting one at `start` (a position the caller has
    /// read) when there is none.
    pub fn subscribe(&self, project: Uuid, id: Uuid, start: Position) -> Subscription {
        let mut feeds = lock(&self.inner.feeds);
        let feed = match feeds.get(&id) {
            Some(feed) if feed.project == project => feed.clone(),
            // Session ids are unique across projects, so a feed of `id` is
            // of the session's one project; were it ever not, a watcher of
            // another project gets a feed of its own, never that one.
            _ => {
                let feed = Arc::new(Feed {
                    project,
                    wake: Notify::new(),
                    state: Mutex::new(FeedState {
                        pos: start,
                        shards: Vec::new(),
                    }),
                });
                // A change committed after the caller's read may have been
                // notified before the feed existed: read once at the start.
                feed.wake.notify_one();
                tokio::spawn(self.clone().run_feed(id, feed.clone()));
                feeds.insert(id, feed.clone());
                // Set under the lock, so the last word matches the map.
                self.inner.hub.set_watched(true);
                feed
            }
        };
        let mut state = lock(&feed.state);
        let rx = match state.shards.iter().find(|s| s.receiver_count() < SHARD) {
            Some(shard) => shard.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(FEED_CAPACITY);
                state.shards.push(tx);
                rx
            }
        };
        Subscription {
            rx,
            joined_at: state.pos,
        }
    }

    /// Routes notifications to feeds, for as long as the gateway runs. A
    /// listener reconnect (or a lag) may have lost notifications: every feed
    /// then re-reads.
    pub async fn dispatch(self) {
        let mut notices = self.inner.hub.subscribe();
        loop {
            match notices.recv().await {
                Ok(Notice::SessionChanged(id)) => {
                    if let Some(feed) = lock(&self.inner.feeds).get(&id) {
                        feed.wake.notify_one();
                    }
                }
                Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    for feed in lock(&self.inner.feeds).values() {
                        feed.wake.notify_one();
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Removes the feed when nobody listens any more; true when it did.
    fn retire(&self, id: Uuid, feed: &Arc<Feed>) -> bool {
        let mut feeds = lock(&self.inner.feeds);
        if feed.receivers() > 0 {
            return false;
        }
        if feeds.get(&id).is_some_and(|f| Arc::ptr_eq(f, feed)) {
            feeds.remove(&id);
            if feeds.is_empty() {
                self.inner.hub.set_watched(false);
            }
        }
        true
    }

    async fn run_feed(self, id: Uuid, feed: Arc<Feed>) {
        let mut shutdown = self.inner.shutdown.clone();
        let mut idle = tokio::time::interval(RETIRE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = feed.wake.notified() => {}
                _ = idle.tick() => {
                    if self.retire(id, &feed) {
                        return;
                    }
                    continue;
                }
                _ = shutdown.wait_for(|stopping| *stopping) => return,
            }
            let mut delay = RETRY_FIRST;
            loop {
                if self.retire(id, &feed) {
                    return;
                }
                // A feed serves many watchers: its reads are traces of their
                // own, not part of whichever call started the feed.
                let read = tracing::info_span!(
                    parent: None,
                    "watch.feed.read",
                    otel.kind = "internal",
                    session_id = %id
                );
                match self.catch_up(id, &feed).instrument(read).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, retry_in_ms = delay.as_millis() as u64,
                            "a watch feed could not read its session; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.wait_for(|stopping| *stopping) => return,
                        }
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    /// Reads everything after the feed's position and broadcasts it.
    async fn catch_up(&self, id: Uuid, feed: &Feed) -> Result<()> {
        let mut pos = lock(&feed.state).pos;
        loop {
            // The connection goes back to the pool before the fan-out,
            // which yields between shards.
            let read = {
                let mut conn = self.inner.db.conn(&Call::default()).await?;
                read_after(conn.client().await?, feed.project, id, &mut pos).await?
            };
            match read {
                Read::Deleted => {
                    feed.publish(pos, Some(Arc::new(vec![Change::Deleted])))
                        .await;
                    return Ok(());
                }
                Read::Changes { changes, caught_up } => {
                    let batch = (!changes.is_empty()).then(|| Arc::new(changes));
                    feed.publish(pos, batch).await;
                    if caught_up {
                        return Ok(());
                    }
                }
            }
        }
    }
}
