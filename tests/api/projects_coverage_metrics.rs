//! Coverage, metric points and rollups per project: two projects with the
//! same branches, commits, client keys, batch ids and metric names never see
//! each other's rows (every figure is checked against SQL over one
//! project), another project's session is not found, and idempotency holds
//! per project.

use crate::coverage::{file, lines, report};
use crate::errors::assert_reason;
use crate::helpers::*;
use crate::metrics::plant_two_days_in;
use crate::test_cases::at;
use prost_types::Timestamp;
use tonic::Code;
use uuid::Uuid;
use verdict::proto::{
    CompareCoverageRequest, ComputeRollupsRequest, GetAggregateCoverageRequest,
    GetCoverageTrendRequest, GetTechnologyUsageRequest, ListRollupsRequest, MetricPoint,
    QueryTimeSeriesRequest, RecordCoverageRequest, RecordMetricPointsRequest, RollupPeriod,
    TimeRange, TrendInterval,
};

const DAY: i64 = 24 * 3600;

/// Two projects, `team-a` and `team-b`, and their ids.
async fn two_projects(app: &TestApp) -> (Uuid, Uuid) {
    (
        create_project(app, "team-a").await,
        create_project(app, "team-b").await,
    )
}

async fn count(app: &TestApp, sql: &str, project: Uuid) -> i64 {
    app.sql()
        .await
        .query_one(sql, &[&project])
        .await
        .unwrap()
        .get(0)
}

/// The same reports (commits, branch `main`, subsystems, client keys) in a
/// project, with counters scaled by `k` so the projects' figures differ.
fn reports_scaled(k: i64) -> Vec<RecordCoverageRequest> {
    let mut out = Vec::new();
    for (n, (commit, subsystem)) in [
        ("aaaaaaa1", "api"),
        ("aaaaaaa1", "ui"),
        ("bbbbbbb2", "api"),
        ("bbbbbbb2", ""),
    ]
    .into_iter()
    .enumerate()
    {
        let n = n as i64;
        let mut r = report(commit, "main", subsystem, "ci-1");
        r.files = vec![
            file("src/a.rs", lines(k * (n + 1), 10 * k * (n + 1))),
            file(
                &format!("src/only-{k}.rs"),
                lines(k, 4 * k + n), // a file that exists in this project only
            ),
        ];
        r.recorded_at = at(n * DAY + 3600);
        out.push(r);
    }
    out
}

async fn record_all(app: &TestApp, slug: &str, reports: Vec<RecordCoverageRequest>) {
    for r in reports {
        let reply = app
            .coverage
            .clone()
            .record_coverage(in_project(r, slug))
            .await
            .expect("record coverage")
            .into_inner();
        assert!(reply.created);
    }
}

#[tokio::test]
async fn coverage_of_branch_main_in_two_projects_is_never_pooled() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    record_all(&app, "team-a", reports_scaled(1)).await;
    record_all(&app, "team-b", reports_scaled(7)).await;
    let mut c = app.coverage.clone();

    for (slug, project) in [("team-a", a), ("team-b", b)] {
        // Aggregate of branch main: the project's reports only.
        let agg = c
            .get_aggregate_coverage(in_project(
                GetAggregateCoverageRequest {
                    branch: "main".into(),
                    ..Default::default()
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        let sql = app.sql().await;
        let row = sql
            .query_one(
                "SELECT count(*), sum(lines_covered)::int8, sum(lines_total)::int8
                 FROM coverage_reports WHERE project_id = $1 AND branch = 'main'",
                &[&project],
            )
            .await
            .unwrap();
        let (n, covered, total): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(n, 4);
        assert_eq!(agg.report_count, n, "{slug}");
        let counters = agg.counters.unwrap();
        assert_eq!(
            (counters.lines_covered, counters.lines_total),
            (covered, total),
            "{slug}"
        );
        // Per subsystem, too.
        let api: i64 = sql
            .query_one(
                "SELECT sum(lines_total)::int8 FROM coverage_reports
                 WHERE project_id = $1 AND subsystem = 'api'",
                &[&project],
            )
            .await
            .unwrap()
            .get(0);
        let by_api = agg
            .by_subsystem
            .iter()
            .find(|s| s.subsystem == "api")
            .unwrap();
        assert_eq!(by_api.report_count, 2);
        assert_eq!(by_api.counters.as_ref().unwrap().lines_total, api);

        // Trend of branch main over the four days: the project's latest
        // report per subsystem and day.
        let trend = c
            .get_coverage_trend(in_project(
                GetCoverageTrendRequest {
                    branch: "main".into(),
                    subsystem: String::new(),
                    interval: TrendInterval::Daily as i32,
                    days: 4,
                    end_time: at(3 * DAY + 7200),
                    ..Default::default()
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(trend.buckets.len(), 4);
        for bucket in &trend.buckets {
            let start = bucket.start_time.as_ref().unwrap().seconds;
            let row = sql
                .query_one(
                    "SELECT count(*), COALESCE(sum(lines_total), 0)::int8 FROM coverage_reports
                     WHERE project_id = $1 AND branch = 'main'
                       AND recorded_at >= to_timestamp($2) AND recorded_at < to_timestamp($2 + 86400)",
                    &[&project, &(start as f64)],
                )
                .await
                .unwrap();
            let (n, total): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(bucket.report_count, n, "{slug} {start}");
            assert_eq!(
                bucket.counters.as_ref().unwrap().lines_total,
                total,
                "{slug} {start}"
            );
        }

        // Compare the two commits: the project's own reports and files.
        let cmp = c
            .compare_coverage(in_project(
                CompareCoverageRequest {
                    base_commit_sha: "aaaaaaa1".into(),
                    head_commit_sha: "bbbbbbb2".into(),
                    subsystem: "api".into(),
                    max_files: 0,
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        for side in [cmp.base.as_ref().unwrap(), cmp.head.as_ref().unwrap()] {
            let id: Uuid = side.id.parse().unwrap();
            let owner: Uuid = sql
                .query_one(
                    "SELECT project_id FROM coverage_reports WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(owner, project, "{slug}");
        }
        // Both reports hold src/a.rs and this project's own file only: the
        // other project's file is neither added nor removed.
        assert_eq!(
            (cmp.files_added, cmp.files_removed, cmp.files_changed),
            (0, 0, 2),
            "{slug}"
        );
        assert!(
            cmp.files
                .iter()
                .all(|f| f.path == "src/a.rs" || f.path.starts_with("src/only-")),
            "{slug}"
        );
    }

    // The default project holds none of it.
    let agg = c
        .get_aggregate_coverage(GetAggregateCoverageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agg.report_count, 0);
    let err = c
        .compare_coverage(CompareCoverageRequest {
            base_commit_sha: "aaaaaaa1".into(),
            head_commit_sha: "bbbbbbb2".into(),
            subsystem: "api".into(),
            max_files: 0,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "COVERAGE_COMMIT_MISSING");

    // Every file row sits in its report's project.
    let strays: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM coverage_files f JOIN coverage_reports r ON r.id = f.report_id
             WHERE f.project_id <> r.project_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(strays, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_key_replays_only_within_its_project_even_under_concurrent_retries() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    let mut req = report("ccccccc3", "main", "", "ci-same");
    req.files = vec![file("x.rs", lines(1, 2)), file("y.rs", lines(2, 2))];

    // Eight concurrent first calls with the same key, four per project:
    // exactly one report per project, the others replay it.
    let calls: Vec<_> = (0..8)
        .map(|n| {
            let mut c = app.coverage.clone();
            let slug = if n % 2 == 0 { "team-a" } else { "team-b" };
            let req = req.clone();
            tokio::spawn(async move {
                let reply = c
                    .record_coverage(in_project(req, slug))
                    .await
                    .unwrap()
                    .into_inner();
                (slug, reply.created, reply.report.unwrap().id)
            })
        })
        .collect();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    for slug in ["team-a", "team-b"] {
        let mine: Vec<_> = results.iter().filter(|r| r.0 == slug).collect();
        assert_eq!(mine.iter().filter(|r| r.1).count(), 1, "{slug}");
        assert!(mine.iter().all(|r| r.2 == mine[0].2), "{slug}");
    }
    let id_a = results.iter().find(|r| r.0 == "team-a").unwrap().2.clone();
    let id_b = results.iter().find(|r| r.0 == "team-b").unwrap().2.clone();
    assert_ne!(id_a, id_b);
    for project in [a, b] {
        let reports = count(
            &app,
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
            project,
        )
        .await;
        let files = count(
            &app,
            "SELECT count(*) FROM coverage_files WHERE project_id = $1",
            project,
        )
        .await;
        assert_eq!((reports, files), (1, 2));
    }

    // Other content under the key: refused in the project that holds it…
    let mut other = req.clone();
    other.files.pop();
    let err = app
        .coverage
        .clone()
        .record_coverage(in_project(other.clone(), "team-a"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    // …and a first call in the default project, which has no such key.
    let reply = app
        .coverage
        .clone()
        .record_coverage(other)
        .await
        .unwrap()
        .into_inner();
    assert!(reply.created);
    assert_eq!(reply.report.unwrap().file_count, 1);
    app.stop().await.unwrap();
}

/// A session of `project` straight in the database (same request id in
/// every project), with `status`.
async fn plant_session(app: &TestApp, project: Uuid, status: &str) -> Uuid {
    app.sql()
        .await
        .query_one(
            "INSERT INTO sessions (project_id, id, request_id, source_technology,
                                   target_technology, validation_scope, status)
             VALUES ($1, gen_random_uuid(), 'run-' || $2::text, 'cobol', 'java', 'full', $2)
             RETURNING id",
            &[&project, &status],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_report_naming_another_projects_session_is_not_found_and_writes_nothing() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    let open_b = plant_session(&app, b, "processing").await;
    let cancelled_b = plant_session(&app, b, "cancelled").await;
    let mut c = app.coverage.clone();

    // From A, B's sessions do not exist, whatever their status: NOT_FOUND,
    // never the FAILED_PRECONDITION that B's cancelled session gets in B.
    for session in [open_b, cancelled_b] {
        let mut req = report("ddddddd4", "main", "", &format!("k-{session}"));
        req.session_id = session.to_string();
        req.files = vec![file("z.rs", lines(1, 1))];
        let err = c
            .record_coverage(in_project(req.clone(), "team-a"))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
        let in_b = c.record_coverage(in_project(req, "team-b")).await;
        if session == open_b {
            let stored = in_b.unwrap().into_inner().report.unwrap();
            assert_eq!(stored.session_id, open_b.to_string());
        } else {
            assert_reason(
                &in_b.unwrap_err(),
                Code::FailedPrecondition,
                "SESSION_NOT_ACCEPTING_WRITES",
            );
        }
    }
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
            a
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coverage_files WHERE project_id = $1",
            a
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
            b
        )
        .await,
        1
    );
    app.stop().await.unwrap();
}

fn ts(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

const JAN_1: i64 = 1_767_225_600;

fn points(values: &[f64]) -> Vec<MetricPoint> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| MetricPoint {
            name: "latency".into(),
            value: *v,
            unit: "ms".into(),
            labels: [("host".to_string(), "h1".to_string())].into(),
            recorded_at: Some(ts(JAN_1 + i as i64 * 600)),
        })
        .collect()
}

#[tokio::test]
async fn time_series_of_the_same_metric_name_read_only_the_projects_points() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    let mut m = app.metrics.clone();
    for (slug, values) in [
        ("team-a", vec![1.0, 2.0, 3.0]),
        (
            "team-b",
            vec![100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0],
        ),
    ] {
        m.record_metric_points(in_project(
            RecordMetricPointsRequest {
                batch_id: format!("series-{slug}"),
                points: points(&values),
            },
            slug,
        ))
        .await
        .unwrap();
    }
    let query = QueryTimeSeriesRequest {
        name: "latency".into(),
        label_filter: [("host".to_string(), "h1".to_string())].into(),
        range: Some(TimeRange {
            start_time: Some(ts(JAN_1)),
            end_time: Some(ts(JAN_1 + 2 * 3600)),
        }),
        bucket_width: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        calendar_bucket: 0,
    };
    for (slug, project) in [("team-a", a), ("team-b", b)] {
        let buckets = m
            .query_time_series(in_project(query.clone(), slug))
            .await
            .unwrap()
            .into_inner()
            .buckets;
        assert_eq!(buckets.len(), 2);
        let sql = app.sql().await;
        for bucket in &buckets {
            let start = bucket.start_time.as_ref().unwrap().seconds as f64;
            let row = sql
                .query_one(
                    "SELECT count(*), sum(value), max(value) FROM metric_points
                     WHERE project_id = $1 AND name = 'latency'
                       AND recorded_at >= to_timestamp($2) AND recorded_at < to_timestamp($2 + 3600)",
                    &[&project, &start],
                )
                .await
                .unwrap();
            let (n, sum, max): (i64, Option<f64>, Option<f64>) =
                (row.get(0), row.get(1), row.get(2));
            assert_eq!(
                (bucket.count, bucket.sum, bucket.max),
                (n, sum, max),
                "{slug}"
            );
        }
        let total: i64 = buckets.iter().map(|b| b.count).sum();
        assert_eq!(total, if project == a { 3 } else { 7 });
    }
    // The default project has no such metric.
    let buckets = m
        .query_time_series(query)
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert!(buckets.iter().all(|b| b.count == 0));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_metric_batch_id_is_idempotent_per_project() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    let mut m = app.metrics.clone();
    let batch = |values: &[f64]| RecordMetricPointsRequest {
        batch_id: "nightly-1".into(),
        points: points(values),
    };
    // The same batch id in two projects: two batches, each recorded.
    let first_a = m
        .record_metric_points(in_project(batch(&[1.0, 2.0]), "team-a"))
        .await
        .unwrap()
        .into_inner();
    let first_b = m
        .record_metric_points(in_project(batch(&[5.0, 6.0, 7.0]), "team-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first_a.recorded, first_a.replayed), (2, false));
    assert_eq!((first_b.recorded, first_b.replayed), (3, false));
    // A retry replays within its own project.
    let again_a = m
        .record_metric_points(in_project(batch(&[1.0, 2.0]), "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again_a.recorded, again_a.replayed), (2, true));
    // B's content under the key in A is another batch's content there.
    let err = m
        .record_metric_points(in_project(batch(&[5.0, 6.0, 7.0]), "team-a"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    for (project, n) in [(a, 2), (b, 3)] {
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM metric_points WHERE project_id = $1",
                project
            )
            .await,
            n
        );
    }
    app.stop().await.unwrap();
}

/// The two planted days in A (tag 1) and B (tag 2), and in B one more
/// session on the first day, so the projects' figures differ.
async fn plant_both(app: &TestApp, a: Uuid, b: Uuid) {
    plant_two_days_in(app, a, 1).await;
    plant_two_days_in(app, b, 2).await;
    app.sql()
        .await
        .execute(
            "INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                                   validation_scope, status, created_at, updated_at)
             VALUES ($1, gen_random_uuid(), 'extra', 'rust', 'go', 'full', 'completed',
                     '2026-01-10 15:00Z', '2026-01-10 15:00Z')",
            &[&b],
        )
        .await
        .unwrap();
}

fn jan(day: u32) -> Timestamp {
    ts(JAN_1 + i64::from(day - 1) * DAY)
}

async fn compute_in(app: &TestApp, slug: &str, full: bool) -> Vec<i64> {
    app.metrics
        .clone()
        .compute_rollups(in_project(
            ComputeRollupsRequest {
                period: RollupPeriod::Day as i32,
                range: Some(TimeRange {
                    start_time: Some(jan(10)),
                    end_time: Some(jan(13)),
                }),
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

async fn rollups_in(app: &TestApp, slug: &str) -> Vec<verdict::proto::Rollup> {
    app.metrics
        .clone()
        .list_rollups(in_project(
            ListRollupsRequest {
                period: RollupPeriod::Day as i32,
                range: None,
                page_size: 100,
                page_token: String::new(),
                ..Default::default()
            },
            slug,
        ))
        .await
        .unwrap()
        .into_inner()
        .rollups
}

/// Sessions of `project` created on 2026-01-10 (the first planted day).
async fn first_day_sessions(app: &TestApp, project: Uuid) -> i64 {
    count(
        app,
        "SELECT count(*) FROM sessions WHERE project_id = $1
         AND created_at >= '2026-01-10Z' AND created_at < '2026-01-11Z'",
        project,
    )
    .await
}

#[tokio::test]
async fn rollups_and_technology_usage_are_computed_and_listed_per_project() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    plant_both(&app, a, b).await;
    let (day1, day2) = (jan(10).seconds, jan(11).seconds);

    // Computing A touches A's days, writes A's rows and moves A's
    // watermark only.
    assert_eq!(compute_in(&app, "team-a", false).await, [day1, day2]);
    let in_a = rollups_in(&app, "team-a").await;
    assert_eq!(in_a.len(), 2);
    assert_eq!(in_a[0].sessions_total, first_day_sessions(&app, a).await);
    assert_eq!(in_a[0].sessions_total, 3);
    assert_eq!(in_a[0].technology_pairs.len(), 2);
    assert!(rollups_in(&app, "team-b").await.is_empty());
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM metric_rollups WHERE project_id <> $1",
            a
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM rollup_watermarks WHERE project_id <> $1",
            a
        )
        .await,
        0
    );

    // B's first incremental run still finds every one of B's days.
    assert_eq!(compute_in(&app, "team-b", false).await, [day1, day2]);
    let in_b = rollups_in(&app, "team-b").await;
    assert_eq!(in_b[0].sessions_total, first_day_sessions(&app, b).await);
    assert_eq!(in_b[0].sessions_total, 4);
    assert_eq!(in_b[0].technology_pairs.get("rust->go"), Some(&1));
    // The figures from the other tables are the project's own, the same
    // as A's: pooling would have doubled them.
    assert_eq!(
        (in_b[0].discrepancies_critical, in_b[0].test_executions),
        (2, 4)
    );
    assert_eq!(
        (in_a[0].discrepancies_critical, in_a[0].test_executions),
        (2, 4)
    );
    // A's rows are as they were.
    let again_a = rollups_in(&app, "team-a").await;
    assert_eq!(
        again_a
            .iter()
            .map(|r| (r.sessions_total, r.sessions_completed))
            .collect::<Vec<_>>(),
        in_a.iter()
            .map(|r| (r.sessions_total, r.sessions_completed))
            .collect::<Vec<_>>()
    );
    // Nothing new in A since: its next incremental run computes nothing.
    assert!(compute_in(&app, "team-a", false).await.is_empty());

    // Technology usage per project, against SQL.
    for (slug, project) in [("team-a", a), ("team-b", b)] {
        let pairs = app
            .metrics
            .clone()
            .get_technology_usage(in_project(GetTechnologyUsageRequest { range: None }, slug))
            .await
            .unwrap()
            .into_inner()
            .pairs;
        let total: i64 = pairs.iter().map(|p| p.sessions).sum();
        assert_eq!(
            total,
            count(
                &app,
                "SELECT count(*) FROM sessions WHERE project_id = $1",
                project
            )
            .await,
            "{slug}"
        );
        assert_eq!(
            pairs.iter().any(|p| p.source_technology == "rust"),
            project == b
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_background_rollup_job_computes_every_project() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.rollup_interval_secs = 1;
    let app = spawn_app_with(config).await;
    let (a, b) = two_projects(&app).await;
    plant_both(&app, a, b).await;
    // Rows changed after the job's last run are what it looks for.
    app.sql()
        .await
        .execute(
            "UPDATE sessions SET updated_at = now() WHERE project_id IN ($1, $2)",
            &[&a, &b],
        )
        .await
        .unwrap();
    let (want_a, want_b) = (
        first_day_sessions(&app, a).await,
        first_day_sessions(&app, b).await,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let row = app
            .sql()
            .await
            .query_one(
                "SELECT
                   (SELECT sessions_total FROM metric_rollups WHERE project_id = $1
                      AND period = 'day' AND period_start = '2026-01-10Z'),
                   (SELECT sessions_total FROM metric_rollups WHERE project_id = $2
                      AND period = 'day' AND period_start = '2026-01-10Z'),
                   (SELECT count(DISTINCT (project_id, period)) FROM metric_rollups
                     WHERE project_id IN ($1, $2))",
                &[&a, &b],
            )
            .await
            .unwrap();
        let (got_a, got_b, kinds): (Option<i64>, Option<i64>, i64) =
            (row.get(0), row.get(1), row.get(2));
        // Days, weeks and months of both projects.
        if got_a == Some(want_a) && got_b == Some(want_b) && kinds == 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not compute both projects: {got_a:?} {got_b:?} {kinds}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The lists agree.
    assert_eq!(rollups_in(&app, "team-b").await[0].sessions_total, want_b);
    assert_eq!(rollups_in(&app, "team-a").await[0].sessions_total, want_a);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_rollup_computations_of_two_projects_each_write_their_own_figures() {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    plant_both(&app, a, b).await;
    // Six calls at once, three per project, incremental and full mixed:
    // the one advisory lock serialises them, and each writes its project.
    let calls: Vec<_> = (0..6)
        .map(|n| {
            let app_slug = if n % 2 == 0 { "team-a" } else { "team-b" };
            let mut m = app.metrics.clone();
            tokio::spawn(async move {
                m.compute_rollups(in_project(
                    ComputeRollupsRequest {
                        period: RollupPeriod::Day as i32,
                        range: Some(TimeRange {
                            start_time: Some(jan(10)),
                            end_time: Some(jan(13)),
                        }),
                        full_recompute: n >= 4,
                    },
                    app_slug,
                ))
                .await
                .map(|r| r.into_inner().period_starts.len())
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("compute rollups");
    }
    for (slug, project) in [("team-a", a), ("team-b", b)] {
        let listed = rollups_in(&app, slug).await;
        let stored = count(
            &app,
            "SELECT count(*) FROM metric_rollups WHERE project_id = $1 AND period = 'day'",
            project,
        )
        .await;
        assert_eq!(listed.len() as i64, stored, "{slug}");
        assert_eq!(
            listed[0].sessions_total,
            first_day_sessions(&app, project).await,
            "{slug}"
        );
    }
    let elsewhere: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM metric_rollups WHERE project_id <> $1 AND project_id <> $2",
            &[&a, &b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(elsewhere, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_bound_to_one_project_reads_and_writes_coverage_there_only() {
    let (app, _keys) = spawn_auth_app().await;
    let (a, b) = two_projects(&app).await;
    let config = auth_config(&app.database_url);
    let (_, a_key) = create_project_key(&config, "team a ci", "read,write", Some("team-a")).await;
    let mut c = app.coverage.clone();
    let mut req = report("eeeeeee5", "main", "", "ci-1");
    req.totals = Some(lines(3, 4));

    // Without the header the bound key records in its own project.
    c.record_coverage(authed(req.clone(), &a_key))
        .await
        .unwrap();
    // Naming another project, to record or to read: PROJECT_NOT_ALLOWED,
    // and nothing is written there.
    let err = c
        .record_coverage(project(authed(req.clone(), &a_key), "team-b"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    let err = c
        .get_aggregate_coverage(project(
            authed(GetAggregateCoverageRequest::default(), &a_key),
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    let agg = c
        .get_aggregate_coverage(authed(GetAggregateCoverageRequest::default(), &a_key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agg.report_count, 1);
    for (project, n) in [(a, 1), (b, 0)] {
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
                project
            )
            .await,
            n
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_held_in_one_project_never_holds_back_the_other_and_a_terminated_first_call_writes_nothing()
 {
    let app = spawn_app().await;
    let (a, b) = two_projects(&app).await;
    let mut req = report("fffffff6", "main", "", "ci-held");
    req.files = vec![file("p.rs", lines(1, 2)), file("q.rs", lines(2, 2))];

    // Another writer holds the key in A, uncommitted: A's call waits on it.
    let mut blocker = app.sql().await;
    let hold = blocker.transaction().await.unwrap();
    hold.execute(
        "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, client_key,
             lines_covered, lines_total, branches_covered, branches_total, functions_covered,
             functions_total)
         VALUES ($1, gen_random_uuid(), 'fffffff6', 'main', '', 'ci-held', 0, 0, 0, 0, 0, 0)",
        &[&a],
    )
    .await
    .unwrap();
    let first = tokio::spawn({
        let mut c = app.coverage.clone();
        let req = req.clone();
        async move { c.record_coverage(in_project(req, "team-a")).await }
    });
    let observer = app.sql().await;
    let waiting = async {
        loop {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'
                       AND query LIKE 'INSERT INTO coverage_reports%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n >= 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("A's call waits on the held key within 30 s");

    // The same key in B is another report: recorded at once.
    let in_b = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.coverage
            .clone()
            .record_coverage(in_project(req.clone(), "team-b")),
    )
    .await
    .expect("B's call does not wait on A's key")
    .unwrap()
    .into_inner();
    assert!(in_b.created);

    // A's call loses its backend while waiting: it fails, writes nothing.
    let killed: bool = observer
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'INSERT INTO coverage_reports%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let first = first.await.unwrap();
    assert_eq!(first.unwrap_err().code(), Code::Unavailable);
    hold.rollback().await.unwrap();
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
            a
        )
        .await,
        0
    );

    // The client's retry records A's report whole.
    let retry = app
        .coverage
        .clone()
        .record_coverage(in_project(req, "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.created);
    assert_ne!(retry.report.as_ref().unwrap().id, in_b.report.unwrap().id);
    for project in [a, b] {
        let files = count(
            &app,
            "SELECT count(*) FROM coverage_files WHERE project_id = $1",
            project,
        )
        .await;
        assert_eq!(files, 2);
    }
    app.stop().await.unwrap();
}
