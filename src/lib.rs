//! Verdict: a gRPC data-access gateway in front of PostgreSQL for QA and
//! migration-validation data.
//!
//! [`Application::build`] prepares a gateway (database, pool, listener);
//! [`Application::run_until_stopped`] serves it until SIGTERM/SIGINT.

pub mod admin;
pub mod audit;
pub mod auth;
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
pub mod tls;
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
use auth::AuthMode;
use config::{Config, KeysCommand};
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

/// A gateway ready to run: database chosen (and started, on the embedded
/// default), pool created, listener bound.
pub struct Application {
    config: Config,
    listener: TcpListener,
    port: u16,
    metrics_listener: Option<TcpListener>,
    pg: PgConfig,
    db: Db,
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
            auth,
            signer,
            tls,
        })
    }

    /// The gateway's database handle (pool and its counters).
    pub fn db(&self) -> Db {
        self.db.clone()
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
        let state = AppState {
            db: self.db.clone(),
            hub: hub.clone(),
            shutdown: shutdown_rx.clone(),
            signer: self.signer.clone(),
        };
        self.auth.log(self.config.listen);

        let (fatal_tx, fatal_rx) = oneshot::channel();
        let mut background = JoinSet::new();
        observability::register_pool_gauges(&self.db);
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
                signer: self.signer.clone(),
                health: health.clone(),
                hub,
                probe_interval: self.config.health_probe_interval(),
                rollup_interval: self.config.rollup_interval(),
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
        if let Some(mut pg) = self.embedded.take() {
            pg.stop().await?;
        }
        tracing::info!("verdict stopped");
        outcome
    }
}

/// The configured database (with its TLS, see `db::tls`), or a started
/// embedded one (unix socket, no TLS).
async fn database(config: &Config) -> anyhow::Result<(PgConfig, Option<EmbeddedPostgres>)> {
    match &config.database_url {
        Some(url) => Ok((PgConfig::parse(url)?, None)),
        None => {
            let pg = EmbeddedPostgres::start(&config.data_dir).await?;
            let settings = PgConfig::new(pg.config(embedded::DATABASE), db::PgTls::disabled());
            Ok((settings, Some(pg)))
        }
    }
}

/// What the start-up task needs and then keeps running.
struct Background {
    pg: PgConfig,
    db: Db,
    signer: Signer,
    health: Health,
    hub: Hub,
    probe_interval: Duration,
    rollup_interval: Option<Duration>,
}

/// Connects (retrying with capped backoff while the database is not there
/// yet), migrates, opens the gates, then keeps health, notifications and
/// periodic rollups running.
async fn bootstrap(background: Background, fatal: oneshot::Sender<anyhow::Error>) {
    let Background {
        pg,
        db,
        signer,
        health,
        hub,
        probe_interval,
        rollup_interval,
    } = background;
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match db::connect_direct(&pg).await {
            Ok(mut client) => match migrate::run(&mut client).await {
                Ok(applied) => {
                    tracing::info!(?applied, "database schema is up to date");
                    match load_page_token_secret(&client, &signer).await {
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

/// Runs a one-shot command against the configured database (starting and
/// stopping the embedded one when DATABASE_URL is unset).
async fn with_database<T>(
    config: &Config,
    run: impl AsyncFnOnce(&PgConfig) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let (pg, mut embedded) = database(config).await?;
    let timeout = config.max_statement_timeout();
    let pg = pg.map_config(|c| db::connection_config(c, timeout));
    let result = run(&pg).await;
    if let Some(pg) = embedded.as_mut() {
        pg.stop().await?;
    }
    result
}

/// The connection of a one-shot command, failing with the TLS reason when
/// there is one.
async fn connect_command(pg: &PgConfig) -> anyhow::Result<tokio_postgres::Client> {
    db::connect_direct(pg).await.map_err(|e| {
        let context = match pg.tls().explain(&e) {
            Some(reason) => format!("cannot connect to PostgreSQL: {reason}"),
            None => "cannot connect to PostgreSQL".to_owned(),
        };
        anyhow::Error::new(e).context(context)
    })
}

/// A ready pool for a one-shot command: migrated first, so it never runs
/// against an older schema.
async fn command_db(config: &Config, pg: &PgConfig) -> anyhow::Result<Db> {
    let mut client = connect_command(pg).await?;
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
        let cutoff = chrono::Utc::now()
            .checked_sub_signed(chrono::Duration::from_std(age)?)
            .ok_or_else(|| anyhow::anyhow!("--older-than is too long"))?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let report = if dry_run {
            admin::cleanup::dry_run(conn.client().await?, cutoff).await?
        } else {
            admin::cleanup::run(
                &mut conn,
                &call::Call::command_line("cli:cleanup"),
                cutoff,
                500,
            )
            .await?
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
        let mut client = connect_command(pg).await?;
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

/// `verdict keys create|list|revoke`: applies pending migrations (so keys
/// can be made before the first `serve`), then manages keys.
pub async fn keys_command(config: &Config, action: KeysCommand) -> anyhow::Result<()> {
    match action {
        KeysCommand::Create { name, scopes } => {
            let scopes =
                auth::ScopeSet::parse_list(&scopes.join(",")).map_err(anyhow::Error::msg)?;
            let key = create_key(config, &name, scopes).await?;
            eprintln!(
                "created key {} ({}, scopes {}); the token below is shown once and cannot be recovered:",
                key.id,
                name.trim(),
                scopes.to_list()
            );
            println!("{}", key.token);
        }
        KeysCommand::List => {
            println!(
                "{:<16}  {:<16}  {:<23}  {:<27}  name",
                "id", "scopes", "created", "state"
            );
            for k in list_keys(config).await? {
                let state = match k.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M:%S UTC")),
                    None => "active".into(),
                };
                println!(
                    "{:<16}  {:<16}  {:<23}  {:<27}  {}",
                    k.id,
                    k.scopes.to_list(),
                    k.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                    state,
                    k.name
                );
            }
        }
        KeysCommand::Revoke { id } => {
            revoke_key(config, &id).await?;
            println!("revoked key {id}; every replica refuses it from the next call on");
        }
    }
    Ok(())
}

/// The database of `config` (started when embedded), migrated, with a
/// one-connection pool for key management.
async fn key_database(config: &Config) -> anyhow::Result<(Db, Option<EmbeddedPostgres>)> {
    let (pg, embedded) = database(config).await?;
    let timeout = config.max_statement_timeout();
    let pg = pg.map_config(|c| db::connection_config(c, timeout));
    let mut client = connect_command(&pg).await?;
    migrate::run(&mut client).await?;
    drop(client);
    let db = Db::new(
        pg,
        1,
        config.pool_wait_timeout(),
        config.max_statement_timeout(),
    )?;
    db.set_ready();
    Ok((db, embedded))
}

async fn close_key_database(db: Db, embedded: Option<EmbeddedPostgres>) -> anyhow::Result<()> {
    db.close();
    if let Some(mut pg) = embedded {
        pg.stop().await?;
    }
    Ok(())
}

/// Creates an API key; its token is in the result and nowhere else. The
/// audit row (`cli:keys.create`) is written in the same transaction.
pub async fn create_key(
    config: &Config,
    name: &str,
    scopes: auth::ScopeSet,
) -> anyhow::Result<auth::keys::NewKey> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        anyhow::bail!("--name must be 1 to 200 characters without control characters");
    }
    let (db, embedded) = key_database(config).await?;
    let result = async {
        let key = auth::keys::generate()?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let tx = conn.begin().await?;
        auth::keys::insert(&tx, &key, name, scopes).await?;
        let targets = [key.id.to_string()];
        audit::record_as(
            &tx,
            None,
            "cli:keys.create",
            &targets,
            audit::Outcome::Created,
            None,
        )
        .await?;
        tx.commit().await.map_err(error::Error::from)?;
        Ok::<_, anyhow::Error>(key)
    }
    .await;
    close_key_database(db, embedded).await?;
    result
}

/// Every API key, oldest first (never their secrets).
pub async fn list_keys(config: &Config) -> anyhow::Result<Vec<auth::keys::KeyInfo>> {
    let (db, embedded) = key_database(config).await?;
    let result = async {
        let mut conn = db.conn(&call::Call::default()).await?;
        Ok::<_, anyhow::Error>(auth::keys::list(conn.client().await?).await?)
    }
    .await;
    close_key_database(db, embedded).await?;
    result
}

/// Revokes an API key; every replica refuses it from the next call on. The
/// audit row (`cli:keys.revoke`) is written in the same transaction.
pub async fn revoke_key(config: &Config, id: &str) -> anyhow::Result<()> {
    let (db, embedded) = key_database(config).await?;
    let result = async {
        let mut conn = db.conn(&call::Call::default()).await?;
        let tx = conn.begin().await?;
        auth::keys::revoke(&tx, id).await?;
        let targets = [id.to_owned()];
        audit::record_as(
            &tx,
            None,
            "cli:keys.revoke",
            &targets,
            audit::Outcome::Updated,
            None,
        )
        .await?;
        tx.commit().await.map_err(error::Error::from)?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    close_key_database(db, embedded).await?;
    result
}
