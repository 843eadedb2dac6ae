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
    db_duration: Histogram<f64>,
    statement_timeouts: Counter<u64>,
    ingest_rows: Counter<u64>,
    pool_wait: Histogram<f64>,
    pool_timeouts: Counter<u64>,
    job_runs: Counter<u64>,
    job_duration: Histogram<f64>,
    cleanup_rows: Counter<u64>,
    integrity_findings: Counter<u64>,
}

/// The label values of a series, in the order of its label names; empty
/// values are left out.
trait Labels: Ord {
    fn values(&self) -> Vec<&str>;
}

impl<const N: usize> Labels for [&'static str; N] {
    fn values(&self) -> Vec<&str> {
        self.to_vec()
    }
}

/// A statement series: operation, collection and error type. Only a failed
/// statement's key allocates.
type StmtKey = (&'static str, Option<&'static str>, Option<Box<str>>);

impl Labels for StmtKey {
    fn values(&self) -> Vec<&str> {
        vec![
            "postgresql",
            self.0,
            self.1.unwrap_or(""),
            self.2.as_deref().unwrap_or(""),
        ]
    }
}

struct Registry {
    /// Keyed by a method of [`known_methods`] (or [`OTHER_METHOD`]) and a
    /// status code name: the map cannot grow with what callers send.
    rpcs: Mutex<BTreeMap<[&'static str; 3], Histo>>,
    /// Keyed by operation, collection (static statement names) and error.
    statements: Mutex<BTreeMap<StmtKey, Histo>>,
    /// Keyed by job and outcome.
    jobs: Mutex<BTreeMap<[&'static str; 2], Histo>>,
    statement_timeouts: AtomicU64,
    /// Waits for a pooled connection (one series, no labels).
    pool_wait: Mutex<BTreeMap<[&'static str; 1], Histo>>,
    pool_timeouts: AtomicU64,
    ingest_rows: Mutex<BTreeMap<&'static str, u64>>,
    cleanup_rows: Mutex<BTreeMap<&'static str, u64>>,
    integrity_findings: Mutex<BTreeMap<&'static str, u64>>,
    otel: Otel,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("verdict");
    Registry {
        rpcs: Mutex::new(BTreeMap::new()),
        statements: Mutex::new(BTreeMap::new()),
        jobs: Mutex::new(BTreeMap::new()),
        statement_timeouts: AtomicU64::new(0),
        pool_wait: Mutex::new(BTreeMap::new()),
        pool_timeouts: AtomicU64::new(0),
        ingest_rows: Mutex::new(BTreeMap::new()),
        cleanup_rows: Mutex::new(BTreeMap::new()),
        integrity_findings: Mutex::new(BTreeMap::new()),
        otel: Otel {
            rpc_duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Duration of gRPC calls served, by method and status code")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            db_duration: meter
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of database statements")
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
            pool_wait: meter
                .f64_histogram("db.client.connection.wait_time")
                .with_unit("s")
                .with_description("Time calls waited for a pooled connection")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            pool_timeouts: meter
                .u64_counter("db.client.connection.timeouts")
                .with_unit("{timeout}")
                .with_description("Waits for a pooled connection that timed out")
                .build(),
            job_runs: meter
                .u64_counter("verdict.job.runs")
                .with_description("Background job runs, by job and outcome")
                .build(),
            job_duration: meter
                .f64_histogram("verdict.job.duration")
                .with_unit("s")
                .with_description("Duration of background job runs")
                .with_boundaries(BUCKETS.to_vec())
                .build(),
            cleanup_rows: meter
                .u64_counter("verdict.cleanup.deleted_rows")
                .with_description("Rows deleted by cleanup, by table")
                .build(),
            integrity_findings: meter
                .u64_counter("verdict.integrity.findings")
                .with_description("Rows found by integrity checks, by check")
                .build(),
        },
    }
});

fn observe<K: Labels>(map: &Mutex<BTreeMap<K, Histo>>, key: K, secs: f64) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    let h = map.entry(key).or_default();
    h.count += 1;
    h.sum += secs;
    if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
        h.counts[i] += 1;
    }
}

fn add(map: &Mutex<BTreeMap<&'static str, u64>>, key: &'static str, n: u64) {
    *map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_default() += n;
}

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

/// The status code name the RPC conventions record (`OK`,
/// `DEADLINE_EXCEEDED`, ...); anything outside 0..=16 is `UNKNOWN`.
pub fn grpc_code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// Records one finished RPC (`method` is the full `/pkg.Service/Method` path
/// without the leading slash; an unknown one counts as [`OTHER_METHOD`]):
/// `rpc.server.call.duration` with `rpc.system.name`, `rpc.method` and
/// `rpc.response.status_code`.
pub fn rpc_finished(method: &str, code: i32, elapsed: Duration) {
    let method = method_label(method);
    let code = grpc_code_name(code);
    let secs = elapsed.as_secs_f64();
    let r = &*REGISTRY;
    r.otel.rpc_duration.record(
        secs,
        &[
            KeyValue::new("rpc.system.name", "grpc"),
            KeyValue::new("rpc.method", method),
            KeyValue::new("rpc.response.status_code", code),
        ],
    );
    observe(&r.rpcs, ["grpc", method, code], secs);
}

/// Records one finished statement: `db.client.operation.duration` with
/// `db.system.name`, `db.operation.name`, `db.collection.name` (empty when
/// the statement names no table) and, on failure, `error.type` (the
/// SQLSTATE, or `_OTHER`).
pub fn statement_finished(
    op: &'static str,
    collection: Option<&'static str>,
    error: Option<&str>,
    elapsed: Duration,
) {
    let secs = elapsed.as_secs_f64();
    let r = &*REGISTRY;
    let system = KeyValue::new("db.system.name", "postgresql");
    let operation = KeyValue::new("db.operation.name", op);
    match (collection, error) {
        (Some(c), None) => r.otel.db_duration.record(
            secs,
            &[system, operation, KeyValue::new("db.collection.name", c)],
        ),
        (None, None) => r.otel.db_duration.record(secs, &[system, operation]),
        (c, Some(e)) => {
            let mut attrs = vec![system, operation, KeyValue::new("error.type", e.to_owned())];
            if let Some(c) = c {
                attrs.push(KeyValue::new("db.collection.name", c));
            }
            r.otel.db_duration.record(secs, &attrs);
        }
    }
    observe(&r.statements, (op, collection, error.map(Box::from)), secs);
}

/// Records one run of a background job (`rollup`, ...) with its outcome
/// (`ok`, `skipped`, `error`).
pub fn job_run(job: &'static str, outcome: &'static str, elapsed: Duration) {
    let r = &*REGISTRY;
    let attrs = [KeyValue::new("job", job), KeyValue::new("outcome", outcome)];
    r.otel.job_runs.add(1, &attrs);
    if outcome != "error" {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        LAST_SUCCESS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job, now);
    }
    r.otel.job_duration.record(elapsed.as_secs_f64(), &attrs);
    observe(&r.jobs, [job, outcome], elapsed.as_secs_f64());
}

/// Unix time of the last successful run of each job.
static LAST_SUCCESS: LazyLock<Mutex<BTreeMap<&'static str, f64>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

/// Whether the health probe reached PostgreSQL (bit 0) and whether the pool
/// could get a connection (bit 1); 4 before the first probe.
static DB_HEALTH: AtomicU64 = AtomicU64::new(4);

/// Records the health probe's latest finding.
pub fn database_reachable(reachable: bool, serving: bool) {
    DB_HEALTH.store(
        u64::from(reachable) | u64::from(serving) << 1,
        Ordering::Relaxed,
    );
}

/// Records a finished cleanup run and the rows it deleted per table.
pub fn cleanup_finished(deleted: &[(&'static str, i64)], elapsed: Duration) {
    let r = &*REGISTRY;
    for (table, n) in deleted {
        let n = u64::try_from(*n).unwrap_or(0);
        r.otel
            .cleanup_rows
            .add(n, &[KeyValue::new("db.collection.name", *table)]);
        add(&r.cleanup_rows, table, n);
    }
    job_run("cleanup", "ok", elapsed);
}

/// Records the rows an integrity check found.
pub fn integrity_findings(check: &'static str, count: i64) {
    let n = u64::try_from(count).unwrap_or(0);
    let r = &*REGISTRY;
    r.otel
        .integrity_findings
        .add(n, &[KeyValue::new("check", check)]);
    add(&r.integrity_findings, check, n);
}

/// Records one wait for a pooled connection, and whether it timed out.
pub fn pool_wait(waited: Duration, timed_out: bool) {
    let r = &*REGISTRY;
    let pool = [KeyValue::new("db.client.connection.pool.name", POOL_NAME)];
    r.otel.pool_wait.record(waited.as_secs_f64(), &pool);
    observe(&r.pool_wait, [POOL_NAME], waited.as_secs_f64());
    if timed_out {
        r.otel.pool_timeouts.add(1, &pool);
        r.pool_timeouts.fetch_add(1, Ordering::Relaxed);
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
    add(&REGISTRY.ingest_rows, kind, rows);
}

/// Where statements go, for `db.namespace`, `server.address` and
/// `server.port` on statement spans: set once, by the first gateway the
/// process starts.
pub struct DbTarget {
    pub namespace: String,
    pub address: String,
    pub port: i64,
}

static DB_TARGET: std::sync::OnceLock<DbTarget> = std::sync::OnceLock::new();

/// Records where statements go (the first call wins).
pub fn set_database(config: &tokio_postgres::Config) {
    let address = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let _ = DB_TARGET.set(DbTarget {
        namespace: config.get_dbname().unwrap_or_default().to_owned(),
        address,
        port: config.get_ports().first().copied().unwrap_or(5432).into(),
    });
}

/// Where statements go, once a gateway started.
pub fn database() -> Option<&'static DbTarget> {
    DB_TARGET.get()
}

/// `db.client.connection.pool.name` of the gateway's pool.
const POOL_NAME: &str = "verdict";

/// Observable pool gauges for OTLP, reading the pool when exported.
pub fn register_pool_gauges(db: &Db) {
    let meter = opentelemetry::global::meter("verdict");
    let pool = || KeyValue::new("db.client.connection.pool.name", POOL_NAME);
    let d = db.clone();
    let _count = meter
        .i64_observable_up_down_counter("db.client.connection.count")
        .with_unit("{connection}")
        .with_description("Open pooled connections, by state")
        .with_callback(move |o| {
            let s = d.stats();
            let idle = s.available as i64;
            let used = (s.size as i64 - idle).max(0);
            for (state, v) in [("idle", idle), ("used", used)] {
                o.observe(
                    v,
                    &[pool(), KeyValue::new("db.client.connection.state", state)],
                );
            }
        })
        .build();
    for (name, pick) in [
        ("db.client.connection.max", 0usize),
        ("db.client.connection.pending_requests", 1),
    ] {
        let d = db.clone();
        let _gauge = meter
            .i64_observable_up_down_counter(name)
            .with_callback(move |o| {
                let s = d.stats();
                let v = [s.max_size, s.waiting][pick];
                o.observe(v as i64, &[pool()]);
            })
            .build();
    }
}

/// Writes one histogram family in the Prometheus text format.
fn write_histograms<K: Labels>(
    out: &mut String,
    name: &str,
    help: &str,
    labels: &[&str],
    series: &Mutex<BTreeMap<K, Histo>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (key, h) in series.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let values = key.values();
        let labels: Vec<String> = labels
            .iter()
            .zip(values)
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        let labels = labels.join(",");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.counts) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

/// Writes one counter family with one label.
fn write_counters(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &Mutex<BTreeMap<&'static str, u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (k, n) in values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {n}");
    }
}

/// The Prometheus text exposition of every metric: the OTLP names with dots
/// as underscores, the unit (`_seconds`) and `_total` on counters, as the
/// OpenTelemetry-to-Prometheus translation names them.
pub fn render_prometheus(db: &Db) -> String {
    let mut out = String::new();
    let r = &*REGISTRY;
    write_histograms(
        &mut out,
        "rpc_server_call_duration_seconds",
        "Duration of gRPC calls served.",
        &["rpc_system_name", "rpc_method", "rpc_response_status_code"],
        &r.rpcs,
    );
    write_histograms(
        &mut out,
        "db_client_operation_duration_seconds",
        "Duration of database statements.",
        &[
            "db_system_name",
            "db_operation_name",
            "db_collection_name",
            "error_type",
        ],
        &r.statements,
    );
    write_histograms(
        &mut out,
        "db_client_connection_wait_time_seconds",
        "Time calls waited for a pooled connection.",
        &["db_client_connection_pool_name"],
        &r.pool_wait,
    );
    write_histograms(
        &mut out,
        "verdict_job_duration_seconds",
        "Duration of background job runs.",
        &["job", "outcome"],
        &r.jobs,
    );
    let _ = writeln!(
        out,
        "# HELP verdict_job_runs_total Background job runs.\n# TYPE verdict_job_runs_total counter"
    );
    for (values, h) in r.jobs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            out,
            "verdict_job_runs_total{{job=\"{}\",outcome=\"{}\"}} {}",
            values[0], values[1], h.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP verdict_job_last_success_timestamp_seconds Unix time of the last run of a job that did not fail.\n# TYPE verdict_job_last_success_timestamp_seconds gauge"
    );
    for (job, t) in LAST_SUCCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "verdict_job_last_success_timestamp_seconds{{job=\"{job}\"}} {t}"
        );
    }
    let health = DB_HEALTH.load(Ordering::Relaxed);
    if health < 4 {
        let _ = writeln!(
            out,
            "# HELP verdict_db_reachable Whether the health probe reached PostgreSQL (1) or not (0).\n# TYPE verdict_db_reachable gauge\nverdict_db_reachable {}\n\
             # HELP verdict_db_serving Whether the pool could get a connection at the last probe.\n# TYPE verdict_db_serving gauge\nverdict_db_serving {}",
            health & 1,
            health >> 1 & 1
        );
    }
    let s = db.stats();
    let pool = format!("db_client_connection_pool_name=\"{POOL_NAME}\"");
    let idle = s.available as i64;
    let used = (s.size as i64 - idle).max(0);
    let _ = writeln!(
        out,
        "# HELP db_client_connection_count Open pooled connections, by state.\n# TYPE db_client_connection_count gauge\n\
         db_client_connection_count{{{pool},db_client_connection_state=\"idle\"}} {idle}\n\
         db_client_connection_count{{{pool},db_client_connection_state=\"used\"}} {used}"
    );
    for (name, help, v) in [
        (
            "db_client_connection_max",
            "Largest pool size.",
            s.max_size as i64,
        ),
        (
            "db_client_connection_pending_requests",
            "Calls waiting for a connection.",
            s.waiting as i64,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{pool}}} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP db_client_connection_timeouts_total Waits for a pooled connection that timed out.\n# TYPE db_client_connection_timeouts_total counter\ndb_client_connection_timeouts_total{{{pool}}} {}",
        r.pool_timeouts.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP verdict_db_statement_timeouts_total Statements cancelled by their timeout.\n# TYPE verdict_db_statement_timeouts_total counter\nverdict_db_statement_timeouts_total {}",
        r.statement_timeouts.load(Ordering::Relaxed)
    );
    write_counters(
        &mut out,
        "verdict_ingest_rows_total",
        "Rows written by batch and stream ingest.",
        "kind",
        &r.ingest_rows,
    );
    write_counters(
        &mut out,
        "verdict_cleanup_deleted_rows_total",
        "Rows deleted by cleanup, by table.",
        "db_collection_name",
        &r.cleanup_rows,
    );
    write_counters(
        &mut out,
        "verdict_integrity_findings_total",
        "Rows found by integrity checks, by check.",
        "check",
        &r.integrity_findings,
    );
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
