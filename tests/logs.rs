//! Logs an SRE can join to traces: with `VERDICT_LOG_FORMAT=json`, a line
//! written inside a call carries the OpenTelemetry `trace_id` and `span_id`
//! of the call's span, the same ids the collector receives; the text format
//! writes no colour codes to a stderr that is not a terminal; spans still
//! buffered at SIGTERM reach the collector. Runs the real binary, capturing
//! its stderr.

#[path = "api/helpers.rs"]
mod helpers;
#[path = "support/otlp_receiver.rs"]
mod otlp_receiver;

use helpers::create_database;
use otlp_receiver::{Receiver, text, to_hex};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{CreateSessionRequest, GetSessionRequest};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A gateway process; killed when dropped.
struct Gateway {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    async fn start(database_url: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_verdict"));
        command
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("VERDICT_LISTEN", format!("127.0.0.1:{port}"))
            .env("VERDICT_ROLLUP_INTERVAL_SECS", "0")
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("VERDICT_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            command.env(k, v);
        }
        let gateway = Gateway {
            child: command.spawn().unwrap(),
            port,
            log,
            _dir: dir,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(ch) = gateway.endpoint().connect().await
                    && let Ok(r) = HealthClient::new(ch)
                        .check(HealthCheckRequest::default())
                        .await
                    && r.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "the gateway serves: {}", read(&gateway.log));
        gateway
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port)).unwrap()
    }

    async fn sessions(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.endpoint().connect().await.unwrap())
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_log_line_of_a_failed_call_carries_the_trace_and_span_ids_the_collector_saw() {
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let (_, url) = create_database().await;
    let endpoint = format!("http://127.0.0.1:{collector}");
    let gateway = Gateway::start(
        &url,
        &[
            ("VERDICT_LOG_FORMAT", "json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ],
    )
    .await;

    // A call that fails and logs, with no trace context from the caller:
    // the ids are the gateway's own.
    let status = gateway
        .sessions()
        .await
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("no-such-session".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    let rpc = receiver
        .wait_until("the GetSession span", |spans| {
            spans
                .iter()
                .find(|s| s.name == "verdict.v1.SessionService/GetSession")
                .cloned()
        })
        .await;
    assert_eq!(text(&rpc, "rpc.response.status_code"), "NOT_FOUND");
    let (trace_id, span_id) = (to_hex(&rpc.trace_id), to_hex(&rpc.span_id));

    // The span ends when the call's log line has been written; the line is
    // on disk by the time the span reached the collector.
    let log = read(&gateway.log);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let rejected = lines
        .iter()
        .find(|l| l["message"] == "rpc rejected")
        .unwrap_or_else(|| panic!("no line about the call in {log}"));
    assert_eq!(rejected["trace_id"], trace_id.as_str(), "{rejected}");
    assert_eq!(rejected["span_id"], span_id.as_str(), "{rejected}");
    assert_eq!(rejected["level"], "INFO");
    // Lines outside any call carry no ids.
    let startup = lines
        .iter()
        .find(|l| l["message"] == "database schema is up to date")
        .unwrap_or_else(|| panic!("no start-up line in {log}"));
    assert!(startup.get("trace_id").is_none(), "{startup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_file_carry_no_colour_codes() {
    let (_, url) = create_database().await;
    let gateway = Gateway::start(&url, &[]).await;
    let _ = gateway
        .sessions()
        .await
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId("no-such-session".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let log = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let log = read(&gateway.log);
            if log.contains("rpc rejected") {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the call is logged");
    assert!(!log.contains('\u{1b}'), "ANSI escape in {log:?}");
    assert!(log.contains("INFO"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_buffered_at_sigterm_reach_the_collector_before_the_process_exits() {
    const CALLS: usize = 100;
    let receiver = Receiver::default();
    let collector = receiver.start().await;
    let (_, url) = create_database().await;
    let endpoint = format!("http://127.0.0.1:{collector}");
    // The batch processor would export only after a minute: whatever
    // arrives before then was flushed by the shutdown.
    let mut gateway = Gateway::start(
        &url,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ],
    )
    .await;
    let sessions = gateway.sessions().await;
    // Four clients, 25 calls each: within the pool, so none is shed.
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let mut client = sessions.clone();
        calls.spawn(async move {
            for i in 0..CALLS / 4 {
                client
                    .create_session(CreateSessionRequest {
                        request_id: format!("flush-{worker}-{i}"),
                        source_technology: "cobol".into(),
                        target_technology: "java".into(),
                        validation_scope: "full".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let name = "verdict.v1.SessionService/CreateSession";
    let count = |spans: &[opentelemetry_proto::tonic::trace::v1::Span]| {
        spans.iter().filter(|s| s.name == name).count()
    };
    let before = count(&receiver.spans.lock().unwrap());
    assert!(before < CALLS, "nothing was held back to flush ({before})");

    // SAFETY: signalling the child this test spawned.
    unsafe { libc::kill(gateway.child.id() as i32, libc::SIGTERM) };
    let exited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(status) = gateway.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway exits after SIGTERM");
    assert!(exited.success(), "{exited}: {}", read(&gateway.log));
    let arrived = count(&receiver.spans.lock().unwrap());
    assert_eq!(
        arrived,
        CALLS,
        "every call's span was exported before exit: {}",
        read(&gateway.log)
    );
}
