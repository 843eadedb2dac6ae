//! Operator metrics: RPC calls and latency by method and status code, pool
//! size/available/waiting, statement timeouts, ingested rows. Recorded once
//! here; exported over OTLP (through the global meter, when an endpoint is
//! configured) and served as Prometheus text on a separate admin port (when
//! `VERDICT_METRICS_LISTEN` is set).

use crate::db::Db;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use prost::Message as _;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histo {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

struct Otel {
    rpc_duration: Histogram<f64>,
    statement_timeouts: Counter<u64>,
    ingest_rows: Counter<u64>,
}

struct Registry {
    /// Keyed by a method of [`known_methods`] (or [`OTHER_METHOD`]) and a
    /// status code in 0..=16: the map cannot grow with what callers send.
    rpcs: Mutex<BTreeMap<(&'static str, i32), Histo>>,
    statement_timeouts: AtomicU64,
    ingest_rows: Mutex<BTreeMap<&'static str, u64>>,
    otel: Otel,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("verdict");
    Registry {
        rpcs: Mutex::new(BTreeMap::new()),
        statement_timeouts: AtomicU64::new(0),
        ingest_rows: Mutex::new(BTreeMap::new()),
        otel: Otel {
            rpc_duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_description("Duration of gRPC calls served, by method and status code")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            statement_timeouts: meter
                .u64_counter("verdict.db.statement_timeouts")
                .with_description(
                    "Statements cancelled by their statement_timeout (call deadlines)",
                )
                .build(),
            ingest_rows: meter
                .u64_counter("verdict.ingest.rows")
                .with_description("Rows written by batch and stream ingest, by kind")
                .build(),
        },
    }
});

/// The label of every call to a method the gateway does not serve (a made-up
/// path, a typo), as the OpenTelemetry RPC conventions name it: metrics must
/// not grow with the paths callers invent.
pub const OTHER_METHOD: &str = "_OTHER";

/// Every `pkg.Service/Method` the gateway serves, from the descriptor set of
/// `proto/` and the health service.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
        let mut known = HashSet::new();
        for encoded in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        known.insert(format!(
                            "{package}.{service_name}/{}",
                            method.name.unwrap_or_default()
                        ));
                    }
                }
            }
        }
        known
    });
    &KNOWN
}

/// The metric label of a call path (`pkg.Service/Method`, no leading
/// slash): the path itself when the gateway serves that method, else
/// [`OTHER_METHOD`].
pub fn method_label(path: &str) -> &'static str {
    known_methods()
        .get(path)
        .map_or(OTHER_METHOD, |m| m.as_str())
}

/// Records one finished RPC (`method` is the full `/pkg.Service/Method` path
/// without the leading slash; an unknown one counts as [`OTHER_METHOD`]).
pub fn rpc_finished(method: &str, code: i32, elapsed: Duration) {
    let method = method_label(method);
    // Only the 17 gRPC codes; anything else is UNKNOWN.
    let code = if (0..=16).contains(&code) { code } else { 2 };
    let secs = elapsed.as_secs_f64();
    let r = &*REGISTRY;
    r.otel.rpc_duration.record(
        secs,
        &[
            KeyValue::new("rpc.method", method),
            KeyValue::new("rpc.grpc.status_code", i64::from(code)),
        ],
    );
    let mut rpcs = r.rpcs.lock().unwrap_or_else(|p| p.into_inner());
    let h = rpcs.entry((method, code)).or_default();
    h.count += 1;
    h.sum += secs;
    if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
        h.counts[i] += 1;
    }
}

/// Records a statement cancelled by its timeout.
pub fn statement_timeout() {
    REGISTRY.statement_timeouts.fetch_add(1, Ordering::Relaxed);
    REGISTRY.otel.statement_timeouts.add(1, &[]);
}

/// Records rows written by an ingest of `kind` (e.g. `discrepancies`).
pub fn ingest_rows(kind: &'static str, rows: u64) {
    REGISTRY
        .otel
        .ingest_rows
        .add(rows, &[KeyValue::new("kind", kind)]);
    *REGISTRY
        .ingest_rows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(kind)
        .or_default() += rows;
}

/// Observable pool gauges for OTLP, reading the pool when exported.
pub fn register_pool_gauges(db: &Db) {
    let meter = opentelemetry::global::meter("verdict");
    for (name, pick) in [
        ("verdict.db.pool.size", 0usize),
        ("verdict.db.pool.available", 1),
        ("verdict.db.pool.waiting", 2),
    ] {
        let db = db.clone();
        let _gauge = meter
            .i64_observable_gauge(name)
            .with_callback(move |o| {
                let s = db.stats();
                let v = [s.size, s.available, s.waiting][pick];
                o.observe(v as i64, &[]);
            })
            .build();
    }
}

/// The Prometheus text exposition of every metric.
pub fn render_prometheus(db: &Db) -> String {
    let mut out = String::new();
    out.push_str("# HELP verdict_rpc_server_duration_seconds Duration of gRPC calls served.\n");
    out.push_str("# TYPE verdict_rpc_server_duration_seconds histogram\n");
    for ((method, code), h) in REGISTRY
        .rpcs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let labels = format!("method=\"{method}\",code=\"{code}\"");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "verdict_rpc_server_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "verdict_rpc_server_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            out,
            "verdict_rpc_server_duration_seconds_sum{{{labels}}} {}",
            h.sum
        );
        let _ = writeln!(
            out,
            "verdict_rpc_server_duration_seconds_count{{{labels}}} {}",
            h.count
        );
    }
    let s = db.stats();
    for (name, help, v) in [
        ("verdict_db_pool_size", "Open pooled connections.", s.size),
        (
            "verdict_db_pool_available",
            "Idle pooled connections.",
            s.available,
        ),
        (
            "verdict_db_pool_waiting",
            "Calls waiting for a connection.",
            s.waiting,
        ),
        ("verdict_db_pool_max_size", "Largest pool size.", s.max_size),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP verdict_db_statement_timeouts_total Statements cancelled by their timeout.\n# TYPE verdict_db_statement_timeouts_total counter\nverdict_db_statement_timeouts_total {}",
        REGISTRY.statement_timeouts.load(Ordering::Relaxed)
    );
    out.push_str("# HELP verdict_ingest_rows_total Rows written by batch and stream ingest.\n");
    out.push_str("# TYPE verdict_ingest_rows_total counter\n");
    for (kind, n) in REGISTRY
        .ingest_rows
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(out, "verdict_ingest_rows_total{{kind=\"{kind}\"}} {n}");
    }
    out
}

/// Serves `GET /metrics` (Prometheus text) on the admin listener until the
/// task is dropped. Anything else gets 404.
pub async fn serve_prometheus(listener: TcpListener, db: Db) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let db = db.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = if head.starts_with("GET /metrics ") {
                let body = render_prometheus(&db);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
