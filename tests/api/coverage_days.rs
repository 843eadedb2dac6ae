//! Issue 18: GetCoverageTrend and GetAggregateCoverage without a label
//! filter read coverage_report_days (V37, kept by triggers on
//! coverage_reports) instead of every report. Their answers equal the
//! report-level statements (run here directly over the same rows) after
//! concurrent recorders, deletes and a recorder terminated half-way; their
//! generic plans never read coverage_reports or coverage_files.

use crate::growth_plans::generic_plan;
use crate::helpers::{
    TestApp, default_project, spawn_app, terminate_lock_waiter, wait_for_lock_wait,
};
use chrono::{DateTime, Duration, Utc};
use prost_types::Timestamp;
use serde_json::Value;
use tonic::Code;
use uuid::Uuid;
use verdict::coverage::sql;
use verdict::db::Stmt;
use verdict::proto::{
    CoverageCounters, GetAggregateCoverageRequest, GetCoverageTrendRequest, RecordCoverageRequest,
    TrendInterval,
};

/// 2026-02-01T00:00:00Z.
const BASE: i64 = 1_769_904_000;

fn pb(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn base() -> DateTime<Utc> {
    DateTime::from_timestamp(BASE, 0).unwrap()
}

fn recorded(
    branch: &str,
    subsystem: &str,
    key: &str,
    at: DateTime<Utc>,
    n: i64,
) -> RecordCoverageRequest {
    RecordCoverageRequest {
        commit_sha: "abcdef1234567".into(),
        branch: branch.into(),
        subsystem: subsystem.into(),
        client_key: key.into(),
        totals: Some(CoverageCounters {
            lines_covered: n % 97,
            lines_total: 100,
            branches_covered: n % 13,
            branches_total: 20,
            functions_covered: n % 5,
            functions_total: 10,
        }),
        recorded_at: Some(pb(at)),
        ..Default::default()
    }
}

/// Reports of 3 branches and 4 subsystems over 30 days by SQL (several per
/// day and key, some at the same instant so the id breaks the tie).
async fn plant(app: &TestApp, project: Uuid) {
    app.sql()
        .await
        .batch_execute(&format!(
            "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, client_key,
                 lines_covered, lines_total, branches_covered, branches_total, functions_covered,
                 functions_total, file_count, recorded_at)
             SELECT '{project}', gen_random_uuid(), md5(g::text), (ARRAY['main', 'dev', 'rel'])[1 + g % 3],
                    (ARRAY['', 'api', 'db', 'ui'])[1 + (g / 3) % 4], 'sql-' || g,
                    g % 101, 100 + g % 7, g % 11, 11, g % 3, 3, 0,
                    to_timestamp({BASE}) + make_interval(mins => (g / 2) * 53)
             FROM generate_series(0, 1599) g"
        ))
        .await
        .unwrap();
}

/// (start, count, six counters) of every bucket.
type Buckets = Vec<(i64, i64, [i64; 6])>;

fn counters(c: &CoverageCounters) -> [i64; 6] {
    [
        c.lines_covered,
        c.lines_total,
        c.branches_covered,
        c.branches_total,
        c.functions_covered,
        c.functions_total,
    ]
}

fn row_counters(r: &tokio_postgres::Row, at: usize) -> [i64; 6] {
    std::array::from_fn(|i| r.get(at + i))
}

/// The trend through the API and through the report-level statement of the
/// same filter shape, run here over the raw reports.
async fn trends(
    app: &TestApp,
    project: Uuid,
    branch: Option<&str>,
    subsystem: Option<&str>,
    weekly: bool,
) -> (Buckets, Buckets) {
    let end = base() + Duration::days(33);
    let days = 40;
    let api = app
        .coverage
        .clone()
        .get_coverage_trend(GetCoverageTrendRequest {
            branch: branch.unwrap_or_default().into(),
            subsystem: subsystem.unwrap_or_default().into(),
            interval: if weekly {
                TrendInterval::Weekly
            } else {
                TrendInterval::Daily
            } as i32,
            days,
            end_time: Some(pb(end)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets
        .iter()
        .map(|b| {
            (
                b.start_time.as_ref().unwrap().seconds,
                b.report_count,
                counters(b.counters.as_ref().unwrap()),
            )
        })
        .collect();
    let stmt = match (branch, subsystem) {
        (None, None) => &sql::TREND,
        (Some(_), None) => &sql::TREND_BRANCH,
        (None, Some(_)) => &sql::TREND_SUBSYSTEM,
        (Some(_), Some(_)) => &sql::TREND_BRANCH_SUBSYSTEM,
    };
    let (unit, step): (&str, i32) = if weekly { ("week", 7) } else { ("day", 1) };
    let start = end - Duration::days(i64::from(days) - 1);
    let no_labels: Option<Value> = None;
    let no_keys: Option<Vec<String>> = None;
    let raw = app
        .sql()
        .await
        .query(
            stmt.sql,
            &[
                &branch, &subsystem, &unit, &step, &start, &end, &project, &no_labels, &no_keys,
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let t: DateTime<Utc> = r.get(0);
            (t.timestamp(), r.get(2), row_counters(r, 3))
        })
        .collect();
    (api, raw)
}

/// (report count, counters) overall then per subsystem, through the API
/// and through the report-level statement.
type Pools = Vec<(String, i64, [i64; 6])>;

async fn aggregates(
    app: &TestApp,
    project: Uuid,
    branch: Option<&str>,
    subsystem: Option<&str>,
    latest: bool,
) -> (Pools, Pools) {
    let reply = app
        .coverage
        .clone()
        .get_aggregate_coverage(GetAggregateCoverageRequest {
            branch: branch.unwrap_or_default().into(),
            subsystem: subsystem.unwrap_or_default().into(),
            latest_per_subsystem: latest,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut api = vec![(
        "*".to_owned(),
        reply.report_count,
        counters(reply.counters.as_ref().unwrap()),
    )];
    api.extend(reply.by_subsystem.iter().map(|s| {
        (
            s.subsystem.clone(),
            s.report_count,
            counters(s.counters.as_ref().unwrap()),
        )
    }));
    let stmt = match (branch, subsystem) {
        (None, None) => &sql::AGGREGATE,
        (Some(_), None) => &sql::AGGREGATE_BRANCH,
        (None, Some(_)) => &sql::AGGREGATE_SUBSYSTEM,
        (Some(_), Some(_)) => &sql::AGGREGATE_BRANCH_SUBSYSTEM,
    };
    let none: Option<DateTime<Utc>> = None;
    let no_labels: Option<Value> = None;
    let no_keys: Option<Vec<String>> = None;
    let raw = app
        .sql()
        .await
        .query(
            stmt.sql,
            &[
                &branch, &subsystem, &none, &none, &latest, &project, &no_labels, &no_keys,
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let overall: bool = r.get(0);
            let name: Option<String> = r.get(1);
            (
                if overall {
                    "*".to_owned()
                } else {
                    name.unwrap_or_default()
                },
                r.get(2),
                row_counters(r, 3),
            )
        })
        .collect();
    (api, raw)
}

/// Every trend and aggregate shape answers as the report-level statements.
async fn assert_every_shape_matches(app: &TestApp, project: Uuid) {
    for (branch, subsystem) in [
        (None, None),
        (Some("main"), None),
        (None, Some("api")),
        (Some("dev"), None),
        (Some("rel"), Some("db")),
    ] {
        for weekly in [false, true] {
            let (api, raw) = trends(app, project, branch, subsystem, weekly).await;
            assert!(api.iter().any(|b| b.1 > 0), "{branch:?} {subsystem:?}");
            assert_eq!(api, raw, "trend {branch:?} {subsystem:?} weekly {weekly}");
        }
        for latest in [false, true] {
            let (api, raw) = aggregates(app, project, branch, subsystem, latest).await;
            assert!(api[0].1 > 0, "{branch:?} {subsystem:?}");
            assert_eq!(
                api, raw,
                "aggregate {branch:?} {subsystem:?} latest {latest}"
            );
        }
    }
}

/// Keys of coverage_report_days that differ from a recomputation over the
/// raw reports.
async fn day_rows_drift(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one(
            "WITH raw AS (
                 SELECT project_id, (recorded_at AT TIME ZONE 'UTC')::date AS day, branch, subsystem,
                        count(*) AS report_count, sum(lines_covered) AS lc, sum(lines_total) AS lt,
                        sum(branches_covered) AS bc, sum(branches_total) AS bt,
                        sum(functions_covered) AS fc, sum(functions_total) AS ft,
                        (array_agg(id ORDER BY recorded_at DESC, id DESC))[1] AS latest_id
                 FROM coverage_reports GROUP BY 1, 2, 3, 4)
             SELECT count(*) FROM coverage_report_days d
             FULL JOIN raw r USING (project_id, day, branch, subsystem)
             WHERE (d.report_count, d.lines_covered, d.lines_total, d.branches_covered,
                    d.branches_total, d.functions_covered, d.functions_total, d.latest_id)
                   IS DISTINCT FROM
                   (r.report_count, r.lc, r.lt, r.bc, r.bt, r.fc, r.ft, r.latest_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn trend_and_aggregate_from_day_rows_equal_the_report_statements_after_concurrent_writes() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    plant(&app, project).await;
    assert_eq!(day_rows_drift(&app).await, 0);
    assert_every_shape_matches(&app, project).await;

    // Eight recorders on the same keys and days (same instants across
    // recorders: the latest is decided by id), while two deleters remove
    // reports of those days: bounded, 15 calls or statements each.
    let mut tasks = Vec::new();
    for w in 0..8i64 {
        let mut coverage = app.coverage.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15i64 {
                let at = base() + Duration::hours(6 * i);
                coverage
                    .record_coverage(recorded(
                        ["main", "dev"][(i % 2) as usize],
                        "api",
                        &format!("live-{w}-{i}"),
                        at,
                        w * 31 + i,
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    for d in 0..2i64 {
        let sql = app.sql().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..15i64 {
                sql.execute(
                    "DELETE FROM coverage_reports WHERE project_id = $1 AND client_key IN \
                     (SELECT client_key FROM coverage_reports WHERE project_id = $1 \
                        AND client_key LIKE 'sql-%' AND branch = $2 \
                      ORDER BY recorded_at LIMIT 3 OFFSET $3)",
                    &[&project, &["main", "dev"][d as usize], &(i * 2)],
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(day_rows_drift(&app).await, 0);
    assert_every_shape_matches(&app, project).await;
}

#[tokio::test]
async fn a_recorder_terminated_while_waiting_on_a_day_row_stores_nothing_and_a_retry_counts() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    plant(&app, project).await;
    let at = base() + Duration::hours(30);
    let day = at.date_naive();

    // Another transaction holds the (main, api, day) row: the recorder's
    // trigger waits on it, and its backend is terminated there.
    let mut holder = app.sql().await;
    let hold = holder.transaction().await.unwrap();
    let held = hold
        .execute(
            "SELECT 1 FROM coverage_report_days WHERE project_id = $1 AND day = $2 \
               AND branch = 'main' AND subsystem = 'api' FOR UPDATE",
            &[&project, &day],
        )
        .await
        .unwrap();
    assert_eq!(held, 1);
    let running = tokio::spawn({
        let mut coverage = app.coverage.clone();
        async move {
            coverage
                .record_coverage(recorded("main", "api", "cut", at, 7))
                .await
        }
    });
    let observer = app.sql().await;
    wait_for_lock_wait(&observer, "INSERT INTO coverage_reports%").await;
    terminate_lock_waiter(&observer, "INSERT INTO coverage_reports%").await;
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    hold.rollback().await.unwrap();
    let stored: i64 = observer
        .query_one(
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1 AND client_key = 'cut'",
            &[&project],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    assert_eq!(day_rows_drift(&app).await, 0);

    // The retry is stored and counted.
    app.coverage
        .clone()
        .record_coverage(recorded("main", "api", "cut", at, 7))
        .await
        .unwrap();
    assert_eq!(day_rows_drift(&app).await, 0);
    assert_every_shape_matches(&app, project).await;
}

#[tokio::test]
async fn unfiltered_trend_and_aggregate_plans_read_day_rows_not_reports_or_files() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    let db = app.sql().await;
    db.batch_execute("SET statement_timeout = 0").await.unwrap();
    // 100k reports of 3 branches and 10 subsystems over 90 days, 3 files each.
    db.batch_execute(&format!(
        "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, client_key,
             lines_covered, lines_total, branches_covered, branches_total, functions_covered,
             functions_total, file_count, recorded_at)
         SELECT '{project}', gen_random_uuid(), md5(g::text) || 'abcdef01',
                (ARRAY['main', 'develop', 'release'])[1 + g % 3], 'sub' || (g % 10), 'k' || g,
                1, 2, 1, 2, 1, 2, 3, now() - make_interval(secs => g * 77.0)
         FROM generate_series(1, 100000) g;
         INSERT INTO coverage_files (project_id, report_id, path, lines_covered, lines_total,
             branches_covered, branches_total, functions_covered, functions_total)
         SELECT r.project_id, r.id, 'f' || i, 1, 2, 1, 2, 1, 2
         FROM coverage_reports r CROSS JOIN generate_series(1, 3) i"
    ))
    .await
    .unwrap();
    for statement in [
        "VACUUM ANALYZE coverage_reports",
        "VACUUM ANALYZE coverage_files",
        "VACUUM ANALYZE coverage_report_days",
        "SET plan_cache_mode = force_generic_plan",
    ] {
        db.batch_execute(statement).await.unwrap();
    }
    let rows: i64 = db
        .query_one("SELECT count(*) FROM coverage_report_days", &[])
        .await
        .unwrap()
        .get(0);
    // One row per branch, subsystem and day that has a report: 3 x 10 x 90.
    assert!((2700..=2760).contains(&rows), "{rows} day rows");

    let p = format!("'{project}'::uuid");
    let trend =
        |b: &str, s: &str| format!("{b}, {s}, 'day', 1, now() - interval '89 days', now(), {p}");
    let aggregate = |b: &str, s: &str| format!("{b}, {s}, false, {p}");
    let checks: Vec<(&str, &Stmt, String)> = vec![
        ("trend_days", &sql::TREND_DAYS, trend("NULL", "NULL")),
        (
            "trend_days_branch_subsystem",
            &sql::TREND_DAYS_BRANCH_SUBSYSTEM,
            trend("'main'", "'sub3'"),
        ),
        (
            "aggregate_days",
            &sql::AGGREGATE_DAYS,
            aggregate("NULL", "NULL"),
        ),
        (
            "aggregate_days_branch",
            &sql::AGGREGATE_DAYS_BRANCH,
            aggregate("'main'", "NULL"),
        ),
    ];
    for (name, stmt, args) in checks {
        let plan = generic_plan(&db, name, stmt, &args).await;
        let relations: Vec<&str> = plan
            .iter()
            .map(|(_, r, _)| r.as_str())
            .filter(|r| !r.is_empty())
            .collect();
        assert!(
            relations.iter().all(|r| *r == "coverage_report_days"),
            "{name} reads only coverage_report_days: {plan:?}"
        );
        assert!(!relations.is_empty(), "{name}: {plan:?}");
    }
    // The branch and subsystem trend finds its rows by index.
    let plan = generic_plan(
        &db,
        "trend_days_branch_subsystem_2",
        &sql::TREND_DAYS_BRANCH_SUBSYSTEM,
        &trend("'main'", "'sub3'"),
    )
    .await;
    assert!(
        plan.iter()
            .any(|(_, r, i)| r == "coverage_report_days" && !i.is_empty()),
        "{plan:?}"
    );
}
