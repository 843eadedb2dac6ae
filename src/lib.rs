//! Verdict: a gRPC data-access gateway in front of PostgreSQL for QA and
//! migration-validation data.
//!
//! [`Application::build`] prepares a gateway (database, pool, listener);
//! [`Application::run_until_stopped`] serves it until SIGTERM/SIGINT.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod call;
mod cli;
pub mod config;
pub mod console;
pub mod convert;
pub mod coverage;
pub mod db;
pub mod digest;
pub mod discrepancies;
pub mod encode;
pub mod error;
pub mod failures;
pub mod ingest;
pub mod labels;
pub mod metrics;
pub mod observability;
pub mod pagination;
pub mod projects;
pub mod results;
pub mod rpc;
pub mod search;
pub mod server;
pub mod sessions;
pub mod state;
pub mod structs;
pub mod telemetry;
pub mod test_cases;
pub mod test_runs;
pub mod tls;
pub mod totals;
pub mod validate;
pub mod wire;

/// Types generated from `proto/verdict/v1`.
#[allow(clippy::large_enum_variant)] // generated oneofs; boxing would change the public API
pub mod proto {
    tonic::include_proto!("verdict.v1");

    /// Hand-written (see [`crate::encode`]); the same message on the wire.
    pub use crate::encode::{
        GetSessionResponse, ListDiscrepanciesResponse, ListExecutionsResponse, ListResultsResponse,
        ListSessionLogsResponse, ListSessionsResponse,
    };

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/verdict_descriptor.bin"));
}

use anyhow::Context;
use auth::AuthMode;
use config::Config;
use db::embedded::{self, EmbeddedPostgres};
use db::migrate;
use db::notify::Hub;
use db::{Db, PgConfig};
use pagination::Signer;
use server::health::Health;
use state::AppState;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tonic_health::server::HealthReporter;

pub use cli::{
    EXIT_FOUND, ExitStatus, check_command, cleanup_command, create_key, export_command,
    health_command, keys_command, list_keys, migrate_command, revoke_key, stats_command,
};

/// A gateway ready to run: database chosen (and started, on the embedded
/// default), pool created, listener bound.
pub struct Application {
    config: Config,
    listener: TcpListener,
    port: u16,
    metrics_listener: Option<TcpListener>,
    pg: PgConfig,
    db: Db,
    keys: auth::KeyCache,
    /// The pool of WatchSession's reads.
    watch_db: Db,
    embedded: Option<EmbeddedPostgres>,
    auth: AuthMode,
    signer: Signer,
    tls: Option<tls::TlsAcceptor>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let auth = config.auth_mode()?;
        let tls = tls::TlsAcceptor::from_config(&config)?;
        let signer = Signer::new();
        if let Some(secret) = &config.page_token_secret {
            if secret.len() < 16 {
                anyhow::bail!("VERDICT_PAGE_TOKEN_SECRET must be at least 16 characters");
            }
            signer.set(secret.as_bytes());
        }
        let (pg, embedded) = database(&config).await?;
        let timeout = config.max_statement_timeout();
        let pg = pg.map_config(|c| db::connection_config(c, timeout));
        let db = Db::with_settings(
            pg.clone(),
            db::PoolSettings {
                max_size: config.pool_size,
                max_waiting: config.pool_max_waiting(),
                wait_timeout: config.pool_wait_timeout(),
                max_statement_timeout: config.max_statement_timeout(),
                idle_timeout: config.pool_idle_timeout,
                max_lifetime: config.pool_max_lifetime,
            },
        )?
        .with_shared_reads(&pg, config.shared_read_connections)?;
        let db = match &config.database_read_url {
            Some(urls) => db.with_replicas(read_replicas(urls, &config)?),
            None => db,
        };
        let keys = auth::KeyCache::new(
            pg.clone(),
            config.key_settings(),
            config.max_statement_timeout(),
        )?;
        // Watch reads are short and many watchers may wait for one at once:
        // a long queue, never shed.
        let watch_db = db.sibling(
            pg.clone(),
            config.watch_pool_size.max(1),
            WATCH_POOL_MAX_WAITING,
            WATCH_POOL_WAIT_TIMEOUT,
        )?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let port = listener.local_addr()?.port();
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
            None => None,
        };
        Ok(Application {
            config,
            listener,
            port,
            metrics_listener,
            pg,
            db,
            keys,
            watch_db,
            embedded,
            auth,
            signer,
            tls,
        })
    }

    /// The gateway's database handle (pool and its counters).
    pub fn db(&self) -> Db {
        self.db.clone()
    }

    /// The verified-key cache (its lookup counter, for tests and benches).
    pub fn keys(&self) -> auth::KeyCache {
        self.keys.clone()
    }

    /// Whether calls need an API key.
    pub fn auth_mode(&self) -> AuthMode {
        self.auth
    }

    /// The TLS acceptor, to reload certificates by hand (SIGHUP and file
    /// changes do it by themselves); `None` without TLS.
    pub fn tls(&self) -> Option<tls::TlsAcceptor> {
        self.tls.clone()
    }

    /// The port the gateway listens on (useful with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the Prometheus endpoint, when enabled.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// Connection settings of the database this gateway uses.
    pub fn database_config(&self) -> &tokio_postgres::Config {
        self.pg.config()
    }

    /// The same with the TLS every connection of the gateway uses.
    pub fn database_connection(&self) -> &PgConfig {
        &self.pg
    }

    /// The configured DATABASE_URL; `None` on the embedded default.
    pub fn database_url(&self) -> Option<String> {
        self.config.database_url.clone()
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` resolves, then drains in-flight calls (at most the
    /// configured grace), closes the pool and stops the embedded server.
    /// Returns an error when the database can never be served (it holds
    /// migrations this binary does not know, or a migration fails).
    pub async fn run_until(
        mut self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let reporter = HealthReporter::new();
        let health = Health::new(reporter.clone(), server::service_names());
        health.set(false).await;

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let hub = Hub::new();
        let watches =
            sessions::Watches::new(self.watch_db.clone(), shutdown_rx.clone(), hub.clone());
        let state = AppState {
            db: self.db.clone(),
            hub: hub.clone(),
            shutdown: shutdown_rx.clone(),
            signer: self.signer.clone(),
            keys: self.keys.clone(),
            projects: crate::projects::Directory::new(self.db.clone()),
            ingest: crate::ingest::Limits::from_config(&self.config),
            watches: watches.clone(),
            max_message_bytes: self.config.max_message_bytes,
            retention: self.config.retention(),
            count_exact_below: self.config.count_exact_below,
        };
        self.auth.log(self.config.listen);

        let (fatal_tx, fatal_rx) = oneshot::channel();
        let mut background = JoinSet::new();
        observability::register_pool_gauges(&self.db);
        observability::set_database(self.pg.config());
        background.spawn(watches.dispatch());
        if let Some(listener) = self.metrics_listener.take() {
            background.spawn(observability::serve_prometheus(listener, self.db.clone()));
        }
        if let Some(tls) = &self.tls {
            background.spawn(tls.clone().watch(self.config.tls_reload_interval()));
        }
        background.spawn(bootstrap(
            Background {
                pg: self.pg.clone(),
                db: self.db.clone(),
                keys: self.keys.clone(),
                auth_required: self.auth.is_required(),
                signer: self.signer.clone(),
                projects: state.projects.clone(),
                health: health.clone(),
                hub,
                probe_interval: self.config.health_probe_interval(),
                rollup_interval: self.config.rollup_interval(),
                retention: self.config.retention(),
            },
            fatal_tx,
        ));

        let mut drained = shutdown_rx.clone();
        let config = self.config.clone();
        let auth = self.auth;
        let tls = self.tls.clone();
        let mut server = tokio::spawn(async move {
            server::serve(
                &config,
                self.listener,
                state,
                reporter,
                auth,
                tls,
                async move {
                    let _ = drained.wait_for(|stopping| *stopping).await;
                },
            )
            .await
        });
        tracing::info!(
            port = self.port,
            version = env!("CARGO_PKG_VERSION"),
            "verdict listening"
        );

        let outcome = tokio::select! {
            _ = stop => Ok(()),
            Ok(fatal) = fatal_rx => Err(fatal),
            ended = &mut server => Err(match ended {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("the gRPC server stopped unexpectedly"),
            }),
        };

        tracing::info!("shutting down: draining in-flight calls");
        health.set(false).await;
        let _ = shutdown_tx.send(true);
        if !server.is_finished()
            && tokio::time::timeout(self.config.shutdown_grace(), &mut server)
                .await
                .is_err()
        {
            tracing::warn!("calls still running after the shutdown grace; closing anyway");
            server.abort();
        }
        background.abort_all();
        self.db.close();
        self.keys.close();
        self.watch_db.close();
        if let Some(mut pg) = self.embedded.take() {
            pg.stop().await?;
        }
        tracing::info!("verdict stopped");
        outcome
    }
}

/// Watchers that may wait for a connection of the watch pool at once.
const WATCH_POOL_MAX_WAITING: usize = 1 << 20;
/// How long a watch read waits for a connection of the watch pool before it
/// backs off and retries.
const WATCH_POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The configured database (with its TLS, see `db::tls`), or a started
/// embedded one (unix socket, no TLS).
pub(crate) async fn database(
    config: &Config,
) -> anyhow::Result<(PgConfig, Option<EmbeddedPostgres>)> {
    match &config.database_url {
        Some(url) => Ok((PgConfig::parse(url)?, None)),
        None => {
            let pg = EmbeddedPostgres::start(&config.data_dir).await?;
            let settings = PgConfig::new(pg.config(embedded::DATABASE), db::PgTls::disabled());
            Ok((settings, Some(pg)))
        }
    }
}

/// The pools of the read endpoints (`VERDICT_DATABASE_READ_URL`, `;`
/// between endpoints), each sized and timed like the primary's.
fn read_replicas(urls: &str, config: &Config) -> anyhow::Result<db::replica::Replicas> {
    let timeout = config.max_statement_timeout();
    let mut pools = Vec::new();
    for url in urls.split(';').map(str::trim).filter(|u| !u.is_empty()) {
        let pg = PgConfig::parse(url)
            .map_err(|e| anyhow::anyhow!("VERDICT_DATABASE_READ_URL: {e:#}"))?
            .map_config(|c| db::connection_config(c, timeout));
        pools.push(Db::read_only(
            pg,
            db::PoolSettings {
                max_size: config.pool_size,
                max_waiting: config.pool_max_waiting(),
                wait_timeout: config.pool_wait_timeout(),
                max_statement_timeout: timeout,
                idle_timeout: config.pool_idle_timeout,
                max_lifetime: config.pool_max_lifetime,
            },
        )?);
    }
    if pools.is_empty() {
        anyhow::bail!("VERDICT_DATABASE_READ_URL names no endpoint");
    }
    Ok(db::replica::Replicas::new(
        pools,
        db::replica::ReadSettings {
            max_lag: config.read_max_lag,
            token_wait: config.read_token_wait,
        },
    ))
}

/// What the start-up task needs and then keeps running.
struct Background {
    pg: PgConfig,
    db: Db,
    keys: auth::KeyCache,
    /// Whether calls need keys: only then does the revocation listener
    /// hold a connection.
    auth_required: bool,
    signer: Signer,
    /// Learns the `default` project's id at start-up, so calls that name no
    /// project never look it up.
    projects: projects::Directory,
    health: Health,
    hub: Hub,
    probe_interval: Duration,
    rollup_interval: Option<Duration>,
    /// The retention job's settings (off when it has no interval).
    retention: admin::retention::Settings,
}

/// Connects (retrying with capped backoff while the database is not there
/// yet), migrates, opens the gates, then keeps health, notifications and
/// periodic rollups running.
async fn bootstrap(background: Background, fatal: oneshot::Sender<anyhow::Error>) {
    let Background {
        pg,
        db,
        keys,
        auth_required,
        signer,
        projects,
        health,
        hub,
        probe_interval,
        rollup_interval,
        retention,
    } = background;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match db::connect_direct(&pg).await {
            Ok(mut client) => match migrate::run(&mut client).await {
                Ok(applied) => {
                    tracing::info!(?applied, "database schema is up to date");
                    let loaded = async {
                        load_page_token_secret(&client, &signer).await?;
                        projects.load_default(&client).await
                    };
                    match loaded.await {
                        Ok(()) => break,
                        Err(e) => {
                            tracing::warn!(attempt, error = %e, "cannot read the page-token secret; retrying")
                        }
                    }
                }
                Err(e) if client.is_closed() => {
                    tracing::warn!(attempt, error = %format!("{e:#}"), "lost the database while migrating; retrying");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "refusing to serve this database");
                    let _ = fatal.send(e);
                    return;
                }
            },
            Err(e) => match pg.tls().explain(&e) {
                Some(reason) => tracing::warn!(
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    reason,
                    "cannot connect to PostgreSQL over TLS; retrying"
                ),
                None => tracing::warn!(
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "PostgreSQL is not reachable yet; retrying"
                ),
            },
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    db.set_ready();
    keys.set_ready();
    let replicas = db.replicas().cloned();
    if let Some(replicas) = &replicas {
        replicas.set_ready();
    }
    // SERVING once the probe finds that calls can get a connection (its
    // first check runs at once).
    let rollups = async {
        if let Some(every) = rollup_interval {
            metrics::rollups::run_periodically(db.clone(), every).await
        }
    };
    let retention_job = admin::retention::run_periodically(pg.clone(), db.clone(), retention);
    tokio::join!(
        db.clone().maintain(),
        health.probe(db.clone(), pg.clone(), probe_interval),
        {
            let pg = pg.clone();
            async move {
                if auth_required {
                    auth::revocations::listen(keys, pg).await
                }
            }
        },
        hub.listen(pg),
        rollups,
        retention_job,
        async {
            if let Some(replicas) = replicas {
                replicas.run(db.clone()).await
            }
        }
    );
}

/// Without VERDICT_PAGE_TOKEN_SECRET, page tokens are signed with the
/// random secret the migrations stored in the database: every replica of a
/// database reads the same one, so a token from one replica works on all.
async fn load_page_token_secret(
    client: &tokio_postgres::Client,
    signer: &Signer,
) -> Result<(), tokio_postgres::Error> {
    if signer.is_set() {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT secret FROM gateway_secrets WHERE purpose = 'page_tokens'",
            &[],
        )
        .await?;
    signer.set(row.get::<_, &[u8]>(0));
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("cannot install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
