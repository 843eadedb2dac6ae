//! The statements of projects.

use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

const ID_OF: Stmt = Stmt::new(
    "SELECT",
    "projects",
    "SELECT id FROM projects WHERE slug = $1",
);

/// The id of the project `slug`; `None` when there is none.
pub async fn id_of(c: &impl GenericClient, slug: &str) -> Result<Option<Uuid>> {
    Ok(match ID_OF.query_opt(c, &[&slug]).await? {
        Some(row) => Some(row.try_get(0)?),
        None => None,
    })
}

/// A stored project.
#[derive(Debug, Clone)]
pub struct ProjectRow {
    pub id: Uuid,
    pub slug: String,
    pub display_name: String,
    pub description: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
    pub version: i64,
    /// Retention overrides in days, in `admin::retention::Kind::ALL` order
    /// (`None` inherits the gateway's default, 0 keeps forever).
    pub retention: crate::admin::retention::Days,
}

/// The retention columns, in `admin::retention::Kind::ALL` order.
macro_rules! retention_columns {
    () => {
        "retention_sessions_days, retention_executions_days, retention_coverage_days, \
         retention_test_runs_days, retention_metric_points_days, retention_metric_rollups_days, \
         retention_ingest_days, retention_resolutions_days, retention_audit_events_days"
    };
}

macro_rules! columns {
    () => {
        concat!(
            "id, slug, display_name, description, created_at, updated_at, version, ",
            retention_columns!()
        )
    };
}

fn retention_from(
    row: &tokio_postgres::Row,
    first: usize,
) -> Result<crate::admin::retention::Days> {
    let mut days: crate::admin::retention::Days = [None; 9];
    for (i, d) in days.iter_mut().enumerate() {
        *d = row.try_get(first + i)?;
    }
    Ok(days)
}

fn from_row(row: &tokio_postgres::Row) -> Result<ProjectRow> {
    Ok(ProjectRow {
        id: row.try_get(0)?,
        slug: row.try_get(1)?,
        display_name: row.try_get(2)?,
        description: row.try_get(3)?,
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        version: row.try_get(6)?,
        retention: retention_from(row, 7)?,
    })
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "projects",
    concat!(
        "INSERT INTO projects (slug, display_name, description) VALUES ($1, $2, $3) \
         ON CONFLICT (slug) DO NOTHING RETURNING ",
        columns!()
    ),
);

const BY_SLUG: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!("SELECT ", columns!(), " FROM projects WHERE slug = $1"),
);

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!("SELECT ", columns!(), " FROM projects WHERE id = $1"),
);

const BY_SLUG_FOR_UPDATE: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!(
        "SELECT ",
        columns!(),
        " FROM projects WHERE slug = $1 FOR UPDATE"
    ),
);

// Every project, or (a bound key) only `$2`; keyset on the slug.
const LIST: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!(
        "SELECT ",
        columns!(),
        " FROM projects \
         WHERE ($1::text IS NULL OR slug > $1) AND ($2::uuid IS NULL OR id = $2) \
         ORDER BY slug LIMIT $3"
    ),
);

// $4: whether to replace the retention overrides with $5..$13 (in
// `admin::retention::Kind::ALL` order; NULL inherits).
const UPDATE: Stmt = Stmt::new(
    "UPDATE",
    "projects",
    concat!(
        "UPDATE projects SET display_name = COALESCE($2, display_name), \
           description = COALESCE($3, description), \
           retention_sessions_days = CASE WHEN $4 THEN $5 ELSE retention_sessions_days END, \
           retention_executions_days = CASE WHEN $4 THEN $6 ELSE retention_executions_days END, \
           retention_coverage_days = CASE WHEN $4 THEN $7 ELSE retention_coverage_days END, \
           retention_test_runs_days = CASE WHEN $4 THEN $8 ELSE retention_test_runs_days END, \
           retention_metric_points_days = \
               CASE WHEN $4 THEN $9 ELSE retention_metric_points_days END, \
           retention_metric_rollups_days = \
               CASE WHEN $4 THEN $10 ELSE retention_metric_rollups_days END, \
           retention_ingest_days = CASE WHEN $4 THEN $11 ELSE retention_ingest_days END, \
           retention_resolutions_days = CASE WHEN $4 THEN $12 ELSE retention_resolutions_days END, \
           retention_audit_events_days = \
               CASE WHEN $4 THEN $13 ELSE retention_audit_events_days END, \
           updated_at = now(), version = version + 1 \
         WHERE id = $1 RETURNING ",
        columns!()
    ),
);

// What a project holds that DeleteProject without `force` refuses to lose:
// sessions (with everything of them), test cases (with their executions),
// coverage reports and metric points.
const HOLDINGS: Stmt = Stmt::new(
    "SELECT",
    "projects",
    "SELECT (SELECT count(*) FROM sessions WHERE project_id = $1), \
            (SELECT count(*) FROM test_cases WHERE project_id = $1), \
            EXISTS (SELECT 1 FROM coverage_reports WHERE project_id = $1) \
         OR EXISTS (SELECT 1 FROM metric_points WHERE project_id = $1) \
         OR EXISTS (SELECT 1 FROM test_executions WHERE project_id = $1)",
);

const RETENTION_OF_ALL: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!(
        "SELECT id, ",
        retention_columns!(),
        " FROM projects ORDER BY id"
    ),
);

const RETENTION_OF: Stmt = Stmt::new(
    "SELECT",
    "projects",
    concat!(
        "SELECT id, ",
        retention_columns!(),
        " FROM projects WHERE id = $1"
    ),
);

const DELETE: Stmt = Stmt::new("DELETE", "projects", "DELETE FROM projects WHERE id = $1");

/// Inserts a project; `None` when its slug is taken.
pub async fn insert(
    c: &impl GenericClient,
    slug: &str,
    display_name: &str,
    description: &str,
) -> Result<Option<ProjectRow>> {
    INSERT
        .query_opt(c, &[&slug, &display_name, &description])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The project `slug`.
pub async fn by_slug(c: &impl GenericClient, slug: &str) -> Result<Option<ProjectRow>> {
    BY_SLUG
        .query_opt(c, &[&slug])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The project `id`.
pub async fn by_id(c: &impl GenericClient, id: Uuid) -> Result<Option<ProjectRow>> {
    BY_ID
        .query_opt(c, &[&id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The project `slug`, locked for an update or deletion.
pub async fn lock(c: &impl GenericClient, slug: &str) -> Result<Option<ProjectRow>> {
    BY_SLUG_FOR_UPDATE
        .query_opt(c, &[&slug])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The total of ListProjects: every project, or (a bound key) only `$1`.
const COUNT: crate::totals::Counter =
    crate::counter!("projects", "projects WHERE ($1::uuid IS NULL OR id = $1)");

/// How many projects a caller bound to `only` (None: any) sees.
pub async fn count(
    c: &impl GenericClient,
    only: Option<Uuid>,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    crate::totals::count(c, &COUNT, &[&only], mode, exact_below).await
}

/// Up to `limit` projects after `after` by slug, all or only `only`.
pub async fn list(
    c: &impl GenericClient,
    after: Option<&str>,
    only: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ProjectRow>> {
    LIST.query(c, &[&after, &only, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Sets the fields given; `retention`, when given, replaces every
/// retention override.
pub async fn update(
    c: &impl GenericClient,
    id: Uuid,
    display_name: Option<&str>,
    description: Option<&str>,
    retention: Option<&crate::admin::retention::Days>,
) -> Result<ProjectRow> {
    let replace = retention.is_some();
    let d = retention.copied().unwrap_or([None; 9]);
    from_row(
        &UPDATE
            .query_one(
                c,
                &[
                    &id,
                    &display_name,
                    &description,
                    &replace,
                    &d[0],
                    &d[1],
                    &d[2],
                    &d[3],
                    &d[4],
                    &d[5],
                    &d[6],
                    &d[7],
                    &d[8],
                ],
            )
            .await?,
    )
}

/// What the project holds: (sessions, test cases, anything at all).
pub async fn holdings(c: &impl GenericClient, id: Uuid) -> Result<(i64, i64, bool)> {
    let row = HOLDINGS.query_one(c, &[&id]).await?;
    let (sessions, test_cases, other): (i64, i64, bool) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    Ok((
        sessions,
        test_cases,
        other || sessions > 0 || test_cases > 0,
    ))
}

/// Deletes the project and, by cascade, everything it holds.
pub async fn delete(c: &impl GenericClient, id: Uuid) -> Result<()> {
    DELETE.execute(c, &[&id]).await?;
    Ok(())
}

/// Every project's id with its retention overrides, by id.
pub async fn retention_of_all(
    c: &impl GenericClient,
) -> Result<Vec<(Uuid, crate::admin::retention::Days)>> {
    RETENTION_OF_ALL
        .query(c, &[])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, retention_from(r, 1)?)))
        .collect()
}

/// The retention overrides of the project `id` (all `None` when there is
/// no such project).
pub async fn retention_of(
    c: &impl GenericClient,
    id: Uuid,
) -> Result<crate::admin::retention::Days> {
    match RETENTION_OF.query_opt(c, &[&id]).await? {
        Some(row) => retention_from(&row, 1),
        None => Ok([None; 9]),
    }
}
