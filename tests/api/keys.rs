//! The verified-key cache, the lookup budget and per-peer failure limit,
//! and revocations reaching open streams — through the real client.

use crate::discrepancies::item;
use crate::helpers::*;
use crate::sessions::new_session;
use std::time::{Duration, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;
use verdict::auth::KeyCache;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{IngestDiscrepanciesRequest, ListSessionsRequest, WatchSessionRequest};

/// A gateway requiring keys, with its key cache (for its lookup counter).
async fn spawn_with_keys(config: verdict::config::Config) -> (TestApp, KeyCache) {
    let app = verdict::Application::build(config)
        .await
        .expect("build the gateway");
    let keys = app.keys();
    let app = adopt(app).await;
    // Synchronise on the listener: its (re)connection empties the cache.
    let start = Instant::now();
    while !keys.is_listening() {
        assert!(start.elapsed() < Duration::from_secs(10), "no key listener");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (app, keys)
}

async fn app_sql(url: &str) -> tokio_postgres::Client {
    admin_client(url).await
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

fn random_token() -> String {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("vk_{id}_{}", "B".repeat(43))
}

/// Polls (every 10 ms, at most `limit`) until a call with `token` is
/// refused as unauthenticated; returns that status. (PERMISSION_DENIED
/// means the key is still accepted, only without the read scope.)
pub async fn refused_within(app: &TestApp, token: &str, limit: Duration) -> tonic::Status {
    let start = Instant::now();
    let mut s = app.sessions.clone();
    loop {
        match s
            .list_sessions(authed(ListSessionsRequest::default(), token))
            .await
        {
            Err(status) if status.code() != Code::PermissionDenied => return status,
            _ if start.elapsed() < limit => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => panic!("the key was still accepted {limit:?} after its revocation"),
        }
    }
}

#[tokio::test]
async fn a_thousand_authenticated_calls_read_the_key_once() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (_, token) = create_key(&config, "hot", "read").await;
    let (app, keys) = spawn_with_keys(config).await;
    let before = keys.lookups();
    let mut s = app.sessions.clone();
    for _ in 0..1_000 {
        s.list_sessions(authed(ListSessionsRequest::default(), &token))
            .await
            .expect("an authenticated call");
    }
    let lookups = keys.lookups() - before;
    assert!(lookups <= 1, "1,000 calls read api_keys {lookups} times");

    // The same seen from PostgreSQL: scans of api_keys by the gateway. The
    // statistics are flushed lazily, so read them after the gateway stops.
    let scans = |sql: tokio_postgres::Client| async move {
        sql.query_one(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables \
             WHERE relname = 'api_keys'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    app.stop().await.unwrap();
    // Wait (bounded) until the first lookup shows, so the count is current.
    let start = Instant::now();
    let mut total = scans(app_sql(&url).await).await;
    while total == 0 && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        total = scans(app_sql(&url).await).await;
    }
    assert!(total >= 1, "the statistics never showed the first lookup");
    // The first lookup and little else: a handful, not a thousand.
    assert!(total < 10, "api_keys was scanned {total} times");
}

#[tokio::test]
async fn a_new_key_opening_with_a_hundred_calls_in_flight_is_looked_up_once_and_never_refused() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (_, token) = create_key(&config, "burst", "read").await;
    let (app, keys) = spawn_with_keys(config).await;
    let before = keys.lookups();
    // 100 first calls at once, over four connections: the first one looks
    // the key up, the others wait for that lookup instead of each spending
    // the lookup budget (which holds 4) and being refused RATE_LIMITED.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(SessionServiceClient::new(connect(app.port).await));
    }
    let calls = (0..100).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let token = token.clone();
        async move {
            client
                .list_sessions(authed(ListSessionsRequest::default(), &token))
                .await
        }
    });
    // The request pool may shed some of 100 calls at once (POOL_EXHAUSTED,
    // by design); the key check must refuse none.
    let refused: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| format!("{:?} {}", e.code(), reason(&e)))
        .filter(|r| !r.ends_with("POOL_EXHAUSTED"))
        .collect();
    assert!(refused.is_empty(), "refused by the key check: {refused:?}");
    let lookups = keys.lookups() - before;
    assert_eq!(lookups, 1, "one lookup for 100 concurrent first calls");
}

#[tokio::test]
async fn unknown_ids_and_wrong_secrets_get_the_same_answer_and_only_the_holder_hears_revoked() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (id, token) = create_key(&config, "k", "read").await;
    let app = spawn_app_with(config.clone()).await;
    let mut s = app.sessions.clone();
    let mut refuse = async |token: &str| {
        s.list_sessions(authed(ListSessionsRequest::default(), token))
            .await
            .unwrap_err()
    };
    let wrong_secret = format!("{}{}", &token[..20], "C".repeat(43));
    let unknown = refuse(&random_token()).await;
    let wrong = refuse(&wrong_secret).await;
    let garbage = refuse("vk_nonsense").await;
    for status in [&unknown, &wrong, &garbage] {
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(status), "UNAUTHENTICATED");
        assert_eq!(status.message(), unknown.message());
    }

    verdict::revoke_key(&config, &id).await.expect("revoke");
    let revoked = refused_within(&app, &token, Duration::from_secs(2)).await;
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert_eq!(reason(&revoked), "KEY_REVOKED");
    assert!(
        revoked.message().contains("revoked"),
        "{}",
        revoked.message()
    );
    // Without the secret, a revoked key is just not valid.
    let wrong_after = refuse(&wrong_secret).await;
    assert_eq!(wrong_after.message(), unknown.message());
    assert_eq!(reason(&wrong_after), "UNAUTHENTICATED");
}

/// What a bounded flood of random key ids did, while a legitimate key
/// called at 100 calls/s.
struct Flood {
    /// The flood's answers.
    flood: Vec<tonic::Status>,
    /// The legitimate calls' codes.
    legit: Vec<Code>,
    /// Request-pool connections taken during the flood, and per legitimate call.
    pool_used: u64,
    per_call: u64,
    lookups: u64,
    elapsed: Duration,
}

/// Floods `config`'s gateway for 3 s from 6 tasks with `in_flight`
/// concurrent calls each (at most 20,000 calls a task), all to 127.0.0.1.
async fn flood(config: verdict::config::Config, in_flight: usize) -> Flood {
    use futures::StreamExt;
    let (_, token) = create_key(&config, "legit", "read").await;
    let (app, keys) = spawn_with_keys(config).await;
    let mut legit = app.sessions.clone();
    // Warm: the key is verified once; one call's cost in the request pool.
    let before = app.db.connections_acquired();
    legit
        .list_sessions(authed(ListSessionsRequest::default(), &token))
        .await
        .unwrap();
    let per_call = app.db.connections_acquired() - before;

    let lookups_before = keys.lookups();
    let pool_before = app.db.connections_acquired();
    let flood_for = Duration::from_secs(3);
    let start = Instant::now();
    let flooders: Vec<_> = (0..6)
        .map(|_| {
            let port = app.port;
            tokio::spawn(async move {
                let client = SessionServiceClient::new(connect(port).await);
                futures::stream::iter(0..20_000)
                    .take_while(|_| std::future::ready(start.elapsed() < flood_for))
                    .map(|_| {
                        let mut client = client.clone();
                        async move {
                            client
                                .list_sessions(authed(
                                    ListSessionsRequest::default(),
                                    &random_token(),
                                ))
                                .await
                                .unwrap_err()
                        }
                    })
                    .buffer_unordered(in_flight)
                    .collect::<Vec<_>>()
                    .await
            })
        })
        .collect();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut legit_codes = Vec::new();
    for _ in 0..300 {
        ticker.tick().await;
        let code = match legit
            .list_sessions(authed(ListSessionsRequest::default(), &token))
            .await
        {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        legit_codes.push(code);
    }
    let mut flood = Vec::new();
    for f in flooders {
        flood.extend(f.await.unwrap());
    }
    let report = Flood {
        elapsed: start.elapsed(),
        lookups: keys.lookups() - lookups_before,
        pool_used: app.db.connections_acquired() - pool_before,
        per_call,
        flood,
        legit: legit_codes,
    };
    eprintln!(
        "flood: {} calls in {:?} ({:.0}/s), {} key lookups, answers {:?}; legitimate: {} calls, {} OK",
        report.flood.len(),
        report.elapsed,
        report.flood.len() as f64 / report.elapsed.as_secs_f64(),
        report.lookups,
        report.answers(),
        report.legit.len(),
        report.legit.iter().filter(|c| **c == Code::Ok).count(),
    );
    report
}

impl Flood {
    fn answers(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.flood {
            *m.entry(format!("{:?} {}", s.code(), reason(s)))
                .or_insert(0) += 1;
        }
        m
    }

    /// What must hold whatever stopped the flood.
    fn assert_the_legitimate_key_was_unaffected(&self) {
        assert!(
            self.legit.iter().all(|c| *c == Code::Ok),
            "the legitimate key saw {:?}",
            self.legit
                .iter()
                .filter(|c| **c != Code::Ok)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            self.pool_used,
            self.per_call * self.legit.len() as u64,
            "only the legitimate calls used the request pool"
        );
        assert!(
            self.flood
                .iter()
                .all(|s| matches!(s.code(), Code::Unauthenticated | Code::ResourceExhausted)),
            "unexpected answers in the flood: {:?}",
            self.answers()
        );
        for status in self
            .flood
            .iter()
            .filter(|s| s.code() == Code::ResourceExhausted)
        {
            assert_eq!(reason(status), "RATE_LIMITED", "{status:?}");
            assert!(status.get_details_retry_info().is_some(), "{status:?}");
        }
    }
}

#[tokio::test]
async fn a_flood_of_random_key_ids_neither_reaches_the_request_pool_nor_slows_a_legitimate_key() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let burst = config.auth_failure_burst as u64;
    let report = flood(config, 1).await;
    report.assert_the_legitimate_key_was_unaffected();
    // The address's failure budget: burst + 2/s, plus the lookups in flight.
    let allowed = burst + 2 * (report.elapsed.as_secs() + 1) + 8;
    assert!(
        report.lookups <= allowed,
        "{} flood calls cost {} lookups (allowed {allowed})",
        report.flood.len(),
        report.lookups
    );
    let limited = report
        .flood
        .iter()
        .filter(|s| s.code() == Code::ResourceExhausted)
        .count();
    assert!(
        limited > report.flood.len() / 2,
        "{limited} of {} flood calls were rate limited",
        report.flood.len()
    );
}

#[tokio::test]
async fn a_flood_from_addresses_without_a_failure_budget_is_held_by_the_lookup_budget() {
    // As if the flood came from many addresses: no per-address limit.
    let (_, url) = create_database().await;
    let mut config = auth_config(&url);
    config.auth_failure_burst = 1_000_000;
    config.auth_failures_per_sec = 1_000_000.0;
    let report = flood(config, 8).await;
    report.assert_the_legitimate_key_was_unaffected();
    // 48 calls in flight against a budget of 4 lookups: the rest are
    // refused at once instead of queueing.
    assert!(
        report
            .flood
            .iter()
            .any(|s| s.code() == Code::ResourceExhausted),
        "the lookup budget never refused: {:?}",
        report.answers()
    );
}

#[tokio::test]
async fn revoking_a_key_ends_its_open_watch_with_unauthenticated_within_two_seconds() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (_, writer) = create_key(&config, "writer", "write").await;
    let (id, reader) = create_key(&config, "watcher", "read").await;
    let (_, other) = create_key(&config, "other watcher", "read").await;
    let app = spawn_app_with(config.clone()).await;
    let session = app
        .sessions
        .clone()
        .create_session(authed(new_session("watched"), &writer))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let open = |token: String| {
        let mut s = app.sessions.clone();
        let id = session.id.clone();
        async move {
            let mut stream = s
                .watch_session(authed(
                    WatchSessionRequest {
                        id,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .expect("open the watch")
                .into_inner();
            stream.message().await.expect("first event").expect("state");
            stream
        }
    };
    let mut watched = open(reader.clone()).await;
    let mut unaffected = open(other.clone()).await;

    verdict::revoke_key(&config, &id).await.expect("revoke");
    let revoked_at = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), watched.message())
        .await
        .expect("the watch of a revoked key was still open 2 s after the revocation")
        .expect_err("the watch ends with an error");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "KEY_REVOKED");
    assert!(ended.message().contains("revoked"));
    assert!(revoked_at.elapsed() < Duration::from_secs(2));

    // Another key's watch is untouched: it still hears changes.
    app.sessions
        .clone()
        .append_session_log(authed(
            verdict::proto::AppendSessionLogRequest {
                session_id: session.id.clone(),
                level: verdict::proto::LogLevel::Info as i32,
                message: "still watched".into(),
                fields: None,
            },
            &writer,
        ))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), unaffected.message())
        .await
        .expect("the other watch hears the change")
        .expect("the other watch is open");
    assert!(event.is_some());
}

fn chunk(session_id: &str, sequence: i64, size: usize) -> IngestDiscrepanciesRequest {
    IngestDiscrepanciesRequest {
        ingest_id: "revoked-ingest".into(),
        session_id: session_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut d = item(i);
                d.description = format!("chunk {sequence} item {i}");
                d
            })
            .collect(),
    }
}

#[tokio::test]
async fn revoking_a_key_breaks_its_open_ingest_and_commits_nothing_sent_after() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (id, writer) = create_key(&config, "ingester", "write").await;
    let app = spawn_app_with(config.clone()).await;
    let session = app
        .sessions
        .clone()
        .create_session(authed(new_session("ingested"), &writer))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut d = app.discrepancies.clone();
    let token = writer.clone();
    let call = tokio::spawn(async move {
        d.ingest_discrepancies(authed(ReceiverStream::new(rx), &token))
            .await
    });
    // Two chunks of 5,000 fill one commit batch (10,000 items).
    tx.send(chunk(&session.id, 1, 5_000)).await.unwrap();
    tx.send(chunk(&session.id, 2, 5_000)).await.unwrap();
    let sql = app.sql().await;
    let count = async |sql: &tokio_postgres::Client| -> i64 {
        sql.query_one("SELECT count(*) FROM discrepancies", &[])
            .await
            .unwrap()
            .get(0)
    };
    let start = Instant::now();
    while count(&sql).await < 10_000 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "first batch not committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    verdict::revoke_key(&config, &id).await.expect("revoke");
    // Once a new call is refused, this replica has heard of the revocation.
    let refused = refused_within(&app, &writer, Duration::from_secs(2)).await;
    assert_eq!(reason(&refused), "KEY_REVOKED", "{refused:?}");
    // Whatever the client still sends is not committed. (The stream may
    // already be closed: sending then fails, which is fine.)
    let _ = tx.send(chunk(&session.id, 3, 5_000)).await;
    let _ = tx.send(chunk(&session.id, 4, 5_000)).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the ingest of a revoked key was still open 2 s after the revocation")
        .unwrap()
        .expect_err("the ingest ends with an error");
    drop(tx);
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "KEY_REVOKED");
    assert_eq!(count(&sql).await, 10_000);
    let late: i64 = sql
        .query_one(
            "SELECT count(*) FROM discrepancies WHERE description LIKE 'chunk 3 %' \
             OR description LIKE 'chunk 4 %'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(late, 0, "rows sent after the revocation were committed");
}

/// The window the auth layer cannot close alone: a batch read before the
/// revocation and handed to the writer, written after it. The writer is held
/// on a table lock the test takes through direct SQL, so the batch is in
/// flight for sure when the key is revoked; the lock is released only once
/// the revocation has reached the call's signal (another stream of the key
/// ended with KEY_REVOKED).
#[tokio::test]
async fn a_batch_in_flight_when_its_key_is_revoked_is_rolled_back_before_its_commit() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (id, key) = create_key(&config, "in flight", "read,write").await;
    let app = spawn_app_with(config.clone()).await;
    let session = app
        .sessions
        .clone()
        .create_session(authed(new_session("in flight"), &key))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    // A stream of the same key: its end tells the revocation signal fired.
    let mut watch = app
        .sessions
        .clone()
        .watch_session(authed(
            WatchSessionRequest {
                id: session.id.clone(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();

    // Hold every ingest writer before its first statement.
    let mut sql = app.sql().await;
    let lock = sql.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE ingest_marks IN EXCLUSIVE MODE")
        .await
        .unwrap();
    // The whole ingest, half-closed: the reader is done, the one batch is
    // with the writer.
    let mut d = app.discrepancies.clone();
    let token = key.clone();
    let chunks = vec![chunk(&session.id, 1, 2_000), chunk(&session.id, 2, 2_000)];
    let call = tokio::spawn(async move {
        d.ingest_discrepancies(authed(futures::stream::iter(chunks), &token))
            .await
    });
    let probe = app.sql().await;
    let start = Instant::now();
    loop {
        let waiting: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the ingest writer never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    verdict::revoke_key(&config, &id).await.expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch outlived the revocation")
        .expect_err("the watch ends with an error");
    assert_eq!(reason(&ended), "KEY_REVOKED");
    // Let the writer go: it writes its batch, then must not commit it.
    lock.commit().await.unwrap();

    let ended = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the ingest did not end")
        .unwrap()
        .expect_err("the ingest of a revoked key ends with an error");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert_eq!(reason(&ended), "KEY_REVOKED");
    let stored: i64 = probe
        .query_one("SELECT count(*) FROM discrepancies", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "rows committed after the revocation");
    let marks: i64 = probe
        .query_one(
            "SELECT count(*) FROM ingest_marks WHERE high_water_mark > 0 OR finished",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(marks, 0, "the mark advanced after the revocation");
}

#[tokio::test]
async fn a_revocation_reaches_open_streams_across_a_cut_listener_connection() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (_, writer) = create_key(&config, "writer", "write").await;
    let (id, reader) = create_key(&config, "watcher", "read").await;
    let app = spawn_app_with(config.clone()).await;
    let session = app
        .sessions
        .clone()
        .create_session(authed(new_session("cut"), &writer))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let mut watch = app
        .sessions
        .clone()
        .watch_session(authed(
            WatchSessionRequest {
                id: session.id,
                ..Default::default()
            },
            &reader,
        ))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();

    // Cut the key listener's connection, then revoke at once: the
    // notification may be lost; the reconnect (which empties the cache and
    // re-reads keys with open streams) or the per-second backstop catches it.
    cut_key_listener(&app).await;
    verdict::revoke_key(&config, &id).await.expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(3), watch.message())
        .await
        .expect("the watch outlived the revocation across a cut listener")
        .expect_err("the watch ends with an error");
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert_eq!(reason(&ended), "KEY_REVOKED");
    let refused = refused_within(&app, &reader, Duration::from_secs(3)).await;
    assert_eq!(reason(&refused), "KEY_REVOKED");
}

/// Terminates the backend of the gateway's key listener (`LISTEN
/// verdict_keys_changed`), waiting (bounded) until there is one.
async fn cut_key_listener(app: &TestApp) {
    let sql = app.sql().await;
    let start = Instant::now();
    loop {
        let cut: i64 = sql
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query = 'LISTEN verdict_keys_changed'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if cut > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no key listener found"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn eight_clients_calling_with_a_cached_key_are_all_refused_soon_after_its_revocation_across_a_cut_listener()
 {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (id, token) = create_key(&config, "busy", "read").await;
    let app = spawn_app_with(config.clone()).await;

    // Eight clients, each on a connection of its own, call in a loop with
    // the same key (cached after the first call: every later call is judged
    // from memory). Each says when its first call succeeded, then goes on
    // until it has seen ten refusals in a row, recording every answer.
    let stop_by = Instant::now() + Duration::from_secs(60);
    let (started, mut ready) = tokio::sync::mpsc::channel::<()>(8);
    let mut clients = Vec::new();
    for _ in 0..8 {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", app.port))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut s = SessionServiceClient::new(channel);
        let token = token.clone();
        let started = started.clone();
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut refused_in_a_row = 0;
            while refused_in_a_row < 10 && Instant::now() < stop_by {
                let answer = s
                    .list_sessions(authed(ListSessionsRequest::default(), &token))
                    .await;
                let at = Instant::now();
                if answer.is_err() {
                    refused_in_a_row += 1;
                } else {
                    refused_in_a_row = 0;
                    if answers.is_empty() {
                        let _ = started.send(()).await;
                    }
                }
                answers.push((at, answer.map(|_| ()).map_err(|e| (e.code(), reason(&e)))));
            }
            answers
        }));
    }
    drop(started);
    for _ in 0..8 {
        ready
            .recv()
            .await
            .expect("every client's first call succeeds");
    }

    // The notification of the revocation may be lost with the listener's
    // connection: the reconnect or the cache's backstop must catch it.
    cut_key_listener(&app).await;
    verdict::revoke_key(&config, &id).await.expect("revoke");
    let revoked = Instant::now();

    for client in clients {
        let answers = client.await.unwrap();
        let first_refusal = answers
            .iter()
            .position(|(_, a)| a.is_err())
            .expect("every client is refused in the end");
        let (at, answer) = &answers[first_refusal];
        assert!(
            at.saturating_duration_since(revoked) < Duration::from_secs(2),
            "a client was still served {:?} after the revocation",
            at.saturating_duration_since(revoked)
        );
        assert_eq!(
            answer,
            &Err((Code::Unauthenticated, "KEY_REVOKED".to_owned()))
        );
        // Once refused, never served again.
        for (_, later) in &answers[first_refusal..] {
            assert_eq!(
                later,
                &Err((Code::Unauthenticated, "KEY_REVOKED".to_owned()))
            );
        }
    }
}

#[tokio::test]
async fn streams_end_at_the_maximum_lifetime_with_unavailable_with_or_without_auth() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.max_stream_lifetime = Duration::from_secs(1);
    let app = spawn_app_with(config).await;
    let session = crate::sessions::create(&app, "short-lived").await;
    let opened = Instant::now();
    let mut watch = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: session.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch outlived its maximum lifetime")
        .expect_err("the watch ends with an error");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(reason(&ended), "STREAM_LIFETIME_EXCEEDED");
    assert!(opened.elapsed() >= Duration::from_millis(900));
    // Unary calls are not affected by the lifetime.
    app.sessions
        .clone()
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap();

    // With keys required too.
    let (_, url) = create_database().await;
    let mut config = auth_config(&url);
    config.max_stream_lifetime = Duration::from_secs(1);
    let (_, token) = create_key(&config, "all", "read,write").await;
    let app = spawn_app_with(config).await;
    let session = app
        .sessions
        .clone()
        .create_session(authed(new_session("short-lived"), &token))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let mut watch = app
        .sessions
        .clone()
        .watch_session(authed(
            WatchSessionRequest {
                id: session.id,
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch outlived its maximum lifetime")
        .expect_err("the watch ends with an error");
    assert_eq!(reason(&ended), "STREAM_LIFETIME_EXCEEDED");
}

#[test]
fn the_stream_lifetime_setting_takes_units_and_refuses_nonsense() {
    use clap::Parser;
    let parse = |v: &str| {
        verdict::config::Cli::try_parse_from(["verdict", "--max-stream-lifetime", v])
            .map(|c| c.config.max_stream_lifetime)
    };
    assert_eq!(parse("90m").unwrap(), Duration::from_secs(5_400));
    assert_eq!(parse("2h").unwrap(), Duration::from_secs(7_200));
    assert_eq!(parse("45").unwrap(), Duration::from_secs(45));
    for bad in ["0", "1w", "-5s", "h", ""] {
        assert!(parse(bad).is_err(), "{bad}");
    }
    let default = verdict::config::Cli::try_parse_from(["verdict"]).unwrap();
    assert_eq!(
        default.config.max_stream_lifetime,
        Duration::from_secs(3_600)
    );
}

/// A channel to the gateway whose connection comes from `source` (any
/// address of the loopback network), not the default 127.0.0.1.
async fn connect_from(source: std::net::IpAddr, port: u16) -> tonic::transport::Channel {
    let connector = tower::service_fn(move |_: http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        let stream = socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    tonic::transport::Endpoint::from_static("http://verdict.invalid")
        .connect_with_connector(connector)
        .await
        .expect("connect to the gateway")
}

#[tokio::test]
async fn the_failure_budget_is_per_address_so_one_peer_spending_it_does_not_lock_out_another() {
    let (_, url) = create_database().await;
    let mut config = auth_config(&url);
    config.auth_failure_burst = 3;
    config.auth_failures_per_sec = 0.01;
    let (app, keys) = spawn_with_keys(config).await;
    let list = |mut client: SessionServiceClient<tonic::transport::Channel>| async move {
        client
            .list_sessions(authed(ListSessionsRequest::default(), &random_token()))
            .await
            .unwrap_err()
    };
    // 127.0.0.1 spends its budget of failed lookups, then is refused
    // without one.
    let first = SessionServiceClient::new(connect_from([127, 0, 0, 1].into(), app.port).await);
    for _ in 0..3 {
        let status = list(first.clone()).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let spent = keys.lookups();
    let status = list(first.clone()).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "RATE_LIMITED");
    assert_eq!(keys.lookups(), spent, "a refused peer costs no lookup");
    // Another address of the same host still has its own budget.
    let second = SessionServiceClient::new(connect_from([127, 0, 0, 2].into(), app.port).await);
    let status = list(second.clone()).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(keys.lookups(), spent + 1);
    // And the first is still refused.
    let status = list(first).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}
