//! Hostile and careless clients against the real `verdict` binary, run as a
//! process of its own so that its memory (VmRSS / VmHWM of
//! /proc/<pid>/status) and its log (captured stderr) are measured honestly.
//! Every gateway requires API keys although it listens on loopback
//! (`VERDICT_REQUIRE_AUTH`). Only 127.0.0.0/8 is ever a target; every loop
//! is bounded in count and time.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::create_database;
use http::uri::PathAndQuery;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::test_case_service_client::TestCaseServiceClient;
use verdict::proto::{CreateSessionRequest, ExecutionInput, RecordExecutionsRequest};

/// These tests measure memory and time: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A `verdict serve` child process with its stderr in a file.
struct Gateway {
    child: Child,
    port: u16,
    metrics_port: Option<u16>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Gateway {
    /// Starts the binary on `database_url` with `env` and waits (bounded)
    /// until it serves.
    async fn start(database_url: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr.log");
        let port = free_port();
        let metrics_port = env
            .iter()
            .any(|(k, _)| *k == "WITH_METRICS")
            .then(free_port);
        let mut command = Command::new(env!("CARGO_BIN_EXE_verdict"));
        command
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("VERDICT_LISTEN", format!("127.0.0.1:{port}"))
            .env("VERDICT_REQUIRE_AUTH", "true")
            .env("VERDICT_ROLLUP_INTERVAL_SECS", "0")
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(m) = metrics_port {
            command.env("VERDICT_METRICS_LISTEN", format!("127.0.0.1:{m}"));
        }
        for (k, v) in env.iter().filter(|(k, _)| *k != "WITH_METRICS") {
            command.env(k, v);
        }
        let child = command.spawn().unwrap();
        let gateway = Gateway {
            child,
            port,
            metrics_port,
            log,
            _dir: dir,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(ch) = Endpoint::from_shared(gateway.url()).unwrap().connect().await {
                    let mut health = HealthClient::new(ch);
                    if let Ok(r) = health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        && r.into_inner().status == ServingStatus::Serving as i32
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "the gateway serves: {}", gateway.log_text());
        gateway
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A field of /proc/<pid>/status, in kB.
    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).unwrap().len()
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The body of `GET /metrics`.
    async fn scrape(&self) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics_port.unwrap()))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        text.split_once("\r\n\r\n").unwrap().1.to_owned()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a one-shot `verdict` command; returns (stdout, stderr).
fn run_command(database_url: &str, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .envs(env.iter().copied())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    (stdout, stderr)
}

/// Creates a key with every scope through the binary; returns its token.
fn create_token(database_url: &str) -> String {
    let (stdout, _) = run_command(
        database_url,
        &["keys", "create", "--name", "hostile", "--scopes", "read,write,admin"],
        &[("RUST_LOG", "debug")],
    );
    stdout.trim().to_owned()
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().unwrap(),
    );
    request
}

/// A call to an arbitrary path with an empty message; its status code.
async fn call_path(channel: Channel, path: &str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::try_from(path.to_owned()).unwrap();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// `n` keyless calls to unique made-up paths of about 8 KB, 16 at a time.
async fn flood_made_up_paths(channel: &Channel, first: usize, n: usize) {
    let filler = "x".repeat(8 * 1024);
    let mut tasks = JoinSet::new();
    for worker in 0..16 {
        let channel = channel.clone();
        let filler = filler.clone();
        tasks.spawn(async move {
            for i in (first + worker..first + n).step_by(16) {
                let code = call_path(channel.clone(), &format!("/made.up.S{i}/{filler}{i}")).await;
                assert!(
                    matches!(code, Code::Unauthenticated | Code::Unimplemented),
                    "{code:?}"
                );
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// Series of a Prometheus text without their values.
fn series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .map(|l| l.rsplit_once(' ').map_or(l, |(name, _)| name).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_calls_to_made_up_paths_cost_no_memory_no_log_and_no_metrics() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let gateway = Gateway::start(&url, &[("WITH_METRICS", "")]).await;
    let channel = gateway.channel().await;

    // Warm up allocator and connection, then measure.
    flood_made_up_paths(&channel, 0, 2_000).await;
    let (rss, log, metrics) = (gateway.rss_kb(), gateway.log_len(), gateway.scrape().await);
    let started = Instant::now();
    flood_made_up_paths(&channel, 2_000, 20_000).await;
    let elapsed = started.elapsed();
    let (rss_after, log_after, metrics_after) =
        (gateway.rss_kb(), gateway.log_len(), gateway.scrape().await);
    eprintln!(
        "20,000 calls in {elapsed:?}: RSS {rss} -> {rss_after} kB, log {log} -> {log_after} B, \
         /metrics {} -> {} B",
        metrics.len(),
        metrics_after.len()
    );
    assert!(
        rss_after < rss + 5 * 1024,
        "RSS grew from {rss} to {rss_after} kB"
    );
    assert!(
        log_after < log + 1024 * 1024,
        "the log grew from {log} to {log_after} bytes"
    );
    assert_eq!(
        series(&metrics),
        series(&metrics_after),
        "no new series in /metrics"
    );
    assert!(!metrics_after.contains("made.up"), "no made-up path in /metrics");
    let text = gateway.log_text();
    assert!(text.contains("suppressed"), "dropped lines are reported");
    assert!(
        text.lines().all(|l| l.len() < 2048),
        "no line carries a whole path"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands_print_only_their_output_on_stdout() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    assert!(
        token.starts_with("vk_") && !token.contains(char::is_whitespace),
        "stdout is the token alone: {token:?}"
    );

    let gateway = Gateway::start(&url, &[]).await;
    let session = SessionServiceClient::new(gateway.channel().await)
        .create_session(authed(
            CreateSessionRequest {
                request_id: "export-me".into(),
                source_technology: "cobol".into(),
                target_technology: "java".into(),
                validation_scope: "full".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    drop(gateway);

    let (stdout, stderr) = run_command(&url, &["export", &session.id], &[("RUST_LOG", "debug")]);
    assert!(!stderr.is_empty(), "logs went to stderr");
    assert!(!stdout.is_empty());
    for line in stdout.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
    }
    assert!(stdout.contains(&session.id));
}
