//! Row counts, database size, session age range.

use crate::db::Stmt;
use crate::error::Result;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

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

const ESTIMATED: Stmt = Stmt::new(
    "SELECT",
    "pg_stat_user_tables",
    "SELECT t.name, COALESCE(s.n_live_tup, 0) \
     FROM unnest($1::text[]) AS t(name) \
     LEFT JOIN pg_stat_user_tables s ON s.relname = t.name AND s.schemaname = current_schema()",
);

/// (table, rows) for every table; exact or from PostgreSQL's live estimates.
pub async fn table_counts(c: &impl GenericClient, exact: bool) -> Result<Vec<(String, i64)>> {
    let rows = if exact {
        EXACT.query(c, &[]).await?
    } else {
        ESTIMATED.query(c, &[&TABLES]).await?
    };
    let mut counts: Vec<(String, i64)> = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_>>()?;
    counts.sort_by_key(|(t, _)| TABLES.iter().position(|x| x == t));
    Ok(counts)
}

const OVERVIEW: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT pg_database_size(current_database()), \
            (SELECT min(created_at) FROM sessions), (SELECT max(created_at) FROM sessions)",
);

/// Database size in bytes, oldest and newest session creation times.
pub async fn overview(
    c: &impl GenericClient,
) -> Result<(i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    let row = OVERVIEW.query_one(c, &[]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}
