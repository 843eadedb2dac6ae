//! Reading back what was written: GetExecution, GetDiscrepancy (and the
//! `ids` filter of ListDiscrepancies), GetCoverageReport, ListCoverageFiles,
//! ListCoverageReports, ListMetricPoints and GetSession's summary, each
//! through the gRPC client against direct SQL, and NOT_FOUND (or nothing)
//! across projects.

use crate::coverage::{file, lines, report};
use crate::discrepancies::item;
use crate::errors::assert_reason;
use crate::helpers::{TestApp, create_project, in_project, spawn_app, violated_fields};
use crate::results::{new_result, record as record_result};
use crate::sessions::create;
use crate::test_cases::{create_test_case, new_test_case, run};
use std::collections::{BTreeMap, HashMap};
use tonic::Code;
use uuid::Uuid;
use verdict::proto::{
    CountMode, ExecutionStatus, GetCoverageReportRequest, GetDiscrepancyRequest,
    GetExecutionRequest, GetSessionRequest, ListCoverageFilesRequest, ListCoverageReportsRequest,
    ListDiscrepanciesRequest, ListMetricPointsRequest, MetricPoint, OverallStatus,
    RecordDiscrepanciesRequest, RecordExecutionsRequest, RecordMetricPointsRequest, Resolution,
    ResolveDiscrepancyRequest, TestType, TimeRange, get_session_request::Lookup,
};

async fn sql_count(
    app: &TestApp,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    app.sql().await.query_one(sql, params).await.unwrap().get(0)
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;

#[tokio::test]
async fn get_discrepancy_and_the_ids_filter_read_back_a_batch_and_nothing_of_another_project() {
    let app = spawn_app().await;
    create_project(&app, "team-b").await;
    let s = create(&app, "rb-1").await;
    let ids = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "b1".into(),
            items: (0..12).map(item).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids.len(), 12);
    let mut client = app.discrepancies.clone();
    for (n, id) in ids.iter().enumerate() {
        let d = client
            .get_discrepancy(GetDiscrepancyRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .discrepancy
            .unwrap();
        let want = item(n);
        assert_eq!(d.id, *id);
        assert_eq!(d.session_id, s.id);
        assert_eq!(d.description, want.description);
        assert_eq!(d.severity, want.severity);
        assert_eq!(d.kind, want.kind);
        // Another project never sees it.
        let err = client
            .get_discrepancy(in_project(
                GetDiscrepancyRequest { id: id.clone() },
                "team-b",
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    // Unknown and malformed ids.
    let err = client
        .get_discrepancy(GetDiscrepancyRequest {
            id: Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .get_discrepancy(GetDiscrepancyRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["id"]);

    // The ids filter: a subset (with a duplicate and an unknown id) comes
    // back exactly, counted exactly, paged.
    let mut wanted: Vec<String> = ids.iter().step_by(2).cloned().collect();
    let mut asked = wanted.clone();
    asked.push(wanted[0].clone());
    asked.push(Uuid::now_v7().to_string());
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_discrepancies(ListDiscrepanciesRequest {
                ids: asked.clone(),
                page_size: 4,
                page_token: token,
                count: CountMode::Exact as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total, wanted.len() as i64);
        assert_eq!(page.total_mode, CountMode::Exact as i32);
        got.extend(page.discrepancies.into_iter().map(|d| d.id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    got.sort();
    wanted.sort();
    assert_eq!(got, wanted);
    // The same ids from another project: nothing.
    let other = client
        .list_discrepancies(in_project(
            ListDiscrepanciesRequest {
                ids: asked.clone(),
                count: CountMode::Exact as i32,
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(other.discrepancies.is_empty());
    assert_eq!(other.total, 0);
    // A bad id and too many ids are field violations.
    let err = client
        .list_discrepancies(ListDiscrepanciesRequest {
            ids: vec![ids[0].clone(), "x".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["ids[1]"]);
    let err = client
        .list_discrepancies(ListDiscrepanciesRequest {
            ids: (0..1001).map(|_| Uuid::now_v7().to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["ids"]);
    // A token of one id set is refused with another.
    let first = client
        .list_discrepancies(ListDiscrepanciesRequest {
            ids: ids.clone(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let err = client
        .list_discrepancies(ListDiscrepanciesRequest {
            ids: ids[..5].to_vec(),
            page_size: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
}

#[tokio::test]
async fn get_execution_returns_every_field_and_is_not_found_from_another_project() {
    let app = spawn_app().await;
    create_project(&app, "team-b").await;
    create_test_case(&app, new_test_case("t-1", TestType::Unit, "core")).await;
    let mut failing = run("t-1", ExecutionStatus::Failed, 10, 250);
    failing.error_message = "expected 2, got 3".into();
    failing.stack_trace = "at line 7".into();
    let ids = app
        .test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "e1".into(),
            items: vec![run("t-1", ExecutionStatus::Passed, 5, 100), failing],
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let mut client = app.test_cases.clone();
    let e = client
        .get_execution(GetExecutionRequest { id: ids[1].clone() })
        .await
        .unwrap()
        .into_inner()
        .execution
        .unwrap();
    assert_eq!(e.id, ids[1]);
    assert_eq!(e.test_case_key, "t-1");
    assert_eq!(e.status, ExecutionStatus::Failed as i32);
    assert_eq!(e.duration_ms, 250);
    assert_eq!(e.error_message, "expected 2, got 3");
    assert_eq!(e.stack_trace, "at line 7");
    assert_eq!(e.started_at, crate::test_cases::at(10));
    let stored: String = app
        .sql()
        .await
        .query_one(
            "SELECT status FROM test_executions WHERE id = $1::text::uuid",
            &[&ids[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "failed");
    for id in &ids {
        let err = client
            .get_execution(in_project(GetExecutionRequest { id: id.clone() }, "team-b"))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    let err = client
        .get_execution(GetExecutionRequest { id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["id"]);
}

#[tokio::test]
async fn coverage_reports_and_their_files_read_back_filtered_and_paged_within_the_project() {
    let app = spawn_app().await;
    let b = create_project(&app, "team-b").await;
    let mut client = app.coverage.clone();
    // Five reports: two commits, two branches, a subsystem; and one with
    // 23 files. The same in team-b, which must never show.
    let mut big = report("aaaaaaa1", "main", "", "k-big");
    big.files = (0..23)
        .map(|i| file(&format!("src/f{i:02}.rs"), lines(i, 30)))
        .collect();
    big.recorded_at = ts(T0 + 50);
    let mut others = Vec::new();
    for (n, (commit, branch, subsystem)) in [
        ("aaaaaaa1", "main", "api"),
        ("bbbbbbb2", "main", ""),
        ("bbbbbbb2", "dev", ""),
        ("ccccccc3", "dev", "api"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = report(commit, branch, subsystem, &format!("k{n}"));
        r.totals = Some(lines(n as i64, 10));
        r.recorded_at = ts(T0 + n as i64 * 10);
        others.push(r);
    }
    let mut stored = Vec::new();
    for r in std::iter::once(big.clone()).chain(others.clone()) {
        stored.push(
            client
                .record_coverage(r.clone())
                .await
                .unwrap()
                .into_inner()
                .report
                .unwrap(),
        );
        client
            .record_coverage(in_project(r, "team-b"))
            .await
            .unwrap();
    }
    let big_id = stored[0].id.clone();

    // Get: the stored report, NOT_FOUND from team-b.
    let got = client
        .get_coverage_report(GetCoverageReportRequest { id: big_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(got, stored[0]);
    assert_eq!(got.file_count, 23);
    let err = client
        .get_coverage_report(in_project(
            GetCoverageReportRequest { id: big_id.clone() },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // Files: every one once, in path order, over pages of 5, with a total.
    let mut paths = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_coverage_files(ListCoverageFilesRequest {
                report_id: big_id.clone(),
                page_size: 5,
                page_token: token,
                count: CountMode::Exact as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total, 23);
        pages += 1;
        for f in page.files {
            assert_eq!(
                f.counters.as_ref().unwrap().lines_covered,
                f.path[5..7].parse::<i64>().unwrap()
            );
            paths.push(f.path);
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 5);
    let want: Vec<String> = big.files.iter().map(|f| f.path.clone()).collect();
    assert_eq!(paths, want);
    let err = client
        .list_coverage_files(in_project(
            ListCoverageFilesRequest {
                report_id: big_id.clone(),
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // Reports: filters against direct SQL counts in the default project.
    let default_id: Uuid = crate::helpers::default_project(&app).await;
    let cases: Vec<(ListCoverageReportsRequest, &str)> = vec![
        (ListCoverageReportsRequest::default(), "TRUE"),
        (
            ListCoverageReportsRequest {
                commit_sha: "BBBBBBB2".into(),
                ..Default::default()
            },
            "commit_sha = 'bbbbbbb2'",
        ),
        (
            ListCoverageReportsRequest {
                branch: "dev".into(),
                ..Default::default()
            },
            "branch = 'dev'",
        ),
        (
            ListCoverageReportsRequest {
                subsystem: Some(String::new()),
                ..Default::default()
            },
            "subsystem = ''",
        ),
        (
            ListCoverageReportsRequest {
                subsystem: Some("api".into()),
                recorded: Some(TimeRange {
                    start_time: ts(T0 + 5),
                    end_time: None,
                }),
                ..Default::default()
            },
            "subsystem = 'api' AND recorded_at >= to_timestamp(1767225605)",
        ),
    ];
    for (req, predicate) in cases {
        let want: Vec<String> = app
            .sql()
            .await
            .query(
                &format!(
                    "SELECT id::text FROM coverage_reports WHERE project_id = $1 AND {predicate} \
                     ORDER BY recorded_at DESC, id DESC"
                ),
                &[&default_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!want.is_empty(), "{predicate}");
        let mut got = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_coverage_reports(ListCoverageReportsRequest {
                    page_size: 2,
                    page_token: token,
                    count: CountMode::Exact as i32,
                    ..req.clone()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.total, want.len() as i64, "{predicate}");
            got.extend(page.reports.into_iter().map(|r| r.id));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(got, want, "{predicate}");
    }
    // team-b sees its own five, never ours.
    let theirs = client
        .list_coverage_reports(in_project(
            ListCoverageReportsRequest {
                count: CountMode::Exact as i32,
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.total, 5);
    assert_eq!(
        theirs.total,
        sql_count(
            &app,
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1",
            &[&b]
        )
        .await
    );
    assert!(
        theirs
            .reports
            .iter()
            .all(|r| !stored.iter().any(|s| s.id == r.id))
    );
    // A token of one filter is refused with another; a bad sha is a violation.
    let first = client
        .list_coverage_reports(ListCoverageReportsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = client
        .list_coverage_reports(ListCoverageReportsRequest {
            branch: "main".into(),
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let err = client
        .list_coverage_reports(ListCoverageReportsRequest {
            commit_sha: "xyz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["commit_sha"]);
}

fn point(name: &str, value: f64, second: i64, labels: &[(&str, &str)]) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        value,
        unit: "ms".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        recorded_at: ts(T0 + second),
    }
}

#[tokio::test]
async fn list_metric_points_returns_the_raw_points_of_one_metric_by_label_and_range() {
    let app = spawn_app().await;
    let b = create_project(&app, "team-b").await;
    let mut points = Vec::new();
    for i in 0..40 {
        let env = if i % 3 == 0 { "prod" } else { "ci" };
        // Pairs share a timestamp: ties are ordered by storage order.
        points.push(point(
            "latency",
            i as f64,
            i / 2,
            &[("env", env), ("host", "h1")],
        ));
    }
    points.push(point("other", 1.0, 3, &[("env", "prod")]));
    let mut metrics = app.metrics.clone();
    metrics
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "p1".into(),
            points: points.clone(),
        })
        .await
        .unwrap();
    metrics
        .record_metric_points(in_project(
            RecordMetricPointsRequest {
                batch_id: "p1".into(),
                points: points.clone(),
            },
            "team-b",
        ))
        .await
        .unwrap();
    let filter = ListMetricPointsRequest {
        name: "latency".into(),
        labels: HashMap::from([("env".to_string(), "prod".to_string())]),
        range: Some(TimeRange {
            start_time: ts(T0 + 2),
            end_time: ts(T0 + 18),
        }),
        count: CountMode::Exact as i32,
        ..Default::default()
    };
    let want: Vec<f64> = points
        .iter()
        .filter(|p| {
            let s = p.recorded_at.as_ref().unwrap().seconds - T0;
            p.name == "latency" && p.labels["env"] == "prod" && (2..18).contains(&s)
        })
        .map(|p| p.value)
        .collect();
    let default_id = crate::helpers::default_project(&app).await;
    let direct = sql_count(
        &app,
        "SELECT count(*) FROM metric_points WHERE project_id = $1 AND name = 'latency' \
         AND labels @> '{\"env\":\"prod\"}' AND recorded_at >= to_timestamp(1767225602) \
         AND recorded_at < to_timestamp(1767225618)",
        &[&default_id],
    )
    .await;
    assert_eq!(direct, want.len() as i64);
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let page = metrics
            .list_metric_points(ListMetricPointsRequest {
                page_size: 2,
                page_token: token,
                ..filter.clone()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total, direct);
        for p in page.points {
            assert_eq!(p.name, "latency");
            assert_eq!(p.unit, "ms");
            assert_eq!(
                p.labels.iter().collect::<BTreeMap<_, _>>(),
                BTreeMap::from([
                    (&"env".to_string(), &"prod".to_string()),
                    (&"host".to_string(), &"h1".to_string())
                ])
            );
            got.push(p.value);
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(got, want);
    // Another project lists its own copy, counted on its own.
    let theirs = metrics
        .list_metric_points(in_project(filter.clone(), "team-b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.total, direct);
    assert_eq!(
        sql_count(
            &app,
            "SELECT count(*) FROM metric_points WHERE project_id = $1 AND name = 'latency'",
            &[&b]
        )
        .await,
        40
    );
    // A token of one label filter is refused with another; a name is required.
    let first = metrics
        .list_metric_points(ListMetricPointsRequest {
            page_size: 1,
            ..filter.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let err = metrics
        .list_metric_points(ListMetricPointsRequest {
            page_size: 1,
            page_token: first.next_page_token,
            labels: HashMap::from([("env".to_string(), "ci".to_string())]),
            ..filter.clone()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let err = metrics
        .list_metric_points(ListMetricPointsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["name"]);
}

#[tokio::test]
async fn get_session_with_a_summary_counts_what_belongs_to_the_session_and_only_when_asked() {
    let app = spawn_app().await;
    let s = create(&app, "sum-1").await;
    let other = create(&app, "sum-2").await;
    // Results: 2 passed, 1 failed; discrepancies: 7 of 5 severities, 2
    // resolved; executions: 2 passed, 1 failed. `other` gets some too.
    for (n, status) in [
        OverallStatus::Passed,
        OverallStatus::Passed,
        OverallStatus::Failed,
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = new_result(&s.id, &format!("r{n}"), 0.9);
        r.overall_status = status as i32;
        record_result(&app, r).await;
    }
    record_result(&app, new_result(&other.id, "r-other", 0.5)).await;
    let mut discrepancies = app.discrepancies.clone();
    let ids = discrepancies
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "d".into(),
            items: (0..7).map(item).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    discrepancies
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: other.id.clone(),
            batch_id: "d".into(),
            items: (0..3).map(item).collect(),
        })
        .await
        .unwrap();
    for id in &ids[..2] {
        discrepancies
            .resolve_discrepancy(ResolveDiscrepancyRequest {
                id: id.clone(),
                resolution: Resolution::Resolved as i32,
                actor: "me".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    create_test_case(&app, new_test_case("t-s", TestType::Unit, "core")).await;
    let mut items = Vec::new();
    for (n, status) in [
        ExecutionStatus::Passed,
        ExecutionStatus::Passed,
        ExecutionStatus::Failed,
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = run("t-s", status, n as i64, 10);
        e.session_id = s.id.clone();
        items.push(e);
    }
    items.push(run("t-s", ExecutionStatus::Error, 9, 10));
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "x".into(),
            items,
        })
        .await
        .unwrap();

    let mut sessions = app.sessions.clone();
    let plain = sessions
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(s.id.clone())),
            include_summary: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(plain.summary.is_none());
    let reply = sessions
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("sum-1".into())),
            include_summary: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.session.unwrap().id, s.id);
    let summary = reply.summary.unwrap();
    let pairs = |c: &[verdict::proto::SummaryCount]| -> Vec<(String, i64)> {
        c.iter().map(|c| (c.key.clone(), c.count)).collect()
    };
    let own = |s: &str| s.to_string();
    assert_eq!(
        pairs(&summary.results_by_status),
        [
            (own("OVERALL_STATUS_PASSED"), 2),
            (own("OVERALL_STATUS_FAILED"), 1)
        ]
    );
    assert_eq!(summary.results_total, 3);
    assert_eq!(
        pairs(&summary.discrepancies_by_severity),
        [
            (own("SEVERITY_CRITICAL"), 2),
            (own("SEVERITY_HIGH"), 2),
            (own("SEVERITY_MEDIUM"), 1),
            (own("SEVERITY_LOW"), 1),
            (own("SEVERITY_INFO"), 1),
        ]
    );
    assert_eq!(
        pairs(&summary.discrepancies_by_resolution),
        [(own("RESOLUTION_OPEN"), 5), (own("RESOLUTION_RESOLVED"), 2)]
    );
    assert_eq!(summary.discrepancies_total, 7);
    assert_eq!(
        pairs(&summary.executions_by_status),
        [
            (own("EXECUTION_STATUS_PASSED"), 2),
            (own("EXECUTION_STATUS_FAILED"), 1)
        ]
    );
    assert_eq!(summary.executions_total, 3);
    // The totals agree with direct SQL.
    let sid: Uuid = s.id.parse().unwrap();
    for (table, want) in [
        ("results", summary.results_total),
        ("discrepancies", summary.discrepancies_total),
        ("test_executions", summary.executions_total),
    ] {
        let n = sql_count(
            &app,
            &format!("SELECT count(*) FROM {table} WHERE session_id = $1"),
            &[&sid],
        )
        .await;
        assert_eq!(n, want, "{table}");
    }
    // Another project: NOT_FOUND, summary or not.
    create_project(&app, "team-b").await;
    let err = sessions
        .get_session(in_project(
            GetSessionRequest {
                lookup: Some(Lookup::Id(s.id.clone())),
                include_summary: true,
            },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    // A session with nothing: an all-empty summary.
    let empty = create(&app, "sum-3").await;
    let summary = sessions
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(empty.id)),
            include_summary: true,
        })
        .await
        .unwrap()
        .into_inner()
        .summary
        .unwrap();
    assert_eq!(summary, verdict::proto::SessionSummary::default());
}
