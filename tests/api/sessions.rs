//! SessionService through a real client.

use crate::helpers::{spawn_app, violated_fields, violations};
use prost_types::{Struct, Value, value::Kind};
use std::collections::HashSet;
use std::time::Duration;
use tonic::{Code, Request};
use verdict::proto::{
    AppendSessionLogRequest, CreateSessionRequest, DeleteSessionRequest, GetSessionRequest,
    ListSessionLogsRequest, ListSessionsRequest, LogLevel, Session, SessionStatus, SessionView,
    TimeRange, UpdateSessionStatusRequest, get_session_request::Lookup,
};

pub fn new_session(request_id: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        request_id: request_id.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        config: Some(json_struct(&[("threshold", 0.9)]).into()),
        input_refs: None,
        metadata: None,
        ..Default::default()
    }
}

fn json_struct(pairs: &[(&str, f64)]) -> Struct {
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::NumberValue(*v)),
                    },
                )
            })
            .collect(),
    }
}

pub async fn create(app: &crate::helpers::TestApp, request_id: &str) -> Session {
    app.sessions
        .clone()
        .create_session(new_session(request_id))
        .await
        .expect("create session")
        .into_inner()
        .session
        .expect("session")
}

pub async fn set_status(
    app: &crate::helpers::TestApp,
    id: &str,
    status: SessionStatus,
) -> Result<Session, tonic::Status> {
    set_status_with(&mut app.sessions.clone(), id, status).await
}

pub async fn set_status_with(
    client: &mut verdict::proto::session_service_client::SessionServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    status: SessionStatus,
) -> Result<Session, tonic::Status> {
    client
        .update_session_status(UpdateSessionStatusRequest {
            id: id.into(),
            status: status as i32,
            expected_version: None,
        })
        .await
        .map(|r| r.into_inner().session.expect("session"))
}

#[tokio::test]
async fn create_session_stores_a_pending_session() {
    let app = spawn_app().await;
    let reply = app
        .sessions
        .clone()
        .create_session(new_session("run-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.created);
    let s = reply.session.unwrap();
    assert_eq!(s.status, SessionStatus::Pending as i32);
    assert_eq!(s.version, 1);
    assert!(s.created_at.is_some() && s.started_at.is_none());

    let row = app.sql().await.query_one(
            "SELECT request_id, status, config->>'threshold' FROM sessions WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "run-1");
    assert_eq!(row.get::<_, String>(1), "pending");
    assert_eq!(row.get::<_, String>(2), "0.9");
}

#[tokio::test]
async fn create_session_is_idempotent_on_request_id() {
    let app = spawn_app().await;
    let first = app
        .sessions
        .clone()
        .create_session(new_session("same"))
        .await
        .unwrap()
        .into_inner();
    let second = app
        .sessions
        .clone()
        .create_session(new_session("same"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.session, second.session);
    // The same key with other content is refused, not answered with the
    // stored session (tests/api/idempotency.rs covers every RPC).
    let mut reused = new_session("same");
    reused.validation_scope = "something else".into();
    let refused = app
        .sessions
        .clone()
        .create_session(reused)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let count: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn concurrent_creates_with_one_request_id_store_one_session() {
    let app = spawn_app().await;
    let calls = (0..16).map(|_| {
        let mut client = app.sessions.clone();
        async move {
            client
                .create_session(new_session("raced"))
                .await
                .unwrap()
                .into_inner()
        }
    });
    let replies = futures::future::join_all(calls).await;
    assert_eq!(replies.iter().filter(|r| r.created).count(), 1);
    let ids: HashSet<_> = replies
        .iter()
        .map(|r| r.session.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn create_session_reports_every_bad_field() {
    let app = spawn_app().await;
    let err = app
        .sessions
        .clone()
        .create_session(CreateSessionRequest {
            request_id: String::new(),
            source_technology: "x".repeat(65),
            target_technology: "bad\u{7}bell".into(),
            validation_scope: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(
        fields,
        [
            "request_id",
            "source_technology",
            "target_technology",
            "validation_scope"
        ]
    );
    assert!(!err.message().to_lowercase().contains("sql"));
    let count: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}

#[tokio::test]
async fn create_session_refuses_non_finite_numbers_and_oversized_json() {
    let app = spawn_app().await;
    let mut req = new_session("nan");
    req.config = Some(json_struct(&[("score", f64::NAN)]).into());
    let big = "x".repeat(70 * 1024);
    req.metadata = Some(
        Struct {
            fields: [(
                "blob".to_string(),
                Value {
                    kind: Some(Kind::StringValue(big)),
                },
            )]
            .into(),
        }
        .into(),
    );
    let err = app.sessions.clone().create_session(req).await.unwrap_err();
    let v = violations(&err);
    assert!(
        v.iter()
            .any(|(f, d)| f == "config.fields[\"score\"]" && d.contains("finite")),
        "{v:?}"
    );
    assert!(
        v.iter()
            .any(|(f, d)| f == "metadata" && d.contains("bytes")),
        "{v:?}"
    );
}

#[tokio::test]
async fn sql_metacharacters_are_stored_verbatim() {
    let app = spawn_app().await;
    let nasty = "x'); DROP TABLE sessions; --";
    let mut req = new_session(nasty);
    req.validation_scope = "$1 OR 1=1 /* */".into();
    let s = app
        .sessions
        .clone()
        .create_session(req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(s.request_id, nasty);
    assert_eq!(s.validation_scope, "$1 OR 1=1 /* */");
    let count: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn get_session_finds_by_id_and_by_request_id() {
    let app = spawn_app().await;
    let created = create(&app, "find-me").await;
    let mut client = app.sessions.clone();
    let by_id = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(created.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let by_key = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("find-me".into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(by_id, created);
    assert_eq!(by_key, created);
}

#[tokio::test]
async fn get_session_answers_not_found_and_invalid_argument() {
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let missing = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id("not-a-uuid".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["id"]);
    let none = client
        .get_session(GetSessionRequest {
            lookup: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&none), ["lookup"]);
}

#[tokio::test]
async fn a_page_walk_returns_every_session_exactly_once_newest_first() {
    let app = spawn_app().await;
    app.sql().await.batch_execute(
            "INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, created_at, project_id)
             SELECT gen_random_uuid(), 'bulk-' || i, 'cobol', 'java', 'full',
                    now() - (i % 7) * interval '1 minute',
                    (SELECT id FROM projects WHERE slug = 'default')
             FROM generate_series(1, 237) AS i",
        )
        .await
        .unwrap();
    let mut client = app.sessions.clone();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_sessions(ListSessionsRequest {
                page_size: 50,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.sessions.len() <= 50);
        seen.extend(page.sessions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    assert_eq!(seen.len(), 237);
    let unique: HashSet<_> = seen.iter().map(|s| s.id.clone()).collect();
    assert_eq!(unique.len(), 237);
    let times: Vec<_> = seen
        .iter()
        .map(|s| {
            let t = s.created_at.unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "not newest first");
}

/// A JSON object from `json!`, as a request's Struct.
fn to_struct(json: serde_json::Value) -> verdict::structs::Struct {
    verdict::convert::json_to_struct(&json)
}

#[tokio::test]
async fn get_and_list_return_each_session_exactly_as_its_last_write_did() {
    // GetSession and ListSessions write sessions straight from their rows;
    // writes reply with the generated message. Every field of every shape
    // must read back the same both ways, in every view.
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let long = "x".repeat(300);
    let shapes = vec![
        // Only what is required.
        CreateSessionRequest {
            request_id: "plain".into(),
            source_technology: "cobol".into(),
            target_technology: "java".into(),
            validation_scope: "full".into(),
            ..Default::default()
        },
        // Multi-byte text, every kind of JSON value, documents whose
        // lengths take one, two and three bytes, labels.
        CreateSessionRequest {
            request_id: "ünïcode-🚀".into(),
            source_technology: "パスカル".into(),
            target_technology: "java \"quoted\" \\ back".into(),
            validation_scope: "modules/é".into(),
            config: Some(to_struct(serde_json::json!({
                "n": -1.5, "big": 1e300, "zero": 0, "t": true, "f": false, "null": null,
                "s": "line\nbreak \"q\" é", "list": [1, "two", [3], {"four": 4}],
                "nested": {"a": {"b": {"c": [null, {}]}}}, "empty": {}, "long": long,
            }))),
            input_refs: Some(to_struct(serde_json::json!({}))),
            metadata: Some(to_struct(serde_json::json!({"blob": "y".repeat(20_000)}))),
            labels: [("team", "core"), ("é", "ü"), ("tier", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
        new_session("started"),
        new_session("finished"),
    ];
    // What each session's last write replied, by request_id.
    let mut written = std::collections::HashMap::new();
    for request in shapes {
        let session = client
            .create_session(request)
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        written.insert(session.request_id.clone(), session);
    }
    let get = |client: &mut verdict::proto::session_service_client::SessionServiceClient<_>,
               request_id: &str| {
        let request = GetSessionRequest {
            lookup: Some(Lookup::RequestId(request_id.into())),
            ..Default::default()
        };
        let mut client = client.clone();
        async move {
            client
                .get_session(request)
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap()
        }
    };
    let started = written["started"].id.clone();
    let s = set_status(&app, &started, SessionStatus::Processing)
        .await
        .unwrap();
    written.insert(s.request_id.clone(), s);
    let finished = written["finished"].id.clone();
    set_status(&app, &finished, SessionStatus::Processing)
        .await
        .unwrap();
    let s = set_status(&app, &finished, SessionStatus::Completed)
        .await
        .unwrap();
    written.insert(s.request_id.clone(), s);
    for (request_id, want) in &written {
        assert_eq!(&get(&mut client, request_id).await, want);
    }

    for view in [
        SessionView::Unspecified,
        SessionView::Full,
        SessionView::Basic,
    ] {
        let listed = client
            .list_sessions(ListSessionsRequest {
                page_size: 50,
                view: view as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sessions;
        assert_eq!(listed.len(), 4, "{view:?}");
        for session in listed {
            let mut want = written[&session.request_id].clone();
            if view == SessionView::Basic {
                (want.config, want.input_refs, want.metadata) = (None, None, None);
            }
            assert_eq!(session, want, "{view:?}");
        }
    }
    let finished = get(&mut client, "finished").await;
    assert!(finished.started_at.is_some() && finished.completed_at.is_some());
    let rich = get(&mut client, "ünïcode-🚀").await;
    assert_eq!(rich.labels.len(), 3);
    assert_eq!(
        rich.metadata.unwrap().fields["blob"],
        Value {
            kind: Some(Kind::StringValue("y".repeat(20_000)))
        }
    );
}

/// Every page of ListSessions, retrying a page that failed UNAVAILABLE (a
/// terminated backend) with the same token, as the API asks a caller to.
async fn walk_sessions(
    client: verdict::proto::session_service_client::SessionServiceClient<tonic::transport::Channel>,
) -> Vec<Session> {
    crate::helpers::walk_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_sessions(ListSessionsRequest {
                    page_size: 7,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((page.sessions, page.next_page_token))
        }
    })
    .await
}

#[tokio::test]
async fn concurrent_pagers_across_terminated_backends_see_every_session_once_as_stored() {
    // Sessions written from their rows: several pagers walk the list while a
    // writer adds sessions and every gateway backend is terminated after each
    // write. Each walk returns every earlier session exactly once, in list
    // order, each exactly as GetSession returns it.
    let app = spawn_app().await;
    let mut before = Vec::new();
    for i in 0..40 {
        before.push(create(&app, &format!("early-{i}")).await);
    }
    let sql = app.sql().await;
    let writer = {
        let mut client = app.sessions.clone();
        async move {
            for i in 0..12 {
                let request = new_session(&format!("late-{i}"));
                // A create whose backend was terminated is retried: the
                // request_id makes the retry store it once.
                while let Err(e) = client.create_session(request.clone()).await {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                }
                crate::helpers::terminate_gateway_backends(&sql).await;
            }
        }
    };
    let pagers = (0..3).map(|_| walk_sessions(app.sessions.clone()));
    let ((), walks) = tokio::join!(writer, futures::future::join_all(pagers));

    let after = walk_sessions(app.sessions.clone()).await;
    assert_eq!(after.len(), before.len() + 12);
    let position: std::collections::HashMap<&str, usize> = after
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let stored: std::collections::HashMap<&str, &Session> =
        after.iter().map(|s| (s.id.as_str(), s)).collect();
    for walk in &walks {
        let ids: HashSet<&str> = walk.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids.len(), walk.len(), "no session twice");
        assert!(
            before.iter().all(|s| ids.contains(s.id.as_str())),
            "every earlier session"
        );
        assert!(
            walk.windows(2)
                .all(|w| position[w[0].id.as_str()] < position[w[1].id.as_str()]),
            "in list order"
        );
        for session in walk {
            assert_eq!(session, stored[session.id.as_str()], "as stored");
        }
    }
    for session in &before {
        assert_eq!(stored[session.id.as_str()], session, "as created");
    }
}

#[tokio::test]
async fn list_sessions_applies_every_filter() {
    let app = spawn_app().await;
    let a = create(&app, "a").await;
    let mut b_req = new_session("b");
    b_req.source_technology = "pl1".into();
    let b = app
        .sessions
        .clone()
        .create_session(b_req)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    set_status(&app, &a.id, SessionStatus::Processing)
        .await
        .unwrap();
    let mut client = app.sessions.clone();

    let processing = client
        .list_sessions(ListSessionsRequest {
            statuses: vec![SessionStatus::Processing as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        processing
            .sessions
            .iter()
            .map(|s| &s.id)
            .collect::<Vec<_>>(),
        [&a.id]
    );

    let pl1 = client
        .list_sessions(ListSessionsRequest {
            source_technology: "pl1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pl1.sessions.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&b.id]
    );

    let future = client
        .list_sessions(ListSessionsRequest {
            created: Some(TimeRange {
                start_time: Some(prost_types::Timestamp {
                    seconds: 4_000_000_000,
                    nanos: 0,
                }),
                end_time: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(future.sessions.is_empty());
}

#[tokio::test]
async fn list_sessions_rejects_a_page_token_from_another_filter() {
    let app = spawn_app().await;
    for i in 0..3 {
        create(&app, &format!("s{i}")).await;
    }
    let mut client = app.sessions.clone();
    let first = client
        .list_sessions(ListSessionsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let err = client
        .list_sessions(ListSessionsRequest {
            page_size: 1,
            source_technology: "cobol".into(),
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);

    let mut tampered = first.next_page_token.clone();
    tampered.insert(3, 'Z');
    let err = client
        .list_sessions(ListSessionsRequest {
            page_size: 1,
            page_token: tampered,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);
}

#[tokio::test]
async fn list_sessions_rejects_out_of_range_page_sizes_and_unknown_statuses() {
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    for size in [-1, 1001] {
        let err = client
            .list_sessions(ListSessionsRequest {
                page_size: size,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["page_size"], "size {size}");
    }
    let err = client
        .list_sessions(ListSessionsRequest {
            statuses: vec![SessionStatus::Pending as i32, 99, 0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["statuses[1]", "statuses[2]"]);
}

#[tokio::test]
async fn legal_status_moves_set_started_and_completed_times() {
    let app = spawn_app().await;
    let s = create(&app, "life").await;
    let p = set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    assert_eq!(p.version, 2);
    assert!(p.started_at.is_some() && p.completed_at.is_none());
    let c = set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();
    assert_eq!(c.version, 3);
    assert!(c.completed_at.is_some());
    assert_eq!(c.started_at, p.started_at);
}

#[tokio::test]
async fn every_illegal_status_move_is_a_failed_precondition() {
    use SessionStatus::*;
    let app = spawn_app().await;
    let legal = [
        (Pending, Processing),
        (Pending, Cancelled),
        (Processing, Completed),
        (Processing, Failed),
        (Processing, Cancelled),
    ];
    // How to reach each starting status from PENDING.
    let path = |s: SessionStatus| -> Vec<SessionStatus> {
        match s {
            Pending => vec![],
            Processing => vec![Processing],
            Completed => vec![Processing, Completed],
            Failed => vec![Processing, Failed],
            Cancelled => vec![Cancelled],
            Unspecified => unreachable!(),
        }
    };
    let all = [Pending, Processing, Completed, Failed, Cancelled];
    let mut checked = 0;
    for from in all {
        for to in all {
            if legal.contains(&(from, to)) {
                continue;
            }
            let s = create(&app, &format!("{from:?}-{to:?}")).await;
            for step in path(from) {
                set_status(&app, &s.id, step).await.unwrap();
            }
            let err = set_status(&app, &s.id, to).await.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition, "{from:?} -> {to:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 20);
}

#[tokio::test]
async fn a_stale_expected_version_is_aborted_and_changes_nothing() {
    let app = spawn_app().await;
    let s = create(&app, "v").await;
    let err = app
        .sessions
        .clone()
        .update_session_status(UpdateSessionStatusRequest {
            id: s.id.clone(),
            status: SessionStatus::Processing as i32,
            expected_version: Some(7),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let ok = app
        .sessions
        .clone()
        .update_session_status(UpdateSessionStatusRequest {
            id: s.id.clone(),
            status: SessionStatus::Processing as i32,
            expected_version: Some(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.session.unwrap().version, 2);
}

#[tokio::test]
async fn update_session_status_validates_its_request() {
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let err = client
        .update_session_status(UpdateSessionStatusRequest {
            id: "nope".into(),
            status: 0,
            expected_version: Some(0),
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(fields, ["expected_version", "id", "status"]);
    let missing = set_status(
        &app,
        &uuid::Uuid::new_v4().to_string(),
        SessionStatus::Processing,
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
async fn session_logs_page_oldest_first_and_filter_by_level() {
    let app = spawn_app().await;
    let s = create(&app, "logs").await;
    let mut client = app.sessions.clone();
    for i in 0..25 {
        let level = if i % 5 == 0 {
            LogLevel::Error
        } else {
            LogLevel::Info
        };
        client
            .append_session_log(AppendSessionLogRequest {
                session_id: s.id.clone(),
                level: level as i32,
                message: format!("step {i}"),
                fields: None,
            })
            .await
            .unwrap();
    }
    let mut messages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_session_logs(ListSessionLogsRequest {
                session_id: s.id.clone(),
                min_level: 0,
                page_size: 10,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        messages.extend(page.entries.into_iter().map(|e| e.message));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        messages,
        (0..25).map(|i| format!("step {i}")).collect::<Vec<_>>()
    );

    let errors = client
        .list_session_logs(ListSessionLogsRequest {
            session_id: s.id.clone(),
            min_level: LogLevel::Warning as i32,
            page_size: 100,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(errors.entries.len(), 5);
}

#[tokio::test]
async fn session_logs_of_a_missing_session_are_not_found() {
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let id = uuid::Uuid::new_v4().to_string();
    let err = client
        .append_session_log(AppendSessionLogRequest {
            session_id: id.clone(),
            level: LogLevel::Info as i32,
            message: "hello".into(),
            fields: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&id));
    let err = client
        .list_session_logs(ListSessionLogsRequest {
            session_id: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .append_session_log(AppendSessionLogRequest {
            session_id: uuid::Uuid::new_v4().to_string(),
            level: 0,
            message: " ".into(),
            fields: None,
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(fields, ["level", "message"]);
}

#[tokio::test]
async fn delete_session_removes_the_session_and_its_logs() {
    let app = spawn_app().await;
    let s = create(&app, "doomed").await;
    let keep = create(&app, "kept").await;
    let mut client = app.sessions.clone();
    for sid in [&s.id, &keep.id] {
        client
            .append_session_log(AppendSessionLogRequest {
                session_id: sid.clone(),
                level: LogLevel::Info as i32,
                message: "x".into(),
                fields: None,
            })
            .await
            .unwrap();
    }
    let reply = client
        .delete_session(DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.deleted_log_entries, 1);
    let again = client
        .delete_session(DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let rows: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM sessions) + (SELECT count(*) FROM session_logs)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "only the other session and its log remain");
}

#[tokio::test]
async fn a_deadline_cancels_the_query_in_postgresql() {
    let app = spawn_app().await;
    let s = create(&app, "locked").await;
    // Hold the row lock from another connection so the update must wait.
    let mut blocker = crate::helpers::admin_client(&app.database_url).await;
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
    request.set_timeout(Duration::from_millis(400));
    let err = app
        .sessions
        .clone()
        .update_session_status(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");

    // The statement was cancelled by PostgreSQL, not left waiting on the lock
    // (counted in this test's database only: other tests' gateways share the
    // server, and their appends wait on row locks too).
    let waiting: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'verdict' AND datname = current_database()
               AND state = 'active' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 0);
    tx.rollback().await.unwrap();
    let after = set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    assert_eq!(after.version, 2, "the cancelled update changed nothing");
}

#[tokio::test]
async fn listed_log_entries_are_exactly_what_appending_them_returned_on_every_page() {
    // ListSessionLogs writes its entries straight from their rows;
    // AppendSessionLog replies with the generated message. Every field of
    // every shape must read back the same, page by page and filtered.
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let session = client
        .create_session(new_session("logs-on-the-wire"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let shapes = [
        (LogLevel::Debug, "d".to_string(), None),
        (
            LogLevel::Info,
            "ünïcode 🚀 \"quoted\" \\ back\nline".to_string(),
            Some(to_struct(serde_json::json!({}))),
        ),
        (
            LogLevel::Warning,
            "every kind of value".to_string(),
            Some(to_struct(serde_json::json!({
                "n": -1.5, "big": 1e300, "zero": 0, "t": true, "f": false, "null": null,
                "s": "é \"q\"", "list": [1, "two", [3], {"four": 4}],
                "nested": {"a": {"b": {"c": [null, {}]}}}, "empty": {},
            }))),
        ),
        (
            LogLevel::Error,
            "m".repeat(3_000),
            Some(to_struct(serde_json::json!({"blob": "y".repeat(20_000)}))),
        ),
        (LogLevel::Info, "plain".to_string(), None),
    ];
    let mut appended = Vec::new();
    for (level, message, fields) in shapes {
        appended.push(
            client
                .append_session_log(AppendSessionLogRequest {
                    session_id: session.id.clone(),
                    level: level as i32,
                    message,
                    fields,
                })
                .await
                .unwrap()
                .into_inner()
                .entry
                .unwrap(),
        );
    }
    // Two entries a page: the token of each page leads to the next.
    let list = |min_level: LogLevel| {
        let mut client = client.clone();
        let id = session.id.clone();
        async move {
            let (mut out, mut token, mut pages) = (Vec::new(), String::new(), 0);
            loop {
                let page = client
                    .list_session_logs(ListSessionLogsRequest {
                        session_id: id.clone(),
                        min_level: min_level as i32,
                        page_size: 2,
                        page_token: token,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                pages += 1;
                assert!(page.entries.len() <= 2);
                out.extend(page.entries);
                if page.next_page_token.is_empty() {
                    return (out, pages);
                }
                token = page.next_page_token;
            }
        }
    };
    let (all, pages) = list(LogLevel::Unspecified).await;
    assert_eq!(all, appended, "every entry as appended, in sequence order");
    assert_eq!(pages, 3);
    let (warnings, _) = list(LogLevel::Warning).await;
    let want: Vec<_> = appended
        .iter()
        .filter(|e| e.level >= LogLevel::Warning as i32)
        .cloned()
        .collect();
    assert_eq!(warnings, want);
    assert_eq!(warnings.len(), 2);
}

/// Every entry of a session's log, 7 a page, retrying a page refused while
/// the gateway's backends are being terminated.
async fn walk_logs(
    client: verdict::proto::session_service_client::SessionServiceClient<tonic::transport::Channel>,
    session_id: String,
) -> Vec<verdict::proto::SessionLogEntry> {
    crate::helpers::walk_pages(|page_token| {
        let mut client = client.clone();
        let session_id = session_id.clone();
        async move {
            let page = client
                .list_session_logs(ListSessionLogsRequest {
                    session_id,
                    page_size: 7,
                    page_token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok((page.entries, page.next_page_token))
        }
    })
    .await
}

#[tokio::test]
async fn concurrent_log_pagers_across_terminated_backends_see_every_entry_once_as_stored() {
    // Log entries written from their rows: several pagers walk a session's
    // log while a writer appends and every gateway backend is terminated
    // after each append. Each walk returns every earlier entry exactly once,
    // in sequence order, each exactly as stored.
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    let session = client
        .create_session(new_session("paged-log"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let append = |message: String| AppendSessionLogRequest {
        session_id: session.id.clone(),
        level: LogLevel::Info as i32,
        message,
        fields: Some(to_struct(serde_json::json!({"k": "v", "n": 1}))),
    };
    let mut before = Vec::new();
    for i in 0..40 {
        let entry = client
            .append_session_log(append(format!("early {i}")))
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap();
        before.push(entry);
    }
    let sql = app.sql().await;
    let writer = {
        let mut client = app.sessions.clone();
        let append = &append;
        async move {
            for i in 0..12 {
                // An append cut off by a terminated backend may be retried
                // as a new entry: the walks are checked against what is
                // stored at the end.
                while let Err(e) = client.append_session_log(append(format!("late {i}"))).await {
                    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                }
                crate::helpers::terminate_gateway_backends(&sql).await;
            }
        }
    };
    let pagers = (0..3).map(|_| walk_logs(app.sessions.clone(), session.id.clone()));
    let ((), walks) = tokio::join!(writer, futures::future::join_all(pagers));

    let after = walk_logs(app.sessions.clone(), session.id.clone()).await;
    assert!(after.len() >= before.len() + 12);
    assert_eq!(&after[..before.len()], &before[..], "as appended");
    let stored: std::collections::HashMap<i64, &verdict::proto::SessionLogEntry> =
        after.iter().map(|e| (e.sequence, e)).collect();
    for walk in &walks {
        assert!(walk.len() >= before.len());
        assert!(
            walk.windows(2).all(|w| w[0].sequence < w[1].sequence),
            "in sequence order, none twice"
        );
        assert_eq!(&walk[..before.len()], &before[..], "every earlier entry");
        for entry in walk {
            assert_eq!(entry, stored[&entry.sequence], "as stored");
        }
    }
}
