//! Whole-session export: every record of one session, read inside one
//! REPEATABLE READ, READ ONLY transaction (one consistent snapshot) in
//! keyset batches bounded by bytes as well as rows, and handed to a
//! [`Sink`] one record at a time, so memory stays flat whatever the
//! session's size and however large its rows.
//!
//! Each kind of record is read in batches: the first of one row, each next
//! one of `budget / largest record of that kind seen so far` rows (1 to
//! [`CHUNK`]), so a batch holds about `budget` bytes (the gateway's
//! `max_message_bytes`) when rows are alike — a session of 2 MB results
//! reads them one or two at a time, one of small log entries a thousand at
//! a time. Kinds whose rows can be large (results, executions: JSON of up
//! to a request's size) are also cut in SQL once a batch's JSON and text
//! reach `budget` bytes, so a large row after many small ones cannot swell
//! a batch: such a batch holds at most `budget` bytes of that text plus one
//! row. The gRPC sink ([`Chunks`]) cuts messages by their encoded size.
//!
//! An export works within one project: a session of another project is not
//! found (the same answer as for no session at all). The session's records
//! are then read by session id: each carries its session's project (the
//! composite foreign keys `(project_id, session_id)` rule out a child in
//! another project than its session).

use crate::coverage::{self, Counters, Report};
use crate::discrepancies::{self, Discrepancy, ResolutionChange};
use crate::error::{Error, Reason, Result};
use crate::pagination;
use crate::proto;
use crate::results::{self, ValidationResult};
use crate::sessions::{self, LogEntry, Session};
use crate::test_cases::{self, executions::Execution};
use deadpool_postgres::GenericClient;
use prost::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Most records per batch read and per message sent.
pub const CHUNK: i64 = 1000;

/// One exported record; as JSON, tagged with its `type`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Session(Session),
    LogEntry(LogEntry),
    Result(ValidationResult),
    Discrepancy(Discrepancy),
    ResolutionChange {
        discrepancy_id: Uuid,
        #[serde(flatten)]
        change: ResolutionChange,
    },
    Execution(Execution),
    CoverageReport(Report),
    CoverageFile {
        report_id: Uuid,
        path: String,
        #[serde(flatten)]
        counters: Counters,
    },
}

impl From<Record> for proto::ExportRecord {
    fn from(r: Record) -> Self {
        use proto::export_record::Record as R;
        let record = match r {
            Record::Session(s) => R::Session(s.into()),
            Record::LogEntry(e) => R::LogEntry(e.into()),
            Record::Result(x) => R::Result(x.into()),
            Record::Discrepancy(d) => R::Discrepancy(d.into()),
            Record::ResolutionChange {
                discrepancy_id,
                change,
            } => R::ResolutionChange(proto::ExportedResolutionChange {
                discrepancy_id: discrepancy_id.to_string(),
                change: Some(change.into()),
            }),
            Record::Execution(e) => R::Execution(e.into()),
            Record::CoverageReport(r) => R::CoverageReport(r.into()),
            Record::CoverageFile {
                report_id,
                path,
                counters,
            } => R::CoverageFile(proto::ExportedCoverageFile {
                report_id: report_id.to_string(),
                file: Some(proto::FileCoverage {
                    path,
                    counters: Some(counters.into()),
                }),
            }),
        };
        proto::ExportRecord {
            record: Some(record),
        }
    }
}

/// Where exported records go, one at a time, in export order.
pub trait Sink {
    /// Takes one record; returns the bytes it takes in the output (how
    /// batches are sized), or `None` when the reader is gone and the export
    /// should stop.
    fn push(&mut self, record: Record) -> impl Future<Output = Result<Option<usize>>> + Send;
}

/// What an export read, to log and to check that batches stay bounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Records handed to the sink.
    pub records: u64,
    /// Batches read from the database.
    pub fetches: u64,
    /// Most rows one batch read.
    pub largest_fetch_rows: u64,
    /// Most output bytes of the records of one batch.
    pub largest_fetch_bytes: u64,
}

/// How many rows the next batch of a kind reads: about `budget` bytes of
/// rows the size of the largest seen so far, 1 to [`CHUNK`].
pub fn rows_per_fetch(budget: usize, largest_seen: usize) -> i64 {
    (budget / largest_seen.max(1)).clamp(1, CHUNK as usize) as i64
}

/// Reads the records of the session `session_id` of `project` in `c` (a
/// snapshot transaction) and pushes them to `sink`, reading batches of about
/// `budget` bytes. NOT_FOUND when `project` has no such session. Stops
/// early, without error, when the sink's reader is gone.
pub async fn run(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    budget: usize,
    sink: &mut impl Sink,
) -> Result<ExportStats> {
    let mut stats = ExportStats::default();
    let not_found = || Error::NotFound(format!("session {session_id} not found"));
    let session = sessions::sql::get(c, project, session_id)
        .await?
        .ok_or_else(not_found)?;
    stats.records += 1;
    if sink.push(Record::Session(session)).await?.is_none() {
        return Ok(stats);
    }

    // Each kind of record, batch by batch in a stable order, resuming after
    // the key of the last record read. Kinds whose rows can be large
    // (`cut`: results, executions) are also cut by bytes in SQL, so a short
    // batch does not mean the end: only an empty one does.
    let max_bytes = i64::try_from(budget).unwrap_or(i64::MAX);
    macro_rules! batches {
        ($cut:literal, $fetch:expr, $key:expr, $wrap:expr) => {{
            let mut after = None;
            let mut rows = 1_i64;
            let mut largest = 0_usize;
            loop {
                let batch = $fetch(after.clone(), rows).await?;
                let read = batch.len() as i64;
                let Some(last) = batch.last() else { break };
                after = Some($key(last));
                let mut bytes = 0_usize;
                for row in batch {
                    let Some(size) = sink.push($wrap(row)).await? else {
                        return Ok(stats);
                    };
                    stats.records += 1;
                    largest = largest.max(size);
                    bytes += size;
                }
                stats.fetches += 1;
                stats.largest_fetch_rows = stats.largest_fetch_rows.max(read as u64);
                stats.largest_fetch_bytes = stats.largest_fetch_bytes.max(bytes as u64);
                if !$cut && read < rows {
                    break;
                }
                rows = rows_per_fetch(budget, largest);
            }
        }};
    }
    batches!(
        false,
        |after: Option<i64>, n| sessions::sql::logs_after(
            c,
            project,
            session_id,
            after.unwrap_or(0),
            n
        ),
        |l: &LogEntry| l.id,
        Record::LogEntry
    );
    batches!(
        true,
        |after, n| results::sql::page_of_session(c, project, session_id, after, n, max_bytes),
        |r: &ValidationResult| r.id,
        Record::Result
    );
    batches!(
        false,
        |after, n| discrepancies::sql::page_of_session(c, session_id, after, n),
        |d: &Discrepancy| d.id,
        Record::Discrepancy
    );
    batches!(
        false,
        |after, n| discrepancies::sql::resolutions_of_session(c, session_id, after, n),
        |(d, change): &(Uuid, ResolutionChange)| (*d, change.id),
        |(discrepancy_id, change)| Record::ResolutionChange {
            discrepancy_id,
            change
        }
    );
    batches!(
        true,
        |after, n| test_cases::executions_sql::page_of_session(c, session_id, after, n, max_bytes),
        |e: &Execution| e.id,
        Record::Execution
    );
    batches!(
        false,
        |after, n| coverage::sql::reports_of_session(c, project, session_id, after, n),
        |r: &Report| r.id,
        Record::CoverageReport
    );
    batches!(
        false,
        |after, n| coverage::sql::files_of_session(c, project, session_id, after, n),
        |(report, path, _): &(Uuid, String, Counters)| (*report, path.clone()),
        |(report_id, path, counters)| Record::CoverageFile {
            report_id,
            path,
            counters
        }
    );
    Ok(stats)
}

/// The gRPC sink: packs records into `ExportSessionResponse` messages of
/// at most `limit` encoded bytes and [`CHUNK`] records, sent on `out` (a
/// bounded channel, so a slow reader holds the export back).
pub struct Chunks<'a, E> {
    out: &'a mpsc::Sender<Result<proto::ExportSessionResponse, E>>,
    limit: usize,
    records: Vec<proto::ExportRecord>,
    used: usize,
    /// Messages sent.
    pub messages: u64,
}

impl<'a, E: Send> Chunks<'a, E> {
    pub fn new(
        out: &'a mpsc::Sender<Result<proto::ExportSessionResponse, E>>,
        limit: usize,
    ) -> Self {
        Chunks {
            out,
            limit,
            records: Vec::new(),
            used: 0,
            messages: 0,
        }
    }

    /// Sends the records held; false when the reader is gone.
    pub async fn flush(&mut self) -> bool {
        if self.records.is_empty() {
            return true;
        }
        let records = std::mem::take(&mut self.records);
        self.used = 0;
        self.messages += 1;
        self.out
            .send(Ok(proto::ExportSessionResponse { records }))
            .await
            .is_ok()
    }
}

impl<E: Send> Sink for Chunks<'_, E> {
    async fn push(&mut self, record: Record) -> Result<Option<usize>> {
        let record = proto::ExportRecord::from(record);
        let size = record.encoded_len();
        let cost = pagination::item_cost(size);
        // A record was accepted in a request of at most the same limit;
        // only one stored under a higher limit can be too large to send.
        if cost > self.limit {
            return Err(Error::ResourceExhausted(
                Reason::MessageTooLarge,
                format!(
                    "a record of this session encodes to {size} bytes, more than the gateway's \
                     {}-byte message limit; raise VERDICT_MAX_MESSAGE_BYTES to export it",
                    self.limit
                ),
            ));
        }
        let full = self.used + cost > self.limit || self.records.len() as i64 >= CHUNK;
        if full && !self.flush().await {
            return Ok(None);
        }
        self.used += cost;
        self.records.push(record);
        Ok(Some(size))
    }
}

/// The command-line sink: each record as one JSON line, in chunks of up to
/// [`CHUNK`] lines sent on `out`.
pub struct JsonLines {
    out: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    lines: i64,
}

impl JsonLines {
    pub fn new(out: mpsc::Sender<Vec<u8>>) -> Self {
        JsonLines {
            out,
            buf: Vec::new(),
            lines: 0,
        }
    }

    /// Sends the lines held; false when the reader is gone.
    pub async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        self.lines = 0;
        self.out.send(std::mem::take(&mut self.buf)).await.is_ok()
    }
}

impl Sink for JsonLines {
    async fn push(&mut self, record: Record) -> Result<Option<usize>> {
        let before = self.buf.len();
        serde_json::to_writer(&mut self.buf, &record)
            .map_err(|e| Error::Internal(format!("export record as JSON: {e}")))?;
        self.buf.push(b'\n');
        self.lines += 1;
        let size = self.buf.len() - before;
        if self.lines >= CHUNK && !self.flush().await {
            return Ok(None);
        }
        Ok(Some(size))
    }
}
