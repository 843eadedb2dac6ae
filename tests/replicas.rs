//! Read replicas: a real primary and a streaming standby (`pg_basebackup
//! -R`) started by each test, a gateway with DATABASE_URL on the primary
//! and VERDICT_DATABASE_READ_URL on the standby. Who served a read is
//! counted with pg_stat_statements on each server (its counts are updated
//! as each statement ends). Every test is bounded in time and uses unix
//! sockets only.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{TestApp, spawn_app_with, temp_pg_dir, test_config};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_check_response::ServingStatus;
use verdict::db::embedded::{EmbeddedPostgres, ServerOptions};
use verdict::db::replica::{Lsn, TOKEN_HEADER};
use verdict::proto::get_session_request::Lookup;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{CreateSessionRequest, GetSessionRequest, ListSessionsRequest};

type Sessions = SessionServiceClient<tonic::transport::Channel>;

struct Pair {
    primary: EmbeddedPostgres,
    standby: EmbeddedPostgres,
    app: TestApp,
}

/// A primary, its standby, and a gateway reading from the standby.
async fn pair(max_lag: Duration, token_wait: Duration) -> Pair {
    let options = ServerOptions {
        settings: vec![(
            "shared_preload_libraries".into(),
            "pg_stat_statements".into(),
        )],
        ..ServerOptions::default()
    };
    let primary = EmbeddedPostgres::start_with(&temp_pg_dir(), options)
        .await
        .unwrap();
    direct(&primary)
        .await
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    let standby = EmbeddedPostgres::start_standby(&temp_pg_dir(), &primary)
        .await
        .unwrap();
    let mut config = test_config(&primary.database_url("verdict"));
    config.database_read_url = Some(standby.database_url("verdict"));
    config.read_max_lag = max_lag;
    config.read_token_wait = token_wait;
    let app = spawn_app_with(config).await;
    Pair {
        primary,
        standby,
        app,
    }
}

async fn direct(pg: &EmbeddedPostgres) -> tokio_postgres::Client {
    let (client, conn) = pg
        .config("verdict")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to a test server");
    tokio::spawn(conn);
    client
}

/// Statements that read the sessions table run on `pg` so far.
async fn session_reads(pg: &EmbeddedPostgres) -> i64 {
    direct(pg)
        .await
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
             WHERE query ILIKE '%from sessions%' AND query NOT ILIKE '%pg_stat_statements%' \
             AND query NOT ILIKE '%for update%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn session(request_id: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        request_id: request_id.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    }
}

fn get(id: &str, token: Option<&str>) -> tonic::Request<GetSessionRequest> {
    let mut r = tonic::Request::new(GetSessionRequest {
        lookup: Some(Lookup::Id(id.into())),
        ..Default::default()
    });
    if let Some(token) = token {
        r.metadata_mut()
            .insert(TOKEN_HEADER, MetadataValue::try_from(token).unwrap());
    }
    r
}

/// Creates a session; returns its id and the reply's consistency token.
async fn create(sessions: &Sessions, request_id: &str) -> (String, String) {
    let reply = sessions
        .clone()
        .create_session(session(request_id))
        .await
        .expect("create a session");
    let token = reply
        .metadata()
        .get(TOKEN_HEADER)
        .expect("every write reply carries a consistency token")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(Lsn::parse(&token).is_some(), "a WAL position: {token:?}");
    (reply.into_inner().session.unwrap().id, token)
}

/// Waits (bounded) until reads without a token reach the standby (the
/// gateway has checked it and found it fresh) and the standby has `id`.
/// Until it has replayed the create, a read it serves answers NOT_FOUND:
/// a read without a token may lag by up to the configured bound.
async fn until_the_replica_serves(p: &Pair, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = session_reads(&p.standby).await;
        let read = p.app.sessions.clone().get_session(get(id, None)).await;
        if let Err(status) = &read {
            assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        }
        if read.is_ok() && session_reads(&p.standby).await > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never served a read within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_with_a_writes_token_sees_the_write_even_with_replay_paused() {
    let mut p = pair(Duration::from_secs(5), Duration::from_millis(100)).await;
    let (first, _) = create(&p.app.sessions, "first").await;
    until_the_replica_serves(&p, &first).await;

    // Replay paused: the standby never sees what is written from now on.
    let standby = direct(&p.standby).await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let replica_before = session_reads(&p.standby).await;
    let mut clients = JoinSet::new();
    for c in 0..4 {
        let sessions = p.app.sessions.clone();
        clients.spawn(async move {
            for n in 0..8 {
                let (id, token) = create(&sessions, &format!("paused-{c}-{n}")).await;
                let got = sessions
                    .clone()
                    .get_session(get(&id, Some(&token)))
                    .await
                    .expect("a read with the write's token sees the write")
                    .into_inner()
                    .session
                    .unwrap();
                assert_eq!(got.id, id);
                let mut list = tonic::Request::new(ListSessionsRequest {
                    page_size: 1000,
                    ..Default::default()
                });
                list.metadata_mut()
                    .insert(TOKEN_HEADER, MetadataValue::try_from(&token).unwrap());
                let listed = sessions.clone().list_sessions(list).await.unwrap();
                assert!(
                    listed.into_inner().sessions.iter().any(|s| s.id == id),
                    "ListSessions with the token lists the write"
                );
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        session_reads(&p.standby).await,
        replica_before,
        "the paused replica served none of the reads that carried a newer token"
    );

    // Replay resumed: token reads go to the replica again once it has
    // replayed the write (and still always see it).
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let replica_before = session_reads(&p.standby).await;
    for n in 0..20 {
        let (id, token) = create(&p.app.sessions, &format!("resumed-{n}")).await;
        let got = p
            .app
            .sessions
            .clone()
            .get_session(get(&id, Some(&token)))
            .await
            .expect("a read with the write's token sees the write")
            .into_inner();
        assert_eq!(got.session.unwrap().id, id);
    }
    assert!(
        session_reads(&p.standby).await > replica_before,
        "a replica that has replayed a token serves the read"
    );

    // A token that does not parse is never trusted: the primary serves it.
    let replica_before = session_reads(&p.standby).await;
    p.app
        .sessions
        .clone()
        .get_session(get(&first, Some("not-a-position")))
        .await
        .unwrap();
    assert_eq!(session_reads(&p.standby).await, replica_before);

    p.app.stop().await.unwrap();
    p.standby.stop().await.unwrap();
    p.primary.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_without_a_token_are_served_by_the_replica() {
    let mut p = pair(Duration::from_secs(5), Duration::from_millis(100)).await;
    let (id, _) = create(&p.app.sessions, "r").await;
    until_the_replica_serves(&p, &id).await;

    let (replica_before, primary_before) = (
        session_reads(&p.standby).await,
        session_reads(&p.primary).await,
    );
    const READS: i64 = 40;
    let mut clients = JoinSet::new();
    for _ in 0..4 {
        let mut sessions = p.app.sessions.clone();
        let id = id.clone();
        clients.spawn(async move {
            for _ in 0..READS / 8 {
                sessions.get_session(get(&id, None)).await.unwrap();
                sessions
                    .list_sessions(ListSessionsRequest::default())
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    assert!(
        session_reads(&p.standby).await - replica_before >= READS,
        "every read was served by the replica"
    );
    assert_eq!(
        session_reads(&p.primary).await,
        primary_before,
        "the primary served none of them"
    );
    // Writes never go to the replica.
    create(&p.app.sessions, "a-write").await;
    assert_eq!(
        direct(&p.primary)
            .await
            .query_one(
                "SELECT count(*) FROM sessions WHERE request_id = 'a-write'",
                &[]
            )
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );

    p.app.stop().await.unwrap();
    p.standby.stop().await.unwrap();
    p.primary.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_read_load_fails_no_read_and_readiness_stays_serving() {
    let mut p = pair(Duration::from_secs(5), Duration::from_millis(100)).await;
    let (id, _) = create(&p.app.sessions, "k").await;
    until_the_replica_serves(&p, &id).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = JoinSet::new();
    for _ in 0..4 {
        let mut sessions = p.app.sessions.clone();
        let id = id.clone();
        let stop = stop_rx.clone();
        readers.spawn(async move {
            let mut reads = 0u32;
            // Bounded in count; ends early when told.
            while reads < 5_000 && !*stop.borrow() {
                sessions
                    .get_session(get(&id, None))
                    .await
                    .expect("a read never fails while the primary is healthy");
                sessions
                    .list_sessions(ListSessionsRequest::default())
                    .await
                    .expect("a read never fails while the primary is healthy");
                reads += 2;
            }
            reads
        });
    }
    // Some reads on the replica first, then it dies the way a crash does.
    let replica_before = session_reads(&p.standby).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while session_reads(&p.standby).await < replica_before + 20 {
        assert!(Instant::now() < deadline, "the replica served no reads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.standby.stop_immediately().await;
    // Reads go on, on the primary.
    let primary_before = session_reads(&p.primary).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while session_reads(&p.primary).await < primary_before + 40 {
        assert!(
            Instant::now() < deadline,
            "reads did not move to the primary"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    while let Some(done) = readers.join_next().await {
        assert!(done.unwrap() > 0);
    }
    assert_eq!(
        p.app.health_check("").await.unwrap().status,
        ServingStatus::Serving as i32,
        "readiness depends on the primary alone"
    );
    // A write and a read with its token after the replica's death.
    let (id, token) = create(&p.app.sessions, "after-kill").await;
    p.app
        .sessions
        .clone()
        .get_session(get(&id, Some(&token)))
        .await
        .unwrap();

    p.app.stop().await.unwrap();
    p.primary.stop().await.unwrap();
}
