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
    },
    /// Write one session and everything of it as JSON lines to stdout, from
    /// one consistent snapshot.
    Export {
        /// The session's id (UUID).
        session_id: String,
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
}

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
            .field("pool_wait_timeout_ms", &self.pool_wait_timeout_ms)
            .field("pool_max_waiting", &self.pool_max_waiting)
            .field("max_statement_timeout_ms", &self.max_statement_timeout_ms)
            .field("max_message_bytes", &self.max_message_bytes)
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
            .field("watch_pool_size", &self.watch_pool_size)
            .finish()
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
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
    fn debug_output_never_contains_the_password() {
        let mut config = Config::for_database(Some("postgres://u:hunter2@h/d".into()));
        config.page_token_secret = Some("sesame-hunter3".into());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("hunter3"));
    }
}
