//! Failover without a restart: a real primary and a streaming standby
//! (`pg_basebackup -R`), a gateway whose DATABASE_URL names both with
//! `target_session_attrs=read-write`, writers running through the gateway
//! while the primary is stopped (fast) and the standby promoted
//! (`pg_ctl promote`). Every test runs PostgreSQL servers of its own, on
//! unix sockets only, and is bounded in time.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{spawn_app_with, temp_pg_dir, test_config};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::proto::CreateSessionRequest;

fn session(request_id: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        request_id: request_id.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    }
}

/// A multi-host DATABASE_URL: the servers in order, the first that takes
/// writes wins (libpq's `target_session_attrs=read-write`).
fn multi_host_url(servers: &[&EmbeddedPostgres]) -> String {
    let hosts: Vec<String> = servers
        .iter()
        .map(|s| s.dir().display().to_string())
        .collect();
    let ports: Vec<String> = servers.iter().map(|s| s.port().to_string()).collect();
    format!(
        "host={} port={} user=verdict dbname=verdict target_session_attrs=read-write",
        hosts.join(","),
        ports.join(",")
    )
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

const WRITERS: usize = 4;
const WRITES_EACH: usize = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_a_promoted_standby_without_a_restart_and_loses_no_acknowledged_write()
{
    let mut primary = EmbeddedPostgres::start(&temp_pg_dir()).await.unwrap();
    let mut standby = EmbeddedPostgres::start_standby(&temp_pg_dir(), &primary)
        .await
        .unwrap();
    let app = spawn_app_with(test_config(&multi_host_url(&[&primary, &standby]))).await;

    // Writers through the gateway: each create retried with its own
    // request_id (idempotent) on a retryable status, as a client does.
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let some_acked = Arc::new(Notify::new());
    let failures = Arc::new(std::sync::Mutex::new(Vec::<tonic::Status>::new()));
    let mut writers = JoinSet::new();
    for w in 0..WRITERS {
        let mut client = app.sessions.clone();
        let (acked, count, some_acked, failures) = (
            acked.clone(),
            count.clone(),
            some_acked.clone(),
            failures.clone(),
        );
        writers.spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(90);
            for n in 0..WRITES_EACH {
                let request_id = format!("w{w}-{n}");
                loop {
                    let mut request = tonic::Request::new(session(&request_id));
                    request.set_timeout(Duration::from_secs(3));
                    match client.create_session(request).await {
                        Ok(_) => break,
                        Err(s) => {
                            assert!(
                                matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                                "{request_id}: a failover must fail a call with a retryable code, not {s:?}"
                            );
                            failures.lock().unwrap().push(s);
                            assert!(
                                Instant::now() < give_up,
                                "{request_id}: the gateway did not reach the new primary within 90 s"
                            );
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                    }
                }
                acked.lock().unwrap().insert(request_id);
                if count.fetch_add(1, Ordering::SeqCst) + 1 == WRITERS * WRITES_EACH / 4 {
                    some_acked.notify_one();
                }
            }
        });
    }

    // A quarter written: the primary goes away with writes in flight and
    // the standby takes over.
    some_acked.notified().await;
    primary.stop().await.unwrap();
    let acked_before_promotion = acked.lock().unwrap().len();
    standby.promote().await.unwrap();
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }

    // Every acknowledged write is on the new primary, exactly once.
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), WRITERS * WRITES_EACH);
    let new_primary = direct(&standby).await;
    let stored: BTreeSet<String> = new_primary
        .query(
            "SELECT request_id FROM sessions WHERE request_id LIKE 'w%'",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored, acked,
        "the new primary holds every acknowledged write, and nothing else"
    );
    assert!(
        acked_before_promotion >= WRITERS * WRITES_EACH / 4,
        "writes acknowledged by the old primary are part of the check"
    );

    // The calls that failed during the switch said how to go on: UNAVAILABLE
    // with RetryInfo (or the caller's own deadline).
    let failures = failures.lock().unwrap().clone();
    assert!(
        !failures.is_empty(),
        "writers ran through the switch (no server took writes between the stop and the promotion)"
    );
    for s in &failures {
        if s.code() == Code::Unavailable {
            assert!(
                s.get_details_retry_info().is_some(),
                "UNAVAILABLE carries RetryInfo: {s:?}"
            );
            assert!(
                !s.message().contains("SQLSTATE") && !s.message().contains("FATAL"),
                "no server internals leak: {s:?}"
            );
        }
    }

    // The same gateway (never restarted) serves from the new primary: its
    // connections are there, and health is SERVING.
    app.wait_for_health("", ServingStatus::Serving).await;
    let on_new: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'verdict'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        on_new > 0,
        "the gateway's connections moved to the new primary"
    );
    let mut client = app.sessions.clone();
    let after = client
        .create_session(session("after-failover"))
        .await
        .expect("a write after the failover succeeds at once")
        .into_inner();
    assert!(after.created);

    app.stop().await.unwrap();
    standby.stop().await.unwrap();
}

/// A connection that lands on a server that stopped taking writes (here: a
/// primary switched to `default_transaction_read_only`, as a demotion
/// leaves it; SQLSTATE 25006) fails its call with a retryable UNAVAILABLE,
/// and the pool then closes every connection to that server at its check
/// instead of handing it out again. (The notification listener and the
/// health probe hold connections of their own, outside the pool.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_a_server_that_stopped_taking_writes_are_dropped_not_reused() {
    let mut primary = EmbeddedPostgres::start(&temp_pg_dir()).await.unwrap();
    let app = spawn_app_with(test_config(&primary.database_url("verdict"))).await;
    let mut client = app.sessions.clone();
    // Several pooled connections.
    let mut warm = JoinSet::new();
    for n in 0..6 {
        let mut c = client.clone();
        warm.spawn(async move { c.create_session(session(&format!("warm-{n}"))).await });
    }
    while let Some(done) = warm.join_next().await {
        done.unwrap().unwrap();
    }
    let pids_before: BTreeSet<i32> = pids(&primary).await;
    assert!(!pids_before.is_empty());

    let admin = direct(&primary).await;
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    // Wait (bounded) until the gateway's backends have applied it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match client.create_session(session("while-read-only")).await {
            Err(s) => break s,
            Ok(_) => {
                assert!(Instant::now() < deadline, "the reload never took effect");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.get_details_retry_info().is_some(), "{err:?}");
    assert!(!err.message().contains("SQLSTATE"), "{err:?}");
    // Rounds of as many concurrent writes as the pool holds: each takes
    // every idle connection, and each fails retryably.
    for round in 0..3 {
        let mut writes = JoinSet::new();
        for n in 0..8 {
            let mut c = client.clone();
            writes
                .spawn(async move { c.create_session(session(&format!("ro-{round}-{n}"))).await });
        }
        while let Some(done) = writes.join_next().await {
            let s = done
                .unwrap()
                .expect_err("no write succeeds on a read-only server");
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(s.get_details_retry_info().is_some(), "{s:?}");
        }
    }
    // The connections of before were checked and closed, not reused.
    let pids_now = pids(&primary).await;
    assert!(
        pids_before.is_disjoint(&pids_now),
        "the connections to the read-only server were replaced: before {pids_before:?}, now {pids_now:?}"
    );
    admin
        .batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.create_session(session("after-read-only")).await {
            Ok(_) => break,
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                assert!(Instant::now() < deadline, "writes never resumed: {s:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    app.stop().await.unwrap();
    primary.stop().await.unwrap();
}

async fn pids(pg: &EmbeddedPostgres) -> BTreeSet<i32> {
    direct(pg)
        .await
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'verdict' AND backend_type = 'client backend' AND query NOT ILIKE 'LISTEN%' AND query <> 'SELECT 1'",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}
