//! WatchSession: committed changes reach watchers, across replicas.

use crate::helpers::{connect, spawn_app, spawn_app_with, test_config};
use crate::sessions::{create, set_status};
use std::time::Duration;
use tonic::Code;
use tonic::Streaming;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::watch_session_response::Event;
use verdict::proto::{
    AppendSessionLogRequest, DeleteSessionRequest, LogLevel, SessionStatus, WatchSessionRequest,
    WatchSessionResponse,
};

async fn next(stream: &mut Streaming<WatchSessionResponse>) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no watch event within 10 s")
        .expect("watch stream failed")
        .map(|m| m.event.expect("event set"))
}

fn status_of(event: Option<Event>) -> SessionStatus {
    match event {
        Some(Event::Session(s)) => SessionStatus::try_from(s.status).unwrap(),
        other => panic!("expected a session event, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_session_streams_changes_made_through_another_client_and_ends_when_final() {
    let app = spawn_app().await;
    let s = create(&app, "watched").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);

    let mut other = SessionServiceClient::new(connect(app.port).await);
    other
        .append_session_log(AppendSessionLogRequest {
            session_id: s.id.clone(),
            level: LogLevel::Info as i32,
            message: "parsing sources".into(),
            fields: None,
        })
        .await
        .unwrap();
    match next(&mut stream).await {
        Some(Event::LogEntry(e)) => assert_eq!(e.message, "parsing sources"),
        other => panic!("expected the log entry, got {other:?}"),
    }
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    assert_eq!(
        status_of(next(&mut stream).await),
        SessionStatus::Processing
    );
    set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Completed);
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends after a final status"
    );
}

#[tokio::test]
async fn watch_session_sees_changes_committed_through_another_replica() {
    let app = spawn_app().await;
    let replica = spawn_app_with(test_config(&app.database_url)).await;
    let s = create(&app, "replicated").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);
    set_status(&replica, &s.id, SessionStatus::Cancelled)
        .await
        .unwrap();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Cancelled);
    assert!(next(&mut stream).await.is_none());
}

#[tokio::test]
async fn watching_a_missing_or_deleted_session_is_not_found() {
    let app = spawn_app().await;
    let err = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let s = create(&app, "deleted").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    next(&mut stream).await;
    app.sessions
        .clone()
        .delete_session(DeleteSessionRequest {
            id: s.id.clone(),
            expected_version: None,
        })
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no end within 10 s")
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// ---------------------------------------------------------------------------
// Order, completeness, faults, resumption, final sessions.

use std::collections::HashSet;
use tonic::transport::Channel;
use verdict::proto::{ListSessionLogsRequest, SessionLogEntry, UpdateSessionStatusRequest};

type Client = SessionServiceClient<Channel>;

pub fn entry(id: &str, message: &str) -> AppendSessionLogRequest {
    AppendSessionLogRequest {
        session_id: id.into(),
        level: LogLevel::Info as i32,
        message: message.into(),
        fields: None,
    }
}

/// Appends one entry, retrying while the gateway reports a transient
/// failure (its connections were just terminated).
async fn append_retrying(client: &mut Client, id: &str, message: &str) -> SessionLogEntry {
    for _ in 0..50 {
        match client.append_session_log(entry(id, message)).await {
            Ok(r) => return r.into_inner().entry.expect("entry"),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) => {
                tokio::task::yield_now().await
            }
            Err(s) => panic!("append failed: {s:?}"),
        }
    }
    panic!("append kept failing")
}

async fn watch(
    client: &mut Client,
    request: WatchSessionRequest,
) -> Streaming<WatchSessionResponse> {
    client
        .watch_session(request)
        .await
        .expect("watch")
        .into_inner()
}

fn watch_from(
    id: &str,
    after_sequence: Option<i64>,
    after_version: Option<i64>,
) -> WatchSessionRequest {
    WatchSessionRequest {
        id: id.into(),
        after_sequence,
        after_version,
    }
}

/// Reads events until the stream ends (OK), returning them.
async fn drain(mut stream: Streaming<WatchSessionResponse>, limit: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    let read = async {
        while let Some(m) = stream.message().await.expect("watch stream failed") {
            events.push(m.event.expect("event set"));
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("the watch did not end in time");
    events
}

fn sequences(events: &[Event]) -> Vec<i64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::LogEntry(l) => Some(l.sequence),
            _ => None,
        })
        .collect()
}

/// Every entry of a session's log, page by page, in ListSessionLogs order.
async fn all_logs(client: &mut Client, id: &str) -> Vec<SessionLogEntry> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_session_logs(ListSessionLogsRequest {
                session_id: id.into(),
                min_level: 0,
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.entries);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .expect("the status carries an ErrorInfo")
        .reason
}

#[tokio::test]
async fn concurrent_writers_reach_every_watcher_exactly_once_in_list_order() {
    const WRITERS: usize = 8;
    const EACH: usize = 200;
    let app = spawn_app().await;
    let s = create(&app, "contended").await;
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();

    // Several watchers, on their own connections.
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let mut stream = watch(&mut client, watch_from(&s.id, None, None)).await;
        assert_eq!(
            status_of(next(&mut stream).await),
            SessionStatus::Processing
        );
        watchers.push(tokio::spawn(drain(stream, Duration::from_secs(60))));
    }

    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let id = s.id.clone();
        writers.spawn(async move {
            for i in 0..EACH {
                client
                    .append_session_log(entry(&id, &format!("w{w}-{i}")))
                    .await
                    .expect("append");
            }
        });
    }
    writers.join_all().await;
    set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();

    let listed = all_logs(&mut app.sessions.clone(), &s.id).await;
    assert_eq!(listed.len(), WRITERS * EACH);
    let listed_seq: Vec<i64> = listed.iter().map(|e| e.sequence).collect();
    assert_eq!(
        listed_seq,
        (1..=(WRITERS * EACH) as i64).collect::<Vec<_>>(),
        "sequences are 1..n without gaps, in list order"
    );
    let listed_messages: Vec<&str> = listed.iter().map(|e| e.message.as_str()).collect();
    for watcher in watchers {
        let events = watcher.await.unwrap();
        let messages: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::LogEntry(l) => Some(l.message.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(messages.len(), WRITERS * EACH, "every entry, none twice");
        assert_eq!(messages, listed_messages, "in ListSessionLogs order");
        assert_eq!(sequences(&events), listed_seq);
        assert_eq!(
            status_of(events.last().cloned()),
            SessionStatus::Completed,
            "the final state comes after every entry"
        );
    }
}

/// Terminates every connection the gateway holds (pool and LISTEN), waiting
/// until they are gone, and returns how many were ended.
pub async fn terminate_gateway_connections(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The pid of the gateway's LISTEN connection, once it is listening.
pub async fn listener_pid(sql: &tokio_postgres::Client) -> i32 {
    let started = std::time::Instant::now();
    loop {
        let row = sql
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %' LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gateway did not listen again within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_watch_rides_out_repeated_terminations_of_every_gateway_connection() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let s = create(&app, "terminated").await;
    let mut client = app.sessions.clone();
    let mut stream = watch(&mut client, watch_from(&s.id, None, None)).await;
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);

    let mut writer = SessionServiceClient::new(connect(app.port).await);
    for round in 0..5 {
        let before = listener_pid(&sql).await;
        assert!(terminate_gateway_connections(&sql).await >= 1);
        // The change lands while the listener may still be down.
        let stored =
            append_retrying(&mut writer, &s.id, &format!("after termination {round}")).await;
        match next(&mut stream).await {
            Some(Event::LogEntry(e)) => {
                assert_eq!(e.sequence, stored.sequence);
                assert_eq!(e.message, format!("after termination {round}"));
            }
            other => panic!("round {round}: expected the entry, got {other:?}"),
        }
        assert_ne!(listener_pid(&sql).await, before, "the listener reconnected");
    }
    // A state change after the last termination arrives too, and ends it.
    terminate_gateway_connections(&sql).await;
    loop {
        match set_status(&app, &s.id, SessionStatus::Cancelled).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Unavailable => tokio::task::yield_now().await,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Cancelled);
    assert!(
        next(&mut stream).await.is_none(),
        "ends OK after the final state"
    );
}

#[tokio::test]
async fn a_reconnecting_watch_gets_exactly_the_changes_it_missed() {
    let app = spawn_app().await;
    let s = create(&app, "resumed").await;
    let mut client = app.sessions.clone();
    let mut stream = watch(&mut client, watch_from(&s.id, None, None)).await;
    let first = match next(&mut stream).await {
        Some(Event::Session(s)) => s,
        other => panic!("expected the state, got {other:?}"),
    };
    for i in 1..=5 {
        append_retrying(&mut client, &s.id, &format!("seen {i}")).await;
    }
    let mut last_seen = 0;
    for i in 1..=5 {
        match next(&mut stream).await {
            Some(Event::LogEntry(e)) => {
                assert_eq!(e.sequence, i);
                last_seen = e.sequence;
            }
            other => panic!("expected entry {i}, got {other:?}"),
        }
    }
    drop(stream);

    // Missed while disconnected: entries 6..=7, a state, entries 8..=10.
    for i in 6..=7 {
        append_retrying(&mut client, &s.id, &format!("missed {i}")).await;
    }
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    for i in 8..=10 {
        append_retrying(&mut client, &s.id, &format!("missed {i}")).await;
    }

    let mut stream = watch(
        &mut client,
        watch_from(&s.id, Some(last_seen), Some(first.version)),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(next(&mut stream).await.expect("an event"));
    }
    let shape: Vec<String> = got
        .iter()
        .map(|e| match e {
            Event::LogEntry(l) => format!("log {}", l.sequence),
            Event::Session(s) => format!("state {}", s.version),
        })
        .collect();
    assert_eq!(
        shape,
        ["log 6", "log 7", "state 2", "log 8", "log 9", "log 10"],
        "exactly the missed changes, in commit order"
    );
    // Nothing else was pending: the next event is the next change.
    append_retrying(&mut client, &s.id, "live").await;
    match next(&mut stream).await {
        Some(Event::LogEntry(e)) => assert_eq!((e.sequence, e.message.as_str()), (11, "live")),
        other => panic!("expected the live entry, got {other:?}"),
    }
    drop(stream);

    // Up to date: no initial state, no replay.
    let mut stream = watch(&mut client, watch_from(&s.id, Some(11), Some(2))).await;
    set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Completed);
    assert!(next(&mut stream).await.is_none());

    // From the start of a final session: the whole log, then the final state.
    let events = drain(
        watch(&mut client, watch_from(&s.id, Some(0), None)).await,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(sequences(&events), (1..=11).collect::<Vec<_>>());
    assert_eq!(status_of(events.last().cloned()), SessionStatus::Completed);
    // Already seen everything: ends at once, with nothing.
    let events = drain(
        watch(&mut client, watch_from(&s.id, Some(11), Some(3))).await,
        Duration::from_secs(10),
    )
    .await;
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn watch_positions_beyond_the_session_or_negative_are_invalid() {
    let app = spawn_app().await;
    let s = create(&app, "positions").await;
    let mut client = app.sessions.clone();
    append_retrying(&mut client, &s.id, "one").await;
    for (request, field) in [
        (watch_from(&s.id, Some(2), None), "after_sequence"),
        (watch_from(&s.id, Some(-1), None), "after_sequence"),
        (watch_from(&s.id, None, Some(2)), "after_version"),
        (watch_from(&s.id, None, Some(0)), "after_version"),
    ] {
        let err = client.watch_session(request).await.unwrap_err();
        assert_eq!(crate::helpers::violated_fields(&err), [field]);
    }
}

#[tokio::test]
async fn appends_to_a_final_session_are_refused_and_never_half_written() {
    let app = spawn_app().await;
    let mut client = app.sessions.clone();
    for final_status in [
        SessionStatus::Completed,
        SessionStatus::Failed,
        SessionStatus::Cancelled,
    ] {
        let s = create(&app, &format!("final-{final_status:?}")).await;
        append_retrying(&mut client, &s.id, "before").await;
        if final_status != SessionStatus::Cancelled {
            set_status(&app, &s.id, SessionStatus::Processing)
                .await
                .unwrap();
        }
        set_status(&app, &s.id, final_status).await.unwrap();
        let err = client
            .append_session_log(entry(&s.id, "after"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(reason(&err), "SESSION_NOT_ACCEPTING_WRITES");
        let logs = all_logs(&mut client, &s.id).await;
        assert_eq!(logs.len(), 1, "nothing stored");
        // The refused append took no position.
        let sql = app.sql().await;
        let seq: i64 = sql
            .query_one(
                "SELECT log_seq FROM sessions WHERE id = $1",
                &[&s.id.parse::<uuid::Uuid>().unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(seq, 1);
    }
}

#[tokio::test]
async fn every_acknowledged_append_racing_the_final_move_reaches_the_watcher_first() {
    let app = spawn_app().await;
    let s = create(&app, "racing").await;
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    let mut client = app.sessions.clone();
    let stream = watch(&mut client, watch_from(&s.id, None, None)).await;
    let watcher = tokio::spawn(drain(stream, Duration::from_secs(60)));

    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let id = s.id.clone();
        writers.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..500 {
                match client
                    .append_session_log(entry(&id, &format!("w{w}-{i}")))
                    .await
                {
                    Ok(r) => acked.push(r.into_inner().entry.unwrap().sequence),
                    Err(e) => {
                        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                        assert_eq!(reason(&e), "SESSION_NOT_ACCEPTING_WRITES");
                        return (acked, true);
                    }
                }
            }
            (acked, false)
        });
    }
    // Move to the final status while the writers are busy.
    let sql = app.sql().await;
    let uuid: uuid::Uuid = s.id.parse().unwrap();
    let started = std::time::Instant::now();
    loop {
        let n: i64 = sql
            .query_one("SELECT log_seq FROM sessions WHERE id = $1", &[&uuid])
            .await
            .unwrap()
            .get(0);
        if n >= 100 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::task::yield_now().await;
    }
    client
        .update_session_status(UpdateSessionStatusRequest {
            id: s.id.clone(),
            status: SessionStatus::Failed as i32,
            expected_version: None,
        })
        .await
        .unwrap();
    let mut acked = HashSet::new();
    let mut refused = 0;
    for (seqs, was_refused) in writers.join_all().await {
        acked.extend(seqs);
        refused += was_refused as usize;
    }
    assert!(
        refused > 0,
        "some appends raced the final move and were refused"
    );
    let events = watcher.await.unwrap();
    assert_eq!(status_of(events.last().cloned()), SessionStatus::Failed);
    let delivered = sequences(&events);
    let delivered_set: HashSet<i64> = delivered.iter().copied().collect();
    assert_eq!(delivered.len(), delivered_set.len(), "none twice");
    assert_eq!(
        delivered_set, acked,
        "every acknowledged append, before the end"
    );
    let stored = all_logs(&mut client, &s.id).await;
    assert_eq!(stored.len(), acked.len(), "nothing refused was stored");
}

#[tokio::test]
async fn entries_written_by_direct_sql_get_the_next_sequence_and_reach_watchers() {
    let app = spawn_app().await;
    let s = create(&app, "direct-sql").await;
    let mut client = app.sessions.clone();
    append_retrying(&mut client, &s.id, "through the gateway").await;
    let mut stream = watch(&mut client, watch_from(&s.id, None, None)).await;
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);
    // An operator's bulk insert leaves seq out.
    app.sql()
        .await
        .execute(
            "INSERT INTO session_logs (session_id, level, message, project_id) \
             SELECT $1, 'info', 'bulk ' || i, (SELECT id FROM projects WHERE slug = 'default') \
             FROM generate_series(1, 3) i",
            &[&s.id.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap();
    for (seq, message) in [(2, "bulk 1"), (3, "bulk 2"), (4, "bulk 3")] {
        match next(&mut stream).await {
            Some(Event::LogEntry(e)) => {
                assert_eq!((e.sequence, e.message.as_str()), (seq, message))
            }
            other => panic!("expected entry {seq}, got {other:?}"),
        }
    }
    let stored = append_retrying(&mut client, &s.id, "after").await;
    assert_eq!(stored.sequence, 5);
}

/// How many connections of the gateway listen on the session channel.
async fn session_listeners(sql: &tokio_postgres::Client) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND query = 'LISTEN verdict_session_changed'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Polls until `want` session listeners exist (at most 20 s).
async fn await_session_listeners(sql: &tokio_postgres::Client, want: i64) {
    let started = std::time::Instant::now();
    while session_listeners(sql).await != want {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still not {want} session listener(s) after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_session_listener_runs_only_while_watched_and_its_first_watchers_miss_nothing() {
    const WRITERS: usize = 4;
    const EACH: usize = 100;
    const WATCHERS: usize = 6;
    const BEFORE: usize = 5;
    let app = spawn_app().await;
    let sql = app.sql().await;
    let s = create(&app, "listened-lazily").await;
    set_status(&app, &s.id, SessionStatus::Processing)
        .await
        .unwrap();
    let mut writer = SessionServiceClient::new(connect(app.port).await);
    for i in 0..BEFORE {
        writer
            .append_session_log(entry(&s.id, &format!("unwatched {i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        session_listeners(&sql).await,
        0,
        "nobody watches: no connection listens for session changes"
    );

    // Watchers start while writers commit: the first ones join before the
    // listener is up, with entries committing all along. Each asks for the
    // whole log and must get every entry once, in order.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(WRITERS + WATCHERS));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let (id, start) = (s.id.clone(), start.clone());
        writers.spawn(async move {
            start.wait().await;
            for i in 0..EACH {
                client
                    .append_session_log(entry(&id, &format!("w{w}-{i}")))
                    .await
                    .expect("append");
            }
        });
    }
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let (id, start) = (s.id.clone(), start.clone());
        watchers.push(tokio::spawn(async move {
            start.wait().await;
            let stream = watch(&mut client, watch_from(&id, Some(0), None)).await;
            drain(stream, Duration::from_secs(60)).await
        }));
    }
    writers.join_all().await;
    await_session_listeners(&sql, 1).await;
    set_status(&app, &s.id, SessionStatus::Completed)
        .await
        .unwrap();
    let total = (BEFORE + WRITERS * EACH) as i64;
    for watcher in watchers {
        let events = watcher.await.unwrap();
        assert_eq!(
            sequences(&events),
            (1..=total).collect::<Vec<_>>(),
            "every entry once, in order"
        );
        assert_eq!(status_of(events.last().cloned()), SessionStatus::Completed);
    }

    // Every watch ended: the listener disconnects.
    await_session_listeners(&sql, 0).await;
    writer
        .append_session_log(entry(&s.id, "refused: final"))
        .await
        .expect_err("a completed session takes no entries");

    // Watching again listens again, and a change made right after the
    // watcher's first event reaches it.
    let s2 = create(&app, "listened-again").await;
    let mut client = SessionServiceClient::new(connect(app.port).await);
    let mut stream = watch(&mut client, watch_from(&s2.id, None, None)).await;
    assert_eq!(status_of(next(&mut stream).await), SessionStatus::Pending);
    let stored = writer
        .append_session_log(entry(&s2.id, "watched again"))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    match next(&mut stream).await {
        Some(Event::LogEntry(e)) => assert_eq!(e.sequence, stored.sequence),
        other => panic!("expected the entry, got {other:?}"),
    }
    await_session_listeners(&sql, 1).await;
    drop(stream);
    await_session_listeners(&sql, 0).await;
}
