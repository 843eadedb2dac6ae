//! Test runs: created idempotently per project, listed with every filter
//! (labels included), finished once, isolated between projects.

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::test_cases::new_test_case;
use futures::StreamExt;
use std::collections::HashMap;
use tonic::Code;
use tonic::transport::Channel;
use verdict::proto::get_test_run_request::Lookup;
use verdict::proto::test_run_service_client::TestRunServiceClient;
use verdict::proto::{
    CreateTestRunRequest, ExecutionStatus, FinishTestRunRequest, GetTestRunRequest,
    ListExecutionsRequest, ListTestRunsRequest, RecordExecutionsRequest, TestRunStatus, TestType,
};

fn runs(app: &TestApp) -> TestRunServiceClient<Channel> {
    TestRunServiceClient::new(app.channel.clone())
}

pub fn new_run(key: &str, branch: &str, labels: &[(&str, &str)]) -> CreateTestRunRequest {
    CreateTestRunRequest {
        client_key: key.into(),
        name: "ci".into(),
        build_number: "4711".into(),
        build_url: "https://ci.example/4711".into(),
        commit_sha: "abc123".into(),
        branch: branch.into(),
        pull_request: 0,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        started_at: None,
    }
}

async fn list_all(
    client: &mut TestRunServiceClient<Channel>,
    project: &str,
    mut request: ListTestRunsRequest,
) -> Vec<String> {
    let mut keys = Vec::new();
    loop {
        let page = client
            .list_test_runs(in_project(request.clone(), project))
            .await
            .unwrap()
            .into_inner();
        keys.extend(page.runs.into_iter().map(|r| r.client_key));
        if page.next_page_token.is_empty() {
            return keys;
        }
        request.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn a_run_is_created_once_per_client_key_and_project_and_replays_as_created() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let mut r = runs(&app);
    let first = r
        .create_test_run(in_project(
            new_run("build-1", "main", &[("os", "linux")]),
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let run = first.run.unwrap();
    assert_eq!(run.status, TestRunStatus::Running as i32);
    assert_eq!(run.labels.get("os").map(String::as_str), Some("linux"));
    // The same key and content: the run as created.
    let again = r
        .create_test_run(in_project(
            new_run("build-1", "main", &[("os", "linux")]),
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.run.unwrap().id, run.id);
    // Other content: refused, and nothing of the stored run is shown.
    let err = r
        .create_test_run(in_project(new_run("build-1", "dev", &[]), "team-a"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    assert!(!err.message().contains("main"), "{err:?}");
    // The same key in another project is another run.
    let other = r
        .create_test_run(in_project(new_run("build-1", "dev", &[]), "team-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(other.created);
    let other_id = other.run.unwrap().id;
    assert_ne!(other_id, run.id);
    // Each project reads its own; B's id from A is NOT_FOUND.
    let got = r
        .get_test_run(in_project(
            GetTestRunRequest {
                lookup: Some(Lookup::ClientKey("build-1".into())),
            },
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(
        (got.id.as_str(), got.branch.as_str()),
        (other_id.as_str(), "dev")
    );
    let err = r
        .get_test_run(in_project(
            GetTestRunRequest {
                lookup: Some(Lookup::Id(other_id.clone())),
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let err = r
        .finish_test_run(in_project(
            FinishTestRunRequest {
                id: other_id,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // Eight concurrent creates of one new key: one run.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut r = r.clone();
        tasks.spawn(async move {
            r.create_test_run(in_project(new_run("build-2", "main", &[]), "team-a"))
                .await
                .unwrap()
                .into_inner()
        });
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    while let Some(done) = tasks.join_next().await {
        let reply = done.unwrap();
        created += usize::from(reply.created);
        ids.insert(reply.run.unwrap().id);
    }
    assert_eq!((created, ids.len()), (1, 1));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn runs_are_listed_newest_first_with_every_filter_and_labels() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let mut r = runs(&app);
    let start = chrono::Utc::now() - chrono::Duration::hours(10);
    for n in 0..6 {
        let mut run = new_run(
            &format!("run-{n}"),
            if n % 2 == 0 { "main" } else { "dev" },
            &[("os", if n < 3 { "linux" } else { "mac" })],
        );
        if n == 5 {
            run.labels.insert("nightly".into(), "yes".into());
        }
        run.started_at = Some(verdict::convert::timestamp(
            start + chrono::Duration::hours(n),
        ));
        r.create_test_run(in_project(run.clone(), "team-a"))
            .await
            .unwrap();
        // The same runs in B must never show in A's lists.
        r.create_test_run(in_project(run, "team-b")).await.unwrap();
    }
    let all = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            page_size: 4,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all, ["run-5", "run-4", "run-3", "run-2", "run-1", "run-0"]);
    let main = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            branch: "main".into(),
            page_size: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(main, ["run-4", "run-2", "run-0"]);
    let linux = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            labels: HashMap::from([("os".to_string(), "linux".to_string())]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(linux, ["run-2", "run-1", "run-0"]);
    let nightly = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            label_keys: vec!["nightly".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(nightly, ["run-5"]);
    let mac_main = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            branch: "main".into(),
            labels: HashMap::from([("os".to_string(), "mac".to_string())]),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(mac_main, ["run-4"]);
    let window = list_all(
        &mut r,
        "team-a",
        ListTestRunsRequest {
            started: Some(verdict::proto::TimeRange {
                start_time: Some(verdict::convert::timestamp(
                    start + chrono::Duration::hours(1),
                )),
                end_time: Some(verdict::convert::timestamp(
                    start + chrono::Duration::hours(3),
                )),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(window, ["run-2", "run-1"]);
    // Stored rows agree.
    let stored: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM test_runs r JOIN projects p ON p.id = r.project_id \
             WHERE p.slug = 'team-a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 6);
    // A token is bound to its filters.
    let page = r
        .list_test_runs(in_project(
            ListTestRunsRequest {
                branch: "main".into(),
                page_size: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let err = r
        .list_test_runs(in_project(
            ListTestRunsRequest {
                branch: "dev".into(),
                page_size: 1,
                page_token: page.next_page_token,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_runs_get_field_violations_and_store_nothing() {
    let app = spawn_app().await;
    let mut r = runs(&app);
    let mut bad = new_run("", "main", &[("", "x")]);
    bad.pull_request = -1;
    bad.build_url = "u".repeat(2001);
    for n in 0..40 {
        bad.labels.insert(format!("k{n}"), "v".into());
    }
    let err = r.create_test_run(bad).await.unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
    let fields = violated_fields(&err);
    for field in ["client_key", "pull_request", "build_url", "labels"] {
        assert!(fields.iter().any(|f| f == field), "{field} in {fields:?}");
    }
    let err = r
        .list_test_runs(ListTestRunsRequest {
            statuses: vec![99],
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["statuses[0]", "page_size"]);
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM test_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_run_finishes_once_and_an_empty_run_derives_passed() {
    let app = spawn_app().await;
    let mut r = runs(&app);
    let run = r
        .create_test_run(new_run("fin-1", "main", &[]))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let err = r
        .finish_test_run(FinishTestRunRequest {
            id: run.id.clone(),
            status: TestRunStatus::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["status"]);
    let err = r
        .finish_test_run(FinishTestRunRequest {
            id: run.id.clone(),
            expected_version: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Aborted, "VERSION_MISMATCH");
    // Concurrent finishes: exactly one wins, the others are told why.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut r = r.clone();
        let id = run.id.clone();
        tasks.spawn(async move {
            r.finish_test_run(FinishTestRunRequest {
                id,
                ..Default::default()
            })
            .await
        });
    }
    let mut won = 0;
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            Ok(reply) => {
                won += 1;
                let finished = reply.into_inner().run.unwrap();
                assert_eq!(finished.status, TestRunStatus::Passed as i32);
                assert!(finished.finished_at.is_some());
                assert_eq!(finished.counts.unwrap().tests, 0);
            }
            Err(err) => assert_reason(&err, Code::FailedPrecondition, "ILLEGAL_STATUS_TRANSITION"),
        }
    }
    assert_eq!(won, 1);
    app.stop().await.unwrap();
}

/// How many attempts test `i` has: 1, 3, 5 or 7 (4 on average).
fn attempts(i: usize) -> usize {
    1 + (i % 4) * 2
}

/// The outcome of attempt `attempt` (1-based) of test `i`: the last one
/// decides, earlier ones fail for every third test (so those that end
/// passed "passed on retry").
fn outcome(i: usize, attempt: usize) -> ExecutionStatus {
    let attempts = attempts(i);
    if attempt < attempts {
        return if i.is_multiple_of(3) {
            ExecutionStatus::Failed
        } else {
            ExecutionStatus::Passed
        };
    }
    match i % 10 {
        0 => ExecutionStatus::Failed,
        1 => ExecutionStatus::Error,
        2 => ExecutionStatus::Skipped,
        _ => ExecutionStatus::Passed,
    }
}

#[tokio::test]
async fn a_run_of_twenty_thousand_executions_in_retried_batches_counts_the_last_attempt() {
    const TESTS: usize = 5_000;
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    let mut r = runs(&app);
    // Keys reused in `default`, with a run of the same client key there:
    // nothing of it may show in team-a's counts.
    let run = r
        .create_test_run(in_project(new_run("big-run", "main", &[]), "team-a"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let other = r
        .create_test_run(new_run("big-run", "main", &[]))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    futures::stream::iter(0..TESTS)
        .for_each_concurrent(16, |i| {
            let app = &app;
            async move {
                let request = new_test_case(&format!("t-{i}"), TestType::Unit, "core");
                let mut tc = app.test_cases.clone();
                tc.create_test_case(in_project(request.clone(), "team-a"))
                    .await
                    .unwrap();
                if i < 10 {
                    tc.create_test_case(request).await.unwrap();
                }
            }
        })
        .await;
    // Every attempt of every test: 20,000 executions.
    let mut items = Vec::new();
    let mut expected = verdict::proto::TestRunCounts::default();
    for i in 0..TESTS {
        let attempts = attempts(i);
        let mut ever_failed = false;
        for attempt in 1..=attempts {
            let status = outcome(i, attempt);
            ever_failed |= matches!(status, ExecutionStatus::Failed | ExecutionStatus::Error)
                && attempt < attempts;
            let mut e = crate::test_cases::run(&format!("t-{i}"), status, attempt as i64, 10);
            e.run_id = run.id.clone();
            e.attempt = attempt as i32;
            items.push(e);
            expected.executions += 1;
            expected.total_duration_ms += 10;
        }
        expected.tests += 1;
        match outcome(i, attempts) {
            ExecutionStatus::Passed => {
                expected.passed += 1;
                expected.passed_on_retry += i64::from(ever_failed);
            }
            ExecutionStatus::Failed => expected.failed += 1,
            ExecutionStatus::Error => expected.errored += 1,
            _ => expected.skipped += 1,
        }
    }
    assert_eq!(items.len(), 20_000);
    expected.pass_rate =
        expected.passed as f64 / (expected.passed + expected.failed + expected.errored) as f64;
    // Batches of 2,500, sent by 4 clients at once, each batch sent twice
    // (a client retrying after a lost reply): stored once.
    let batches: Vec<_> = items.chunks(2_500).map(<[_]>::to_vec).collect();
    futures::stream::iter(batches.into_iter().enumerate())
        .for_each_concurrent(4, |(n, batch)| {
            let app = &app;
            async move {
                let request = RecordExecutionsRequest {
                    batch_id: format!("big-{n}"),
                    items: batch,
                };
                let mut tc = app.test_cases.clone();
                let first = tc
                    .record_executions(in_project(request.clone(), "team-a"))
                    .await
                    .unwrap()
                    .into_inner();
                let again = tc
                    .record_executions(in_project(request, "team-a"))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(again.replayed);
                assert_eq!(first.ids, again.ids);
            }
        })
        .await;
    // One execution in default's run of the same key: not in team-a's counts.
    let mut stray = crate::test_cases::run("t-1", ExecutionStatus::Failed, 1, 10);
    stray.run_id = other.id.clone();
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "stray".into(),
            items: vec![stray],
        })
        .await
        .unwrap();

    let got = r
        .get_test_run(in_project(
            GetTestRunRequest {
                lookup: Some(Lookup::Id(run.id.clone())),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .counts
        .unwrap();
    assert_eq!(got, expected);
    // Direct SQL agrees on what is stored.
    let run_id: uuid::Uuid = run.id.parse().unwrap();
    let row = app
        .sql()
        .await
        .query_one(
            "SELECT count(*), count(DISTINCT test_case_id) FROM test_executions WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (20_000, TESTS as i64)
    );
    // The run's executions are listed by run, with their attempts.
    let page = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                run_id: run.id.clone(),
                test_case_key: "t-6".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<i32> = page.executions.iter().map(|e| e.attempt).collect();
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    assert!(page.executions.iter().all(|e| e.run_id == run.id));

    // Finishing derives FAILED (some last attempts failed); a finished run
    // takes no more executions.
    let finished = r
        .finish_test_run(in_project(
            FinishTestRunRequest {
                id: run.id.clone(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(finished.status, TestRunStatus::Failed as i32);
    let mut late = crate::test_cases::run("t-1", ExecutionStatus::Passed, 9, 10);
    late.run_id = run.id.clone();
    late.attempt = 8;
    let err = app
        .test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: "late".into(),
                items: vec![late.clone()],
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "FAILED_PRECONDITION");
    // A run of another project is not found for an execution.
    let err = app
        .test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "cross".into(),
            items: vec![late],
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&err), ["items[0].run_id"]);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn compare_test_runs_sorts_every_test_case_by_its_last_attempts() {
    use verdict::proto::CompareTestRunsRequest;
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    let mut r = runs(&app);
    let mut tc = app.test_cases.clone();
    for i in 0..9 {
        tc.create_test_case(in_project(
            new_test_case(&format!("c-{i}"), TestType::Unit, "core"),
            "team-a",
        ))
        .await
        .unwrap();
    }
    let mut ids = Vec::new();
    for key in ["base", "head"] {
        let run = r
            .create_test_run(in_project(new_run(key, "main", &[]), "team-a"))
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        ids.push(run.id);
    }
    let (base, head) = (ids[0].clone(), ids[1].clone());
    use ExecutionStatus::{Error, Failed, Passed};
    // (test, run, attempt, status, duration)
    let plan: &[(usize, &str, i32, ExecutionStatus, i64)] = &[
        (0, &base, 1, Passed, 100),
        (0, &head, 1, Passed, 100),
        (1, &base, 1, Passed, 100),
        (1, &head, 1, Failed, 100),
        (2, &base, 1, Failed, 100),
        (2, &head, 1, Failed, 100),
        (2, &head, 2, Passed, 100),
        (3, &base, 1, Error, 100),
        (3, &head, 1, Failed, 100),
        (4, &head, 1, Passed, 100),
        (5, &head, 1, Failed, 100),
        (6, &base, 1, Passed, 100),
        (7, &base, 1, Passed, 100),
        (7, &head, 1, Passed, 5_000),
        (8, &base, 1, Failed, 100),
        (8, &base, 2, Passed, 100),
        (8, &head, 1, Passed, 100),
    ];
    let items = plan
        .iter()
        .map(|(i, run, attempt, status, ms)| {
            let mut e =
                crate::test_cases::run(&format!("c-{i}"), *status, i64::from(*attempt), *ms);
            e.run_id = run.to_string();
            e.attempt = *attempt;
            e
        })
        .collect();
    tc.record_executions(in_project(
        RecordExecutionsRequest {
            batch_id: "compare".into(),
            items,
        },
        "team-a",
    ))
    .await
    .unwrap();
    let compare = |max_items: i32| CompareTestRunsRequest {
        base_run_id: base.clone(),
        head_run_id: head.clone(),
        min_duration_change_ms: 0,
        max_items,
    };
    let got = r
        .compare_test_runs(in_project(compare(0), "team-a"))
        .await
        .unwrap()
        .into_inner();
    let keys = |list: &[verdict::proto::ComparedTest]| -> Vec<String> {
        list.iter().map(|t| t.test_case_key.clone()).collect()
    };
    assert_eq!(keys(&got.new_failures), ["c-1", "c-5"]);
    assert_eq!(keys(&got.fixed), ["c-2"]);
    assert_eq!(keys(&got.still_failing), ["c-3"]);
    assert_eq!(keys(&got.new_tests), ["c-4", "c-5"]);
    assert_eq!(keys(&got.removed_tests), ["c-6"]);
    assert_eq!(keys(&got.duration_changes), ["c-7"]);
    let c7 = &got.duration_changes[0];
    assert_eq!((c7.base_duration_ms, c7.head_duration_ms), (100, 5_000));
    assert_eq!(got.fixed[0].base_status, Failed as i32);
    assert_eq!(got.fixed[0].head_status, Passed as i32);
    assert_eq!(got.new_tests[0].base_status, 0, "absent in base");
    // Capped lists keep their totals.
    let capped = r
        .compare_test_runs(in_project(compare(1), "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys(&capped.new_failures), ["c-1"]);
    let counts = capped.counts.unwrap();
    assert_eq!(
        (
            counts.new_failures,
            counts.fixed,
            counts.still_failing,
            counts.new_tests,
            counts.removed_tests,
            counts.duration_changes
        ),
        (2, 1, 1, 2, 1, 1)
    );
    // A higher threshold drops the duration change.
    let mut strict = compare(0);
    strict.min_duration_change_ms = 10_000;
    let got = r
        .compare_test_runs(in_project(strict, "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(got.duration_changes.is_empty());
    // From another project both runs are unknown.
    let err = r.compare_test_runs(compare(0)).await.unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let mut bad = compare(5000);
    bad.min_duration_change_ms = -1;
    bad.base_run_id = "nope".into();
    let err = r
        .compare_test_runs(in_project(bad, "team-a"))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["base_run_id", "min_duration_change_ms", "max_items"]
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_into_a_run_that_loses_its_backend_writes_nothing_and_its_retry_counts_once() {
    let app = spawn_app().await;
    let mut r = runs(&app);
    let mut tc = app.test_cases.clone();
    for i in 0..3 {
        tc.create_test_case(new_test_case(&format!("f-{i}"), TestType::Unit, "core"))
            .await
            .unwrap();
    }
    let run = r
        .create_test_run(new_run("fault-run", "main", &[]))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let run_id: uuid::Uuid = run.id.parse().unwrap();
    let batch = RecordExecutionsRequest {
        batch_id: "fault-batch".into(),
        items: (0..3)
            .map(|i| {
                let mut e =
                    crate::test_cases::run(&format!("f-{i}"), ExecutionStatus::Failed, 1, 10);
                e.run_id = run.id.clone();
                e
            })
            .collect(),
    };
    // Another transaction holds the run row: the batch waits on its share lock.
    let mut blocker = app.sql().await;
    let hold = blocker.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM test_runs WHERE id = $1 FOR UPDATE",
        &[&run_id],
    )
    .await
    .unwrap();
    let first = tokio::spawn({
        let mut tc = tc.clone();
        let batch = batch.clone();
        async move { tc.record_executions(batch).await }
    });
    let observer = app.sql().await;
    wait_for_lock_wait(&observer, "SELECT id, status FROM test_runs%").await;
    // Its backend is terminated while it waits: the call fails retryably
    // and writes nothing.
    terminate_lock_waiter(&observer, "SELECT id, status FROM test_runs%").await;
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    hold.rollback().await.unwrap();
    let stored: i64 = observer
        .query_one(
            "SELECT count(*) FROM test_executions WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    // Four clients retry the same batch at once: stored once, counted once.
    let mut retries = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut tc = tc.clone();
        let batch = batch.clone();
        retries.spawn(async move { tc.record_executions(batch).await.unwrap().into_inner() });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(done) = retries.join_next().await {
        ids.insert(done.unwrap().ids);
    }
    assert_eq!(ids.len(), 1, "every retry answers with the same ids");
    let counts = r
        .get_test_run(GetTestRunRequest {
            lookup: Some(Lookup::Id(run.id.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .counts
        .unwrap();
    assert_eq!((counts.tests, counts.failed, counts.executions), (3, 3, 3));
    app.stop().await.unwrap();
}
