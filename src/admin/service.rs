//! AdminService handlers.

use super::{ListAuditEvents, cleanup, export, integrity, retention, sql, stats};
use crate::audit::{self, Outcome};
use crate::call::Call;
use crate::convert::{opt_timestamp, timestamp};
use crate::db::migrate;
use crate::error::{Error, Result};
use crate::pagination;
use crate::proto::{self, admin_service_server::AdminService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use chrono::Utc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The AdminService implementation.
pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        AdminApi { state }
    }

    /// Records an admin call that writes nothing, in a transaction of its own.
    async fn audit_read(&self, call: &Call, targets: &[String]) -> Result<()> {
        let mut conn = self.state.db.conn(call).await?;
        let tx = conn.begin().await?;
        audit::record(&tx, call, targets, Outcome::Read).await?;
        tx.commit().await.map_err(Error::from)
    }
}

fn counts(rows: impl IntoIterator<Item = (String, i64)>, exact: bool) -> Vec<proto::TableCount> {
    rows.into_iter()
        .map(|(table, rows)| proto::TableCount { table, rows, exact })
        .collect()
}

type ExportStream = ReceiverStream<Result<proto::ExportSessionResponse, Status>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_stats(
        &self,
        request: Request<proto::GetStatsRequest>,
    ) -> RpcResult<proto::GetStatsResponse> {
        let (call, req) = rpc::split(request);
        let scope = if req.all_projects {
            super::cross_project(&call)?;
            stats::Scope::AllProjects
        } else {
            stats::Scope::Project(call.project()?)
        };
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let (tables, exact) = stats::table_counts(c, scope, req.exact).await?;
        let (size, oldest, newest) = stats::overview(c, scope).await?;
        let pool = self.state.db.stats();
        drop(conn);
        self.audit_read(&call, &[]).await?;
        Ok(Response::new(proto::GetStatsResponse {
            tables: counts(tables, exact),
            database_size_bytes: size,
            oldest_session_at: opt_timestamp(oldest),
            newest_session_at: opt_timestamp(newest),
            pool: Some(proto::PoolStats {
                size: pool.size as i64,
                available: pool.available as i64,
                waiting: pool.waiting as i64,
                max_size: pool.max_size as i64,
            }),
        }))
    }

    async fn cleanup(
        &self,
        request: Request<proto::CleanupRequest>,
    ) -> RpcResult<proto::CleanupResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let older_than = v.duration(
            "older_than",
            req.older_than.as_ref(),
            super::MIN_AGE,
            super::MAX_AGE,
        );
        let cutoff = v.timestamp("cutoff", req.cutoff.as_ref());
        if req.older_than.is_some() == req.cutoff.is_some() {
            v.violation("older_than", "set exactly one of older_than and cutoff");
        }
        let batch = match req.batch_size {
            0 => 500,
            n @ 1..=10_000 => i64::from(n),
            _ => {
                v.violation("batch_size", "must be between 0 (default 500) and 10000");
                500
            }
        };
        v.finish()?;
        let cutoff = match (cutoff, older_than) {
            (Some(c), _) => c,
            (None, Some(age)) => chrono::Duration::from_std(age)
                .ok()
                .and_then(|age| Utc::now().checked_sub_signed(age))
                .ok_or_else(|| Error::invalid("older_than", "is too long"))?,
            (None, None) => unreachable!("validated above"),
        };
        let mut conn = self.state.db.conn(&call).await?;
        // The other kinds (not the audit trail) by the project's retention,
        // in batches of at most `batch` rows.
        let settings = retention::Settings {
            batch_size: batch,
            ..self.state.retention
        };
        let overrides =
            crate::projects::sql::retention_of(conn.client().await?, call.project()?).await?;
        let now = Utc::now();
        let report = if req.dry_run {
            let c = conn.client().await?;
            let mut report = cleanup::dry_run(c, call.project()?, cutoff).await?;
            let more = retention::dry_run(c, &settings, call.project()?, &overrides, now).await?;
            report.merge(&more.deleted);
            drop(conn);
            self.audit_read(&call, &[]).await?;
            report
        } else {
            let mut report = cleanup::run(&mut conn, &call, cutoff, batch).await?;
            let more = retention::apply(&mut conn, &call, &settings, &overrides, now, false, false)
                .await?;
            report.merge(&more.deleted);
            report.batches += more.batches;
            report
        };
        Ok(Response::new(proto::CleanupResponse {
            deleted: counts(
                report.deleted.into_iter().map(|(t, n)| (t.to_owned(), n)),
                true,
            ),
            cutoff: Some(timestamp(cutoff)),
            batches: report.batches,
            dry_run: req.dry_run,
        }))
    }

    async fn check_integrity(
        &self,
        request: Request<proto::CheckIntegrityRequest>,
    ) -> RpcResult<proto::CheckIntegrityResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let stuck_after = v
            .duration(
                "stuck_after",
                req.stuck_after.as_ref(),
                Duration::ZERO,
                super::MAX_AGE,
            )
            .filter(|d| !d.is_zero())
            .unwrap_or(super::DEFAULT_STUCK_AFTER);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let findings = integrity::check(&tx, call.project()?, stuck_after, req.repair).await?;
        let outcome = if req.repair {
            Outcome::Updated
        } else {
            Outcome::Read
        };
        audit::record(&tx, &call, &[], outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        let repaired = req.repair && findings.iter().any(|f| f.repaired > 0);
        Ok(Response::new(proto::CheckIntegrityResponse {
            findings: findings
                .into_iter()
                .map(|f| proto::IntegrityFinding {
                    check: f.check.into(),
                    count: f.count,
                    description: f.description.into(),
                    sample_ids: f.sample_ids,
                    repaired: f.repaired,
                })
                .collect(),
            repaired,
        }))
    }

    async fn get_migration_status(
        &self,
        request: Request<proto::GetMigrationStatusRequest>,
    ) -> RpcResult<proto::GetMigrationStatusResponse> {
        let (call, _) = rpc::split(request);
        let mut conn = self.state.db.conn(&call).await?;
        let known = migrate::known_versions();
        let states = migrate::status(conn.client_mut())
            .await
            .map_err(|e| Error::Internal(format!("{e:#}")))?;
        drop(conn);
        self.audit_read(&call, &[]).await?;
        Ok(Response::new(proto::GetMigrationStatusResponse {
            migrations: states
                .into_iter()
                .map(|m| proto::Migration {
                    known: known.contains(&m.version),
                    version: m.version,
                    name: m.name,
                    checksum: m.checksum,
                    applied_at: opt_timestamp(m.applied_at),
                })
                .collect(),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> RpcResult<proto::ListAuditEventsResponse> {
        let (call, req) = rpc::split(request);
        let count = crate::totals::requested(req.count)?;
        let query = ListAuditEvents::try_from(req)?;
        let project = if query.all_projects {
            super::cross_project(&call)?;
            None
        } else {
            Some(call.project()?)
        };
        let mut conn = self.state.db.conn(&call).await?;
        // Reading the trail is an admin call: it is recorded too, after the
        // read so a page never shows the call that fetched it.
        let tx = conn.begin().await?;
        let rows = sql::list_audit(&tx, project, &query).await?;
        let total =
            sql::count_audit(&tx, project, &query, count, self.state.count_exact_below).await?;
        audit::record(&tx, &call, &[], Outcome::Read).await?;
        tx.commit().await.map_err(Error::from)?;
        let (events, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| last.id,
            Into::into,
        )?;
        let (total, total_mode) = total.wire();
        Ok(Response::new(proto::ListAuditEventsResponse {
            events,
            next_page_token,
            total,
            total_mode,
        }))
    }

    type ExportSessionStream = ExportStream;

    async fn export_session(
        &self,
        request: Request<proto::ExportSessionRequest>,
    ) -> RpcResult<Self::ExportSessionStream> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let session_id = v.uuid("session_id", &req.session_id);
        v.finish()?;
        let project = call.project()?;
        self.audit_read(&call, &[session_id.to_string()]).await?;
        // Fail the call itself (not the stream) when the project has no such
        // session (whether or not another project has one).
        {
            let mut conn = self.state.db.conn(&Call::default()).await?;
            if !sql::session_in_project(conn.client().await?, project, session_id).await? {
                return Err(Error::NotFound(format!("session {session_id} not found")).into());
            }
        }
        // One message in the channel and one being packed: with batches of
        // about one message, memory stays a few messages whatever the size.
        let (tx, rx) = mpsc::channel(1);
        let db = self.state.db.clone();
        let limit = self.state.max_message_bytes;
        tokio::spawn(
            async move {
                let mut chunks = export::Chunks::new(&tx, limit);
                let produced = async {
                    let mut conn = db.conn(&Call::default()).await?;
                    let snapshot = conn.begin_snapshot().await?;
                    let stats =
                        export::run(&snapshot, project, session_id, limit, &mut chunks).await?;
                    snapshot.commit().await.map_err(Error::from)?;
                    Ok::<_, Error>(stats)
                }
                .await;
                match produced {
                    Ok(stats) => {
                        if chunks.flush().await {
                            tracing::info!(
                                records = stats.records,
                                messages = chunks.messages,
                                fetches = stats.fetches,
                                largest_fetch_rows = stats.largest_fetch_rows,
                                largest_fetch_bytes = stats.largest_fetch_bytes,
                                "session exported"
                            );
                        }
                    }
                    // Records packed before the failure are not sent: the
                    // stream ends with the error right after what was sent.
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
