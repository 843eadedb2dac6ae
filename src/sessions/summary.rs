//! GetSession's optional summary: what belongs to one session, counted in
//! one statement (one snapshot). A separate statement, run only when the
//! request asks, so the plain GetSession keeps its one-row read.

use crate::db::Stmt;
use crate::discrepancies::{Resolution, Severity};
use crate::error::Result;
use crate::proto;
use crate::results::OverallStatus;
use crate::test_cases::ExecutionStatus;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// Counts of session `$2` of project `$1`, one row per (dimension, value).
pub(crate) const SUMMARY: Stmt = Stmt::new(
    "SELECT",
    "results",
    "SELECT 'result' AS dimension, overall_status AS key, count(*) AS n \
       FROM results WHERE project_id = $1 AND session_id = $2 GROUP BY overall_status \
     UNION ALL \
     SELECT 'severity', severity::text, count(*) \
       FROM discrepancies WHERE project_id = $1 AND session_id = $2 GROUP BY severity \
     UNION ALL \
     SELECT 'resolution', resolution, count(*) \
       FROM discrepancies WHERE project_id = $1 AND session_id = $2 GROUP BY resolution \
     UNION ALL \
     SELECT 'execution', status, count(*) \
       FROM test_executions WHERE project_id = $1 AND session_id = $2 GROUP BY status",
);

/// The summary of session `session` of `project` (which the caller has
/// found: a session without records has an all-zero summary).
pub async fn of(
    c: &impl GenericClient,
    project: Uuid,
    session: Uuid,
) -> Result<proto::SessionSummary> {
    let mut results = Vec::new();
    let mut severities = Vec::new();
    let mut resolutions = Vec::new();
    let mut executions = Vec::new();
    for row in SUMMARY.query(c, &[&project, &session]).await? {
        let dimension: &str = row.try_get("dimension")?;
        let key: &str = row.try_get("key")?;
        let n: i64 = row.try_get("n")?;
        match dimension {
            "result" => results.push((OverallStatus::from_db(key)?, n)),
            "severity" => {
                let rank: i16 = key.parse().map_err(|_| {
                    crate::error::Error::Internal(format!("severity {key:?} is not a rank"))
                })?;
                severities.push((Severity::from_rank(rank)?, n));
            }
            "resolution" => resolutions.push((Resolution::from_db(key)?, n)),
            _ => executions.push((ExecutionStatus::from_db(key)?, n)),
        }
    }
    Ok(proto::SessionSummary {
        results_total: total(&results),
        discrepancies_total: total(&severities),
        executions_total: total(&executions),
        results_by_status: counts(results, |s| s.to_proto().as_str_name()),
        discrepancies_by_severity: counts(severities, |s| s.to_proto().as_str_name()),
        discrepancies_by_resolution: counts(resolutions, |r| r.to_proto().as_str_name()),
        executions_by_status: counts(executions, |s| s.to_proto().as_str_name()),
    })
}

/// The sum of `counts`.
fn total<T>(counts: &[(T, i64)]) -> i64 {
    counts.iter().map(|(_, n)| n).sum()
}

/// Counts in the enum's order (severity: most severe first, its rank
/// order), each keyed by its proto value name.
fn counts<T: Ord>(
    mut counts: Vec<(T, i64)>,
    name: impl Fn(&T) -> &'static str,
) -> Vec<proto::SummaryCount> {
    counts.sort_by(|a, b| a.0.cmp(&b.0));
    counts
        .into_iter()
        .map(|(k, count)| proto::SummaryCount {
            key: name(&k).to_owned(),
            count,
        })
        .collect()
}
