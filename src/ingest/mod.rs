//! Bulk writes shared by every area: idempotent batches (a client key per
//! batch, claimed in the same transaction as the rows) and resumable client
//! streams (numbered chunks, committed in bounded batches together with the
//! ingest's high-water mark).

use crate::audit;
use crate::call::Call;
use crate::db::{Db, Stmt};
use crate::error::{Error, FieldViolation, Reason, Result};
use futures::{Stream, StreamExt};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc;

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
    "INSERT INTO ingest_batches (kind, scope, batch_id, content_digest, item_count) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
);

const CLAIMED: Stmt = Stmt::new(
    "SELECT",
    "ingest_batches",
    "SELECT content_digest, item_count FROM ingest_batches \
     WHERE kind = $1 AND scope = $2 AND batch_id = $3",
);

/// The claim of a committed batch, decided against `digest`: `None` when
/// `batch_id` is free, a replay when the stored digest is `digest`, and
/// FAILED_PRECONDITION `IDEMPOTENCY_KEY_REUSED` when it differs or the batch
/// was committed before V11 (it has no canonical digest to compare). Lets
/// a handler recognise a replay before checking anything else (e.g. that
/// the session still accepts writes).
pub async fn find_batch(
    c: &impl deadpool_postgres::GenericClient,
    kind: &str,
    scope: &str,
    batch_id: &str,
    digest: &[u8],
) -> Result<Option<Claim>> {
    let Some(row) = CLAIMED.query_opt(c, &[&kind, &scope, &batch_id]).await? else {
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

/// Claims `batch_id` in the caller's transaction. `digest` is the batch's
/// canonical content digest ([`crate::digest::of_batch`]). A concurrent
/// claim of the same key waits for the first to commit, then is decided
/// as [`find_batch`] decides it.
pub async fn claim_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    kind: &str,
    scope: &str,
    batch_id: &str,
    digest: &[u8],
    item_count: usize,
) -> Result<Claim> {
    let inserted = CLAIM
        .execute(
            tx,
            &[&kind, &scope, &batch_id, &digest, &(item_count as i32)],
        )
        .await?;
    if inserted == 1 {
        return Ok(Claim::New);
    }
    find_batch(tx, kind, scope, batch_id, digest)
        .await?
        .ok_or_else(|| {
            Error::Aborted(
                Reason::ConcurrentChange,
                format!("batch_id {batch_id:?} was released concurrently; retry"),
            )
        })
}

/// One chunk of a client stream, its items validated.
#[derive(Debug)]
pub struct Chunk<T> {
    pub sequence: i64,
    pub items: Vec<T>,
}

/// What an ingest call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    pub committed_items: i64,
    pub committed_chunks: i64,
    pub skipped_chunks: i64,
    pub high_water_mark: i64,
}

/// Names one resumable ingest.
#[derive(Debug, Clone)]
pub struct IngestKey {
    /// The area, e.g. `discrepancies`.
    pub kind: &'static str,
    /// The client's ingest_id.
    pub ingest_id: String,
    /// What the ingest writes into (e.g. a session id); a reused ingest_id
    /// must name the same scope.
    pub scope: String,
}

const MARK_READ: Stmt = Stmt::new(
    "SELECT",
    "ingest_marks",
    "SELECT scope, high_water_mark FROM ingest_marks WHERE kind = $1 AND ingest_id = $2",
);

const MARK_ENSURE: Stmt = Stmt::new(
    "INSERT",
    "ingest_marks",
    "INSERT INTO ingest_marks (kind, ingest_id, scope, high_water_mark) VALUES ($1, $2, $3, 0) \
     ON CONFLICT DO NOTHING",
);

const MARK_LOCK: Stmt = Stmt::new(
    "SELECT",
    "ingest_marks",
    "SELECT high_water_mark FROM ingest_marks WHERE kind = $1 AND ingest_id = $2 FOR UPDATE",
);

const MARK_ADVANCE: Stmt = Stmt::new(
    "UPDATE",
    "ingest_marks",
    "UPDATE ingest_marks SET high_water_mark = $3, items = items + $4, updated_at = now() \
     WHERE kind = $1 AND ingest_id = $2",
);

/// Runs a resumable ingest: skips chunks at or below the stored mark,
/// batches the rest up to `batch_items` items, and commits each batch with
/// the new mark in one transaction. Reading the stream and writing overlap
/// (one batch in flight, one being filled), so memory stays bounded by two
/// batches whatever the stream's length.
pub async fn run<S, C>(
    db: &Db,
    call: &Call,
    key: IngestKey,
    sink: Arc<S>,
    mut chunks: C,
    batch_items: usize,
) -> Result<Outcome>
where
    S: Sink,
    C: Stream<Item = Result<Chunk<S::Item>>> + Send + Unpin,
{
    let mark = {
        let mut conn = db.conn(call).await?;
        let row = MARK_READ
            .query_opt(conn.client().await?, &[&key.kind, &key.ingest_id])
            .await?;
        match row {
            Some(row) => {
                let scope: String = row.try_get(0)?;
                if scope != key.scope {
                    return Err(Error::FailedPrecondition(
                        Reason::IdempotencyKeyReused,
                        format!(
                            "ingest_id {:?} was used for another target ({scope}); use a new ingest_id",
                            key.ingest_id
                        ),
                    ));
                }
                row.try_get::<_, i64>(1)?
            }
            None => 0,
        }
    };

    let (tx, rx) = mpsc::channel::<Vec<Chunk<S::Item>>>(1);
    let writer = tokio::spawn(write_batches(db.clone(), *call, key, sink, rx, mark));

    let mut skipped = 0;
    let mut last_sequence = 0;
    let mut pending: Vec<Chunk<S::Item>> = Vec::new();
    let mut pending_items = 0;
    let read = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if chunk.sequence <= last_sequence {
                return Err(Error::invalid(
                    "sequence",
                    format!(
                        "must increase along the stream: {} follows {last_sequence}",
                        chunk.sequence
                    ),
                ));
            }
            last_sequence = chunk.sequence;
            if chunk.sequence <= mark {
                skipped += 1;
                continue;
            }
            pending_items += chunk.items.len();
            pending.push(chunk);
            if pending_items >= batch_items {
                pending_items = 0;
                if tx.send(std::mem::take(&mut pending)).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
        }
        if !pending.is_empty() {
            let _ = tx.send(std::mem::take(&mut pending)).await;
        }
        Ok(())
    }
    .await;
    drop(tx);
    // Whatever was handed to the writer is committed (or fails) before we
    // answer, so the mark a client resumes from is never behind the reply.
    let written = writer
        .await
        .map_err(|e| Error::Internal(format!("ingest writer panicked: {e}")))?;
    read?;
    let mut outcome = written?;
    outcome.skipped_chunks = skipped;
    outcome.high_water_mark = outcome.high_water_mark.max(mark);
    Ok(outcome)
}

async fn write_batches<S: Sink>(
    db: Db,
    call: Call,
    key: IngestKey,
    sink: Arc<S>,
    mut batches: mpsc::Receiver<Vec<Chunk<S::Item>>>,
    mark: i64,
) -> Result<Outcome> {
    let mut outcome = Outcome {
        high_water_mark: mark,
        ..Outcome::default()
    };
    while let Some(mut batch) = batches.recv().await {
        let mut conn = db.conn(&call).await?;
        let tx = conn.begin().await?;
        MARK_ENSURE
            .execute(&tx, &[&key.kind, &key.ingest_id, &key.scope])
            .await?;
        let current: i64 = MARK_LOCK
            .query_one(&tx, &[&key.kind, &key.ingest_id])
            .await?
            .try_get(0)?;
        // Another call with the same ingest_id may have committed some of
        // these chunks since we read the mark.
        batch.retain(|c| c.sequence > current);
        let Some(last) = batch.last().map(|c| c.sequence) else {
            continue;
        };
        let items: Vec<S::Item> = batch.iter_mut().flat_map(|c| c.items.drain(..)).collect();
        let written = sink.write(&tx, &items).await?;
        MARK_ADVANCE
            .execute(&tx, &[&key.kind, &key.ingest_id, &last, &(written as i64)])
            .await?;
        // One audit row per committed batch, in its transaction.
        audit::record(
            &tx,
            &call,
            std::slice::from_ref(&key.scope),
            audit::Outcome::Appended,
        )
        .await?;
        tx.commit().await.map_err(Error::from)?;
        crate::observability::ingest_rows(key.kind, written);
        outcome.committed_items += written as i64;
        outcome.committed_chunks += batch.len() as i64;
        outcome.high_water_mark = last;
    }
    Ok(outcome)
}

/// Opens a client-stream ingest: reads the first message, lets `header`
/// validate what it names (ingest id, target), and returns that with the
/// stream of every message, the first included. A stream that breaks
/// becomes ABORTED (retry with the same ingest id).
pub async fn open<M, H>(
    mut stream: tonic::Streaming<M>,
    header: impl FnOnce(&M) -> Result<H>,
) -> Result<(H, impl Stream<Item = Result<M>> + Send + Unpin)>
where
    M: Send + 'static,
{
    let first = stream
        .message()
        .await
        .map_err(|s| {
            Error::Aborted(
                Reason::ConcurrentChange,
                format!("the stream broke: {}", s.message()),
            )
        })?
        .ok_or_else(|| Error::invalid("ingest_id", "the stream held no message"))?;
    let header = header(&first)?;
    let messages = futures::stream::once(async { Ok(first) }).chain(stream.map(|m| {
        m.map_err(|s| {
            Error::Aborted(
                Reason::ConcurrentChange,
                format!("the stream broke: {}", s.message()),
            )
        })
    }));
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
