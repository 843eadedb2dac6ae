//! SQL of AdminService.

use super::{AuditEvent, ListAuditEvents};
use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// One project's trail. Every filter is a typed parameter; an unset one is
/// NULL and drops out.
const LIST_AUDIT: Stmt = Stmt::new(
    "SELECT",
    "audit_events",
    "SELECT id, at, key_id, rpc, target_ids, outcome, trace_id, project_id FROM audit_events \
     WHERE project_id = $8 \
       AND ($1::text IS NULL OR key_id = $1) \
       AND ($2::text IS NULL OR rpc = $2) \
       AND ($3::text IS NULL OR target_ids @> ARRAY[$3::text]) \
       AND ($4::timestamptz IS NULL OR at >= $4) \
       AND ($5::timestamptz IS NULL OR at < $5) \
       AND ($6::bigint IS NULL OR id < $6) \
     ORDER BY id DESC LIMIT $7",
);

/// Every project's trail (an operator's cross-project read): LIST_AUDIT
/// without the project, a statement of its own so that the per-project
/// one keeps a plan on the indexes that lead with `project_id`.
const LIST_AUDIT_ALL: Stmt = Stmt::new(
    "SELECT",
    "audit_events",
    "SELECT id, at, key_id, rpc, target_ids, outcome, trace_id, project_id FROM audit_events \
     WHERE ($1::text IS NULL OR key_id = $1) \
       AND ($2::text IS NULL OR rpc = $2) \
       AND ($3::text IS NULL OR target_ids @> ARRAY[$3::text]) \
       AND ($4::timestamptz IS NULL OR at >= $4) \
       AND ($5::timestamptz IS NULL OR at < $5) \
       AND ($6::bigint IS NULL OR id < $6) \
     ORDER BY id DESC LIMIT $7",
);

const SESSION_IN_PROJECT: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT EXISTS (SELECT 1 FROM sessions WHERE project_id = $1 AND id = $2)",
);

/// Whether `project` holds the session `id`.
pub async fn session_in_project(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<bool> {
    Ok(SESSION_IN_PROJECT
        .query_one(c, &[&project, &id])
        .await?
        .try_get(0)?)
}

/// The total of ListAuditEvents in one project: LIST_AUDIT's filters,
/// without paging.
const COUNT_AUDIT: crate::totals::Counter = crate::counter!(
    "audit_events",
    "audit_events \
     WHERE project_id = $6 \
       AND ($1::text IS NULL OR key_id = $1) \
       AND ($2::text IS NULL OR rpc = $2) \
       AND ($3::text IS NULL OR target_ids @> ARRAY[$3::text]) \
       AND ($4::timestamptz IS NULL OR at >= $4) \
       AND ($5::timestamptz IS NULL OR at < $5)"
);

/// The total of ListAuditEvents over every project (LIST_AUDIT_ALL's
/// filters, without paging).
const COUNT_AUDIT_ALL: crate::totals::Counter = crate::counter!(
    "audit_events",
    "audit_events \
     WHERE ($1::text IS NULL OR key_id = $1) \
       AND ($2::text IS NULL OR rpc = $2) \
       AND ($3::text IS NULL OR target_ids @> ARRAY[$3::text]) \
       AND ($4::timestamptz IS NULL OR at >= $4) \
       AND ($5::timestamptz IS NULL OR at < $5)"
);

/// How many events of `project` (of every project with `None`) pass `q`'s
/// filters, counted as `mode` asks.
pub async fn count_audit(
    c: &impl GenericClient,
    project: Option<Uuid>,
    q: &ListAuditEvents,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let filters: [&(dyn ToSql + Sync); 5] = [&q.key_id, &q.rpc, &q.target_id, &q.from, &q.to];
    match project {
        Some(project) => {
            let mut params = filters.to_vec();
            params.push(&project);
            crate::totals::count(c, &COUNT_AUDIT, &params, mode, exact_below).await
        }
        None => crate::totals::count(c, &COUNT_AUDIT_ALL, &filters, mode, exact_below).await,
    }
}

/// One page of events (plus one, to tell whether another page follows) of
/// `project`, or of every project with `None`.
pub async fn list_audit(
    c: &impl GenericClient,
    project: Option<Uuid>,
    q: &ListAuditEvents,
) -> Result<Vec<AuditEvent>> {
    let limit = q.page_size + 1;
    let filters: [&(dyn ToSql + Sync); 7] = [
        &q.key_id,
        &q.rpc,
        &q.target_id,
        &q.from,
        &q.to,
        &q.before_id,
        &limit,
    ];
    let rows = match project {
        Some(project) => {
            let mut params = filters.to_vec();
            params.push(&project);
            LIST_AUDIT.query(c, &params).await?
        }
        None => LIST_AUDIT_ALL.query(c, &filters).await?,
    };
    rows.iter()
        .map(|r| {
            Ok(AuditEvent {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                key_id: r.try_get(2)?,
                rpc: r.try_get(3)?,
                target_ids: r.try_get(4)?,
                outcome: r.try_get(5)?,
                trace_id: r.try_get(6)?,
                project_id: r.try_get(7)?,
            })
        })
        .collect()
}
