//! Full-text search (`query`) on ListExecutions (error messages),
//! ListDiscrepancies (descriptions), ListSessionLogs (messages) and
//! ListTestCases (names and descriptions): finds by words, ignores the
//! rest, keeps list order, pages with tokens bound to the query, takes any
//! text a hostile caller sends, and stays within the call's project.

use crate::discrepancies::item;
use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::new_session;
use crate::test_cases::{new_test_case, run};
use tonic::Code;
use verdict::proto::{
    AppendSessionLogRequest, ExecutionInput, ExecutionStatus, ListDiscrepanciesRequest,
    ListExecutionsRequest, ListSessionLogsRequest, ListSessionsRequest, ListTestCasesRequest,
    LogLevel, RecordDiscrepanciesRequest, RecordExecutionsRequest, TestType,
};

/// Error messages of the executions of the fixture, by start second.
const MESSAGES: [&str; 7] = [
    "Connection refused by db-primary",
    "timeout waiting for lock on table orders",
    "connection reset by peer",
    "assertion failed: expected 3 got 4",
    "",
    "Timeout after 30s; connection pool exhausted",
    "NullPointerException in OrderService",
];

/// Records the fixture's executions in `project` (plus `extra` messages at
/// seconds 100, 101, ...) and returns their ids by start second.
async fn record_fixture(app: &TestApp, project: &str, extra: &[&str]) -> Vec<String> {
    app.test_cases
        .clone()
        .create_test_case(in_project(
            new_test_case("tc-1", TestType::Unit, "core"),
            project,
        ))
        .await
        .unwrap();
    let mut items: Vec<ExecutionInput> = MESSAGES
        .iter()
        .enumerate()
        .map(|(n, m)| ExecutionInput {
            error_message: m.to_string(),
            ..run("tc-1", ExecutionStatus::Failed, n as i64, 5)
        })
        .collect();
    items.extend(extra.iter().enumerate().map(|(n, m)| ExecutionInput {
        error_message: m.to_string(),
        ..run("tc-1", ExecutionStatus::Failed, 100 + n as i64, 5)
    }));
    app.test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: "fixture".into(),
                items,
            },
            project,
        ))
        .await
        .unwrap()
        .into_inner()
        .ids
}

/// The error messages a ListExecutions returns in `project`, every page
/// read `page_size` at a time, in list order.
async fn search_executions(
    app: &TestApp,
    project: &str,
    query: &str,
    page_size: i32,
) -> Result<Vec<String>, tonic::Status> {
    let mut request = ListExecutionsRequest {
        query: query.into(),
        page_size,
        ..Default::default()
    };
    let mut found = Vec::new();
    loop {
        let page = app
            .test_cases
            .clone()
            .list_executions(in_project(request.clone(), project))
            .await?
            .into_inner();
        found.extend(page.executions.into_iter().map(|e| e.error_message));
        if page.next_page_token.is_empty() {
            return Ok(found);
        }
        request.page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn list_executions_finds_error_messages_by_words_in_list_order_per_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    record_fixture(&app, "team-a", &[]).await;
    record_fixture(&app, "team-b", &["connection lost in team b only"]).await;
    let m = |n: usize| MESSAGES[n].to_string();
    // One word, any case, newest first, one per page: the three holding it.
    for query in ["connection", "CONNECTION", "  Connection\t"] {
        assert_eq!(
            search_executions(&app, "team-a", query, 1).await.unwrap(),
            [m(5), m(2), m(0)],
            "{query:?}"
        );
    }
    // The same words found by direct SQL (an independent oracle).
    let by_ilike: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM test_executions \
             WHERE project_id = $1 AND error_message ILIKE '%connection%'",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(by_ilike, 3);
    // Project B has its own, and one more.
    assert_eq!(
        search_executions(&app, "team-b", "connection", 50)
            .await
            .unwrap()
            .len(),
        4
    );
    // Web-search syntax: all words, a phrase, `or`, exclusion.
    let cases: [(&str, Vec<String>); 6] = [
        ("connection timeout", vec![m(5)]),
        ("\"connection refused\"", vec![m(0)]),
        ("\"refused connection\"", vec![]),
        ("connection -reset", vec![m(5), m(0)]),
        ("nullpointerexception or timeout", vec![m(6), m(5), m(1)]),
        ("lost", vec![]),
    ];
    for (query, expected) in cases {
        assert_eq!(
            search_executions(&app, "team-a", query, 2).await.unwrap(),
            expected,
            "{query:?}"
        );
    }
    // No stemming ('simple'): a word matches as written.
    assert!(
        search_executions(&app, "team-a", "connections", 50)
            .await
            .unwrap()
            .is_empty()
    );
    // With other filters: the query narrows them.
    let page = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                query: "connection".into(),
                started: Some(verdict::proto::TimeRange {
                    start_time: crate::test_cases::at(1),
                    end_time: None,
                }),
                view: verdict::proto::ExecutionView::Basic as i32,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<_> = page
        .executions
        .into_iter()
        .map(|e| e.error_message)
        .collect();
    assert_eq!(got, [m(5), m(2)]);
}

#[tokio::test]
async fn a_page_token_is_bound_to_its_query() {
    let app = spawn_app().await;
    record_fixture(&app, "default", &[]).await;
    let first = app
        .test_cases
        .clone()
        .list_executions(ListExecutionsRequest {
            query: "connection".into(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    for other in ["timeout", "", "connection reset"] {
        let err = app
            .test_cases
            .clone()
            .list_executions(ListExecutionsRequest {
                query: other.into(),
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    }
    // The same query (whitespace around it aside) resumes.
    let next = app
        .test_cases
        .clone()
        .list_executions(ListExecutionsRequest {
            query: " connection ".into(),
            page_size: 1,
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.executions[0].error_message, MESSAGES[2]);
    // The other lists bind theirs too.
    let session = crate::sessions::create(&app, "s-token").await;
    for n in 0..3 {
        app.sessions
            .clone()
            .append_session_log(AppendSessionLogRequest {
                session_id: session.id.clone(),
                level: LogLevel::Info as i32,
                message: format!("step {n} done"),
                fields: None,
            })
            .await
            .unwrap();
    }
    let logs = |query: &str, token: String| ListSessionLogsRequest {
        session_id: session.id.clone(),
        query: query.into(),
        page_size: 1,
        page_token: token,
        ..Default::default()
    };
    let first = app
        .sessions
        .clone()
        .list_session_logs(logs("done", String::new()))
        .await
        .unwrap()
        .into_inner();
    let err = app
        .sessions
        .clone()
        .list_session_logs(logs("step", first.next_page_token.clone()))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let err = app
        .sessions
        .clone()
        .list_session_logs(logs("", first.next_page_token))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
}

#[tokio::test]
async fn discrepancies_session_logs_and_test_cases_are_found_by_words_per_project() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    for project in ["team-a", "team-b"] {
        // Discrepancies: descriptions.
        let session = app
            .sessions
            .clone()
            .create_session(in_project(new_session("s-1"), project))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        let descriptions = [
            "rounding differs in invoice totals",
            "encoding of customer names differs",
            "Invoice date truncated",
        ];
        let items = descriptions
            .iter()
            .enumerate()
            .map(|(n, d)| verdict::proto::DiscrepancyInput {
                description: d.to_string(),
                ..item(n)
            })
            .collect();
        app.discrepancies
            .clone()
            .record_discrepancies(in_project(
                RecordDiscrepanciesRequest {
                    session_id: session.id.clone(),
                    batch_id: "b-1".into(),
                    items,
                },
                project,
            ))
            .await
            .unwrap();
        // Session logs: messages.
        for message in [
            "loading source tables",
            "comparing invoice rows",
            "source tables loaded",
        ] {
            app.sessions
                .clone()
                .append_session_log(in_project(
                    AppendSessionLogRequest {
                        session_id: session.id.clone(),
                        level: LogLevel::Info as i32,
                        message: message.into(),
                        fields: None,
                    },
                    project,
                ))
                .await
                .unwrap();
        }
        // Test cases: names and descriptions.
        for (key, name, description) in [
            ("tc-1", "invoice totals", "sums every line"),
            ("tc-2", "customer export", "writes the invoice file"),
            ("tc-3", "login", "checks passwords"),
        ] {
            app.test_cases
                .clone()
                .create_test_case(in_project(
                    verdict::proto::CreateTestCaseRequest {
                        name: name.into(),
                        description: description.into(),
                        ..new_test_case(key, TestType::Unit, "core")
                    },
                    project,
                ))
                .await
                .unwrap();
        }
    }
    // Project B gets one more of each holding the word.
    let b_session = app
        .sessions
        .clone()
        .list_sessions(in_project(ListSessionsRequest::default(), "team-b"))
        .await
        .unwrap()
        .into_inner()
        .sessions
        .remove(0)
        .id;
    app.sessions
        .clone()
        .append_session_log(in_project(
            AppendSessionLogRequest {
                session_id: b_session.clone(),
                level: LogLevel::Warning as i32,
                message: "invoice rows differ".into(),
                fields: None,
            },
            "team-b",
        ))
        .await
        .unwrap();
    app.test_cases
        .clone()
        .create_test_case(in_project(
            verdict::proto::CreateTestCaseRequest {
                name: "invoice pdf".into(),
                ..new_test_case("tc-4", TestType::Unit, "core")
            },
            "team-b",
        ))
        .await
        .unwrap();

    // Discrepancies, most severe first (item(0) critical, item(2) medium).
    let found = app
        .discrepancies
        .clone()
        .list_discrepancies(in_project(
            ListDiscrepanciesRequest {
                query: "invoice".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .discrepancies;
    let got: Vec<_> = found.iter().map(|d| d.description.as_str()).collect();
    assert_eq!(
        got,
        [
            "rounding differs in invoice totals",
            "Invoice date truncated"
        ]
    );
    let found = app
        .discrepancies
        .clone()
        .list_discrepancies(in_project(
            ListDiscrepanciesRequest {
                query: "differs -invoice".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .discrepancies;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].description, "encoding of customer names differs");

    // Session logs, in sequence order, one per page.
    let a_session = app
        .sessions
        .clone()
        .list_sessions(in_project(ListSessionsRequest::default(), "team-a"))
        .await
        .unwrap()
        .into_inner()
        .sessions
        .remove(0)
        .id;
    let mut request = ListSessionLogsRequest {
        session_id: a_session.clone(),
        query: "source tables".into(),
        page_size: 1,
        ..Default::default()
    };
    let mut messages = Vec::new();
    loop {
        let page = app
            .sessions
            .clone()
            .list_session_logs(in_project(request.clone(), "team-a"))
            .await
            .unwrap()
            .into_inner();
        messages.extend(page.entries.into_iter().map(|e| (e.sequence, e.message)));
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    assert_eq!(
        messages,
        [
            (1, "loading source tables".to_string()),
            (3, "source tables loaded".to_string())
        ]
    );
    // B's session from A is NOT_FOUND, query or not.
    let err = app
        .sessions
        .clone()
        .list_session_logs(in_project(
            ListSessionLogsRequest {
                session_id: b_session,
                query: "invoice".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Test cases, in key order: the word in a name or a description.
    let keys = |project: &'static str, query: &'static str| {
        let mut c = app.test_cases.clone();
        async move {
            c.list_test_cases(in_project(
                ListTestCasesRequest {
                    query: query.into(),
                    ..Default::default()
                },
                project,
            ))
            .await
            .unwrap()
            .into_inner()
            .test_cases
            .into_iter()
            .map(|t| t.key)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(keys("team-a", "invoice").await, ["tc-1", "tc-2"]);
    assert_eq!(keys("team-b", "invoice").await, ["tc-1", "tc-2", "tc-4"]);
    assert_eq!(
        keys("team-a", "passwords or export").await,
        ["tc-2", "tc-3"]
    );
    assert!(keys("team-a", "pdf").await.is_empty());
}

#[tokio::test]
async fn hostile_queries_are_words_or_refused_never_sql_errors() {
    let app = spawn_app().await;
    record_fixture(&app, "default", &[]).await;
    let session = crate::sessions::create(&app, "s-hostile").await;
    app.sessions
        .clone()
        .append_session_log(AppendSessionLogRequest {
            session_id: session.id.clone(),
            level: LogLevel::Info as i32,
            message: "connection refused".into(),
            fields: None,
        })
        .await
        .unwrap();
    app.discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: session.id.clone(),
            batch_id: "b".into(),
            items: vec![item(0)],
        })
        .await
        .unwrap();

    /// The number of items each of the four lists returns for `query`.
    async fn counts(
        app: &TestApp,
        session_id: &str,
        query: &str,
    ) -> Vec<Result<usize, tonic::Status>> {
        let executions = app
            .test_cases
            .clone()
            .list_executions(ListExecutionsRequest {
                query: query.into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().executions.len());
        let discrepancies = app
            .discrepancies
            .clone()
            .list_discrepancies(ListDiscrepanciesRequest {
                query: query.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().discrepancies.len());
        let logs = app
            .sessions
            .clone()
            .list_session_logs(ListSessionLogsRequest {
                session_id: session_id.into(),
                query: query.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().entries.len());
        let test_cases = app
            .test_cases
            .clone()
            .list_test_cases(ListTestCasesRequest {
                query: query.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().test_cases.len());
        vec![executions, discrepancies, logs, test_cases]
    }

    let unfiltered: Vec<usize> = counts(&app, &session.id, "")
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(unfiltered, [7, 1, 1, 1]);
    // Empty and whitespace-only queries are no filter.
    for blank in [" ", "\t\n  ", "\r\n"] {
        let got: Vec<usize> = counts(&app, &session.id, blank)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, unfiltered, "{blank:?}");
    }
    // Operators, quotes and SQL of every kind are text: each list answers,
    // none fails.
    let hostile = [
        "'",
        "''",
        "&|!:*()",
        "\\",
        "'); DROP TABLE test_executions; --",
        "connection:* & !refused",
        "a <-> b",
        "\"unclosed phrase",
        "-",
        "or",
        "-connection",
        "%_%",
        "$1",
        "\u{feff}connection\u{200b}",
        "connexión rechazada 接続",
        &"(".repeat(200),
    ];
    for query in hostile {
        for result in counts(&app, &session.id, query).await {
            let n = result.unwrap_or_else(|e| panic!("{query:?}: {e:?}"));
            assert!(n <= 7, "{query:?}");
        }
    }
    // Punctuation only: no word, nothing matches.
    let got: Vec<usize> = counts(&app, &session.id, "&|!:*()")
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(got, [0, 0, 0, 0]);
    // The table is still there, with its rows.
    let n: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM test_executions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 7);
    // Over 200 characters, or with control characters: INVALID_ARGUMENT
    // on `query`, in every list.
    for bad in [
        "x".repeat(201),
        "y ".repeat(5000),
        "a\0b".into(),
        "a\u{1b}[2Jb".into(),
    ] {
        for result in counts(&app, &session.id, &bad).await {
            let err = result.unwrap_err();
            assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
            assert_eq!(violated_fields(&err), ["query"]);
        }
    }
    // 200 characters exactly is accepted.
    for result in counts(&app, &session.id, &"z".repeat(200)).await {
        assert_eq!(result.unwrap(), 0);
    }
}
