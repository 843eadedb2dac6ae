//! SQL of AdminService.

use super::{AuditEvent, ListAuditEvents};
use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;

/// Every filter is a typed parameter; an unset one is NULL and drops out.
const LIST_AUDIT: Stmt = Stmt::new(
    "SELECT",
    "audit_events",
    "SELECT id, at, key_id, rpc, target_ids, outcome, trace_id FROM audit_events \
     WHERE ($1::text IS NULL OR key_id = $1) \
       AND ($2::text IS NULL OR rpc = $2) \
       AND ($3::text IS NULL OR target_ids @> ARRAY[$3::text]) \
       AND ($4::timestamptz IS NULL OR at >= $4) \
       AND ($5::timestamptz IS NULL OR at < $5) \
       AND ($6::bigint IS NULL OR id < $6) \
     ORDER BY id DESC LIMIT $7",
);

/// One page of events (plus one, to tell whether another page follows).
pub async fn list_audit(c: &impl GenericClient, q: &ListAuditEvents) -> Result<Vec<AuditEvent>> {
    let rows = LIST_AUDIT
        .query(
            c,
            &[
                &q.key_id,
                &q.rpc,
                &q.target_id,
                &q.from,
                &q.to,
                &q.before_id,
                &(q.page_size + 1),
            ],
        )
        .await?;
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
            })
        })
        .collect()
}
