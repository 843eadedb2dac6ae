//! Totals on list calls (`count` / `total` / `total_mode`): EXACT equals a
//! direct SQL count with the same filters and ignores paging; ESTIMATED
//! below VERDICT_COUNT_EXACT_BELOW says EXACT; NONE costs nothing and says
//! NONE; an unknown mode is INVALID_ARGUMENT on every list. (ESTIMATED over
//! a million rows: tests/totals_estimate.rs.)

use crate::discrepancies::item;
use crate::helpers::{
    TestApp, create_database, create_project, default_project, in_project, spawn_app,
    spawn_app_with, test_config, violated_fields,
};
use crate::sessions::{create, set_status};
use crate::test_cases::{create_test_case, new_test_case, run};
use tonic::Code;
use uuid::Uuid;
use verdict::proto::project_service_client::ProjectServiceClient;
use verdict::proto::test_run_service_client::TestRunServiceClient;
use verdict::proto::{
    CountMode, ExecutionStatus, ListAuditEventsRequest, ListCoverageFilesRequest,
    ListCoverageReportsRequest, ListDiscrepanciesRequest, ListExecutionsRequest,
    ListMetricPointsRequest, ListProjectsRequest, ListResolutionHistoryRequest, ListResultsRequest,
    ListRollupsRequest, ListSessionLogsRequest, ListSessionsRequest, ListTestCasesRequest,
    ListTestRunsRequest, RecordDiscrepanciesRequest, RecordExecutionsRequest, Resolution,
    ResolveDiscrepancyRequest, RollupPeriod, SessionStatus, Severity, TestType,
};

const EXACT: i32 = CountMode::Exact as i32;
const ESTIMATED: i32 = CountMode::Estimated as i32;

async fn sql_count(app: &TestApp, sql: &str, project: Uuid) -> i64 {
    app.sql()
        .await
        .query_one(sql, &[&project])
        .await
        .unwrap()
        .get(0)
}

/// `m` as a request in the project `slug` (`None`: default).
fn req<T>(slug: Option<&str>, m: T) -> tonic::Request<T> {
    match slug {
        Some(s) => in_project(m, s),
        None => tonic::Request::new(m),
    }
}

/// Sessions (some processing), logs, discrepancies (one resolved twice),
/// results, test cases and executions in the project `slug` (`None`:
/// default). Returns (a session id, a discrepancy id).
async fn plant(app: &TestApp, slug: Option<&str>, sessions: usize) -> (String, String) {
    let mut ids = Vec::new();
    for n in 0..sessions {
        let s = app
            .sessions
            .clone()
            .create_session(req(slug, crate::sessions::new_session(&format!("t-{n}"))))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        ids.push(s.id);
    }
    if slug.is_none() {
        for id in ids.iter().step_by(3) {
            set_status(app, id, SessionStatus::Processing)
                .await
                .unwrap();
        }
    }
    let first = ids[0].clone();
    for n in 0..7 {
        app.sessions
            .clone()
            .append_session_log(req(
                slug,
                verdict::proto::AppendSessionLogRequest {
                    session_id: first.clone(),
                    level: [
                        verdict::proto::LogLevel::Info,
                        verdict::proto::LogLevel::Error,
                    ][n % 2] as i32,
                    message: format!("line {n}"),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }
    let d = app
        .discrepancies
        .clone()
        .record_discrepancies(req(
            slug,
            RecordDiscrepanciesRequest {
                session_id: first.clone(),
                batch_id: "b".into(),
                items: (0..11).map(item).collect(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .ids;
    for resolution in [Resolution::Acknowledged, Resolution::Resolved] {
        app.discrepancies
            .clone()
            .resolve_discrepancy(req(
                slug,
                ResolveDiscrepancyRequest {
                    id: d[0].clone(),
                    resolution: resolution as i32,
                    actor: "me".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
    }
    for n in 0..3 {
        app.results
            .clone()
            .record_result(req(
                slug,
                crate::results::new_result(&first, &format!("r{n}"), 0.5),
            ))
            .await
            .unwrap();
    }
    for key in ["a-1", "a-2", "b-1"] {
        app.test_cases
            .clone()
            .create_test_case(req(slug, new_test_case(key, TestType::Unit, "core")))
            .await
            .unwrap();
    }
    app.test_cases
        .clone()
        .record_executions(req(
            slug,
            RecordExecutionsRequest {
                batch_id: "x".into(),
                items: (0..9)
                    .map(|n| {
                        run(
                            ["a-1", "a-2", "b-1"][n % 3],
                            [ExecutionStatus::Passed, ExecutionStatus::Failed][n % 2],
                            n as i64,
                            5,
                        )
                    })
                    .collect(),
            },
        ))
        .await
        .unwrap();
    (first, d[0].clone())
}

#[tokio::test]
async fn exact_totals_equal_direct_sql_counts_with_the_same_filters_whatever_the_page() {
    let app = spawn_app().await;
    let b = create_project(&app, "team-b").await;
    let (session, discrepancy) = plant(&app, None, 10).await;
    plant(&app, Some("team-b"), 4).await;
    let p = default_project(&app).await;
    let sid = session.clone();

    // ListSessions: unfiltered and by status, page_size 1.
    let mut sessions = app.sessions.clone();
    for (statuses, predicate) in [
        (vec![], "TRUE"),
        (
            vec![SessionStatus::Processing as i32],
            "status = 'processing'",
        ),
    ] {
        let r = sessions
            .list_sessions(ListSessionsRequest {
                statuses,
                page_size: 1,
                count: EXACT,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let want = sql_count(
            &app,
            &format!("SELECT count(*) FROM sessions WHERE project_id = $1 AND {predicate}"),
            p,
        )
        .await;
        assert_eq!((r.total, r.total_mode), (want, EXACT), "{predicate}");
        assert_eq!(r.sessions.len(), 1);
    }
    // Without `count`: nothing counted.
    let r = sessions
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (0, CountMode::Unspecified as i32));

    // ListSessionLogs by level.
    let r = sessions
        .list_session_logs(ListSessionLogsRequest {
            session_id: sid.clone(),
            min_level: verdict::proto::LogLevel::Error as i32,
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = sql_count(
        &app,
        "SELECT count(*) FROM session_logs WHERE project_id = $1 AND level = 'error'",
        p,
    )
    .await;
    assert_eq!((r.total, r.total_mode), (want, EXACT));
    assert_eq!(want, 3);

    // ListResults.
    let r = app
        .results
        .clone()
        .list_results(ListResultsRequest {
            session_id: sid.clone(),
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (3, EXACT));

    // ListDiscrepancies by severity, and ListResolutionHistory.
    let mut discrepancies = app.discrepancies.clone();
    let r = discrepancies
        .list_discrepancies(ListDiscrepanciesRequest {
            severities: vec![Severity::Critical as i32, Severity::Low as i32],
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = sql_count(
        &app,
        "SELECT count(*) FROM discrepancies WHERE project_id = $1 AND severity IN (1, 4)",
        p,
    )
    .await;
    assert_eq!((r.total, r.total_mode), (want, EXACT));
    assert_eq!(want, 5);
    let r = discrepancies
        .list_resolution_history(ListResolutionHistoryRequest {
            id: discrepancy.clone(),
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (2, EXACT));

    // ListTestCases by name prefix; ListExecutions by status.
    let mut test_cases = app.test_cases.clone();
    let r = test_cases
        .list_test_cases(ListTestCasesRequest {
            name_prefix: "checks a".into(),
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (2, EXACT));
    let r = test_cases
        .list_executions(ListExecutionsRequest {
            statuses: vec![ExecutionStatus::Failed as i32],
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = sql_count(
        &app,
        "SELECT count(*) FROM test_executions WHERE project_id = $1 AND status = 'failed'",
        p,
    )
    .await;
    assert_eq!((r.total, r.total_mode), (want, EXACT));
    assert_eq!(want, 4);

    // ListTestRuns (none yet), ListRollups (none computed).
    let r = TestRunServiceClient::new(app.channel.clone())
        .list_test_runs(ListTestRunsRequest {
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (0, EXACT));
    let r = app
        .metrics
        .clone()
        .list_rollups(ListRollupsRequest {
            period: RollupPeriod::Day as i32,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = sql_count(
        &app,
        "SELECT count(*) FROM metric_rollups WHERE project_id = $1 AND period = 'day'",
        p,
    )
    .await;
    assert_eq!((r.total, r.total_mode), (want, EXACT));

    // ListAuditEvents by RPC: the session creations of this project only.
    let r = app
        .admin
        .clone()
        .list_audit_events(ListAuditEventsRequest {
            rpc: "/verdict.v1.SessionService/CreateSession".into(),
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = sql_count(
        &app,
        "SELECT count(*) FROM audit_events WHERE project_id = $1 \
         AND rpc = '/verdict.v1.SessionService/CreateSession'",
        p,
    )
    .await;
    assert_eq!((r.total, r.total_mode), (want, EXACT));
    assert_eq!(want, 10);

    // ListProjects: default and team-b.
    let r = ProjectServiceClient::new(app.channel.clone())
        .list_projects(ListProjectsRequest {
            page_size: 1,
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (2, EXACT));

    // team-b counts its own rows only.
    let r = sessions
        .list_sessions(in_project(
            ListSessionsRequest {
                count: EXACT,
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total, 4);
    assert_eq!(
        r.total,
        sql_count(
            &app,
            "SELECT count(*) FROM sessions WHERE project_id = $1",
            b
        )
        .await
    );

    // ESTIMATED of a small table is below the default threshold (10000):
    // counted exactly, and the reply says so.
    let r = sessions
        .list_sessions(ListSessionsRequest {
            count: ESTIMATED,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (10, EXACT));
    let r = test_cases
        .list_executions(ListExecutionsRequest {
            count: ESTIMATED,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (9, EXACT));
}

#[tokio::test]
async fn an_estimate_over_the_threshold_is_returned_as_estimated() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    // Every estimate is "large enough": the planner's figure is returned.
    config.count_exact_below = 0;
    let app = spawn_app_with(config).await;
    for n in 0..30 {
        create(&app, &format!("e-{n}")).await;
    }
    app.sql()
        .await
        .batch_execute("ANALYZE sessions")
        .await
        .unwrap();
    let r = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            count: ESTIMATED,
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total_mode, ESTIMATED);
    // After ANALYZE the planner knows the table exactly.
    assert_eq!(r.total, 30);
    // With a filter on a bound parameter: the estimate uses its value (no
    // session is FAILED: the planner estimates about none, never all 30).
    let r = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            statuses: vec![SessionStatus::Failed as i32],
            count: ESTIMATED,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total_mode, ESTIMATED);
    assert!(r.total <= 2, "{}", r.total);
    // EXACT is still exact.
    let r = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            count: EXACT,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (30, EXACT));
}

/// The INVALID_ARGUMENT of a list call with `count = 7`, which must name
/// the field `count`.
macro_rules! refused {
    ($call:expr) => {{
        let err = $call.await.expect_err("count 7 is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(violated_fields(&err), ["count"]);
    }};
}

#[tokio::test]
async fn an_unknown_count_mode_is_invalid_argument_on_every_list() {
    let app = spawn_app().await;
    let s = create(&app, "bad-count").await;
    let d = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "b".into(),
            items: vec![item(0)],
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let c = app
        .coverage
        .clone()
        .record_coverage(crate::coverage::report("abcdef1", "main", "", "k"))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    create_test_case(&app, new_test_case("k-1", TestType::Unit, "core")).await;
    let bad = 7;
    refused!(app.sessions.clone().list_sessions(ListSessionsRequest {
        count: bad,
        ..Default::default()
    }));
    refused!(
        app.sessions
            .clone()
            .list_session_logs(ListSessionLogsRequest {
                session_id: s.id.clone(),
                count: bad,
                ..Default::default()
            })
    );
    refused!(app.results.clone().list_results(ListResultsRequest {
        count: bad,
        ..Default::default()
    }));
    refused!(
        app.discrepancies
            .clone()
            .list_discrepancies(ListDiscrepanciesRequest {
                count: -1,
                ..Default::default()
            })
    );
    refused!(
        app.discrepancies
            .clone()
            .list_resolution_history(ListResolutionHistoryRequest {
                id: d[0].clone(),
                count: bad,
                ..Default::default()
            })
    );
    refused!(
        app.test_cases
            .clone()
            .list_test_cases(ListTestCasesRequest {
                count: bad,
                ..Default::default()
            })
    );
    refused!(
        app.test_cases
            .clone()
            .list_executions(ListExecutionsRequest {
                count: bad,
                ..Default::default()
            })
    );
    refused!(
        TestRunServiceClient::new(app.channel.clone()).list_test_runs(ListTestRunsRequest {
            count: bad,
            ..Default::default()
        })
    );
    refused!(app.admin.clone().list_audit_events(ListAuditEventsRequest {
        count: bad,
        ..Default::default()
    }));
    refused!(
        ProjectServiceClient::new(app.channel.clone()).list_projects(ListProjectsRequest {
            count: bad,
            ..Default::default()
        })
    );
    refused!(app.metrics.clone().list_rollups(ListRollupsRequest {
        period: RollupPeriod::Day as i32,
        count: bad,
        ..Default::default()
    }));
    refused!(
        app.metrics
            .clone()
            .list_metric_points(ListMetricPointsRequest {
                name: "m".into(),
                count: bad,
                ..Default::default()
            })
    );
    refused!(
        app.coverage
            .clone()
            .list_coverage_reports(ListCoverageReportsRequest {
                count: bad,
                ..Default::default()
            })
    );
    refused!(
        app.coverage
            .clone()
            .list_coverage_files(ListCoverageFilesRequest {
                report_id: c.id.clone(),
                count: bad,
                ..Default::default()
            })
    );
}
