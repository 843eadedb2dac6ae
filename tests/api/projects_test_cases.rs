//! Test cases and executions stay inside their project: two projects with
//! the same test-case keys, batch ids and subsystems never see, change or
//! count each other's rows, and each replays its own idempotent writes.

use crate::errors::assert_reason;
use crate::helpers::{TestApp, create_project, in_project, spawn_app, violated_fields};
use crate::test_cases::{new_test_case, run};
use std::collections::HashSet;
use tonic::Code;
use uuid::Uuid;
use verdict::proto::{
    CreateTestCaseRequest, CreateTestCaseResponse, DeleteTestCaseRequest, ExecutionInput,
    ExecutionStatus, ExecutionView, GetTestCaseRequest, GetTestStatisticsRequest,
    GetTestStatisticsResponse, IngestExecutionsRequest, ListExecutionsRequest,
    ListTestCasesRequest, RecordExecutionsRequest, RecordExecutionsResponse, TestCase,
    TestCaseServiceGetIngestStatusRequest, TestType, UpdateTestCaseRequest, execution_input,
    get_test_case_request::Lookup,
};

async fn create_in(
    app: &TestApp,
    slug: &str,
    req: CreateTestCaseRequest,
) -> Result<CreateTestCaseResponse, tonic::Status> {
    app.test_cases
        .clone()
        .create_test_case(in_project(req, slug))
        .await
        .map(|r| r.into_inner())
}

async fn case_in(app: &TestApp, slug: &str, req: CreateTestCaseRequest) -> TestCase {
    create_in(app, slug, req)
        .await
        .expect("create a test case")
        .test_case
        .expect("test case")
}

async fn record_in(
    app: &TestApp,
    slug: &str,
    batch_id: &str,
    items: Vec<ExecutionInput>,
) -> Result<RecordExecutionsResponse, tonic::Status> {
    app.test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: batch_id.into(),
                items,
            },
            slug,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn statistics_in(
    app: &TestApp,
    slug: &str,
    req: GetTestStatisticsRequest,
) -> GetTestStatisticsResponse {
    app.test_cases
        .clone()
        .get_test_statistics(in_project(req, slug))
        .await
        .expect("statistics")
        .into_inner()
}

/// Every execution of a project that ListExecutions returns for `req`,
/// following page tokens (bounded).
async fn all_executions_in(
    app: &TestApp,
    slug: &str,
    req: ListExecutionsRequest,
) -> Vec<verdict::proto::Execution> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = app
            .test_cases
            .clone()
            .list_executions(in_project(
                ListExecutionsRequest {
                    page_token: token,
                    page_size: 7,
                    ..req.clone()
                },
                slug,
            ))
            .await
            .expect("a page of executions")
            .into_inner();
        out.extend(page.executions);
        token = page.next_page_token;
        if token.is_empty() {
            return out;
        }
    }
    panic!("ListExecutions did not end within 100 pages");
}

/// Every test case of a project that ListTestCases returns for `req`.
async fn all_test_cases_in(app: &TestApp, slug: &str, req: ListTestCasesRequest) -> Vec<TestCase> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = app
            .test_cases
            .clone()
            .list_test_cases(in_project(
                ListTestCasesRequest {
                    page_token: token,
                    page_size: 2,
                    ..req.clone()
                },
                slug,
            ))
            .await
            .expect("a page of test cases")
            .into_inner();
        out.extend(page.test_cases);
        token = page.next_page_token;
        if token.is_empty() {
            return out;
        }
    }
    panic!("ListTestCases did not end within 100 pages");
}

async fn count(app: &TestApp, sql: &str, project: Uuid) -> i64 {
    app.sql()
        .await
        .query_one(sql, &[&project])
        .await
        .expect("count")
        .get(0)
}

fn by_id(id: &str) -> ExecutionInput {
    ExecutionInput {
        test_case: Some(execution_input::TestCase::TestCaseId(id.into())),
        ..run("unused", ExecutionStatus::Passed, 0, 10)
    }
}

#[tokio::test]
async fn the_same_key_is_one_test_case_per_project_and_each_project_replays_its_own() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let in_a = new_test_case("test-001", TestType::Unit, "audio");
    let mut in_b = new_test_case("test-001", TestType::E2e, "video");
    in_b.name = "team b's test-001".into();

    // Several clients create the same key at once in both projects, each
    // project with its own content: one test case per project, no
    // IDEMPOTENCY_KEY_REUSED across projects.
    let mut calls = Vec::new();
    for n in 0..6 {
        let (slug, req) = if n % 2 == 0 {
            ("team-a", in_a.clone())
        } else {
            ("team-b", in_b.clone())
        };
        let app = &app;
        calls.push(async move { (slug, create_in(app, slug, req).await) });
    }
    let replies = futures::future::join_all(calls).await;
    let mut ids = std::collections::HashMap::<&str, HashSet<String>>::new();
    let mut created = 0;
    for (slug, reply) in replies {
        let reply = reply.unwrap_or_else(|e| panic!("create in {slug}: {e:?}"));
        created += i32::from(reply.created);
        let t = reply.test_case.unwrap();
        assert_eq!(t.key, "test-001");
        ids.entry(slug).or_default().insert(t.id);
    }
    assert_eq!(created, 2, "one creation per project");
    assert_eq!(ids["team-a"].len(), 1);
    assert_eq!(ids["team-b"].len(), 1);
    let a_id = ids["team-a"].iter().next().unwrap().clone();
    let b_id = ids["team-b"].iter().next().unwrap().clone();
    assert_ne!(a_id, b_id);
    let per_project = "SELECT count(*) FROM test_cases WHERE project_id = $1 AND key = 'test-001'";
    assert_eq!(count(&app, per_project, a).await, 1);
    assert_eq!(count(&app, per_project, b).await, 1);

    // Each project's key answers with its own test case.
    for (slug, id, req) in [("team-a", &a_id, &in_a), ("team-b", &b_id, &in_b)] {
        let got = app
            .test_cases
            .clone()
            .get_test_case(in_project(
                GetTestCaseRequest {
                    lookup: Some(Lookup::Key("test-001".into())),
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner()
            .test_case
            .unwrap();
        assert_eq!((&got.id, &got.name), (id, &req.name));
    }
    // The key is still taken within a project: B's content in A is a
    // reused key, and the default project has no test-001 at all.
    let err = create_in(&app, "team-a", in_b.clone()).await.unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    let err = app
        .test_cases
        .clone()
        .get_test_case(GetTestCaseRequest {
            lookup: Some(Lookup::Key("test-001".into())),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_test_case_of_another_project_is_not_found_and_stays_unchanged() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let theirs = case_in(&app, "team-b", new_test_case("only-b", TestType::Unit, "")).await;
    record_in(
        &app,
        "team-b",
        "b-runs",
        vec![run("only-b", ExecutionStatus::Failed, 1, 5)],
    )
    .await
    .unwrap();
    let absent = Uuid::now_v7().to_string();
    let mut client = app.test_cases.clone();

    // Get by id and by key, update, delete (forced): NOT_FOUND, as for an
    // id that never existed.
    for lookup in [Lookup::Id(theirs.id.clone()), Lookup::Key("only-b".into())] {
        let err = client
            .get_test_case(in_project(
                GetTestCaseRequest {
                    lookup: Some(lookup),
                },
                "team-a",
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    let err = client
        .update_test_case(in_project(
            UpdateTestCaseRequest {
                test_case: Some(TestCase {
                    id: theirs.id.clone(),
                    name: "hijacked".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                expected_version: None,
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    for force in [false, true] {
        let err = client
            .delete_test_case(in_project(
                DeleteTestCaseRequest {
                    id: theirs.id.clone(),
                    expected_version: None,
                    force,
                },
                "team-a",
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    // Executions and statistics filtered by it: NOT_FOUND.
    let err = client
        .list_executions(in_project(
            ListExecutionsRequest {
                test_case_id: theirs.id.clone(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let err = client
        .get_test_statistics(in_project(
            GetTestStatisticsRequest {
                test_case_key: "only-b".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // Recording executions of it from A: the answer for a test case that
    // does not exist, by id and by key, in a batch and in a stream.
    let foreign = record_in(&app, "team-a", "a-1", vec![by_id(&theirs.id)])
        .await
        .unwrap_err();
    let missing = record_in(&app, "team-a", "a-2", vec![by_id(&absent)])
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&foreign), ["items[0].test_case_id"]);
    assert_eq!(
        foreign.message().replace(&theirs.id, "ID"),
        missing.message().replace(&absent, "ID"),
        "no hint that the test case exists elsewhere"
    );
    let err = record_in(
        &app,
        "team-a",
        "a-3",
        vec![run("only-b", ExecutionStatus::Passed, 2, 5)],
    )
    .await
    .unwrap_err();
    assert_eq!(violated_fields(&err), ["items[0].test_case_key"]);
    let err = client
        .ingest_executions(in_project(
            futures::stream::iter(vec![IngestExecutionsRequest {
                ingest_id: "a-stream".into(),
                sequence: 1,
                items: vec![by_id(&theirs.id)],
            }]),
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["items[0].test_case_id"]);

    // B's test case is as it was: version 1, its one execution, nothing
    // written anywhere else.
    let sql = app.sql().await;
    let row = sql
        .query_one(
            "SELECT name, version FROM test_cases WHERE id = $1",
            &[&theirs.id.parse::<Uuid>().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        (theirs.name, 1)
    );
    let executions: i64 = sql
        .query_one("SELECT count(*) FROM test_executions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(executions, 1);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM test_executions WHERE project_id = $1",
            b
        )
        .await,
        1
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_of_another_project_is_not_found_when_recording_executions() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    // A session of the default project.
    let session = crate::sessions::create(&app, "default-session").await;
    case_in(&app, "team-a", new_test_case("t", TestType::Unit, "")).await;
    case_in(&app, "default", new_test_case("t", TestType::Unit, "")).await;
    let with_session = |second| {
        let mut e = run("t", ExecutionStatus::Passed, second, 5);
        e.session_id = session.id.clone();
        e
    };
    let foreign = record_in(&app, "team-a", "s-1", vec![with_session(1)])
        .await
        .unwrap_err();
    let mut unknown = with_session(2);
    let absent = Uuid::now_v7().to_string();
    unknown.session_id = absent.clone();
    let missing = record_in(&app, "team-a", "s-2", vec![unknown])
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&foreign), ["items[0].session_id"]);
    assert_eq!(
        foreign.message().replace(&session.id, "ID"),
        missing.message().replace(&absent, "ID"),
        "no hint that the session exists elsewhere"
    );
    // In its own project the session is accepted.
    record_in(&app, "default", "s-1", vec![with_session(3)])
        .await
        .unwrap();
    let sql = app.sql().await;
    let n: i64 = sql
        .query_one(
            "SELECT count(*) FROM test_executions WHERE session_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    app.stop().await.unwrap();
}

/// Project `slug` gets the test cases `t-0..t-{cases}` (subsystem `core`,
/// tag `smoke`) and, per test case, `runs` executions alternating
/// passed/failed when `flaky`, else all passed, in one batch `batch-1`.
async fn populate(app: &TestApp, slug: &str, cases: usize, runs: i64, flaky: bool) {
    let mut items = Vec::new();
    for c in 0..cases {
        let key = format!("t-{c}");
        case_in(
            app,
            slug,
            new_test_case(&key, TestType::Integration, "core"),
        )
        .await;
        for r in 0..runs {
            let status = if flaky && r % 2 == 1 {
                ExecutionStatus::Failed
            } else {
                ExecutionStatus::Passed
            };
            items.push(run(&key, status, r * 60 + c as i64, 100 + r));
        }
    }
    let reply = record_in(app, slug, "batch-1", items).await.unwrap();
    assert!(!reply.replayed);
}

#[tokio::test]
async fn lists_and_statistics_in_one_project_never_include_another_projects_rows() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    // Same keys, subsystem, tag and batch id; B has more of everything, and
    // only B's tests flip.
    populate(&app, "team-a", 3, 4, false).await;
    populate(&app, "team-b", 5, 6, true).await;
    let a_cases = count(
        &app,
        "SELECT count(*) FROM test_cases WHERE project_id = $1",
        a,
    )
    .await;
    let a_runs = count(
        &app,
        "SELECT count(*) FROM test_executions WHERE project_id = $1",
        a,
    )
    .await;
    assert_eq!((a_cases, a_runs), (3, 12));
    let a_ids: HashSet<String> = app
        .sql()
        .await
        .query("SELECT id FROM test_cases WHERE project_id = $1", &[&a])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Uuid>(0).to_string())
        .collect();

    // ListTestCases, unfiltered and by every filter.
    for filter in [
        ListTestCasesRequest::default(),
        ListTestCasesRequest {
            test_types: vec![TestType::Integration as i32],
            ..Default::default()
        },
        ListTestCasesRequest {
            target_subsystem: "core".into(),
            ..Default::default()
        },
        ListTestCasesRequest {
            tag: "smoke".into(),
            ..Default::default()
        },
        ListTestCasesRequest {
            name_prefix: "checks t-".into(),
            ..Default::default()
        },
    ] {
        let listed = all_test_cases_in(&app, "team-a", filter.clone()).await;
        let ids: HashSet<String> = listed.into_iter().map(|t| t.id).collect();
        assert_eq!(ids, a_ids, "{filter:?}");
    }

    // ListExecutions, unfiltered, by key, by status, both views.
    for view in [ExecutionView::Full, ExecutionView::Basic] {
        let all = all_executions_in(
            &app,
            "team-a",
            ListExecutionsRequest {
                view: view as i32,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(all.len() as i64, a_runs, "{view:?}");
        assert!(all.iter().all(|e| a_ids.contains(&e.test_case_id)));
    }
    let of_key = all_executions_in(
        &app,
        "team-a",
        ListExecutionsRequest {
            test_case_key: "t-0".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(of_key.len(), 4);
    let failed = all_executions_in(
        &app,
        "team-a",
        ListExecutionsRequest {
            statuses: vec![ExecutionStatus::Failed as i32],
            ..Default::default()
        },
    )
    .await;
    assert!(failed.is_empty(), "B's failures are not A's");

    // A page token of A's lists is refused in B (same filters, same keys).
    let first = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                page_size: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let err = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                page_size: 1,
                page_token: first.next_page_token,
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let first = app
        .test_cases
        .clone()
        .list_test_cases(in_project(
            ListTestCasesRequest {
                page_size: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let err = app
        .test_cases
        .clone()
        .list_test_cases(in_project(
            ListTestCasesRequest {
                page_size: 1,
                page_token: first.next_page_token,
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");

    // GetTestStatistics: all, by subsystem, by test case; B's flips are not
    // A's flaky tests.
    for req in [
        GetTestStatisticsRequest::default(),
        GetTestStatisticsRequest {
            target_subsystem: "core".into(),
            ..Default::default()
        },
    ] {
        let s = statistics_in(&app, "team-a", req.clone()).await;
        assert_eq!(s.total_executions, a_runs, "{req:?}");
        assert_eq!(s.pass_rate, Some(1.0));
        assert!(s.flaky_tests.is_empty());
        assert_eq!(s.flaky_test_count, 0);
    }
    let one = statistics_in(
        &app,
        "team-a",
        GetTestStatisticsRequest {
            test_case_key: "t-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.total_executions, 4);
    // B sees its own, all of them.
    let s = statistics_in(&app, "team-b", GetTestStatisticsRequest::default()).await;
    let b_runs = count(
        &app,
        "SELECT count(*) FROM test_executions WHERE project_id = $1",
        b,
    )
    .await;
    assert_eq!((s.total_executions, b_runs), (30, 30));
    assert_eq!(s.flaky_test_count, 5);
    assert_eq!(s.pass_rate, Some(0.5));
    // The default project holds none of either.
    let s = statistics_in(&app, "default", GetTestStatisticsRequest::default()).await;
    assert_eq!(s.total_executions, 0);
    assert!(
        all_test_cases_in(&app, "default", ListTestCasesRequest::default())
            .await
            .is_empty()
    );

    // A forced delete of A's t-0 removes A's executions only.
    let t0 = app
        .test_cases
        .clone()
        .get_test_case(in_project(
            GetTestCaseRequest {
                lookup: Some(Lookup::Key("t-0".into())),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .test_case
        .unwrap();
    let deleted = app
        .test_cases
        .clone()
        .delete_test_case(in_project(
            DeleteTestCaseRequest {
                id: t0.id,
                expected_version: None,
                force: true,
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted_executions, 4);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM test_executions WHERE project_id = $1",
            b
        )
        .await,
        30
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_id_is_per_project_and_each_project_replays_its_own_batch() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let projects = ["team-a", "team-b", "default"];
    for slug in projects {
        case_in(&app, slug, new_test_case("test-001", TestType::Unit, "")).await;
    }
    let items = || {
        vec![
            run("test-001", ExecutionStatus::Passed, 1, 10),
            run("test-001", ExecutionStatus::Failed, 2, 20),
        ]
    };
    // The same batch id and content, recorded by three clients per project
    // at once: one batch per project, the others replay it.
    let mut calls = Vec::new();
    for n in 0..9 {
        let slug = projects[n % 3];
        let app = &app;
        let items = items();
        calls.push(async move { (slug, record_in(app, slug, "batch-1", items).await) });
    }
    let mut ids = std::collections::HashMap::<&str, HashSet<Vec<String>>>::new();
    let mut fresh = 0;
    for (slug, reply) in futures::future::join_all(calls).await {
        let reply = reply.unwrap_or_else(|e| panic!("record in {slug}: {e:?}"));
        fresh += i32::from(!reply.replayed);
        ids.entry(slug).or_default().insert(reply.ids);
    }
    assert_eq!(fresh, 3, "one new batch per project");
    let mut every = HashSet::new();
    for slug in projects {
        assert_eq!(ids[slug].len(), 1, "{slug}: every reply names the same ids");
        let batch = ids[slug].iter().next().unwrap();
        assert_eq!(batch.len(), 2);
        every.extend(batch.iter().cloned());
    }
    assert_eq!(every.len(), 6, "three projects, three batches of two");
    for p in [a, b] {
        assert_eq!(
            count(
                &app,
                "SELECT count(*) FROM test_executions WHERE project_id = $1 AND batch_id = 'batch-1'",
                p
            )
            .await,
            2
        );
    }
    // A's ids are A's rows.
    let a_ids: HashSet<String> = app
        .sql()
        .await
        .query(
            "SELECT id FROM test_executions WHERE project_id = $1",
            &[&a],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Uuid>(0).to_string())
        .collect();
    assert_eq!(
        &a_ids,
        &ids["team-a"]
            .iter()
            .next()
            .unwrap()
            .iter()
            .cloned()
            .collect()
    );
    // Other content under A's batch id: reused within A, while B may use
    // the id for its own content.
    let other = vec![run("test-001", ExecutionStatus::Error, 3, 30)];
    let err = record_in(&app, "team-a", "batch-1", other.clone())
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    let reply = record_in(&app, "team-b", "batch-2", other.clone())
        .await
        .unwrap();
    assert!(!reply.replayed);
    let reply = record_in(&app, "team-a", "batch-2", other).await.unwrap();
    assert!(!reply.replayed, "B's batch-2 is not A's");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_ingest_of_one_project_writes_there_and_is_not_found_from_another() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    case_in(
        &app,
        "team-a",
        new_test_case("test-001", TestType::Unit, ""),
    )
    .await;
    case_in(
        &app,
        "team-b",
        new_test_case("test-001", TestType::Unit, ""),
    )
    .await;
    let chunks: Vec<IngestExecutionsRequest> = (1..=3)
        .map(|sequence| IngestExecutionsRequest {
            ingest_id: "nightly".into(),
            sequence,
            items: vec![run("test-001", ExecutionStatus::Passed, sequence, 5)],
        })
        .collect();
    let outcome = app
        .test_cases
        .clone()
        .ingest_executions(in_project(futures::stream::iter(chunks), "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.committed_items, 3);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM test_executions WHERE project_id = $1",
            a
        )
        .await,
        3
    );
    let all: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM test_executions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(all, 3, "written in A only");
    let status = |slug| {
        let mut client = app.test_cases.clone();
        async move {
            client
                .get_ingest_status(in_project(
                    TestCaseServiceGetIngestStatusRequest {
                        ingest_id: "nightly".into(),
                    },
                    slug,
                ))
                .await
        }
    };
    let own = status("team-a").await.unwrap().into_inner().status.unwrap();
    assert_eq!((own.high_water_mark, own.committed_items), (3, 3));
    for other in ["team-b", "default"] {
        let err = status(other).await.unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn updating_a_test_case_in_one_project_leaves_the_same_key_in_another_alone() {
    let app = spawn_app().await;
    let b = create_project(&app, "team-b").await;
    create_project(&app, "team-a").await;
    let mine = case_in(
        &app,
        "team-a",
        new_test_case("test-001", TestType::Unit, ""),
    )
    .await;
    case_in(
        &app,
        "team-b",
        new_test_case("test-001", TestType::Unit, ""),
    )
    .await;
    let updated = app
        .test_cases
        .clone()
        .update_test_case(in_project(
            UpdateTestCaseRequest {
                test_case: Some(TestCase {
                    id: mine.id.clone(),
                    name: "renamed in A".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                expected_version: Some(1),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .test_case
        .unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.version),
        ("renamed in A", 2)
    );
    let row = app
        .sql()
        .await
        .query_one(
            "SELECT name, version FROM test_cases WHERE project_id = $1 AND key = 'test-001'",
            &[&b],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        ("checks test-001".to_owned(), 1)
    );
    app.stop().await.unwrap();
}
