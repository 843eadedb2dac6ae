//! Whole-session export: every record of one session, read page by page
//! inside one REPEATABLE READ, READ ONLY transaction (one consistent
//! snapshot), handed over in chunks through a bounded channel so memory
//! stays flat whatever the session's size.

use crate::coverage::{self, Counters, Report};
use crate::discrepancies::{self, Discrepancy, ResolutionChange};
use crate::error::{Error, Result};
use crate::proto;
use crate::results::{self, ValidationResult};
use crate::sessions::{self, LogEntry, Session};
use crate::test_cases::{self, executions::Execution};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Records per chunk (and per page read).
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

/// Reads the session's records in `c` (a snapshot transaction) and sends
/// them in chunks. Stops early, without error, when the receiver is gone.
pub async fn run(
    c: &impl GenericClient,
    session_id: Uuid,
    out: &mpsc::Sender<Vec<Record>>,
) -> Result<()> {
    let session = sessions::sql::get(c, session_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("session {session_id} not found")))?;
    macro_rules! send {
        ($chunk:expr) => {
            if out.send($chunk).await.is_err() {
                return Ok(());
            }
        };
    }
    send!(vec![Record::Session(session)]);

    // Each kind of record, page by page in a stable order, resuming after
    // the key of the last record sent.
    macro_rules! pages {
        ($fetch:expr, $key:expr, $wrap:expr) => {{
            let mut after = None;
            loop {
                let page = $fetch(after.clone()).await?;
                let Some(last) = page.last() else { break };
                after = Some($key(last));
                let full = page.len() as i64 == CHUNK;
                send!(page.into_iter().map($wrap).collect());
                if !full {
                    break;
                }
            }
        }};
    }
    pages!(
        |after: Option<i64>| sessions::sql::logs_after(c, session_id, after.unwrap_or(0), CHUNK),
        |l: &LogEntry| l.id,
        Record::LogEntry
    );
    pages!(
        |after| results::sql::page_of_session(c, session_id, after, CHUNK),
        |r: &ValidationResult| r.id,
        Record::Result
    );
    pages!(
        |after| discrepancies::sql::page_of_session(c, session_id, after, CHUNK),
        |d: &Discrepancy| d.id,
        Record::Discrepancy
    );
    pages!(
        |after| discrepancies::sql::resolutions_of_session(c, session_id, after, CHUNK),
        |(d, change): &(Uuid, ResolutionChange)| (*d, change.id),
        |(discrepancy_id, change)| Record::ResolutionChange {
            discrepancy_id,
            change
        }
    );
    pages!(
        |after| test_cases::executions_sql::page_of_session(c, session_id, after, CHUNK),
        |e: &Execution| e.id,
        Record::Execution
    );
    pages!(
        |after| coverage::sql::reports_of_session(c, session_id, after, CHUNK),
        |r: &Report| r.id,
        Record::CoverageReport
    );
    pages!(
        |after| coverage::sql::files_of_session(c, session_id, after, CHUNK),
        |(report, path, _): &(Uuid, String, Counters)| (*report, path.clone()),
        |(report_id, path, counters)| Record::CoverageFile {
            report_id,
            path,
            counters
        }
    );
    Ok(())
}
