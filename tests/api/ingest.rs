//! Client-stream ingests (IngestDiscrepancies, IngestExecutions): what a
//! call commits when it ends orderly, when it is cancelled, cut by its
//! deadline or idle, resumed, fed bad bytes; the byte bound of what a stream
//! holds; GetIngestStatus.

use crate::discrepancies::item;
use crate::fuzz::RawCodec;
use crate::helpers::{TestApp, spawn_app, spawn_app_with, test_config};
use crate::sessions::create;
use prost::Message;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_types::StatusExt;
use verdict::proto::{
    DiscrepancyServiceGetIngestStatusRequest, ExecutionStatus, IngestDiscrepanciesRequest,
    IngestDiscrepanciesResponse, IngestExecutionsRequest, IngestStatus,
    TestCaseServiceGetIngestStatusRequest,
};

/// Upper bound of every wait on observable state in this file.
const PATIENCE: Duration = Duration::from_secs(30);

fn chunk(
    ingest_id: &str,
    session_id: &str,
    sequence: i64,
    size: usize,
) -> IngestDiscrepanciesRequest {
    IngestDiscrepanciesRequest {
        ingest_id: ingest_id.into(),
        session_id: session_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut d = item(sequence as usize * 100_000 + i);
                d.description = format!("chunk {sequence} item {i}");
                d
            })
            .collect(),
    }
}

fn execution_chunk(ingest_id: &str, sequence: i64, size: usize) -> IngestExecutionsRequest {
    IngestExecutionsRequest {
        ingest_id: ingest_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut e = crate::test_cases::run(
                    &format!("s-{}", i % 4),
                    ExecutionStatus::Passed,
                    sequence * 10_000 + i as i64,
                    3,
                );
                e.error_message = format!("chunk {sequence} item {i}");
                e
            })
            .collect(),
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

async fn status(app: &TestApp, ingest_id: &str) -> Result<IngestStatus, tonic::Status> {
    app.discrepancies
        .clone()
        .get_ingest_status(DiscrepancyServiceGetIngestStatusRequest {
            ingest_id: ingest_id.into(),
        })
        .await
        .map(|r| r.into_inner().status.expect("a status"))
}

async fn execution_status(app: &TestApp, ingest_id: &str) -> Result<IngestStatus, tonic::Status> {
    app.test_cases
        .clone()
        .get_ingest_status(TestCaseServiceGetIngestStatusRequest {
            ingest_id: ingest_id.into(),
        })
        .await
        .map(|r| r.into_inner().status.expect("a status"))
}

async fn ingest(
    app: &TestApp,
    chunks: Vec<IngestDiscrepanciesRequest>,
) -> Result<IngestDiscrepanciesResponse, tonic::Status> {
    app.discrepancies
        .clone()
        .ingest_discrepancies(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

/// Polls `probe` until it holds, for at most [`PATIENCE`].
async fn until<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(PATIENCE, async {
        while !probe().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// Whether a backend of the gateway waits on a lock in the test's database.
async fn gateway_waits_on_a_lock(sql: &tokio_postgres::Client) -> bool {
    sql.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock'",
        &[],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        > 0
}

/// Whether every backend of the gateway in the test's database is idle
/// outside a transaction (what it was doing has committed or rolled back).
async fn gateway_is_quiet(sql: &tokio_postgres::Client) -> bool {
    sql.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'verdict' AND datname = current_database() AND state <> 'idle' AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 0
}

#[tokio::test]
async fn a_stream_that_goes_silent_commits_nothing_it_had_not_committed_and_no_audit_row() {
    let (_, url) = crate::helpers::create_database().await;
    let mut config = test_config(&url);
    config.stream_idle_timeout = Duration::from_secs(2);
    let app = spawn_app_with(config).await;
    let s = create(&app, "s").await;
    // The test holds a lock that stalls the gateway's first batch mid-write.
    let mut blocker = app.sql().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE discrepancies IN SHARE MODE")
        .await
        .unwrap();

    // Chunks 1-10 fill one batch (10,000 items); 11-13 are the tail. Then
    // the client goes silent (the stream stays open).
    let (tx, rx) = mpsc::channel(16);
    for seq in 1..=13 {
        tx.send(chunk("cut", &s.id, seq, 1000)).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let call =
        tokio::spawn(async move { client.ingest_discrepancies(ReceiverStream::new(rx)).await });
    let sql = app.sql().await;
    until("the first batch waits on the lock", || {
        gateway_waits_on_a_lock(&sql)
    })
    .await;

    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "STREAM_IDLE");
    // The call is over; now let the stalled write go on, and wait until the
    // gateway's connections are idle: whatever it was going to do is done.
    lock.commit().await.unwrap();
    until("the gateway is idle", || gateway_is_quiet(&sql)).await;
    drop(tx);

    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM ingest_marks").await, 0);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE rpc LIKE '%IngestDiscrepancies'"
        )
        .await,
        0
    );
    let err = status(&app, "cut").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "NOT_FOUND");

    // The same ingest sent again stores it once and says so.
    let all: Vec<_> = (1..=13).map(|seq| chunk("cut", &s.id, seq, 1000)).collect();
    let reply = ingest(&app, all).await.unwrap();
    assert_eq!((reply.committed_chunks, reply.skipped_chunks), (13, 0));
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        13_000
    );
}

#[tokio::test]
async fn a_cancelled_stream_keeps_only_its_committed_batches_and_a_resend_adds_up_to_what_it_sent()
{
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let all: Vec<_> = (1..=40)
        .map(|seq| chunk("half", &s.id, seq, 1000))
        .collect();

    // 20 chunks (two batches of 10,000 items) are committed while the
    // stream is open; then 5 more arrive, and the client cancels.
    let (tx, rx) = mpsc::channel(64);
    for c in all[..20].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let call =
        tokio::spawn(async move { client.ingest_discrepancies(ReceiverStream::new(rx)).await });
    until("20 chunks are committed", || async {
        status(&app, "half")
            .await
            .is_ok_and(|s| s.high_water_mark == 20)
    })
    .await;
    for c in all[20..25].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    call.abort();
    let cancelled = call.await.unwrap_err();
    assert!(cancelled.is_cancelled());
    // The reset travels on the same connection as the next call, ahead of it;
    // then whatever the gateway does about the cancelled call is done once
    // its connections are idle.
    let sql = app.sql().await;
    status(&app, "half").await.unwrap();
    until("the gateway is idle", || gateway_is_quiet(&sql)).await;

    // What the call committed is what GetIngestStatus reports: the two
    // batches, not finished, and no audit row.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE rpc LIKE '%IngestDiscrepancies'"
        )
        .await,
        0
    );
    let st = status(&app, "half").await.unwrap();
    assert_eq!(st.high_water_mark, 20);
    assert_eq!(st.committed_items, 20_000);
    assert!(!st.finished);
    assert!(st.update_time.is_some());

    // Resending all 40 at once skips exactly what was committed.
    let reply = ingest(&app, all.clone()).await.unwrap();
    assert_eq!(
        reply.committed_chunks + reply.skipped_chunks,
        40,
        "{reply:?}"
    );
    assert_eq!(reply.skipped_chunks, 20, "{reply:?}");
    assert_eq!(reply.committed_items, 20_000);
    assert_eq!(reply.high_water_mark, 40);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        40_000
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(DISTINCT description) FROM discrepancies"
        )
        .await,
        40_000
    );
    let st = status(&app, "half").await.unwrap();
    assert_eq!(
        (st.high_water_mark, st.committed_items, st.finished),
        (40, 40_000, true)
    );
    // One audit row: the call that ended with a half-close.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE rpc LIKE '%IngestDiscrepancies'"
        )
        .await,
        1
    );
    // A replay of a finished ingest commits nothing and reports every chunk.
    let reply = ingest(&app, all).await.unwrap();
    assert_eq!((reply.committed_chunks, reply.skipped_chunks), (0, 40));
}

#[tokio::test]
async fn concurrent_resends_of_one_ingest_store_it_once_and_each_reply_adds_up() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let all: Vec<_> = (1..=30)
        .map(|seq| chunk("race", &s.id, seq, 1000))
        .collect();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let mut client = app.discrepancies.clone();
            let chunks = all.clone();
            tokio::spawn(async move {
                client
                    .ingest_discrepancies(futures::stream::iter(chunks))
                    .await
            })
        })
        .collect();
    let mut committed = 0;
    for call in calls {
        let reply = call.await.unwrap().unwrap().into_inner();
        assert_eq!(
            reply.committed_chunks + reply.skipped_chunks,
            30,
            "{reply:?}"
        );
        committed += reply.committed_chunks;
    }
    assert_eq!(committed, 30);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        30_000
    );
}

#[tokio::test]
async fn an_execution_ingest_cancelled_half_way_and_resent_reports_every_chunk() {
    let app = spawn_app().await;
    for i in 0..4 {
        crate::test_cases::create_test_case(
            &app,
            crate::test_cases::new_test_case(&format!("s-{i}"), verdict::proto::TestType::Unit, ""),
        )
        .await;
    }
    let all: Vec<_> = (1..=40)
        .map(|seq| execution_chunk("ex", seq, 1000))
        .collect();
    let (tx, rx) = mpsc::channel(64);
    for c in all[..20].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.test_cases.clone();
    let call = tokio::spawn(async move { client.ingest_executions(ReceiverStream::new(rx)).await });
    until("20 chunks are committed", || async {
        execution_status(&app, "ex")
            .await
            .is_ok_and(|s| s.high_water_mark == 20)
    })
    .await;
    tx.send(all[20].clone()).await.unwrap();
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    let st = execution_status(&app, "ex").await.unwrap();
    assert_eq!(
        (st.high_water_mark, st.committed_items, st.finished),
        (20, 20_000, false)
    );

    let reply = app
        .test_cases
        .clone()
        .ingest_executions(futures::stream::iter(all))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.committed_chunks + reply.skipped_chunks,
        40,
        "{reply:?}"
    );
    assert_eq!(reply.skipped_chunks, 20);
    assert_eq!(reply.committed_items, 20_000);
    assert_eq!(
        count(&app, "SELECT count(*) FROM test_executions").await,
        40_000
    );
    let st = execution_status(&app, "ex").await.unwrap();
    assert_eq!((st.high_water_mark, st.finished), (40, true));
}

#[tokio::test]
async fn get_ingest_status_names_unknown_and_malformed_ingest_ids() {
    let app = spawn_app().await;
    let err = status(&app, "never-sent").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = execution_status(&app, "never-sent").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = status(&app, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(crate::helpers::violated_fields(&err), vec!["ingest_id"]);
    // An execution ingest and a discrepancy ingest with the same id are two.
    let s = create(&app, "s").await;
    ingest(&app, vec![chunk("both", &s.id, 1, 3)])
        .await
        .unwrap();
    assert_eq!(status(&app, "both").await.unwrap().committed_items, 3);
    assert_eq!(
        execution_status(&app, "both").await.unwrap_err().code(),
        Code::NotFound
    );
}

/// One discrepancy of about 16 KiB.
fn large_item(n: usize) -> verdict::proto::DiscrepancyInput {
    let mut d = item(n);
    d.description = format!("{n:08}{}", "d".repeat(8000));
    d.recommendation = "r".repeat(8000);
    d
}

#[tokio::test]
async fn a_stream_whose_writes_stall_is_held_by_flow_control_not_buffered() {
    let (_, url) = crate::helpers::create_database().await;
    let mut config = test_config(&url);
    config.ingest_buffer_bytes = 1024 * 1024;
    let app = spawn_app_with(config).await;
    let s = create(&app, "s").await;
    let mut blocker = app.sql().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE discrepancies IN SHARE MODE")
        .await
        .unwrap();

    // 200 messages of 16 items of 16 KiB (256 KiB each, 50 MiB in all).
    const MESSAGES: i64 = 200;
    const PER_MESSAGE: usize = 16;
    let message = |seq: i64| IngestDiscrepanciesRequest {
        ingest_id: "big".into(),
        session_id: s.id.clone(),
        sequence: seq,
        items: (0..PER_MESSAGE)
            .map(|i| large_item(seq as usize * 100 + i))
            .collect(),
    };
    let size = message(1).encoded_len();
    assert!(size > 250 * 1024, "{size}");
    let (tx, rx) = mpsc::channel(1);
    let mut client = app.discrepancies.clone();
    let call =
        tokio::spawn(async move { client.ingest_discrepancies(ReceiverStream::new(rx)).await });

    // Send until a send has waited 3 s: the gateway stopped reading.
    let mut sent = 0;
    while sent < MESSAGES {
        match tokio::time::timeout(Duration::from_secs(3), tx.send(message(sent + 1))).await {
            Ok(result) => {
                result.unwrap();
                sent += 1;
            }
            Err(_) => break,
        }
    }
    // What left the client is bounded by the gateway's 1 MiB buffer plus the
    // HTTP/2 windows and send buffers of both ends (about 3 MiB measured),
    // far below the 50 MiB the client had to send.
    eprintln!("client sent {sent} messages of {size} bytes before blocking");
    assert!(sent < MESSAGES, "the client never blocked");
    assert!(
        (sent as usize) * size <= 8 * 1024 * 1024,
        "{sent} messages of {size} bytes left the client"
    );
    assert!(!call.is_finished());

    // Released, the stream completes and stores everything once.
    lock.commit().await.unwrap();
    for seq in sent + 1..=MESSAGES {
        tx.send(message(seq)).await.unwrap();
    }
    drop(tx);
    let reply = call.await.unwrap().unwrap().into_inner();
    assert_eq!(reply.committed_chunks, MESSAGES);
    assert_eq!(reply.committed_items, MESSAGES * PER_MESSAGE as i64);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        MESSAGES * PER_MESSAGE as i64
    );
}

#[tokio::test]
async fn a_silent_stream_ends_with_stream_idle_and_rolls_back_its_tail() {
    let (_, url) = crate::helpers::create_database().await;
    let mut config = test_config(&url);
    config.stream_idle_timeout = Duration::from_millis(500);
    let app = spawn_app_with(config).await;
    let s = create(&app, "s").await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(chunk("idle", &s.id, 1, 10)).await.unwrap();
    let err = tokio::time::timeout(
        PATIENCE,
        app.discrepancies
            .clone()
            .ingest_discrepancies(ReceiverStream::new(rx)),
    )
    .await
    .expect("the gateway ends an idle stream")
    .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "STREAM_IDLE");
    drop(tx);
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(
        status(&app, "idle").await.unwrap_err().code(),
        Code::NotFound
    );

    // An execution stream that never sends its first message, too.
    let (_tx, rx) = mpsc::channel::<IngestExecutionsRequest>(1);
    let err = app
        .test_cases
        .clone()
        .ingest_executions(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(reason(&err), "STREAM_IDLE");
}

/// Sends raw messages on IngestDiscrepancies.
async fn raw_ingest(app: &TestApp, messages: Vec<Vec<u8>>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    grpc.client_streaming(
        tonic::Request::new(futures::stream::iter(messages)),
        http::uri::PathAndQuery::from_static("/verdict.v1.DiscrepancyService/IngestDiscrepancies"),
        RawCodec,
    )
    .await
    .unwrap_err()
}

#[tokio::test]
async fn undecodable_bytes_in_a_stream_are_invalid_argument_and_too_large_is_resource_exhausted() {
    let (_, url) = crate::helpers::create_database().await;
    let mut config = test_config(&url);
    config.max_message_bytes = 256 * 1024;
    let app = spawn_app_with(config).await;
    let s = create(&app, "s").await;
    let good = chunk("raw", &s.id, 1, 10).encode_to_vec();

    // A truncated varint after a good first chunk.
    let err = raw_ingest(&app, vec![good.clone(), vec![0xff, 0xff, 0xff]]).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "MALFORMED_MESSAGE");
    // Undecodable as the first message too.
    let err = raw_ingest(&app, vec![vec![0x0a, 0x05, b'a']]).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "MALFORMED_MESSAGE");

    // A message over the 256 KiB limit.
    let mut big = chunk("raw", &s.id, 2, 1);
    big.items = (0..20).map(large_item).collect();
    let err = raw_ingest(&app, vec![good, big.encode_to_vec()]).await;
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "MESSAGE_TOO_LARGE");

    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(
        status(&app, "raw").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_backend_killed_mid_batch_fails_the_call_and_a_resend_stores_everything_once() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let mut blocker = app.sql().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE discrepancies IN SHARE MODE")
        .await
        .unwrap();
    let all: Vec<_> = (1..=13)
        .map(|seq| chunk("kill", &s.id, seq, 1000))
        .collect();
    let (tx, rx) = mpsc::channel(16);
    for c in all.iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let call =
        tokio::spawn(async move { client.ingest_discrepancies(ReceiverStream::new(rx)).await });
    let sql = app.sql().await;
    until("the first batch waits on the lock", || {
        gateway_waits_on_a_lock(&sql)
    })
    .await;
    sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'verdict' AND datname = current_database() \
         AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    drop(tx);
    lock.commit().await.unwrap();
    until("the gateway is idle", || gateway_is_quiet(&sql)).await;
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(
        status(&app, "kill").await.unwrap_err().code(),
        Code::NotFound
    );

    let reply = ingest(&app, all).await.unwrap();
    assert_eq!((reply.committed_chunks, reply.skipped_chunks), (13, 0));
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        13_000
    );
    let st = status(&app, "kill").await.unwrap();
    assert_eq!((st.high_water_mark, st.finished), (13, true));
}

#[tokio::test]
async fn one_ingest_id_sent_at_once_for_two_sessions_is_stored_for_one_only() {
    let app = spawn_app().await;
    let a = create(&app, "a").await;
    let b = create(&app, "b").await;
    let calls: Vec<_> = [a.id.clone(), b.id.clone()]
        .into_iter()
        .map(|session| {
            let mut client = app.discrepancies.clone();
            let chunks: Vec<_> = (1..=3)
                .map(|seq| chunk("twice", &session, seq, 500))
                .collect();
            tokio::spawn(async move {
                client
                    .ingest_discrepancies(futures::stream::iter(chunks))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(reply) => {
                ok += 1;
                assert_eq!(reply.into_inner().committed_chunks, 3);
            }
            Err(err) => {
                assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
                assert_eq!(reason(&err), "IDEMPOTENCY_KEY_REUSED");
            }
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        1500
    );
    assert_eq!(
        count(&app, "SELECT count(DISTINCT session_id) FROM discrepancies").await,
        1
    );
}

// Two workers: the gateway's answer at the deadline must not wait behind the
// test's own work on one thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_its_deadline_commits_nothing_it_had_not_committed() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let mut blocker = app.sql().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE discrepancies IN SHARE MODE")
        .await
        .unwrap();
    // A full batch (chunks 1-10) stalls on the lock; 11-13 are the tail.
    let (tx, rx) = mpsc::channel(16);
    for seq in 1..=13 {
        tx.send(chunk("dl", &s.id, seq, 1000)).await.unwrap();
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_secs(4));
    let err = app
        .discrepancies
        .clone()
        .ingest_discrepancies(request)
        .await
        .unwrap_err();
    // The gateway's own answer, sent after it dropped the call's work.
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "DEADLINE_EXCEEDED");
    drop(tx);
    lock.commit().await.unwrap();
    let sql = app.sql().await;
    until("the gateway is idle", || gateway_is_quiet(&sql)).await;
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM audit_events WHERE rpc LIKE '%IngestDiscrepancies'"
        )
        .await,
        0
    );
    assert_eq!(status(&app, "dl").await.unwrap_err().code(), Code::NotFound);
}
