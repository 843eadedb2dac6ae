//! Operator metrics: RPC calls and latency by method and status code, pool
//! size/available/waiting, statement timeouts, ingested rows. Recorded once
//! here; exported over OTLP (through the global meter, when an endpoint is
//! configured) and served as Prometheus text on a separate admin port (when
//! `VERDICT_METRICS_LISTEN` is set).

use crate::db::Db;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{exemplar, metric};
use prost::Message as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 13] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histo {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
    /// The last sampled measurement that fell into each bucket (the last
    /// one is `+Inf`): one per bucket per series, so memory is bounded by
    /// the series, which are bounded by their label values.
    exemplars: [Option<Exemplar>; BUCKETS.len() + 1],
}

/// A measurement that stands for its histogram bucket: its value, when it
/// was taken, and the trace and span it was taken in (a sampled one), so a
/// slow bucket leads to a trace. The OpenTelemetry SDK (0.33) aggregates
/// no exemplars (every data point it builds has none), so the gateway keeps
/// its own, next to the counts it renders for Prometheus, and adds them to
/// the OTLP export ([`attach_exemplars`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub value: f64,
    pub time: SystemTime,
}

impl Exemplar {
    /// An exemplar for `value` measured inside `span`, when that span is
    /// part of a sampled trace (nothing is exported for an unsampled one,
    /// so an exemplar would lead nowhere).
    pub fn in_span(span: &tracing::Span, value: f64) -> Option<Exemplar> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let otel = context.span();
        let ids = otel.span_context();
        (ids.is_valid() && ids.is_sampled()).then(|| Exemplar {
            trace_id: ids.trace_id().to_bytes(),
            span_id: ids.span_id().to_bytes(),
            value,
            time: SystemTime::now(),
        })
    }

    /// An exemplar for `value` measured in the current span.
    fn here(value: f64) -> Option<Exemplar> {
        Self::in_span(&tracing::Span::current(), value)
    }

    fn unix_nanos(&self) -> u64 {
        self.time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

struct Otel {
    rpc_duration: Histogram<f64>,
    db_duration: Histogram<f64>,
    statement_timeouts: Counter<u64>,
    reads_batched: Counter<u64>,
    reads_sent_again: Counter<u64>,
    ingest_rows: Counter<u64>,
    pool_wait: Histogram<f64>,
    pool_timeouts: Counter<u64>,
    job_runs: Counter<u64>,
    job_duration: Histogram<f64>,
    cleanup_rows: Counter<u64>,
    integrity_findings: Counter<u64>,
    dropped_spans: Counter<u64>,
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
    /// Reads written behind one Sync with others (`db::coalesce`).
    reads_batched: AtomicU64,
    /// Reads sent again after an earlier read of their batch failed.
    reads_sent_again: AtomicU64,
    /// Waits for a pooled connection (one series, no labels).
    pool_wait: Mutex<BTreeMap<[&'static str; 1], Histo>>,
    pool_timeouts: AtomicU64,
    ingest_rows: Mutex<BTreeMap<&'static str, u64>>,
    cleanup_rows: Mutex<BTreeMap<&'static str, u64>>,
    integrity_findings: Mutex<BTreeMap<&'static str, u64>>,
    /// Spans lost on their way to the collector, by [`SpanDrop`].
    dropped_spans: [AtomicU64; SpanDrop::ALL.len()],
    otel: Otel,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let meter = opentelemetry::global::meter("verdict");
    Registry {
        rpcs: Mutex::new(BTreeMap::new()),
        statements: Mutex::new(BTreeMap::new()),
        jobs: Mutex::new(BTreeMap::new()),
        statement_timeouts: AtomicU64::new(0),
        reads_batched: AtomicU64::new(0),
        reads_sent_again: AtomicU64::new(0),
        pool_wait: Mutex::new(BTreeMap::new()),
        pool_timeouts: AtomicU64::new(0),
        ingest_rows: Mutex::new(BTreeMap::new()),
        cleanup_rows: Mutex::new(BTreeMap::new()),
        integrity_findings: Mutex::new(BTreeMap::new()),
        dropped_spans: Default::default(),
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
            reads_batched: meter
                .u64_counter("verdict.db.reads_batched")
                .with_description("Reads by key written behind one Sync with others")
                .build(),
            reads_sent_again: meter
                .u64_counter("verdict.db.reads_sent_again")
                .with_description(
                    "Batched reads sent again because an earlier read of their batch failed",
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
            dropped_spans: {
                let counter = meter
                    .u64_counter("verdict.telemetry.dropped_spans")
                    .with_unit("{span}")
                    .with_description(
                        "Finished spans that never reached the collector, by error.type",
                    )
                    .build();
                // Every reason is a series from the start: an alert on an
                // increase needs the zero before it.
                for reason in SpanDrop::ALL {
                    counter.add(0, &[reason.attribute()]);
                }
                counter
            },
        },
    }
});

/// Why a finished span never reached the collector: the `error.type` of
/// `verdict.telemetry.dropped_spans`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanDrop {
    /// The export queue was full (the collector is slow or unreachable and
    /// the queue filled up): the span was never queued.
    QueueFull,
    /// The collector refused its batch, or could not be reached within the
    /// export timeout.
    ExportFailed,
    /// Still queued when the shutdown grace period ran out.
    Shutdown,
}

impl SpanDrop {
    pub const ALL: [SpanDrop; 3] = [
        SpanDrop::QueueFull,
        SpanDrop::ExportFailed,
        SpanDrop::Shutdown,
    ];

    /// The `error.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SpanDrop::QueueFull => "queue_full",
            SpanDrop::ExportFailed => "export_failed",
            SpanDrop::Shutdown => "shutdown",
        }
    }

    fn attribute(self) -> KeyValue {
        KeyValue::new("error.type", self.as_str())
    }
}

/// Records `n` spans lost for `reason`.
pub fn spans_dropped(reason: SpanDrop, n: u64) {
    if n == 0 {
        return;
    }
    let r = &*REGISTRY;
    r.dropped_spans[reason as usize].fetch_add(n, Ordering::Relaxed);
    r.otel.dropped_spans.add(n, &[reason.attribute()]);
}

/// Spans lost for `reason` since the process started.
pub fn dropped_spans(reason: SpanDrop) -> u64 {
    REGISTRY.dropped_spans[reason as usize].load(Ordering::Relaxed)
}

fn observe<K: Labels>(
    map: &Mutex<BTreeMap<K, Histo>>,
    key: K,
    secs: f64,
    exemplar: Option<Exemplar>,
) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    let h = map.entry(key).or_default();
    h.count += 1;
    h.sum += secs;
    let bucket = BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BUCKETS.len());
    if let Some(n) = h.counts.get_mut(bucket) {
        *n += 1;
    }
    if exemplar.is_some() {
        h.exemplars[bucket] = exemplar;
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
/// `rpc.response.status_code`, and the call's `span` as the exemplar of its
/// bucket when its trace is sampled.
pub fn rpc_finished(method: &str, code: i32, elapsed: Duration, span: &tracing::Span) {
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
    observe(
        &r.rpcs,
        ["grpc", method, code],
        secs,
        Exemplar::in_span(span, secs),
    );
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
    observe(
        &r.statements,
        (op, collection, error.map(Box::from)),
        secs,
        Exemplar::here(secs),
    );
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
    let secs = elapsed.as_secs_f64();
    observe(&r.jobs, [job, outcome], secs, Exemplar::here(secs));
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
    let secs = waited.as_secs_f64();
    observe(&r.pool_wait, [POOL_NAME], secs, Exemplar::here(secs));
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

/// Records `n` reads written behind one Sync with others.
pub fn reads_batched(n: u64) {
    REGISTRY.reads_batched.fetch_add(n, Ordering::Relaxed);
    REGISTRY.otel.reads_batched.add(n, &[]);
}

/// Records `n` batched reads sent again after an earlier one failed.
pub fn reads_sent_again(n: u64) {
    REGISTRY.reads_sent_again.fetch_add(n, Ordering::Relaxed);
    REGISTRY.otel.reads_sent_again.add(n, &[]);
}

/// (reads batched, reads sent again) since the process started.
pub fn batched_reads() -> (u64, u64) {
    (
        REGISTRY.reads_batched.load(Ordering::Relaxed),
        REGISTRY.reads_sent_again.load(Ordering::Relaxed),
    )
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

/// A histogram family: its OTLP name and attributes, and the Prometheus
/// name, whose labels are the attributes with dots as underscores.
struct HistogramFamily {
    otlp: &'static str,
    prom: &'static str,
    help: &'static str,
    attributes: &'static [&'static str],
}

const RPC_DURATION: HistogramFamily = HistogramFamily {
    otlp: "rpc.server.call.duration",
    prom: "rpc_server_call_duration_seconds",
    help: "Duration of gRPC calls served.",
    attributes: &["rpc.system.name", "rpc.method", "rpc.response.status_code"],
};

const DB_DURATION: HistogramFamily = HistogramFamily {
    otlp: "db.client.operation.duration",
    prom: "db_client_operation_duration_seconds",
    help: "Duration of database statements.",
    attributes: &[
        "db.system.name",
        "db.operation.name",
        "db.collection.name",
        "error.type",
    ],
};

const POOL_WAIT: HistogramFamily = HistogramFamily {
    otlp: "db.client.connection.wait_time",
    prom: "db_client_connection_wait_time_seconds",
    help: "Time calls waited for a pooled connection.",
    attributes: &["db.client.connection.pool.name"],
};

const JOB_DURATION: HistogramFamily = HistogramFamily {
    otlp: "verdict.job.duration",
    prom: "verdict_job_duration_seconds",
    help: "Duration of background job runs.",
    attributes: &["job", "outcome"],
};

/// The exemplars of every series of a histogram, by the series' label
/// values (in the order of the family's attributes, `""` for absent).
type ExemplarsByLabels = HashMap<Vec<String>, [Option<Exemplar>; BUCKETS.len() + 1]>;

fn exemplars_of<K: Labels>(series: &Mutex<BTreeMap<K, Histo>>) -> ExemplarsByLabels {
    series
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, h)| h.exemplars.iter().any(Option::is_some))
        .map(|(k, h)| {
            (
                k.values().into_iter().map(str::to_owned).collect(),
                h.exemplars,
            )
        })
        .collect()
}

/// Adds the gateway's exemplars to the histogram data points of an OTLP
/// metrics export built by the SDK (which has none): each data point gets
/// the exemplar of every bucket of its series that has one.
pub fn attach_exemplars(request: &mut ExportMetricsServiceRequest) {
    let r = &*REGISTRY;
    let mut families: Vec<(&HistogramFamily, Option<ExemplarsByLabels>)> = vec![
        (&RPC_DURATION, None),
        (&DB_DURATION, None),
        (&POOL_WAIT, None),
        (&JOB_DURATION, None),
    ];
    for m in request
        .resource_metrics
        .iter_mut()
        .flat_map(|r| r.scope_metrics.iter_mut())
        .flat_map(|s| s.metrics.iter_mut())
    {
        let Some(metric::Data::Histogram(histogram)) = &mut m.data else {
            continue;
        };
        let Some((family, cached)) = families.iter_mut().find(|(f, _)| f.otlp == m.name) else {
            continue;
        };
        let by_labels = cached.get_or_insert_with(|| match family.otlp {
            "rpc.server.call.duration" => exemplars_of(&r.rpcs),
            "db.client.operation.duration" => exemplars_of(&r.statements),
            "db.client.connection.wait_time" => exemplars_of(&r.pool_wait),
            _ => exemplars_of(&r.jobs),
        });
        for point in &mut histogram.data_points {
            let values: Vec<String> = family
                .attributes
                .iter()
                .map(|name| {
                    point
                        .attributes
                        .iter()
                        .find(|kv| kv.key == *name)
                        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                        .map_or_else(String::new, |v| match v {
                            any_value::Value::StringValue(s) => s.clone(),
                            _ => String::new(),
                        })
                })
                .collect();
            // The statement series names the database system; the others
            // have every label the data point has.
            let Some(exemplars) = by_labels.get(&values) else {
                continue;
            };
            point.exemplars = exemplars
                .iter()
                .flatten()
                .map(|e| opentelemetry_proto::tonic::metrics::v1::Exemplar {
                    filtered_attributes: Vec::new(),
                    time_unix_nano: e.unix_nanos(),
                    span_id: e.span_id.to_vec(),
                    trace_id: e.trace_id.to_vec(),
                    value: Some(exemplar::Value::AsDouble(e.value)),
                })
                .collect();
        }
    }
}

/// The exposition formats of `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (no exemplars).
    Text,
    /// OpenMetrics 1.0 text, with exemplars on histogram buckets.
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header: OpenMetrics
    /// when it accepts `application/openmetrics-text` (with a non-zero
    /// quality), else the Prometheus text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                parts
                    .next()
                    .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"))
                    && !parts.any(|p| {
                        p.strip_prefix("q=")
                            .and_then(|q| q.parse::<f64>().ok())
                            .is_some_and(|q| q <= 0.0)
                    })
            })
        });
        if wants {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Writes metric families in one [`Format`].
struct Exposition {
    format: Format,
    out: String,
}

impl Exposition {
    /// The `HELP` and `TYPE` lines of a family. `name` is the family name:
    /// a counter's without `_total`, which the Prometheus text format adds
    /// to the family name and OpenMetrics only to the sample name.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let suffix = if kind == "counter" && self.format == Format::Text {
            "_total"
        } else {
            ""
        };
        let _ = writeln!(
            self.out,
            "# HELP {name}{suffix} {help}\n# TYPE {name}{suffix} {kind}"
        );
    }

    /// One sample; `labels` are `k="v"` pairs joined by commas.
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    /// One histogram family; buckets carry their exemplars in OpenMetrics.
    fn histograms<K: Labels>(
        &mut self,
        family: &HistogramFamily,
        series: &Mutex<BTreeMap<K, Histo>>,
    ) {
        let name = family.prom;
        self.family(name, "histogram", family.help);
        for (key, h) in series.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let labels: Vec<String> = family
                .attributes
                .iter()
                .zip(key.values())
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("{}=\"{v}\"", k.replace('.', "_")))
                .collect();
            let labels = labels.join(",");
            let sep = if labels.is_empty() { "" } else { "," };
            let mut cumulative = 0;
            for (i, bound) in BUCKETS
                .iter()
                .map(|b| b.to_string())
                .chain(["+Inf".to_owned()])
                .enumerate()
            {
                cumulative = h.counts.get(i).map_or(h.count, |n| cumulative + n);
                let _ = write!(
                    self.out,
                    "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
                );
                if self.format == Format::OpenMetrics
                    && let Some(e) = &h.exemplars[i]
                {
                    let nanos = e.unix_nanos();
                    let _ = write!(
                        self.out,
                        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {}.{:09}",
                        hex(&e.trace_id),
                        hex(&e.span_id),
                        e.value,
                        nanos / 1_000_000_000,
                        nanos % 1_000_000_000
                    );
                }
                self.out.push('\n');
            }
            self.sample(&format!("{name}_sum"), &labels, h.sum);
            self.sample(&format!("{name}_count"), &labels, h.count);
        }
    }

    /// One counter family with one label.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &Mutex<BTreeMap<&'static str, u64>>,
    ) {
        self.family(name, "counter", help);
        for (k, n) in values.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            self.sample(&format!("{name}_total"), &format!("{label}=\"{k}\""), n);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The exposition of every metric: the OTLP names with dots as
/// underscores, the unit (`_seconds`) and `_total` on counters, as the
/// OpenTelemetry-to-Prometheus translation names them.
pub fn render_prometheus(db: &Db, format: Format) -> String {
    let mut w = Exposition {
        format,
        out: String::new(),
    };
    let r = &*REGISTRY;
    w.histograms(&RPC_DURATION, &r.rpcs);
    w.histograms(&DB_DURATION, &r.statements);
    w.histograms(&POOL_WAIT, &r.pool_wait);
    w.histograms(&JOB_DURATION, &r.jobs);
    w.family("verdict_job_runs", "counter", "Background job runs.");
    for (values, h) in r.jobs.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        w.sample(
            "verdict_job_runs_total",
            &format!("job=\"{}\",outcome=\"{}\"", values[0], values[1]),
            h.count,
        );
    }
    w.family(
        "verdict_job_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last run of a job that did not fail.",
    );
    for (job, t) in LAST_SUCCESS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        w.sample(
            "verdict_job_last_success_timestamp_seconds",
            &format!("job=\"{job}\""),
            t,
        );
    }
    let health = DB_HEALTH.load(Ordering::Relaxed);
    if health < 4 {
        w.family(
            "verdict_db_reachable",
            "gauge",
            "Whether the health probe reached PostgreSQL (1) or not (0).",
        );
        w.sample("verdict_db_reachable", "", health & 1);
        w.family(
            "verdict_db_serving",
            "gauge",
            "Whether the pool could get a connection at the last probe.",
        );
        w.sample("verdict_db_serving", "", health >> 1 & 1);
    }
    let s = db.stats();
    let pool = format!("db_client_connection_pool_name=\"{POOL_NAME}\"");
    let idle = s.available as i64;
    let used = (s.size as i64 - idle).max(0);
    w.family(
        "db_client_connection_count",
        "gauge",
        "Open pooled connections, by state.",
    );
    for (state, v) in [("idle", idle), ("used", used)] {
        w.sample(
            "db_client_connection_count",
            &format!("{pool},db_client_connection_state=\"{state}\""),
            v,
        );
    }
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
        w.family(name, "gauge", help);
        w.sample(name, &pool, v);
    }
    w.family(
        "db_client_connection_timeouts",
        "counter",
        "Waits for a pooled connection that timed out.",
    );
    w.sample(
        "db_client_connection_timeouts_total",
        &pool,
        r.pool_timeouts.load(Ordering::Relaxed),
    );
    w.family(
        "verdict_db_statement_timeouts",
        "counter",
        "Statements cancelled by their timeout.",
    );
    w.sample(
        "verdict_db_statement_timeouts_total",
        "",
        r.statement_timeouts.load(Ordering::Relaxed),
    );
    w.family(
        "verdict_db_reads_batched",
        "counter",
        "Reads by key written behind one Sync with others.",
    );
    w.sample(
        "verdict_db_reads_batched_total",
        "",
        r.reads_batched.load(Ordering::Relaxed),
    );
    w.family(
        "verdict_db_reads_sent_again",
        "counter",
        "Batched reads sent again because an earlier read of their batch failed.",
    );
    w.sample(
        "verdict_db_reads_sent_again_total",
        "",
        r.reads_sent_again.load(Ordering::Relaxed),
    );
    w.counters(
        "verdict_ingest_rows",
        "Rows written by batch and stream ingest.",
        "kind",
        &r.ingest_rows,
    );
    w.counters(
        "verdict_cleanup_deleted_rows",
        "Rows deleted by cleanup, by table.",
        "db_collection_name",
        &r.cleanup_rows,
    );
    w.counters(
        "verdict_integrity_findings",
        "Rows found by integrity checks, by check.",
        "check",
        &r.integrity_findings,
    );
    w.family(
        "verdict_telemetry_dropped_spans",
        "counter",
        "Finished spans that never reached the collector: queue_full, export_failed or shutdown.",
    );
    for reason in SpanDrop::ALL {
        w.sample(
            "verdict_telemetry_dropped_spans_total",
            &format!("error_type=\"{}\"", reason.as_str()),
            dropped_spans(reason),
        );
    }
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// Longest request head `/metrics` reads.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves `GET /metrics` on the admin listener until the task is dropped:
/// OpenMetrics (with exemplars) when the scraper's `Accept` asks for
/// `application/openmetrics-text`, else the Prometheus text format.
/// Anything else gets 404.
pub async fn serve_prometheus(listener: TcpListener, db: Db) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let db = db.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                std::io::Result::Ok(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&head);
            let response = if head.starts_with("GET /metrics ") {
                let accept = head.lines().skip(1).find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("accept")
                        .then_some(value.trim())
                });
                let format = Format::negotiate(accept);
                let body = render_prometheus(&db, format);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    format.content_type(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_only_when_the_scraper_accepts_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0,text/plain")),
            Format::Text
        );
    }

    #[test]
    fn an_exemplar_is_kept_per_bucket_and_the_latest_wins() {
        let series: Mutex<BTreeMap<[&'static str; 1], Histo>> = Mutex::new(BTreeMap::new());
        let at = |trace: u8, value: f64| Exemplar {
            trace_id: [trace; 16],
            span_id: [trace; 8],
            value,
            time: SystemTime::now(),
        };
        observe(&series, ["a"], 0.003, Some(at(1, 0.003)));
        observe(&series, ["a"], 0.004, Some(at(2, 0.004)));
        observe(&series, ["a"], 0.004, None);
        observe(&series, ["a"], 60.0, Some(at(3, 60.0)));
        let map = series.lock().unwrap();
        let h = &map[&["a"]];
        assert_eq!(h.count, 4);
        // 0.003 and 0.004 fall into le=0.005 (index 3); the unsampled one
        // keeps the last sampled exemplar; 60 s is in +Inf.
        assert_eq!(h.exemplars[3].map(|e| e.trace_id[0]), Some(2));
        assert_eq!(h.exemplars[BUCKETS.len()].map(|e| e.value), Some(60.0));
        assert_eq!(h.exemplars.iter().flatten().count(), 2);
    }

    #[test]
    fn no_exemplar_outside_a_traced_span() {
        assert_eq!(Exemplar::in_span(&tracing::Span::none(), 1.0), None);
        assert_eq!(Exemplar::here(1.0), None);
    }
}
