//! Pages and exports bounded by bytes: however large the rows, no reply is
//! too large to send, and paging or exporting returns every row once.

use crate::helpers::{
    TestApp, create_database, spawn_app, spawn_app_with, test_config, violations,
};
use crate::results::new_result;
use crate::sessions::create;
use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use std::collections::{HashMap, HashSet};
use tokio::sync::mpsc;
use tonic::Code;
use tonic_types::StatusExt;
use verdict::admin::export;
use verdict::call::Call;
use verdict::proto::export_record::Record;
use verdict::proto::{
    ExportSessionRequest, ExportSessionResponse, ListResultsRequest, ListResultsResponse,
    ResultView, ValidationResult,
};

/// The gateway's default message limit (`max_message_bytes`).
const LIMIT: usize = 4 * 1024 * 1024;
/// Characters of the string in each large representation: about 1 MB, under
/// the 1 MiB JSON limit of a representation.
const BLOB: usize = 1_000_000;

/// `{"tag": tag, "blob": "<fill × BLOB>"}`.
fn large(tag: &str, fill: char) -> Struct {
    let text = |s: String| Value {
        kind: Some(Kind::StringValue(s)),
    };
    Struct {
        fields: [
            ("tag".to_string(), text(tag.to_string())),
            ("blob".to_string(), text(fill.to_string().repeat(BLOB))),
        ]
        .into(),
    }
}

fn tag_of(s: &Struct) -> &str {
    match &s.fields["tag"].kind {
        Some(Kind::StringValue(t)) => t,
        other => panic!("tag is {other:?}"),
    }
}

/// Records `n` results of a session, each with two ~1 MB representations.
async fn record_large(app: &TestApp, session_id: &str, n: usize) -> Vec<ValidationResult> {
    let mut stored = Vec::new();
    for i in 0..n {
        let mut req = new_result(session_id, &format!("large-{i}"), 0.5);
        req.source_representation = Some(large(&format!("src-{i}"), 's').into());
        req.target_representation = Some(large(&format!("tgt-{i}"), 't').into());
        stored.push(crate::results::record(app, req).await);
    }
    stored
}

/// Inserts `n` small results of a session whose ids sort before any id
/// the gateway assigns (UUIDv7), so exports read them first.
async fn insert_small(app: &TestApp, session_id: &str, n: i64) {
    app.sql()
        .await
        .execute(
            "INSERT INTO results (id, session_id, request_id, result_type, overall_status, \
             fidelity_score, summary, execution_time_ms, source_representation, project_id) \
             SELECT ('00000000-0000-4000-8000-' || lpad(i::text, 12, '0'))::uuid, $1::text::uuid, \
                    'small-' || i, 'static', 'passed', 0.9, 'small', 1, \
                    jsonb_build_object('tag', 'small-' || i), \
                    (SELECT project_id FROM sessions WHERE id = $1::text::uuid) \
             FROM generate_series(1, $2::bigint) i",
            &[&session_id, &n],
        )
        .await
        .expect("insert small results");
}

/// Every result id in list order (newest first), from the database.
async fn ids_in_list_order(app: &TestApp) -> Vec<String> {
    app.sql()
        .await
        .query(
            "SELECT id::text FROM results ORDER BY created_at DESC, id DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn list(
    app: &TestApp,
    req: ListResultsRequest,
) -> Result<ListResultsResponse, tonic::Status> {
    app.results
        .clone()
        .list_results(req)
        .await
        .map(|r| r.into_inner())
}

/// Pages through ListResults with `view`, returning the pages.
async fn all_pages(app: &TestApp, session_id: &str, view: ResultView) -> Vec<ListResultsResponse> {
    let mut pages = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let page = list(
            app,
            ListResultsRequest {
                session_id: session_id.into(),
                page_token: token,
                view: view as i32,
                ..Default::default()
            },
        )
        .await
        .expect("a page");
        token = page.next_page_token.clone();
        pages.push(page);
        if token.is_empty() {
            return pages;
        }
    }
    panic!("paging did not end within 1000 pages");
}

#[tokio::test]
async fn list_results_of_large_results_stops_pages_by_bytes_and_returns_every_result_once_in_order()
{
    let app = spawn_app().await;
    let s = create(&app, "large").await;
    let large = record_large(&app, &s.id, 12).await;
    insert_small(&app, &s.id, 40).await;
    let by_id: HashMap<&str, &ValidationResult> =
        large.iter().map(|r| (r.id.as_str(), r)).collect();

    // The default page (50) of 52 results, 12 of them ~2 MB, once failed
    // OUT_OF_RANGE ("encoded message length too large").
    let pages = all_pages(&app, &s.id, ResultView::Unspecified).await;
    let first = &pages[0];
    assert!(
        !first.results.is_empty() && first.results.len() < 50,
        "the first page stops by bytes: {} results",
        first.results.len()
    );
    for page in &pages {
        assert!(page.encoded_len() <= LIMIT, "{} bytes", page.encoded_len());
        assert!(!page.results.is_empty(), "no page is empty");
    }
    assert!(pages.len() >= 6, "12 results of 2 MB take at least 6 pages");
    let listed: Vec<String> = pages
        .iter()
        .flat_map(|p| p.results.iter().map(|r| r.id.clone()))
        .collect();
    assert_eq!(listed, ids_in_list_order(&app).await, "each once, in order");
    // The large ones come back whole.
    let mut seen_large = 0;
    for r in pages.iter().flat_map(|p| &p.results) {
        if let Some(recorded) = by_id.get(r.id.as_str()) {
            assert_eq!(&r, recorded);
            seen_large += 1;
        }
    }
    assert_eq!(seen_large, 12);

    // A careless caller's page of 1000 holds about one reply too, and the
    // gateway fetched no more than that from the database: the FULL list
    // query stops reading rows once their JSON reaches the reply limit.
    let hostile = ListResultsRequest {
        session_id: s.id.clone(),
        page_size: 1000,
        ..Default::default()
    };
    let page = list(&app, hostile.clone()).await.unwrap();
    // The 40 small results are the newest; at most two large ones follow.
    assert!(page.results.len() <= 42 && !page.next_page_token.is_empty());
    let query = verdict::results::ListResults::try_from(hostile).unwrap();
    let mut conn = app.db.conn(&Call::default()).await.unwrap();
    let project = crate::helpers::default_project(&app).await;
    let fetched =
        verdict::results::sql::list(conn.client().await.unwrap(), project, &query, LIMIT as i64)
            .await
            .unwrap();
    assert!(fetched.cut, "the query left the other rows out");
    let large_fetched = fetched
        .rows
        .iter()
        .filter(|r| r.get::<_, &str>("request_id").starts_with("large-"))
        .count();
    assert!(
        (1..=3).contains(&large_fetched),
        "{large_fetched} rows of ~2 MB fetched for a 4 MiB reply"
    );
}

#[tokio::test]
async fn export_of_large_results_and_many_small_rows_sends_each_record_once_in_bounded_messages_and_batches()
 {
    let app = spawn_app().await;
    let s = create(&app, "export").await;
    // Small results first (lower ids), then large ones: a batch that grew
    // on small rows must still not swallow the large ones whole.
    insert_small(&app, &s.id, 2500).await;
    record_large(&app, &s.id, 12).await;
    app.sql()
        .await
        .execute(
            "INSERT INTO session_logs (session_id, level, message, project_id) \
             SELECT $1::text::uuid, 'info', 'step ' || i, \
                    (SELECT project_id FROM sessions WHERE id = $1::text::uuid) \
             FROM generate_series(1, 1500) i",
            &[&s.id],
        )
        .await
        .unwrap();

    let mut stream = app
        .admin
        .clone()
        .export_session(ExportSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .expect("export starts")
        .into_inner();
    let mut result_ids = Vec::new();
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    let mut large_seen = 0;
    let mut messages = 0;
    while let Some(chunk) = stream.message().await.expect("export completes") {
        messages += 1;
        assert!(
            chunk.encoded_len() <= LIMIT,
            "{} bytes",
            chunk.encoded_len()
        );
        assert!(chunk.records.len() <= 1000);
        for r in chunk.records {
            let kind = match r.record.expect("a record") {
                Record::Session(_) => "session",
                Record::LogEntry(_) => "log",
                Record::Result(x) => {
                    if x.request_id.starts_with("large-") {
                        large_seen += 1;
                        let src = x.source_representation.as_ref().expect("source");
                        assert_eq!(tag_of(src), format!("src-{}", &x.request_id[6..]));
                    }
                    result_ids.push(x.id);
                    "result"
                }
                _ => "other",
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    assert_eq!((kinds["session"], kinds["log"]), (1, 1500));
    assert_eq!(large_seen, 12);
    let unique: HashSet<&String> = result_ids.iter().collect();
    assert_eq!(unique.len(), result_ids.len(), "no result twice");
    let stored: HashSet<String> = ids_in_list_order(&app).await.into_iter().collect();
    assert_eq!(unique.len(), 2512);
    assert_eq!(
        unique.into_iter().cloned().collect::<HashSet<_>>(),
        stored,
        "every result once"
    );
    assert!(messages >= 7, "12 × 2 MB need at least 7 messages of 4 MiB");

    // The same export read directly: no batch held more than about one
    // message of rows (the budget plus the one row that crossed it), though
    // the small rows before the large ones grew batches to 1000 rows.
    let mut conn = app.db.conn(&Call::default()).await.unwrap();
    let snapshot = conn.begin_snapshot().await.unwrap();
    let (tx, mut rx) = mpsc::channel::<Result<ExportSessionResponse, ()>>(1);
    let reader = tokio::spawn(async move {
        let (mut records, mut largest) = (0, 0);
        while let Some(Ok(m)) = rx.recv().await {
            records += m.records.len();
            largest = largest.max(m.encoded_len());
        }
        (records, largest)
    });
    let mut chunks = export::Chunks::new(&tx, LIMIT);
    let project = crate::helpers::default_project(&app).await;
    let stats = export::run(
        &snapshot,
        project,
        s.id.parse().unwrap(),
        LIMIT,
        &mut chunks,
    )
    .await
    .expect("export runs");
    assert!(chunks.flush().await);
    drop(chunks);
    drop(tx);
    let (records, largest_message) = reader.await.unwrap();
    assert_eq!(records as u64, stats.records);
    assert_eq!(stats.records, 1 + 1500 + 2512);
    assert!(largest_message <= LIMIT);
    assert_eq!(
        stats.largest_fetch_rows, 1000,
        "small rows are read 1000 at a time"
    );
    let one_large = 2 * BLOB as u64 + 1024;
    assert!(
        stats.largest_fetch_bytes <= LIMIT as u64 + one_large,
        "a batch held {} bytes",
        stats.largest_fetch_bytes
    );
}

#[tokio::test]
async fn list_results_basic_view_leaves_the_representations_out_and_full_returns_them() {
    let app = spawn_app().await;
    let s = create(&app, "views").await;
    let large = record_large(&app, &s.id, 12).await;

    let full = all_pages(&app, &s.id, ResultView::Full).await;
    let unspecified = all_pages(&app, &s.id, ResultView::Unspecified).await;
    assert_eq!(full, unspecified, "UNSPECIFIED is FULL");
    let full: Vec<ValidationResult> = full.into_iter().flat_map(|p| p.results).collect();

    let basic = all_pages(&app, &s.id, ResultView::Basic).await;
    assert_eq!(
        basic.len(),
        1,
        "12 results without representations fit one page"
    );
    let basic = &basic[0].results;
    assert_eq!(basic.len(), 12);
    for (b, f) in basic.iter().zip(&full) {
        assert_eq!(b.source_representation, None);
        assert_eq!(b.target_representation, None);
        // Every other field is the FULL one.
        let mut stripped = f.clone();
        stripped.source_representation = None;
        stripped.target_representation = None;
        assert_eq!(b, &stripped);
    }
    let recorded: HashMap<&str, &ValidationResult> =
        large.iter().map(|r| (r.id.as_str(), r)).collect();
    for f in &full {
        assert_eq!(&f, recorded.get(f.id.as_str()).expect("a recorded result"));
        assert!(f.source_representation.is_some() && f.target_representation.is_some());
    }
}

#[tokio::test]
async fn list_results_refuses_a_page_token_from_another_view_and_an_unknown_view() {
    let app = spawn_app().await;
    let s = create(&app, "tokens").await;
    insert_small(&app, &s.id, 3).await;
    let page = |view: ResultView, token: &str| ListResultsRequest {
        session_id: s.id.clone(),
        page_size: 1,
        page_token: token.into(),
        view: view as i32,
        ..Default::default()
    };
    let basic_token = list(&app, page(ResultView::Basic, ""))
        .await
        .unwrap()
        .next_page_token;
    let full_token = list(&app, page(ResultView::Full, ""))
        .await
        .unwrap()
        .next_page_token;
    for (view, token) in [
        (ResultView::Full, &basic_token),
        (ResultView::Unspecified, &basic_token),
        (ResultView::Basic, &full_token),
    ] {
        let err = list(&app, page(view, token)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{view:?}");
        let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["page_token"], "{view:?}");
        assert_eq!(
            err.get_details_error_info().expect("ErrorInfo").reason,
            "INVALID_PAGE_TOKEN",
            "{view:?}"
        );
    }
    // UNSPECIFIED and FULL are one view: their tokens are interchangeable.
    let next = list(&app, page(ResultView::Unspecified, &full_token))
        .await
        .expect("a FULL token continues an UNSPECIFIED list");
    assert_eq!(next.results.len(), 1);

    let mut unknown = page(ResultView::Full, "");
    unknown.view = 7;
    let err = list(&app, unknown).await.unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["view"]);
}

#[tokio::test]
async fn a_result_larger_than_a_lowered_limit_fails_its_page_clearly_and_basic_lists_past_it() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let s = create(&app, "lowered").await;
    insert_small(&app, &s.id, 2).await;
    record_large(&app, &s.id, 1).await;
    app.stop().await.unwrap();

    // The same database behind a gateway whose limit is now 1 MiB: the
    // 2 MB result can no longer be sent by any reply.
    let mut config = test_config(&url);
    config.max_message_bytes = 1024 * 1024;
    let app = spawn_app_with(config).await;
    let err = list(
        &app,
        ListResultsRequest {
            session_id: s.id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "MESSAGE_TOO_LARGE"
    );
    assert!(
        err.message().contains("VERDICT_MAX_MESSAGE_BYTES"),
        "{}",
        err.message()
    );

    let pages = all_pages(&app, &s.id, ResultView::Basic).await;
    let listed: Vec<String> = pages
        .iter()
        .flat_map(|p| p.results.iter().map(|r| r.id.clone()))
        .collect();
    assert_eq!(listed, ids_in_list_order(&app).await);
}

fn small_struct(key: &str, text: &str) -> verdict::structs::Struct {
    Struct {
        fields: [(
            key.to_string(),
            Value {
                kind: Some(Kind::StringValue(text.to_string())),
            },
        )]
        .into(),
    }
    .into()
}

#[tokio::test]
async fn list_executions_basic_view_leaves_the_large_fields_out_and_full_returns_them() {
    use crate::test_cases::{create_test_case, new_test_case, run};
    use verdict::proto::{
        ExecutionStatus, ExecutionView, ListExecutionsRequest, RecordExecutionsRequest, TestType,
    };
    let app = spawn_app().await;
    create_test_case(&app, new_test_case("test-views", TestType::Unit, "core")).await;
    let items: Vec<_> = (0..3)
        .map(|i| {
            let mut e = run("test-views", ExecutionStatus::Failed, i, 10);
            e.environment = Some(small_struct("os", "linux"));
            e.error_message = format!("boom {i}");
            e.stack_trace = "at main.rs:1".repeat(100);
            e.screenshot_refs = vec![format!("shot-{i}")];
            e.interaction_log = vec![small_struct("step", "click"), small_struct("step", "type")];
            e.performance = [("p99_ms".to_string(), 12.5)].into();
            e
        })
        .collect();
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "views".into(),
            items,
        })
        .await
        .unwrap();
    let list = |view: ExecutionView, token: String| {
        let mut client = app.test_cases.clone();
        async move {
            client
                .list_executions(ListExecutionsRequest {
                    test_case_key: "test-views".into(),
                    page_size: 2,
                    page_token: token,
                    view: view as i32,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let full = list(ExecutionView::Unspecified, String::new())
        .await
        .unwrap();
    let basic = list(ExecutionView::Basic, String::new()).await.unwrap();
    assert_eq!(full.executions.len(), 2);
    for (b, f) in basic.executions.iter().zip(&full.executions) {
        assert_eq!(f.environment.as_ref(), Some(&small_struct("os", "linux")));
        assert_eq!(f.interaction_log.len(), 2);
        assert_eq!(f.performance["p99_ms"], 12.5);
        assert!(!f.stack_trace.is_empty());
        assert_eq!(b.environment, None);
        assert!(b.interaction_log.is_empty() && b.performance.is_empty());
        assert_eq!(b.stack_trace, "");
        // error_message and screenshot_refs stay, like every other field.
        let mut stripped = f.clone();
        stripped.environment = None;
        stripped.interaction_log.clear();
        stripped.performance.clear();
        stripped.stack_trace.clear();
        assert_eq!(b, &stripped);
    }
    // Each view pages on with its own token only.
    let rest = list(ExecutionView::Basic, basic.next_page_token.clone())
        .await
        .unwrap();
    assert_eq!(rest.executions.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let err = list(ExecutionView::Full, basic.next_page_token)
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["page_token"]);
}

#[tokio::test]
async fn list_sessions_basic_view_leaves_config_input_refs_and_metadata_out() {
    use crate::sessions::new_session;
    use verdict::proto::{ListSessionsRequest, SessionView};
    let app = spawn_app().await;
    for i in 0..3 {
        let mut req = new_session(&format!("view-{i}"));
        req.input_refs = Some(small_struct("repo", "git://example/x"));
        req.metadata = Some(small_struct("owner", "qa"));
        app.sessions.clone().create_session(req).await.unwrap();
    }
    let list = |view: SessionView, token: String| {
        let mut client = app.sessions.clone();
        async move {
            client
                .list_sessions(ListSessionsRequest {
                    page_size: 2,
                    page_token: token,
                    view: view as i32,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let full = list(SessionView::Full, String::new()).await.unwrap();
    let basic = list(SessionView::Basic, String::new()).await.unwrap();
    assert_eq!(basic.sessions.len(), 2);
    for (b, f) in basic.sessions.iter().zip(&full.sessions) {
        assert!(f.config.is_some());
        assert_eq!(f.input_refs, Some(small_struct("repo", "git://example/x")));
        assert_eq!(f.metadata, Some(small_struct("owner", "qa")));
        let mut stripped = f.clone();
        stripped.config = None;
        stripped.input_refs = None;
        stripped.metadata = None;
        assert_eq!(b, &stripped);
    }
    let err = list(SessionView::Unspecified, basic.next_page_token.clone())
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
    assert_eq!(fields, ["page_token"]);
    let rest = list(SessionView::Basic, basic.next_page_token)
        .await
        .unwrap();
    assert_eq!(rest.sessions.len(), 1);
    assert_eq!(rest.sessions[0].metadata, None);
}

/// Every result of an export stream, or the status that ended it.
async fn export_result_ids(app: &TestApp, session_id: &str) -> Result<Vec<String>, tonic::Status> {
    let mut stream = app
        .admin
        .clone()
        .export_session(ExportSessionRequest {
            session_id: session_id.into(),
        })
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.encoded_len() <= LIMIT);
        for r in chunk.records {
            if let Some(Record::Result(x)) = r.record {
                ids.push(x.id);
            }
        }
    }
    Ok(ids)
}

#[tokio::test]
async fn concurrent_pagers_and_exports_see_every_result_once_while_writers_add_more() {
    let app = spawn_app().await;
    let s = create(&app, "concurrent").await;
    record_large(&app, &s.id, 8).await;
    insert_small(&app, &s.id, 40).await;
    let before = ids_in_list_order(&app).await;

    let writer = {
        let mut client = app.results.clone();
        let session_id = s.id.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let mut req = new_result(&session_id, &format!("late-{i}"), 0.7);
                req.source_representation = Some(large(&format!("late-{i}"), 'l').into());
                client.record_result(req).await.expect("a concurrent write");
            }
        })
    };
    let pagers = (0..3).map(|_| {
        let app = &app;
        let session_id = s.id.clone();
        async move {
            let pages = all_pages(app, &session_id, ResultView::Full).await;
            pages
                .into_iter()
                .flat_map(|p| p.results.into_iter().map(|r| r.id))
                .collect::<Vec<_>>()
        }
    });
    let exports = (0..2).map(|_| export_result_ids(&app, &s.id));
    let (listed, exported) = tokio::join!(
        futures::future::join_all(pagers),
        futures::future::join_all(exports)
    );
    writer.await.unwrap();

    let after = ids_in_list_order(&app).await;
    assert_eq!(after.len(), before.len() + 20);
    let position: HashMap<&String, usize> =
        after.iter().enumerate().map(|(i, id)| (id, i)).collect();
    for ids in &listed {
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "no result twice");
        assert!(
            before.iter().all(|id| unique.contains(id)),
            "every earlier result"
        );
        assert!(
            ids.windows(2).all(|w| position[&w[0]] < position[&w[1]]),
            "in list order"
        );
    }
    for ids in exported {
        let ids = ids.expect("the export completes");
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "no result twice");
        assert!(
            before.iter().all(|id| unique.contains(id)),
            "every earlier result"
        );
    }
}

#[tokio::test]
async fn an_export_whose_backend_is_terminated_mid_way_ends_with_an_error_not_a_short_stream() {
    let app = spawn_app().await;
    let s = create(&app, "fault").await;
    // Five messages' worth: the export is still reading results when the
    // reader has taken the first message.
    record_large(&app, &s.id, 10).await;
    let mut stream = app
        .admin
        .clone()
        .export_session(ExportSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut results = 0;
    let first = stream.message().await.unwrap().expect("a first chunk");
    results += first
        .records
        .iter()
        .filter(|r| matches!(r.record, Some(Record::Result(_))))
        .count();
    // The export holds its snapshot open while this reader waits: end its
    // backend (in its transaction, its last statement read a batch of
    // results; idle pooled connections that once ran an export are spared).
    let sql = app.sql().await;
    let mut terminated = false;
    for _ in 0..200 {
        let n: i64 = sql
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND state <> 'idle' AND query LIKE '%bytes_before%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            terminated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(terminated, "the export's backend was found");
    let end = loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                results += chunk
                    .records
                    .iter()
                    .filter(|r| matches!(r.record, Some(Record::Result(_))))
                    .count()
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let status = end.expect("the stream ends with an error, not as if complete");
    assert!(results < 10, "{results} results before the error");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("bytes_before"), "no SQL leaks");
    // The gateway serves the next export whole: the connection that carried
    // the FATAL is checked, found closed and replaced before reuse.
    assert_eq!(export_result_ids(&app, &s.id).await.unwrap().len(), 10);
}

#[tokio::test]
async fn list_executions_with_large_interaction_logs_pages_by_bytes_and_fetches_about_one_reply() {
    use crate::test_cases::{create_test_case, new_test_case, run};
    use verdict::proto::{
        ExecutionStatus, ListExecutionsRequest, RecordExecutionsRequest, TestType,
    };
    let app = spawn_app().await;
    let test_case = create_test_case(&app, new_test_case("test-large", TestType::Unit, "io")).await;
    // 40 executions with a ~200 KB interaction log each: 8 MB in all.
    for batch in 0..4 {
        let items = (0..10)
            .map(|i| {
                let mut e = run("test-large", ExecutionStatus::Passed, batch * 10 + i, 5);
                e.interaction_log = vec![small_struct("screen", &"z".repeat(200_000))];
                e
            })
            .collect();
        app.test_cases
            .clone()
            .record_executions(RecordExecutionsRequest {
                batch_id: format!("large-{batch}"),
                items,
            })
            .await
            .expect("record a batch");
    }
    let request = |token: String| ListExecutionsRequest {
        test_case_key: "test-large".into(),
        page_size: 1000,
        page_token: token,
        ..Default::default()
    };
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .test_cases
            .clone()
            .list_executions(request(token))
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= LIMIT);
        assert!(page.executions.iter().all(|e| e.interaction_log.len() == 1));
        ids.extend(page.executions.into_iter().map(|e| e.id));
        token = page.next_page_token;
        if token.is_empty() || pages > 40 {
            break;
        }
    }
    assert!(pages >= 2, "8 MB take at least two pages");
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (40, 40), "every execution once");

    let query =
        verdict::test_cases::executions::ListExecutions::try_from(request(String::new())).unwrap();
    let mut conn = app.db.conn(&Call::default()).await.unwrap();
    let fetched = verdict::test_cases::executions_sql::list(
        conn.client().await.unwrap(),
        crate::helpers::default_project(&app).await,
        &query,
        Some(test_case.id.parse().unwrap()),
        LIMIT as i64,
    )
    .await
    .unwrap();
    assert!(fetched.cut, "the query left rows out");
    assert!(
        fetched.rows.len() <= 22,
        "{} rows of ~200 KB fetched for a 4 MiB reply",
        fetched.rows.len()
    );
}

/// Every way a page token can be refused: INVALID_ARGUMENT, reason
/// INVALID_PAGE_TOKEN, one violation of `page_token`.
#[tokio::test]
async fn every_refused_page_token_has_reason_invalid_page_token() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use verdict::proto::ListSessionsRequest;
    let app = spawn_app().await;
    let s = create(&app, "token kinds").await;
    create(&app, "token kinds 2").await;
    insert_small(&app, &s.id, 3).await;
    // `filtered`: with a min_fidelity filter the first call had not.
    let results = |token: &str, filtered: bool, view: ResultView| ListResultsRequest {
        session_id: s.id.clone(),
        page_size: 1,
        page_token: token.into(),
        min_fidelity: filtered.then_some(0.1),
        view: view as i32,
        ..Default::default()
    };
    let token = list(&app, results("", false, ResultView::Full))
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());
    let sessions_token = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!sessions_token.is_empty());
    let (payload, mac) = token.split_once('.').unwrap();
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let altered = format!(
        "{}.{mac}",
        URL_SAFE_NO_PAD.encode(json.replace("\"v\":2", "\"v\":3"))
    );
    let forged = format!("{payload}.{}", URL_SAFE_NO_PAD.encode([7u8; 16]));
    let unsigned = format!("{payload}.");
    let cases = [
        ("malformed", results("not-a-token", false, ResultView::Full)),
        (
            "too long",
            results(&"A".repeat(5000), false, ResultView::Full),
        ),
        ("altered", results(&altered, false, ResultView::Full)),
        ("forged MAC", results(&forged, false, ResultView::Full)),
        ("no MAC", results(&unsigned, false, ResultView::Full)),
        ("another filter", results(&token, true, ResultView::Full)),
        ("another view", results(&token, false, ResultView::Basic)),
        (
            "another list",
            results(&sessions_token, false, ResultView::Full),
        ),
    ];
    for (kind, request) in cases {
        let err = list(&app, request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{kind}: {err:?}");
        assert_eq!(
            err.get_details_error_info().expect("ErrorInfo").reason,
            "INVALID_PAGE_TOKEN",
            "{kind}"
        );
        let fields: Vec<String> = violations(&err).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["page_token"], "{kind}");
        assert!(!err.message().contains("SELECT"), "{kind}");
    }
    // A token from another list is refused by that list too.
    let err = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "INVALID_PAGE_TOKEN"
    );
    // Other invalid fields keep INVALID_FIELD.
    let mut bad_view = results("", false, ResultView::Full);
    bad_view.view = 9;
    let err = list(&app, bad_view).await.unwrap_err();
    assert_eq!(
        err.get_details_error_info().expect("ErrorInfo").reason,
        "INVALID_FIELD"
    );
    // The valid token still works.
    list(&app, results(&token, false, ResultView::Full))
        .await
        .expect("the token continues its own list");
}

#[tokio::test]
async fn list_sessions_with_large_json_pages_by_bytes_and_fetches_about_one_reply() {
    use crate::sessions::new_session;
    use verdict::proto::ListSessionsRequest;
    let app = spawn_app().await;
    // 40 sessions with three ~60 KB JSON fields each: about 7 MB in all.
    for i in 0..40 {
        let mut req = new_session(&format!("large-session-{i}"));
        req.config = Some(small_struct("c", &"c".repeat(60_000)));
        req.input_refs = Some(small_struct("i", &"i".repeat(60_000)));
        req.metadata = Some(small_struct("m", &"m".repeat(60_000)));
        app.sessions
            .clone()
            .create_session(req)
            .await
            .expect("create a large session");
    }
    let request = |token: String| ListSessionsRequest {
        page_size: 1000,
        page_token: token,
        ..Default::default()
    };
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .sessions
            .clone()
            .list_sessions(request(token))
            .await
            .expect("a page")
            .into_inner();
        pages += 1;
        assert!(page.encoded_len() <= LIMIT);
        assert!(page.sessions.iter().all(|s| s.metadata.is_some()));
        ids.extend(page.sessions.into_iter().map(|s| s.id));
        token = page.next_page_token;
        if token.is_empty() || pages > 40 {
            break;
        }
    }
    assert!(pages >= 2, "7 MB take at least two pages");
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (40, 40), "every session once");

    // The statement itself stops at about one reply of rows.
    let query = verdict::sessions::ListSessions::try_from(request(String::new())).unwrap();
    let mut conn = app.db.conn(&Call::default()).await.unwrap();
    let project = crate::helpers::default_project(&app).await;
    let fetched =
        verdict::sessions::sql::list(conn.client().await.unwrap(), project, &query, LIMIT as i64)
            .await
            .unwrap();
    assert!(fetched.cut, "the query left rows out");
    assert!(
        fetched.rows.len() <= 25,
        "{} rows of ~180 KB fetched for a 4 MiB reply",
        fetched.rows.len()
    );
    // A page that fits whole is not cut.
    let fetched = verdict::sessions::sql::list(
        conn.client().await.unwrap(),
        project,
        &verdict::sessions::ListSessions::try_from(ListSessionsRequest {
            page_size: 3,
            ..Default::default()
        })
        .unwrap(),
        LIMIT as i64,
    )
    .await
    .unwrap();
    assert_eq!((fetched.rows.len(), fetched.cut), (4, false));
}
