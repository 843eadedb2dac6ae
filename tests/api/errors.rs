//! Errors a program can act on: every non-OK status, whoever made it (a
//! handler, the auth layer, tonic's router or codec, the deadline
//! backstop, PostgreSQL), carries `google.rpc.ErrorInfo` in domain
//! `verdict.v1` with the stable reason a client branches on.

use crate::fuzz::RawCodec;
use crate::helpers::*;
use crate::results::new_result;
use crate::sessions::{create, new_session, set_status};
use crate::test_cases::{new_test_case, run};
use prost_types::{Duration as PbDuration, Timestamp};
use std::str::FromStr;
use std::time::Duration;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::{
    AppendSessionLogRequest, CompareCoverageRequest, CreateSessionRequest, DeleteTestCaseRequest,
    ExecutionStatus, GetSessionRequest, ListSessionLogsRequest, LogLevel, MetricPoint,
    QueryTimeSeriesRequest, RecordExecutionsRequest, RecordMetricPointsRequest, SessionStatus,
    TestType, TimeRange, UpdateSessionStatusRequest,
};

/// Asserts `status` has `code` and an ErrorInfo of Verdict with `reason`;
/// returns the status for further checks.
#[track_caller]
pub fn assert_reason(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {status:?}"));
    assert_eq!(info.domain, "verdict.v1", "{status:?}");
    assert_eq!(info.reason, reason, "{status:?}");
}

/// Whether a reason asks for a retry: it carries RetryInfo.
fn retry_advised(status: &Status) -> bool {
    status.get_details_retry_info().is_some()
}

/// Sends raw `bytes` to the unary method at `path`.
async fn raw_unary(app: &TestApp, path: &str, bytes: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.expect("channel ready");
    let path = http::uri::PathAndQuery::from_str(path).unwrap();
    grpc.unary(Request::new(bytes), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn handler_errors_carry_their_reason() {
    let app = spawn_app().await;
    let mut sessions = app.sessions.clone();

    // INVALID_ARGUMENT keeps its field violations beside the ErrorInfo.
    let err = sessions
        .create_session(CreateSessionRequest::default())
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
    assert!(!violated_fields(&err).is_empty());
    assert!(!retry_advised(&err));

    let err = sessions
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    let err = sessions
        .list_sessions(verdict::proto::ListSessionsRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    assert_eq!(violated_fields(&err), ["page_token"]);

    // Each FAILED_PRECONDITION names its cause.
    let s = create(&app, "errors-moves").await;
    let err = set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "ILLEGAL_STATUS_TRANSITION");

    set_status(&app, &s.id, SessionStatus::Cancelled)
        .await
        .unwrap();
    let err = app
        .results
        .clone()
        .record_result(new_result(&s.id, "errors-late", 0.5))
        .await
        .unwrap_err();
    assert_reason(
        &err,
        Code::FailedPrecondition,
        "SESSION_NOT_ACCEPTING_WRITES",
    );

    let mut test_cases = app.test_cases.clone();
    let tc = test_cases
        .create_test_case(new_test_case("errors-1", TestType::Unit, ""))
        .await
        .unwrap()
        .into_inner()
        .test_case
        .unwrap();
    test_cases
        .record_executions(RecordExecutionsRequest {
            batch_id: "errors-b".into(),
            items: vec![run("errors-1", ExecutionStatus::Passed, 0, 5)],
        })
        .await
        .unwrap();
    let err = test_cases
        .delete_test_case(DeleteTestCaseRequest {
            id: tc.id.clone(),
            force: false,
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "TEST_CASE_HAS_EXECUTIONS");

    let err = app
        .coverage
        .clone()
        .compare_coverage(CompareCoverageRequest {
            base_commit_sha: "aaaaaaa1".into(),
            head_commit_sha: "bbbbbbb2".into(),
            subsystem: String::new(),
            max_files: 0,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "COVERAGE_COMMIT_MISSING");

    // A stale version: ABORTED, and not retryable as is (read, then retry).
    let fresh = create(&app, "errors-version").await;
    let err = sessions
        .update_session_status(UpdateSessionStatusRequest {
            id: fresh.id.clone(),
            status: SessionStatus::Processing as i32,
            expected_version: Some(fresh.version + 5),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Aborted, "VERSION_MISMATCH");

    // A batch id used before for other content.
    let err = test_cases
        .record_executions(RecordExecutionsRequest {
            batch_id: "errors-b".into(),
            items: vec![run("errors-1", ExecutionStatus::Failed, 1, 7)],
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
}

#[tokio::test]
async fn the_auth_layer_refusals_carry_their_reason() {
    let (app, keys) = spawn_auth_app().await;
    let lookup = || GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    };
    let err = app
        .sessions
        .clone()
        .get_session(lookup())
        .await
        .unwrap_err();
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    let err = app
        .sessions
        .clone()
        .get_session(authed(lookup(), "vk_0000000000000000_nope"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::Unauthenticated, "UNAUTHENTICATED");
    let err = app
        .sessions
        .clone()
        .create_session(authed(new_session("errors-scope"), &keys.read))
        .await
        .unwrap_err();
    assert_reason(&err, Code::PermissionDenied, "MISSING_SCOPE");
}

#[tokio::test]
async fn statuses_tonic_makes_itself_carry_a_reason_too() {
    let app = spawn_app().await;
    // Unknown method of a known service, an unknown service, and paths
    // that are a known service's name cut, padded or taken apart.
    for path in [
        "/verdict.v1.SessionService/NoSuchMethod",
        "/verdict.v1.NoSuchService/Get",
        "/verdict.v1.SessionService",
        "/verdict.v1.SessionService/",
        "/verdict.v1.SessionService/GetSession/",
        "/verdict.v1.SessionService/GetSession/GetSession",
        "/verdict.v1.SessionServiceX/GetSession",
        "/verdict.v1.SessionServic/GetSession",
        "//verdict.v1.SessionService/GetSession",
        "/verdict.v1.sessionservice/GetSession",
    ] {
        let err = raw_unary(&app, path, Vec::new()).await.unwrap_err();
        assert_reason(&err, Code::Unimplemented, "UNKNOWN_METHOD");
        assert!(!err.message().is_empty(), "{err:?}");
    }

    // Bytes that are no protobuf message: the caller's fault.
    let err = raw_unary(
        &app,
        "/verdict.v1.SessionService/CreateSession",
        vec![0xff, 0xff, 0xff, 0xff],
    )
    .await
    .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "MALFORMED_MESSAGE");
    assert_eq!(violated_fields(&err), ["request"]);
    // A string field that is not UTF-8.
    let err = raw_unary(
        &app,
        "/verdict.v1.SessionService/CreateSession",
        vec![0x0a, 0x02, 0xc3, 0x28],
    )
    .await
    .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "MALFORMED_MESSAGE");
    // Nothing reached the database for either.
    let n: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn messages_over_the_limit_either_way_are_resource_exhausted() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.max_message_bytes = 16 * 1024;
    let app = spawn_app_with(config).await;
    let mut sessions = app.sessions.clone();

    // A request over the limit.
    let s = create(&app, "errors-big").await;
    let big = AppendSessionLogRequest {
        session_id: s.id.clone(),
        level: LogLevel::Info as i32,
        message: "m".repeat(8000),
        fields: Some(
            prost_types::Struct {
                fields: [(
                    "blob".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("b".repeat(12_000))),
                    },
                )]
                .into(),
            }
            .into(),
        ),
    };
    let err = sessions.append_session_log(big).await.unwrap_err();
    assert_reason(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    assert!(
        !retry_advised(&err),
        "the same message fails again: {err:?}"
    );
    assert!(
        err.message().contains(&(16_384 - 2048).to_string()),
        "{err:?}"
    );

    // Replies over the limit: a page stops before the limit (the four logs
    // of 8000 characters come in pages of one), and an entry that fits a
    // request but not a reply (the reply adds its id, time and sequence)
    // fails its page instead of being skipped.
    for _ in 0..4 {
        sessions
            .append_session_log(AppendSessionLogRequest {
                session_id: s.id.clone(),
                level: LogLevel::Info as i32,
                message: "m".repeat(8000),
                fields: None,
            })
            .await
            .unwrap();
    }
    let list = |token: String| ListSessionLogsRequest {
        session_id: s.id.clone(),
        min_level: 0,
        page_size: 50,
        page_token: token,
        ..Default::default()
    };
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = sessions
            .list_session_logs(list(token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1, "a page passed the reply limit");
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 4);
    // A request within 2 KiB of the limit is refused before anything is
    // stored: what a request stores must fit a reply with its id, time,
    // sequence and page token.
    let near_limit = AppendSessionLogRequest {
        session_id: s.id.clone(),
        level: LogLevel::Info as i32,
        message: "m".repeat(8000),
        fields: Some(
            prost_types::Struct {
                fields: [(
                    "blob".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("b".repeat(7_500))),
                    },
                )]
                .into(),
            }
            .into(),
        ),
    };
    let err = sessions.append_session_log(near_limit).await.unwrap_err();
    assert_reason(&err, Code::ResourceExhausted, "MESSAGE_TOO_LARGE");
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM session_logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 4);
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_with_its_reason() {
    let app = spawn_app().await;
    let s = create(&app, "errors-locked").await;
    let mut blocker = admin_client(&app.database_url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM sessions WHERE id = $1::text::uuid FOR UPDATE",
        &[&s.id],
    )
    .await
    .unwrap();
    let mut request = Request::new(UpdateSessionStatusRequest {
        id: s.id.clone(),
        status: SessionStatus::Processing as i32,
        expected_version: None,
    });
    request.set_timeout(Duration::from_millis(300));
    let err = app
        .sessions
        .clone()
        .update_session_status(request)
        .await
        .unwrap_err();
    assert_reason(&err, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_gateway_without_its_database_is_unavailable_with_retry_advice() {
    // Nothing listens on port 1: the gateway starts, never becomes ready.
    let app = start_app(test_config(
        "postgres://verdict@127.0.0.1:1/verdict?connect_timeout=1",
    ))
    .await;
    let err = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Unavailable, "DATABASE_UNAVAILABLE");
    assert!(retry_advised(&err));
    app.stop().await.unwrap();
}

/// PostgreSQL refusing for lack of a resource (class 53) is
/// RESOURCE_EXHAUSTED / DATABASE_OUT_OF_RESOURCES, retryable, and says so
/// without quoting the server. Raised for real: the database allows no
/// temporary file (`temp_file_limit = 0`, SQLSTATE 53400) and a percentile
/// over more points than `work_mem` holds must sort on disk.
#[tokio::test]
async fn a_database_out_of_resources_is_resource_exhausted_and_retryable() {
    let (name, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let start = 1_772_359_200; // 2026-03-01T10:00:00Z
    let points: Vec<_> = (0..10_000)
        .map(|i| MetricPoint {
            name: "latency".into(),
            value: f64::from((i * 7919) % 10_007),
            unit: "ms".into(),
            labels: Default::default(),
            recorded_at: Some(Timestamp {
                seconds: start + i64::from(i % 3600),
                nanos: 0,
            }),
        })
        .collect();
    let mut metrics = app.metrics.clone();
    metrics
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "errors-many".into(),
            points,
        })
        .await
        .unwrap();
    // From now on, sessions of this database may not write temporary
    // files; a second gateway's connections are such sessions.
    let admin = admin_client(&test_server().await.url("postgres")).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET work_mem = '64kB'; \
             ALTER DATABASE {name} SET temp_file_limit = 0"
        ))
        .await
        .unwrap();
    let limited = spawn_app_with(test_config(&url)).await;
    let mut metrics = limited.metrics.clone();
    let err = metrics
        .query_time_series(QueryTimeSeriesRequest {
            name: "latency".into(),
            label_filter: Default::default(),
            range: Some(TimeRange {
                start_time: Some(Timestamp {
                    seconds: start,
                    nanos: 0,
                }),
                end_time: Some(Timestamp {
                    seconds: start + 3600,
                    nanos: 0,
                }),
            }),
            bucket_width: Some(PbDuration {
                seconds: 3600,
                nanos: 0,
            }),
            calendar_bucket: 0,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::ResourceExhausted, "DATABASE_OUT_OF_RESOURCES");
    assert!(retry_advised(&err));
    assert!(
        !err.message().contains("temp") && !err.message().contains("SQLSTATE"),
        "no internals: {err:?}"
    );
}

#[test]
fn every_reason_sent_is_listed_in_the_proto_and_nothing_else() {
    use verdict::proto::ErrorReason;
    let listed: Vec<String> = (1..)
        .map_while(|n| ErrorReason::try_from(n).ok())
        .map(|r| {
            r.as_str_name()
                .strip_prefix("ERROR_REASON_")
                .expect("prefixed")
                .to_owned()
        })
        .collect();
    let sent: Vec<&str> = verdict::error::Reason::ALL
        .iter()
        .map(|r| r.as_str())
        .collect();
    assert_eq!(listed, sent);
}

#[tokio::test]
async fn a_watch_ended_by_shutdown_says_so_with_its_reason() {
    let app = spawn_app().await;
    let s = create(&app, "errors-watched").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(verdict::proto::WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The first event: the watch is established.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("first watch event")
        .expect("watch stream");
    assert!(first.is_some());
    let stopping = tokio::spawn(app.stop());
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the watch ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the watch ends on shutdown");
    assert_reason(&end, Code::Unavailable, "SHUTTING_DOWN");
    assert!(retry_advised(&end));
    stopping.await.unwrap().unwrap();
}
