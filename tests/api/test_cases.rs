//! TestCaseService through a real client: idempotent definitions, field-mask
//! updates, the delete guard, atomic and resumable execution writes, lists,
//! statistics and flakiness.

use crate::helpers::{TestApp, spawn_app, violated_fields, violations};
use crate::sessions::create;
use prost_types::{FieldMask, Timestamp};
use std::collections::HashSet;
use tonic::Code;
use verdict::proto::{
    CreateTestCaseRequest, DeleteTestCaseRequest, ExecutionInput, ExecutionStatus,
    GetTestCaseRequest, GetTestStatisticsRequest, GetTestStatisticsResponse,
    IngestExecutionsRequest, IngestExecutionsResponse, ListExecutionsRequest, ListTestCasesRequest,
    RecordExecutionsRequest, TestCase, TestType, TimeRange, UpdateTestCaseRequest, execution_input,
    get_test_case_request::Lookup,
};

/// 2026-01-01T00:00:00Z, the start of every constructed history.
const T0: i64 = 1_767_225_600;

pub fn at(seconds_after_t0: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: T0 + seconds_after_t0,
        nanos: 0,
    })
}

pub fn new_test_case(key: &str, test_type: TestType, subsystem: &str) -> CreateTestCaseRequest {
    CreateTestCaseRequest {
        key: key.into(),
        name: format!("checks {key}"),
        description: "a test".into(),
        test_type: test_type as i32,
        target_subsystem: subsystem.into(),
        required_hardware: None,
        tags: vec!["smoke".into()],
    }
}

pub async fn create_test_case(app: &TestApp, req: CreateTestCaseRequest) -> TestCase {
    app.test_cases
        .clone()
        .create_test_case(req)
        .await
        .expect("create test case")
        .into_inner()
        .test_case
        .expect("test case")
}

/// An execution of the test case with `key`, started `second` seconds after T0.
pub fn run(key: &str, status: ExecutionStatus, second: i64, duration_ms: i64) -> ExecutionInput {
    ExecutionInput {
        test_case: Some(execution_input::TestCase::TestCaseKey(key.into())),
        session_id: String::new(),
        status: status as i32,
        started_at: at(second),
        duration_ms,
        environment: None,
        error_message: String::new(),
        stack_trace: String::new(),
        screenshot_refs: vec![],
        interaction_log: vec![],
        performance: Default::default(),
        ..Default::default()
    }
}

async fn record(
    app: &TestApp,
    batch_id: &str,
    items: Vec<ExecutionInput>,
) -> Result<Vec<String>, tonic::Status> {
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: batch_id.into(),
            items,
        })
        .await
        .map(|r| r.into_inner().ids)
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn creating_a_test_case_twice_replays_the_first_reply_found_by_id_or_key() {
    let app = spawn_app().await;
    let mut client = app.test_cases.clone();
    let mut req = new_test_case("test-001", TestType::Integration, "billing");
    req.tags = vec!["slow".into(), "smoke".into(), "slow".into()];
    let first = client.create_test_case(req).await.unwrap().into_inner();
    assert!(first.created);
    let stored = first.test_case.unwrap();
    assert_eq!(stored.tags, ["slow", "smoke"]);
    assert_eq!(stored.version, 1);

    // The same content (tags in another order) replays the first reply…
    let mut again = new_test_case("test-001", TestType::Integration, "billing");
    again.tags = vec!["smoke".into(), "slow".into()];
    let second = client.create_test_case(again).await.unwrap().into_inner();
    assert!(!second.created);
    assert_eq!(second.test_case.unwrap(), stored);
    // …other content under the key is refused.
    let mut other = new_test_case("test-001", TestType::Unit, "other");
    other.name = "something else".into();
    let refused = client.create_test_case(other).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(count(&app, "SELECT count(*) FROM test_cases").await, 1);

    for lookup in [
        Lookup::Id(stored.id.clone()),
        Lookup::Key("test-001".into()),
    ] {
        let got = client
            .get_test_case(GetTestCaseRequest {
                lookup: Some(lookup),
            })
            .await
            .unwrap()
            .into_inner()
            .test_case
            .unwrap();
        assert_eq!(got, stored);
    }
    let missing = client
        .get_test_case(GetTestCaseRequest {
            lookup: Some(Lookup::Key("nope".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let bad = client
        .create_test_case(CreateTestCaseRequest {
            key: String::new(),
            name: "x".repeat(300),
            description: String::new(),
            test_type: 99,
            target_subsystem: String::new(),
            required_hardware: None,
            tags: vec![String::new()],
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        ["key", "name", "test_type", "tags[0]"]
    );
}

#[tokio::test]
async fn test_cases_list_in_key_order_with_filters_page_by_page() {
    let app = spawn_app().await;
    for i in 0..25 {
        let (t, subsystem) = if i % 2 == 0 {
            (TestType::Unit, "billing")
        } else {
            (TestType::E2e, "search")
        };
        let mut req = new_test_case(&format!("tc-{i:03}"), t, subsystem);
        req.name = if i % 5 == 0 {
            format!("login flow {i}")
        } else {
            format!("other {i}")
        };
        if i % 3 == 0 {
            req.tags.push("nightly".into());
        }
        create_test_case(&app, req).await;
    }
    let mut client = app.test_cases.clone();
    let mut keys = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_test_cases(ListTestCasesRequest {
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.extend(page.test_cases.into_iter().map(|t| t.key));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("tc-{i:03}")).collect();
    assert_eq!(keys, expected);

    let filtered = client
        .list_test_cases(ListTestCasesRequest {
            test_types: vec![TestType::Unit as i32],
            target_subsystem: "billing".into(),
            tag: "nightly".into(),
            name_prefix: "login".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Even, multiple of 3 and of 5: 0 and 30 (out of range) → only tc-000.
    assert_eq!(filtered.test_cases.len(), 1);
    assert_eq!(filtered.test_cases[0].key, "tc-000");
    assert!(filtered.next_page_token.is_empty());

    let first = client
        .list_test_cases(ListTestCasesRequest {
            tag: "nightly".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = client
        .list_test_cases(ListTestCasesRequest {
            tag: "smoke".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);
    let err = client
        .list_test_cases(ListTestCasesRequest {
            page_size: 1001,
            test_types: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["test_types[0]", "page_size"]);
}

#[tokio::test]
async fn an_update_changes_only_the_masked_fields_and_refuses_stale_versions() {
    let app = spawn_app().await;
    let tc = create_test_case(&app, new_test_case("u-1", TestType::Unit, "billing")).await;
    let mut client = app.test_cases.clone();
    let mask = |paths: &[&str]| {
        Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let changed = TestCase {
        id: tc.id.clone(),
        key: "ignored".into(),
        name: "renamed".into(),
        description: "not in the mask".into(),
        test_type: TestType::Security as i32,
        tags: vec!["b".into(), "a".into()],
        ..Default::default()
    };
    let updated = client
        .update_test_case(UpdateTestCaseRequest {
            test_case: Some(changed.clone()),
            update_mask: mask(&["name", "test_type", "tags"]),
            expected_version: Some(1),
        })
        .await
        .unwrap()
        .into_inner()
        .test_case
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.test_type, TestType::Security as i32);
    assert_eq!(updated.tags, ["a", "b"]);
    assert_eq!(updated.description, tc.description);
    assert_eq!(updated.target_subsystem, "billing");
    assert_eq!(updated.key, "u-1");
    assert_eq!(updated.version, 2);

    let stale = client
        .update_test_case(UpdateTestCaseRequest {
            test_case: Some(changed.clone()),
            update_mask: mask(&["description"]),
            expected_version: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let unknown = client
        .update_test_case(UpdateTestCaseRequest {
            test_case: Some(changed.clone()),
            update_mask: mask(&["name", "colour", "key"]),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&unknown),
        ["update_mask.paths[1]", "update_mask.paths[2]"]
    );
    let empty = client
        .update_test_case(UpdateTestCaseRequest {
            test_case: Some(changed.clone()),
            update_mask: None,
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&empty), ["update_mask"]);
    let bad_value = client
        .update_test_case(UpdateTestCaseRequest {
            test_case: Some(TestCase {
                id: tc.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["name", "test_type"]),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&bad_value),
        ["test_case.name", "test_case.test_type"]
    );

    let stored: (String, String, i64) = {
        let row = app
            .sql()
            .await
            .query_one(
                "SELECT name, description, version FROM test_cases WHERE key = 'u-1'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(stored, ("renamed".into(), "a test".into(), 2));
}

#[tokio::test]
async fn a_test_case_with_executions_is_deleted_only_with_force() {
    let app = spawn_app().await;
    let tc = create_test_case(&app, new_test_case("d-1", TestType::Unit, "")).await;
    let empty = create_test_case(&app, new_test_case("d-2", TestType::Unit, "")).await;
    record(
        &app,
        "b",
        (0..3)
            .map(|i| run("d-1", ExecutionStatus::Passed, i, 5))
            .collect(),
    )
    .await
    .unwrap();
    let mut client = app.test_cases.clone();
    let delete = |id: &str, force| DeleteTestCaseRequest {
        id: id.into(),
        force,
        expected_version: None,
    };

    let refused = client
        .delete_test_case(delete(&tc.id, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("force"), "{refused:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM test_executions").await, 3);

    let none = client
        .delete_test_case(delete(&empty.id, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.deleted_executions, 0);

    let forced = client
        .delete_test_case(delete(&tc.id, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(forced.deleted_executions, 3);
    assert_eq!(count(&app, "SELECT count(*) FROM test_executions").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM test_cases").await, 0);
    let gone = client
        .delete_test_case(delete(&tc.id, true))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn an_execution_batch_is_stored_whole_or_not_at_all_and_replays_answer_the_same() {
    let app = spawn_app().await;
    let tc = create_test_case(&app, new_test_case("b-1", TestType::Unit, "")).await;
    let session = create(&app, "s").await;
    let mut items: Vec<_> = (0..100)
        .map(|i| run("b-1", ExecutionStatus::Passed, i, 10))
        .collect();
    items[10].test_case = Some(execution_input::TestCase::TestCaseId(tc.id.clone()));
    items[11].session_id = session.id.clone();
    items[12].performance.insert("p99_ms".into(), 12.5);
    items[12].screenshot_refs = vec!["s3://shots/1.png".into()];

    let mut bad = items.clone();
    bad[42].status = 0;
    bad[77].duration_ms = -1;
    bad[78].started_at = None;
    let err = record(&app, "batch-1", bad).await.unwrap_err();
    assert_eq!(
        violated_fields(&err),
        [
            "items[42].status",
            "items[77].duration_ms",
            "items[78].started_at"
        ]
    );
    let mut unknown = items.clone();
    unknown[55].test_case = Some(execution_input::TestCase::TestCaseKey("nope".into()));
    let err = record(&app, "batch-1", unknown).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["items[55].test_case_key"]);
    let mut nan = items.clone();
    nan[3].performance.insert("rate".into(), f64::NAN);
    let err = record(&app, "batch-1", nan).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["items[3].performance[\"rate\"]"]);
    assert_eq!(count(&app, "SELECT count(*) FROM test_executions").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM ingest_batches").await, 0);

    let ids = record(&app, "batch-1", items.clone()).await.unwrap();
    assert_eq!(ids.len(), 100);
    let replay = app
        .test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "batch-1".into(),
            items: items.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);
    assert_eq!(replay.ids, ids);
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        100
    );
    let reused = record(&app, "batch-1", items[..5].to_vec())
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);

    let stored = app
        .sql()
        .await
        .query_one(
            "SELECT performance->>'p99_ms', screenshot_refs[1] FROM test_executions \
             WHERE id = $1::text::uuid",
            &[&ids[12]],
        )
        .await
        .unwrap();
    assert_eq!(stored.get::<_, String>(0), "12.5");
    assert_eq!(stored.get::<_, String>(1), "s3://shots/1.png");
}

fn chunk(ingest_id: &str, sequence: i64, size: usize) -> IngestExecutionsRequest {
    IngestExecutionsRequest {
        ingest_id: ingest_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut e = run(
                    &format!("s-{}", i % 4),
                    ExecutionStatus::Passed,
                    sequence * 10_000 + i as i64,
                    3,
                );
                e.error_message = format!("chunk {sequence} item {i}");
                e
            })
            .collect(),
    }
}

async fn ingest(
    app: &TestApp,
    chunks: Vec<IngestExecutionsRequest>,
) -> Result<IngestExecutionsResponse, tonic::Status> {
    app.test_cases
        .clone()
        .ingest_executions(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn an_execution_stream_broken_mid_way_resumes_storing_every_execution_once() {
    let app = spawn_app().await;
    for i in 0..4 {
        create_test_case(&app, new_test_case(&format!("s-{i}"), TestType::Unit, "")).await;
    }
    let all: Vec<_> = (1..=6).map(|seq| chunk("ing-1", seq, 5000)).collect();

    // Chunks 1-2 are committed while the stream is open (the test waits for
    // it); chunk 3 is still buffered when the stream breaks (a sequence going
    // backwards) and is rolled back.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for c in all[..2].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.test_cases.clone();
    let call = tokio::spawn(async move {
        client
            .ingest_executions(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    crate::helpers::until_ingest_committed(&app, 2).await;
    tx.send(all[2].clone()).await.unwrap();
    tx.send(chunk("ing-1", 2, 1)).await.unwrap();
    drop(tx);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        10_000
    );
    assert_eq!(
        count(&app, "SELECT high_water_mark FROM ingest_marks").await,
        2
    );

    let reply = ingest(&app, all).await.unwrap();
    assert_eq!(reply.skipped_chunks, 2);
    assert_eq!(reply.committed_chunks, 4);
    assert_eq!(reply.committed_items, 20_000);
    assert_eq!(reply.high_water_mark, 6);
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        30_000
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(DISTINCT error_message) FROM test_executions"
        )
        .await,
        30_000
    );

    // A bad item and an unknown test case name their chunk.
    let mut bad = chunk("ing-2", 1, 10);
    bad.items[4].status = 0;
    let v = violations(&ingest(&app, vec![bad]).await.unwrap_err());
    assert_eq!(v[0].0, "items[4].status");
    assert!(v[0].1.contains("chunk 1"), "{v:?}");
    let mut unknown = chunk("ing-3", 7, 10);
    unknown.items[2].test_case = Some(execution_input::TestCase::TestCaseKey("nope".into()));
    let v = violations(&ingest(&app, vec![unknown]).await.unwrap_err());
    assert_eq!(v[0].0, "items[2].test_case_key");
    assert!(v[0].1.contains("chunk 7"), "{v:?}");
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        30_000
    );
}

#[tokio::test]
async fn executions_list_newest_first_by_test_case_session_status_and_time() {
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("l-1", TestType::Unit, "")).await;
    create_test_case(&app, new_test_case("l-2", TestType::Unit, "")).await;
    let s = create(&app, "s").await;
    let statuses = [
        ExecutionStatus::Passed,
        ExecutionStatus::Failed,
        ExecutionStatus::Skipped,
    ];
    let items: Vec<_> = (0..60)
        .map(|i| {
            let mut e = run(
                if i % 2 == 0 { "l-1" } else { "l-2" },
                statuses[i as usize % 3],
                i * 60,
                1,
            );
            if i % 4 == 0 {
                e.session_id = s.id.clone();
            }
            e
        })
        .collect();
    record(&app, "b", items).await.unwrap();
    let mut client = app.test_cases.clone();

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_executions(ListExecutionsRequest {
                test_case_key: "l-1".into(),
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.executions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let starts: Vec<i64> = seen
        .iter()
        .map(|e| e.started_at.unwrap().seconds - T0)
        .collect();
    let expected: Vec<i64> = (0..60)
        .rev()
        .filter(|i| i % 2 == 0)
        .map(|i| i * 60)
        .collect();
    assert_eq!(starts, expected);
    assert!(seen.iter().all(|e| e.test_case_key == "l-1"));

    let filtered = client
        .list_executions(ListExecutionsRequest {
            session_id: s.id.clone(),
            statuses: vec![
                ExecutionStatus::Passed as i32,
                ExecutionStatus::Failed as i32,
            ],
            started: Some(TimeRange {
                start_time: at(600),
                end_time: at(3000),
            }),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<i64> = filtered
        .executions
        .iter()
        .map(|e| e.started_at.unwrap().seconds - T0)
        .collect();
    let expected: Vec<i64> = (10..50)
        .rev()
        .filter(|i| i % 4 == 0 && i % 3 != 2)
        .map(|i| i * 60)
        .collect();
    assert_eq!(got, expected);
    assert!(filtered.executions.iter().all(|e| e.session_id == s.id));

    let missing = client
        .list_executions(ListExecutionsRequest {
            test_case_key: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let both = client
        .list_executions(ListExecutionsRequest {
            test_case_key: "l-1".into(),
            test_case_id: uuid::Uuid::nil().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&both), ["test_case_key"]);
}

async fn statistics(app: &TestApp, req: GetTestStatisticsRequest) -> GetTestStatisticsResponse {
    app.test_cases
        .clone()
        .get_test_statistics(req)
        .await
        .expect("statistics")
        .into_inner()
}

#[tokio::test]
async fn flakiness_ranks_tests_by_pass_fail_flips_over_their_last_executions() {
    use ExecutionStatus::{Error, Failed as F, Passed as P, Skipped};
    let app = spawn_app().await;
    let histories: [(&str, Vec<ExecutionStatus>); 4] = [
        // 5 flips in 6 runs.
        ("flaky-a", vec![P, F, P, F, P, F]),
        // Skipped and error runs do not count: P P F F P P, 2 flips.
        ("flaky-b", vec![P, P, Skipped, F, F, Error, P, P]),
        ("stable-c", vec![P, P, P, P, P]),
        // 3 flips, all older than its last 6 passed/failed runs.
        ("flaky-d", vec![F, P, F, P, P, P, P, P, P, P]),
    ];
    let mut items = Vec::new();
    for (key, history) in &histories {
        create_test_case(&app, new_test_case(key, TestType::Unit, "ui")).await;
        for (i, status) in history.iter().enumerate() {
            items.push(run(key, *status, i as i64 * 3600, 100));
        }
    }
    // Recorded newest first, so the order of rows is not the order of runs.
    items.reverse();
    record(&app, "history", items).await.unwrap();

    let ranked = |s: &GetTestStatisticsResponse| {
        s.flaky_tests
            .iter()
            .map(|f| (f.test_case_key.clone(), f.flips, f.executions_considered))
            .collect::<Vec<_>>()
    };
    let last_six = statistics(
        &app,
        GetTestStatisticsRequest {
            flakiness_window: 6,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ranked(&last_six),
        [("flaky-a".into(), 5, 6), ("flaky-b".into(), 2, 6)]
    );
    assert_eq!(last_six.flaky_test_count, 2);
    assert_eq!(last_six.flaky_tests[0].flip_rate, 1.0);

    let last_ten = statistics(
        &app,
        GetTestStatisticsRequest {
            flakiness_window: 10,
            top_flaky: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        ranked(&last_ten),
        [("flaky-a".into(), 5, 6), ("flaky-d".into(), 3, 10)]
    );
    assert_eq!(last_ten.flaky_test_count, 3);

    // Scoped to one test case, by key.
    let one = statistics(
        &app,
        GetTestStatisticsRequest {
            test_case_key: "flaky-b".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ranked(&one), [("flaky-b".into(), 2, 6)]);
    assert_eq!(one.total_executions, 8);

    let err = app
        .test_cases
        .clone()
        .get_test_statistics(GetTestStatisticsRequest {
            test_case_key: "flaky-a".into(),
            target_subsystem: "ui".into(),
            flakiness_window: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["target_subsystem", "flakiness_window"]
    );
}

#[tokio::test]
async fn statistics_match_percentiles_and_pass_rates_computed_in_sql() {
    use ExecutionStatus::{Error, Failed, Passed, Skipped};
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("api-1", TestType::Integration, "api")).await;
    create_test_case(&app, new_test_case("api-2", TestType::Integration, "api")).await;
    create_test_case(&app, new_test_case("ui-1", TestType::E2e, "ui")).await;
    // api: durations 10..=100 over passed/failed/error runs, plus skipped ones
    // with huge durations that must not count; ui: other figures.
    let mut items = Vec::new();
    for i in 1..=10 {
        let status = [Passed, Passed, Failed, Passed, Error][i as usize % 5];
        let key = if i % 2 == 0 { "api-1" } else { "api-2" };
        items.push(run(key, status, i * 60, i * 10));
    }
    items.push(run("api-1", Skipped, 700, 1_000_000));
    items.push(run("api-2", Skipped, 800, 1_000_000));
    for i in 0..7 {
        items.push(run(
            "ui-1",
            if i < 6 { Passed } else { Failed },
            5000 + i,
            7 + i * 3,
        ));
    }
    record(&app, "stats", items).await.unwrap();

    let api = statistics(
        &app,
        GetTestStatisticsRequest {
            target_subsystem: "api".into(),
            ..Default::default()
        },
    )
    .await;
    // Hand-computed: 10 durations 10..100; percentile_cont interpolates
    // p50 at 4.5 → 55, p95 at 8.55 → 95.5. Statuses of i = 1..10 by i % 5:
    // passed for 0, 1, 3 (6 runs), failed for 2 (2), error for 4 (2).
    assert_eq!(api.total_executions, 12);
    assert_eq!(api.duration_p50_ms, Some(55.0));
    assert!(
        (api.duration_p95_ms.unwrap() - 95.5).abs() < 1e-9,
        "{api:?}"
    );
    assert_eq!(api.pass_rate, Some(0.6));
    let counts: Vec<(i32, i64)> = api.by_status.iter().map(|c| (c.status, c.count)).collect();
    assert_eq!(
        counts,
        [
            (Passed as i32, 6),
            (Failed as i32, 2),
            (Skipped as i32, 2),
            (Error as i32, 2)
        ]
    );

    // Everything, over a window, against the same figures computed in SQL.
    let window = TimeRange {
        start_time: at(300),
        end_time: at(5004),
    };
    let all = statistics(
        &app,
        GetTestStatisticsRequest {
            window: Some(window),
            ..Default::default()
        },
    )
    .await;
    let row = app
        .sql()
        .await
        .query_one(
            "SELECT count(*), \
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) \
                        FILTER (WHERE status <> 'skipped'), \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) \
                        FILTER (WHERE status <> 'skipped'), \
                    (count(*) FILTER (WHERE status = 'passed'))::float8 \
                        / count(*) FILTER (WHERE status <> 'skipped') \
             FROM test_executions \
             WHERE started_at >= to_timestamp($1) AND started_at < to_timestamp($2)",
            &[&((T0 + 300) as f64), &((T0 + 5004) as f64)],
        )
        .await
        .unwrap();
    assert_eq!(all.total_executions, row.get::<_, i64>(0));
    assert_eq!(all.duration_p50_ms, row.get::<_, Option<f64>>(1));
    assert_eq!(all.duration_p95_ms, row.get::<_, Option<f64>>(2));
    let expected_rate: f64 = row.get(3);
    assert!((all.pass_rate.unwrap() - expected_rate).abs() < 1e-12);
    // In the window, api-2 went passed (i = 5) → failed (i = 7), the error
    // (i = 9) does not count; the ui failure (second 5006) is outside it.
    assert_eq!(all.flaky_test_count, 1);
    assert_eq!(all.flaky_tests[0].test_case_key, "api-2");
    assert_eq!(all.flaky_tests[0].flips, 1);

    let nothing = statistics(
        &app,
        GetTestStatisticsRequest {
            target_subsystem: "none".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(nothing.total_executions, 0);
    assert_eq!(nothing.pass_rate, None);
    assert_eq!(nothing.duration_p50_ms, None);
}

#[tokio::test]
async fn deleting_a_session_removes_its_executions_but_not_the_others() {
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("x-1", TestType::Unit, "")).await;
    let s = create(&app, "s").await;
    let mut items: Vec<_> = (0..10)
        .map(|i| run("x-1", ExecutionStatus::Passed, i, 1))
        .collect();
    for e in &mut items[..4] {
        e.session_id = s.id.clone();
    }
    record(&app, "b", items).await.unwrap();
    app.sessions
        .clone()
        .delete_session(verdict::proto::DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap();
    assert_eq!(count(&app, "SELECT count(*) FROM test_executions").await, 6);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM test_executions WHERE session_id IS NOT NULL"
        )
        .await,
        0
    );
    let ids: HashSet<String> = app
        .test_cases
        .clone()
        .list_executions(ListExecutionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .executions
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 6);
}

/// Every execution of the default project in the FULL view, 7 a page,
/// retrying a page refused while the gateway's backends are being
/// terminated.
async fn walk_executions(app: &TestApp) -> Vec<verdict::proto::Execution> {
    crate::helpers::walk_pages(|page_token| {
        let mut client = app.test_cases.clone();
        async move {
            let page = client
                .list_executions(ListExecutionsRequest {
                    page_size: 7,
                    page_token,
                    view: verdict::proto::ExecutionView::Full as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((page.executions, page.next_page_token))
        }
    })
    .await
}

#[tokio::test]
async fn concurrent_execution_pagers_across_terminated_backends_see_every_execution_once_as_stored()
{
    // Executions written from their rows: several pagers walk the list
    // while a writer records newer executions and every gateway backend is
    // terminated after each batch. Each walk returns every earlier
    // execution exactly once, newest first, each exactly as stored.
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("paged", TestType::Unit, "core")).await;
    let item = |second: i64| {
        let mut e = run("paged", ExecutionStatus::Failed, second, 5);
        e.error_message = format!("failed at step {}", second % 3);
        e.environment = Some(verdict::convert::json_to_struct(
            &serde_json::json!({"os": "linux", "n": second}),
        ));
        e.performance = [("p50".to_string(), second as f64)].into_iter().collect();
        e
    };
    record(&app, "early", (0..40).map(item).collect())
        .await
        .unwrap();
    let before = walk_executions(&app).await;
    assert_eq!(before.len(), 40);
    let sql = app.sql().await;
    let writer = async {
        for b in 0..12i64 {
            // A batch id makes a retried batch store once.
            while let Err(e) = record(&app, &format!("late-{b}"), vec![item(100 + b)]).await {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            }
            crate::helpers::terminate_gateway_backends(&sql).await;
        }
    };
    let pagers = (0..3).map(|_| walk_executions(&app));
    let ((), walks) = tokio::join!(writer, futures::future::join_all(pagers));

    let after = walk_executions(&app).await;
    assert_eq!(after.len(), 52);
    assert_eq!(&after[12..], &before[..], "the earlier ones, as they were");
    let stored: std::collections::HashMap<&str, &verdict::proto::Execution> =
        after.iter().map(|e| (e.id.as_str(), e)).collect();
    let position: std::collections::HashMap<&str, usize> = after
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    for walk in &walks {
        let ids: HashSet<&str> = walk.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), walk.len(), "no execution twice");
        assert!(
            before.iter().all(|e| ids.contains(e.id.as_str())),
            "every earlier execution"
        );
        assert!(
            walk.windows(2)
                .all(|w| position[w[0].id.as_str()] < position[w[1].id.as_str()]),
            "newest first"
        );
        for e in walk {
            assert_eq!(e, stored[e.id.as_str()], "as stored");
        }
    }
}
