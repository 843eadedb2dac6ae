//! CoverageService through a real client: idempotent reports, a 10,000-file
//! report, aggregates, trends with empty buckets and commit comparisons.

use crate::helpers::{TestApp, spawn_app, violated_fields};
use crate::sessions::create;
use crate::test_cases::at;
use prost::Message;
use tonic::Code;
use verdict::proto::{
    CompareCoverageRequest, CompareCoverageResponse, CoverageCounters, CoverageReport, FileChange,
    FileCoverage, GetAggregateCoverageRequest, GetAggregateCoverageResponse,
    GetCoverageTrendRequest, RecordCoverageRequest, TimeRange, TrendInterval,
};

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

pub(crate) fn counters(l: (i64, i64), b: (i64, i64), f: (i64, i64)) -> CoverageCounters {
    CoverageCounters {
        lines_covered: l.0,
        lines_total: l.1,
        branches_covered: b.0,
        branches_total: b.1,
        functions_covered: f.0,
        functions_total: f.1,
    }
}

pub(crate) fn lines(covered: i64, total: i64) -> CoverageCounters {
    counters((covered, total), (0, 0), (0, 0))
}

pub(crate) fn file(path: &str, c: CoverageCounters) -> FileCoverage {
    FileCoverage {
        path: path.into(),
        counters: Some(c),
    }
}

pub(crate) fn report(
    commit: &str,
    branch: &str,
    subsystem: &str,
    key: &str,
) -> RecordCoverageRequest {
    RecordCoverageRequest {
        commit_sha: commit.into(),
        branch: branch.into(),
        subsystem: subsystem.into(),
        session_id: String::new(),
        client_key: key.into(),
        totals: None,
        files: vec![],
        recorded_at: None,
        ..Default::default()
    }
}

/// A report of `totals` recorded `second` seconds after T0.
fn totals_at(
    commit: &str,
    branch: &str,
    subsystem: &str,
    totals: CoverageCounters,
    second: i64,
) -> RecordCoverageRequest {
    RecordCoverageRequest {
        totals: Some(totals),
        recorded_at: at(second),
        ..report(commit, branch, subsystem, &format!("k-{second}"))
    }
}

async fn record(app: &TestApp, req: RecordCoverageRequest) -> CoverageReport {
    app.coverage
        .clone()
        .record_coverage(req)
        .await
        .expect("record coverage")
        .into_inner()
        .report
        .expect("report")
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[tokio::test]
async fn recording_a_report_twice_replays_the_stored_one_and_files_sum_into_totals() {
    let app = spawn_app().await;
    let mut req = report("ABCDEF0123", "main", "api", "ci-1");
    req.files = vec![
        file("src/a.rs", counters((3, 4), (1, 2), (1, 1))),
        file("src/b.rs", counters((5, 6), (0, 0), (2, 3))),
    ];
    let mut client = app.coverage.clone();
    let first = client
        .record_coverage(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let stored = first.report.unwrap();
    assert_eq!(stored.commit_sha, "abcdef0123");
    assert_eq!(stored.totals, Some(counters((8, 10), (1, 2), (3, 4))));
    assert_eq!(stored.file_count, 2);
    let p = stored.percentages.unwrap();
    assert!(close(p.lines, 80.0) && close(p.branches, 50.0) && close(p.functions, 75.0));

    // A retry with the same content (files in any order) answers with what
    // is stored; other content under the key is refused.
    req.files.reverse();
    let again = client
        .record_coverage(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.report.unwrap(), stored);
    req.files.pop();
    let refused = client.record_coverage(req).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        count(&app, "SELECT count(*) FROM coverage_reports").await,
        1
    );
    assert_eq!(count(&app, "SELECT count(*) FROM coverage_files").await, 2);

    let bad = client
        .record_coverage(RecordCoverageRequest {
            commit_sha: "xyz".into(),
            branch: String::new(),
            subsystem: String::new(),
            session_id: String::new(),
            client_key: String::new(),
            totals: Some(lines(5, 4)),
            files: vec![
                file("a.rs", lines(1, 1)),
                file("a.rs", lines(1, 1)),
                file("b.rs", counters((0, 0), (0, 0), (0, -1))),
            ],
            recorded_at: at(100 * 365 * DAY),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        [
            "recorded_at",
            "commit_sha",
            "branch",
            "client_key",
            "totals.lines_covered",
            "files[1].path",
            "files[2].counters.functions_total"
        ]
    );
}

#[tokio::test]
async fn a_report_of_ten_thousand_files_is_accepted_in_one_call() {
    let app = spawn_app().await;
    let mut req = report("0123456789abcdef", "main", "", "big");
    req.files = (0..10_000)
        .map(|i| {
            file(
                &format!(
                    "src/module_{:03}/component_{:02}/source_file_{i:05}.rs",
                    i / 100,
                    i % 100
                ),
                counters((i % 50, 50), (i % 7, 10), (1, 2)),
            )
        })
        .collect();
    assert!(req.encoded_len() < 4 * 1024 * 1024, "{}", req.encoded_len());
    let stored = record(&app, req).await;
    assert_eq!(stored.file_count, 10_000);
    let expected_lines: i64 = (0..10_000).map(|i| i % 50).sum();
    assert_eq!(stored.totals.unwrap().lines_covered, expected_lines);
    assert_eq!(
        count(&app, "SELECT count(*) FROM coverage_files").await,
        10_000
    );
    assert_eq!(
        count(&app, "SELECT sum(lines_covered)::int8 FROM coverage_files").await,
        expected_lines
    );
}

async fn aggregate(
    app: &TestApp,
    req: GetAggregateCoverageRequest,
) -> GetAggregateCoverageResponse {
    app.coverage
        .clone()
        .get_aggregate_coverage(req)
        .await
        .expect("aggregate")
        .into_inner()
}

#[tokio::test]
async fn aggregates_pool_matching_reports_or_take_the_latest_per_subsystem() {
    let app = spawn_app().await;
    let c = |l, b, f| counters(l, b, f);
    record(
        &app,
        totals_at("aaaaaaa1", "main", "", c((50, 100), (10, 20), (5, 10)), 0),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa2", "main", "", c((60, 100), (12, 20), (6, 10)), DAY),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa1", "main", "api", c((30, 40), (0, 0), (3, 4)), 0),
    )
    .await;
    record(
        &app,
        totals_at(
            "bbbbbbb1",
            "dev",
            "api",
            c((20, 40), (0, 0), (1, 4)),
            2 * DAY,
        ),
    )
    .await;

    let main = aggregate(
        &app,
        GetAggregateCoverageRequest {
            branch: "main".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(main.report_count, 3);
    assert_eq!(main.counters, Some(c((140, 240), (22, 40), (14, 24))));
    let p = main.percentages.unwrap();
    assert!(close(p.lines, 140.0 * 100.0 / 240.0));
    assert!(close(p.branches, 55.0));
    let per: Vec<_> = main
        .by_subsystem
        .iter()
        .map(|s| {
            (
                s.subsystem.as_str(),
                s.report_count,
                s.counters.unwrap().lines_covered,
            )
        })
        .collect();
    assert_eq!(per, [("", 2, 110), ("api", 1, 30)]);
    assert!(main.by_subsystem[1].percentages.unwrap().branches.is_none());

    let latest_main = aggregate(
        &app,
        GetAggregateCoverageRequest {
            branch: "main".into(),
            latest_per_subsystem: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(latest_main.report_count, 2);
    assert_eq!(latest_main.counters.unwrap().lines_covered, 90);

    let latest_any = aggregate(
        &app,
        GetAggregateCoverageRequest {
            latest_per_subsystem: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(latest_any.counters, Some(c((80, 140), (12, 20), (7, 14))));

    let window = aggregate(
        &app,
        GetAggregateCoverageRequest {
            subsystem: "api".into(),
            recorded: Some(TimeRange {
                start_time: at(HOUR),
                end_time: None,
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(window.report_count, 1);
    assert_eq!(window.counters.unwrap().lines_covered, 20);

    let none = aggregate(
        &app,
        GetAggregateCoverageRequest {
            branch: "nowhere".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(none.report_count, 0);
    assert_eq!(none.percentages.unwrap().lines, None);
    assert!(none.by_subsystem.is_empty());
}

#[tokio::test]
async fn the_trend_has_a_bucket_for_every_day_and_week_including_empty_ones() {
    let app = spawn_app().await;
    // T0 is Thursday 2026-01-01 00:00 UTC.
    record(
        &app,
        totals_at("aaaaaaa1", "main", "", lines(50, 100), 10 * HOUR),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa2", "main", "", lines(60, 100), 15 * HOUR),
    )
    .await;
    record(
        &app,
        totals_at("ddddddd1", "dev", "", lines(1, 100), DAY + HOUR),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa3", "main", "api", lines(30, 40), 2 * DAY + HOUR),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa3", "main", "ui", lines(10, 20), 2 * DAY + 2 * HOUR),
    )
    .await;
    record(
        &app,
        totals_at("aaaaaaa4", "main", "", lines(70, 100), 6 * DAY + HOUR),
    )
    .await;
    let mut client = app.coverage.clone();

    let daily = client
        .get_coverage_trend(GetCoverageTrendRequest {
            branch: "main".into(),
            subsystem: String::new(),
            interval: TrendInterval::Daily as i32,
            days: 10,
            end_time: at(9 * DAY + 12 * HOUR),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    assert_eq!(daily.len(), 10);
    for (i, b) in daily.iter().enumerate() {
        assert_eq!(b.start_time, at(i as i64 * DAY), "bucket {i}");
        assert_eq!(b.end_time, at((i as i64 + 1) * DAY), "bucket {i}");
    }
    let shape: Vec<(i64, i64, i64)> = daily
        .iter()
        .map(|b| {
            let c = b.counters.unwrap();
            (b.report_count, c.lines_covered, c.lines_total)
        })
        .collect();
    assert_eq!(
        shape,
        [
            (1, 60, 100), // the later of the two reports of day 1
            (0, 0, 0),    // only a dev report
            (2, 40, 60),  // api and ui, summed
            (0, 0, 0),
            (0, 0, 0),
            (0, 0, 0),
            (1, 70, 100),
            (0, 0, 0),
            (0, 0, 0),
            (0, 0, 0),
        ]
    );
    assert!(close(daily[0].percentages.unwrap().lines, 60.0));
    assert_eq!(daily[1].percentages.unwrap().lines, None);

    let weekly = client
        .get_coverage_trend(GetCoverageTrendRequest {
            branch: "main".into(),
            subsystem: String::new(),
            interval: TrendInterval::Weekly as i32,
            days: 10,
            end_time: at(9 * DAY + 12 * HOUR),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    // ISO weeks: Monday 2025-12-29 and Monday 2026-01-05.
    let starts: Vec<_> = weekly.iter().map(|b| b.start_time).collect();
    assert_eq!(starts, [at(-3 * DAY), at(4 * DAY)]);
    let shape: Vec<(i64, i64, i64)> = weekly
        .iter()
        .map(|b| {
            let c = b.counters.unwrap();
            (b.report_count, c.lines_covered, c.lines_total)
        })
        .collect();
    assert_eq!(shape, [(3, 100, 160), (1, 70, 100)]);

    let err = client
        .get_coverage_trend(GetCoverageTrendRequest {
            days: 1000,
            interval: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["interval", "days"]);
}

async fn compare(
    app: &TestApp,
    base: &str,
    head: &str,
    max_files: i32,
) -> Result<CompareCoverageResponse, tonic::Status> {
    app.coverage
        .clone()
        .compare_coverage(CompareCoverageRequest {
            base_commit_sha: base.into(),
            head_commit_sha: head.into(),
            subsystem: String::new(),
            max_files,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn compare_reports_totals_and_file_deltas_against_the_named_base() {
    let app = spawn_app().await;
    // An older report of the base commit, which must not be the one compared.
    let mut old = report("aaaaaaa1", "main", "", "ci-1");
    old.files = vec![file("a.rs", lines(1, 20))];
    old.recorded_at = at(0);
    record(&app, old).await;
    let mut base = report("aaaaaaa1", "main", "", "ci-2");
    base.recorded_at = at(HOUR);
    base.files = vec![
        file("a.rs", counters((10, 20), (2, 4), (1, 2))),
        file("b.rs", counters((5, 10), (0, 0), (1, 1))),
        file("c.rs", counters((7, 7), (1, 1), (2, 2))),
    ];
    let base = record(&app, base).await;
    let mut head = report("bbbbbbb2", "feature", "", "ci-3");
    head.recorded_at = at(2 * HOUR);
    head.files = vec![
        file("a.rs", counters((15, 20), (3, 4), (2, 2))),
        file("c.rs", counters((7, 7), (1, 1), (2, 2))),
        file("d.rs", counters((1, 4), (0, 2), (0, 1))),
    ];
    record(&app, head).await;

    let reply = compare(&app, "aaaaaaa1", "BBBBBBB2", 0).await.unwrap();
    let named = reply.base.clone().unwrap();
    assert_eq!(named.id, base.id);
    assert_eq!(named.client_key, "ci-2");
    assert_eq!(reply.head.clone().unwrap().commit_sha, "bbbbbbb2");
    // base 22/37 lines, 3/5 branches, 4/5 functions; head 23/31, 4/7, 4/5.
    let delta = reply.totals_delta.unwrap();
    assert_eq!(delta.counters, Some(counters((1, -6), (1, 2), (0, 0))));
    assert!(close(delta.lines_percent, 2300.0 / 31.0 - 2200.0 / 37.0));
    assert!(close(delta.branches_percent, 400.0 / 7.0 - 60.0));
    assert!(close(delta.functions_percent, 0.0));
    assert!(reply.files_compared);
    assert_eq!(
        (reply.files_added, reply.files_removed, reply.files_changed),
        (1, 1, 1)
    );
    let files: Vec<_> = reply
        .files
        .iter()
        .map(|f| {
            (
                f.path.as_str(),
                f.change,
                f.base.is_some(),
                f.head.is_some(),
            )
        })
        .collect();
    assert_eq!(
        files,
        [
            ("a.rs", FileChange::Changed as i32, true, true),
            ("b.rs", FileChange::Removed as i32, true, false),
            ("d.rs", FileChange::Added as i32, false, true),
        ]
    );
    assert!(close(reply.files[0].lines_percent_delta, 25.0));
    assert_eq!(reply.files[1].lines_percent_delta, None);
    assert!(!reply.files_truncated);

    let truncated = compare(&app, "aaaaaaa1", "bbbbbbb2", 2).await.unwrap();
    assert_eq!(truncated.files.len(), 2);
    assert!(truncated.files_truncated);
    assert_eq!(truncated.files_changed + truncated.files_added, 2);

    // A head without per-file rows: totals only.
    record(
        &app,
        totals_at("ccccccc3", "main", "", lines(30, 37), 3 * HOUR),
    )
    .await;
    let totals_only = compare(&app, "aaaaaaa1", "ccccccc3", 0).await.unwrap();
    assert!(!totals_only.files_compared);
    assert!(totals_only.files.is_empty());
    assert_eq!(
        totals_only
            .totals_delta
            .unwrap()
            .counters
            .unwrap()
            .lines_covered,
        8
    );
}

#[tokio::test]
async fn compare_without_a_report_for_a_commit_says_so() {
    let app = spawn_app().await;
    record(&app, totals_at("aaaaaaa1", "main", "api", lines(1, 2), 0)).await;
    record(&app, totals_at("bbbbbbb2", "main", "", lines(1, 2), 0)).await;

    let err = compare(&app, "eeeeeee5", "bbbbbbb2", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("base commit eeeeeee5"), "{err:?}");
    // The base has a report, but only for another subsystem: never used instead.
    let err = compare(&app, "aaaaaaa1", "bbbbbbb2", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("base commit aaaaaaa1"), "{err:?}");
    let err = compare(&app, "bbbbbbb2", "fffffff6", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("head commit fffffff6"), "{err:?}");
    let err = compare(&app, "nope", "", 20_000).await.unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["max_files", "base_commit_sha", "head_commit_sha"]
    );
}

#[tokio::test]
async fn deleting_a_session_removes_its_coverage_reports_and_their_files() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let mut with_session = report("aaaaaaa1", "main", "", "ci-1");
    with_session.session_id = s.id.clone();
    with_session.files = vec![file("a.rs", lines(1, 2)), file("b.rs", lines(2, 2))];
    let stored = record(&app, with_session).await;
    assert_eq!(stored.session_id, s.id);
    let mut other = report("aaaaaaa1", "main", "", "ci-2");
    other.files = vec![file("a.rs", lines(1, 2))];
    record(&app, other).await;

    app.sessions
        .clone()
        .delete_session(verdict::proto::DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap();
    assert_eq!(
        count(&app, "SELECT count(*) FROM coverage_reports").await,
        1
    );
    assert_eq!(count(&app, "SELECT count(*) FROM coverage_files").await, 1);

    let mut unknown = report("aaaaaaa1", "main", "", "ci-3");
    unknown.session_id = s.id.clone();
    let err = app
        .coverage
        .clone()
        .record_coverage(unknown)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}
