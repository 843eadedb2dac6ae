//! Whole-session export: every record of one session, read page by page
//! inside one REPEATABLE READ, READ ONLY transaction (one consistent
//! snapshot), handed over in chunks through a bounded channel so memory
//! stays flat whatever the session's size.

use crate::discrepancies::{self, Discrepancy, ResolutionChange};
use crate::error::{Error, Result};
use crate::proto;
use crate::results::{self, ValidationResult};
use crate::sessions::{self, LogEntry, Session};
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

    let mut after = 0;
    loop {
        let page = sessions::sql::logs_after(c, session_id, after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        let full = page.len() as i64 == CHUNK;
        send!(page.into_iter().map(Record::LogEntry).collect());
        if !full {
            break;
        }
    }

    let mut after = None;
    loop {
        let page = results::sql::page_of_session(c, session_id, after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        let full = page.len() as i64 == CHUNK;
        send!(page.into_iter().map(Record::Result).collect());
        if !full {
            break;
        }
    }

    let mut after = None;
    loop {
        let page = discrepancies::sql::page_of_session(c, session_id, after, CHUNK).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        let full = page.len() as i64 == CHUNK;
        send!(page.into_iter().map(Record::Discrepancy).collect());
        if !full {
            break;
        }
    }

    let mut after = None;
    loop {
        let page = discrepancies::sql::resolutions_of_session(c, session_id, after, CHUNK).await?;
        let Some((d, last)) = page.last() else { break };
        after = Some((*d, last.id));
        let full = page.len() as i64 == CHUNK;
        send!(
            page.into_iter()
                .map(|(discrepancy_id, change)| Record::ResolutionChange {
                    discrepancy_id,
                    change
                })
                .collect()
        );
        if !full {
            break;
        }
    }
    Ok(())
}
