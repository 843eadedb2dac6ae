//! Retention: deleting old sessions and everything of theirs in bounded
//! batches, each its own short transaction (no long lock, no huge WAL burst),
//! within one project.
//!
//! Counting (the dry run) scans the old sessions' rows of every cleaned
//! table (issue 18), under the call's deadline (its statement timeout).

use crate::audit::{self, Outcome};
use crate::call::Call;
use crate::db::{Conn, Stmt};
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// Tables cleaned, children first (the order rows are deleted in).
pub const CLEANED: &[&str] = &[
    "coverage_files",
    "coverage_reports",
    "test_executions",
    "discrepancy_resolutions",
    "discrepancies",
    "results",
    "session_logs",
    "sessions",
];

// Every statement names the project: the sessions picked are the
// project's, and each delete is limited to the project's rows of them as
// well (a session's children are in its project; the filter also lets each
// delete use the indexes that lead with `project_id`).
const PICK: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT id FROM sessions WHERE project_id = $1 AND created_at < $2 \
     ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED",
);

const DELETE_COVERAGE_FILES: Stmt = Stmt::new(
    "DELETE",
    "coverage_files",
    "DELETE FROM coverage_files WHERE project_id = $1 AND report_id IN \
     (SELECT id FROM coverage_reports WHERE project_id = $1 AND session_id = ANY($2))",
);
const DELETE_COVERAGE_REPORTS: Stmt = Stmt::new(
    "DELETE",
    "coverage_reports",
    "DELETE FROM coverage_reports WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_EXECUTIONS: Stmt = Stmt::new(
    "DELETE",
    "test_executions",
    "DELETE FROM test_executions WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_RESOLUTIONS: Stmt = Stmt::new(
    "DELETE",
    "discrepancy_resolutions",
    "DELETE FROM discrepancy_resolutions WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_DISCREPANCIES: Stmt = Stmt::new(
    "DELETE",
    "discrepancies",
    "DELETE FROM discrepancies WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_RESULTS: Stmt = Stmt::new(
    "DELETE",
    "results",
    "DELETE FROM results WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_LOGS: Stmt = Stmt::new(
    "DELETE",
    "session_logs",
    "DELETE FROM session_logs WHERE project_id = $1 AND session_id = ANY($2)",
);
const DELETE_SESSIONS: Stmt = Stmt::new(
    "DELETE",
    "sessions",
    "DELETE FROM sessions WHERE project_id = $1 AND id = ANY($2)",
);

const COUNT: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "WITH old AS (SELECT id FROM sessions WHERE project_id = $1 AND created_at < $2) \
     SELECT (SELECT count(*) FROM coverage_files WHERE project_id = $1 AND report_id IN \
                (SELECT id FROM coverage_reports WHERE project_id = $1 \
                 AND session_id IN (SELECT id FROM old))), \
            (SELECT count(*) FROM coverage_reports WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM test_executions WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM discrepancy_resolutions WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM discrepancies WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM results WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM session_logs WHERE project_id = $1 \
             AND session_id IN (SELECT id FROM old)), \
            (SELECT count(*) FROM old)",
);

/// What a cleanup did (or would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Rows per table, in `CLEANED` order.
    pub deleted: Vec<(&'static str, i64)>,
    pub batches: i64,
}

impl Report {
    /// Adds rows deleted per table (a table already listed adds up).
    pub fn merge(&mut self, more: &[(&'static str, i64)]) {
        for (table, n) in more {
            match self.deleted.iter_mut().find(|(t, _)| t == table) {
                Some((_, total)) => *total += n,
                None => self.deleted.push((table, *n)),
            }
        }
    }
}

/// Counts what a cleanup of `project` at `cutoff` would delete.
pub async fn dry_run(
    c: &impl GenericClient,
    project: Uuid,
    cutoff: DateTime<Utc>,
) -> Result<Report> {
    let row = COUNT.query_one(c, &[&project, &cutoff]).await?;
    Ok(Report {
        deleted: CLEANED
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((*t, row.try_get(i)?)))
            .collect::<Result<_>>()?,
        batches: 0,
    })
}

/// Deletes the sessions of the call's project created before `cutoff` and
/// their children, `batch` sessions per transaction, until none is left; no
/// other project's row is read or deleted. Each transaction records the
/// sessions it deleted in the project's audit trail; a run that deletes
/// nothing records one row with no targets.
#[tracing::instrument(name = "cleanup.run", skip_all, fields(otel.kind = "internal"))]
pub async fn run(
    conn: &mut Conn,
    call: &Call,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<Report> {
    let project = call.project()?;
    let started = std::time::Instant::now();
    let mut totals = [0i64; 8];
    let mut batches = 0;
    loop {
        let tx = conn.begin().await?;
        let ids: Vec<Uuid> = PICK
            .query(&tx, &[&project, &cutoff, &batch])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            if batches == 0 {
                // Every admin call is audited, whatever it did: a cleanup
                // that found nothing to delete says so with a row of its own.
                audit::record(&tx, call, &[], Outcome::Deleted).await?;
                tx.commit().await.map_err(Error::from)?;
            }
            break;
        }
        let steps = [
            DELETE_COVERAGE_FILES,
            DELETE_COVERAGE_REPORTS,
            DELETE_EXECUTIONS,
            DELETE_RESOLUTIONS,
            DELETE_DISCREPANCIES,
            DELETE_RESULTS,
            DELETE_LOGS,
            DELETE_SESSIONS,
        ];
        for (total, stmt) in totals.iter_mut().zip(steps) {
            *total += Stmt::execute(&stmt, &tx, &[&project, &ids]).await? as i64;
        }
        let targets: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        audit::record(&tx, call, &targets, Outcome::Deleted).await?;
        tx.commit().await.map_err(Error::from)?;
        batches += 1;
    }
    let report = Report {
        deleted: CLEANED.iter().copied().zip(totals).collect(),
        batches,
    };
    crate::observability::cleanup_finished(&report.deleted, started.elapsed());
    Ok(report)
}
