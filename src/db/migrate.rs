//! Schema migrations: refinery, embedded in the binary, applied under an
//! advisory lock so that replicas booting together migrate once.

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Key of the advisory lock held while migrating ("verdict" in ASCII).
const MIGRATION_LOCK: i64 = 0x7665_7264_6963_7401;

/// One migration and whether this database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    pub version: i32,
    pub name: String,
    pub checksum: String,
    /// When it was applied; `None` while pending.
    pub applied_at: Option<DateTime<Utc>>,
}

fn runner() -> refinery::Runner {
    embedded::migrations::runner()
        .set_abort_divergent(true)
        .set_abort_missing(true)
}

/// Applies every pending migration, each in its own transaction, while
/// holding the migration lock. Returns the versions applied by this call.
pub async fn run(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<i32>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("cannot take the migration lock")?;
    let result = async {
        refuse_unknown(client).await?;
        let report = runner()
            .run_async(client)
            .await
            .context("applying migrations failed")?;
        Ok::<_, anyhow::Error>(
            report
                .applied_migrations()
                .iter()
                .map(|m| m.version())
                .collect(),
        )
    }
    .await;
    // Released on disconnect too; unlocking now lets a waiting replica go on.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

/// Applies the migrations up to `version` only (tests of a migration load
/// data into the schema before it).
pub async fn run_to(client: &mut tokio_postgres::Client, version: i32) -> anyhow::Result<()> {
    runner()
        .set_target(refinery::Target::Version(version))
        .run_async(client)
        .await
        .context("applying migrations failed")?;
    Ok(())
}

/// Every migration this binary knows plus any the database has that it does
/// not, in version order.
pub async fn status(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<MigrationState>> {
    let applied = applied(client).await?;
    let mut states: Vec<MigrationState> = runner()
        .get_migrations()
        .iter()
        .map(|m| {
            let done = applied.iter().find(|a| a.version == m.version());
            MigrationState {
                version: m.version(),
                name: m.name().to_owned(),
                checksum: m.checksum().to_string(),
                applied_at: done.and_then(|a| a.applied_at),
            }
        })
        .collect();
    for a in applied {
        if !states.iter().any(|s| s.version == a.version) {
            states.push(a);
        }
    }
    states.sort_by_key(|s| s.version);
    Ok(states)
}

async fn applied(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<MigrationState>> {
    let table_exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !table_exists {
        return Ok(Vec::new());
    }
    let migrations = runner()
        .get_applied_migrations_async(client)
        .await
        .context("cannot read the applied migrations")?;
    Ok(migrations
        .into_iter()
        .map(|m| MigrationState {
            version: m.version(),
            name: m.name().to_owned(),
            checksum: m.checksum().to_string(),
            applied_at: m
                .applied_on()
                .and_then(|t| DateTime::<Utc>::from_timestamp(t.unix_timestamp(), t.nanosecond())),
        })
        .collect())
}

/// A database migrated by a newer gateway must not be served by this one.
async fn refuse_unknown(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    let known = runner();
    let known = known.get_migrations();
    for a in applied(client).await? {
        if !known.iter().any(|m| m.version() == a.version) {
            bail!(
                "the database holds migration V{}__{} that this gateway (verdict {}) does not know; it was migrated by a newer version — run that version or a newer one",
                a.version,
                a.name,
                env!("CARGO_PKG_VERSION")
            );
        }
    }
    Ok(())
}

/// Versions of the migrations embedded in this binary, ascending (they are
/// embedded in file-name order, where `V12__` comes before `V1__`).
pub fn known_versions() -> Vec<i32> {
    let mut versions: Vec<i32> = runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .collect();
    versions.sort_unstable();
    versions
}
