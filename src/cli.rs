//! The one-shot commands of the `verdict` binary (`migrate`, `cleanup`,
//! `export`, `keys`): each runs against the configured database, starting
//! and stopping the embedded one when DATABASE_URL is unset.

use crate::config::{Config, KeysCommand};
use crate::db::embedded::EmbeddedPostgres;
use crate::db::{self, Db, PgConfig, migrate};
use crate::{admin, audit, auth, call, database, error};

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
        let project = crate::projects::sql::id_of(&snapshot, crate::projects::DEFAULT_SLUG)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the project `default` is missing"))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            while let Some(lines) = rx.blocking_recv() {
                out.write_all(&lines)?;
            }
            out.flush()?;
            Ok(())
        });
        let mut sink = admin::export::JsonLines::new(tx);
        let produced =
            match admin::export::run(&snapshot, project, id, config.max_message_bytes, &mut sink)
                .await
            {
                Ok(_) => {
                    sink.flush().await;
                    Ok(())
                }
                Err(e) => Err(e),
            };
        drop(sink);
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
        KeysCommand::Create {
            name,
            scopes,
            project,
        } => {
            let scopes =
                auth::ScopeSet::parse_list(&scopes.join(",")).map_err(anyhow::Error::msg)?;
            let key = create_key(config, &name, scopes, project.as_deref()).await?;
            eprintln!(
                "created key {} ({}, scopes {}, {}); the token below is shown once and cannot be recovered:",
                key.id,
                name.trim(),
                scopes.to_list(),
                match &project {
                    Some(slug) => format!("project {slug}"),
                    None => "every project".to_owned(),
                }
            );
            println!("{}", key.token);
        }
        KeysCommand::List => {
            println!(
                "{:<16}  {:<16}  {:<23}  {:<27}  {:<20}  name",
                "id", "scopes", "created", "state", "project"
            );
            for k in list_keys(config).await? {
                let state = match k.revoked_at {
                    Some(at) => format!("revoked {}", at.format("%Y-%m-%d %H:%M:%S UTC")),
                    None => "active".into(),
                };
                println!(
                    "{:<16}  {:<16}  {:<23}  {:<27}  {:<20}  {}",
                    k.id,
                    k.scopes.to_list(),
                    k.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                    state,
                    k.project.as_deref().unwrap_or("*"),
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

/// Creates an API key, bound to the project `project` (a slug) or, with
/// `None`, to every project; its token is in the result and nowhere else.
/// The audit row (`cli:keys.create`) is written in the same transaction.
pub async fn create_key(
    config: &Config,
    name: &str,
    scopes: auth::ScopeSet,
    project: Option<&str>,
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
        let project = match project {
            None => None,
            Some(slug) => Some(
                crate::projects::sql::id_of(&tx, slug)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("--project: no project has slug {slug:?}"))?,
            ),
        };
        auth::keys::insert(&tx, &key, name, scopes, project).await?;
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
