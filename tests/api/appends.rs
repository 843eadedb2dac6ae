//! Group commit of AppendSessionLog: concurrent appends to one session
//! share statements, and every call keeps its own reply, position and audit
//! row — with the session's row lock held, across terminated backends, and
//! with callers that leave early.

use crate::helpers::{
    TestApp, connect, create_database, spawn_app, spawn_app_with, test_config, wait_for_lock_wait,
};
use crate::sessions::create;
use crate::watch::{entry, terminate_gateway_connections};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tonic::Code;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{AppendSessionLogRequest, AppendSessionLogResponse, Session};

type Client = SessionServiceClient<tonic::transport::Channel>;

/// A trace id of 32 hex characters made from `n`.
fn trace_of(n: usize) -> String {
    format!("{:032x}", 0xabc0_0000_u64 as usize + n)
}

fn traced(id: &str, message: &str, trace: &str) -> tonic::Request<AppendSessionLogRequest> {
    let mut r = tonic::Request::new(entry(id, message));
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    r
}

/// `f`, which must end within 60 s: no append is stranded in a queue.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("every append call ends")
}

type Reply = Result<tonic::Response<AppendSessionLogResponse>, tonic::Status>;

/// A new session whose row lock the test holds (until [`Held::release`]),
/// and its first append, sent and waiting for that lock: it holds the
/// session's turn in the gateway.
struct Held {
    app: TestApp,
    s: Session,
    id: uuid::Uuid,
    locker: tokio_postgres::Client,
    observer: tokio_postgres::Client,
    first: tokio::task::JoinHandle<Reply>,
}

async fn held(
    app: TestApp,
    name: &str,
    first: impl FnOnce(&str) -> tonic::Request<AppendSessionLogRequest>,
) -> Held {
    let s = create(&app, name).await;
    let id: uuid::Uuid = s.id.parse().unwrap();
    let locker = app.sql().await;
    let observer = app.sql().await;
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM sessions WHERE id = '{id}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let mut client = app.sessions.clone();
    let request = first(&s.id);
    let first = tokio::spawn(async move { client.append_session_log(request).await });
    wait_for_lock_wait(&observer, "%session_logs%").await;
    Held {
        app,
        s,
        id,
        locker,
        observer,
        first,
    }
}

impl Held {
    async fn release(&self) {
        self.locker.batch_execute("COMMIT").await.unwrap();
    }
}

/// How many audit rows of appends name the session `id`.
async fn audited(sql: &tokio_postgres::Client, id: uuid::Uuid) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM audit_events \
          WHERE target_ids = ARRAY[$1::uuid::text] AND outcome = 'appended'",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// (message, sequence, transaction id) of the stored log of `id`, in
/// sequence order.
async fn stored(sql: &tokio_postgres::Client, id: uuid::Uuid) -> Vec<(String, i64, String)> {
    sql.query(
        "SELECT message, seq, xmin::text FROM session_logs WHERE session_id = $1 ORDER BY seq",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn appends_queued_behind_a_locked_session_commit_together_each_with_its_position_and_audit_row()
 {
    const FOLLOWERS: usize = 15;
    let mut h = held(spawn_app().await, "grouped", |id| {
        traced(id, "m0", &trace_of(0))
    })
    .await;
    let (app, s, id, observer) = (&h.app, &h.s, h.id, &h.observer);
    let mut calls = tokio::task::JoinSet::new();
    for n in 1..=FOLLOWERS {
        // Half on the shared channel, half each on a connection of its own.
        let mut client = if n % 2 == 0 {
            app.sessions.clone()
        } else {
            SessionServiceClient::new(connect(app.port).await)
        };
        let id = s.id.clone();
        calls.spawn(async move {
            let message = format!("m{n}");
            let r = client
                .append_session_log(traced(&id, &message, &trace_of(n)))
                .await;
            (message, r)
        });
    }
    // Only the first append reached the database: the others wait in the
    // gateway, not on the lock.
    let waiting: i64 = observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'verdict' \
             AND datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(waiting, 1, "one statement waits for the session's lock");
    h.release().await;

    let mut acked = HashMap::new();
    let first = within(&mut h.first)
        .await
        .unwrap()
        .expect("the first append");
    acked.insert("m0".to_owned(), first.into_inner().entry.unwrap().sequence);
    while let Some(done) = within(calls.join_next()).await {
        let (message, r) = done.unwrap();
        let e = r
            .expect("every append is acknowledged")
            .into_inner()
            .entry
            .unwrap();
        assert_eq!(e.message, message);
        acked.insert(message, e.sequence);
    }
    let rows = stored(observer, id).await;
    assert_eq!(rows.len(), FOLLOWERS + 1, "every entry stored once");
    let seqs: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        seqs,
        (1..=FOLLOWERS as i64 + 1).collect::<Vec<_>>(),
        "no gap"
    );
    for (message, seq, _) in &rows {
        assert_eq!(acked[message], *seq, "each reply names its stored position");
    }
    assert_eq!(rows[0].0, "m0", "the first append went first");
    let transactions: HashSet<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert!(
        transactions.len() < rows.len(),
        "the appends that waited shared a transaction: {rows:?}"
    );

    // One audit row per entry, with its caller's trace id, committed in the
    // entry's own transaction.
    let pairs: HashSet<(String, String)> = observer
        .query(
            "SELECT l.message, a.trace_id FROM audit_events a \
               JOIN session_logs l ON l.session_id = $1 AND l.xmin = a.xmin \
              WHERE a.target_ids = ARRAY[$1::uuid::text] AND a.outcome = 'appended'",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for n in 0..=FOLLOWERS {
        assert!(
            pairs.contains(&(format!("m{n}"), trace_of(n))),
            "m{n}'s audit row carries its trace id and commits with it"
        );
    }
    let total = audited(observer, id).await;
    assert_eq!(total, FOLLOWERS as i64 + 1, "one audit row per append");
}

#[tokio::test]
async fn a_call_that_leaves_before_its_group_is_sent_stores_nothing_and_its_group_still_commits() {
    let mut h = held(spawn_app().await, "leaving", |id| {
        tonic::Request::new(entry(id, "first"))
    })
    .await;
    let (app, s, id, observer) = (&h.app, &h.s, h.id, &h.observer);

    // A caller with a short deadline queues behind the first append and is
    // gone before the lock is released.
    let mut short = tonic::Request::new(entry(&s.id, "gone"));
    short.set_timeout(Duration::from_millis(300));
    let err = app
        .sessions
        .clone()
        .append_session_log(short)
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    // A caller that hangs up (drops its call) while queued.
    let mut hung_up = SessionServiceClient::new(connect(app.port).await);
    let hang_id = s.id.clone();
    let hang =
        tokio::spawn(async move { hung_up.append_session_log(entry(&hang_id, "hung up")).await });
    // Two that stay.
    let mut stayers = tokio::task::JoinSet::new();
    for m in ["second", "third"] {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let id = s.id.clone();
        stayers.spawn(async move { client.append_session_log(entry(&id, m)).await });
    }
    hang.abort();
    let _ = hang.await;
    h.release().await;

    let first = within(&mut h.first)
        .await
        .unwrap()
        .expect("first")
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(first.sequence, 1);
    let mut seqs = vec![first.sequence];
    while let Some(r) = within(stayers.join_next()).await {
        seqs.push(
            r.unwrap()
                .expect("the callers that stayed are acknowledged")
                .into_inner()
                .entry
                .unwrap()
                .sequence,
        );
    }
    let rows = stored(observer, id).await;
    let messages: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert!(
        !messages.contains(&"gone"),
        "a caller past its deadline before its group stores nothing: {messages:?}"
    );
    let positions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        positions,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "no position taken by a call that left"
    );
    for seq in seqs {
        assert!(positions.contains(&seq));
    }
    // The hung-up call may have been sent before it hung up; either way it
    // is stored at most once.
    assert!(messages.iter().filter(|m| **m == "hung up").count() <= 1);
    assert!(rows.len() == 3 || rows.len() == 4, "{messages:?}");
}

#[tokio::test]
async fn the_appends_behind_a_first_append_that_times_out_are_still_written() {
    let mut h = held(spawn_app().await, "leader-gone", |id| {
        let mut r = tonic::Request::new(entry(id, "leader"));
        r.set_timeout(Duration::from_secs(2));
        r
    })
    .await;
    let (app, s, id, observer) = (&h.app, &h.s, h.id, &h.observer);
    let mut followers = tokio::task::JoinSet::new();
    for n in 0..4 {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let id = s.id.clone();
        followers.spawn(async move {
            client
                .append_session_log(entry(&id, &format!("f{n}")))
                .await
        });
    }
    // The first append's deadline passes while it holds the session's turn;
    // its statement is cancelled and the turn goes on to the waiting ones.
    let err = within(&mut h.first).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    h.release().await;
    let mut seqs = Vec::new();
    while let Some(r) = within(followers.join_next()).await {
        seqs.push(
            r.unwrap()
                .expect("acknowledged")
                .into_inner()
                .entry
                .unwrap()
                .sequence,
        );
    }
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let messages: Vec<String> = stored(observer, id)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert!(!messages.contains(&"leader".to_owned()), "{messages:?}");
}

#[tokio::test]
async fn concurrent_appenders_across_terminated_backends_lose_nothing_acknowledged_and_never_hang()
{
    const WRITERS: usize = 6;
    const EACH: usize = 80;
    let app = spawn_app().await;
    let s = create(&app, "faults").await;
    let id: uuid::Uuid = s.id.parse().unwrap();
    let observer = app.sql().await;

    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client: Client = SessionServiceClient::new(connect(app.port).await);
        let sid = s.id.clone();
        writers.spawn(async move {
            let mut acked = Vec::new();
            let mut failed = Vec::new();
            for i in 0..EACH {
                let message = format!("w{w}-{i}");
                // Odd writers carry a deadline below the statement maximum:
                // their groups set `statement_timeout` ahead of the append.
                let mut request = tonic::Request::new(entry(&sid, &message));
                if w % 2 == 1 {
                    request.set_timeout(Duration::from_secs(20));
                }
                match client.append_session_log(request).await {
                    Ok(r) => acked.push((message, r.into_inner().entry.unwrap().sequence)),
                    Err(e) => {
                        assert!(
                            matches!(e.code(), Code::Unavailable | Code::ResourceExhausted),
                            "a terminated backend is a retryable failure: {e:?}"
                        );
                        failed.push(message);
                    }
                }
            }
            (acked, failed)
        });
    }
    // Terminate every gateway connection each time the log has grown.
    let mut last = 0;
    for _ in 0..4 {
        let grown = async {
            loop {
                let n: i64 = observer
                    .query_one("SELECT log_seq FROM sessions WHERE id = $1", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                if n >= last + 40 || n as usize >= WRITERS * EACH - 40 {
                    last = n;
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), grown)
            .await
            .expect("the log grows between terminations");
        terminate_gateway_connections(&observer).await;
    }
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(120), writers.join_all())
        .await
        .expect("every append call ends");
    for (a, f) in all {
        acked.extend(a);
        failed.extend(f);
    }
    let rows = stored(&observer, id).await;
    let positions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        positions,
        (1..=rows.len() as i64).collect::<Vec<_>>(),
        "no gap"
    );
    let by_message: HashMap<&str, i64> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(by_message.len(), rows.len(), "no entry stored twice");
    for (message, seq) in &acked {
        assert_eq!(
            by_message.get(message.as_str()),
            Some(seq),
            "acknowledged {message} is stored where its reply said"
        );
    }
    assert!(rows.len() >= acked.len() && rows.len() <= acked.len() + failed.len());
    let audited = audited(&observer, id).await;
    assert_eq!(
        audited as usize,
        rows.len(),
        "one audit row per stored entry"
    );
    // The session still takes appends.
    let after = app
        .sessions
        .clone()
        .append_session_log(entry(&s.id, "after"))
        .await;
    let after = match after {
        Ok(r) => r,
        Err(_) => app
            .sessions
            .clone()
            .append_session_log(entry(&s.id, "after"))
            .await
            .expect("append after the faults"),
    };
    assert_eq!(
        after.into_inner().entry.unwrap().sequence,
        rows.len() as i64 + 1
    );
}

#[tokio::test]
async fn past_the_pools_waiting_limit_more_appends_to_a_session_are_shed_at_once() {
    const LIMIT: usize = 3;
    const MORE: usize = 5;
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.pool_max_waiting = LIMIT;
    let mut h = held(spawn_app_with(config).await, "flooded", |id| {
        tonic::Request::new(entry(id, "first"))
    })
    .await;
    let (app, s, id, observer) = (&h.app, &h.s, h.id, &h.observer);
    let (done, mut results) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..LIMIT + MORE {
        let mut client = SessionServiceClient::new(connect(app.port).await);
        let (sid, done) = (s.id.clone(), done.clone());
        tokio::spawn(async move {
            let r = client
                .append_session_log(entry(&sid, &format!("f{n}")))
                .await;
            let _ = done.send(r);
        });
    }
    // With the session locked nothing queued can finish: the first replies
    // are the refusals, at once.
    for _ in 0..MORE {
        let err = within(results.recv()).await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(crate::watch::reason(&err), "POOL_EXHAUSTED");
    }
    h.release().await;
    within(&mut h.first)
        .await
        .unwrap()
        .expect("the first append");
    for _ in 0..LIMIT {
        within(results.recv())
            .await
            .unwrap()
            .expect("the queued appends are written");
    }
    let rows = stored(observer, id).await;
    let positions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        positions,
        (1..=LIMIT as i64 + 1).collect::<Vec<_>>(),
        "a shed append takes no position"
    );
}
