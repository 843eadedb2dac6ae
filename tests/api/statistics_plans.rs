//! The plans of GetTestStatistics' own statements on a quarter million executions
//! (loaded with bench/scale/executions.sql): with the generic plan a
//! prepared statement ends up with, the entity-scoped ones read their
//! index, never a sequential scan of test_executions; subsystem, test type
//! and whole-project totals and histograms read the per-scope day rows
//! (migration V35), one per day, and the flakiness ranking reads one
//! recent-outcome row per test case (falling back to an index-only scan).

use crate::helpers::*;
use serde_json::Value;
use std::time::Instant;
use verdict::test_cases::statistics_sql as s;

/// A quarter of the S scale (1M): on the shared CI machine loading 1M
/// rows with their indexes takes minutes; the plans are the same from a
/// few hundred thousand rows on (the planner sees the row counts).
const ROWS: i64 = 250_000;

/// bench/scale/executions.sql with its psql variables filled in and its
/// psql commands (and the `\gset` probe for the rollup table, which V25
/// has created here) left out.
fn loader(project: uuid::Uuid) -> String {
    let text = include_str!("../../bench/scale/executions.sql");
    text.lines()
        .filter(|l| !l.starts_with('\\') && !l.ends_with("\\gset"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(":'project'", &format!("'{project}'"))
        .replace(":rows", &ROWS.to_string())
        .replace(":days", "90")
        .replace(":test_cases", "2000")
}

/// Every node of a JSON plan.
fn nodes<'a>(plan: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(plan);
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for c in children {
            nodes(c, out);
        }
    }
}

#[tokio::test]
async fn entity_scoped_statistics_statements_use_their_index_on_a_quarter_million_executions() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    let sql = app.sql().await;
    let started = Instant::now();
    sql.batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    sql.batch_execute(&loader(project)).await.expect("load");
    // What autovacuum does for an append-mostly table (PostgreSQL 13 on
    // vacuums after inserts too): the visibility map lets the flakiness
    // ranking read statuses from the index alone.
    sql.batch_execute("VACUUM ANALYZE test_executions")
        .await
        .unwrap();
    let loaded = started.elapsed();
    let count: i64 = sql
        .query_one(
            "SELECT count(*) FROM test_executions WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, ROWS);

    let p = format!("'{project}'::uuid");
    let tc = format!("md5('{project}' || '/tc/5')::uuid");
    let run: uuid::Uuid = sql
        .query_one(
            "SELECT id FROM test_runs WHERE project_id = $1 AND client_key LIKE 'scale-run-%' \
             ORDER BY started_at DESC LIMIT 1 OFFSET 3",
            &[&project],
        )
        .await
        .unwrap()
        .get(0);
    let run = format!("'{run}'::uuid");
    // A 30-day window with partial edges: the rollup for 29 whole days.
    let days = "current_date - 29, current_date";
    let edges = "date_trunc('day', now()) - interval '30 days' + interval '5 hours', \
                 date_trunc('day', now()) - interval '29 days', date_trunc('day', now()), now()";
    let raw = "now() - interval '30 days', now()";
    // (name, statement, its arguments, entity-scoped: no seq scan allowed)
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "TOTALS_TEST_CASE",
            s::TOTALS_TEST_CASE.sql,
            format!("{p}, {days}, {tc}"),
        ),
        (
            "HISTOGRAM_TEST_CASE",
            s::HISTOGRAM_TEST_CASE.sql,
            format!("{p}, {days}, {tc}"),
        ),
        (
            "EDGES_TEST_CASE",
            s::EDGES_TEST_CASE.sql,
            format!("{p}, {edges}, {tc}"),
        ),
        (
            "EXACT_TEST_CASE",
            s::EXACT_TEST_CASE.sql,
            format!("{p}, {raw}, {tc}"),
        ),
        (
            "FLAKY_TEST_CASE",
            s::FLAKY_TEST_CASE.sql,
            format!("{p}, {raw}, 20, 10, {tc}"),
        ),
        (
            "TOTALS_SUBSYSTEM",
            s::TOTALS_SUBSYSTEM.sql,
            format!("{p}, {days}, 'subsystem-3'"),
        ),
        (
            "HISTOGRAM_SUBSYSTEM",
            s::HISTOGRAM_SUBSYSTEM.sql,
            format!("{p}, {days}, 'subsystem-3'"),
        ),
        (
            "EDGES_SUBSYSTEM",
            s::EDGES_SUBSYSTEM.sql,
            format!("{p}, {edges}, 'subsystem-3'"),
        ),
        (
            "FLAKY_SUBSYSTEM",
            s::FLAKY_SUBSYSTEM.sql,
            format!("{p}, {raw}, 20, 10, 'subsystem-3'"),
        ),
        (
            "TOTALS_TEST_TYPE",
            s::TOTALS_TEST_TYPE.sql,
            format!("{p}, {days}, 'e2e'"),
        ),
        (
            "HISTOGRAM_TEST_TYPE",
            s::HISTOGRAM_TEST_TYPE.sql,
            format!("{p}, {days}, 'e2e'"),
        ),
        (
            "EDGES_TEST_TYPE",
            s::EDGES_TEST_TYPE.sql,
            format!("{p}, {edges}, 'e2e'"),
        ),
        (
            "FLAKY_TEST_TYPE",
            s::FLAKY_TEST_TYPE.sql,
            format!("{p}, {raw}, 20, 10, 'e2e'"),
        ),
        ("TOTALS_ALL", s::TOTALS_ALL.sql, format!("{p}, {days}")),
        (
            "HISTOGRAM_ALL",
            s::HISTOGRAM_ALL.sql,
            format!("{p}, {days}"),
        ),
        ("EDGES_ALL", s::EDGES_ALL.sql, format!("{p}, {edges}")),
        ("FLAKY_ALL", s::FLAKY_ALL.sql, format!("{p}, {raw}, 20, 10")),
        ("TOTALS_RUN", s::TOTALS_RUN.sql, format!("{p}, {run}")),
        ("FLAKY_RUN", s::FLAKY_RUN.sql, format!("{p}, {run}, 20, 10")),
        (
            "TOTALS_LABELS",
            s::TOTALS_LABELS.sql,
            format!("{p}, {raw}, '{{\"os\": \"linux\"}}'::jsonb"),
        ),
    ];
    sql.batch_execute("SET TimeZone = 'UTC'; SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let mut scanned = Vec::new();
    let mut rolled = Vec::new();
    let mut flaky = Vec::new();
    for (i, (name, statement, args)) in cases.iter().enumerate() {
        sql.batch_execute(&format!("PREPARE stats_{i} AS {statement}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let plan: Value = sql
            .query_one(
                &format!("EXPLAIN (FORMAT JSON) EXECUTE stats_{i}({args})"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .get(0);
        let mut all = Vec::new();
        nodes(&plan[0]["Plan"], &mut all);
        let seq: Vec<_> = all
            .iter()
            .filter(|n| n["Node Type"] == "Seq Scan" && n["Relation Name"] == "test_executions")
            .collect();
        if !seq.is_empty() {
            scanned.push(format!("{name}: {}", serde_json::to_string(&plan).unwrap()));
        }
        let indexes: Vec<_> = all
            .iter()
            .filter_map(|n| n.get("Index Name").and_then(Value::as_str))
            .collect();
        eprintln!("{name}: indexes {indexes:?}");
        // The raw executions are read only for the window's partial edge
        // days, by an index bounded in time.
        if name.starts_with("EDGES") {
            for n in all
                .iter()
                .filter(|n| n["Relation Name"] == "test_executions")
            {
                let cond = n
                    .get("Index Cond")
                    .or_else(|| n.get("Recheck Cond"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                assert!(
                    cond.contains("started_at >= $2") || cond.contains("started_at >= $4"),
                    "{name} reads executions only by an index bounded to the edges: {plan}"
                );
            }
        }
        // Subsystem, test type and whole-project totals and histograms
        // read the second rollup level (one row per day), no execution.
        if ["_SUBSYSTEM", "_TEST_TYPE", "_ALL"]
            .iter()
            .any(|s| name.ends_with(s))
            && (name.starts_with("TOTALS") || name.starts_with("HISTOGRAM"))
        {
            assert!(
                all.iter()
                    .any(|n| n["Relation Name"] == "test_execution_scope_days"),
                "{name} reads test_execution_scope_days: {plan}"
            );
            assert!(
                !all.iter()
                    .any(|n| n["Relation Name"] == "test_execution_days"),
                "{name} does not read the per test case day rows: {plan}"
            );
            assert!(
                !all.iter().any(|n| n["Relation Name"] == "test_executions"),
                "{name} reads no execution: {plan}"
            );
            rolled.push((i, name, args));
        }
        // The flakiness ranking reads the last N statuses of each test case
        // from the index alone.
        if name.starts_with("FLAKY") && !name.ends_with("_RUN") && !name.ends_with("_LABELS") {
            assert!(
                all.iter().any(|n| n["Node Type"] == "Index Only Scan"
                    && n["Index Name"] == "test_executions_project_case_recent_idx"),
                "{name} reads statuses by index-only scan: {plan}"
            );
            assert!(
                all.iter()
                    .any(|n| n["Relation Name"] == "test_case_recent_outcomes"),
                "{name} reads test_case_recent_outcomes: {plan}"
            );
            flaky.push((i, name, args));
        }
    }
    // Run for real: the rollup-backed statements read one row per day of
    // the window (29 whole days), not one per test case or execution.
    for (i, name, args) in rolled {
        let plan: Value = sql
            .query_one(
                &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE stats_{i}({args})"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .get(0);
        let mut all = Vec::new();
        nodes(&plan[0]["Plan"], &mut all);
        let read: f64 = all
            .iter()
            .filter(|n| n["Relation Name"] == "test_execution_scope_days")
            .map(|n| n["Actual Rows"].as_f64().unwrap() * n["Actual Loops"].as_f64().unwrap())
            .sum();
        assert!(
            (1.0..=29.0).contains(&read),
            "{name} reads {read} scope day rows: {plan}"
        );
        eprintln!(
            "{name}: {read} scope day rows, {} ms",
            plan[0]["Execution Time"]
        );
    }
    // A window ending now, 20 outcomes: every test case is answered from
    // its recent-outcome row; no execution is read.
    for (i, name, args) in flaky {
        let plan: Value = sql
            .query_one(
                &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE stats_{i}({args})"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .get(0);
        let mut all = Vec::new();
        nodes(&plan[0]["Plan"], &mut all);
        let executions: f64 = all
            .iter()
            .filter(|n| n["Relation Name"] == "test_executions")
            .map(|n| n["Actual Rows"].as_f64().unwrap() * n["Actual Loops"].as_f64().unwrap())
            .sum();
        assert_eq!(executions, 0.0, "{name} reads no execution: {plan}");
        eprintln!("{name}: {} ms", plan[0]["Execution Time"]);
    }
    assert!(
        scanned.is_empty(),
        "sequential scans of test_executions:\n{}",
        scanned.join("\n")
    );
    eprintln!(
        "loaded {ROWS} executions in {loaded:?}; whole test {:?}",
        started.elapsed()
    );
}
