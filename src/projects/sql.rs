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
