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
use verdict::proto::{CreateSessionRequest, ListSessionsRequest};

/// These tests measure memory and time: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A `verdict serve` child process with its stderr in a file.
struct Gateway {
    child: Child,
    port: u16,
    metrics_port: Option<u16>,
    log: PathBuf,
    tls: Option<tonic::transport::ClientTlsConfig>,
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
        Self::start_tls(database_url, None, env).await
    }

    /// The same, probing readiness over TLS with `tls` when given.
    async fn start_tls(
        database_url: &str,
        tls: Option<tonic::transport::ClientTlsConfig>,
        env: &[(&str, &str)],
    ) -> Gateway {
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
            tls,
            _dir: dir,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Ok(ch) = gateway.endpoint().connect().await {
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

    fn endpoint(&self) -> Endpoint {
        match &self.tls {
            None => Endpoint::from_shared(self.url()).unwrap(),
            Some(tls) => Endpoint::from_shared(format!("https://127.0.0.1:{}", self.port))
                .unwrap()
                .tls_config(tls.clone())
                .unwrap(),
        }
    }

    async fn channel(&self) -> Channel {
        self.endpoint().connect().await.unwrap()
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
        &[
            "keys",
            "create",
            "--name",
            "hostile",
            "--scopes",
            "read,write,admin",
        ],
        &[("RUST_LOG", "debug")],
    );
    stdout.trim().to_owned()
}

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
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
    assert!(
        !metrics_after.contains("made.up"),
        "no made-up path in /metrics"
    );
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

/// A socket to the gateway from the loopback address `source` that says
/// nothing, or half the HTTP/2 preface when `half_preface`.
async fn idle_socket(source: [u8; 4], port: u16, half_preface: bool) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    if half_preface {
        stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    }
    stream
}

/// Waits (bounded) until the peer closes `stream`.
async fn closed_by_peer(mut stream: TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Hundreds of idle sockets from six loopback addresses (50 each, under the
/// per-peer cap), half of them with half a preface.
async fn idle_crowd(port: u16) -> Vec<TcpStream> {
    let mut crowd = Vec::new();
    for peer in 2..8u8 {
        for i in 0..50 {
            crowd.push(idle_socket([127, 0, 0, peer], port, i % 2 == 0).await);
        }
    }
    crowd
}

/// A fresh connection and one authenticated call; how long both took.
async fn timed_call(
    url: &str,
    token: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Duration {
    let started = Instant::now();
    let mut endpoint = Endpoint::from_shared(url.to_owned()).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint.connect().await.unwrap();
    SessionServiceClient::new(channel)
        .list_sessions(authed(ListSessionsRequest::default(), token))
        .await
        .unwrap();
    started.elapsed()
}

/// Best of three: one slow scheduling hiccup on a shared machine is not
/// what is measured.
async fn best_call(
    url: &str,
    token: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        best = best.min(timed_call(url, token, tls.clone()).await);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_capped_per_peer_and_closed_at_the_handshake_deadline() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    let gateway = Gateway::start(
        &url,
        &[
            ("VERDICT_HANDSHAKE_TIMEOUT_MS", "1500"),
            ("VERDICT_MAX_CONNECTIONS_PER_PEER", "64"),
        ],
    )
    .await;

    let opened = Instant::now();
    let crowd = idle_crowd(gateway.port).await;
    let took = best_call(&gateway.url(), &token, None).await;
    eprintln!("with 300 idle sockets open, a new connection and call took {took:?}");
    assert!(took < Duration::from_millis(100), "{took:?}");

    // The per-peer cap: 64 sockets from one address stay, the 65th is
    // closed at once.
    let mut of_one_peer = Vec::new();
    for _ in 0..64 {
        of_one_peer.push(idle_socket([127, 0, 0, 9], gateway.port, false).await);
    }
    let excess = idle_socket([127, 0, 0, 9], gateway.port, false).await;
    let refused_at = Instant::now();
    assert!(closed_by_peer(excess, Duration::from_secs(5)).await);
    assert!(
        refused_at.elapsed() < Duration::from_millis(500),
        "refused at accept, not at the deadline: {:?}",
        refused_at.elapsed()
    );

    // Every idle socket is closed by the deadline (1.5 s), none before.
    let mut closing = JoinSet::new();
    for s in crowd.into_iter().chain(of_one_peer) {
        closing.spawn(closed_by_peer(s, Duration::from_secs(10)));
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        closed += usize::from(done.unwrap());
    }
    let all_closed = opened.elapsed();
    assert_eq!(closed, 364, "every idle socket was closed");
    assert!(
        all_closed >= Duration::from_millis(1400) && all_closed < Duration::from_secs(6),
        "closed at the handshake deadline: {all_closed:?}"
    );
    // Their places are given back: the peer that was full is served again.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 9], 0).into()).unwrap();
    let stream = socket
        .connect(([127, 0, 0, 1], gateway.port).into())
        .await
        .unwrap();
    let (h2, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    h2.ready()
        .await
        .expect("a place again after the others closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_house_of_silent_connections_makes_room_for_a_client_that_speaks() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    // The default handshake deadline (10 s) is far beyond this test.
    let gateway = Gateway::start(&url, &[("VERDICT_MAX_CONNECTIONS", "100")]).await;

    let opened = Instant::now();
    let crowd = idle_crowd(gateway.port).await;
    let took = best_call(&gateway.url(), &token, None).await;
    eprintln!("at the connection cap, a new connection and call took {took:?}");
    assert!(took < Duration::from_millis(100), "{took:?}");

    // The cap held: of 300 silent sockets at most 100 are still open, long
    // before their deadline.
    let mut closing = JoinSet::new();
    for s in crowd {
        closing.spawn(closed_by_peer(s, Duration::from_millis(500)));
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        closed += usize::from(done.unwrap());
    }
    assert!(opened.elapsed() < Duration::from_secs(5));
    assert!(
        closed >= 200,
        "only {closed} of 300 silent sockets were closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_do_not_keep_tls_clients_out() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let _serial = SERIAL.lock().await;
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "hostile-net CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("s.pem"), dir.path().join("s.key"));
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();

    let (_, url) = create_database().await;
    let token = create_token(&url);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let gateway = Gateway::start_tls(
        &url,
        Some(tls.clone()),
        &[
            ("VERDICT_TLS_CERT", cert_path.to_str().unwrap()),
            ("VERDICT_TLS_KEY", key_path.to_str().unwrap()),
            ("VERDICT_HANDSHAKE_TIMEOUT_MS", "1500"),
        ],
    )
    .await;
    let tls_url = format!("https://127.0.0.1:{}", gateway.port);

    let opened = Instant::now();
    let crowd = idle_crowd(gateway.port).await;
    let took = best_call(&tls_url, &token, Some(tls.clone())).await;
    eprintln!("TLS: with 300 idle sockets open, a new connection and call took {took:?}");
    assert!(took < Duration::from_millis(100), "{took:?}");

    let mut closing = JoinSet::new();
    for s in crowd {
        closing.spawn(closed_by_peer(s, Duration::from_secs(10)));
    }
    let mut closed = 0;
    while let Some(done) = closing.join_next().await {
        closed += usize::from(done.unwrap());
    }
    assert_eq!(closed, 300);
    let all_closed = opened.elapsed();
    assert!(
        all_closed >= Duration::from_millis(1400) && all_closed < Duration::from_secs(6),
        "{all_closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_at_most_max_concurrent_streams_open_calls() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    let gateway = Gateway::start(&url, &[("VERDICT_MAX_STREAMS_PER_CONNECTION", "100")]).await;

    let tcp = TcpStream::connect(("127.0.0.1", gateway.port))
        .await
        .unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let mut conn = Box::pin(conn);
    // The server's SETTINGS arrive with the handshake.
    let advertised = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| {
            let _ = conn.as_mut().poll(cx);
            match conn.max_concurrent_send_streams() {
                usize::MAX => std::task::Poll::Pending,
                n => std::task::Poll::Ready(n),
            }
        }),
    )
    .await
    .expect("SETTINGS received");
    assert_eq!(advertised, 100);
    tokio::spawn(conn);

    // 100 calls whose request never ends stay open...
    let request = || {
        http::Request::post(format!(
            "http://127.0.0.1:{}/verdict.v1.SessionService/ListSessions",
            gateway.port
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap()
    };
    let mut open = Vec::new();
    let mut client = client;
    for _ in 0..100 {
        client = client.ready().await.unwrap();
        let (response, send) = client.send_request(request(), false).unwrap();
        open.push((response, send));
    }
    let first = tokio::time::timeout(Duration::from_millis(300), &mut open[0].0).await;
    assert!(first.is_err(), "the first 100 calls stay open: {first:?}");
    // ...a 101st is never served while they are: the client holds it back,
    // or the server refuses it (REFUSED_STREAM).
    client = client.ready().await.unwrap();
    let (held_back, _send) = client.send_request(request(), false).unwrap();
    match tokio::time::timeout(Duration::from_millis(500), held_back).await {
        Err(_) => {}
        Ok(Err(e)) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e:?}"),
        Ok(Ok(r)) => panic!("a 101st call was served: {r:?}"),
    }
}

/// Encodes already-encoded protobuf bytes as they are.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct NoDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = NoDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> NoDecoder {
        NoDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for NoDecoder {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        Ok(Some(()))
    }
}

/// The fields named by the violations of a status.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_million_empty_items_are_refused_without_being_decoded() {
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    let gateway = Gateway::start(&url, &[]).await;
    let channel = gateway.channel().await;
    // (path, tag of the repeated `items` field).
    for (path, tag) in [
        ("/verdict.v1.TestCaseService/RecordExecutions", 0x12u8),
        ("/verdict.v1.DiscrepancyService/RecordDiscrepancies", 0x1a),
    ] {
        let mut message = Vec::with_capacity(4_000_000);
        for _ in 0..2_000_000 {
            message.extend_from_slice(&[tag, 0]);
        }
        let hwm = gateway.status_kb("VmHWM:");
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                authed(message, &token),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .unwrap_err();
        let hwm_after = gateway.status_kb("VmHWM:");
        eprintln!("{path}: 4 MB of empty items, peak RSS {hwm} -> {hwm_after} kB");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), ["items"]);
        assert!(
            hwm_after < hwm + 5 * 4 * 1024,
            "peak RSS rose from {hwm} to {hwm_after} kB for a 4 MB request"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_level_prints_statement_parameters_or_database_passwords() {
    let _serial = SERIAL.lock().await;
    let (name, url) = create_database().await;
    // The test server trusts local connections: any password is accepted
    // unread, so the gateway must only never show it.
    let field = |key: &str| {
        url.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
            .unwrap()
    };
    let (host, port, user) = (field("host"), field("port"), field("user"));
    let forms = [
        (
            format!("{url} password=kv-hunter2-secret"),
            "kv-hunter2-secret",
            "trace",
        ),
        (
            format!(
                "postgres://{user}@/{name}?host={host}&port={port}&password=query-hunter2-secret"
            ),
            "query-hunter2-secret",
            "debug",
        ),
        (
            format!("postgres://{user}:userinfo-hunter2-secret@/{name}?host={host}&port={port}"),
            "userinfo-hunter2-secret",
            "trace",
        ),
    ];
    for (database_url, password, level) in forms {
        let (stdout, key_log) = run_command(
            &database_url,
            &[
                "keys",
                "create",
                "--name",
                "secretive",
                "--scopes",
                "read,write",
            ],
            &[("RUST_LOG", level)],
        );
        let token = stdout.trim().to_owned();
        let gateway = Gateway::start(&database_url, &[("RUST_LOG", level)]).await;
        let marker = format!("MARKER-{}", uuid::Uuid::new_v4().simple());
        let mut sessions = SessionServiceClient::new(gateway.channel().await);
        sessions
            .create_session(authed(
                CreateSessionRequest {
                    request_id: marker.clone(),
                    source_technology: "cobol".into(),
                    target_technology: "java".into(),
                    validation_scope: format!("scope {marker}"),
                    ..Default::default()
                },
                &token,
            ))
            .await
            .unwrap();
        let log = gateway.log_text();
        drop(gateway);
        assert!(log.len() > 1000, "{level} logs were written");
        for text in [&log, &key_log] {
            assert!(!text.contains(password), "{level}: the password was logged");
            assert!(
                !text.contains(&marker),
                "{level}: a parameter value was logged"
            );
        }
        assert!(
            !log.contains(&token[3..]),
            "{level}: the API key was logged"
        );
    }
}

/// `{"l": [empty; n]}`: about 2 bytes per value on the wire.
fn empty_list_values(n: usize) -> prost_types::Struct {
    use prost_types::value::Kind;
    prost_types::Struct {
        fields: [(
            "l".to_string(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![prost_types::Value::default(); n],
                })),
            },
        )]
        .into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millions_of_nested_empty_values_are_refused_without_being_decoded() {
    use prost::Message;
    use verdict::proto::test_case_service_client::TestCaseServiceClient;
    use verdict::proto::{
        CreateTestCaseRequest, ExecutionInput, ExecutionStatus, RecordExecutionsRequest,
        execution_input,
    };
    let _serial = SERIAL.lock().await;
    let (_, url) = create_database().await;
    let token = create_token(&url);
    let gateway = Gateway::start(&url, &[]).await;
    let channel = gateway.channel().await;
    // A session config of 1.9 million empty list values (3.8 MB), and an
    // execution whose interaction log holds 1.9 million empty steps.
    let session = CreateSessionRequest {
        request_id: "nested".into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        config: Some(empty_list_values(1_900_000).into()),
        ..Default::default()
    }
    .encode_to_vec();
    let executions = RecordExecutionsRequest {
        batch_id: "nested".into(),
        items: vec![ExecutionInput {
            interaction_log: vec![prost_types::Struct::default().into(); 1_900_000],
            ..Default::default()
        }],
    }
    .encode_to_vec();
    for (path, message, field) in [
        (
            "/verdict.v1.SessionService/CreateSession",
            session,
            "config",
        ),
        (
            "/verdict.v1.TestCaseService/RecordExecutions",
            executions,
            "items",
        ),
    ] {
        let size_kb = message.len() as u64 / 1024;
        assert!(message.len() < 4 * 1024 * 1024, "{path}: under the limit");
        let hwm = gateway.status_kb("VmHWM:");
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                authed(message, &token),
                PathAndQuery::from_static(path),
                RawCodec,
            )
            .await
            .unwrap_err();
        let hwm_after = gateway.status_kb("VmHWM:");
        eprintln!("{path}: {size_kb} kB of nested empty values, peak RSS {hwm} -> {hwm_after} kB");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), [field], "{status:?}");
        assert!(
            hwm_after < hwm + 5 * size_kb,
            "{path}: peak RSS rose from {hwm} to {hwm_after} kB for a {size_kb} kB request"
        );
    }

    // Large but legitimate requests still pass: 1,000 executions with a
    // 80-step log each (3.6 MB), and a session whose
    // three JSON fields hold 5,000 numbers each.
    let mut test_cases = TestCaseServiceClient::new(channel.clone());
    test_cases
        .create_test_case(authed(
            CreateTestCaseRequest {
                key: "legit".into(),
                name: "legit".into(),
                test_type: 1,
                target_subsystem: "io".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("create the test case");
    let text = |t: String| prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(t)),
    };
    let items: Vec<ExecutionInput> = (0..1_000)
        .map(|i| ExecutionInput {
            test_case: Some(execution_input::TestCase::TestCaseKey("legit".into())),
            status: ExecutionStatus::Passed as i32,
            started_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i,
                nanos: 0,
            }),
            duration_ms: 5,
            interaction_log: (0..80)
                .map(|s| {
                    prost_types::Struct {
                        fields: [
                            ("action".to_string(), text("click".into())),
                            ("target".to_string(), text(format!("#button-{s}"))),
                        ]
                        .into(),
                    }
                    .into()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let request = RecordExecutionsRequest {
        batch_id: "legit".into(),
        items,
    };
    eprintln!("legit RecordExecutions: {} bytes", request.encoded_len());
    let recorded = test_cases
        .record_executions(authed(request, &token))
        .await
        .expect("a large legitimate batch is accepted")
        .into_inner();
    assert_eq!(recorded.ids.len(), 1_000);
    let numbers = || {
        let mut s = empty_list_values(0);
        if let Some(prost_types::Value {
            kind: Some(prost_types::value::Kind::ListValue(l)),
        }) = s.fields.get_mut("l")
        {
            l.values = vec![
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(0.25)),
                };
                5_000
            ];
        }
        Some(s.into())
    };
    SessionServiceClient::new(channel)
        .create_session(authed(
            CreateSessionRequest {
                request_id: "legit".into(),
                source_technology: "cobol".into(),
                target_technology: "java".into(),
                validation_scope: "full".into(),
                config: numbers(),
                input_refs: numbers(),
                metadata: numbers(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("a session with large JSON fields is accepted");
}
