//! Readiness that tells the truth, and replicas that share one database's
//! connection slots: a gateway that cannot get any connection is
//! NOT_SERVING (and says why on every call), an idle gateway gives its
//! connections back, and pooled connections whose backends died are
//! replaced before a call uses them. Each test runs a PostgreSQL of its
//! own (small `max_connections`), on a unix socket only.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{TestApp, admin_client, spawn_app_with, start_app, temp_pg_dir, test_config};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use verdict::call::Call;
use verdict::db::embedded::{EmbeddedPostgres, ServerOptions};
use verdict::proto::get_session_request::Lookup;
use verdict::proto::{CreateSessionRequest, GetSessionRequest, ListSessionsRequest};

/// Upper bound of every wait on observable state.
const PATIENCE: Duration = Duration::from_secs(30);
/// Pause between two looks at observable state.
const POLL: Duration = Duration::from_millis(20);

async fn postgres_with(max_connections: u32) -> EmbeddedPostgres {
    let options = ServerOptions {
        settings: vec![("max_connections".into(), max_connections.to_string())],
        ..ServerOptions::default()
    };
    EmbeddedPostgres::start_with(&temp_pg_dir(), options)
        .await
        .expect("start a PostgreSQL of the test's own")
}

fn lookup() -> GetSessionRequest {
    GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    }
}

/// Health statuses as they were reported, with when each was seen.
type Seen = Arc<Mutex<Vec<(Instant, i32)>>>;

/// Records every health status `app` reports; abort the task to stop.
fn record_health(app: &TestApp) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut health = app.health.clone();
    let sink = seen.clone();
    let recorder = tokio::spawn(async move {
        let Ok(stream) = health
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        while let Ok(Some(m)) = stream.message().await {
            sink.lock().unwrap().push((Instant::now(), m.status));
        }
    });
    (seen, recorder)
}

#[tokio::test]
async fn a_replica_without_connection_slots_is_not_serving_until_an_idle_replica_gives_them_back() {
    // 19 slots: replica A (pool 16, probe; nothing is watched, so no
    // listener) and this test's own connection take 18; replica B gets one
    // for its probe and none for its pool (its probe only tries the pool
    // while its own connection is up).
    let mut pg = postgres_with(19).await;
    let url = pg.database_url("verdict");
    let mut a_config = test_config(&url);
    a_config.pool_size = 16;
    a_config.pool_idle_timeout = Duration::from_secs(2);
    let a = spawn_app_with(a_config).await;
    let admin = admin_client(&url).await;

    // A's pool full: 16 connections checked out at once.
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut conn = a.db.conn(&Call::default()).await.expect("A's connection");
        conn.client().await.unwrap().simple_query("").await.unwrap();
        held.push(conn);
    }
    assert_eq!(a.db.stats().size, 16);

    let mut b_config = test_config(&url);
    b_config.pool_size = 16;
    let b = start_app(b_config).await;
    let (health, recorder) = record_health(&b);

    // Wait until B has migrated, its start-up connection is gone and every
    // slot is taken (B's probe holds the last one), so that no call of this
    // test races it for it.
    let started = Instant::now();
    loop {
        let row = admin
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE query LIKE '%gateway_secrets%' AND pid <> pg_backend_pid()) \
                 FROM pg_stat_activity WHERE backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap();
        let (clients, starting): (i64, i64) = (row.get(0), row.get(1));
        if b.db.is_ready() && clients == 19 && starting == 0 {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "B never settled: {clients} clients, ready {}",
            b.db.is_ready()
        );
        tokio::time::sleep(POLL).await;
    }
    // B's calls are refused, for the reason that holds: the database has
    // no slot for B's pool (SQLSTATE 53300 when the pool connects).
    let refusal = b.sessions.clone().get_session(lookup()).await.unwrap_err();
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let info = refusal.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "DATABASE_CONNECTION_LIMIT");
    assert!(refusal.get_details_retry_info().is_some(), "retryable");
    assert!(!refusal.message().contains("53300"), "{refusal:?}");
    let status = b.health_check("").await.unwrap().status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    // A's calls end; its idle connections are closed after its idle
    // timeout, and B becomes SERVING.
    drop(held);
    let released = Instant::now();
    b.wait_for_health("", ServingStatus::Serving).await;
    let page = b
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest::default())
        .await;
    assert!(page.is_ok(), "{page:?}");
    let first_serving = health
        .lock()
        .unwrap()
        .iter()
        .find(|(_, s)| *s == ServingStatus::Serving as i32)
        .map(|(at, _)| *at)
        .expect("B reported SERVING");
    assert!(
        first_serving > released,
        "B said SERVING while it could not get a connection"
    );
    // Every idle connection of A closes (each at its own idle timeout);
    // the probe of an idle gateway keeps at most one.
    let waiting = Instant::now();
    while a.db.stats().size > 1 {
        assert!(
            waiting.elapsed() < PATIENCE,
            "A keeps idle connections: {:?}",
            a.db.stats()
        );
        tokio::time::sleep(POLL).await;
    }
    let gateway_backends: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'verdict'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        gateway_backends <= 8,
        "two idle replicas hold {gateway_backends} connections"
    );

    // The watch is a call in flight: end it so B stops without a grace.
    recorder.abort();
    b.stop().await.unwrap();
    a.stop().await.unwrap();
    drop(admin);
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn pooled_connections_whose_backends_were_terminated_are_replaced_without_failing_a_call() {
    let mut pg = postgres_with(40).await;
    let url = pg.database_url("verdict");
    let app = spawn_app_with(test_config(&url)).await;
    let admin = admin_client(&url).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        let s = app
            .sessions
            .clone()
            .create_session(CreateSessionRequest {
                request_id: format!("stale-{n}"),
                source_technology: "cobol".into(),
                target_technology: "java".into(),
                validation_scope: "full".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        ids.push(s.id);
    }

    // The pool full of connections (8), then idle.
    let mut held = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    for _ in 0..8 {
        let mut conn = app.db.conn(&Call::default()).await.unwrap();
        let row = conn
            .client()
            .await
            .unwrap()
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap();
        pids.push(row.get(0));
        held.push(conn);
    }
    drop(held);
    // Idle, as PostgreSQL sees them, for longer than the pool trusts an
    // idle connection without a check.
    let idle_for = format!(
        "{} milliseconds",
        verdict::db::VERIFY_AFTER_IDLE.as_millis() + 50
    );
    let started = Instant::now();
    loop {
        let idle: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE pid = ANY($1) AND state = 'idle' \
                   AND state_change < now() - $2::text::interval",
                &[&pids, &idle_for],
            )
            .await
            .unwrap()
            .get(0);
        if idle == 8 {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "connections never idle");
        tokio::time::sleep(POLL).await;
    }

    // A failover or an administrator ends every backend of the pool.
    let terminated: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE pid = ANY($1)) t",
            &[&pids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 8);

    // At once, more concurrent calls than the pool has connections: each
    // succeeds on a fresh connection.
    let mut calls = JoinSet::new();
    for n in 0..16 {
        let mut client = app.sessions.clone();
        let id = ids[n % ids.len()].clone();
        calls.spawn(async move {
            client
                .get_session(GetSessionRequest {
                    lookup: Some(Lookup::Id(id)),
                    ..Default::default()
                })
                .await
        });
    }
    while let Some(result) = calls.join_next().await {
        let reply = result.unwrap();
        assert!(
            reply.is_ok(),
            "a call failed on a stale connection: {reply:?}"
        );
    }
    // The terminated backends are gone (each exits once it handles the
    // signal, which the calls above do not wait for).
    until_gone(&admin, &pids, "terminated backends still listed").await;

    app.stop().await.unwrap();
    drop(admin);
    pg.stop().await.unwrap();
}

#[tokio::test]
async fn pooled_connections_are_renewed_after_their_maximum_lifetime() {
    let mut pg = postgres_with(40).await;
    let url = pg.database_url("verdict");
    let mut config = test_config(&url);
    config.pool_max_lifetime = Duration::from_millis(600);
    let app = spawn_app_with(config).await;
    let first = pooled_backend(&app).await;
    // The same connection is handed out while it is young, a new one once
    // it is older than its lifetime.
    let started = Instant::now();
    loop {
        if pooled_backend(&app).await != first {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the connection outlived its lifetime"
        );
        tokio::time::sleep(POLL).await;
    }
    // The old connection was closed, not leaked.
    let admin = admin_client(&url).await;
    until_gone(&admin, &[first], "the old connection stays open").await;
    drop(admin);
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
}

/// Waits (bounded) until none of `pids` is a server process any more.
async fn until_gone(admin: &tokio_postgres::Client, pids: &[i32], what: &str) {
    let started = Instant::now();
    loop {
        let alive: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .unwrap()
            .get(0);
        if alive == 0 {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "{alive} {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// The backend pid of the connection the pool hands out next.
async fn pooled_backend(app: &TestApp) -> i32 {
    let mut conn = app.db.conn(&Call::default()).await.unwrap();
    conn.client()
        .await
        .unwrap()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}
