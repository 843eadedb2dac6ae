//! GetTestStatistics scoped by test case, subsystem, test type, labels and
//! test run, backed by the per-day rollup: every figure equals the same
//! figure computed by direct SQL over the raw rows, after replays,
//! concurrent writers, deleted sessions and deleted test cases.

use crate::helpers::*;
use crate::test_cases::{at, create_test_case, new_test_case, run};
use crate::test_runs::new_run;
use tonic::Code;
use verdict::proto::test_run_service_client::TestRunServiceClient;
use verdict::proto::{
    DeleteTestCaseRequest, ExecutionInput, ExecutionStatus, GetTestStatisticsRequest,
    GetTestStatisticsResponse, RecordExecutionsRequest, TestType, TimeRange,
};

const DAY: i64 = 86_400;
/// 2026-01-01T00:00:00Z, as in test_cases.rs.
const T0: i64 = 1_767_225_600;

async fn stats(app: &TestApp, req: GetTestStatisticsRequest) -> GetTestStatisticsResponse {
    app.test_cases
        .clone()
        .get_test_statistics(req)
        .await
        .expect("statistics")
        .into_inner()
}

async fn record(app: &TestApp, batch: &str, items: Vec<ExecutionInput>) {
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: batch.into(),
            items,
        })
        .await
        .expect("record");
}

/// What GetTestStatistics should answer, computed over the raw rows
/// (`scope` a predicate on `e` and `t`; the window in seconds after T0).
#[derive(Debug, PartialEq)]
struct Expected {
    total: i64,
    by_status: Vec<i64>,
    p50: Option<f64>,
    p95: Option<f64>,
    flaky: Vec<(String, i64, i64)>,
    flaky_count: i64,
}

async fn expected(app: &TestApp, scope: &str, window: Option<(i64, i64)>, n: i64) -> Expected {
    let (from, to) = window.map_or((-1_000_000_000, 1_000_000_000), |(a, b)| (a, b));
    let filter = format!(
        "FROM test_executions e JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
         WHERE {scope} AND e.started_at >= to_timestamp({}) AND e.started_at < to_timestamp({})",
        T0 + from,
        T0 + to
    );
    let sql = app.sql().await;
    let row = sql
        .query_one(
            &format!(
                "SELECT count(*), count(*) FILTER (WHERE e.status = 'passed'), \
                        count(*) FILTER (WHERE e.status = 'failed'), \
                        count(*) FILTER (WHERE e.status = 'skipped'), \
                        count(*) FILTER (WHERE e.status = 'error'), \
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms) \
                            FILTER (WHERE e.status <> 'skipped'), \
                        percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms) \
                            FILTER (WHERE e.status <> 'skipped') {filter}"
            ),
            &[],
        )
        .await
        .unwrap();
    // The flakiness ranking as the gateway computed it before rollups.
    let flaky = sql
        .query(
            &format!(
                "WITH scoped AS (SELECT e.test_case_id, e.status, e.started_at, e.id, \
                   row_number() OVER (PARTITION BY e.test_case_id ORDER BY e.started_at DESC, e.id DESC) AS recency \
                   {filter} AND e.status IN ('passed', 'failed')), \
                 recent AS (SELECT test_case_id, status, \
                   lag(status) OVER (PARTITION BY test_case_id ORDER BY started_at, id) AS previous \
                   FROM scoped WHERE recency <= {n}), \
                 counted AS (SELECT test_case_id, \
                   count(*) FILTER (WHERE previous IS NOT NULL AND previous <> status) AS flips, \
                   count(*) AS considered FROM recent GROUP BY test_case_id) \
                 SELECT t.key, c.flips, c.considered FROM counted c JOIN test_cases t ON t.id = c.test_case_id \
                 WHERE c.flips > 0 ORDER BY c.flips DESC, t.key"
            ),
            &[],
        )
        .await
        .unwrap();
    let flaky: Vec<(String, i64, i64)> = flaky
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Expected {
        total: row.get(0),
        by_status: (1..5).map(|i| row.get(i)).collect(),
        p50: row.get(5),
        p95: row.get(6),
        flaky_count: flaky.len() as i64,
        flaky: flaky.into_iter().take(10).collect(),
    }
}

fn answered(s: &GetTestStatisticsResponse) -> Expected {
    Expected {
        total: s.total_executions,
        by_status: s.by_status.iter().map(|c| c.count).collect(),
        p50: s.duration_p50_ms,
        p95: s.duration_p95_ms,
        flaky: s
            .flaky_tests
            .iter()
            .map(|f| (f.test_case_key.clone(), f.flips, f.executions_considered))
            .collect(),
        flaky_count: s.flaky_test_count,
    }
}

fn window(from: i64, to: i64) -> Option<TimeRange> {
    Some(TimeRange {
        start_time: at(from),
        end_time: at(to),
    })
}

/// Rows of test_execution_days that differ from the same aggregate over
/// the raw executions (both directions, histograms included).
async fn rollup_drift(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one(
            "WITH raw AS ( \
               SELECT project_id, test_case_id, (started_at AT TIME ZONE 'UTC')::date AS day, \
                      count(*) AS total, count(*) FILTER (WHERE status = 'passed') AS passed, \
                      count(*) FILTER (WHERE status = 'failed') AS failed, \
                      count(*) FILTER (WHERE status = 'skipped') AS skipped, \
                      count(*) FILTER (WHERE status = 'error') AS error, \
                      coalesce(sum(duration_ms) FILTER (WHERE status <> 'skipped'), 0)::bigint AS d \
               FROM test_executions GROUP BY 1, 2, 3), \
             rolled AS (SELECT project_id, test_case_id, day, total, passed, failed, skipped, \
                               error, duration_ms FROM test_execution_days), \
             raw_h AS (SELECT project_id, test_case_id, (started_at AT TIME ZONE 'UTC')::date, \
                              verdict_duration_bucket(duration_ms), count(*) \
                       FROM test_executions WHERE status <> 'skipped' GROUP BY 1, 2, 3, 4), \
             rolled_h AS (SELECT d.project_id, d.test_case_id, d.day, h.b, h.n \
                          FROM test_execution_days d, unnest(d.hist_buckets, d.hist_counts) h(b, n)) \
             SELECT (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM rolled) a) \
                  + (SELECT count(*) FROM (SELECT * FROM rolled EXCEPT SELECT * FROM raw) b) \
                  + (SELECT count(*) FROM (SELECT * FROM raw_h EXCEPT SELECT * FROM rolled_h) c) \
                  + (SELECT count(*) FROM (SELECT * FROM rolled_h EXCEPT SELECT * FROM raw_h) d)",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        + scope_drift(app).await
        + recent_drift(app).await
}

/// Test cases whose test_case_recent_outcomes row differs from their last
/// 100 passed or failed executions over the raw rows (a test case with
/// such executions and no row counts too).
async fn recent_drift(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one(
            "WITH ranked AS ( \
               SELECT project_id, test_case_id, status, started_at, id, \
                      row_number() OVER (PARTITION BY project_id, test_case_id \
                                         ORDER BY started_at DESC, id DESC) AS nth \
               FROM test_executions WHERE status IN ('passed', 'failed')), \
             raw AS ( \
               SELECT project_id, test_case_id, \
                      string_agg(upper(left(status, 1)), '' ORDER BY started_at, id) AS outcomes, \
                      array_agg(started_at ORDER BY started_at, id) AS times \
               FROM ranked WHERE nth <= 100 GROUP BY 1, 2) \
             SELECT count(*) FROM test_cases t \
             LEFT JOIN raw r ON r.project_id = t.project_id AND r.test_case_id = t.id \
             LEFT JOIN test_case_recent_outcomes o \
               ON o.project_id = t.project_id AND o.test_case_id = t.id \
             WHERE (r.outcomes IS NOT NULL OR o.outcomes IS NOT NULL) \
               AND (coalesce(r.outcomes, ''), coalesce(r.times, '{}')) \
                   IS DISTINCT FROM (o.outcomes, o.times)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Rows of test_execution_scope_days (per project, scope and day) that
/// differ from the same aggregate over the raw executions grouped by their
/// test case's current subsystem and type (both directions, histograms
/// included); a scope left without executions has no row.
async fn scope_drift(app: &TestApp) -> i64 {
    app.sql()
        .await
        .query_one(
            "WITH k AS ( \
               SELECT e.project_id, s.kind, s.value, (e.started_at AT TIME ZONE 'UTC')::date AS day, \
                      e.status, e.duration_ms \
               FROM test_executions e \
               JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
               CROSS JOIN LATERAL (VALUES ('project', ''), ('subsystem', t.target_subsystem), \
                                          ('test_type', t.test_type)) s(kind, value)), \
             raw AS ( \
               SELECT project_id, kind, value, day, count(*) AS total, \
                      count(*) FILTER (WHERE status = 'passed') AS passed, \
                      count(*) FILTER (WHERE status = 'failed') AS failed, \
                      count(*) FILTER (WHERE status = 'skipped') AS skipped, \
                      count(*) FILTER (WHERE status = 'error') AS error, \
                      coalesce(sum(duration_ms) FILTER (WHERE status <> 'skipped'), 0)::bigint AS d \
               FROM k GROUP BY 1, 2, 3, 4), \
             rolled AS (SELECT project_id, kind, value, day, total, passed, failed, skipped, \
                               error, duration_ms FROM test_execution_scope_days), \
             raw_h AS (SELECT project_id, kind, value, day, verdict_duration_bucket(duration_ms), \
                              count(*) \
                       FROM k WHERE status <> 'skipped' GROUP BY 1, 2, 3, 4, 5), \
             rolled_h AS (SELECT d.project_id, d.kind, d.value, d.day, h.b, h.n \
                          FROM test_execution_scope_days d, \
                               unnest(d.hist_buckets, d.hist_counts) h(b, n)) \
             SELECT (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM rolled) a) \
                  + (SELECT count(*) FROM (SELECT * FROM rolled EXCEPT SELECT * FROM raw) b) \
                  + (SELECT count(*) FROM (SELECT * FROM raw_h EXCEPT SELECT * FROM rolled_h) c) \
                  + (SELECT count(*) FROM (SELECT * FROM rolled_h EXCEPT SELECT * FROM raw_h) d)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every scope shape × three windows (none, whole days, partial edges)
/// against direct SQL.
async fn assert_every_scope_matches(app: &TestApp, a1: &str) {
    let scopes: Vec<(GetTestStatisticsRequest, String)> = vec![
        (Default::default(), "e.project_id = t.project_id".into()),
        (
            GetTestStatisticsRequest {
                test_case_id: a1.into(),
                ..Default::default()
            },
            format!("e.test_case_id = '{a1}'"),
        ),
        (
            GetTestStatisticsRequest {
                test_case_key: "a-2".into(),
                ..Default::default()
            },
            "t.key = 'a-2'".into(),
        ),
        (
            GetTestStatisticsRequest {
                target_subsystem: "api".into(),
                ..Default::default()
            },
            "t.target_subsystem = 'api'".into(),
        ),
        (
            GetTestStatisticsRequest {
                test_type: TestType::E2e as i32,
                ..Default::default()
            },
            "t.test_type = 'e2e'".into(),
        ),
    ];
    let windows = [
        None,
        Some((DAY, 3 * DAY)),
        Some((3600, 4 * DAY - 60)),
        Some((2 * DAY + 10, 2 * DAY + 7200)),
    ];
    for (req, predicate) in &scopes {
        for w in windows {
            let mut req = req.clone();
            req.window = w.and_then(|(a, b)| window(a, b));
            req.flakiness_window = 4;
            let got = answered(&stats(app, req.clone()).await);
            let want = expected(app, predicate, w, 4).await;
            assert_eq!(got, want, "{req:?}");
        }
    }
}

#[tokio::test]
async fn rollup_backed_statistics_equal_raw_sql_after_replays_concurrent_writers_and_deletes() {
    use ExecutionStatus::{Error, Failed, Passed, Skipped};
    let app = spawn_app().await;
    let a1 = create_test_case(&app, new_test_case("a-1", TestType::Integration, "api")).await;
    create_test_case(&app, new_test_case("a-2", TestType::Integration, "api")).await;
    create_test_case(&app, new_test_case("u-1", TestType::E2e, "ui")).await;
    create_test_case(&app, new_test_case("u-2", TestType::Unit, "ui")).await;
    let session = crate::sessions::create(&app, "doomed").await;
    let statuses = [
        Passed, Failed, Passed, Skipped, Passed, Error, Failed, Passed,
    ];
    let keys = ["a-1", "a-2", "u-1", "u-2"];
    // Five days of history, several executions per test case and day, at
    // times that land on both edges of the partial windows.
    let mut items = Vec::new();
    for i in 0..200i64 {
        let mut e = run(
            keys[(i % 4) as usize],
            statuses[(i % 8) as usize],
            (i * 2161) % (5 * DAY),
            (i * 37) % 3000 + i % 3,
        );
        if i % 9 == 0 {
            e.session_id = session.id.clone();
        }
        items.push(e);
    }
    record(&app, "history", items.clone()).await;
    // A replay of the same batch stores (and counts) nothing more.
    record(&app, "history", items).await;

    // Four writers at once into the same test cases and days.
    let writers: Vec<_> = (0..4i64)
        .map(|w| {
            let app_channel = app.test_cases.clone();
            tokio::spawn(async move {
                let items: Vec<_> = (0..50i64)
                    .map(|i| {
                        run(
                            keys[((i + w) % 4) as usize],
                            statuses[((i * 3 + w) % 8) as usize],
                            DAY + (i * 1009 + w * 17) % (2 * DAY),
                            i * 11 + w,
                        )
                    })
                    .collect();
                app_channel
                    .clone()
                    .record_executions(RecordExecutionsRequest {
                        batch_id: format!("writer-{w}"),
                        items,
                    })
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().expect("concurrent record");
    }
    assert_eq!(rollup_drift(&app).await, 0);
    let days: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM test_execution_days", &[])
        .await
        .unwrap()
        .get(0);
    assert!(days > 0);
    assert_every_scope_matches(&app, &a1.id).await;

    // Deleting a session removes its executions: their days are recounted.
    app.sessions
        .clone()
        .delete_session(verdict::proto::DeleteSessionRequest {
            id: session.id.clone(),
            expected_version: None,
        })
        .await
        .expect("delete session");
    assert_eq!(rollup_drift(&app).await, 0);
    assert_every_scope_matches(&app, &a1.id).await;

    // A forced delete of a test case takes its day rows with it.
    let u2 = app
        .sql()
        .await
        .query_one("SELECT id::text FROM test_cases WHERE key = 'u-2'", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    app.test_cases
        .clone()
        .delete_test_case(DeleteTestCaseRequest {
            id: u2,
            force: true,
            ..Default::default()
        })
        .await
        .expect("delete test case");
    assert_eq!(rollup_drift(&app).await, 0);
    assert_every_scope_matches(&app, &a1.id).await;
}

#[tokio::test]
async fn run_statistics_count_last_attempts_and_passed_on_retry_like_direct_sql() {
    use ExecutionStatus::{Error, Failed, Passed};
    let app = spawn_app().await;
    for (key, ty) in [
        ("r-1", TestType::Unit),
        ("r-2", TestType::Unit),
        ("r-3", TestType::E2e),
        ("r-4", TestType::E2e),
    ] {
        create_test_case(&app, new_test_case(key, ty, "ci")).await;
    }
    let mut runs = TestRunServiceClient::new(app.channel.clone());
    let make = |key: &'static str| new_run(key, "main", &[]);
    let ci = runs
        .create_test_run(make("build-1"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let other = runs
        .create_test_run(make("build-2"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let attempt = |key: &str, status, attempt: i32, second: i64, run_id: &str| {
        let mut e = run(key, status, second, 100 * i64::from(attempt) + second);
        e.run_id = run_id.into();
        e.attempt = attempt;
        e
    };
    record(
        &app,
        "run-1",
        vec![
            // Failed, then passed on retry.
            attempt("r-1", Failed, 1, 10, &ci.id),
            attempt("r-1", Passed, 2, 20, &ci.id),
            attempt("r-2", Passed, 1, 11, &ci.id),
            // Failed twice: not flaky, still failing.
            attempt("r-3", Failed, 1, 12, &ci.id),
            attempt("r-3", Failed, 2, 22, &ci.id),
            // An error, then passed: passed on retry, no pass/fail flip.
            attempt("r-4", Error, 1, 13, &ci.id),
            attempt("r-4", Passed, 2, 23, &ci.id),
            // Another run's executions do not count.
            attempt("r-2", Failed, 1, 30, &other.id),
            attempt("r-3", Passed, 1, 31, &other.id),
        ],
    )
    .await;
    let s = stats(
        &app,
        GetTestStatisticsRequest {
            run_id: ci.id.clone(),
            ..Default::default()
        },
    )
    .await;
    let row = app
        .sql()
        .await
        .query_one(
            "WITH last AS (SELECT DISTINCT ON (test_case_id) status, duration_ms FROM test_executions \
               WHERE run_id = $1::text::uuid ORDER BY test_case_id, attempt DESC, started_at DESC, id DESC) \
             SELECT count(*), count(*) FILTER (WHERE status = 'passed'), \
                    count(*) FILTER (WHERE status = 'failed'), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FROM last",
            &[&ci.id],
        )
        .await
        .unwrap();
    assert_eq!(s.total_executions, row.get::<_, i64>(0));
    assert_eq!(s.total_executions, 4);
    assert_eq!(s.by_status[0].count, row.get::<_, i64>(1));
    assert_eq!(s.by_status[1].count, row.get::<_, i64>(2));
    assert_eq!(s.duration_p50_ms, row.get::<_, Option<f64>>(3));
    assert_eq!(s.pass_rate, Some(0.75));
    assert_eq!(s.passed_on_retry_count, 2);
    assert_eq!(s.flaky_test_count, 1);
    assert_eq!(s.flaky_tests[0].test_case_key, "r-1");
    assert_eq!(s.flaky_tests[0].flips, 1);
    assert!(!s.percentiles_estimated);

    // A window with a run, and several scopes at once, are refused by field.
    let err = app
        .test_cases
        .clone()
        .get_test_statistics(GetTestStatisticsRequest {
            run_id: ci.id.clone(),
            test_type: TestType::Unit as i32,
            window: window(0, DAY),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["run_id", "window"]);
    // An unknown run, or another project's, is not found.
    create_project(&app, "team-b").await;
    let err = app
        .test_cases
        .clone()
        .get_test_statistics(in_project(
            GetTestStatisticsRequest {
                run_id: ci.id.clone(),
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!err.message().contains("SELECT"), "{err:?}");
}

#[tokio::test]
async fn label_and_test_type_scopes_equal_direct_sql_and_refuse_bad_input() {
    use ExecutionStatus::{Failed, Passed, Skipped};
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("l-1", TestType::Unit, "x")).await;
    create_test_case(&app, new_test_case("l-2", TestType::Security, "x")).await;
    let items: Vec<_> = (0..60i64)
        .map(|i| {
            run(
                if i % 3 == 0 { "l-2" } else { "l-1" },
                [Passed, Failed, Passed, Skipped][(i % 4) as usize],
                i * 1800,
                i * 7 + 1,
            )
        })
        .collect();
    record(&app, "labelled", items).await;
    // Labels arrive with the labels work (V21); here they are set in SQL.
    app.sql()
        .await
        .batch_execute(
            "UPDATE test_executions SET labels = '{\"os\": \"linux\", \"ci\": \"gh\"}' \
               WHERE duration_ms % 2 = 0; \
             UPDATE test_executions SET labels = '{\"os\": \"mac\"}' WHERE duration_ms % 5 = 0",
        )
        .await
        .unwrap();
    let linux = stats(
        &app,
        GetTestStatisticsRequest {
            labels: [("os".to_string(), "linux".to_string())].into(),
            flakiness_window: 4,
            ..Default::default()
        },
    )
    .await;
    let want = expected(&app, "e.labels @> '{\"os\": \"linux\"}'", None, 4).await;
    assert_eq!(answered(&linux), want);
    assert!(want.total > 0);
    let both = stats(
        &app,
        GetTestStatisticsRequest {
            labels: [
                ("os".to_string(), "linux".to_string()),
                ("ci".to_string(), "gh".to_string()),
            ]
            .into(),
            window: window(3600, 20 * 3600),
            flakiness_window: 4,
            ..Default::default()
        },
    )
    .await;
    let want = expected(
        &app,
        "e.labels @> '{\"os\": \"linux\", \"ci\": \"gh\"}'",
        Some((3600, 20 * 3600)),
        4,
    )
    .await;
    assert_eq!(answered(&both), want);

    let security = stats(
        &app,
        GetTestStatisticsRequest {
            test_type: TestType::Security as i32,
            flakiness_window: 4,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        answered(&security),
        expected(&app, "t.test_type = 'security'", None, 4).await
    );
    assert_eq!(security.total_executions, 20);

    for (req, fields) in [
        (
            GetTestStatisticsRequest {
                target_subsystem: "x".into(),
                labels: [("os".to_string(), "linux".to_string())].into(),
                ..Default::default()
            },
            vec!["labels"],
        ),
        (
            GetTestStatisticsRequest {
                test_type: 99,
                ..Default::default()
            },
            vec!["test_type"],
        ),
        (
            GetTestStatisticsRequest {
                labels: [(String::new(), "v".to_string())].into(),
                ..Default::default()
            },
            vec!["labels[\"\"]"],
        ),
        (
            GetTestStatisticsRequest {
                run_id: "not-a-uuid".into(),
                ..Default::default()
            },
            vec!["run_id"],
        ),
    ] {
        let err = app
            .test_cases
            .clone()
            .get_test_statistics(req)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&err), fields);
    }
}

#[tokio::test]
async fn above_ten_thousand_executions_percentiles_are_estimates_within_the_documented_error() {
    use ExecutionStatus::{Failed, Passed, Skipped};
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("big-1", TestType::Performance, "perf")).await;
    create_test_case(&app, new_test_case("big-2", TestType::Performance, "perf")).await;
    for batch in 0..4i64 {
        let items: Vec<_> = (0..4000i64)
            .map(|i| {
                let n = batch * 4000 + i;
                run(
                    if n % 2 == 0 { "big-1" } else { "big-2" },
                    [Passed, Passed, Failed, Skipped][(n % 4) as usize],
                    (n * 97) % (6 * DAY),
                    (n * n) % 50_021 + n % 13,
                )
            })
            .collect();
        record(&app, &format!("big-{batch}"), items).await;
    }
    assert_eq!(rollup_drift(&app).await, 0);
    for w in [None, Some((3600, 6 * DAY - 7))] {
        let s = stats(
            &app,
            GetTestStatisticsRequest {
                target_subsystem: "perf".into(),
                window: w.and_then(|(a, b)| window(a, b)),
                ..Default::default()
            },
        )
        .await;
        let want = expected(&app, "t.target_subsystem = 'perf'", w, 20).await;
        assert!(s.percentiles_estimated, "{s:?}");
        assert_eq!(s.total_executions, want.total);
        if w.is_none() {
            assert_eq!(want.total, 16_000);
        }
        assert_eq!(
            s.by_status.iter().map(|c| c.count).collect::<Vec<_>>(),
            want.by_status
        );
        for (got, exact) in [(s.duration_p50_ms, want.p50), (s.duration_p95_ms, want.p95)] {
            let (got, exact) = (got.unwrap(), exact.unwrap());
            assert!(
                (got - exact).abs() <= 0.045 * exact,
                "estimate {got} vs exact {exact}"
            );
        }
    }
}

/// Subsystem, test type and whole-project statistics (read from the
/// second rollup level) against direct SQL over the raw rows, for every
/// window of `assert_every_scope_matches`.
async fn assert_scopes_match(app: &TestApp, subsystems: &[&str], types: &[(TestType, &str)]) {
    let mut scopes: Vec<(GetTestStatisticsRequest, String)> =
        vec![(Default::default(), "e.project_id = t.project_id".into())];
    for s in subsystems {
        scopes.push((
            GetTestStatisticsRequest {
                target_subsystem: (*s).into(),
                ..Default::default()
            },
            format!("t.target_subsystem = '{s}'"),
        ));
    }
    for (ty, name) in types {
        scopes.push((
            GetTestStatisticsRequest {
                test_type: *ty as i32,
                ..Default::default()
            },
            format!("t.test_type = '{name}'"),
        ));
    }
    for (req, predicate) in &scopes {
        for w in [None, Some((DAY, 3 * DAY)), Some((3600, 4 * DAY - 60))] {
            let mut req = req.clone();
            req.window = w.and_then(|(a, b)| window(a, b));
            req.flakiness_window = 5;
            let got = answered(&stats(app, req.clone()).await);
            let want = expected(app, predicate, w, 5).await;
            assert_eq!(got, want, "{req:?}");
        }
        // A flakiness window beyond the 100 outcomes kept per test case
        // reads the executions.
        let mut req = req.clone();
        req.flakiness_window = 150;
        let got = answered(&stats(app, req.clone()).await);
        assert_eq!(got, expected(app, predicate, None, 150).await, "{req:?}");
    }
}

#[tokio::test]
async fn scope_rollups_stay_exact_under_concurrent_writers_retyped_test_cases_a_terminated_batch_and_cleanup()
 {
    use ExecutionStatus::{Error, Failed, Passed, Skipped};
    let app = spawn_app().await;
    let keys = ["c-1", "c-2", "c-3", "c-4", "c-5", "e-1"];
    let mut ids = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let (ty, subsystem) = match i {
            0 | 1 => (TestType::Unit, "core"),
            2 | 3 => (TestType::E2e, "core"),
            4 => (TestType::Integration, "core"),
            _ => (TestType::Unit, "edge"),
        };
        ids.push(create_test_case(&app, new_test_case(key, ty, subsystem)).await);
    }
    let statuses = [
        Passed, Failed, Passed, Passed, Skipped, Failed, Error, Passed,
    ];
    // Eight writers at once, every one into every test case of "core" on
    // the same two days, half of them listing the items in reverse order:
    // they all add to the same scope rows.
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8i64 {
        let mut client = app.test_cases.clone();
        writers.spawn(async move {
            let mut items: Vec<_> = (0..30i64)
                .map(|i| {
                    run(
                        keys[((i + w) % 6) as usize],
                        statuses[((i * 5 + w) % 8) as usize],
                        DAY + (i * 3571 + w * 613) % (2 * DAY),
                        (i * 97 + w * 31) % 5000 + 1,
                    )
                })
                .collect();
            if w % 2 == 1 {
                items.reverse();
            }
            client
                .record_executions(RecordExecutionsRequest {
                    batch_id: format!("scope-writer-{w}"),
                    items,
                })
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap().expect("concurrent writer");
    }
    // One test case gets more passed or failed executions than the 100
    // kept per test case, spread over the windows' edges.
    record(
        &app,
        "long-history",
        (0..160i64)
            .map(|i| {
                let status = if i % 3 == 0 { Failed } else { Passed };
                run("c-5", status, 600 + i * 2113, i * 13 % 900 + 1)
            })
            .collect(),
    )
    .await;
    assert_eq!(rollup_drift(&app).await, 0);
    let types = [
        (TestType::Unit, "unit"),
        (TestType::E2e, "e2e"),
        (TestType::Integration, "integration"),
    ];
    assert_scopes_match(&app, &["core", "edge"], &types).await;

    // A test case moves to another subsystem and type: its history counts
    // in the new scopes, no longer in the old ones.
    let mut moved = ids[0].clone();
    moved.target_subsystem = "edge".into();
    moved.test_type = TestType::E2e as i32;
    app.test_cases
        .clone()
        .update_test_case(verdict::proto::UpdateTestCaseRequest {
            test_case: Some(moved),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["target_subsystem".into(), "test_type".into()],
            }),
            expected_version: None,
        })
        .await
        .expect("update test case");
    assert_eq!(rollup_drift(&app).await, 0);
    assert_scopes_match(&app, &["core", "edge"], &types).await;

    // A batch whose backend is terminated while it waits for a scope row
    // (another transaction holds it): nothing of it is counted anywhere.
    let sql = app.sql().await;
    let project = default_project(&app).await;
    let day = chrono::DateTime::from_timestamp(T0 + DAY, 0)
        .unwrap()
        .date_naive();
    let mut blocker = app.sql().await;
    let hold = blocker.transaction().await.unwrap();
    let held = hold
        .execute(
            "SELECT 1 FROM test_execution_scope_days \
             WHERE project_id = $1 AND kind = 'project' AND value = '' AND day = $2 FOR UPDATE",
            &[&project, &day],
        )
        .await
        .unwrap();
    assert_eq!(held, 1);
    let doomed = RecordExecutionsRequest {
        batch_id: "doomed".into(),
        items: (0..6)
            .map(|i| run(keys[i], Failed, DAY + 100 + i as i64, 4321))
            .collect(),
    };
    let first = tokio::spawn({
        let mut client = app.test_cases.clone();
        let doomed = doomed.clone();
        async move { client.record_executions(doomed).await }
    });
    wait_for_lock_wait(&sql, "UPDATE test_execution_days d%").await;
    terminate_lock_waiter(&sql, "UPDATE test_execution_days d%").await;
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    hold.rollback().await.unwrap();
    let stored: i64 = sql
        .query_one(
            "SELECT count(*) FROM test_executions WHERE batch_id = 'doomed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    assert_eq!(rollup_drift(&app).await, 0);
    // The retry is counted once.
    record(&app, "doomed", doomed.items.clone()).await;
    assert_eq!(rollup_drift(&app).await, 0);
    assert_scopes_match(&app, &["core", "edge"], &types).await;

    // Retention deletes the old detached executions in small batches; two
    // recent days stay. The scope rows of the emptied days go, the others
    // are recounted.
    let recent = chrono::Utc::now().timestamp() - T0 - 2 * DAY;
    record(
        &app,
        "recent",
        (0..12)
            .map(|i| {
                run(
                    keys[i % 6],
                    statuses[i % 8],
                    recent + i as i64 * 7200,
                    50 + i as i64,
                )
            })
            .collect(),
    )
    .await;
    verdict::proto::project_service_client::ProjectServiceClient::new(app.channel.clone())
        .update_project(verdict::proto::UpdateProjectRequest {
            slug: "default".into(),
            retention: Some(verdict::proto::Retention {
                executions_days: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("set retention");
    app.admin
        .clone()
        .cleanup(verdict::proto::CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: 1000 * DAY,
                nanos: 0,
            }),
            cutoff: None,
            dry_run: false,
            batch_size: 7,
        })
        .await
        .expect("cleanup");
    let left: Vec<(String, i64)> = sql
        .query(
            "SELECT kind || '/' || value, sum(total)::int8 FROM test_execution_scope_days \
             WHERE project_id = $1 GROUP BY 1 ORDER BY 1",
            &[&project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left.iter().find(|(k, _)| k == "project/").map(|(_, n)| *n),
        Some(12),
        "{left:?}"
    );
    assert_eq!(rollup_drift(&app).await, 0);
    assert_scopes_match(&app, &["core", "edge"], &types).await;
}
