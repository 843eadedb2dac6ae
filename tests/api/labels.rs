//! Labels on sessions, executions and coverage reports: stored and read
//! back, part of the content a retry is compared on, bounded (field
//! violations, nothing stored), filtered by equality and presence in every
//! list of those kinds, bound into page tokens, per project.

use crate::coverage::report;
use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::new_session;
use crate::test_cases::{create_test_case, new_test_case, run};
use std::collections::{HashMap, HashSet};
use tonic::Code;
use verdict::proto::{
    CoverageCounters, CreateSessionRequest, ExecutionInput, ExecutionStatus,
    GetAggregateCoverageRequest, GetCoverageTrendRequest, GetSessionRequest,
    IngestExecutionsRequest, ListExecutionsRequest, ListSessionsRequest, RecordExecutionsRequest,
    SessionView, TestType, get_session_request::Lookup,
};

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The labels of the n-th object of a fixture: a team for two in three, a
/// `nightly` flag for every other one.
fn nth_labels(n: usize) -> HashMap<String, String> {
    let mut l = HashMap::new();
    match n % 3 {
        0 => l.insert("team".to_string(), "payments".to_string()),
        1 => l.insert("team".to_string(), "search".to_string()),
        _ => None,
    };
    if n.is_multiple_of(2) {
        l.insert("nightly".into(), "yes".into());
    }
    l
}

fn session_with(request_id: &str, l: HashMap<String, String>) -> CreateSessionRequest {
    CreateSessionRequest {
        labels: l,
        ..new_session(request_id)
    }
}

/// Every session id of a ListSessions in `project`, paging `page_size` at a
/// time.
async fn list_session_ids(
    app: &TestApp,
    project: &str,
    mut request: ListSessionsRequest,
) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let page = app
            .sessions
            .clone()
            .list_sessions(in_project(request.clone(), project))
            .await
            .unwrap()
            .into_inner();
        for s in &page.sessions {
            ids.push(s.id.clone());
        }
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

/// Every execution id of a ListExecutions in `project`.
async fn list_execution_ids(
    app: &TestApp,
    project: &str,
    mut request: ListExecutionsRequest,
) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let page = app
            .test_cases
            .clone()
            .list_executions(in_project(request.clone(), project))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.executions.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

/// Ids of the rows of `table` in `project` matching `predicate` (over
/// `labels`, with `$2` the JSON or keys given), for comparison.
async fn ids_by_sql(
    app: &TestApp,
    sql: &str,
    project: uuid::Uuid,
    arg: &(dyn tokio_postgres::types::ToSql + Sync),
) -> HashSet<String> {
    app.sql()
        .await
        .query(sql, &[&project, arg])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, uuid::Uuid>(0).to_string())
        .collect()
}

#[tokio::test]
async fn sessions_keep_their_labels_and_list_by_label_equality_and_presence_per_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let mut sessions = app.sessions.clone();
    let mut created = Vec::new();
    for n in 0..12 {
        for project in ["team-a", "team-b"] {
            let reply = sessions
                .create_session(in_project(
                    session_with(&format!("s-{n}"), nth_labels(n)),
                    project,
                ))
                .await
                .unwrap()
                .into_inner();
            let s = reply.session.unwrap();
            assert_eq!(s.labels, nth_labels(n));
            if project == "team-a" {
                created.push(s);
            }
        }
    }
    // Read back by id and by request_id, labels as given.
    let got = sessions
        .get_session(in_project(
            GetSessionRequest {
                lookup: Some(Lookup::RequestId("s-3".into())),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(got.labels, labels(&[("team", "payments")]));

    let by_sql_eq = "SELECT id FROM sessions WHERE project_id = $1 AND labels @> $2::jsonb";
    let by_sql_keys = "SELECT id FROM sessions WHERE project_id = $1 AND labels ?& $2::text[]";
    // Equality, two at a time across pages: A's sessions only.
    let payments = list_session_ids(
        &app,
        "team-a",
        ListSessionsRequest {
            labels: labels(&[("team", "payments")]),
            page_size: 2,
            ..Default::default()
        },
    )
    .await;
    let expected: HashSet<String> = created
        .iter()
        .enumerate()
        .filter(|(n, _)| n % 3 == 0)
        .map(|(_, s)| s.id.clone())
        .collect();
    assert_eq!(payments.len(), 4);
    assert_eq!(payments.iter().cloned().collect::<HashSet<_>>(), expected);
    assert_eq!(
        ids_by_sql(&app, by_sql_eq, a, &serde_json::json!({"team": "payments"})).await,
        expected
    );
    // Presence, in the BASIC view (labels are returned in every view).
    let nightly = list_session_ids(
        &app,
        "team-a",
        ListSessionsRequest {
            label_keys: vec!["nightly".into()],
            view: SessionView::Basic as i32,
            page_size: 5,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(nightly.len(), 6);
    assert_eq!(
        nightly.iter().cloned().collect::<HashSet<_>>(),
        ids_by_sql(&app, by_sql_keys, a, &vec!["nightly".to_string()]).await
    );
    let basic = app
        .sessions
        .clone()
        .list_sessions(in_project(
            ListSessionsRequest {
                label_keys: vec!["nightly".into(), "team".into()],
                view: SessionView::Basic as i32,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    // n in 0..12 with n even and n % 3 != 2: 0, 4, 6, 10.
    assert_eq!(basic.sessions.len(), 4);
    for s in &basic.sessions {
        assert!(s.labels.contains_key("nightly") && s.labels.contains_key("team"));
    }
    // Both filters together, and a value nobody has.
    let both = list_session_ids(
        &app,
        "team-a",
        ListSessionsRequest {
            labels: labels(&[("team", "search")]),
            label_keys: vec!["nightly".into()],
            ..Default::default()
        },
    )
    .await;
    // n % 3 == 1 and even: 4, 10.
    assert_eq!(both.len(), 2);
    let none = list_session_ids(
        &app,
        "team-a",
        ListSessionsRequest {
            labels: labels(&[("team", "PAYMENTS")]),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty(), "values match exactly");
    // Without label filters: every session of A, none of B's.
    assert_eq!(
        list_session_ids(&app, "team-a", ListSessionsRequest::default())
            .await
            .len(),
        12
    );
}

#[tokio::test]
async fn a_session_page_token_is_bound_to_its_label_filters() {
    let app = spawn_app().await;
    let mut sessions = app.sessions.clone();
    for n in 0..4 {
        sessions
            .create_session(session_with(
                &format!("t-{n}"),
                labels(&[
                    ("team", "payments"),
                    ("tier", if n < 2 { "1" } else { "2" }),
                ]),
            ))
            .await
            .unwrap();
    }
    let first = sessions
        .list_sessions(ListSessionsRequest {
            labels: labels(&[("team", "payments")]),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let token = first.next_page_token;
    for other in [
        ListSessionsRequest {
            labels: labels(&[("team", "search")]),
            ..Default::default()
        },
        ListSessionsRequest {
            labels: labels(&[("team", "payments"), ("tier", "1")]),
            ..Default::default()
        },
        ListSessionsRequest {
            labels: labels(&[("team", "payments")]),
            label_keys: vec!["tier".into()],
            ..Default::default()
        },
        ListSessionsRequest::default(),
    ] {
        let err = sessions
            .list_sessions(ListSessionsRequest {
                page_token: token.clone(),
                page_size: 1,
                ..other
            })
            .await
            .unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
        assert_eq!(violated_fields(&err), ["page_token"]);
    }
    // The same filters, however the map is built, take it.
    let mut same = HashMap::new();
    same.insert("team".to_string(), "payments".to_string());
    let next = sessions
        .list_sessions(ListSessionsRequest {
            labels: same,
            page_size: 1,
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.sessions.len(), 1);
}

#[tokio::test]
async fn a_create_session_retry_with_other_labels_is_a_reused_key_and_concurrent_retries_store_one()
{
    let app = spawn_app().await;
    let l = labels(&[("team", "payments"), ("os", "linux"), ("ci", "gitlab")]);
    // Eight concurrent first calls with the same key and labels: one
    // session, one `created`, every reply with its id and labels.
    let calls = (0..8).map(|_| {
        let mut c = app.sessions.clone();
        let req = session_with("same", l.clone());
        tokio::spawn(async move { c.create_session(req).await.map(|r| r.into_inner()) })
    });
    let replies: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(replies.iter().filter(|r| r.created).count(), 1);
    let ids: HashSet<_> = replies
        .iter()
        .map(|r| r.session.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids.len(), 1);
    assert!(
        replies
            .iter()
            .all(|r| r.session.as_ref().unwrap().labels == l)
    );
    // Other labels, fewer labels, no labels: the key was used for other
    // content.
    for other in [
        labels(&[("team", "search"), ("os", "linux"), ("ci", "gitlab")]),
        labels(&[("team", "payments")]),
        HashMap::new(),
    ] {
        let err = app
            .sessions
            .clone()
            .create_session(session_with("same", other))
            .await
            .unwrap_err();
        assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    }
    let stored: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id = 'same' AND labels = $1::jsonb",
            &[&serde_json::json!({"team": "payments", "os": "linux", "ci": "gitlab"})],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    // A session without labels replays as before labels existed.
    let plain = app
        .sessions
        .clone()
        .create_session(new_session("plain"))
        .await
        .unwrap()
        .into_inner();
    let again = app
        .sessions
        .clone()
        .create_session(new_session("plain"))
        .await
        .unwrap()
        .into_inner();
    assert!(plain.created && !again.created);
    assert!(again.session.unwrap().labels.is_empty());
}

#[tokio::test]
async fn labels_out_of_bounds_are_refused_naming_the_field_and_nothing_is_stored() {
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("tc-1", TestType::Unit, "core")).await;
    let too_many: HashMap<String, String> = (0..33)
        .map(|n| (format!("k{n}"), "v".to_string()))
        .collect();
    let long_key = "k".repeat(65);
    let cases: Vec<(HashMap<String, String>, String)> = vec![
        (too_many, "labels".into()),
        (labels(&[(&long_key, "v")]), format!("labels[{long_key:?}]")),
        (
            labels(&[("team", &"v".repeat(257))]),
            "labels[\"team\"]".into(),
        ),
        (labels(&[("", "v")]), "labels[\"\"]".into()),
        (labels(&[("a\u{7}b", "v")]), "labels[\"a\\u{7}b\"]".into()),
        (labels(&[("nul", "a\0b")]), "labels[\"nul\"]".into()),
    ];
    for (n, (bad, field)) in cases.into_iter().enumerate() {
        // Sessions.
        let err = app
            .sessions
            .clone()
            .create_session(session_with(&format!("bad-{n}"), bad.clone()))
            .await
            .unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(violated_fields(&err), [field.as_str()], "{err:?}");
        // Executions: one bad item fails the whole batch.
        let items = vec![
            run("tc-1", ExecutionStatus::Passed, 1, 5),
            ExecutionInput {
                labels: bad.clone(),
                ..run("tc-1", ExecutionStatus::Failed, 2, 5)
            },
        ];
        let err = app
            .test_cases
            .clone()
            .record_executions(RecordExecutionsRequest {
                batch_id: format!("bad-{n}"),
                items,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            violated_fields(&err),
            [format!("items[1].{field}")],
            "{err:?}"
        );
        // Coverage reports.
        let err = app
            .coverage
            .clone()
            .record_coverage(verdict::proto::RecordCoverageRequest {
                labels: bad.clone(),
                ..report("abcdef1", "main", "", &format!("bad-{n}"))
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), [field.as_str()], "{err:?}");
        // The same bounds on the list filters.
        let err = app
            .sessions
            .clone()
            .list_sessions(ListSessionsRequest {
                labels: bad.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), [field.as_str()], "{err:?}");
    }
    let err = app
        .test_cases
        .clone()
        .list_executions(ListExecutionsRequest {
            label_keys: vec!["ok".into(), "x".repeat(65)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["label_keys[1]"]);
    let sql = app.sql().await;
    for table in ["sessions", "test_executions", "coverage_reports"] {
        let n: i64 = sql
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    // At the bounds exactly: accepted and read back.
    let full: HashMap<String, String> = (0..32)
        .map(|n| (format!("{n:0>64}"), "v".repeat(256)))
        .collect();
    let s = app
        .sessions
        .clone()
        .create_session(session_with("full", full.clone()))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(s.labels, full);
}

#[tokio::test]
async fn executions_keep_their_labels_from_batches_and_streams_and_list_by_label_per_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    for project in ["team-a", "team-b"] {
        app.test_cases
            .clone()
            .create_test_case(in_project(
                new_test_case("tc-1", TestType::Unit, "core"),
                project,
            ))
            .await
            .unwrap();
    }
    let item = |n: usize| ExecutionInput {
        labels: nth_labels(n),
        ..run("tc-1", ExecutionStatus::Passed, n as i64, 5)
    };
    for project in ["team-a", "team-b"] {
        // Ten by RecordExecutions, ten by a stream of two chunks.
        let reply = app
            .test_cases
            .clone()
            .record_executions(in_project(
                RecordExecutionsRequest {
                    batch_id: "b-1".into(),
                    items: (0..10).map(item).collect(),
                },
                project,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.ids.len(), 10);
        let chunks: Vec<IngestExecutionsRequest> = (0..2)
            .map(|c| IngestExecutionsRequest {
                ingest_id: "in-1".into(),
                sequence: c + 1,
                items: (10 + 5 * c as usize..15 + 5 * c as usize)
                    .map(item)
                    .collect(),
            })
            .collect();
        let reply = app
            .test_cases
            .clone()
            .ingest_executions(in_project(futures::stream::iter(chunks), project))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.committed_items, 10);
    }
    // A batch retried with other labels is a reused key; with the same, a
    // replay.
    let mut changed: Vec<ExecutionInput> = (0..10).map(item).collect();
    changed[3].labels.insert("extra".into(), "1".into());
    let err = app
        .test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: "b-1".into(),
                items: changed,
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    let replay = app
        .test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: "b-1".into(),
                items: (0..10).map(item).collect(),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.replayed);

    let by_sql_eq = "SELECT id FROM test_executions WHERE project_id = $1 AND labels @> $2::jsonb";
    let by_sql_keys =
        "SELECT id FROM test_executions WHERE project_id = $1 AND labels ?& $2::text[]";
    let payments = list_execution_ids(
        &app,
        "team-a",
        ListExecutionsRequest {
            labels: labels(&[("team", "payments")]),
            page_size: 3,
            ..Default::default()
        },
    )
    .await;
    // n in 0..20 with n % 3 == 0: 7 of them.
    assert_eq!(payments.len(), 7);
    assert_eq!(
        payments.into_iter().collect::<HashSet<_>>(),
        ids_by_sql(&app, by_sql_eq, a, &serde_json::json!({"team": "payments"})).await
    );
    let nightly = list_execution_ids(
        &app,
        "team-a",
        ListExecutionsRequest {
            label_keys: vec!["nightly".into()],
            view: verdict::proto::ExecutionView::Basic as i32,
            page_size: 4,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(nightly.len(), 10);
    assert_eq!(
        nightly.into_iter().collect::<HashSet<_>>(),
        ids_by_sql(&app, by_sql_keys, a, &vec!["nightly".to_string()]).await
    );
    // Read back with their labels, newest first.
    let page = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                labels: labels(&[("team", "search"), ("nightly", "yes")]),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    // n % 3 == 1 and even: 4, 10, 16.
    let starts: Vec<i64> = page
        .executions
        .iter()
        .map(|e| e.started_at.as_ref().unwrap().seconds)
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(starts.windows(2).all(|w| w[0] > w[1]), "{starts:?}");
    for e in &page.executions {
        assert_eq!(e.labels, labels(&[("team", "search"), ("nightly", "yes")]));
    }
    // A token of one label filter is refused with another.
    let first = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                label_keys: vec!["team".into()],
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
                label_keys: vec!["nightly".into()],
                page_size: 1,
                page_token: first.next_page_token,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
}

#[tokio::test]
async fn coverage_reports_keep_their_labels_and_aggregates_and_trends_filter_on_them() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let totals = |covered: i64| CoverageCounters {
        lines_covered: covered,
        lines_total: 100,
        ..Default::default()
    };
    for project in ["team-a", "team-b"] {
        for (n, (runner, covered)) in [("linux", 80), ("linux", 60), ("mac", 10)]
            .into_iter()
            .enumerate()
        {
            let reply = app
                .coverage
                .clone()
                .record_coverage(in_project(
                    verdict::proto::RecordCoverageRequest {
                        totals: Some(totals(covered)),
                        labels: labels(&[("runner", runner)]),
                        ..report(&format!("abcdef{n}"), "main", "", &format!("k-{n}"))
                    },
                    project,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.report.unwrap().labels, labels(&[("runner", runner)]));
        }
    }
    // A retry with other labels is a reused key.
    let err = app
        .coverage
        .clone()
        .record_coverage(in_project(
            verdict::proto::RecordCoverageRequest {
                totals: Some(totals(80)),
                labels: labels(&[("runner", "windows")]),
                ..report("abcdef0", "main", "", "k-0")
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    let aggregate = |l: HashMap<String, String>, keys: Vec<String>| {
        let mut c = app.coverage.clone();
        async move {
            c.get_aggregate_coverage(in_project(
                GetAggregateCoverageRequest {
                    labels: l,
                    label_keys: keys,
                    ..Default::default()
                },
                "team-a",
            ))
            .await
            .unwrap()
            .into_inner()
        }
    };
    let linux = aggregate(labels(&[("runner", "linux")]), vec![]).await;
    assert_eq!(linux.report_count, 2);
    assert_eq!(linux.counters.unwrap().lines_covered, 140);
    let any = aggregate(HashMap::new(), vec!["runner".into()]).await;
    assert_eq!(any.report_count, 3);
    let none = aggregate(HashMap::new(), vec!["os".into()]).await;
    assert_eq!(none.report_count, 0);
    let trend = app
        .coverage
        .clone()
        .get_coverage_trend(in_project(
            GetCoverageTrendRequest {
                labels: labels(&[("runner", "mac")]),
                days: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let counted: i64 = trend.buckets.iter().map(|b| b.report_count).sum();
    assert_eq!(counted, 1);
    assert_eq!(
        trend
            .buckets
            .iter()
            .map(|b| b.counters.unwrap().lines_covered)
            .sum::<i64>(),
        10
    );

    // ListCoverageReports filters on the same labels, counts them the same
    // way, and binds them into its page tokens; the other project's equal
    // reports never show.
    let list = |l: HashMap<String, String>, keys: Vec<String>, token: String| {
        let mut c = app.coverage.clone();
        async move {
            c.list_coverage_reports(in_project(
                verdict::proto::ListCoverageReportsRequest {
                    labels: l,
                    label_keys: keys,
                    page_size: 1,
                    page_token: token,
                    count: verdict::proto::CountMode::Exact as i32,
                    ..Default::default()
                },
                "team-a",
            ))
            .await
        }
    };
    let first = list(labels(&[("runner", "linux")]), vec![], String::new())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.total, 2);
    assert_eq!(first.reports[0].labels, labels(&[("runner", "linux")]));
    let second = list(
        labels(&[("runner", "linux")]),
        vec![],
        first.next_page_token.clone(),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(second.reports.len(), 1);
    assert!(second.next_page_token.is_empty());
    let mac = list(labels(&[("runner", "mac")]), vec![], String::new())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((mac.reports.len(), mac.total), (1, 1));
    let keyed = list(HashMap::new(), vec!["runner".into()], String::new())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keyed.total, 3);
    let err = list(labels(&[("runner", "mac")]), vec![], first.next_page_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = list(labels(&[("", "x")]), vec![], String::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
