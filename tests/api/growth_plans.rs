//! Issue 18: the gateway's own entity-scoped statements, planned GENERIC (the
//! plan a long-lived pooled connection ends up with after five executions)
//! over a million rows, use their index; none reads its big table by a
//! sequential scan.

use crate::helpers::{default_project, spawn_app};
use serde_json::Value;
use uuid::Uuid;
use verdict::db::Stmt;

/// Every (node type, relation, index) of a JSON plan.
pub(crate) fn nodes(plan: &Value, out: &mut Vec<(String, String, String)>) {
    let text = |k: &str| plan.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    out.push((text("Node Type"), text("Relation Name"), text("Index Name")));
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for c in children {
            nodes(c, out);
        }
    }
}

/// The generic plan of `stmt` with these argument literals.
pub(crate) async fn generic_plan(
    sql: &tokio_postgres::Client,
    name: &str,
    stmt: &Stmt,
    args: &str,
) -> Vec<(String, String, String)> {
    sql.batch_execute(&format!("PREPARE {name} AS {}", stmt.sql))
        .await
        .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
    let row = sql
        .query_one(
            &format!("EXPLAIN (FORMAT JSON) EXECUTE {name}({args})"),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("explain {name}: {e}"));
    let plan: Value = row.get(0);
    let mut out = Vec::new();
    nodes(&plan[0]["Plan"], &mut out);
    out
}

/// Fills `table` by `insert` with its indexes dropped and built again after
/// (a sorted build: the same indexes, in a fraction of the time).
async fn bulk(sql: &tokio_postgres::Client, table: &str, insert: &str) {
    let defs: Vec<(String, String)> = sql
        .query(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i \
             WHERE i.tablename = $1 AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
                 WHERE c.conname = i.indexname)",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, _) in &defs {
        sql.batch_execute(&format!("DROP INDEX {name}"))
            .await
            .unwrap();
    }
    sql.batch_execute(insert).await.unwrap();
    for (_, def) in &defs {
        sql.batch_execute(def).await.unwrap();
    }
    sql.batch_execute(&format!("VACUUM ANALYZE {table}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn entity_scoped_statements_use_their_index_on_a_million_rows() {
    let app = spawn_app().await;
    let project: Uuid = default_project(&app).await;
    let sql = app.sql().await;
    // The gateway's connection settings carry its statement timeout: the
    // bulk loads here take longer.
    sql.batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    let p = format!("'{project}'::uuid");

    // A million metric points: 20 names interleaved over 90 days, labels.
    bulk(
        &sql,
        "metric_points",
        &format!(
            "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
             SELECT {p}, 'metric_' || (g % 20), g % 1000, 'ms', \
                    jsonb_build_object('env', (ARRAY['prod', 'staging', 'dev'])[1 + (g / 20) % 3]), \
                    now() - make_interval(secs => (1 - g::float8 / 1000000) * 90 * 86400) \
             FROM generate_series(0, 999999) g"
        ),
    )
    .await;
    // A million per-session counts (50k sessions over 90 days) and their days.
    bulk(
        &sql,
        "discrepancy_session_counts",
        &format!(
            "INSERT INTO discrepancy_session_counts \
                 (project_id, session_id, session_created_at, dimension, key, n) \
             SELECT {p}, s.id, s.t, 'kind', 'kind' || k, 1 + k \
             FROM (SELECT gen_random_uuid() AS id, \
                          now() - make_interval(secs => g * 155.0) AS t \
                   FROM generate_series(1, 50000) g) s, generate_series(1, 20) k"
        ),
    )
    .await;
    sql.batch_execute(&format!(
        "INSERT INTO discrepancy_day_counts (project_id, day, dimension, key, n) \
         SELECT {p}, date_trunc('day', session_created_at, 'UTC'), dimension, key, sum(n) \
         FROM discrepancy_session_counts GROUP BY 2, 3, 4; \
         ANALYZE discrepancy_day_counts"
    ))
    .await
    .unwrap();
    // 100k coverage reports of 3 branches and 10 subsystems.
    bulk(
        &sql,
        "coverage_reports",
        &format!(
            "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, client_key, \
                 lines_covered, lines_total, branches_covered, branches_total, functions_covered, \
                 functions_total, recorded_at) \
             SELECT {p}, gen_random_uuid(), md5(g::text) || 'abcdef01', \
                    (ARRAY['main', 'develop', 'release'])[1 + g % 3], 'sub' || (g % 10), 'k' || g, \
                    1, 2, 1, 2, 1, 2, now() - make_interval(secs => g * 77.0) \
             FROM generate_series(1, 100000) g"
        ),
    )
    .await;

    sql.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let day = "now() - interval '1 day'";
    let checks: Vec<(&str, &Stmt, String, &str, &str)> = vec![
        (
            "summary_session",
            &verdict::discrepancies::sql::SUMMARY_SESSION,
            format!("gen_random_uuid(), {p}"),
            "discrepancy_session_counts",
            "discrepancy_session_counts_pkey",
        ),
        (
            "summary_range",
            &verdict::discrepancies::sql::SUMMARY_RANGE,
            format!(
                "{p}, date_trunc('day', now() - interval '29 days'), date_trunc('day', now()), \
                 now() - interval '30 days', date_trunc('day', now() - interval '29 days'), \
                 date_trunc('day', now()), now()"
            ),
            "discrepancy_day_counts",
            "discrepancy_day_counts_pkey",
        ),
        (
            "summary_range_edges",
            &verdict::discrepancies::sql::SUMMARY_RANGE,
            format!(
                "{p}, date_trunc('day', now() - interval '29 days'), date_trunc('day', now()), \
                 now() - interval '30 days', date_trunc('day', now() - interval '29 days'), \
                 date_trunc('day', now()), now()"
            ),
            "discrepancy_session_counts",
            "discrepancy_session_counts_created_idx",
        ),
        (
            "series_all",
            &verdict::metrics::sql::SERIES_FIXED_ALL,
            format!("'metric_3', now() - interval '90 days', now(), 3600, '{{}}', {p}"),
            "metric_points",
            "metric_points_name_time_idx",
        ),
        (
            "series_labels",
            &verdict::metrics::sql::SERIES_FIXED,
            format!(
                "'metric_3', now() - interval '90 days', now(), 86400, '{{\"env\": \"prod\"}}', {p}"
            ),
            "metric_points",
            "metric_points_name_time_idx",
        ),
        (
            "series_month",
            &verdict::metrics::sql::SERIES_MONTH_ALL,
            format!("'metric_3', now() - interval '90 days', now(), '{{}}', {p}"),
            "metric_points",
            "metric_points_name_time_idx",
        ),
        (
            "trend_one",
            &verdict::coverage::sql::TREND_BRANCH_SUBSYSTEM,
            format!("'main', 'sub3', 'day', 1, {day}, now(), {p}, NULL, NULL"),
            "coverage_reports",
            "coverage_reports_branch_idx",
        ),
        (
            "aggregate_one",
            &verdict::coverage::sql::AGGREGATE_BRANCH_SUBSYSTEM,
            format!("'main', 'sub3', now() - interval '7 days', now(), false, {p}, NULL, NULL"),
            "coverage_reports",
            "coverage_reports_branch_idx",
        ),
    ];
    for (name, stmt, args, table, index) in checks {
        let plan = generic_plan(&sql, name, stmt, &args).await;
        assert!(
            // A bitmap heap scan names the table and its bitmap index scan
            // the index.
            plan.iter().any(|(_, _, used)| used == index),
            "{name}: reads {table} by {index}: {plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|(node, relation, _)| node == "Seq Scan" && relation == table),
            "{name}: no sequential scan of {table}: {plan:?}"
        );
        if name == "series_all" {
            assert!(
                plan.iter()
                    .any(|(node, relation, _)| node == "Index Only Scan"
                        && relation == "metric_points"),
                "series_all: an index-only scan (the value is in the index): {plan:?}"
            );
        }
    }
    app.stop().await.unwrap();
}
