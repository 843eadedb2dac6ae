//! The projects migrations move everything stored before them into the
//! project `default`, without loss: data loaded into the schema before V14
//! is read back through the API after migrating, and every row of every
//! table belongs to `default`.

use crate::helpers::*;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::get_test_case_request::Lookup as CaseLookup;
use verdict::proto::{
    GetAggregateCoverageRequest, GetSessionRequest, GetTestCaseRequest, ListDiscrepanciesRequest,
    ListExecutionsRequest, ListResultsRequest, ListSessionLogsRequest, QueryTimeSeriesRequest,
    TimeRange,
};

/// The last migration before projects.
const BEFORE_PROJECTS: i32 = 13;

/// Rows in the schema of V13, as the gateway of that version stored them.
const OLD_DATA: &str = "
INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, status, log_seq)
VALUES ('11111111-1111-4111-8111-111111111111', 'old-session', 'cobol', 'java', 'full', 'processing', 2);
INSERT INTO session_logs (session_id, level, message, seq)
VALUES ('11111111-1111-4111-8111-111111111111', 'info', 'first', 1),
       ('11111111-1111-4111-8111-111111111111', 'error', 'second', 2);
INSERT INTO results (session_id, id, request_id, result_type, overall_status, fidelity_score)
VALUES ('11111111-1111-4111-8111-111111111111', '22222222-2222-4222-8222-222222222222', 'old-result', 'static', 'passed', 0.9);
INSERT INTO discrepancies (session_id, id, kind, severity, description, confidence, fingerprint)
VALUES ('11111111-1111-4111-8111-111111111111', '33333333-3333-4333-8333-333333333333', 'date_format', 2, 'old one', 0.5, 'fp-old'),
       ('11111111-1111-4111-8111-111111111111', '33333333-3333-4333-8333-333333333334', 'date_format', 1, 'old two', 0.5, 'fp-old');
INSERT INTO fingerprint_rules (fingerprint, resolution, actor) VALUES ('fp-muted', 'muted', 'someone');
INSERT INTO test_cases (id, key, name, test_type)
VALUES ('44444444-4444-4444-8444-444444444444', 'test-001', 'old test', 'unit');
INSERT INTO test_executions (id, test_case_id, status, started_at, duration_ms)
VALUES ('55555555-5555-4555-8555-555555555555', '44444444-4444-4444-8444-444444444444', 'passed', now() - interval '1 hour', 12),
       ('55555555-5555-4555-8555-555555555556', '44444444-4444-4444-8444-444444444444', 'failed', now() - interval '2 hours', 30);
INSERT INTO coverage_reports (id, commit_sha, branch, client_key, lines_covered, lines_total,
                              branches_covered, branches_total, functions_covered, functions_total)
VALUES ('66666666-6666-4666-8666-666666666666', 'abc123', 'main', 'old-report', 50, 100, 5, 10, 1, 2);
INSERT INTO coverage_files (report_id, path, lines_covered, lines_total, branches_covered,
                            branches_total, functions_covered, functions_total)
VALUES ('66666666-6666-4666-8666-666666666666', 'src/a.rs', 50, 100, 5, 10, 1, 2);
INSERT INTO metric_points (name, value, labels, recorded_at)
VALUES ('old.metric', 1.5, '{\"env\": \"ci\"}', now() - interval '10 minutes'),
       ('old.metric', 2.5, '{\"env\": \"ci\"}', now() - interval '5 minutes');
INSERT INTO audit_events (rpc, target_ids, outcome) VALUES ('/verdict.v1.SessionService/CreateSession', '{old}', 'created');
INSERT INTO ingest_marks (kind, ingest_id, scope, high_water_mark) VALUES ('discrepancies', 'old-ingest', '11111111-1111-4111-8111-111111111111', 3);
";

/// Every table that must have moved into `default`.
const TABLES: &[&str] = &[
    "sessions",
    "session_logs",
    "results",
    "discrepancies",
    "fingerprint_rules",
    "test_cases",
    "test_executions",
    "coverage_reports",
    "coverage_files",
    "metric_points",
    "audit_events",
    "ingest_marks",
];

#[tokio::test]
async fn data_stored_before_projects_moves_into_default_without_loss() {
    let (_, url) = create_database().await;
    let mut old = admin_client(&url).await;
    verdict::db::migrate::run_to(&mut old, BEFORE_PROJECTS)
        .await
        .unwrap();
    old.batch_execute(OLD_DATA).await.unwrap();
    let mut counts_before = Vec::new();
    for table in TABLES {
        let n: i64 = old
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(n > 0, "{table} holds old rows");
        counts_before.push(n);
    }
    drop(old);

    // The gateway migrates at start-up.
    let app = spawn_app_with(test_config(&url)).await;
    let default = default_project(&app).await;
    let sql = app.sql().await;
    for (table, before) in TABLES.iter().zip(counts_before) {
        let row = sql
            .query_one(
                &format!("SELECT count(*), count(*) FILTER (WHERE project_id = $1) FROM {table}"),
                &[&default],
            )
            .await
            .unwrap();
        let (all, in_default): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!((all, in_default), (before, before), "{table}");
    }

    // And through the API, in `default`, with no header.
    let session = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("old-session".into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let session_id = session.id.clone();
    let logs = app
        .sessions
        .clone()
        .list_session_logs(ListSessionLogsRequest {
            session_id: session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.entries.len(), 2);
    let results = app
        .results
        .clone()
        .list_results(ListResultsRequest {
            session_id: session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(results.results.len(), 1);
    let discrepancies = app
        .discrepancies
        .clone()
        .list_discrepancies(ListDiscrepanciesRequest {
            session_id: session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(discrepancies.discrepancies.len(), 2);
    let case = app
        .test_cases
        .clone()
        .get_test_case(GetTestCaseRequest {
            lookup: Some(CaseLookup::Key("test-001".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .test_case
        .unwrap();
    let executions = app
        .test_cases
        .clone()
        .list_executions(ListExecutionsRequest {
            test_case_id: case.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(executions.executions.len(), 2);
    let coverage = app
        .coverage
        .clone()
        .get_aggregate_coverage(GetAggregateCoverageRequest {
            branch: "main".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(coverage.report_count, 1);
    assert_eq!(coverage.counters.unwrap().lines_covered, 50);
    let now = chrono::Utc::now();
    let series = app
        .metrics
        .clone()
        .query_time_series(QueryTimeSeriesRequest {
            name: "old.metric".into(),
            range: Some(TimeRange {
                start_time: Some(verdict::convert::timestamp(
                    now - chrono::Duration::hours(1),
                )),
                end_time: Some(verdict::convert::timestamp(now)),
            }),
            bucket_width: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let points: i64 = series.buckets.iter().map(|b| b.count).sum();
    assert_eq!(points, 2);

    // Another project sees none of it.
    create_project(&app, "newcomer").await;
    let err = app
        .sessions
        .clone()
        .get_session(in_project(
            GetSessionRequest {
                lookup: Some(Lookup::Id(session_id)),
                ..Default::default()
            },
            "newcomer",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    app.stop().await.unwrap();
}
