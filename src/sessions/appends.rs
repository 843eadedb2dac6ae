//! Group commit of AppendSessionLog.
//!
//! Appends to one session take its row lock, so they commit one at a time,
//! each waiting for its own WAL flush. Here concurrent appends to the same
//! session share a statement instead: the first append of a session runs at
//! once, alone; appends of that session arriving while a statement of it is
//! in flight wait, and when it ends they all go in the next statement (one
//! transaction, one flush, one round trip), in arrival order. Nothing waits
//! for a group to fill: a lone append costs what it did before.
//!
//! Every call keeps its own guarantees: its reply comes after the statement
//! holding its entry committed, its entry gets its own position and audit
//! row, and a group fails as a whole (nothing of it stored) with the error
//! each of its calls would have had alone — every entry of a group targets
//! the same session of the same project, so a refusal (NOT_FOUND, a final
//! status) is the same for each. A call that is gone before its group is
//! sent (cancelled, past its deadline, its key revoked) stores nothing.
//!
//! At most the pool's `max_waiting` appends wait per session; more are
//! refused at once with RESOURCE_EXHAUSTED (POOL_EXHAUSTED), as calls
//! waiting for a connection are.
//!
//! The statement of a group runs in a task of its own, not in a caller's
//! future, so a caller that goes away cannot strand the others; the task
//! that holds a session's turn always hands it on (to a new task when it
//! is dropped early).

use super::sql::{self, Append};
use super::{LogEntry, NewLogEntry};
use crate::call::Call;
use crate::db::Db;
use crate::error::{Error, Reason, Result};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tracing::Instrument;
use uuid::Uuid;

/// Most entries one statement takes.
pub const MAX_GROUP_ENTRIES: usize = 256;
/// Most request bytes one statement takes (one larger entry goes alone).
pub const MAX_GROUP_BYTES: usize = 4 << 20;

/// A session's appends: (project, session id).
type Key = (Uuid, Uuid);

/// One append and who makes it.
pub struct Item {
    pub entry: NewLogEntry,
    pub call: Call,
    /// The encoded size of the request (what the group limit counts).
    pub bytes: usize,
}

struct Waiting {
    item: Item,
    reply: oneshot::Sender<Result<LogEntry>>,
    span: tracing::Span,
}

/// The appends waiting for a statement of their session, by session. A
/// session is a key here while one of its statements is in flight.
pub struct Appends {
    db: Db,
    queues: Mutex<HashMap<Key, Vec<Waiting>>>,
}

impl Appends {
    pub fn new(db: Db) -> Self {
        Appends {
            db,
            queues: Mutex::default(),
        }
    }

    /// Appends `item` to the log of its session in `project`, alone or in a
    /// group with concurrent appends of the same session, and returns it
    /// stored.
    pub async fn append(self: &Arc<Self>, project: Uuid, item: Item) -> Result<LogEntry> {
        let db = &self.db;
        let key = (project, item.entry.session_id);
        let waiting = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            match queues.entry(key) {
                // Queued appends are calls waiting for the database: past
                // the pool's limit on those, more are shed at once.
                Entry::Occupied(queue) if queue.get().len() >= db.max_waiting() => {
                    return Err(Error::ResourceExhausted(
                        Reason::PoolExhausted,
                        "too many appends are waiting for this session; retry later".into(),
                    ));
                }
                Entry::Occupied(mut queue) => {
                    let (reply, answer) = oneshot::channel();
                    queue.get_mut().push(Waiting {
                        item,
                        reply,
                        span: tracing::Span::current(),
                    });
                    Err(answer)
                }
                Entry::Vacant(slot) => {
                    slot.insert(Vec::new());
                    Ok(item)
                }
            }
        };
        match waiting {
            // This call holds the session's turn: its entry goes at once,
            // alone; whatever queued meanwhile goes next (also when this
            // future is dropped midway).
            Ok(item) => {
                let turn = Turn {
                    appends: self.clone(),
                    key,
                    done: false,
                };
                let mut stored = write(db, project, &[&item]).await?;
                drop(turn);
                stored
                    .pop()
                    .ok_or_else(|| Error::Internal("an append stored nothing".into()))
            }
            Err(answer) => answer.await.unwrap_or_else(|_| {
                Err(Error::Internal(
                    "the group holding this append ended without a reply".into(),
                ))
            }),
        }
    }

    /// Hands the turn of `key` on: the next group goes out on a task of its
    /// own, or the turn is given up when nothing waits. Outside a runtime
    /// (the gateway's runtime being torn down) the queued calls are dropped
    /// with it and hear nothing.
    fn hand_on(self: &Arc<Self>, key: Key) {
        let Some(group) = self.next_group(key) else {
            return;
        };
        let turn = Turn {
            appends: self.clone(),
            key,
            done: false,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(write_groups(turn, group));
        }
    }

    /// Takes the next group of `key` off its queue, or gives up the
    /// session's turn when nothing waits.
    fn next_group(&self, key: Key) -> Option<Vec<Waiting>> {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queues.get_mut(&key)?;
        queue.retain(|w| !w.reply.is_closed());
        if queue.is_empty() {
            queues.remove(&key);
            return None;
        }
        let mut bytes = 0;
        let mut take = 0;
        for w in queue.iter().take(MAX_GROUP_ENTRIES) {
            if take > 0 && bytes + w.item.bytes > MAX_GROUP_BYTES {
                break;
            }
            bytes += w.item.bytes;
            take += 1;
        }
        Some(queue.drain(..take).collect())
    }
}

/// A session's turn: while it is held, appends of that session queue. It is
/// handed on when dropped.
struct Turn {
    appends: Arc<Appends>,
    key: Key,
    /// The queue was found empty and the turn given up.
    done: bool,
}

impl Turn {
    fn next_group(&mut self) -> Option<Vec<Waiting>> {
        let group = self.appends.next_group(self.key);
        self.done = group.is_none();
        group
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if !self.done {
            self.appends.hand_on(self.key);
        }
    }
}

/// Writes `group` and every group queued after it while the turn is held.
async fn write_groups(mut turn: Turn, mut group: Vec<Waiting>) {
    loop {
        let span = group[0].span.clone();
        let items: Vec<&Item> = group.iter().map(|w| &w.item).collect();
        let result = write(&turn.appends.db, turn.key.0, &items)
            .instrument(span)
            .await;
        match result {
            Ok(stored) => {
                for (w, entry) in group.into_iter().zip(stored) {
                    let _ = w.reply.send(Ok(entry));
                }
            }
            Err(e) => {
                for w in group {
                    let _ = w.reply.send(Err(e.clone()));
                }
            }
        }
        match turn.next_group() {
            Some(next) => group = next,
            None => return,
        }
    }
}

/// One statement for `items`, entries of one session of `project`, on a
/// connection bound to the latest deadline among their calls (a call with
/// an earlier one stops waiting at its own).
async fn write(db: &Db, project: Uuid, items: &[&Item]) -> Result<Vec<LogEntry>> {
    let first = items
        .first()
        .ok_or_else(|| Error::Internal("an empty group of appends".into()))?;
    let call = items
        .iter()
        .map(|i| i.call)
        .max_by_key(|c| c.remaining().unwrap_or(std::time::Duration::MAX))
        .unwrap_or(first.call);
    let key_ids: Vec<_> = items.iter().map(|i| i.call.key_id()).collect();
    let trace_ids: Vec<_> = items.iter().map(|i| i.call.trace_id()).collect();
    let appends: Vec<Append<'_>> = items
        .iter()
        .zip(&key_ids)
        .zip(&trace_ids)
        .map(|((i, key_id), trace_id)| Append {
            entry: &i.entry,
            key_id: key_id.as_ref().map(|k| k.as_str()),
            trace_id: trace_id.as_deref(),
        })
        .collect();
    let mut conn = db.conn(&call).await?;
    sql::append_logs(
        conn.client().await?,
        project,
        first.entry.session_id,
        &appends,
        call.rpc(),
        crate::audit::Outcome::Appended.as_str(),
    )
    .await
}
