//! Bulk writes shared by every area: idempotent batches (a client key per
//! batch, claimed in the same transaction as the rows) and resumable client
//! streams (numbered chunks, committed in bounded batches together with the
//! ingest's high-water mark; see [`run`] for what a call commits).
//!
//! Both work within the call's project ([`Call::project`]): batch ids and
//! ingest ids are unique per project, so the same id in two projects names
//! two batches (two ingests), each committing its own rows.

mod reset;
pub use reset::ResetLayer;

use crate::audit;
use crate::auth::Revocation;
use crate::call::Call;
use crate::db::{Db, Stmt};
use crate::error::{Error, FieldViolation, Reason, Result};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Something that can write validated items inside a transaction.
pub trait Sink: Send + Sync + 'static {
    type Item: Send + Sync + 'static;

    /// Writes `items` (already validated) in `tx`; returns rows written.
    fn write<'a>(
        &'a self,
        tx: &'a deadpool_postgres::Transaction<'a>,
        items: &'a [Self::Item],
    ) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// Whether a batch key is new or names a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    New,
    Replay { item_count: i32 },
}

const CLAIM: Stmt = Stmt::new(
    "INSERT",
    "ingest_batches",
    "INSERT INTO ingest_batches (project_id, kind, scope, batch_id, content_digest, item_count) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
);

const CLAIMED: Stmt = Stmt::new(
    "SELECT",
    "ingest_batches",
    "SELECT content_digest, item_count FROM ingest_batches \
     WHERE project_id = $1 AND kind = $2 AND scope = $3 AND batch_id = $4",
);

/// The claim of a committed batch of the call's project, decided against
/// `digest`: `None` when `batch_id` is free in that project (the same
/// batch_id in another project is another batch), a replay when the stored digest is `digest`, and
/// FAILED_PRECONDITION `IDEMPOTENCY_KEY_REUSED` when it differs or the batch
/// was committed before V11 (it has no canonical digest to compare). Lets
/// a handler recognise a replay before checking anything else (e.g. that
/// the session still accepts writes).
pub async fn find_batch(
    c: &impl deadpool_postgres::GenericClient,
    call: &Call,
    kind: &str,
    scope: &str,
    batch_id: &str,
    digest: &[u8],
) -> Result<Option<Claim>> {
    let project = call.project()?;
    let Some(row) = CLAIMED
        .query_opt(c, &[&project, &kind, &scope, &batch_id])
        .await?
    else {
        return Ok(None);
    };
    let stored: Option<Vec<u8>> = row.try_get(0)?;
    crate::digest::check_replay(
        digest,
        stored.as_deref(),
        || None,
        || crate::digest::key_reused("batch_id", batch_id, "a batch"),
    )?;
    Ok(Some(Claim::Replay {
        item_count: row.try_get(1)?,
    }))
}

/// Claims `batch_id` in the caller's transaction, in the call's project. `digest` is the batch's
/// canonical content digest ([`crate::digest::of_batch`]). A concurrent
/// claim of the same key waits for the first to commit, then is decided
/// as [`find_batch`] decides it.
pub async fn claim_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    call: &Call,
    kind: &str,
    scope: &str,
    batch_id: &str,
    digest: &[u8],
    item_count: usize,
) -> Result<Claim> {
    let project = call.project()?;
    let inserted = CLAIM
        .execute(
            tx,
            &[
                &project,
                &kind,
                &scope,
                &batch_id,
                &digest,
                &(item_count as i32),
            ],
        )
        .await?;
    if inserted == 1 {
        return Ok(Claim::New);
    }
    find_batch(tx, call, kind, scope, batch_id, digest)
        .await?
        .ok_or_else(|| {
            Error::Aborted(
                Reason::ConcurrentChange,
                format!("batch_id {batch_id:?} was released concurrently; retry"),
            )
        })
}

/// The revocation signal of a request's API key (one that never fires
/// when authentication is off).
pub fn revocation_of<T>(request: &tonic::Request<T>) -> Revocation {
    request
        .extensions()
        .get::<Revocation>()
        .cloned()
        .unwrap_or_else(Revocation::never)
}

/// Bounds of every client-stream ingest, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Encoded bytes of chunks one call may hold between reading them from
    /// the socket and committing them (`VERDICT_INGEST_BUFFER_BYTES`).
    pub buffer_bytes: u32,
    /// Longest wait for the next message of a client stream
    /// (`VERDICT_STREAM_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
}

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Limits {
            buffer_bytes: config.ingest_buffer_bytes,
            idle_timeout: config.stream_idle_timeout,
        }
    }
}

/// One chunk of a client stream, its items validated.
#[derive(Debug)]
pub struct Chunk<T> {
    pub sequence: i64,
    pub items: Vec<T>,
    /// Encoded size of the chunk's message: what it counts against
    /// [`Limits::buffer_bytes`].
    pub bytes: usize,
}

/// What an ingest call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub committed_items: i64,
    pub committed_chunks: i64,
    pub skipped_chunks: i64,
    pub high_water_mark: i64,
}

/// Names one resumable ingest (of the call's project: the same ingest_id in
/// another project is another ingest).
#[derive(Debug, Clone)]
pub struct IngestKey {
    /// The area, e.g. `discrepancies`.
    pub kind: &'static str,
    /// The client's ingest_id.
    pub ingest_id: String,
    /// What the ingest writes into (e.g. a session id); a reused ingest_id
    /// must name the same scope.
    pub scope: String,
    /// The revocation signal of the caller's key ([`revocation_of`] the
    /// request): checked before each commit, so nothing is committed under
    /// a key revoked meanwhile.
    pub revocation: Revocation,
}

/// The committed state of one ingest, as GetIngestStatus reports it.
#[derive(Debug, Clone)]
pub struct Status {
    pub scope: String,
    pub high_water_mark: i64,
    pub items: i64,
    pub finished: bool,
    pub updated_at: DateTime<Utc>,
}

const MARK_READ: Stmt = Stmt::new(
    "SELECT",
    "ingest_marks",
    "SELECT scope, high_water_mark, items, finished, updated_at FROM ingest_marks \
     WHERE project_id = $1 AND kind = $2 AND ingest_id = $3",
);

const MARK_ENSURE: Stmt = Stmt::new(
    "INSERT",
    "ingest_marks",
    "INSERT INTO ingest_marks (project_id, kind, ingest_id, scope, high_water_mark) \
     VALUES ($1, $2, $3, $4, 0) ON CONFLICT DO NOTHING",
);

const MARK_LOCK: Stmt = Stmt::new(
    "SELECT",
    "ingest_marks",
    "SELECT high_water_mark, scope FROM ingest_marks \
     WHERE project_id = $1 AND kind = $2 AND ingest_id = $3 FOR UPDATE",
);

const MARK_ADVANCE: Stmt = Stmt::new(
    "UPDATE",
    "ingest_marks",
    "UPDATE ingest_marks SET high_water_mark = $4, items = items + $5, finished = $6, \
     updated_at = now() WHERE project_id = $1 AND kind = $2 AND ingest_id = $3",
);

const MARK_FINISH: Stmt = Stmt::new(
    "UPDATE",
    "ingest_marks",
    "UPDATE ingest_marks SET finished = true, updated_at = now() \
     WHERE project_id = $1 AND kind = $2 AND ingest_id = $3",
);

/// The committed state of an ingest of the call's project; `None` when
/// nothing of it was ever committed there.
pub async fn status(
    c: &impl deadpool_postgres::GenericClient,
    call: &Call,
    kind: &str,
    ingest_id: &str,
) -> Result<Option<Status>> {
    let project = call.project()?;
    let Some(row) = MARK_READ
        .query_opt(c, &[&project, &kind, &ingest_id])
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(Status {
        scope: row.try_get(0)?,
        high_water_mark: row.try_get(1)?,
        items: row.try_get(2)?,
        finished: row.try_get(3)?,
        updated_at: row.try_get(4)?,
    }))
}

/// The GetIngestStatus reply of an ingest.
pub fn to_proto(ingest_id: String, s: Status) -> crate::proto::IngestStatus {
    crate::proto::IngestStatus {
        ingest_id,
        high_water_mark: s.high_water_mark,
        committed_items: s.items,
        finished: s.finished,
        update_time: Some(crate::convert::timestamp(s.updated_at)),
    }
}

/// Chunks handed from the reader to the writer, each holding its bytes of
/// the call's buffer until committed.
struct Batch<T> {
    chunks: Vec<(Chunk<T>, OwnedSemaphorePermit)>,
    items: usize,
    bytes: usize,
    /// The stream ended with a half-close: this batch is its tail.
    last: bool,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            chunks: Vec::new(),
            items: 0,
            bytes: 0,
            last: false,
        }
    }
}

/// Runs one call of a resumable ingest.
///
/// What it commits: chunks at or below the stored high-water mark are
/// skipped; the rest are written in batches (up to `batch_items` items or
/// half the byte buffer), each committed with the new mark while the stream
/// is still open. The tail batch, the `finished` flag and the call's one
/// audit row are committed only after the client half-closes. Any other end
/// (client cancel or reset, broken stream, deadline, idle timeout, invalid
/// chunk, failed write) returns an error and drops the reader, the writer
/// and the transaction in flight: nothing not yet committed is committed
/// afterwards, and no audit row is written. The reply counts exactly what
/// this call committed and skipped: `committed_chunks + skipped_chunks` is
/// the number of chunks it received.
///
/// Memory: the chunks read but not yet committed hold at most
/// `limits.buffer_bytes` of encoded bytes (a semaphore of bytes); when it is
/// full the reader stops reading, so HTTP/2 flow control holds the client.
pub async fn run<S, C>(
    db: &Db,
    call: &Call,
    key: IngestKey,
    sink: Arc<S>,
    chunks: C,
    batch_items: usize,
    limits: Limits,
) -> Result<Outcome>
where
    S: Sink,
    C: Stream<Item = Result<Chunk<S::Item>>> + Send + Unpin,
{
    let work = run_call(db, call, key, sink, chunks, batch_items, limits);
    match call.remaining() {
        Some(left) => tokio::time::timeout(left, work)
            .await
            .map_err(|_| Error::DeadlineExceeded)?,
        None => work.await,
    }
}

async fn run_call<S, C>(
    db: &Db,
    call: &Call,
    key: IngestKey,
    sink: Arc<S>,
    chunks: C,
    batch_items: usize,
    limits: Limits,
) -> Result<Outcome>
where
    S: Sink,
    C: Stream<Item = Result<Chunk<S::Item>>> + Send + Unpin,
{
    let mark = {
        let mut conn = db.conn(call).await?;
        match status(conn.client().await?, call, key.kind, &key.ingest_id).await? {
            Some(s) if s.scope != key.scope => return Err(reused(&key.ingest_id, &s.scope)),
            Some(s) => s.high_water_mark,
            None => 0,
        }
    };
    let (tx, rx) = mpsc::channel(1);
    let reader = read_chunks(chunks, tx, mark, batch_items, limits);
    let writer = write_batches(db, call, &key, &*sink, rx, mark);
    // Reader and writer overlap; the first error ends the call and drops the
    // other half, rolling back its open transaction.
    let (skipped, mut outcome) = futures::future::try_join(reader, writer).await?;
    outcome.skipped_chunks += skipped;
    Ok(outcome)
}

/// Reads the stream into batches for the writer; returns the chunks skipped
/// because they were at or below the mark when the call began.
async fn read_chunks<T, C>(
    mut chunks: C,
    tx: mpsc::Sender<Batch<T>>,
    mark: i64,
    batch_items: usize,
    limits: Limits,
) -> Result<i64>
where
    C: Stream<Item = Result<Chunk<T>>> + Unpin,
{
    let capacity = limits.buffer_bytes as usize;
    let budget = Arc::new(Semaphore::new(capacity));
    let handed_over = || Error::Internal("the ingest writer stopped early".into());
    let mut skipped = 0;
    let mut last_sequence = 0;
    let mut pending = Batch::default();
    loop {
        let next = tokio::time::timeout(limits.idle_timeout, chunks.next())
            .await
            .map_err(|_| idle(limits.idle_timeout))?;
        let Some(chunk) = next else { break };
        let chunk = chunk?;
        if chunk.sequence <= last_sequence {
            let description = if chunk.sequence < 1 {
                format!(
                    "is {}; chunk sequences start at 1 and strictly increase along the stream \
                     (1, 2, 3, …)",
                    chunk.sequence
                )
            } else {
                format!(
                    "is {} after {last_sequence}; chunk sequences strictly increase along the \
                     stream (the next one must be {} or more)",
                    chunk.sequence,
                    last_sequence + 1
                )
            };
            return Err(Error::invalid("sequence", description));
        }
        last_sequence = chunk.sequence;
        if chunk.sequence <= mark {
            skipped += 1;
            continue;
        }
        // A chunk larger than the whole buffer takes all of it.
        let need = chunk.bytes.clamp(1, capacity) as u32;
        let permit = match budget.clone().try_acquire_many_owned(need) {
            Ok(permit) => permit,
            Err(_) => {
                // The buffer is full: hand over what is pending (its commit
                // frees bytes), then wait without reading the socket.
                if !pending.chunks.is_empty() {
                    tx.send(std::mem::take(&mut pending))
                        .await
                        .map_err(|_| handed_over())?;
                }
                budget
                    .clone()
                    .acquire_many_owned(need)
                    .await
                    .map_err(|_| handed_over())?
            }
        };
        pending.items += chunk.items.len();
        pending.bytes += need as usize;
        pending.chunks.push((chunk, permit));
        if pending.items >= batch_items || pending.bytes >= capacity / 2 {
            tx.send(std::mem::take(&mut pending))
                .await
                .map_err(|_| handed_over())?;
        }
    }
    pending.last = true;
    tx.send(pending).await.map_err(|_| handed_over())?;
    Ok(skipped)
}

/// Commits batches as they come, each with the mark; the last one also
/// marks the ingest finished and records the call's audit row.
async fn write_batches<S: Sink>(
    db: &Db,
    call: &Call,
    key: &IngestKey,
    sink: &S,
    mut batches: mpsc::Receiver<Batch<S::Item>>,
    mark: i64,
) -> Result<Outcome> {
    let project = call.project()?;
    let mut outcome = Outcome {
        high_water_mark: mark,
        ..Outcome::default()
    };
    while let Some(batch) = batches.recv().await {
        let last = batch.last;
        let mut chunks = batch.chunks;
        let mut conn = db.conn(call).await?;
        let tx = conn.begin().await?;
        MARK_ENSURE
            .execute(&tx, &[&project, &key.kind, &key.ingest_id, &key.scope])
            .await?;
        let row = MARK_LOCK
            .query_one(&tx, &[&project, &key.kind, &key.ingest_id])
            .await?;
        let current: i64 = row.try_get(0)?;
        // A concurrent first call with this ingest_id may have claimed it
        // for another target.
        let scope: String = row.try_get(1)?;
        if scope != key.scope {
            return Err(reused(&key.ingest_id, &scope));
        }
        // Another call with the same ingest_id may have committed some of
        // these chunks since this one read the mark: they count as skipped.
        let received = chunks.len();
        chunks.retain(|(c, _)| c.sequence > current);
        outcome.skipped_chunks += (received - chunks.len()) as i64;
        outcome.high_water_mark = outcome.high_water_mark.max(current);
        let mut written = 0;
        if let Some(new_mark) = chunks.last().map(|(c, _)| c.sequence) {
            let items: Vec<S::Item> = chunks
                .iter_mut()
                .flat_map(|(c, _)| c.items.drain(..))
                .collect();
            written = sink.write(&tx, &items).await?;
            MARK_ADVANCE
                .execute(
                    &tx,
                    &[
                        &project,
                        &key.kind,
                        &key.ingest_id,
                        &new_mark,
                        &(written as i64),
                        &last,
                    ],
                )
                .await?;
            outcome.high_water_mark = new_mark;
        } else if last {
            MARK_FINISH
                .execute(&tx, &[&project, &key.kind, &key.ingest_id])
                .await?;
        } else {
            continue; // nothing to commit; the transaction rolls back
        }
        if last {
            // One audit row per call that ended orderly, with its tail.
            let what = if outcome.committed_chunks > 0 || !chunks.is_empty() {
                audit::Outcome::Appended
            } else {
                audit::Outcome::Replayed
            };
            audit::record(&tx, call, std::slice::from_ref(&key.scope), what).await?;
        }
        // A key revoked while this batch was on its way (read before the
        // revocation, written after it) commits nothing more: the
        // transaction rolls back when dropped.
        if key.revocation.is_revoked() {
            return Err(Error::KeyRevoked);
        }
        tx.commit().await.map_err(Error::from)?;
        crate::observability::ingest_rows(key.kind, written);
        outcome.committed_items += written as i64;
        outcome.committed_chunks += chunks.len() as i64;
        drop(chunks); // frees the batch's bytes of the buffer
        if last {
            return Ok(outcome);
        }
    }
    Err(Error::Internal(
        "the ingest reader stopped without a half-close".into(),
    ))
}

fn reused(ingest_id: &str, scope: &str) -> Error {
    Error::FailedPrecondition(
        Reason::IdempotencyKeyReused,
        format!(
            "ingest_id {ingest_id:?} was used for another target ({scope}); use a new ingest_id"
        ),
    )
}

fn idle(timeout: Duration) -> Error {
    Error::StreamIdle(format!(
        "the stream sent no message for {timeout:?}; what it had not committed was rolled back \
         (GetIngestStatus tells the high-water mark to resume from)"
    ))
}

/// What a failure to read the next message of a client stream means for
/// the caller.
fn stream_error(status: tonic::Status) -> Error {
    match status.code() {
        tonic::Code::Internal if status.message().starts_with("failed to decode Protobuf") => {
            Error::MalformedMessage(
                "a message of the stream is not a valid protobuf encoding of this RPC's \
                 request message; the call was rolled back to its last committed batch"
                    .into(),
            )
        }
        tonic::Code::OutOfRange if status.message().contains("too large") => {
            Error::ResourceExhausted(
                Reason::MessageTooLarge,
                format!(
                    "a message of the stream is larger than the gateway accepts ({}); send \
                     smaller chunks",
                    status.message()
                ),
            )
        }
        _ => Error::Aborted(
            Reason::ConcurrentChange,
            format!(
                "the stream broke: {}; resume with the same ingest_id",
                status.message()
            ),
        ),
    }
}

/// Opens a client-stream ingest: reads the first message (waiting at most
/// the idle timeout), lets `header` validate what it names (ingest id,
/// target), and returns that with the stream of every message, the first
/// included. A stream that breaks becomes ABORTED (resume with the same
/// ingest id); undecodable bytes INVALID_ARGUMENT (MALFORMED_MESSAGE); a
/// message over the size limit RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE).
pub async fn open<M, H>(
    mut stream: tonic::Streaming<M>,
    limits: Limits,
    header: impl FnOnce(&M) -> Result<H>,
) -> Result<(H, impl Stream<Item = Result<M>> + Send + Unpin)>
where
    M: Send + 'static,
{
    let first = tokio::time::timeout(limits.idle_timeout, stream.message())
        .await
        .map_err(|_| idle(limits.idle_timeout))?
        .map_err(stream_error)?
        .ok_or_else(|| Error::invalid("ingest_id", "the stream held no message"))?;
    let header = header(&first)?;
    let messages =
        futures::stream::once(async { Ok(first) }).chain(stream.map(|m| m.map_err(stream_error)));
    Ok((header, Box::pin(messages)))
}

/// Adds "(chunk N)" to the violations of a chunk, so a client knows which
/// message of its stream was refused.
pub fn in_chunk(error: Error, sequence: i64) -> Error {
    match error {
        Error::InvalidArgument(vs) => Error::InvalidArgument(
            vs.into_iter()
                .map(|v| {
                    FieldViolation::new(v.field, format!("{} (chunk {sequence})", v.description))
                })
                .collect(),
        ),
        other => other,
    }
}
