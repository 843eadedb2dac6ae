//! Hostile input: fuzzed messages to every RPC, metacharacters, bad
//! numbers, bad metadata, forged page tokens, oversized messages.

use crate::discrepancies::item;
use crate::fuzz::{Method, RawCodec, Rng, Schema};
use crate::helpers::*;
use crate::results::new_result;
use crate::sessions::{create, new_session};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::str::FromStr;
use std::time::Duration;
use tonic::Code;
use tonic::transport::Channel;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::{
    AppendSessionLogRequest, ExportSessionRequest, GetSessionRequest, ListAuditEventsRequest,
    ListDiscrepanciesRequest, ListExecutionsRequest, ListResolutionHistoryRequest,
    ListResultsRequest, ListSessionLogsRequest, ListSessionsRequest, LogLevel,
    QueryTimeSeriesRequest, RecordDiscrepanciesRequest, Resolution, ResolveDiscrepancyRequest,
    TimeRange,
};

/// Fixed seed and case count: the run is the same every time.
const SEED: u64 = 0x7665_7264_6963_7421;
const CASES_PER_RPC: usize = 48;

/// Strings with a meaning to SQL, shells, JSON, Unicode or our validators.
fn hostile_strings() -> Vec<String> {
    let mut s: Vec<String> = [
        "",
        "'; DROP TABLE sessions; --",
        "\" OR 1=1 --",
        "Robert'); DELETE FROM audit_events;--",
        "$1 $$ $tag$ $2::text",
        "%_\\%",
        "\\'; SELECT pg_sleep(10); --",
        "') UNION SELECT secret_hash FROM api_keys --",
        "\0",
        "bell\u{7}",
        "line\nbreak",
        "🦀 émoji \u{202e}rtl",
        "vk_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "00000000-0000-0000-0000-000000000000",
        "e30",
        "e30.AAAAAAAAAAAAAAAAAAAAAA",
        "SESSION_STATUS_PENDING",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    s.push("x".repeat(129));
    s.push("y".repeat(9000));
    s.push(uuid::Uuid::new_v4().to_string());
    s
}

/// Sends `messages` to `method` with raw bytes; the status code of the reply.
async fn send(channel: &Channel, method: &Method, messages: Vec<Vec<u8>>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let path = http::uri::PathAndQuery::from_str(&method.path).unwrap();
    let mut request = tonic::Request::new(futures::stream::iter(messages));
    request.set_timeout(Duration::from_secs(10));
    let mut stream = match grpc.streaming(request, path, RawCodec).await {
        Ok(response) => response.into_inner(),
        Err(status) => return crate::fuzz::checked_code(&status),
    };
    if method.server_streaming {
        // A watch of an existing session stays open: its first message (or
        // status) is what counts.
        return match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
            Ok(Ok(_)) | Err(_) => Code::Ok,
            Ok(Err(status)) => crate::fuzz::checked_code(&status),
        };
    }
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return Code::Ok,
            Err(status) => return crate::fuzz::checked_code(&status),
        }
    }
}

/// Replies a fuzzed request may get: anything but a server fault.
fn proper(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::ResourceExhausted
    )
}

/// The cases of one method: half arbitrary bytes, half well-formed messages.
fn cases(schema: &Schema, method: &Method, rng: &mut Rng, strings: &[String]) -> Vec<Vec<Vec<u8>>> {
    (0..CASES_PER_RPC)
        .map(|i| {
            let count = if method.client_streaming {
                1 + rng.below(3)
            } else {
                1
            };
            (0..count)
                .map(|_| {
                    if i % 2 == 0 {
                        rng.bytes(256)
                    } else {
                        schema.message(&method.input, rng, strings, 0)
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn fuzzed_requests_to_every_rpc_get_a_proper_status_and_never_a_server_fault() {
    let app = spawn_app().await;
    // Real ids, so that fuzzed requests reach past the lookups.
    let session = create(&app, "fuzz-target").await;
    let result = app
        .results
        .clone()
        .record_result(new_result(&session.id, "fuzz-r", 0.5))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let ids = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: session.id.clone(),
            batch_id: "fuzz-b".into(),
            items: vec![item(1)],
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let mut strings = hostile_strings();
    strings.extend([session.id.clone(), result.id.clone(), ids[0].clone()]);

    let schema = Schema::load(verdict::proto::FILE_DESCRIPTOR_SET);
    assert!(schema.methods.len() >= 18, "{:?}", schema.methods);
    let mut rng = Rng::new(SEED);
    let mut faults = Vec::new();
    let mut total = 0;
    for method in &schema.methods {
        for (n, case) in cases(&schema, method, &mut rng, &strings)
            .into_iter()
            .enumerate()
        {
            let code = send(&app.channel, method, case).await;
            total += 1;
            if !proper(code) {
                faults.push(format!("{} case {n}: {code:?}", method.path));
            }
        }
    }
    assert!(
        faults.is_empty(),
        "server faults on fuzzed input: {faults:#?}"
    );
    assert_eq!(total, schema.methods.len() * CASES_PER_RPC);
    read_back_everything(&app, &schema).await;
    // The gateway is still healthy: a new session is stored and found. (A
    // count of the sessions created before would be timing-dependent: a
    // fuzzed Cleanup may legitimately delete them.)
    let after = create(&app, "after-fuzz").await;
    let sql = app.sql().await;
    let n: i64 = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE id = $1::text::uuid",
            &[&after.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Whatever the fuzzed calls stored must read back: every RPC with an empty
/// request (unfiltered lists and aggregates), then every session's export
/// and executions, and every metric's series around each of its points.
async fn read_back_everything(app: &TestApp, schema: &Schema) {
    let mut faults = Vec::new();
    for method in &schema.methods {
        let code = send(&app.channel, method, vec![Vec::new()]).await;
        if !proper(code) {
            faults.push(format!("{} (empty request): {code:?}", method.path));
        }
    }
    let sql = app.sql().await;
    let sessions = sql
        .query("SELECT id::text FROM sessions ORDER BY id LIMIT 500", &[])
        .await
        .unwrap();
    for row in &sessions {
        let id: String = row.get(0);
        let export = async {
            let mut stream = app
                .admin
                .clone()
                .export_session(ExportSessionRequest {
                    session_id: id.clone(),
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        if let Err(e) = export.await
            && !proper(e.code())
        {
            faults.push(format!("ExportSession {id}: {:?}", e.code()));
        }
        let listed = app
            .test_cases
            .clone()
            .list_executions(ListExecutionsRequest {
                session_id: id.clone(),
                ..Default::default()
            })
            .await;
        if let Err(e) = listed
            && !proper(e.code())
        {
            faults.push(format!("ListExecutions {id}: {:?}", e.code()));
        }
    }
    let points = sql
        .query(
            "SELECT DISTINCT ON (name) name, extract(epoch FROM recorded_at)::int8 \
             FROM metric_points ORDER BY name, recorded_at LIMIT 200",
            &[],
        )
        .await
        .unwrap();
    for row in &points {
        let (name, at): (String, i64) = (row.get(0), row.get(1));
        let query = app
            .metrics
            .clone()
            .query_time_series(QueryTimeSeriesRequest {
                name: name.clone(),
                range: Some(TimeRange {
                    start_time: Some(prost_types::Timestamp {
                        seconds: at - 86_400,
                        nanos: 0,
                    }),
                    end_time: Some(prost_types::Timestamp {
                        seconds: at + 86_400,
                        nanos: 0,
                    }),
                }),
                bucket_width: Some(prost_types::Duration {
                    seconds: 2 * 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await;
        if let Err(e) = query
            && !proper(e.code())
        {
            faults.push(format!("QueryTimeSeries {name:?}: {:?}", e.code()));
        }
    }
    assert!(
        faults.is_empty(),
        "stored data that does not read back: {faults:#?}"
    );
}

#[tokio::test]
async fn fuzzed_requests_without_a_key_are_all_unauthenticated_before_any_database_work() {
    let (app, _) = spawn_auth_app().await;
    let schema = Schema::load(verdict::proto::FILE_DESCRIPTOR_SET);
    let strings = hostile_strings();
    let mut rng = Rng::new(SEED ^ 1);
    let before = app.db.connections_acquired();
    for method in &schema.methods {
        for case in cases(&schema, method, &mut rng, &strings)
            .into_iter()
            .take(8)
        {
            assert_eq!(
                send(&app.channel, method, case).await,
                Code::Unauthenticated,
                "{}",
                method.path
            );
        }
    }
    assert_eq!(app.db.connections_acquired(), before);
}

#[tokio::test]
async fn an_oversized_message_is_refused_with_a_status() {
    let app = spawn_app().await;
    let schema = Schema::load(verdict::proto::FILE_DESCRIPTOR_SET);
    let create = schema
        .methods
        .iter()
        .find(|m| m.path.ends_with("/CreateSession"))
        .unwrap();
    // 5 MiB of one string field, over the 4 MiB default limit.
    let mut big = Vec::new();
    prost::encoding::encode_varint((1 << 3) | 2, &mut big);
    prost::encoding::encode_varint(5 << 20, &mut big);
    big.resize(big.len() + (5 << 20), b'a');
    let code = send(&app.channel, create, vec![big]).await;
    assert_eq!(code, Code::ResourceExhausted);
    // The gateway keeps serving.
    create_ok(&app).await;
}

async fn create_ok(app: &TestApp) {
    app.sessions
        .clone()
        .create_session(new_session(&uuid::Uuid::new_v4().to_string()))
        .await
        .expect("the gateway still serves");
}

const META: [&str; 6] = [
    "'; DROP TABLE sessions; --",
    "\" OR 1=1 --",
    "Robert'); DELETE FROM audit_events;--",
    "$1 $$ $tag$ $2::text",
    "%_\\% LIKE '%'",
    "') UNION SELECT secret_hash FROM api_keys --",
];

#[tokio::test]
async fn sql_metacharacters_in_every_text_field_are_stored_verbatim() {
    let app = spawn_app().await;
    let mut s = app.sessions.clone();
    for (n, meta) in META.iter().enumerate() {
        let request_id = format!("{meta}#{n}");
        let mut req = new_session(&request_id);
        req.source_technology = meta.to_string();
        req.target_technology = meta.to_string();
        req.validation_scope = meta.to_string();
        let created = s
            .create_session(req)
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        let got = s
            .get_session(GetSessionRequest {
                lookup: Some(Lookup::RequestId(request_id.clone())),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        assert_eq!(got.id, created.id);
        assert_eq!(
            (
                got.request_id.as_str(),
                got.source_technology.as_str(),
                got.target_technology.as_str(),
                got.validation_scope.as_str()
            ),
            (request_id.as_str(), *meta, *meta, *meta)
        );

        s.append_session_log(AppendSessionLogRequest {
            session_id: created.id.clone(),
            level: LogLevel::Info as i32,
            message: meta.to_string(),
            fields: None,
        })
        .await
        .unwrap();
        let logs = s
            .list_session_logs(ListSessionLogsRequest {
                session_id: created.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(logs[0].message, *meta);

        let mut r = new_result(&created.id, meta, 0.5);
        r.summary = meta.to_string();
        let result = app
            .results
            .clone()
            .record_result(r)
            .await
            .unwrap()
            .into_inner()
            .result
            .unwrap();
        assert_eq!(
            (result.request_id.as_str(), result.summary.as_str()),
            (*meta, *meta)
        );

        let mut d = item(n);
        d.kind = meta.to_string();
        d.description = meta.to_string();
        d.source_element = meta.to_string();
        d.target_element = meta.to_string();
        d.recommendation = meta.to_string();
        d.fingerprint = meta.to_string();
        let mut dc = app.discrepancies.clone();
        let ids = dc
            .record_discrepancies(RecordDiscrepanciesRequest {
                session_id: created.id.clone(),
                batch_id: meta.to_string(),
                items: vec![d],
            })
            .await
            .unwrap()
            .into_inner()
            .ids;
        let resolved = dc
            .resolve_discrepancy(ResolveDiscrepancyRequest {
                id: ids[0].clone(),
                resolution: Resolution::Acknowledged as i32,
                actor: meta.to_string(),
                note: meta.to_string(),
                apply_to_fingerprint: false,
            })
            .await
            .unwrap()
            .into_inner()
            .discrepancy
            .unwrap();
        let listed = dc
            .list_discrepancies(ListDiscrepanciesRequest {
                kind: meta.to_string(),
                fingerprint: meta.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .discrepancies;
        assert_eq!(
            listed.len(),
            1,
            "the filters match the text exactly, no wildcards"
        );
        let d = &listed[0];
        assert_eq!(d.id, resolved.id);
        for field in [
            &d.kind,
            &d.description,
            &d.source_element,
            &d.target_element,
            &d.recommendation,
            &d.fingerprint,
        ] {
            assert_eq!(field, meta);
        }
    }
    // Every table is still there, with every row.
    let sql = app.sql().await;
    let sessions: i64 = sql
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, META.len() as i64);
    let audit: i64 = sql
        .query_one("SELECT count(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(audit >= META.len() as i64 * 5);
}

#[tokio::test]
async fn negative_zero_and_oversized_page_sizes_are_handled_on_every_list() {
    let (app, keys) = spawn_auth_app().await;
    let t = &keys.all;
    let sid = uuid::Uuid::new_v4().to_string();
    for size in [-1, i32::MIN, 1001, i32::MAX] {
        let mut errs = Vec::new();
        errs.push(
            app.sessions
                .clone()
                .list_sessions(authed(
                    ListSessionsRequest {
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        errs.push(
            app.sessions
                .clone()
                .list_session_logs(authed(
                    ListSessionLogsRequest {
                        session_id: sid.clone(),
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        errs.push(
            app.results
                .clone()
                .list_results(authed(
                    ListResultsRequest {
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        errs.push(
            app.discrepancies
                .clone()
                .list_discrepancies(authed(
                    ListDiscrepanciesRequest {
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        errs.push(
            app.discrepancies
                .clone()
                .list_resolution_history(authed(
                    ListResolutionHistoryRequest {
                        id: sid.clone(),
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        errs.push(
            app.admin
                .clone()
                .list_audit_events(authed(
                    ListAuditEventsRequest {
                        page_size: size,
                        ..Default::default()
                    },
                    t,
                ))
                .await
                .unwrap_err(),
        );
        for e in errs {
            assert!(
                violated_fields(&e).contains(&"page_size".to_string()),
                "{size}: {e:?}"
            );
        }
    }
}

#[tokio::test]
async fn nan_and_infinite_numbers_are_invalid_arguments() {
    let app = spawn_app().await;
    let session = create(&app, "nan").await;
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut d = item(1);
        d.confidence = bad;
        let err = app
            .discrepancies
            .clone()
            .record_discrepancies(RecordDiscrepanciesRequest {
                session_id: session.id.clone(),
                batch_id: format!("nan-{bad}"),
                items: vec![d],
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["items[0].confidence"]);
        let err = app
            .results
            .clone()
            .list_results(ListResultsRequest {
                min_fidelity: Some(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["min_fidelity"]);
        let err = app
            .discrepancies
            .clone()
            .list_discrepancies(ListDiscrepanciesRequest {
                min_confidence: Some(bad),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["min_confidence"]);
    }
}

#[tokio::test]
async fn invalid_utf8_in_metadata_gets_a_status_not_a_fault() {
    let (auth_app, keys) = spawn_auth_app().await;
    let open_app = spawn_app().await;
    let value = |bytes: &[u8]| {
        tonic::metadata::MetadataValue::try_from(bytes).expect("obs-text header value")
    };
    // In the authorization header: not a key.
    let mut r = tonic::Request::new(ListSessionsRequest::default());
    r.metadata_mut()
        .insert("authorization", value(b"Bearer \xff\xfe\x80vk_"));
    let err = auth_app
        .sessions
        .clone()
        .list_sessions(r)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // In headers the gateway reads (trace context, deadline) or ignores.
    for name in ["traceparent", "grpc-timeout", "x-anything"] {
        let mut r = authed(ListSessionsRequest::default(), &keys.read);
        r.metadata_mut().insert(name, value(b"\xff\xfe\xc3\x28"));
        let code = match auth_app.sessions.clone().list_sessions(r).await {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        assert!(
            matches!(code, Code::Ok | Code::InvalidArgument),
            "{name}: {code:?}"
        );
        let mut r = tonic::Request::new(new_session(&format!("utf8-{name}")));
        r.metadata_mut().insert(name, value(b"\xff\xfe\xc3\x28"));
        let code = match open_app.sessions.clone().create_session(r).await {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        assert!(
            matches!(code, Code::Ok | Code::InvalidArgument),
            "{name}: {code:?}"
        );
    }
    create_ok(&open_app).await;
}

fn flip(token: &str, at: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn forged_tampered_and_foreign_page_tokens_are_refused() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    for n in 0..3 {
        create(&app, &format!("tok-{n}")).await;
    }
    let mut s = app.sessions.clone();
    let first = ListSessionsRequest {
        page_size: 1,
        ..Default::default()
    };
    let token = s
        .list_sessions(first.clone())
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    let page = |token: String| ListSessionsRequest {
        page_token: token,
        ..first.clone()
    };
    assert!(s.list_sessions(page(token.clone())).await.is_ok());

    let (payload, _) = token.split_once('.').expect("payload.mac");
    let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let forged_payload = URL_SAFE_NO_PAD.encode(json.replace("\"k\":[", "\"k\":[1,"));
    let mut bad = vec![
        flip(&token, 5),
        flip(&token, token.len() - 3),
        format!("{forged_payload}.{}", URL_SAFE_NO_PAD.encode([0u8; 16])),
        payload.to_owned(),
        URL_SAFE_NO_PAD.encode(&json),
        "not a token".to_owned(),
        "x".repeat(2000),
    ];
    bad.push(format!("{payload}.{}", &token[token.len() - 22..]).replace('.', ".."));
    for t in bad {
        let err = s.list_sessions(page(t.clone())).await.unwrap_err();
        assert_eq!(violated_fields(&err), ["page_token"], "{t}");
    }

    // Another replica of the same database shares the secret: it accepts it.
    let replica = spawn_app_with(test_config(&url)).await;
    assert!(
        replica
            .sessions
            .clone()
            .list_sessions(page(token.clone()))
            .await
            .is_ok()
    );
    // A gateway with its own configured secret does not.
    let mut config = test_config(&url);
    config.page_token_secret = Some("a different secret, 32+ bytes long".into());
    let foreign = spawn_app_with(config).await;
    let err = foreign
        .sessions
        .clone()
        .list_sessions(page(token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);
}
