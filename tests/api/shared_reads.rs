//! Reads by key (GetSession) share pipelined connections
//! (`VERDICT_SHARED_READ_CONNECTIONS`): concurrent readers see every
//! acknowledged write, lose nothing when those connections' backends are
//! terminated, and a read stuck behind a lock ends at its deadline with
//! nothing left running in the server (pages, on pooled connections, too).

use crate::helpers::{create_database, spawn_app_with, test_config};
use crate::sessions::{create, set_status_with};
use crate::watch::terminate_gateway_connections;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;
use verdict::proto::{GetSessionRequest, ListSessionsRequest, SessionStatus};

fn get(id: &str) -> GetSessionRequest {
    crate::helpers::get_session_by_id(id)
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// How many gateway backends' last statement read sessions by id.
async fn backends_that_read_by_id(sql: &tokio_postgres::Client) -> i64 {
    reader_pid(sql).await.len() as i64
}

#[tokio::test]
async fn concurrent_readers_share_one_connection_and_see_every_acknowledged_write() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        ids.push(create(&app, &format!("shared-{i}")).await.id);
    }

    // 8 readers (one call in flight each, as the pipelined connection takes
    // up to 16) and 4 writers, each writer reading back what it wrote
    // through the shared connection right after the acknowledgement.
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..8usize {
        let mut client = app.sessions.clone();
        let ids = ids.clone();
        tasks.spawn(async move {
            for n in 0..60usize {
                if n % 3 == 0 {
                    let page = client
                        .list_sessions(ListSessionsRequest {
                            page_size: 50,
                            ..Default::default()
                        })
                        .await
                        .expect("list")
                        .into_inner();
                    assert_eq!(page.sessions.len(), 8);
                } else {
                    let id = &ids[(r + n) % ids.len()];
                    let got = client.get_session(get(id)).await.expect("get").into_inner();
                    assert_eq!(&got.session.unwrap().id, id);
                }
            }
        });
    }
    for id in &ids[..4] {
        let id = id.clone();
        let mut client = app.sessions.clone();
        tasks.spawn(async move {
            for status in [SessionStatus::Processing, SessionStatus::Completed] {
                let written = set_status_with(&mut client, &id, status)
                    .await
                    .expect("write");
                let read = client
                    .get_session(get(&id))
                    .await
                    .expect("read back")
                    .into_inner()
                    .session
                    .unwrap();
                assert_eq!(read.status, status as i32, "reads see acknowledged writes");
                assert!(read.version >= written.version);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    // Every read by id went through one connection: at most 16 were in
    // flight, so no second shared connection was opened, and none took a
    // pooled connection.
    let sql = app.sql().await;
    assert_eq!(backends_that_read_by_id(&sql).await, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readers_lose_nothing_when_the_shared_connections_backends_are_terminated() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let created = create(&app, "terminated").await;
    let id = created.id.clone();
    let sql = app.sql().await;

    let readers = 8;
    let progress: Arc<Vec<AtomicUsize>> =
        Arc::new((0..readers).map(|_| AtomicUsize::new(0)).collect());
    let stop = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..readers {
        let mut client = app.sessions.clone();
        let (id, progress, stop) = (id.clone(), progress.clone(), stop.clone());
        let created = created.clone();
        tasks.spawn(async move {
            while stop.load(Ordering::Acquire) == 0 {
                // Half the readers set a deadline (kept by the gateway, not
                // by statement_timeout, on a shared connection).
                let request = if r % 2 == 0 {
                    tonic::Request::new(get(&id))
                } else {
                    with_deadline(get(&id), Duration::from_secs(20))
                };
                let got = client.get_session(request).await;
                let got = got.unwrap_or_else(|e| panic!("reader {r}: {e:?}"));
                // The whole session, its JSON documents (sent as message
                // bytes written from the column) included.
                assert_eq!(got.into_inner().session.unwrap(), created);
                progress[r].fetch_add(1, Ordering::AcqRel);
            }
        });
    }

    // Resolves once every reader has read twice more than when called.
    let every_reader_reads_on = |why: &'static str| {
        let progress = progress.clone();
        let seen: Vec<usize> = progress.iter().map(|p| p.load(Ordering::Acquire)).collect();
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                while progress
                    .iter()
                    .zip(&seen)
                    .any(|(p, s)| p.load(Ordering::Acquire) <= *s + 1)
                {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect(why);
        }
    };

    // Three times: wait until every reader has read since the last round,
    // then terminate every gateway backend (the shared one included).
    for _ in 0..3 {
        every_reader_reads_on("every reader keeps reading").await;
        assert!(terminate_gateway_connections(&sql).await >= 1);
    }
    every_reader_reads_on("every reader reads after the last termination").await;
    stop.store(1, Ordering::Release);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn reads_stuck_behind_a_lock_end_at_their_deadline_and_leave_nothing_running() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let id = create(&app, "locked").await.id;
    let sql = app.sql().await;

    // A read first, so that the shared connection exists before the lock.
    app.sessions.clone().get_session(get(&id)).await.unwrap();
    let lock = hold_the_sessions_lock(&app).await;

    // 6 callers with a 400 ms deadline, pipelined on one connection behind
    // the lock: each hears DEADLINE_EXCEEDED in time.
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut client = app.sessions.clone();
            let id = id.clone();
            async move {
                let deadline = Duration::from_millis(400);
                if i % 2 == 0 {
                    client
                        .get_session(with_deadline(get(&id), deadline))
                        .await
                        .map(|_| ())
                } else {
                    let list = ListSessionsRequest {
                        page_size: 10,
                        ..Default::default()
                    };
                    client
                        .list_sessions(with_deadline(list, deadline))
                        .await
                        .map(|_| ())
                }
            }
        })
        .collect();
    for outcome in futures::future::join_all(calls).await {
        let e = outcome.expect_err("no read passes the lock");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the deadline was kept: {:?}",
        started.elapsed()
    );

    // The abandoned statements are cancelled in the server while the lock
    // is still held (the statement timeout, 30 s, is far away).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if backends_waiting_on_a_lock(&sql).await.is_empty() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("no gateway backend still waits on the lock");

    // Once the lock is gone, reads are served again (on a new connection).
    lock.batch_execute("COMMIT").await.unwrap();
    let got = app
        .sessions
        .clone()
        .get_session(with_deadline(get(&id), Duration::from_secs(5)))
        .await
        .expect("served after the lock")
        .into_inner();
    assert_eq!(got.session.unwrap().id, id);
    let page = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("listed after the lock")
        .into_inner();
    assert_eq!(page.sessions.len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn without_shared_connections_every_read_takes_a_pooled_one() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.shared_read_connections = 0;
    let app = spawn_app_with(config).await;
    let id = create(&app, "pooled").await.id;
    let before = app.db.connections_acquired();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.sessions.clone();
            let id = id.clone();
            async move { client.get_session(get(&id)).await }
        })
        .collect();
    for outcome in futures::future::join_all(calls).await {
        assert_eq!(outcome.unwrap().into_inner().session.unwrap().id, id);
    }
    assert_eq!(app.db.connections_acquired() - before, 8);
    app.stop().await.unwrap();
}

/// A connection holding the sessions table's exclusive lock until it
/// commits.
pub(crate) async fn hold_the_sessions_lock(
    app: &crate::helpers::TestApp,
) -> tokio_postgres::Client {
    let lock = app.sql().await;
    lock.batch_execute("BEGIN; LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    lock
}

/// The pids of the gateway's backends in this database that match
/// `condition` (on `pg_stat_activity`), in order.
async fn gateway_backends(sql: &tokio_postgres::Client, condition: &str) -> Vec<i32> {
    let query = format!(
        "SELECT pid FROM pg_stat_activity \
         WHERE application_name = 'verdict' AND datname = current_database() \
           AND {condition} ORDER BY pid"
    );
    sql.query(&query, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The pids of the gateway backends waiting for a lock.
pub(crate) async fn backends_waiting_on_a_lock(sql: &tokio_postgres::Client) -> Vec<i32> {
    gateway_backends(sql, "wait_event_type = 'Lock'").await
}

/// The pids of the gateway backends whose last statement read sessions by
/// id (one shared connection while reads are few).
async fn reader_pid(sql: &tokio_postgres::Client) -> Vec<i32> {
    gateway_backends(
        sql,
        "query LIKE 'SELECT % FROM sessions WHERE project_id = $1 AND id = $2'",
    )
    .await
}

/// A gateway configured by `tweak`, a session created in it and read once
/// by id, a SQL client, and the pid of the one backend that read it.
async fn one_shared_reader(
    label: &str,
    tweak: impl FnOnce(&mut verdict::config::Config),
) -> (
    crate::helpers::TestApp,
    String,
    tokio_postgres::Client,
    Vec<i32>,
) {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    tweak(&mut config);
    let app = spawn_app_with(config).await;
    let id = create(&app, label).await.id;
    let sql = app.sql().await;
    app.sessions.clone().get_session(get(&id)).await.unwrap();
    let first = reader_pid(&sql).await;
    assert_eq!(first.len(), 1, "one shared connection reads: {first:?}");
    (app, id, sql, first)
}

#[tokio::test]
async fn a_shared_connection_is_renewed_after_its_lifetime_like_a_pooled_one() {
    let (app, id, sql, first) = one_shared_reader("renewed", |config| {
        config.pool_max_lifetime = Duration::from_millis(700);
    })
    .await;

    // Reads go on; within a few lifetimes another backend serves them and
    // the first one is gone (closed when it came back to the pool).
    let renewed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            app.sessions.clone().get_session(get(&id)).await.unwrap();
            let now = reader_pid(&sql).await;
            if !now.contains(&first[0]) && !now.is_empty() {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the shared connection is renewed");
    assert_ne!(renewed, first);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_idle_shared_connection_is_closed_like_an_idle_pooled_one() {
    let (app, id, sql, _) = one_shared_reader("idle", |config| {
        config.pool_idle_timeout = Duration::from_millis(400);
    })
    .await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while !reader_pid(&sql).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the idle shared connection is closed");
    // The next read opens one again.
    let got = app.sessions.clone().get_session(get(&id)).await.unwrap();
    assert_eq!(got.into_inner().session.unwrap().id, id);
    assert_eq!(reader_pid(&sql).await.len(), 1);
    app.stop().await.unwrap();
}
