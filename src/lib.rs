//! Verdict: a gRPC data-access gateway in front of PostgreSQL for QA and
//! migration-validation data.
//!
//! [`Application::build`] prepares a gateway (database, pool, listener);
//! [`Application::run_until_stopped`] serves it until SIGTERM/SIGINT.

pub mod admin;
pub mod call;
pub mod config;
pub mod convert;
pub mod coverage;
pub mod db;
pub mod discrepancies;
pub mod error;
pub mod ingest;
pub mod metrics;
pub mod observability;
pub mod pagination;
pub mod results;
pub mod rpc;
pub mod server;
pub mod sessions;
pub mod state;
pub mod telemetry;
pub mod test_cases;
pub mod validate;
pub mod wire;

/// Types generated from `proto/verdict/v1`.
#[allow(clippy::large_enum_variant)] // generated oneofs; boxing would change the public API
pub mod proto {
    tonic::include_proto!("verdict.v1");

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/verdict_descriptor.bin"));
}

use anyhow::Context;
use config::Config;
use db::Db;
use db::embedded::{self, EmbeddedPostgres};
use db::migrate;
use db::notify::Hub;
use server::health::Health;
use state::AppState;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tonic_health::server::HealthReporter;

/// A gateway ready to run: database chosen (and started, on the embedded
/// default), pool created, listener bound.
pub struct Application {
    config: Config,
    listener: TcpListener,
    port: u16,
    metrics_listener: Option<TcpListener>,
    pg: tokio_postgres::Config,
    db: Db,
    embedded: Option<EmbeddedPostgres>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let (pg, embedded) = database(&config).await?;
        let pg = db::connection_config(pg, config.max_statement_timeout());
        let db = Db::with_limits(
            pg.clone(),
            config.pool_size,
            config.pool_max_waiting(),
            config.pool_wait_timeout(),
            config.max_statement_timeout(),
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
            embedded,
        })
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
        let state = AppState {
            db: self.db.clone(),
            hub: hub.clone(),
            shutdown: shutdown_rx.clone(),
        };

        let (fatal_tx, fatal_rx) = oneshot::channel();
        let mut background = JoinSet::new();
        observability::register_pool_gauges(&self.db);
        if let Some(listener) = self.metrics_listener.take() {
            background.spawn(observability::serve_prometheus(listener, self.db.clone()));
        }
        background.spawn(bootstrap(
            self.pg.clone(),
            self.db.clone(),
            health.clone(),
            hub,
            self.config.health_probe_interval(),
            self.config.rollup_interval(),
            fatal_tx,
        ));

        let mut drained = shutdown_rx.clone();
        let config = self.config.clone();
        let mut server = tokio::spawn(async move {
            server::serve(&config, self.listener, state, reporter, async move {
                let _ = drained.wait_for(|stopping| *stopping).await;
            })
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
        if let Some(mut pg) = self.embedded.take() {
            pg.stop().await?;
        }
        tracing::info!("verdict stopped");
        outcome
    }
}

/// The configured database, or a started embedded one.
async fn database(
    config: &Config,
) -> anyhow::Result<(tokio_postgres::Config, Option<EmbeddedPostgres>)> {
    match &config.database_url {
        Some(url) => {
            let pg = url.parse::<tokio_postgres::Config>().map_err(|e| {
                anyhow::anyhow!("DATABASE_URL is not a valid PostgreSQL connection string: {e}")
            })?;
            Ok((pg, None))
        }
        None => {
            let pg = EmbeddedPostgres::start(&config.data_dir).await?;
            Ok((pg.config(embedded::DATABASE), Some(pg)))
        }
    }
}

/// Connects (retrying with capped backoff while the database is not there
/// yet), migrates, opens the gates, then keeps health and notifications
/// running.
async fn bootstrap(
    pg: tokio_postgres::Config,
    db: Db,
    health: Health,
    hub: Hub,
    probe_interval: Duration,
    rollup_interval: Option<Duration>,
    fatal: oneshot::Sender<anyhow::Error>,
) {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match db::connect_direct(&pg).await {
            Ok(mut client) => match migrate::run(&mut client).await {
                Ok(applied) => {
                    tracing::info!(?applied, "database schema is up to date");
                    break;
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
            Err(e) => {
                tracing::warn!(
                    attempt,
                    retry_in_ms = delay.as_millis() as u64,
                    error = %e,
                    "PostgreSQL is not reachable yet; retrying"
                );
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
    db.set_ready();
    health.set(true).await;
    let rollups = async {
        if let Some(every) = rollup_interval {
            metrics::rollups::run_periodically(db.clone(), every).await
        }
    };
    tokio::join!(
        health.probe(db.clone(), pg.clone(), probe_interval),
        hub.listen(pg),
        rollups
    );
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

/// Runs a one-shot command against the configured database (starting and
/// stopping the embedded one when DATABASE_URL is unset).
async fn with_database<T>(
    config: &Config,
    run: impl AsyncFnOnce(&tokio_postgres::Config) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let (pg, mut embedded) = database(config).await?;
    let pg = db::connection_config(pg, config.max_statement_timeout());
    let result = run(&pg).await;
    if let Some(pg) = embedded.as_mut() {
        pg.stop().await?;
    }
    result
}

/// A ready pool for a one-shot command: migrated first, so it never runs
/// against an older schema.
async fn command_db(config: &Config, pg: &tokio_postgres::Config) -> anyhow::Result<Db> {
    let mut client = db::connect_direct(pg)
        .await
        .context("cannot connect to PostgreSQL")?;
    migrate::run(&mut client).await?;
    let db = Db::new(
        pg.clone(),
        2,
        config.pool_wait_timeout(),
        config.max_statement_timeout(),
    )?;
    db.set_ready();
    Ok(db)
}

/// `verdict cleanup --older-than AGE [--dry-run]`.
pub async fn cleanup_command(
    config: &Config,
    older_than: &str,
    dry_run: bool,
) -> anyhow::Result<()> {
    let age = admin::parse_age(older_than).map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
    with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let cutoff = chrono::Utc::now() - chrono::Duration::from_std(age)?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let report = if dry_run {
            admin::cleanup::dry_run(conn.client().await?, cutoff).await?
        } else {
            admin::cleanup::run(&mut conn, cutoff, 500).await?
        };
        let verb = if dry_run { "would delete" } else { "deleted" };
        println!("sessions created before {}:", cutoff.to_rfc3339());
        for (table, n) in report.deleted {
            println!("  {verb} {n:>10} {table}");
        }
        Ok(())
    })
    .await
}

/// `verdict export SESSION_ID`: JSON lines on stdout.
pub async fn export_command(config: &Config, session_id: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let id: uuid::Uuid = session_id
        .parse()
        .map_err(|_| anyhow::anyhow!("{session_id:?} is not a session id (UUID)"))?;
    with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let snapshot = conn.begin_snapshot().await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            while let Some(chunk) = rx.blocking_recv() {
                for record in chunk {
                    serde_json::to_writer(&mut out, &record)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
            Ok(())
        });
        let produced = admin::export::run(&snapshot, id, &tx).await;
        drop(tx);
        writer.await??;
        produced?;
        Ok(())
    })
    .await
}

/// `verdict migrate [--status]`: applies pending migrations, or lists every
/// migration with its state, then exits.
pub async fn migrate_command(config: &Config, status_only: bool) -> anyhow::Result<()> {
    with_database(config, async |pg| {
        let mut client = db::connect_direct(pg)
            .await
            .context("cannot connect to PostgreSQL")?;
        if status_only {
            let known: Vec<i32> = migrate::known_versions();
            for m in migrate::status(&mut client).await? {
                let state = match (&m.applied_at, known.contains(&m.version)) {
                    (_, false) => "UNKNOWN to this binary".to_string(),
                    (Some(at), true) => format!("applied {}", at.to_rfc3339()),
                    (None, true) => "pending".to_string(),
                };
                println!(
                    "V{:<4} {:<32} {:<20} {}",
                    m.version, m.name, m.checksum, state
                );
            }
        } else {
            let applied = migrate::run(&mut client).await?;
            if applied.is_empty() {
                println!("no pending migrations");
            } else {
                for v in applied {
                    println!("applied V{v}");
                }
            }
        }
        Ok(())
    })
    .await
}
