//! Test runs: created idempotently per project, listed with every filter
//! (labels included), finished once, isolated between projects.

use crate::errors::assert_reason;
use crate::helpers::*;
use std::collections::HashMap;
use tonic::Code;
use tonic::transport::Channel;
use verdict::proto::get_test_run_request::Lookup;
use verdict::proto::test_run_service_client::TestRunServiceClient;
use verdict::proto::{
    CreateTestRunRequest, FinishTestRunRequest, GetTestRunRequest, ListTestRunsRequest,
    TestRunStatus,
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
