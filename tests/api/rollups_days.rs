//! Issue 18: ComputeRollups sums per-day counts kept at write time
//! (discrepancy_created_days, V36; test_execution_days, V25) instead of
//! counting raw rows. Every figure is checked against SQL over the raw rows,
//! after deletes, updates, concurrent writers and a computation whose
//! backend was terminated half-way.

use crate::helpers::{
    TestApp, create_project, default_project, in_project, spawn_app, terminate_lock_waiter,
    wait_for_lock_wait,
};
use prost_types::Timestamp;
use std::collections::BTreeMap;
use tonic::Code;
use uuid::Uuid;
use verdict::proto::{ComputeRollupsRequest, ListRollupsRequest, Rollup, RollupPeriod, TimeRange};

const START: &str = "2026-03-01T00:00:00Z";
const END: &str = "2026-04-15T00:00:00Z";

fn ts(rfc3339: &str) -> Timestamp {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn whole_range() -> Option<TimeRange> {
    Some(TimeRange {
        start_time: Some(ts(START)),
        end_time: Some(ts(END)),
    })
}

fn period_name(p: RollupPeriod) -> &'static str {
    match p {
        RollupPeriod::Day => "day",
        RollupPeriod::Week => "week",
        RollupPeriod::Month => "month",
        RollupPeriod::Unspecified => unreachable!(),
    }
}

/// Sessions, results, discrepancies and executions of `project` spread over
/// 40 days from START (several per day, every severity and status), with the
/// per-day execution rollup rebuilt as the gateway keeps it.
async fn plant(app: &TestApp, project: Uuid, salt: i32) {
    let sql = app.sql().await;
    sql.batch_execute(&format!(
        "INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                               validation_scope, status, created_at, updated_at, started_at,
                               completed_at)
         SELECT '{project}', gen_random_uuid(), 'rd-{salt}-' || g,
                (ARRAY['cobol', 'pl1'])[1 + g % 2], 'java', 'full',
                (ARRAY['completed', 'failed', 'pending', 'processing', 'cancelled'])[1 + (g + {salt}) % 5],
                t, t, t + interval '1 minute', t + make_interval(secs => 60 + g % 7)
         FROM generate_series(0, 159) g,
              LATERAL (SELECT '{START}'::timestamptz + make_interval(mins => g * 360 + 17 * {salt}) AS t) x;
         INSERT INTO results (project_id, session_id, id, request_id, result_type, overall_status,
                              fidelity_score, created_at)
         SELECT s.project_id, s.id, gen_random_uuid(), 'r' || i, 'static', 'passed',
                ((i * 37 + length(s.request_id)) % 100) / 100.0, s.created_at + make_interval(mins => i * 50)
         FROM sessions s CROSS JOIN generate_series(1, 3) i
         WHERE s.project_id = '{project}' AND s.request_id LIKE 'rd-{salt}-%';
         INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description,
                                    confidence, fingerprint, created_at)
         SELECT s.project_id, s.id, gen_random_uuid(), 'k', (1 + (i + {salt}) % 5)::int2, 'd', 1,
                'f' || i, s.created_at + make_interval(mins => i * 37)
         FROM sessions s CROSS JOIN generate_series(1, 12) i
         WHERE s.project_id = '{project}' AND s.request_id LIKE 'rd-{salt}-%';
         INSERT INTO test_cases (project_id, id, key, name, test_type)
         SELECT '{project}', gen_random_uuid(), 'rd-{salt}-' || c, 'case', 'unit'
         FROM generate_series(1, 4) c;
         INSERT INTO test_executions (project_id, id, test_case_id, status, started_at, created_at)
         SELECT c.project_id, gen_random_uuid(), c.id,
                (ARRAY['passed', 'failed', 'skipped', 'error', 'passed'])[1 + (g + {salt}) % 5],
                '{START}'::timestamptz + make_interval(mins => g * 97), now()
         FROM test_cases c CROSS JOIN generate_series(0, 599) g
         WHERE c.project_id = '{project}' AND c.key LIKE 'rd-{salt}-%';"
    ))
    .await
    .unwrap();
    rebuild_execution_days(app, project).await;
}

/// The per-day execution rollup of `project` recomputed from its raw rows,
/// as the gateway's own writes keep it (raw SQL inserts bypass that path).
async fn rebuild_execution_days(app: &TestApp, project: Uuid) {
    app.sql()
        .await
        .batch_execute(&format!(
            "DELETE FROM test_execution_days WHERE project_id = '{project}';
             INSERT INTO test_execution_days (project_id, test_case_id, day, total, passed, failed,
                                              skipped, error, duration_ms, hist_buckets, hist_counts)
             SELECT a.* FROM (SELECT array_agg(project_id) AS p, array_agg(test_case_id) AS t,
                                     array_agg(day) AS d
                              FROM (SELECT DISTINCT project_id, test_case_id,
                                           (started_at AT TIME ZONE 'UTC')::date AS day
                                    FROM test_executions WHERE project_id = '{project}') k) k,
                  verdict_execution_days_of(k.p, k.t, k.d) a;"
        ))
        .await
        .unwrap();
}

async fn compute(app: &TestApp, slug: &str, period: RollupPeriod, full: bool) -> Vec<i64> {
    app.metrics
        .clone()
        .compute_rollups(in_project(
            ComputeRollupsRequest {
                period: period as i32,
                range: whole_range(),
                full_recompute: full,
            },
            slug,
        ))
        .await
        .unwrap()
        .into_inner()
        .period_starts
        .iter()
        .map(|t| t.seconds)
        .collect()
}

async fn listed(app: &TestApp, slug: &str, period: RollupPeriod) -> Vec<Rollup> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = app
            .metrics
            .clone()
            .list_rollups(in_project(
                ListRollupsRequest {
                    period: period as i32,
                    range: None,
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        out.extend(page.rollups);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// The figures a rollup must show, computed here from the raw rows.
#[derive(Debug, Clone, Default, PartialEq)]
struct Expected {
    sessions: [i64; 6],
    discrepancies: [i64; 5],
    executions: i64,
    passed: i64,
    failed_or_error: i64,
    avg_fidelity: Option<f64>,
    p95_fidelity: Option<f64>,
}

/// Per period start (seconds), what SQL over the raw rows of `project` says.
async fn expected(app: &TestApp, project: Uuid, period: RollupPeriod) -> BTreeMap<i64, Expected> {
    let sql = app.sql().await;
    let p = period_name(period);
    let mut out: BTreeMap<i64, Expected> = BTreeMap::new();
    let epoch = |t: chrono::DateTime<chrono::Utc>| t.timestamp();
    for r in sql
        .query(
            "SELECT date_trunc($2, created_at, 'UTC'), count(*),
                    count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'processing'),
                    count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'failed'),
                    count(*) FILTER (WHERE status = 'cancelled')
             FROM sessions WHERE project_id = $1 GROUP BY 1",
            &[&project, &p],
        )
        .await
        .unwrap()
    {
        let e = out.entry(epoch(r.get(0))).or_default();
        for i in 0..6 {
            e.sessions[i] = r.get(i + 1);
        }
    }
    for r in sql
        .query(
            "SELECT date_trunc($2, created_at, 'UTC'), severity, count(*)
             FROM discrepancies WHERE project_id = $1 GROUP BY 1, 2",
            &[&project, &p],
        )
        .await
        .unwrap()
    {
        let severity: i16 = r.get(1);
        out.entry(epoch(r.get(0))).or_default().discrepancies[severity as usize - 1] = r.get(2);
    }
    for r in sql
        .query(
            "SELECT date_trunc($2, started_at, 'UTC'), count(*),
                    count(*) FILTER (WHERE status = 'passed'),
                    count(*) FILTER (WHERE status IN ('failed', 'error'))
             FROM test_executions WHERE project_id = $1 GROUP BY 1",
            &[&project, &p],
        )
        .await
        .unwrap()
    {
        let e = out.entry(epoch(r.get(0))).or_default();
        (e.executions, e.passed, e.failed_or_error) = (r.get(1), r.get(2), r.get(3));
    }
    for r in sql
        .query(
            "SELECT date_trunc($2, created_at, 'UTC'), avg(fidelity_score)::float8,
                    (percentile_cont(0.95) WITHIN GROUP (ORDER BY fidelity_score))::float8
             FROM results WHERE project_id = $1 GROUP BY 1",
            &[&project, &p],
        )
        .await
        .unwrap()
    {
        let e = out.entry(epoch(r.get(0))).or_default();
        (e.avg_fidelity, e.p95_fidelity) = (r.get(1), r.get(2));
    }
    out
}

/// Every stored rollup of `slug` equals the raw-row figures of its period,
/// and every period with raw rows within the range has a rollup.
async fn assert_rollups_match(app: &TestApp, slug: &str, project: Uuid, period: RollupPeriod) {
    let want = expected(app, project, period).await;
    let got = listed(app, slug, period).await;
    let lo = ts(START).seconds;
    let hi = ts(END).seconds;
    let mut seen = 0;
    for r in &got {
        let start = r.period_start.as_ref().unwrap().seconds;
        let e = want.get(&start).cloned().unwrap_or_default();
        let have = Expected {
            sessions: [
                r.sessions_total,
                r.sessions_pending,
                r.sessions_processing,
                r.sessions_completed,
                r.sessions_failed,
                r.sessions_cancelled,
            ],
            discrepancies: [
                r.discrepancies_critical,
                r.discrepancies_high,
                r.discrepancies_medium,
                r.discrepancies_low,
                r.discrepancies_info,
            ],
            executions: r.test_executions,
            passed: 0,
            failed_or_error: 0,
            avg_fidelity: r.avg_fidelity,
            p95_fidelity: r.p95_fidelity,
        };
        let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-9,
            (a, b) => a == b,
        };
        assert_eq!(
            (have.sessions, have.discrepancies, have.executions),
            (e.sessions, e.discrepancies, e.executions),
            "{slug} {period:?} period {start}"
        );
        assert!(
            close(have.avg_fidelity, e.avg_fidelity) && close(have.p95_fidelity, e.p95_fidelity),
            "{slug} {period:?} period {start}: fidelity {:?}/{:?} vs {:?}/{:?}",
            have.avg_fidelity,
            have.p95_fidelity,
            e.avg_fidelity,
            e.p95_fidelity
        );
        let ran = e.passed + e.failed_or_error;
        let rate = (ran > 0).then(|| e.passed as f64 / ran as f64);
        assert!(
            close(r.test_pass_rate, rate),
            "{slug} {period:?} period {start}: pass rate {:?} vs {rate:?}",
            r.test_pass_rate
        );
        if want.contains_key(&start) {
            seen += 1;
        }
    }
    let in_range = want
        .keys()
        .filter(|&&s| s >= lo - 31 * 86400 && s < hi)
        .count();
    assert_eq!(
        seen, in_range,
        "{slug} {period:?}: every period with rows has a rollup"
    );
}

/// The maintained per-day discrepancy counts differ from the raw rows by
/// this many (project, day, severity) keys.
async fn day_count_drift(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one(
            "SELECT count(*) FROM (
                 SELECT project_id, day, severity, sum(n) AS n FROM discrepancy_created_days
                 GROUP BY 1, 2, 3 HAVING sum(n) <> 0) kept
             FULL JOIN (
                 SELECT project_id, (created_at AT TIME ZONE 'UTC')::date AS day, severity,
                        count(*) AS n
                 FROM discrepancies GROUP BY 1, 2, 3) raw
               USING (project_id, day, severity)
             WHERE kept.n IS DISTINCT FROM raw.n",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn rollups_from_day_counts_equal_sql_over_raw_rows_in_every_period_kind_and_project() {
    let app = spawn_app().await;
    let a = default_project(&app).await;
    let b = create_project(&app, "rollups-b").await;
    plant(&app, a, 0).await;
    plant(&app, b, 3).await;
    // Deletes, a severity change and a move to another day (and period)
    // after the rows were counted.
    app.sql()
        .await
        .batch_execute(&format!(
            "DELETE FROM discrepancies WHERE project_id = '{a}' AND fingerprint = 'f3';
             UPDATE discrepancies SET severity = 1 WHERE project_id = '{a}' AND fingerprint = 'f4';
             UPDATE discrepancies SET created_at = created_at + interval '9 days'
              WHERE project_id = '{b}' AND fingerprint = 'f5';
             UPDATE discrepancies SET resolution = 'resolved' WHERE project_id = '{b}';
             DELETE FROM sessions WHERE project_id = '{b}' AND request_id = 'rd-3-7';"
        ))
        .await
        .unwrap();
    rebuild_execution_days(&app, b).await;
    assert_eq!(day_count_drift(&app).await, 0);

    for period in [RollupPeriod::Day, RollupPeriod::Week, RollupPeriod::Month] {
        for (slug, project) in [("default", a), ("rollups-b", b)] {
            let starts = compute(&app, slug, period, true).await;
            assert!(!starts.is_empty());
            assert_rollups_match(&app, slug, project, period).await;
        }
    }
    // A second full run stores the same figures.
    let before = listed(&app, "default", RollupPeriod::Week).await;
    compute(&app, "default", RollupPeriod::Week, true).await;
    let after = listed(&app, "default", RollupPeriod::Week).await;
    let strip = |mut v: Vec<Rollup>| {
        for r in &mut v {
            r.computed_at = None;
        }
        v
    };
    assert_eq!(strip(before), strip(after));
}

#[tokio::test]
async fn rollups_stay_correct_with_concurrent_writers_and_a_computation_terminated_half_way() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    plant(&app, project, 1).await;
    compute(&app, "default", RollupPeriod::Day, true).await;
    assert_rollups_match(&app, "default", project, RollupPeriod::Day).await;

    // Four writers add and delete discrepancies on the range's days while
    // incremental computations run (bounded: 25 statements each).
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(app.sql().await);
    }
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(w, sql)| {
            tokio::spawn(async move {
                // Each statement is its own transaction, as the gateway
                // writes them (V27's per-session counts are locked statement
                // by statement: two statements in one transaction could
                // lock them in different orders).
                for i in 0..25 {
                    let (a, b) = ((w * 37 + i * 3) % 160, (w * 11 + i * 7) % 160);
                    let (c, f) = ((w * 41 + i) % 160, 1 + (w + i) % 12);
                    sql.batch_execute(&format!(
                        "INSERT INTO discrepancies (project_id, session_id, id, kind, severity,
                                                    description, confidence, fingerprint, created_at)
                         SELECT s.project_id, s.id, gen_random_uuid(), 'k', (1 + ({w} + {i}) % 5)::int2,
                                'd', 1, 'w{w}-{i}', s.created_at + interval '3 hours'
                         FROM sessions s WHERE s.project_id = '{project}'
                          AND s.request_id IN ('rd-1-{a}', 'rd-1-{b}')"
                    ))
                    .await
                    .unwrap();
                    sql.batch_execute(&format!(
                        "DELETE FROM discrepancies WHERE project_id = '{project}'
                          AND fingerprint = 'f{f}' AND session_id = (SELECT id FROM sessions
                              WHERE project_id = '{project}' AND request_id = 'rd-1-{c}')"
                    ))
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for _ in 0..5 {
        compute(&app, "default", RollupPeriod::Day, false).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(day_count_drift(&app).await, 0);
    // What committed after a computation's snapshot is picked up by the next
    // incremental run (the watermark looks back past it).
    compute(&app, "default", RollupPeriod::Day, false).await;
    assert_rollups_match(&app, "default", project, RollupPeriod::Day).await;

    // A full computation whose backend is terminated while it waits on a
    // stored rollup row: the call fails retryably, its transaction stores
    // nothing and does not move the watermark.
    let watermark = |sql: tokio_postgres::Client| async move {
        let t: chrono::DateTime<chrono::Utc> = sql
            .query_one(
                "SELECT computed_to FROM rollup_watermarks WHERE project_id = $1 AND period = 'day'",
                &[&project],
            )
            .await
            .unwrap()
            .get(0);
        t
    };
    let mark_before = watermark(app.sql().await).await;
    let mut holder = app.sql().await;
    let hold = holder.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM metric_rollups WHERE project_id = $1 AND period = 'day' FOR UPDATE",
        &[&project],
    )
    .await
    .unwrap();
    app.sql()
        .await
        .batch_execute(&format!(
            "INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description,
                                        confidence, fingerprint, created_at)
             SELECT s.project_id, s.id, gen_random_uuid(), 'k', 2::int2, 'd', 1, 'late',
                    s.created_at + interval '1 hour'
             FROM sessions s WHERE s.project_id = '{project}' AND s.request_id LIKE 'rd-1-1%';"
        ))
        .await
        .unwrap();
    let running = tokio::spawn({
        let mut metrics = app.metrics.clone();
        async move {
            metrics
                .compute_rollups(ComputeRollupsRequest {
                    period: RollupPeriod::Day as i32,
                    range: whole_range(),
                    full_recompute: true,
                })
                .await
        }
    });
    let observer = app.sql().await;
    wait_for_lock_wait(&observer, "WITH bounds AS%").await;
    terminate_lock_waiter(&observer, "WITH bounds AS%").await;
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    hold.rollback().await.unwrap();
    assert_eq!(watermark(app.sql().await).await, mark_before);

    // A re-run (incremental) brings every day back in line with the rows.
    compute(&app, "default", RollupPeriod::Day, false).await;
    assert_rollups_match(&app, "default", project, RollupPeriod::Day).await;
}

/// Every relation a JSON plan reads.
fn relations(plan: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(r) = plan
        .get("Relation Name")
        .and_then(serde_json::Value::as_str)
    {
        out.push(r.to_owned());
    }
    if let Some(children) = plan.get("Plans").and_then(serde_json::Value::as_array) {
        for c in children {
            relations(c, out);
        }
    }
}

#[tokio::test]
async fn the_rollup_statement_reads_day_counts_not_discrepancies_or_executions() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    plant(&app, project, 2).await;
    let sql = app.sql().await;
    sql.batch_execute(&format!(
        "ANALYZE; SET plan_cache_mode = force_generic_plan; PREPARE compute AS {}",
        verdict::metrics::rollups::COMPUTE.sql
    ))
    .await
    .unwrap();
    let row = sql
        .query_one(
            &format!(
                "EXPLAIN (FORMAT JSON) EXECUTE compute('day', \
                 ARRAY['2026-03-01T00:00:00Z', '2026-03-02T00:00:00Z']::timestamptz[], \
                 '1 day', '{project}')"
            ),
            &[],
        )
        .await
        .unwrap();
    let plan: serde_json::Value = row.get(0);
    let mut read = Vec::new();
    relations(&plan[0]["Plan"], &mut read);
    read.sort();
    read.dedup();
    assert_eq!(
        read,
        [
            "discrepancy_created_days",
            "metric_rollups",
            "results",
            "sessions",
            "test_execution_days"
        ],
        "{plan}"
    );
}
