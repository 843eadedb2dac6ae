//! Integrity checks: problems constraints cannot rule out (or that data
//! loaded around them brings in), each found by one query and, on request,
//! repaired by one statement, all repairs in the caller's transaction; all
//! within one project (a check of A never reads, counts or repairs B's rows).
//!
//! Each check is a full pass over the project's rows of its table (issue 18:
//! seconds at tens of millions of rows), run under the call's deadline (its
//! statement timeout).

use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use std::time::Duration;
use uuid::Uuid;

/// One check: how to find the problem and, if it can be, repair it. Every
/// statement takes `$1`, the stuck threshold in seconds (most ignore it),
/// and `$2`, the project.
struct Check {
    name: &'static str,
    description: &'static str,
    find: Stmt,
    repair: Option<Stmt>,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub description: &'static str,
    pub count: i64,
    pub sample_ids: Vec<String>,
    pub repaired: i64,
}

macro_rules! find {
    ($table:literal, $sql:literal) => {
        Stmt::new(
            "SELECT",
            $table,
            concat!(
                "SELECT count(*) OVER (), id::text FROM (",
                $sql,
                ") found LIMIT 20"
            ),
        )
    };
}

const CHECKS: &[Check] = &[
    Check {
        name: "orphan_session_logs",
        description: "log entries whose session does not exist; repair deletes them",
        find: find!(
            "session_logs",
            "SELECT l.id FROM session_logs l WHERE $1::float8 >= 0 AND l.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = l.project_id AND s.id = l.session_id)"
        ),
        repair: Some(Stmt::new(
            "DELETE",
            "session_logs",
            "DELETE FROM session_logs l WHERE $1::float8 >= 0 AND l.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = l.project_id AND s.id = l.session_id)",
        )),
    },
    Check {
        name: "orphan_results",
        description: "results whose session does not exist; repair deletes them",
        find: find!(
            "results",
            "SELECT r.id FROM results r WHERE $1::float8 >= 0 AND r.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = r.project_id AND s.id = r.session_id)"
        ),
        repair: Some(Stmt::new(
            "DELETE",
            "results",
            "DELETE FROM results r WHERE $1::float8 >= 0 AND r.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = r.project_id AND s.id = r.session_id)",
        )),
    },
    Check {
        name: "orphan_discrepancies",
        description: "discrepancies whose session does not exist; repair deletes them",
        find: find!(
            "discrepancies",
            "SELECT d.id FROM discrepancies d WHERE $1::float8 >= 0 AND d.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = d.project_id AND s.id = d.session_id)"
        ),
        repair: Some(Stmt::new(
            "DELETE",
            "discrepancies",
            "DELETE FROM discrepancies d WHERE $1::float8 >= 0 AND d.project_id = $2 \
             AND NOT EXISTS (SELECT 1 FROM sessions s \
                             WHERE s.project_id = d.project_id AND s.id = d.session_id)",
        )),
    },
    Check {
        name: "dangling_result_references",
        description: "discrepancies naming a result that does not exist; repair clears the reference",
        find: find!(
            "discrepancies",
            "SELECT d.id FROM discrepancies d WHERE $1::float8 >= 0 AND d.project_id = $2 \
             AND d.result_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM results r WHERE r.project_id = d.project_id \
                             AND r.session_id = d.session_id AND r.id = d.result_id)"
        ),
        repair: Some(Stmt::new(
            "UPDATE",
            "discrepancies",
            "UPDATE discrepancies d SET result_id = NULL WHERE $1::float8 >= 0 AND d.project_id = $2 \
             AND d.result_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM results r WHERE r.project_id = d.project_id \
                             AND r.session_id = d.session_id AND r.id = d.result_id)",
        )),
    },
    Check {
        name: "scores_out_of_range",
        description: "fidelity scores or confidences outside [0, 1] or NaN; not repaired automatically (the right value is unknown)",
        find: find!(
            "results",
            "SELECT id FROM results WHERE $1::float8 >= 0 AND project_id = $2 \
             AND (fidelity_score = 'NaN' OR fidelity_score < 0 OR fidelity_score > 1) \
             UNION ALL SELECT id FROM discrepancies WHERE project_id = $2 \
             AND (confidence = 'NaN' OR confidence < 0 OR confidence > 1)"
        ),
        repair: None,
    },
    Check {
        name: "stuck_sessions",
        description: "sessions PROCESSING for longer than the threshold; repair marks them FAILED",
        find: find!(
            "sessions",
            "SELECT id FROM sessions WHERE project_id = $2 AND status = 'processing' \
             AND COALESCE(started_at, updated_at) < now() - $1::float8 * interval '1 second'"
        ),
        repair: Some(Stmt::new(
            "UPDATE",
            "sessions",
            "UPDATE sessions SET status = 'failed', completed_at = now(), updated_at = now(), \
                    version = version + 1 \
             WHERE project_id = $2 AND status = 'processing' \
               AND COALESCE(started_at, updated_at) < now() - $1::float8 * interval '1 second'",
        )),
    },
    Check {
        name: "final_sessions_without_completion_time",
        description: "COMPLETED, FAILED or CANCELLED sessions without completed_at; repair sets it to their last update",
        find: find!(
            "sessions",
            "SELECT id FROM sessions WHERE $1::float8 >= 0 AND project_id = $2 \
             AND status IN ('completed', 'failed', 'cancelled') AND completed_at IS NULL"
        ),
        repair: Some(Stmt::new(
            "UPDATE",
            "sessions",
            "UPDATE sessions SET completed_at = updated_at WHERE $1::float8 >= 0 AND project_id = $2 \
             AND status IN ('completed', 'failed', 'cancelled') AND completed_at IS NULL",
        )),
    },
];

/// Runs every check over the rows of `project`; with `repair`, fixes what
/// can be fixed there (the caller owns the transaction, so all repairs
/// commit or none).
#[tracing::instrument(name = "integrity.check", skip_all, fields(otel.kind = "internal"))]
pub async fn check(
    c: &impl GenericClient,
    project: Uuid,
    stuck_after: Duration,
    repair: bool,
) -> Result<Vec<Finding>> {
    let threshold = stuck_after.as_secs_f64();
    let mut findings = Vec::new();
    for check in CHECKS {
        let rows = Stmt::query(&check.find, c, &[&threshold, &project]).await?;
        let Some(first) = rows.first() else {
            crate::observability::integrity_findings(check.name, 0);
            continue;
        };
        let count: i64 = first.try_get(0)?;
        let sample_ids = rows
            .iter()
            .map(|r| r.try_get(1))
            .collect::<Result<Vec<String>, _>>()?;
        let repaired = match (&check.repair, repair) {
            (Some(stmt), true) => Stmt::execute(stmt, c, &[&threshold, &project]).await? as i64,
            _ => 0,
        };
        crate::observability::integrity_findings(check.name, count);
        findings.push(Finding {
            check: check.name,
            description: check.description,
            count,
            sample_ids,
            repaired,
        });
    }
    Ok(findings)
}
