//! One idempotency rule for every RPC that takes a client key: same key +
//! same content (decided on a canonical digest, map and Struct keys sorted)
//! → the first call's outcome; same key + other content → FAILED_PRECONDITION
//! IDEMPOTENCY_KEY_REUSED; and a replay never hands a caller stored content
//! it could not read.

use crate::helpers::{TestApp, authed, connect, spawn_app, spawn_auth_app};
use crate::results::new_result;
use crate::sessions::{create, new_session, set_status};
use crate::test_cases::{at, new_test_case};
use prost_types::{ListValue, Struct, Value, value::Kind};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use tonic::{Code, Status};
use verdict::proto::{
    CoverageCounters, CreateSessionResponse, CreateTestCaseResponse, DiscrepancyInput,
    ExecutionInput, ExecutionStatus, FileCoverage, GetSessionRequest, MetricPoint,
    RecordCoverageRequest, RecordCoverageResponse, RecordDiscrepanciesRequest,
    RecordDiscrepanciesResponse, RecordExecutionsRequest, RecordExecutionsResponse,
    RecordMetricPointsRequest, RecordMetricPointsResponse, RecordResultResponse, SessionStatus,
    TestType, UpdateTestCaseRequest, coverage_service_client::CoverageServiceClient,
    discrepancy_service_client::DiscrepancyServiceClient, execution_input,
    get_session_request::Lookup, metrics_service_client::MetricsServiceClient,
    result_service_client::ResultServiceClient, session_service_client::SessionServiceClient,
    test_case_service_client::TestCaseServiceClient,
};

/// Replays of one request in the map-ordering tests.
const REPLAYS: usize = 20;
/// Concurrent clients in the race tests.
const CLIENTS: usize = 10;

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn number(x: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(x)),
    }
}

/// A Struct of `n` entries of every kind, with nested Structs and lists of
/// Structs, so key order can vary at every depth.
fn big_struct(n: usize, seed: &str) -> Struct {
    let fields = (0..n)
        .map(|i| {
            let value = match i % 4 {
                0 => number(i as f64 + 0.5),
                1 => string(&format!("{seed}-{i}")),
                2 => Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: (0..5)
                            .map(|j| (format!("inner{j}"), number(j as f64)))
                            .collect(),
                    })),
                },
                _ => Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![
                            Value {
                                kind: Some(Kind::StructValue(Struct {
                                    fields: [("b", number(1.0)), ("a", string("x"))]
                                        .into_iter()
                                        .map(|(k, v)| (k.to_string(), v))
                                        .collect(),
                                })),
                            },
                            Value {
                                kind: Some(Kind::BoolValue(true)),
                            },
                        ],
                    })),
                },
            };
            (format!("key{i:02}"), value)
        })
        .collect();
    Struct { fields }
}

fn labels(n: usize) -> HashMap<String, String> {
    (0..n)
        .map(|i| (format!("l{i:02}"), format!("v{i}")))
        .collect()
}

fn figures(n: usize) -> HashMap<String, f64> {
    (0..n)
        .map(|i| (format!("f{i:02}"), i as f64 * 1.5))
        .collect()
}

/// Asserts FAILED_PRECONDITION with reason IDEMPOTENCY_KEY_REUSED, and that
/// the message shows nothing of the stored content (`secret`).
fn assert_reused(status: &Status, secret: &str) {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("the status carries ErrorInfo");
    assert_eq!(info.reason, "IDEMPOTENCY_KEY_REUSED", "{status:?}");
    assert_eq!(info.domain, "verdict.v1");
    assert!(
        !status.message().contains(secret),
        "the refusal shows stored content: {status:?}"
    );
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

fn metric_batch(batch_id: &str, n_labels: usize) -> RecordMetricPointsRequest {
    RecordMetricPointsRequest {
        batch_id: batch_id.into(),
        points: (0..3)
            .map(|i| MetricPoint {
                name: "latency".into(),
                value: i as f64,
                unit: "ms".into(),
                labels: labels(n_labels),
                recorded_at: at(i),
            })
            .collect(),
    }
}

fn execution(key: &str, n: usize) -> ExecutionInput {
    ExecutionInput {
        test_case: Some(execution_input::TestCase::TestCaseKey(key.into())),
        session_id: String::new(),
        status: ExecutionStatus::Passed as i32,
        started_at: at(10),
        duration_ms: 42,
        environment: Some(big_struct(n, "env").into()),
        error_message: String::new(),
        stack_trace: String::new(),
        screenshot_refs: vec!["a.png".into()],
        interaction_log: vec![
            big_struct(n, "step").into(),
            big_struct(n.min(3), "step2").into(),
        ],
        performance: figures(n),
        ..Default::default()
    }
}

fn discrepancy(n: usize) -> DiscrepancyInput {
    DiscrepancyInput {
        result_id: String::new(),
        kind: "precision".into(),
        severity: verdict::proto::Severity::High as i32,
        description: format!("difference {n}"),
        source_element: format!("src.f{n}"),
        target_element: format!("tgt.f{n}"),
        recommendation: "check it".into(),
        confidence: 0.75,
        fingerprint: String::new(),
    }
}

fn coverage_report(key: &str, files: &[&str]) -> RecordCoverageRequest {
    RecordCoverageRequest {
        commit_sha: "abcdef0123".into(),
        branch: "main".into(),
        subsystem: "api".into(),
        session_id: String::new(),
        client_key: key.into(),
        totals: None,
        files: files
            .iter()
            .enumerate()
            .map(|(i, p)| FileCoverage {
                path: (*p).into(),
                counters: Some(CoverageCounters {
                    lines_covered: (i % 10) as i64,
                    lines_total: 10,
                    ..Default::default()
                }),
            })
            .collect(),
        recorded_at: at(5),
        ..Default::default()
    }
}

// --- Finding 1: replays of batches with maps are recognised every time ----

#[tokio::test]
async fn metric_batches_with_1_5_and_32_labels_replay_20_times_each() {
    let app = spawn_app().await;
    let mut client = app.metrics.clone();
    // 32 is the most labels a point may carry.
    for n in [1, 5, 32] {
        let batch = metric_batch(&format!("m-{n}"), n);
        let first = client.record_metric_points(batch.clone()).await.unwrap();
        assert_eq!(first.get_ref().recorded, 3);
        assert!(!first.get_ref().replayed);
        for i in 0..REPLAYS {
            let again = client
                .record_metric_points(batch.clone())
                .await
                .unwrap_or_else(|s| panic!("replay {i} of the {n}-label batch refused: {s:?}"))
                .into_inner();
            assert_eq!((again.recorded, again.replayed), (3, true), "replay {i}");
        }
    }
    assert_eq!(count(&app, "SELECT count(*) FROM metric_points").await, 9);
}

#[tokio::test]
async fn execution_batches_with_maps_and_structs_of_1_5_and_50_entries_replay_20_times_each() {
    let app = spawn_app().await;
    crate::test_cases::create_test_case(&app, new_test_case("t-maps", TestType::Unit, "core"))
        .await;
    let mut client = app.test_cases.clone();
    for n in [1, 5, 50] {
        let batch = RecordExecutionsRequest {
            batch_id: format!("e-{n}"),
            items: (0..4).map(|_| execution("t-maps", n)).collect(),
        };
        let first = client
            .record_executions(batch.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!first.replayed);
        for i in 0..REPLAYS {
            let again = client
                .record_executions(batch.clone())
                .await
                .unwrap_or_else(|s| panic!("replay {i} of the {n}-entry batch refused: {s:?}"))
                .into_inner();
            assert!(again.replayed, "replay {i}");
            assert_eq!(again.ids, first.ids, "replay {i}");
        }
    }
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        12
    );
}

#[tokio::test]
async fn discrepancy_batches_of_1_5_and_50_items_replay_20_times_each() {
    let app = spawn_app().await;
    let session = create(&app, "d-replays").await;
    let mut client = app.discrepancies.clone();
    for n in [1, 5, 50] {
        let batch = RecordDiscrepanciesRequest {
            session_id: session.id.clone(),
            batch_id: format!("d-{n}"),
            items: (0..n).map(discrepancy).collect(),
        };
        let first = client
            .record_discrepancies(batch.clone())
            .await
            .unwrap()
            .into_inner();
        for i in 0..REPLAYS {
            let again = client
                .record_discrepancies(batch.clone())
                .await
                .unwrap_or_else(|s| panic!("replay {i} of the {n}-item batch refused: {s:?}"))
                .into_inner();
            assert!(again.replayed);
            assert_eq!(again.ids, first.ids);
        }
    }
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 56);
}

#[tokio::test]
async fn creates_with_structs_of_1_5_and_50_entries_replay_20_times_each() {
    let app = spawn_app().await;
    let mut sessions = app.sessions.clone();
    let mut results = app.results.clone();
    let mut test_cases = app.test_cases.clone();
    let mut coverage = app.coverage.clone();
    let parent = create(&app, "parent").await;
    for n in [1, 5, 50] {
        let mut s = new_session(&format!("s-{n}"));
        s.config = Some(big_struct(n, "config").into());
        s.input_refs = Some(big_struct(n, "refs").into());
        s.metadata = Some(big_struct(n, "meta").into());
        let mut r = new_result(&parent.id, &format!("r-{n}"), 0.5);
        r.source_representation = Some(big_struct(n, "src").into());
        r.target_representation = Some(big_struct(n, "tgt").into());
        let mut t = new_test_case(&format!("t-{n}"), TestType::Behavioral, "ui");
        t.required_hardware = Some(big_struct(n, "hw").into());
        let paths: Vec<String> = (0..n).map(|i| format!("src/f{i}.rs")).collect();
        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
        let c = coverage_report(&format!("c-{n}"), &paths);

        let first_s = sessions
            .create_session(s.clone())
            .await
            .unwrap()
            .into_inner();
        let first_r = results.record_result(r.clone()).await.unwrap().into_inner();
        let first_t = test_cases
            .create_test_case(t.clone())
            .await
            .unwrap()
            .into_inner();
        let first_c = coverage
            .record_coverage(c.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(first_s.created && first_r.created && first_t.created && first_c.created);
        for i in 0..REPLAYS {
            let what = format!("replay {i} with {n} entries");
            let again = sessions
                .create_session(s.clone())
                .await
                .expect(&what)
                .into_inner();
            assert_eq!(
                (again.created, &again.session),
                (false, &first_s.session),
                "{what}"
            );
            let again = results
                .record_result(r.clone())
                .await
                .expect(&what)
                .into_inner();
            assert_eq!(
                (again.created, &again.result),
                (false, &first_r.result),
                "{what}"
            );
            let again = test_cases
                .create_test_case(t.clone())
                .await
                .expect(&what)
                .into_inner();
            assert_eq!(
                (again.created, &again.test_case),
                (false, &first_t.test_case),
                "{what}"
            );
            // Files are a set: their order is not content.
            let mut shuffled = c.clone();
            shuffled.files.rotate_left(i % c.files.len());
            let again = coverage
                .record_coverage(shuffled)
                .await
                .expect(&what)
                .into_inner();
            assert_eq!(
                (again.created, &again.report),
                (false, &first_c.report),
                "{what}"
            );
        }
    }
    assert_eq!(count(&app, "SELECT count(*) FROM sessions").await, 4);
    assert_eq!(count(&app, "SELECT count(*) FROM results").await, 3);
    assert_eq!(count(&app, "SELECT count(*) FROM test_cases").await, 3);
    assert_eq!(
        count(&app, "SELECT count(*) FROM coverage_reports").await,
        3
    );
}

// --- Finding 2: one rule for a reused key, everywhere ---------------------

#[tokio::test]
async fn every_rpc_refuses_a_key_reused_for_other_content_and_keeps_what_is_stored() {
    let app = spawn_app().await;
    let session = create(&app, "reuse").await;

    // CreateSession.
    let mut s = app.sessions.clone();
    let mut other = new_session("reuse");
    other.validation_scope = "partial".into();
    assert_reused(&s.create_session(other).await.unwrap_err(), "full");
    // A Struct value differing deep inside is other content too.
    let mut other = new_session("reuse");
    other.config = Some(
        Struct {
            fields: [("threshold".to_string(), number(0.91))].into(),
        }
        .into(),
    );
    assert_reused(&s.create_session(other).await.unwrap_err(), "0.9");

    // RecordResult.
    let mut r = app.results.clone();
    r.record_result(new_result(&session.id, "res", 0.93))
        .await
        .unwrap();
    let refused = r.record_result(new_result(&session.id, "res", 0.10)).await;
    assert_reused(&refused.unwrap_err(), "0.93");

    // CreateTestCase: the key is the client key.
    let mut t = app.test_cases.clone();
    t.create_test_case(new_test_case("tc", TestType::Unit, "core"))
        .await
        .unwrap();
    let mut other = new_test_case("tc", TestType::Unit, "core");
    other.name = "another name".into();
    assert_reused(&t.create_test_case(other).await.unwrap_err(), "checks tc");

    // RecordCoverage.
    let mut c = app.coverage.clone();
    c.record_coverage(coverage_report("cov", &["a.rs", "b.rs"]))
        .await
        .unwrap();
    let refused = c.record_coverage(coverage_report("cov", &["a.rs"])).await;
    assert_reused(&refused.unwrap_err(), "b.rs");

    // RecordDiscrepancies.
    let mut d = app.discrepancies.clone();
    let batch = |items: Vec<DiscrepancyInput>| RecordDiscrepanciesRequest {
        session_id: session.id.clone(),
        batch_id: "db".into(),
        items,
    };
    d.record_discrepancies(batch(vec![discrepancy(1)]))
        .await
        .unwrap();
    let refused = d.record_discrepancies(batch(vec![discrepancy(2)])).await;
    assert_reused(&refused.unwrap_err(), "difference 1");

    // RecordExecutions: a map value changed.
    let mut e = app.test_cases.clone();
    let mut item = execution("tc", 5);
    e.record_executions(RecordExecutionsRequest {
        batch_id: "eb".into(),
        items: vec![item.clone()],
    })
    .await
    .unwrap();
    item.performance.insert("f00".into(), 99.0);
    let refused = e
        .record_executions(RecordExecutionsRequest {
            batch_id: "eb".into(),
            items: vec![item],
        })
        .await;
    assert_reused(&refused.unwrap_err(), "f00");

    // RecordMetricPoints: one label more.
    let mut m = app.metrics.clone();
    m.record_metric_points(metric_batch("mb", 5)).await.unwrap();
    let refused = m.record_metric_points(metric_batch("mb", 6)).await;
    assert_reused(&refused.unwrap_err(), "l05");

    // Nothing of the refused calls was written.
    let sql = app.sql().await;
    let row = sql
        .query_one(
            "SELECT (SELECT validation_scope FROM sessions WHERE request_id = 'reuse'), \
                    (SELECT fidelity_score FROM results), \
                    (SELECT name FROM test_cases), \
                    (SELECT file_count FROM coverage_reports), \
                    (SELECT count(*) FROM discrepancies), \
                    (SELECT count(*) FROM test_executions), \
                    (SELECT count(*) FROM metric_points)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "full");
    assert_eq!(row.get::<_, f64>(1), 0.93);
    assert_eq!(row.get::<_, String>(2), "checks tc");
    assert_eq!(row.get::<_, i32>(3), 2);
    assert_eq!(row.get::<_, i64>(4), 1);
    assert_eq!(row.get::<_, i64>(5), 1);
    assert_eq!(row.get::<_, i64>(6), 3);
}

#[tokio::test]
async fn a_write_only_key_reads_nothing_stored_through_a_replay() {
    let (app, keys) = spawn_auth_app().await;
    let (root, writer) = (&keys.all, &keys.write);
    let secret = |s: &str| Struct {
        fields: [("secret".to_string(), string(s))].into(),
    };
    let mut sessions = app.sessions.clone();
    let mut results = app.results.clone();
    let mut test_cases = app.test_cases.clone();

    // Someone with every scope stores content holding a secret.
    let mut s = new_session("owned");
    s.config = Some(secret("s3cr3t-config").into());
    let first_s = sessions
        .create_session(authed(s.clone(), root))
        .await
        .unwrap()
        .into_inner();
    let session_id = first_s.session.as_ref().unwrap().id.clone();
    let mut r = new_result(&session_id, "owned-result", 0.5);
    r.source_representation = Some(secret("s3cr3t-representation").into());
    let first_r = results
        .record_result(authed(r.clone(), root))
        .await
        .unwrap()
        .into_inner();
    let mut t = new_test_case("owned-test", TestType::Unit, "core");
    t.description = "s3cr3t-description".into();
    let first_t = test_cases
        .create_test_case(authed(t.clone(), root))
        .await
        .unwrap()
        .into_inner();

    // The write-only key cannot read them…
    let denied = sessions
        .get_session(authed(
            GetSessionRequest {
                lookup: Some(Lookup::RequestId("owned".into())),
                ..Default::default()
            },
            writer,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // …nor get them by reusing their keys with other content.
    let refused = sessions
        .create_session(authed(new_session("owned"), writer))
        .await
        .unwrap_err();
    assert_reused(&refused, "s3cr3t");
    let refused = results
        .record_result(authed(new_result(&session_id, "owned-result", 0.5), writer))
        .await
        .unwrap_err();
    assert_reused(&refused, "s3cr3t");
    let refused = test_cases
        .create_test_case(authed(
            new_test_case("owned-test", TestType::Unit, "core"),
            writer,
        ))
        .await
        .unwrap_err();
    assert_reused(&refused, "s3cr3t");

    // The objects move on after their creation.
    sessions
        .update_session_status(authed(
            verdict::proto::UpdateSessionStatusRequest {
                id: session_id.clone(),
                status: SessionStatus::Processing as i32,
                expected_version: None,
            },
            root,
        ))
        .await
        .unwrap();
    let mut changed = first_t.test_case.clone().unwrap();
    changed.description = "s3cr3t-later".into();
    test_cases
        .update_test_case(authed(
            UpdateTestCaseRequest {
                test_case: Some(changed),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["description".into()],
                }),
                expected_version: Some(1),
            },
            root,
        ))
        .await
        .unwrap();

    // A replay with the same content answers what the first call answered:
    // what the caller sent, the id and creation time — not the current state.
    let again = sessions
        .create_session(authed(s, writer))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.session, first_s.session);
    let replayed = again.session.unwrap();
    assert_eq!(
        (replayed.status, replayed.version),
        (SessionStatus::Pending as i32, 1)
    );
    let again = results
        .record_result(authed(r, writer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.created, again.result), (false, first_r.result));
    let again = test_cases
        .create_test_case(authed(t, writer))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.test_case, first_t.test_case);
    assert_eq!(again.test_case.unwrap().description, "s3cr3t-description");
}

// --- Concurrency: one outcome per key --------------------------------------

/// Runs `CLIENTS` calls at once, each on its own connection; `call(i, channel)`.
async fn race<T, F, Fut>(app: &TestApp, call: F) -> Vec<Result<T, Status>>
where
    F: Fn(usize, tonic::transport::Channel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut channels = Vec::new();
    for _ in 0..CLIENTS {
        channels.push(connect(app.port).await);
    }
    let calls = channels.into_iter().enumerate().map(|(i, ch)| call(i, ch));
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        futures::future::join_all(calls),
    )
    .await
    .expect("the racing calls finished within 60 s")
}

/// Same content: every call OK, all name one object, one created it.
/// Other content: exactly one OK, the rest IDEMPOTENCY_KEY_REUSED.
fn assert_one_winner<T>(
    what: &str,
    same: &[Result<T, Status>],
    other: &[Result<T, Status>],
    id: impl Fn(&T) -> (String, bool),
) {
    let ok: Vec<(String, bool)> = same
        .iter()
        .map(|r| id(r.as_ref().unwrap_or_else(|s| panic!("{what}: {s:?}"))))
        .collect();
    let ids: HashSet<&String> = ok.iter().map(|(i, _)| i).collect();
    assert_eq!(ids.len(), 1, "{what}: same content named {ids:?}");
    assert_eq!(ok.iter().filter(|(_, c)| *c).count(), 1, "{what}: {ok:?}");

    let winners = other.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{what}: other content");
    for r in other.iter().filter_map(|r| r.as_ref().err()) {
        assert_reused(r, "\u{0}");
    }
}

#[tokio::test]
async fn concurrent_calls_with_one_key_agree_on_one_outcome_for_every_rpc() {
    let app = spawn_app().await;
    let session = create(&app, "race-parent").await;
    crate::test_cases::create_test_case(&app, new_test_case("race-t", TestType::Unit, "core"))
        .await;
    let sid = session.id.clone();

    let session_id =
        |r: &CreateSessionResponse| (r.session.as_ref().unwrap().id.clone(), r.created);
    let same = race(&app, |_, ch| async move {
        let mut s = new_session("race-s");
        s.config = Some(big_struct(20, "c").into());
        SessionServiceClient::new(ch)
            .create_session(s)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let other = race(&app, |i, ch| async move {
        let mut s = new_session("race-s2");
        s.validation_scope = format!("scope {i}");
        SessionServiceClient::new(ch)
            .create_session(s)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    assert_one_winner("CreateSession", &same, &other, session_id);

    let result_id = |r: &RecordResultResponse| (r.result.as_ref().unwrap().id.clone(), r.created);
    let same = race(&app, |_, ch| {
        let sid = sid.clone();
        async move {
            let mut r = new_result(&sid, "race-r", 0.5);
            r.target_representation = Some(big_struct(20, "t").into());
            ResultServiceClient::new(ch)
                .record_result(r)
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    let other = race(&app, |i, ch| {
        let sid = sid.clone();
        async move {
            let r = new_result(&sid, "race-r2", i as f64 / 100.0);
            ResultServiceClient::new(ch)
                .record_result(r)
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_one_winner("RecordResult", &same, &other, result_id);

    let case_id =
        |r: &CreateTestCaseResponse| (r.test_case.as_ref().unwrap().id.clone(), r.created);
    let same = race(&app, |_, ch| async move {
        let mut t = new_test_case("race-tc", TestType::Unit, "core");
        t.required_hardware = Some(big_struct(20, "hw").into());
        TestCaseServiceClient::new(ch)
            .create_test_case(t)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let other = race(&app, |i, ch| async move {
        let mut t = new_test_case("race-tc2", TestType::Unit, "core");
        t.name = format!("name {i}");
        TestCaseServiceClient::new(ch)
            .create_test_case(t)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    assert_one_winner("CreateTestCase", &same, &other, case_id);

    let report_id = |r: &RecordCoverageResponse| (r.report.as_ref().unwrap().id.clone(), r.created);
    let same = race(&app, |_, ch| async move {
        let c = coverage_report("race-c", &["a.rs", "b.rs", "c.rs"]);
        CoverageServiceClient::new(ch)
            .record_coverage(c)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let other = race(&app, |i, ch| async move {
        let path = format!("f{i}.rs");
        let c = coverage_report("race-c2", &[path.as_str()]);
        CoverageServiceClient::new(ch)
            .record_coverage(c)
            .await
            .map(|r| r.into_inner())
    })
    .await;
    assert_one_winner("RecordCoverage", &same, &other, report_id);

    // Batches answer `replayed` instead of `created`.
    let batch_ids = |r: &RecordDiscrepanciesResponse| (r.ids.join(","), !r.replayed);
    let same = race(&app, |_, ch| {
        let sid = sid.clone();
        async move {
            DiscrepancyServiceClient::new(ch)
                .record_discrepancies(RecordDiscrepanciesRequest {
                    session_id: sid,
                    batch_id: "race-d".into(),
                    items: (0..5).map(discrepancy).collect(),
                })
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    let other = race(&app, |i, ch| {
        let sid = sid.clone();
        async move {
            DiscrepancyServiceClient::new(ch)
                .record_discrepancies(RecordDiscrepanciesRequest {
                    session_id: sid,
                    batch_id: "race-d2".into(),
                    items: vec![discrepancy(i)],
                })
                .await
                .map(|r| r.into_inner())
        }
    })
    .await;
    assert_one_winner("RecordDiscrepancies", &same, &other, batch_ids);

    let execution_ids = |r: &RecordExecutionsResponse| (r.ids.join(","), !r.replayed);
    let same = race(&app, |_, ch| async move {
        TestCaseServiceClient::new(ch)
            .record_executions(RecordExecutionsRequest {
                batch_id: "race-e".into(),
                items: (0..3).map(|_| execution("race-t", 20)).collect(),
            })
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let other = race(&app, |i, ch| async move {
        TestCaseServiceClient::new(ch)
            .record_executions(RecordExecutionsRequest {
                batch_id: "race-e2".into(),
                items: vec![execution("race-t", i + 1)],
            })
            .await
            .map(|r| r.into_inner())
    })
    .await;
    assert_one_winner("RecordExecutions", &same, &other, execution_ids);

    let recorded = |r: &RecordMetricPointsResponse| (r.recorded.to_string(), !r.replayed);
    let same = race(&app, |_, ch| async move {
        MetricsServiceClient::new(ch)
            .record_metric_points(metric_batch("race-m", 20))
            .await
            .map(|r| r.into_inner())
    })
    .await;
    let other = race(&app, |i, ch| async move {
        MetricsServiceClient::new(ch)
            .record_metric_points(metric_batch("race-m2", i + 1))
            .await
            .map(|r| r.into_inner())
    })
    .await;
    assert_one_winner("RecordMetricPoints", &same, &other, recorded);

    // One stored object or batch per key.
    let sql = "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM results) \
               + (SELECT count(*) FROM test_cases) + (SELECT count(*) FROM coverage_reports) \
               + (SELECT count(*) FROM ingest_batches)";
    // 1 parent session + 2 sessions, 2 results, 1 + 2 test cases, 2 reports, 6 batches.
    assert_eq!(count(&app, sql).await, 3 + 2 + 3 + 2 + 6);
}

// --- Rows from before V11, and replays after the session moved on ----------

#[tokio::test]
async fn replays_against_rows_from_before_v11_are_decided_on_what_the_row_still_holds() {
    let app = spawn_app().await;
    let mut sessions = app.sessions.clone();
    let mut test_cases = app.test_cases.clone();
    let mut metrics = app.metrics.clone();
    let first = sessions
        .create_session(new_session("old"))
        .await
        .unwrap()
        .into_inner();
    let kept = new_test_case("old-kept", TestType::Unit, "core");
    test_cases.create_test_case(kept.clone()).await.unwrap();
    let changed = new_test_case("old-changed", TestType::Unit, "core");
    let stored = test_cases
        .create_test_case(changed.clone())
        .await
        .unwrap()
        .into_inner();
    metrics
        .record_metric_points(metric_batch("old-batch", 2))
        .await
        .unwrap();
    // As a pre-V11 gateway left them: no digest.
    let sql = app.sql().await;
    sql.batch_execute(
        "UPDATE sessions SET content_digest = NULL; \
         UPDATE test_cases SET content_digest = NULL; \
         UPDATE ingest_batches SET content_digest = NULL;",
    )
    .await
    .unwrap();
    sql.execute(
        "UPDATE test_cases SET description = 'edited', version = 2 WHERE key = 'old-changed'",
        &[],
    )
    .await
    .unwrap();

    // Sessions never change their content: compared on the row.
    let again = sessions
        .create_session(new_session("old"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.created, again.session), (false, first.session));
    let mut other = new_session("old");
    other.target_technology = "rust".into();
    assert_reused(&sessions.create_session(other).await.unwrap_err(), "java");
    // A test case at version 1 still holds its creation content.
    assert!(
        !test_cases
            .create_test_case(kept)
            .await
            .unwrap()
            .into_inner()
            .created
    );
    // One updated since cannot be compared: refused, fail closed.
    assert_reused(
        &test_cases.create_test_case(changed).await.unwrap_err(),
        "edited",
    );
    // Nor can a batch whose digest was of the old encoding.
    assert_reused(
        &metrics
            .record_metric_points(metric_batch("old-batch", 2))
            .await
            .unwrap_err(),
        "v0",
    );
    assert!(stored.created);
}

#[tokio::test]
async fn a_replay_is_recognised_after_the_session_stopped_accepting_writes() {
    let app = spawn_app().await;
    let session = create(&app, "stopping").await;
    let result = new_result(&session.id, "late", 0.7);
    let batch = RecordDiscrepanciesRequest {
        session_id: session.id.clone(),
        batch_id: "late-batch".into(),
        items: vec![discrepancy(1)],
    };
    let first_r = app
        .results
        .clone()
        .record_result(result.clone())
        .await
        .unwrap()
        .into_inner();
    let first_d = app
        .discrepancies
        .clone()
        .record_discrepancies(batch.clone())
        .await
        .unwrap();
    set_status(&app, &session.id, SessionStatus::Cancelled)
        .await
        .unwrap();

    let again = app
        .results
        .clone()
        .record_result(result)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.created, again.result), (false, first_r.result));
    let again = app
        .discrepancies
        .clone()
        .record_discrepancies(batch)
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(again.ids, first_d.into_inner().ids);

    // A new key is still refused by the session's state.
    let refused = app
        .results
        .clone()
        .record_result(new_result(&session.id, "new", 0.7))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("cancelled"), "{refused:?}");
}

// --- Across a fault: the key ends with exactly one outcome -----------------

/// Polls (bounded) until `n` gateway backends wait on a lock.
async fn until_waiting_on_locks(sql: &tokio_postgres::Client, n: i64) {
    let wait = async {
        loop {
            let waiting: i64 = sql
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting >= n {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("{n} gateway backends did not wait on locks within 30 s"));
}

#[tokio::test]
async fn a_key_held_by_a_call_whose_backend_is_terminated_goes_to_the_waiting_replay() {
    let app = spawn_app().await;
    let batch = metric_batch("fault-b", 7);
    // Hold every write to metric_points, so the first call claims the key
    // and then waits with it uncommitted.
    let mut blocker = app.sql().await;
    let hold = blocker.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE metric_points IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let first = tokio::spawn({
        let mut client = MetricsServiceClient::new(connect(app.port).await);
        let batch = batch.clone();
        async move { client.record_metric_points(batch).await }
    });
    let observer = app.sql().await;
    until_waiting_on_locks(&observer, 1).await;
    // A second client with the same batch waits on the first one's key.
    let second = tokio::spawn({
        let mut client = MetricsServiceClient::new(connect(app.port).await);
        let batch = batch.clone();
        async move { client.record_metric_points(batch).await }
    });
    until_waiting_on_locks(&observer, 2).await;

    // The first call's backend dies with the key claimed but not committed.
    let killed: bool = observer
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'verdict' AND datname = current_database() AND query LIKE 'INSERT INTO metric_points%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let first = first.await.unwrap();
    assert!(first.is_err(), "{first:?}");
    hold.rollback().await.unwrap();

    // The waiting call takes the key and writes the batch; a retry of the
    // failed call is then a replay of it.
    let second = second
        .await
        .unwrap()
        .expect("the waiting call")
        .into_inner();
    assert_eq!((second.recorded, second.replayed), (3, false));
    let retry = app
        .metrics
        .clone()
        .record_metric_points(batch)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((retry.recorded, retry.replayed), (3, true));
    assert_eq!(count(&app, "SELECT count(*) FROM metric_points").await, 3);
    assert_eq!(count(&app, "SELECT count(*) FROM ingest_batches").await, 1);
}
