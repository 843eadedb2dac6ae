//! Sessions, their logs, their watches and their results stay inside their
//! project: two projects using the same request ids never see each other's
//! rows, an id of another project's session is NOT_FOUND on every RPC that
//! takes one (the same answer as for an id nobody has), and idempotency
//! holds per project.

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::results::new_result;
use crate::sessions::new_session;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::watch_session_response::Event;
use verdict::proto::{
    AppendSessionLogRequest, CreateSessionRequest, DeleteSessionRequest, GetResultRequest,
    GetSessionRequest, ListResultsRequest, ListSessionLogsRequest, ListSessionsRequest, LogLevel,
    RecordResultRequest, Session, SessionStatus, UpdateSessionStatusRequest, ValidationResult,
    WatchSessionRequest, get_session_request::Lookup,
};

const A: &str = "team-a";
const B: &str = "team-b";

/// Creates the session in project `slug`; returns it and whether it was new.
async fn create_in(app: &TestApp, slug: &str, req: CreateSessionRequest) -> (Session, bool) {
    let reply = app
        .sessions
        .clone()
        .create_session(in_project(req, slug))
        .await
        .expect("create session")
        .into_inner();
    (reply.session.expect("session"), reply.created)
}

async fn record_in(app: &TestApp, slug: &str, req: RecordResultRequest) -> ValidationResult {
    app.results
        .clone()
        .record_result(in_project(req, slug))
        .await
        .expect("record result")
        .into_inner()
        .result
        .expect("result")
}

fn log(session_id: &str, message: &str) -> AppendSessionLogRequest {
    AppendSessionLogRequest {
        session_id: session_id.into(),
        level: LogLevel::Info as i32,
        message: message.into(),
        fields: None,
    }
}

fn status_change(id: &str, status: SessionStatus) -> UpdateSessionStatusRequest {
    UpdateSessionStatusRequest {
        id: id.into(),
        status: status as i32,
        expected_version: None,
    }
}

/// Every session a ListSessions walk in `slug` returns (small pages, so
/// page tokens are exercised too), with `filter` applied.
async fn list_all_in(app: &TestApp, slug: &str, filter: ListSessionsRequest) -> Vec<Session> {
    let mut client = app.sessions.clone();
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..100 {
        let page = client
            .list_sessions(in_project(
                ListSessionsRequest {
                    page_size: 2,
                    page_token: token,
                    ..filter.clone()
                },
                slug,
            ))
            .await
            .expect("list sessions")
            .into_inner();
        out.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
    panic!("the list did not end within 100 pages");
}

async fn count(sql: &tokio_postgres::Client, query: &str, project: Uuid) -> i64 {
    sql.query_one(query, &[&project]).await.unwrap().get(0)
}

fn ids<'a>(sessions: impl IntoIterator<Item = &'a Session>) -> BTreeSet<String> {
    sessions.into_iter().map(|s| s.id.clone()).collect()
}

/// `err` is the NOT_FOUND a caller gets for an id nobody has: the same
/// code, reason and message (with the id swapped), so it tells nothing
/// about another project.
#[track_caller]
fn same_as_unknown(err: &Status, id: &str, unknown_err: &Status, unknown: &str) {
    assert_reason(err, Code::NotFound, "NOT_FOUND");
    assert_reason(unknown_err, Code::NotFound, "NOT_FOUND");
    assert_eq!(
        err.message().replace(id, "<id>"),
        unknown_err.message().replace(unknown, "<id>"),
        "{err:?} vs {unknown_err:?}"
    );
}

#[tokio::test]
async fn the_same_request_ids_in_two_projects_are_two_sessions_each_found_and_listed_only_in_its_project()
 {
    let app = spawn_app().await;
    let a = create_project(&app, A).await;
    let b = create_project(&app, B).await;
    let sql = app.sql().await;

    // A: three sessions; B: the same request ids, other content (B's first
    // use of the key is not a reuse of A's), plus one of its own.
    let mut in_a = Vec::new();
    for rid in ["shared-1", "shared-2", "shared-3"] {
        let (s, created) = create_in(&app, A, new_session(rid)).await;
        assert!(created);
        in_a.push(s);
    }
    let mut in_b = Vec::new();
    for rid in ["shared-1", "shared-2", "only-b"] {
        let mut req = new_session(rid);
        req.source_technology = "pli".into();
        let (s, created) = create_in(&app, B, req).await;
        assert!(created, "{rid} is new in {B}");
        in_b.push(s);
    }
    assert!(ids(&in_a).is_disjoint(&ids(&in_b)));

    // GetSession by request id and by id: each project its own.
    let mut client = app.sessions.clone();
    for (slug, own) in [(A, &in_a), (B, &in_b)] {
        for s in own.iter() {
            let by_rid = client
                .get_session(in_project(
                    GetSessionRequest {
                        lookup: Some(Lookup::RequestId(s.request_id.clone())),
                        ..Default::default()
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            assert_eq!(by_rid.id, s.id, "{slug} {}", s.request_id);
            let by_id = client
                .get_session(in_project(
                    GetSessionRequest {
                        lookup: Some(Lookup::Id(s.id.clone())),
                        ..Default::default()
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            assert_eq!(by_id, by_rid);
        }
    }
    // A's only request id of its own is unknown in B, and neither project's
    // sessions are in `default`.
    let err = client
        .get_session(in_project(
            GetSessionRequest {
                lookup: Some(Lookup::RequestId("shared-3".into())),
                ..Default::default()
            },
            B,
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let err = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("shared-1".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // Move one session of each project so the status filter has something
    // to tell apart.
    client
        .update_session_status(in_project(
            status_change(&in_a[0].id, SessionStatus::Processing),
            A,
        ))
        .await
        .unwrap();
    client
        .update_session_status(in_project(
            status_change(&in_b[0].id, SessionStatus::Processing),
            B,
        ))
        .await
        .unwrap();

    // Every list, with every filter, holds exactly the project's rows, as
    // the database counts them.
    for (slug, project, own) in [(A, a, &in_a), (B, b, &in_b)] {
        let all = list_all_in(&app, slug, ListSessionsRequest::default()).await;
        assert_eq!(ids(&all), ids(own.iter()), "{slug}");
        assert_eq!(
            all.len() as i64,
            count(
                &sql,
                "SELECT count(*) FROM sessions WHERE project_id = $1",
                project
            )
            .await
        );
        let processing = list_all_in(
            &app,
            slug,
            ListSessionsRequest {
                statuses: vec![SessionStatus::Processing as i32],
                ..Default::default()
            },
        )
        .await;
        assert_eq!(ids(&processing), ids([&own[0]]), "{slug}");
        assert_eq!(
            processing.len() as i64,
            count(
                &sql,
                "SELECT count(*) FROM sessions WHERE project_id = $1 AND status = 'processing'",
                project
            )
            .await
        );
        for (source, target) in [("cobol", "java"), ("pli", "java")] {
            let pair = list_all_in(
                &app,
                slug,
                ListSessionsRequest {
                    source_technology: source.into(),
                    target_technology: target.into(),
                    validation_scope: "full".into(),
                    ..Default::default()
                },
            )
            .await;
            let expected = own
                .iter()
                .filter(|s| s.source_technology == source)
                .map(|s| s.id.clone())
                .collect::<BTreeSet<_>>();
            assert_eq!(ids(&pair), expected, "{slug} {source}");
        }
    }
    assert!(
        list_all_in(&app, "default", ListSessionsRequest::default())
            .await
            .is_empty()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn create_session_retries_replay_within_their_own_project_even_when_concurrent() {
    const CLIENTS: usize = 8;
    let app = spawn_app().await;
    let a = create_project(&app, A).await;
    let b = create_project(&app, B).await;

    // Clients of both projects race with one request id and one content.
    let mut calls = Vec::new();
    for n in 0..CLIENTS * 2 {
        let slug = if n % 2 == 0 { A } else { B };
        let mut client = app.sessions.clone();
        calls.push(tokio::spawn(async move {
            let reply = client
                .create_session(in_project(new_session("raced"), slug))
                .await
                .expect("create session")
                .into_inner();
            (slug, reply.session.unwrap().id, reply.created)
        }));
    }
    let mut by_project: std::collections::HashMap<&str, (HashSet<String>, usize)> =
        Default::default();
    for call in calls {
        let (slug, id, created) = call.await.unwrap();
        let entry = by_project.entry(slug).or_default();
        entry.0.insert(id);
        entry.1 += usize::from(created);
    }
    for slug in [A, B] {
        let (ids, created) = &by_project[slug];
        assert_eq!(ids.len(), 1, "every caller in {slug} got one session");
        assert_eq!(*created, 1, "exactly one call in {slug} created it");
    }
    assert_ne!(by_project[A].0, by_project[B].0);
    let sql = app.sql().await;
    for project in [a, b] {
        let n = count(
            &sql,
            "SELECT count(*) FROM sessions WHERE project_id = $1 AND request_id = 'raced'",
            project,
        )
        .await;
        assert_eq!(n, 1);
    }

    // Other content under the key: refused in the project that used it…
    let mut other = new_session("raced");
    other.validation_scope = "partial".into();
    let err = app
        .sessions
        .clone()
        .create_session(in_project(other.clone(), A))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "IDEMPOTENCY_KEY_REUSED");
    // …and a first use in a third project.
    create_project(&app, "team-c").await;
    let (c, created) = create_in(&app, "team-c", other).await;
    assert!(created);
    assert_eq!(c.validation_scope, "partial");
    // A retry in each project still replays that project's session.
    for slug in [A, B] {
        let (s, created) = create_in(&app, slug, new_session("raced")).await;
        assert!(!created);
        assert!(by_project[slug].0.contains(&s.id));
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_of_another_project_is_not_found_on_every_rpc_and_stays_untouched() {
    let app = spawn_app().await;
    let _a = create_project(&app, A).await;
    let b = create_project(&app, B).await;
    // B has a session with a log entry and a result; A asks with its id.
    let (theirs, _) = create_in(&app, B, new_session("same")).await;
    create_in(&app, A, new_session("same")).await;
    let mut client = app.sessions.clone();
    client
        .append_session_log(in_project(log(&theirs.id, "b's entry"), B))
        .await
        .unwrap();
    let their_result = record_in(&app, B, new_result(&theirs.id, "r-1", 0.9)).await;
    let unknown = Uuid::new_v4().to_string();
    let mut results = app.results.clone();

    // Each RPC answers B's id in A exactly as it answers an id nobody has.
    macro_rules! both {
        ($call:expr) => {{
            let call = $call;
            let theirs_err = call(theirs.id.clone()).await.unwrap_err();
            let unknown_err = call(unknown.clone()).await.unwrap_err();
            same_as_unknown(&theirs_err, &theirs.id, &unknown_err, &unknown);
        }};
    }
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.get_session(in_project(
                GetSessionRequest {
                    lookup: Some(Lookup::Id(id)),
                    ..Default::default()
                },
                A,
            ))
            .await
        }
    });
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.update_session_status(in_project(status_change(&id, SessionStatus::Cancelled), A))
                .await
        }
    });
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.append_session_log(in_project(log(&id, "from a"), A))
                .await
        }
    });
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.list_session_logs(in_project(
                ListSessionLogsRequest {
                    session_id: id,
                    ..Default::default()
                },
                A,
            ))
            .await
        }
    });
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.watch_session(in_project(
                WatchSessionRequest {
                    id,
                    ..Default::default()
                },
                A,
            ))
            .await
        }
    });
    both!(|id: String| {
        let mut c = client.clone();
        async move {
            c.delete_session(in_project(
                DeleteSessionRequest {
                    id,
                    expected_version: None,
                },
                A,
            ))
            .await
        }
    });
    both!(|id: String| {
        let mut r = results.clone();
        async move {
            r.record_result(in_project(new_result(&id, "r-1", 0.5), A))
                .await
        }
    });
    // B's result id, too.
    let err = results
        .get_result(in_project(
            GetResultRequest {
                id: their_result.id.clone(),
            },
            A,
        ))
        .await
        .unwrap_err();
    let unknown_err = results
        .get_result(in_project(
            GetResultRequest {
                id: unknown.clone(),
            },
            A,
        ))
        .await
        .unwrap_err();
    same_as_unknown(&err, &their_result.id, &unknown_err, &unknown);
    // A list filtered by B's session is simply empty in A.
    let listed = results
        .list_results(in_project(
            ListResultsRequest {
                session_id: theirs.id.clone(),
                ..Default::default()
            },
            A,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.results.is_empty());

    // Nothing of B's moved: still pending at version 1, one entry, one
    // result, and B itself still reads all of it.
    let sql = app.sql().await;
    let row = sql
        .query_one(
            "SELECT status, version, \
                    (SELECT count(*) FROM session_logs WHERE session_id = s.id), \
                    (SELECT count(*) FROM results WHERE session_id = s.id) \
               FROM sessions s WHERE id = $1 AND project_id = $2",
            &[&theirs.id.parse::<Uuid>().unwrap(), &b],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pending");
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(row.get::<_, i64>(2), 1);
    assert_eq!(row.get::<_, i64>(3), 1);
    let got = results
        .get_result(in_project(
            GetResultRequest {
                id: their_result.id.clone(),
            },
            B,
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(got, their_result);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn logs_and_results_with_the_same_request_ids_stay_in_their_project() {
    let app = spawn_app().await;
    let a = create_project(&app, A).await;
    let b = create_project(&app, B).await;
    let sql = app.sql().await;
    let mut client = app.sessions.clone();
    let mut results = app.results.clone();

    let mut sessions = Vec::new();
    for (slug, entries, n_results) in [(A, 3, 4), (B, 5, 2)] {
        let (s, _) = create_in(&app, slug, new_session("same-session")).await;
        for i in 0..entries {
            client
                .append_session_log(in_project(log(&s.id, &format!("{slug} {i}")), slug))
                .await
                .unwrap();
        }
        let mut recorded = Vec::new();
        for i in 0..n_results {
            let r = record_in(
                &app,
                slug,
                new_result(&s.id, &format!("r-{i}"), 0.5 + i as f64 / 10.0),
            )
            .await;
            recorded.push(r);
        }
        // A retry of a result's request id replays it in its own project.
        let again = record_in(&app, slug, new_result(&s.id, "r-0", 0.5)).await;
        assert_eq!(again.id, recorded[0].id);
        sessions.push((slug, s, recorded));
    }

    for ((slug, s, recorded), project) in sessions.iter().zip([a, b]) {
        // ListSessionLogs: the project's entries only, numbered from 1.
        let entries = client
            .list_session_logs(in_project(
                ListSessionLogsRequest {
                    session_id: s.id.clone(),
                    page_size: 100,
                    ..Default::default()
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(
            entries.len() as i64,
            count(
                &sql,
                "SELECT count(*) FROM session_logs WHERE project_id = $1",
                project
            )
            .await
        );
        assert!(entries.iter().all(|e| e.message.starts_with(slug)));
        assert_eq!(
            entries.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            (1..=entries.len() as i64).collect::<Vec<_>>()
        );

        // ListResults, unfiltered and by session: the project's results.
        for session_id in [String::new(), s.id.clone()] {
            let listed = results
                .list_results(in_project(
                    ListResultsRequest {
                        session_id,
                        page_size: 100,
                        ..Default::default()
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner()
                .results;
            let listed_ids: BTreeSet<_> = listed.iter().map(|r| r.id.clone()).collect();
            let own: BTreeSet<_> = recorded.iter().map(|r| r.id.clone()).collect();
            assert_eq!(listed_ids, own, "{slug}");
            assert_eq!(
                listed.len() as i64,
                count(
                    &sql,
                    "SELECT count(*) FROM results WHERE project_id = $1",
                    project
                )
                .await
            );
        }
        for r in recorded {
            let got = results
                .get_result(in_project(GetResultRequest { id: r.id.clone() }, slug))
                .await
                .unwrap()
                .into_inner()
                .result
                .unwrap();
            assert_eq!(&got, r);
        }
    }
    // The default project sees none of it.
    let none = results
        .list_results(ListResultsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.results.is_empty());

    // Deleting A's session leaves B's session, entries and results alone.
    let (_, a_session, _) = &sessions[0];
    client
        .delete_session(in_project(
            DeleteSessionRequest {
                id: a_session.id.clone(),
                expected_version: None,
            },
            A,
        ))
        .await
        .unwrap();
    for (table, left_in_b) in [("session_logs", 5), ("results", 2), ("sessions", 1)] {
        let in_a = count(
            &sql,
            &format!("SELECT count(*) FROM {table} WHERE project_id = $1"),
            a,
        )
        .await;
        let in_b = count(
            &sql,
            &format!("SELECT count(*) FROM {table} WHERE project_id = $1"),
            b,
        )
        .await;
        assert_eq!((in_a, in_b), (0, left_in_b), "{table}");
    }
    app.stop().await.unwrap();
}

type Client = SessionServiceClient<Channel>;

/// Reads a watch until it ends, returning its events.
async fn drain(mut stream: tonic::Streaming<verdict::proto::WatchSessionResponse>) -> Vec<Event> {
    let mut events = Vec::new();
    let read = async {
        while let Some(m) = stream.message().await.expect("watch stream failed") {
            events.push(m.event.expect("event set"));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the watch did not end within 60 s");
    events
}

#[tokio::test]
async fn watches_in_two_projects_with_concurrent_writers_see_only_their_own_session() {
    const WATCHERS: usize = 4;
    const WRITERS: usize = 4;
    const EACH: usize = 25;
    let app = spawn_app().await;
    create_project(&app, A).await;
    create_project(&app, B).await;
    let mut client: Client = app.sessions.clone();
    let mut sessions = Vec::new();
    for slug in [A, B] {
        let (s, _) = create_in(&app, slug, new_session("watched")).await;
        client
            .update_session_status(in_project(
                status_change(&s.id, SessionStatus::Processing),
                slug,
            ))
            .await
            .unwrap();
        sessions.push((slug, s));
    }

    // Watchers of both sessions, each in its own project, all open before
    // anything is written; each stream's first event is the current state.
    let mut watches = Vec::new();
    for (slug, s) in &sessions {
        for _ in 0..WATCHERS {
            let mut stream = client
                .watch_session(in_project(
                    WatchSessionRequest {
                        id: s.id.clone(),
                        ..Default::default()
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("no first event within 10 s")
                .unwrap()
                .unwrap();
            assert!(matches!(first.event, Some(Event::Session(ref x)) if x.id == s.id));
            watches.push((*slug, s.id.clone(), tokio::spawn(drain(stream))));
        }
    }

    // Writers of both projects append concurrently, then each session ends.
    let mut writers = Vec::new();
    for (slug, s) in &sessions {
        for w in 0..WRITERS {
            let mut c = client.clone();
            let (slug, id) = (*slug, s.id.clone());
            writers.push(tokio::spawn(async move {
                for i in 0..EACH {
                    c.append_session_log(in_project(log(&id, &format!("{slug} {w} {i}")), slug))
                        .await
                        .expect("append");
                }
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    for (slug, s) in &sessions {
        client
            .update_session_status(in_project(
                status_change(&s.id, SessionStatus::Completed),
                slug,
            ))
            .await
            .unwrap();
    }

    for (slug, id, watch) in watches {
        let events = watch.await.unwrap();
        let mut sequences = Vec::new();
        for event in &events {
            match event {
                Event::LogEntry(e) => {
                    assert_eq!(e.session_id, id);
                    assert!(e.message.starts_with(slug), "{slug} got {e:?}");
                    sequences.push(e.sequence);
                }
                Event::Session(s) => assert_eq!(s.id, id),
            }
        }
        // Every entry of its own session exactly once, in order, then the
        // final state.
        assert_eq!(
            sequences,
            (1..=(WRITERS * EACH) as i64).collect::<Vec<_>>(),
            "{slug}"
        );
        assert!(
            matches!(events.last(), Some(Event::Session(s))
                if s.status == SessionStatus::Completed as i32),
            "{slug}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_log_entry_or_result_cannot_sit_in_another_project_than_its_session() {
    let app = spawn_app().await;
    let a = create_project(&app, A).await;
    let b = create_project(&app, B).await;
    let (s, _) = create_in(&app, A, new_session("parent")).await;
    let sid: Uuid = s.id.parse().unwrap();
    let sql = app.sql().await;
    // Planted with B's project under A's session: refused by the composite
    // foreign keys; with an explicit NULL project: refused (NOT NULL).
    for project in [Some(b), None] {
        let err = sql
            .execute(
                "INSERT INTO session_logs (session_id, level, message, project_id) \
                 VALUES ($1, 'info', 'x', $2)",
                &[&sid, &project],
            )
            .await
            .unwrap_err();
        assert!(err.code().is_some(), "{err:?}");
        let err = sql
            .execute(
                "INSERT INTO results (session_id, id, request_id, result_type, overall_status, \
                 fidelity_score, project_id) VALUES ($1, gen_random_uuid(), 'x', 'static', \
                 'passed', 1, $2)",
                &[&sid, &project],
            )
            .await
            .unwrap_err();
        assert!(err.code().is_some(), "{err:?}");
    }
    // A session that names no project lands in `default` (V33: direct-SQL
    // writers keep working), never in A or B.
    let landed: Uuid = sql
        .query_one(
            "INSERT INTO sessions (id, request_id, source_technology, target_technology, \
             validation_scope) VALUES (gen_random_uuid(), 'no-project', 'a', 'b', 'c') \
             RETURNING project_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(landed, crate::helpers::default_project(&app).await);
    // Moving a session to another project under its children is refused too.
    app.sessions
        .clone()
        .append_session_log(in_project(log(&s.id, "child"), A))
        .await
        .unwrap();
    let err = sql
        .execute(
            "UPDATE sessions SET project_id = $1 WHERE id = $2",
            &[&b, &sid],
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );
    let n = count(
        &sql,
        "SELECT count(*) FROM session_logs WHERE project_id = $1",
        a,
    )
    .await;
    assert_eq!(n, 1);
    app.stop().await.unwrap();
}

mod before_projects {
    refinery::embed_migrations!("migrations");
}

#[tokio::test]
async fn sessions_logs_and_results_stored_before_projects_belong_to_default() {
    // A database at V14 (projects exist, sessions have none yet) with rows
    // written the old way…
    let (_, url) = create_database().await;
    let mut sql = admin_client(&url).await;
    before_projects::migrations::runner()
        .set_target(refinery::Target::Version(14))
        .run_async(&mut sql)
        .await
        .expect("migrate to V14");
    let sid = Uuid::new_v4();
    sql.execute(
        "INSERT INTO sessions (id, request_id, source_technology, target_technology, \
         validation_scope, status) VALUES ($1, 'old', 'cobol', 'java', 'full', 'processing')",
        &[&sid],
    )
    .await
    .unwrap();
    sql.batch_execute(&format!(
        "INSERT INTO session_logs (session_id, level, message) VALUES ('{sid}', 'info', 'old 1'), \
           ('{sid}', 'info', 'old 2'); \
         INSERT INTO results (session_id, id, request_id, result_type, overall_status, \
           fidelity_score) VALUES ('{sid}', gen_random_uuid(), 'old-r', 'static', 'passed', 0.75);"
    ))
    .await
    .unwrap();

    // …then the gateway migrates: they are `default`'s, and only its.
    let app = spawn_app_with(test_config(&url)).await;
    create_project(&app, A).await;
    let default = default_project(&app).await;
    let sql = app.sql().await;
    for table in ["sessions", "session_logs", "results"] {
        let n: i64 = sql
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE project_id = $1"),
                &[&default],
            )
            .await
            .unwrap()
            .get(0);
        let all: i64 = sql
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!((n, all), (if table == "session_logs" { 2 } else { 1 }, n));
    }
    let mut client = app.sessions.clone();
    let old = client
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("old".into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(old.id, sid.to_string());
    // The log goes on from where it was, and the old result replays.
    let next = client
        .append_session_log(log(&old.id, "new"))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(next.sequence, 3);
    let listed = app
        .results
        .clone()
        .list_results(ListResultsRequest {
            session_id: old.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(listed.len(), 1);
    // Another project sees none of it.
    let err = client
        .get_session(in_project(
            GetSessionRequest {
                lookup: Some(Lookup::Id(old.id.clone())),
                ..Default::default()
            },
            A,
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    // The same request id is free in A.
    let (fresh, created) = create_in(&app, A, new_session("old")).await;
    assert!(created);
    assert_ne!(fresh.id, old.id);
    app.stop().await.unwrap();
}

/// Appends in project `slug`, retrying while the gateway reports a
/// transient failure (its connections were just terminated).
async fn append_in_retrying(client: &mut Client, slug: &str, id: &str, message: &str) -> i64 {
    for _ in 0..200 {
        match client
            .append_session_log(in_project(log(id, message), slug))
            .await
        {
            Ok(r) => return r.into_inner().entry.unwrap().sequence,
            Err(s) if matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) => {
                tokio::task::yield_now().await
            }
            Err(s) => panic!("append failed: {s:?}"),
        }
    }
    panic!("append kept failing");
}

async fn next_event(
    stream: &mut tonic::Streaming<verdict::proto::WatchSessionResponse>,
) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("no watch event within 20 s")
        .expect("watch stream failed")
        .map(|m| m.event.expect("event set"))
}

#[tokio::test]
async fn watches_of_two_projects_ride_out_terminated_connections_and_resume_within_their_project() {
    use crate::watch::{listener_pid, terminate_gateway_connections};
    let app = spawn_app().await;
    create_project(&app, A).await;
    create_project(&app, B).await;
    let sql = app.sql().await;
    let mut client: Client = app.sessions.clone();
    let mut watched = Vec::new();
    for slug in [A, B] {
        let (s, _) = create_in(&app, slug, new_session("faulted")).await;
        let mut stream = client
            .watch_session(in_project(
                WatchSessionRequest {
                    id: s.id.clone(),
                    ..Default::default()
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(next_event(&mut stream).await, Some(Event::Session(x)) if x.id == s.id));
        watched.push((slug, s.id, stream));
    }

    let mut writer = SessionServiceClient::new(connect(app.port).await);
    for round in 1..=3i64 {
        let before = listener_pid(&sql).await;
        assert!(terminate_gateway_connections(&sql).await >= 1);
        // Both sessions change while the listener may be down; B first, so
        // a leak would reach A's watcher before A's own entry.
        for (slug, id, _) in watched.iter().rev() {
            let seq = append_in_retrying(&mut writer, slug, id, &format!("{slug} {round}")).await;
            assert_eq!(seq, round);
        }
        for (slug, id, stream) in watched.iter_mut() {
            match next_event(stream).await {
                Some(Event::LogEntry(e)) => {
                    assert_eq!(
                        (e.session_id.as_str(), e.sequence, e.message.as_str()),
                        (id.as_str(), round, format!("{slug} {round}").as_str())
                    );
                }
                other => panic!("{slug} round {round}: expected its entry, got {other:?}"),
            }
        }
        assert_ne!(listener_pid(&sql).await, before, "the listener reconnected");
    }

    // A watch resumed in A from sequence 1 gets A's entries 2 and 3, then
    // follows A only.
    let (_, a_id, _) = &watched[0];
    let mut resumed = client
        .watch_session(in_project(
            WatchSessionRequest {
                id: a_id.clone(),
                after_sequence: Some(1),
                after_version: Some(1),
            },
            A,
        ))
        .await
        .unwrap()
        .into_inner();
    for round in 2..=3 {
        match next_event(&mut resumed).await {
            Some(Event::LogEntry(e)) => {
                assert_eq!((e.sequence, e.message), (round, format!("{A} {round}")))
            }
            other => panic!("expected A's entry {round}, got {other:?}"),
        }
    }
    // A resumption position that is valid in B (B now has 4 entries) is
    // judged against A's own session (3): refused.
    append_in_retrying(&mut writer, B, &watched[1].1, "b only").await;
    let err = client
        .watch_session(in_project(
            WatchSessionRequest {
                id: a_id.clone(),
                after_sequence: Some(4),
                after_version: None,
            },
            A,
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
    assert_eq!(violated_fields(&err), ["after_sequence"]);
    append_in_retrying(&mut writer, A, a_id, "a again").await;
    match next_event(&mut resumed).await {
        Some(Event::LogEntry(e)) => assert_eq!((e.sequence, e.message.as_str()), (4, "a again")),
        other => panic!("expected A's entry 4, got {other:?}"),
    }
    app.stop().await.unwrap();
}
