//! The one-shot commands of the `verdict` binary (`migrate`, `cleanup`,
//! `export`, `keys`, `stats`, `check`): each runs against the configured
//! database, starting and stopping the embedded one when DATABASE_URL is
//! unset. `health` asks a running gateway instead.

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

/// The id of the project `slug`, for a command's `--project`.
async fn project_of(db: &Db, slug: &str) -> anyhow::Result<uuid::Uuid> {
    let mut conn = db.conn(&call::Call::default()).await?;
    crate::projects::sql::id_of(conn.client().await?, slug)
        .await?
        .ok_or_else(|| anyhow::anyhow!("--project: no project has slug {slug:?}"))
}

/// `verdict cleanup --older-than AGE [--dry-run] [--project SLUG]`: within
/// the one project (default `default`); no other project's rows are read
/// or deleted.
pub async fn cleanup_command(
    config: &Config,
    older_than: &str,
    dry_run: bool,
    project: &str,
) -> anyhow::Result<()> {
    let age = admin::parse_age(older_than).map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
    with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let project_id = project_of(&db, project).await?;
        let cutoff = chrono::Utc::now()
            .checked_sub_signed(chrono::Duration::from_std(age)?)
            .ok_or_else(|| anyhow::anyhow!("--older-than is too long"))?;
        let mut conn = db.conn(&call::Call::default()).await?;
        // The other kinds (not the audit trail) by the project's retention,
        // as the Cleanup RPC does.
        let settings = config.retention();
        let overrides =
            crate::projects::sql::retention_of(conn.client().await?, project_id).await?;
        let now = chrono::Utc::now();
        let report = if dry_run {
            let c = conn.client().await?;
            let mut report = admin::cleanup::dry_run(c, project_id, cutoff).await?;
            let more = admin::retention::dry_run(c, &settings, project_id, &overrides, now).await?;
            report.merge(&more.deleted);
            report
        } else {
            let call = call::Call::command_line("cli:cleanup").in_project(project_id);
            let mut report = admin::cleanup::run(&mut conn, &call, cutoff, 500).await?;
            let more =
                admin::retention::apply(&mut conn, &call, &settings, &overrides, now, false, false)
                    .await?;
            report.merge(&more.deleted);
            report
        };
        let verb = if dry_run { "would delete" } else { "deleted" };
        println!(
            "sessions of project {project} created before {}, and what its retention expires:",
            cutoff.to_rfc3339()
        );
        for (table, n) in report.deleted {
            println!("  {verb} {n:>10} {table}");
        }
        Ok(())
    })
    .await
}

/// `verdict export SESSION_ID [--project SLUG]`: JSON lines on stdout; a
/// session of another project than `--project` (default `default`) is not
/// found.
pub async fn export_command(
    config: &Config,
    session_id: &str,
    project: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    let id: uuid::Uuid = session_id
        .parse()
        .map_err(|_| anyhow::anyhow!("{session_id:?} is not a session id (UUID)"))?;
    with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let project_id = project_of(&db, project).await?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let snapshot = conn.begin_snapshot().await?;
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
        let produced = match admin::export::run(
            &snapshot,
            project_id,
            id,
            config.max_message_bytes,
            &mut sink,
        )
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
        // In the trail of the key's project; of `default` for an operator's.
        let audited = match project {
            Some(id) => id,
            None => default_project(&tx).await?,
        };
        audit::record_as(
            &tx,
            None,
            "cli:keys.create",
            &targets,
            audit::Outcome::Created,
            None,
            audited,
        )
        .await?;
        tx.commit().await.map_err(error::Error::from)?;
        Ok::<_, anyhow::Error>(key)
    }
    .await;
    close_key_database(db, embedded).await?;
    result
}

/// The id of the project `default`, whose trail records key changes of
/// keys bound to no project.
async fn default_project(c: &impl deadpool_postgres::GenericClient) -> error::Result<uuid::Uuid> {
    crate::projects::sql::id_of(c, crate::projects::DEFAULT_SLUG)
        .await?
        .ok_or_else(|| error::Error::Internal("the project `default` is missing".into()))
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
        // In the trail of the key's project, as its creation was.
        let bound = match auth::KeyId::parse(id) {
            Some(key) => auth::keys::lookup(&tx, key).await?.and_then(|k| k.project),
            None => None,
        };
        let audited = match bound {
            Some(id) => id,
            None => default_project(&tx).await?,
        };
        audit::record_as(
            &tx,
            None,
            "cli:keys.revoke",
            &targets,
            audit::Outcome::Updated,
            None,
            audited,
        )
        .await?;
        tx.commit().await.map_err(error::Error::from)?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    close_key_database(db, embedded).await?;
    result
}

/// How a command ends for scripts when it ran but its answer is not "all
/// good": its output is printed, the process exits with `code`.
#[derive(Debug)]
pub struct ExitStatus {
    /// The process exit code.
    pub code: u8,
    /// Said on stderr.
    pub message: String,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExitStatus {}

/// Exit code of `check` with findings and of `health` with an answer other
/// than SERVING.
pub const EXIT_FOUND: u8 = 2;

fn rfc3339(t: Option<chrono::DateTime<chrono::Utc>>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| t.to_rfc3339().into())
}

/// `verdict stats [--project SLUG | --all-projects [--exact]] [--json]`:
/// row counts per table, the session age range and (every project) the
/// database size, from the same functions GetStats uses.
pub async fn stats_command(
    config: &Config,
    project: &str,
    all_projects: bool,
    exact: bool,
    json: bool,
) -> anyhow::Result<()> {
    with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let scope = if all_projects {
            admin::stats::Scope::AllProjects
        } else {
            admin::stats::Scope::Project(project_of(&db, project).await?)
        };
        let mut conn = db.conn(&call::Call::default()).await?;
        let c = conn.client().await?;
        let (tables, exact) = admin::stats::table_counts(c, scope, exact).await?;
        let (database_bytes, oldest, newest) = admin::stats::overview(c, scope).await?;
        if json {
            let counts: serde_json::Map<String, serde_json::Value> = tables
                .iter()
                .map(|(t, n)| (t.clone(), (*n).into()))
                .collect();
            let out = serde_json::json!({
                "project": if all_projects { serde_json::Value::Null } else { project.into() },
                "exact": exact,
                "tables": counts,
                "database_bytes": database_bytes,
                "oldest_session": rfc3339(oldest),
                "newest_session": rfc3339(newest),
            });
            println!("{out}");
        } else {
            match scope {
                admin::stats::Scope::AllProjects => {
                    println!(
                        "every project ({}):",
                        if exact { "exact" } else { "estimated" }
                    );
                    println!("  database size {database_bytes} bytes");
                }
                admin::stats::Scope::Project(_) => println!("project {project}:"),
            }
            for (table, n) in &tables {
                println!("  {n:>12} {table}");
            }
            let at = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339())
            };
            println!("  sessions from {} to {}", at(oldest), at(newest));
        }
        Ok(())
    })
    .await
}

/// `verdict check [--project SLUG] [--stuck-after AGE] [--repair] [--json]`:
/// the integrity checks of CheckIntegrity; exits with [`EXIT_FOUND`] when
/// anything was found (repaired or not).
pub async fn check_command(
    config: &Config,
    project: &str,
    stuck_after: &str,
    repair: bool,
    json: bool,
) -> anyhow::Result<()> {
    let stuck_after =
        admin::parse_age(stuck_after).map_err(|e| anyhow::anyhow!("--stuck-after: {e}"))?;
    let findings = with_database(config, async |pg| {
        let db = command_db(config, pg).await?;
        let project_id = project_of(&db, project).await?;
        let mut conn = db.conn(&call::Call::default()).await?;
        let findings = if repair {
            let tx = conn.begin().await?;
            let findings = admin::integrity::check(&tx, project_id, stuck_after, true).await?;
            let call = call::Call::command_line("cli:check").in_project(project_id);
            audit::record(&tx, &call, &[], audit::Outcome::Updated).await?;
            tx.commit().await.map_err(error::Error::from)?;
            findings
        } else {
            admin::integrity::check(conn.client().await?, project_id, stuck_after, false).await?
        };
        Ok(findings)
    })
    .await?;
    let total: i64 = findings.iter().map(|f| f.count).sum();
    if json {
        let list: Vec<serde_json::Value> = findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "check": f.check,
                    "description": f.description,
                    "count": f.count,
                    "sample_ids": f.sample_ids,
                    "repaired": f.repaired,
                })
            })
            .collect();
        let out = serde_json::json!({
            "project": project,
            "findings": list,
            "total": total,
            "repair": repair,
        });
        println!("{out}");
    } else if findings.is_empty() {
        println!("project {project}: no findings");
    } else {
        for f in &findings {
            println!(
                "{:<40} {:>8} found {:>8} repaired  {}",
                f.check, f.count, f.repaired, f.description
            );
        }
    }
    if total > 0 {
        return Err(ExitStatus {
            code: EXIT_FOUND,
            message: format!("{total} integrity findings in project {project}"),
        }
        .into());
    }
    Ok(())
}

/// The URI of `addr` (`host:port` means plain-text HTTP/2); a wildcard
/// listen address is asked on loopback.
fn health_uri(addr: &str) -> String {
    let addr = addr
        .trim()
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]");
    if addr.contains("://") {
        addr
    } else {
        format!("http://{addr}")
    }
}

/// What `health` saw: the serving status's name, or UNREACHABLE.
async fn ask_health(
    uri: &str,
    service: &str,
    ca_cert: Option<&std::path::Path>,
    timeout: std::time::Duration,
) -> Result<String, String> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri.to_owned())
        .map_err(|e| format!("--addr {uri:?}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if uri.starts_with("https://") {
        let path = ca_cert.ok_or("an https:// address needs --ca-cert")?;
        let pem = std::fs::read(path).map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
        endpoint = endpoint
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            )
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {uri}: {e}"))?;
    match HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(reply) => Ok(ServingStatus::try_from(reply.into_inner().status)
            .unwrap_or(ServingStatus::Unknown)
            .as_str_name()
            .to_owned()),
        Err(status) if status.code() == tonic::Code::NotFound => Ok("SERVICE_UNKNOWN".into()),
        Err(status) => Err(format!(
            "{uri} answered {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// `verdict health [--addr ADDR] [--service NAME] [--json]`: exits 0 when
/// the gateway says SERVING, [`EXIT_FOUND`] when it answers anything else,
/// 1 when it cannot be reached.
pub async fn health_command(
    config: &Config,
    addr: Option<&str>,
    service: &str,
    ca_cert: Option<&std::path::Path>,
    timeout: std::time::Duration,
    json: bool,
) -> anyhow::Result<()> {
    let uri = health_uri(&addr.map_or_else(|| config.listen.to_string(), str::to_owned));
    let seen = ask_health(&uri, service, ca_cert, timeout).await;
    let (status, error) = match &seen {
        Ok(status) => (status.as_str(), None),
        Err(e) => ("UNREACHABLE", Some(e.as_str())),
    };
    if json {
        let out = serde_json::json!({
            "addr": uri,
            "service": service,
            "status": status,
            "error": error,
        });
        println!("{out}");
    } else {
        println!("{status}");
    }
    match seen {
        Ok(s) if s == "SERVING" => Ok(()),
        Ok(s) => Err(ExitStatus {
            code: EXIT_FOUND,
            message: format!("{uri} is {s}"),
        }
        .into()),
        Err(e) => Err(ExitStatus {
            code: 1,
            message: e,
        }
        .into()),
    }
}
