//! Typed settings from command-line flags and the environment.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Verdict: a gRPC data-access gateway in front of PostgreSQL for QA and
/// migration-validation data.
#[derive(Parser, Debug)]
#[command(name = "verdict", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do; `serve` when none is given.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply pending migrations and exit.
    Migrate {
        /// List applied and pending migrations instead of applying them.
        #[arg(long)]
        status: bool,
    },
    /// Delete sessions (and everything of theirs) older than an age, in
    /// bounded batches, and print counts per table.
    Cleanup {
        /// Age of the sessions to delete: e.g. 30d, 12h, 90m, 45s.
        #[arg(long)]
        older_than: String,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// The slug of the project to clean; no other project is touched.
        #[arg(long, default_value = "default")]
        project: String,
    },
    /// Write one session and everything of it as JSON lines to stdout, from
    /// one consistent snapshot.
    Export {
        /// The session's id (UUID).
        session_id: String,
        /// The slug of the project the session belongs to.
        #[arg(long, default_value = "default")]
        project: String,
    },
    /// Row counts per table (one project's, or with `--all-projects` every
    /// project's with the database size) and the session age range.
    Stats {
        /// The slug of the project to count.
        #[arg(long, default_value = "default", conflicts_with = "all_projects")]
        project: String,
        /// Every project's rows (estimated unless `--exact`).
        #[arg(long)]
        all_projects: bool,
        /// With `--all-projects`, count every table exactly.
        #[arg(long)]
        exact: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Integrity checks of one project; exits with 2 when anything is found
    /// (1 when the checks cannot run).
    Check {
        /// The slug of the project to check.
        #[arg(long, default_value = "default")]
        project: String,
        /// A session PROCESSING for longer than this is stuck: e.g. 24h, 30m.
        #[arg(long, default_value = "24h")]
        stuck_after: String,
        /// Repair what can be repaired (in one transaction); the exit code
        /// still reports what was found.
        #[arg(long)]
        repair: bool,
        /// Print one JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running gateway's gRPC health endpoint; exits 0 when SERVING,
    /// 2 when it answers anything else, 1 when it cannot be reached.
    Health {
        /// The gateway's address (`host:port`, `http://host:port` or
        /// `https://host:port`); default: the listen address.
        #[arg(long)]
        addr: Option<String>,
        /// The service to ask about; empty: the whole gateway.
        #[arg(long, default_value = "")]
        service: String,
        /// PEM CA certificate to verify an `https://` gateway with.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// How long to wait for the answer (e.g. 5s, 500ms).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
        /// Print one JSON object instead of the status.
        #[arg(long)]
        json: bool,
    },
    /// Create, list and revoke API keys (applies pending migrations first).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

/// `verdict keys …`.
#[derive(Subcommand, Debug, Clone)]
pub enum KeysCommand {
    /// Create a key and print its token (shown once, never stored).
    Create {
        /// What the key is for (e.g. `ci-pipeline`).
        #[arg(long)]
        name: String,
        /// Comma-separated scopes: any of read, write, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<String>,
        /// The slug of the one project the key may use; without it the key
        /// may use every project (an operator's key).
        #[arg(long)]
        project: Option<String>,
    },
    /// List keys (ids, names, scopes, state; never secrets).
    List,
    /// Revoke a key: refused from the next call on, on every replica.
    Revoke {
        /// The key id (the 16 hex characters after `vk_`).
        id: String,
    },
}

/// Log line format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting of the gateway. Each flag can also be given by the
/// environment variable named in its help.
#[derive(Args, Clone)]
pub struct Config {
    /// PostgreSQL connection URL (`postgres://user:pass@host:port/db?sslmode=...`).
    /// When unset, Verdict starts its own PostgreSQL in the data folder
    /// (the embedded default).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Address the gRPC server listens on. Port 0 picks a free port.
    #[arg(
        long,
        env = "VERDICT_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,

    /// Address of the Prometheus scrape endpoint (`GET /metrics`), a
    /// separate admin port; off when unset.
    #[arg(long, env = "VERDICT_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,

    /// Folder of the embedded PostgreSQL (data and unix socket); used only
    /// when DATABASE_URL is unset.
    #[arg(
        long,
        env = "VERDICT_DATA_DIR",
        default_value = "./verdict-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// Maximum number of pooled PostgreSQL connections.
    #[arg(long, env = "VERDICT_POOL_SIZE", default_value_t = 16, global = true)]
    pub pool_size: usize,

    /// Connections that concurrent reads by key (GetSession)
    /// share, pipelined, on top of the pool: one is filled up to 16 reads in
    /// flight before the next is opened. 0: every read takes a pooled
    /// connection of its own.
    #[arg(
        long,
        env = "VERDICT_SHARED_READ_CONNECTIONS",
        default_value_t = 4,
        global = true
    )]
    pub shared_read_connections: usize,

    /// How long a call waits for a free pooled connection before it fails
    /// with RESOURCE_EXHAUSTED, in milliseconds.
    #[arg(
        long,
        env = "VERDICT_POOL_WAIT_TIMEOUT_MS",
        default_value_t = 2_000,
        global = true
    )]
    pub pool_wait_timeout_ms: u64,

    /// Most calls that may wait for a pooled connection at once; further
    /// calls are refused at once with RESOURCE_EXHAUSTED instead of queueing
    /// (load shedding). 0 means four times the pool size.
    #[arg(
        long,
        env = "VERDICT_POOL_MAX_WAITING",
        default_value_t = 0,
        global = true
    )]
    pub pool_max_waiting: usize,

    /// Upper bound of any statement's run time, in milliseconds. A call's
    /// deadline lowers it for that call (`SET LOCAL statement_timeout`).
    #[arg(
        long,
        env = "VERDICT_MAX_STATEMENT_TIMEOUT_MS",
        default_value_t = 30_000,
        global = true
    )]
    pub max_statement_timeout_ms: u64,

    /// Largest accepted request message, in bytes (decoded size).
    #[arg(long, env = "VERDICT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub max_message_bytes: usize,

    /// A list asked for an ESTIMATED total counts exactly instead when the
    /// planner estimates fewer rows than this (a small count is cheap and
    /// an estimate of a small table is least reliable); 0: never.
    #[arg(
        long,
        env = "VERDICT_COUNT_EXACT_BELOW",
        default_value_t = 10_000,
        global = true
    )]
    pub count_exact_below: i64,

    /// How long in-flight calls may run after SIGTERM/SIGINT before the
    /// server closes anyway, in milliseconds.
    #[arg(
        long,
        env = "VERDICT_SHUTDOWN_GRACE_MS",
        default_value_t = 20_000,
        global = true
    )]
    pub shutdown_grace_ms: u64,

    /// How often the health probe checks PostgreSQL, in milliseconds.
    #[arg(
        long,
        env = "VERDICT_HEALTH_PROBE_INTERVAL_MS",
        default_value_t = 1_000,
        global = true
    )]
    pub health_probe_interval_ms: u64,

    /// How often the gateway recomputes touched validation rollups, in
    /// seconds; 0 turns the periodic computation off. Replicas take turns
    /// through an advisory lock.
    #[arg(
        long,
        env = "VERDICT_ROLLUP_INTERVAL_SECS",
        default_value_t = 300,
        global = true
    )]
    pub rollup_interval_secs: u64,

    /// OTLP/gRPC collector endpoint for traces (e.g. `http://localhost:4317`).
    /// When unset, nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// `service.name` of exported telemetry.
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        default_value = "verdict",
        global = true
    )]
    pub service_name: String,

    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,verdict=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    pub log_filter: String,

    /// Log line format.
    #[arg(
        long,
        env = "VERDICT_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// Require API keys even when listening on loopback (authentication is
    /// always on for any other listen address).
    #[arg(long, env = "VERDICT_REQUIRE_AUTH", global = true)]
    pub require_auth: bool,

    /// Turn authentication off on any listen address. Dangerous: anyone who
    /// can reach the port can read and delete everything; logged loudly.
    #[arg(long, env = "VERDICT_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Secret that signs page tokens (HMAC-SHA256); give every replica the
    /// same. When unset, a random secret generated once in the database
    /// (shared by every replica of that database) is used.
    #[arg(
        long,
        env = "VERDICT_PAGE_TOKEN_SECRET",
        global = true,
        hide_env_values = true
    )]
    pub page_token_secret: Option<String>,

    /// PEM certificate chain of the gRPC server; with `--tls-key`, the
    /// server speaks TLS only. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "VERDICT_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "VERDICT_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to (mutual
    /// TLS); clients without a valid certificate are refused.
    #[arg(
        long,
        env = "VERDICT_TLS_CLIENT_CA",
        global = true,
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// How often the TLS files are checked for changes, in milliseconds.
    #[arg(
        long,
        env = "VERDICT_TLS_RELOAD_INTERVAL_MS",
        default_value_t = 5_000,
        global = true
    )]
    pub tls_reload_interval_ms: u64,

    /// How long a pooled PostgreSQL connection may sit unused before it is
    /// closed (e.g. `60s`, `500ms`, `5m`), so an idle replica gives its
    /// connection slots back to the others.
    #[arg(
        long,
        env = "VERDICT_POOL_IDLE_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration,
        global = true
    )]
    pub pool_idle_timeout: Duration,

    /// How long a pooled PostgreSQL connection lives at most (e.g. `30m`);
    /// older connections are closed when idle and replaced when needed.
    #[arg(
        long,
        env = "VERDICT_POOL_MAX_LIFETIME",
        default_value = "30m",
        value_parser = parse_duration,
        global = true
    )]
    pub pool_max_lifetime: Duration,
    /// Longest a stream (WatchSession, ExportSession, Ingest…) may stay
    /// open: e.g. `3600s`, `90m`, `1h`, `2d` (a bare number is seconds). At
    /// the end it closes with UNAVAILABLE, reason STREAM_LIFETIME_EXCEEDED;
    /// clients open it again (watches resume).
    #[arg(
        long,
        env = "VERDICT_MAX_STREAM_LIFETIME",
        default_value = "1h",
        value_parser = parse_duration,
        global = true
    )]
    pub max_stream_lifetime: Duration,

    /// Connections of the pool that reads API keys the verified-key cache
    /// does not hold (never the request pool); twice as many lookups may
    /// be in progress, more are refused at once for unseen key ids.
    #[arg(
        long,
        env = "VERDICT_AUTH_LOOKUP_CONNECTIONS",
        default_value_t = 2,
        global = true
    )]
    pub auth_lookup_connections: usize,

    /// Failed key lookups (unknown ids, wrong secrets, revoked keys) one
    /// client address (IPv6: its /64) may cause in a burst before it hears
    /// RESOURCE_EXHAUSTED (RATE_LIMITED).
    #[arg(
        long,
        env = "VERDICT_AUTH_FAILURE_BURST",
        default_value_t = 20,
        global = true
    )]
    pub auth_failure_burst: u32,

    /// Failed key lookups per second one client address may cause, sustained.
    #[arg(
        long,
        env = "VERDICT_AUTH_FAILURES_PER_SEC",
        default_value_t = 2.0,
        global = true
    )]
    pub auth_failures_per_sec: f64,

    /// Longest a new connection may take to finish its TLS handshake and
    /// send the HTTP/2 preface, in milliseconds; it is closed after that.
    #[arg(
        long,
        env = "VERDICT_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub handshake_timeout_ms: u64,

    /// Most client connections open at once; more are closed at accept.
    /// 0 means half the open-file limit (RLIMIT_NOFILE), at most 1024.
    #[arg(
        long,
        env = "VERDICT_MAX_CONNECTIONS",
        default_value_t = 0,
        global = true
    )]
    pub max_connections: usize,

    /// Most client connections open at once from one IP address (loopback
    /// included); more are closed at accept.
    #[arg(
        long,
        env = "VERDICT_MAX_CONNECTIONS_PER_PEER",
        default_value_t = 64,
        global = true
    )]
    pub max_connections_per_peer: usize,

    /// Most calls (HTTP/2 streams) open at once on one connection,
    /// advertised to clients as SETTINGS_MAX_CONCURRENT_STREAMS.
    #[arg(
        long,
        env = "VERDICT_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 100,
        global = true
    )]
    pub max_streams_per_connection: u32,

    /// Bytes (encoded) of chunks one client-stream ingest may hold between
    /// reading them from the socket and committing them; past it the
    /// gateway stops reading and HTTP/2 flow control holds the client.
    #[arg(
        long,
        env = "VERDICT_INGEST_BUFFER_BYTES",
        default_value_t = 8 * 1024 * 1024,
        value_parser = clap::value_parser!(u32).range(64 * 1024..),
        global = true
    )]
    pub ingest_buffer_bytes: u32,

    /// How long a client stream may send nothing before it is ended with
    /// DEADLINE_EXCEEDED (reason STREAM_IDLE): e.g. `60s`, `500ms`, `2m`
    /// (a bare number is seconds).
    #[arg(
        long,
        env = "VERDICT_STREAM_IDLE_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration,
        global = true
    )]
    pub stream_idle_timeout: Duration,

    /// Connections of the pool that WatchSession's catch-up reads use,
    /// apart from the request pool (one read per changed session, shared by
    /// all its watchers).
    #[arg(
        long,
        env = "VERDICT_WATCH_POOL_SIZE",
        default_value_t = 4,
        global = true
    )]
    pub watch_pool_size: usize,

    /// Finished spans held for export to the OTLP collector; past it new
    /// spans are dropped and counted (`verdict.telemetry.dropped_spans`,
    /// `error.type=queue_full`). When unset, `OTEL_BSP_MAX_QUEUE_SIZE`, else
    /// 65536.
    #[arg(
        long,
        env = "VERDICT_OTEL_SPAN_QUEUE_SIZE",
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub otel_span_queue_size: Option<u32>,

    /// Read endpoints: streaming replicas (or CloudNativePG's `-ro`
    /// service) that read RPCs use, as PostgreSQL connection strings
    /// separated by `;`. Writes, watches and transactions stay on
    /// DATABASE_URL. Unset: every call uses DATABASE_URL.
    #[arg(long, env = "VERDICT_DATABASE_READ_URL", global = true)]
    pub database_read_url: Option<String>,

    /// How stale a read without a consistency token may be at most (e.g.
    /// `1s`): a replica not known to have replayed everything the primary
    /// had flushed this long ago is skipped.
    #[arg(
        long,
        env = "VERDICT_READ_MAX_LAG",
        default_value = "1s",
        value_parser = parse_duration,
        global = true
    )]
    pub read_max_lag: Duration,

    /// How long a read with a consistency token waits for a replica to
    /// replay up to it (e.g. `100ms`) before the primary serves it.
    #[arg(
        long,
        env = "VERDICT_READ_TOKEN_WAIT",
        default_value = "100ms",
        value_parser = parse_duration,
        global = true
    )]
    pub read_token_wait: Duration,

    /// Origins (e.g. `https://qa.example.com`) whose browser pages may call
    /// the API cross-origin over gRPC-Web: they get CORS headers and their
    /// preflight requests are answered. Comma-separated; none by default, so
    /// a page of another origin cannot read any reply. The console, served
    /// from the gateway's own origin, needs none.
    #[arg(
        long,
        env = "VERDICT_CORS_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    pub cors_origins: Vec<String>,

    /// Serve the read-only web console at `/console/` on the gRPC port
    /// (static files built into the binary; they call the API over
    /// gRPC-Web with the key typed into the page).
    #[arg(long, env = "VERDICT_CONSOLE", global = true)]
    pub console: bool,

    /// Default retention in days: Sessions (with everything of theirs: logs, results, discrepancies, executions, coverage) by creation time; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_SESSIONS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_sessions_days: i32,

    /// Default retention in days: Test executions of no session and no run, by start time; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_EXECUTIONS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_executions_days: i32,

    /// Default retention in days: Coverage reports of no session (with their files), by recorded time; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_COVERAGE_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_coverage_days: i32,

    /// Default retention in days: Test runs (with their executions) by start time; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_TEST_RUNS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_test_runs_days: i32,

    /// Default retention in days: Metric points by recorded time; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_METRIC_POINTS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_metric_points_days: i32,

    /// Default retention in days: Validation rollups by period start; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_METRIC_ROLLUPS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_metric_rollups_days: i32,

    /// Default retention in days: Ingest bookkeeping (batch ids, stream marks) by commit time: how long a retried batch or a resumed ingest is recognised; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_INGEST_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_ingest_days: i32,

    /// Default retention in days: Discrepancy resolution history by change time (discrepancies keep their current resolution); 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_RESOLUTIONS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_resolutions_days: i32,

    /// Default retention in days: Audit events by time, deleted only by the periodic job (never by Cleanup); keep them longest; 0 keeps them forever. A
    /// project's own setting (ProjectService.UpdateProject) overrides it.
    #[arg(
        long,
        env = "VERDICT_RETENTION_AUDIT_EVENTS_DAYS",
        default_value_t = 0,
        value_parser = clap::value_parser!(i32).range(0..=36_600),
        global = true
    )]
    pub retention_audit_events_days: i32,

    /// Most rows one retention batch (one short transaction) deletes.
    #[arg(
        long,
        env = "VERDICT_RETENTION_BATCH_SIZE",
        default_value_t = 1_000,
        value_parser = clap::value_parser!(i64).range(1..=100_000),
        global = true
    )]
    pub retention_batch_size: i64,

    /// How long a retention batch waits for a row lock before it gives up
    /// and is tried again (e.g. `500ms`, `2s`).
    #[arg(
        long,
        env = "VERDICT_RETENTION_LOCK_TIMEOUT",
        default_value = "1s",
        value_parser = parse_duration,
        global = true
    )]
    pub retention_lock_timeout: Duration,

    /// How often the retention job applies every project's retention (one
    /// replica at a time, through an advisory lock), in seconds; 0 turns
    /// it off.
    #[arg(
        long,
        env = "VERDICT_RETENTION_INTERVAL_SECS",
        default_value_t = 3_600,
        global = true
    )]
    pub retention_interval_secs: u64,
}

/// A duration such as `500ms`, `45s`, `5m` or `2h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 45s, 5m or 2h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => return Err(format!("unknown unit {other:?}: use ms, s, m, h or d")),
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Bytes of every reply kept for what the gateway adds to what a request
/// stored (ids, timestamps, sequence numbers, a page token).
pub const REPLY_HEADROOM: usize = 2048;

impl Config {
    /// Settings for tests and embedding: defaults, with the given database.
    pub fn for_database(database_url: Option<String>) -> Self {
        let mut config = Cli::parse_from(["verdict"]).config;
        config.database_url = database_url;
        config
    }

    pub fn pool_max_waiting(&self) -> usize {
        if self.pool_max_waiting == 0 {
            self.pool_size * 4
        } else {
            self.pool_max_waiting
        }
    }

    /// The largest request message accepted: `max_message_bytes` less
    /// [`REPLY_HEADROOM`], so anything a request stores fits a reply with
    /// the id, times and page token the gateway adds to it.
    pub fn max_request_bytes(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(REPLY_HEADROOM)
            .max(REPLY_HEADROOM)
    }

    pub fn pool_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_wait_timeout_ms)
    }

    pub fn max_statement_timeout(&self) -> Duration {
        Duration::from_millis(self.max_statement_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn rollup_interval(&self) -> Option<Duration> {
        (self.rollup_interval_secs > 0).then(|| Duration::from_secs(self.rollup_interval_secs))
    }

    pub fn health_probe_interval(&self) -> Duration {
        Duration::from_millis(self.health_probe_interval_ms)
    }

    pub fn tls_reload_interval(&self) -> Duration {
        Duration::from_millis(self.tls_reload_interval_ms)
    }

    /// Settings of the key checks and stream guards.
    pub fn key_settings(&self) -> crate::auth::KeySettings {
        crate::auth::KeySettings {
            lookup_connections: self.auth_lookup_connections.max(1),
            max_stream_lifetime: self.max_stream_lifetime,
            failure_burst: self.auth_failure_burst,
            failures_per_sec: self.auth_failures_per_sec,
        }
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }

    /// The connection cap: the setting, or half the open-file limit (at
    /// most 1024) so that the pool, PostgreSQL and the metrics port keep
    /// descriptors of their own.
    pub fn max_connections(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct it is given.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        let files = if ok { limit.rlim_cur as usize } else { 1024 };
        (files / 2).clamp(16, 1024)
    }

    /// The retention settings (see [`crate::admin::retention`]).
    pub fn retention(&self) -> crate::admin::retention::Settings {
        crate::admin::retention::Settings {
            // In `Kind::ALL` order.
            defaults: [
                self.retention_sessions_days,
                self.retention_executions_days,
                self.retention_coverage_days,
                self.retention_test_runs_days,
                self.retention_metric_points_days,
                self.retention_metric_rollups_days,
                self.retention_ingest_days,
                self.retention_resolutions_days,
                self.retention_audit_events_days,
            ],
            batch_size: self.retention_batch_size,
            lock_timeout: self.retention_lock_timeout,
            interval: (self.retention_interval_secs > 0)
                .then(|| Duration::from_secs(self.retention_interval_secs)),
        }
    }

    /// Whether calls need an API key (see [`crate::auth::AuthMode::decide`]).
    pub fn auth_mode(&self) -> anyhow::Result<crate::auth::AuthMode> {
        crate::auth::AuthMode::decide(self.listen, self.require_auth, self.insecure_no_auth)
    }
}

/// Debug output never shows the database password.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("data_dir", &self.data_dir)
            .field("pool_size", &self.pool_size)
            .field("shared_read_connections", &self.shared_read_connections)
            .field("pool_wait_timeout_ms", &self.pool_wait_timeout_ms)
            .field("pool_max_waiting", &self.pool_max_waiting)
            .field("max_statement_timeout_ms", &self.max_statement_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("count_exact_below", &self.count_exact_below)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("health_probe_interval_ms", &self.health_probe_interval_ms)
            .field("rollup_interval_secs", &self.rollup_interval_secs)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("service_name", &self.service_name)
            .field("log_filter", &self.log_filter)
            .field("log_format", &self.log_format)
            .field("require_auth", &self.require_auth)
            .field("insecure_no_auth", &self.insecure_no_auth)
            .field(
                "page_token_secret",
                &self.page_token_secret.as_ref().map(|_| "***"),
            )
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("tls_reload_interval_ms", &self.tls_reload_interval_ms)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_lifetime", &self.pool_max_lifetime)
            .field("max_stream_lifetime", &self.max_stream_lifetime)
            .field("auth_lookup_connections", &self.auth_lookup_connections)
            .field("auth_failure_burst", &self.auth_failure_burst)
            .field("auth_failures_per_sec", &self.auth_failures_per_sec)
            .field("handshake_timeout_ms", &self.handshake_timeout_ms)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_peer", &self.max_connections_per_peer)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("ingest_buffer_bytes", &self.ingest_buffer_bytes)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("watch_pool_size", &self.watch_pool_size)
            .field("otel_span_queue_size", &self.otel_span_queue_size)
            .field(
                "database_read_url",
                &self.database_read_url.as_deref().map(redact_url),
            )
            .field("read_max_lag", &self.read_max_lag)
            .field("read_token_wait", &self.read_token_wait)
            .field("cors_origins", &self.cors_origins)
            .field("console", &self.console)
            .field("retention_sessions_days", &self.retention_sessions_days)
            .field("retention_executions_days", &self.retention_executions_days)
            .field("retention_coverage_days", &self.retention_coverage_days)
            .field("retention_test_runs_days", &self.retention_test_runs_days)
            .field(
                "retention_metric_points_days",
                &self.retention_metric_points_days,
            )
            .field(
                "retention_metric_rollups_days",
                &self.retention_metric_rollups_days,
            )
            .field("retention_ingest_days", &self.retention_ingest_days)
            .field(
                "retention_resolutions_days",
                &self.retention_resolutions_days,
            )
            .field(
                "retention_audit_events_days",
                &self.retention_audit_events_days,
            )
            .field("retention_batch_size", &self.retention_batch_size)
            .field("retention_lock_timeout", &self.retention_lock_timeout)
            .field("retention_interval_secs", &self.retention_interval_secs)
            .finish()
    }
}

/// Replaces every password of a connection string by `***`: the
/// `user:password@` of a URL, a `password=` query parameter, and the
/// `password=` of the key/value form (quoted or not).
pub fn redact_url(url: &str) -> String {
    if url.contains("://") {
        redact_query_password(&redact_userinfo(url))
    } else {
        redact_key_values(url)
    }
}

/// `scheme://user:password@host/...` → `scheme://user:***@host/...`.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// `...?a=b&password=x&c=d` → `...?a=b&password=***&c=d`.
fn redact_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => param.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

/// `host=h password='a b' user=u` → `host=h password=*** user=u`, reading
/// values as libpq does (single quotes, backslash escapes, spaces around
/// `=`). Anything it cannot read from that point on is hidden whole.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        if rest.is_empty() {
            return out;
        }
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let Some(after_eq) = after_key.strip_prefix('=') else {
            out.push_str("***");
            return out;
        };
        let value_start = after_eq.trim_start();
        let value_len = key_value_len(value_start);
        let whole = rest.len() - value_start.len() + value_len;
        if key == "password" {
            out.push_str(key);
            out.push_str("=***");
        } else {
            out.push_str(&rest[..whole]);
        }
        rest = &rest[whole..];
    }
}

/// Length in bytes of the value at the start of `s` (key/value form).
fn key_value_len(s: &str) -> usize {
    let mut chars = s.char_indices().peekable();
    let quoted = s.starts_with('\'');
    if quoted {
        chars.next();
    }
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            // A doubled quote inside quotes is a quote.
            '\'' if quoted && chars.next_if(|&(_, c)| c == '\'').is_some() => {}
            '\'' if quoted => return i + 1,
            c if !quoted && c.is_whitespace() => return i,
            _ => {}
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/verdict"),
            "postgres://app:***@db:5432/verdict"
        );
        assert_eq!(
            redact_url("postgres://app@db/verdict"),
            "postgres://app@db/verdict"
        );
        assert_eq!(redact_url("host=/tmp user=x"), "host=/tmp user=x");
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("60"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn redact_url_hides_passwords_of_every_form() {
        assert_eq!(
            redact_url("postgres://app@db/verdict?sslmode=require&password=s3cret&x=1"),
            "postgres://app@db/verdict?sslmode=require&password=***&x=1"
        );
        assert_eq!(
            redact_url("host=db password=s3cret user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_url("host=db password = 'it\\'s secret' user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(redact_url("password=s3cret"), "password=***");
        assert_eq!(
            redact_url("password='it''s s3cret' dbname=app"),
            "password=*** dbname=app"
        );
        assert!(!redact_url("host=db password").contains("s3cret"));
        assert!(!redact_url("junk password=s3cret").contains("s3cret"));
    }

    #[test]
    fn debug_output_never_contains_the_password() {
        let mut config = Config::for_database(Some("postgres://u:hunter2@h/d".into()));
        config.page_token_secret = Some("sesame-hunter3".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("hunter3"));
    }

    #[test]
    fn stream_settings_have_safe_defaults() {
        let config = Config::for_database(None);
        assert_eq!(config.stream_idle_timeout, Duration::from_secs(60));
        assert_eq!(config.ingest_buffer_bytes, 8 * 1024 * 1024);
    }
}
