//! Row counts, database size, session age range: within one project, or
//! (for an operator's key bound to no project) over every project.
//!
//! Exact counts are full passes over the project's rows of each table (issue
//! 18: seconds at tens of millions of rows), run under the call's deadline
//! (its statement timeout); the dashboards' reads never call these.

use crate::db::Stmt;
use crate::error::Result;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// The gateway's tables, in the order they are reported.
pub const TABLES: &[&str] = &[
    "sessions",
    "session_logs",
    "results",
    "discrepancies",
    "discrepancy_resolutions",
    "fingerprint_rules",
    "metric_points",
    "metric_rollups",
    "ingest_batches",
    "ingest_marks",
    "test_cases",
    "test_executions",
    "coverage_reports",
    "coverage_files",
    "api_keys",
    "audit_events",
];

const EXACT: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT 'sessions', count(*) FROM sessions \
     UNION ALL SELECT 'session_logs', count(*) FROM session_logs \
     UNION ALL SELECT 'results', count(*) FROM results \
     UNION ALL SELECT 'discrepancies', count(*) FROM discrepancies \
     UNION ALL SELECT 'discrepancy_resolutions', count(*) FROM discrepancy_resolutions \
     UNION ALL SELECT 'fingerprint_rules', count(*) FROM fingerprint_rules \
     UNION ALL SELECT 'metric_points', count(*) FROM metric_points \
     UNION ALL SELECT 'metric_rollups', count(*) FROM metric_rollups \
     UNION ALL SELECT 'ingest_batches', count(*) FROM ingest_batches \
     UNION ALL SELECT 'ingest_marks', count(*) FROM ingest_marks \
     UNION ALL SELECT 'test_cases', count(*) FROM test_cases \
     UNION ALL SELECT 'test_executions', count(*) FROM test_executions \
     UNION ALL SELECT 'coverage_reports', count(*) FROM coverage_reports \
     UNION ALL SELECT 'coverage_files', count(*) FROM coverage_files \
     UNION ALL SELECT 'api_keys', count(*) FROM api_keys \
     UNION ALL SELECT 'audit_events', count(*) FROM audit_events",
);

/// The rows of one project in every table: always exact (PostgreSQL's
/// estimates are per table, not per project); each count is served by an
/// index leading with `project_id`. `api_keys` counts the keys bound to the
/// project.
const EXACT_IN_PROJECT: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT 'sessions', count(*) FROM sessions WHERE project_id = $1 \
     UNION ALL SELECT 'session_logs', count(*) FROM session_logs WHERE project_id = $1 \
     UNION ALL SELECT 'results', count(*) FROM results WHERE project_id = $1 \
     UNION ALL SELECT 'discrepancies', count(*) FROM discrepancies WHERE project_id = $1 \
     UNION ALL SELECT 'discrepancy_resolutions', count(*) FROM discrepancy_resolutions WHERE project_id = $1 \
     UNION ALL SELECT 'fingerprint_rules', count(*) FROM fingerprint_rules WHERE project_id = $1 \
     UNION ALL SELECT 'metric_points', count(*) FROM metric_points WHERE project_id = $1 \
     UNION ALL SELECT 'metric_rollups', count(*) FROM metric_rollups WHERE project_id = $1 \
     UNION ALL SELECT 'ingest_batches', count(*) FROM ingest_batches WHERE project_id = $1 \
     UNION ALL SELECT 'ingest_marks', count(*) FROM ingest_marks WHERE project_id = $1 \
     UNION ALL SELECT 'test_cases', count(*) FROM test_cases WHERE project_id = $1 \
     UNION ALL SELECT 'test_executions', count(*) FROM test_executions WHERE project_id = $1 \
     UNION ALL SELECT 'coverage_reports', count(*) FROM coverage_reports WHERE project_id = $1 \
     UNION ALL SELECT 'coverage_files', count(*) FROM coverage_files WHERE project_id = $1 \
     UNION ALL SELECT 'api_keys', count(*) FROM api_keys WHERE project_id = $1 \
     UNION ALL SELECT 'audit_events', count(*) FROM audit_events WHERE project_id = $1",
);

const ESTIMATED: Stmt = Stmt::new(
    "SELECT",
    "pg_stat_user_tables",
    "SELECT t.name, COALESCE(s.n_live_tup, 0) \
     FROM unnest($1::text[]) AS t(name) \
     LEFT JOIN pg_stat_user_tables s ON s.relname = t.name AND s.schemaname = current_schema()",
);

/// Which rows a statistic covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One project's rows.
    Project(Uuid),
    /// Every project's (an operator's cross-project read).
    AllProjects,
}

/// (table, rows, exact) for every table: one project's rows, always exact,
/// or every project's, exact on request or from PostgreSQL's live estimates.
pub async fn table_counts(
    c: &impl GenericClient,
    scope: Scope,
    exact: bool,
) -> Result<(Vec<(String, i64)>, bool)> {
    let (rows, exact) = match scope {
        Scope::Project(project) => (EXACT_IN_PROJECT.query(c, &[&project]).await?, true),
        Scope::AllProjects if exact => (EXACT.query(c, &[]).await?, true),
        Scope::AllProjects => (ESTIMATED.query(c, &[&TABLES]).await?, false),
    };
    let mut counts: Vec<(String, i64)> = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_>>()?;
    counts.sort_by_key(|(t, _)| TABLES.iter().position(|x| x == t));
    Ok((counts, exact))
}

const OVERVIEW: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT pg_database_size(current_database()), \
            (SELECT min(created_at) FROM sessions), (SELECT max(created_at) FROM sessions)",
);

const SESSION_RANGE_IN_PROJECT: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT min(created_at), max(created_at) FROM sessions WHERE project_id = $1",
);

/// Database size in bytes (0 within a project: the database is shared by
/// every project, so its size is an operator's statistic), oldest and
/// newest session creation times.
pub async fn overview(
    c: &impl GenericClient,
    scope: Scope,
) -> Result<(i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    match scope {
        Scope::Project(project) => {
            let row = SESSION_RANGE_IN_PROJECT.query_one(c, &[&project]).await?;
            Ok((0, row.try_get(0)?, row.try_get(1)?))
        }
        Scope::AllProjects => {
            let row = OVERVIEW.query_one(c, &[]).await?;
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
        }
    }
}
