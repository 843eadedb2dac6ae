//! The fault suite: PostgreSQL restarts under write load, network faults
//! between gateway and PostgreSQL (an in-test TCP proxy injecting latency,
//! resets and a blackhole), overload, and a bounded soak. Every test runs a
//! PostgreSQL of its own, on loopback only, and is bounded in time.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{TestApp, channel_when_serving, spawn_app_with, temp_pg_dir, test_config};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::{
    CreateSessionRequest, DiscrepancyInput, GetSessionRequest, GetStatsRequest,
    IngestDiscrepanciesRequest, ListSessionsRequest, Severity,
};

/// These tests measure time and memory: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Cancelled
    )
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

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(deadline);
    r
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_write_load_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let app = spawn_app_with(test_config(&pg.database_url("verdict"))).await;
    let target = app
        .sessions
        .clone()
        .create_session(session("ingest-target"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    // Every health change, in order.
    let mut health = app
        .health
        .clone()
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = health.message().await {
                seen.lock().unwrap().push(m.status);
            }
        })
    };

    let acked = Arc::new(AtomicUsize::new(0));
    let some_acked = Arc::new(Notify::new());
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let mut client = app.sessions.clone();
        let (acked, some_acked) = (acked.clone(), some_acked.clone());
        writers.spawn(async move {
            for n in 0..60 {
                let request_id = format!("w{w}-{n}");
                loop {
                    match client
                        .create_session(with_deadline(session(&request_id), Duration::from_secs(2)))
                        .await
                    {
                        Ok(_) => break,
                        Err(s) if retryable(s.code()) => {
                            tokio::time::sleep(Duration::from_millis(50)).await
                        }
                        Err(s) => panic!("{request_id}: unexpected {s:?}"),
                    }
                }
                if acked.fetch_add(1, Ordering::SeqCst) == 40 {
                    some_acked.notify_one();
                }
            }
        });
    }
    let mut ingester = app.discrepancies.clone();
    let session_id = target.id.clone();
    writers.spawn(async move {
        let chunks: Vec<IngestDiscrepanciesRequest> = (1..=20)
            .map(|seq| IngestDiscrepanciesRequest {
                ingest_id: "restart-ingest".into(),
                session_id: session_id.clone(),
                sequence: seq,
                items: (0..2500)
                    .map(|i| DiscrepancyInput {
                        kind: "k".into(),
                        severity: Severity::Low as i32,
                        description: format!("{seq}-{i}"),
                        confidence: 0.5,
                        ..Default::default()
                    })
                    .collect(),
            })
            .collect();
        loop {
            match ingester
                .ingest_discrepancies(futures::stream::iter(chunks.clone()))
                .await
            {
                Ok(r) => {
                    assert_eq!(r.into_inner().high_water_mark, 20);
                    break;
                }
                Err(s) if retryable(s.code()) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("ingest: unexpected {s:?}"),
            }
        }
    });

    some_acked.notified().await;
    pg.stop_immediately().await;
    app.wait_for_health("", ServingStatus::NotServing).await;
    pg.restart().await.unwrap();
    app.wait_for_health("", ServingStatus::Serving).await;
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }

    let sql = app.sql().await;
    let sessions: i64 = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id LIKE 'w%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions, 240, "every acknowledged create exactly once");
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM discrepancies", &[])
        .await
        .unwrap()
        .get(0);
    let distinct: i64 = sql
        .query_one("SELECT count(DISTINCT description) FROM discrepancies", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (rows, distinct),
        (50_000, 50_000),
        "every ingested item exactly once"
    );
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    let not_serving = seen
        .iter()
        .position(|s| *s == ServingStatus::NotServing as i32)
        .expect("went NOT_SERVING");
    assert!(
        seen[not_serving..].contains(&(ServingStatus::Serving as i32)),
        "and back: {seen:?}"
    );
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the proxy does to bytes in flight.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Pass,
    Latency(Duration),
    Blackhole,
}

/// A TCP proxy in front of the embedded server's unix socket.
struct Proxy {
    port: u16,
    fault: watch::Sender<Fault>,
    links: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(socket: std::path::PathBuf) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (fault, _) = watch::channel(Fault::Pass);
        let links = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let (tx, l) = (fault.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(unix) = UnixStream::connect(&socket).await else {
                    continue;
                };
                let (tr, tw) = tcp.into_split();
                let (ur, uw) = unix.into_split();
                let mut set = l.lock().unwrap();
                set.spawn(pump(tr, uw, tx.subscribe()));
                set.spawn(pump(ur, tw, tx.subscribe()));
            }
        });
        Proxy { port, fault, links }
    }

    fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Drops every open link, as a reset would.
    fn reset(&self) {
        self.links.lock().unwrap().abort_all();
    }
}

async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::Pass => break,
                Fault::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                // Hold the bytes until the fault changes.
                Fault::Blackhole => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn get(app: &TestApp, id: &str, deadline: Duration) -> (Result<(), tonic::Status>, Duration) {
    let started = Instant::now();
    let result = app
        .sessions
        .clone()
        .get_session(with_deadline(
            GetSessionRequest {
                lookup: Some(Lookup::Id(id.into())),
                ..Default::default()
            },
            deadline,
        ))
        .await
        .map(|_| ());
    (result, started.elapsed())
}

/// Retries until a call succeeds; panics after 10 s.
async fn until_ok(app: &TestApp, id: &str) {
    let started = Instant::now();
    loop {
        match get(app, id, Duration::from_secs(2)).await.0 {
            Ok(()) => return,
            Err(s) if retryable(s.code()) && started.elapsed() < Duration::from_secs(10) => {
                tokio::task::yield_now().await
            }
            Err(s) => panic!("did not recover: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_fail_fast_within_deadlines_and_the_pool_recovers() {
    let _serial = SERIAL.lock().await;
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let proxy = Proxy::start(pg.dir().join(".s.PGSQL.5432")).await;
    let mut config = test_config(&format!(
        "host=127.0.0.1 port={} user=verdict dbname=verdict",
        proxy.port
    ));
    config.pool_size = 4;
    config.pool_wait_timeout_ms = 300;
    let app = spawn_app_with(config).await;
    let s = app
        .sessions
        .clone()
        .create_session(session("net"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    // Latency: a short deadline fails at its deadline, a long one succeeds.
    proxy.set(Fault::Latency(Duration::from_millis(300)));
    let (r, took) = get(&app, &s.id, Duration::from_millis(150)).await;
    assert_eq!(r.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(took < Duration::from_millis(400), "failed fast: {took:?}");
    let (r, _) = get(&app, &s.id, Duration::from_secs(5)).await;
    r.expect("slow but within its deadline");
    proxy.set(Fault::Pass);

    // Resets: broken connections are replaced.
    proxy.reset();
    until_ok(&app, &s.id).await;

    // Blackhole: every call ends by its deadline, more calls than connections.
    proxy.set(Fault::Blackhole);
    let calls: Vec<_> = (0..12)
        .map(|_| get(&app, &s.id, Duration::from_millis(500)))
        .collect();
    for (r, took) in futures::future::join_all(calls).await {
        let code = r.unwrap_err().code();
        assert!(
            matches!(
                code,
                Code::DeadlineExceeded | Code::Unavailable | Code::ResourceExhausted
            ),
            "{code:?}"
        );
        assert!(
            took < Duration::from_millis(900),
            "ended by its deadline: {took:?}"
        );
    }
    proxy.set(Fault::Pass);
    proxy.reset();
    until_ok(&app, &s.id).await;
    for _ in 0..20 {
        get(&app, &s.id, Duration::from_secs(2))
            .await
            .0
            .expect("healthy again");
    }
    let pool = app
        .admin
        .clone()
        .get_stats(GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pool
        .unwrap();
    assert_eq!(pool.waiting, 0);
    assert!(pool.size <= 4, "no connection leak: {pool:?}");
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_retry_advice_and_memory_stays_flat() {
    let _serial = SERIAL.lock().await;
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let mut config = test_config(&pg.database_url("verdict"));
    config.pool_size = 2;
    config.pool_max_waiting = 4;
    config.pool_wait_timeout_ms = 300;
    let app = spawn_app_with(config).await;
    let s = app
        .sessions
        .clone()
        .create_session(session("hot"))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    let wave = |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let mut c = app.sessions.clone();
                let id = s.id.clone();
                async move {
                    c.list_sessions(ListSessionsRequest {
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        assert_eq!(e.code(), Code::ResourceExhausted, "{id}: {e:?}");
                        e
                    })
                }
            })
            .collect();
        futures::future::join_all(calls)
    };
    // Warm up, then 10 waves of 10x the pool's capacity in flight.
    wave(20).await;
    let before = rss_bytes();
    let mut shed = 0;
    let mut served = 0;
    for _ in 0..10 {
        for r in wave(20 * 10).await {
            match r {
                Ok(()) => served += 1,
                Err(e) => {
                    use tonic_types::StatusExt;
                    assert!(e.get_details_retry_info().is_some(), "retry advice");
                    shed += 1;
                }
            }
        }
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(shed > 0 && served > 0, "shed {shed}, served {served}");
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {} MiB",
        grown / (1024 * 1024)
    );
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_soak_keeps_memory_flat_and_errors_expected() {
    let _serial = SERIAL.lock().await;
    let seconds: u64 = std::env::var("VERDICT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let app = spawn_app_with(test_config(&pg.database_url("verdict"))).await;
    let end = Instant::now() + Duration::from_secs(seconds);
    let warm = Instant::now() + Duration::from_secs(seconds / 3);
    let baseline = Arc::new(std::sync::Mutex::new(None));
    let mut tasks = JoinSet::new();
    for t in 0..6 {
        let (mut sessions, mut discrepancies) = (app.sessions.clone(), app.discrepancies.clone());
        let baseline = baseline.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if t == 0 && Instant::now() > warm {
                    baseline.lock().unwrap().get_or_insert_with(rss_bytes);
                }
                let s = sessions
                    .create_session(session(&format!("soak-{t}-{n}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .session
                    .unwrap();
                sessions
                    .get_session(GetSessionRequest {
                        lookup: Some(Lookup::Id(s.id.clone())),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                sessions
                    .list_sessions(ListSessionsRequest {
                        page_size: 50,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                discrepancies
                    .record_discrepancies(verdict::proto::RecordDiscrepanciesRequest {
                        session_id: s.id,
                        batch_id: format!("soak-{t}-{n}"),
                        items: (0..50)
                            .map(|i| DiscrepancyInput {
                                kind: "k".into(),
                                severity: Severity::Medium as i32,
                                description: format!("d{i}"),
                                confidence: 0.7,
                                ..Default::default()
                            })
                            .collect(),
                    })
                    .await
                    .unwrap();
                n += 1;
            }
            n
        });
    }
    let mut rounds = 0;
    while let Some(n) = tasks.join_next().await {
        rounds += n.unwrap();
    }
    let base = baseline.lock().unwrap().expect("baseline taken");
    let grown = rss_bytes().saturating_sub(base);
    assert!(rounds > 0);
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {} MiB over the soak",
        grown / (1024 * 1024)
    );
    app.stop().await.unwrap();
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_in_flight_calls_and_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
        .arg("serve")
        .env("DATABASE_URL", pg.database_url("verdict"))
        .env("VERDICT_LISTEN", format!("127.0.0.1:{port}"))
        .env("VERDICT_ROLLUP_INTERVAL_SECS", "0")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    // Wait (bounded) until it serves.
    let channel = channel_when_serving(port, Duration::from_secs(30))
        .await
        .expect("the gateway serves");

    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(Notify::new());
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let mut client =
            verdict::proto::session_service_client::SessionServiceClient::new(channel.clone());
        let (acked, started, enough) = (acked.clone(), started.clone(), enough.clone());
        writers.spawn(async move {
            for n in 0.. {
                let request_id = format!("term-{w}-{n}");
                match client.create_session(session(&request_id)).await {
                    Ok(_) => acked.lock().unwrap().push(request_id),
                    // After SIGTERM: refused or cut off — never acknowledged.
                    // A call sent while the server's GOAWAY is on the wire is
                    // failed by the client's own HTTP/2 layer, which tonic
                    // reports as INTERNAL with the GOAWAY as its source: the
                    // server never saw that stream.
                    Err(s) => {
                        let raced_goaway =
                            s.code() == Code::Internal && format!("{s:?}").contains("GoAway");
                        assert!(
                            raced_goaway
                                || matches!(
                                    s.code(),
                                    Code::Unavailable | Code::Cancelled | Code::Unknown
                                ),
                            "{s:?}"
                        );
                        return;
                    }
                }
                if started.fetch_add(1, Ordering::SeqCst) == 100 {
                    enough.notify_one();
                }
            }
        });
    }
    enough.notified().await;
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(gateway.id() as i32, libc::SIGTERM) };
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let status = tokio::task::spawn_blocking(move || gateway.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after draining: {status:?}");

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100);
    let (sql, conn) = pg
        .config("verdict")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let stored: Vec<String> = sql
        .query(
            "SELECT request_id FROM sessions WHERE request_id LIKE 'term-%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is stored");
    }
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
