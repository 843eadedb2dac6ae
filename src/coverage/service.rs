//! CoverageService handlers.

use super::readback;
use super::sql::{self, Change};
use super::{AggregateQuery, CompareQuery, Counters, NewReport, Report, TrendQuery, percent_delta};
use crate::audit::{self, Outcome};
use crate::convert::timestamp;
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Reason, Result};
use crate::proto::{self, coverage_service_server::CoverageService};
use crate::rpc::{self, RpcResult};
use crate::sessions;
use crate::state::AppState;
use tonic::{Request, Response};
use uuid::Uuid;

/// The CoverageService implementation.
pub struct CoverageApi {
    state: AppState,
}

impl CoverageApi {
    pub fn new(state: AppState) -> Self {
        CoverageApi { state }
    }
}

/// The content of RecordCoverage, for its digest: the key, the report's
/// fields and its files as a set (sorted by path). `recorded_at` counts as
/// sent: absent (the server's clock decides) differs from any instant.
impl Content for NewReport {
    fn feed(&self, h: &mut Canonical) {
        let counters = |h: &mut Canonical, c: &Counters| {
            h.i64(c.lines_covered)
                .i64(c.lines_total)
                .i64(c.branches_covered)
                .i64(c.branches_total)
                .i64(c.functions_covered)
                .i64(c.functions_total);
        };
        h.str(&self.commit_sha)
            .str(&self.subsystem)
            .str(&self.client_key)
            .str(&self.branch)
            .opt(self.session_id, |h, id| {
                h.bytes(id.as_bytes());
            })
            .opt(self.recorded_at.as_ref(), |h, t| {
                h.time(t);
            });
        counters(h, &self.totals);
        h.sorted(
            self.files.iter().collect(),
            |f| f.path.as_str(),
            |h, f| {
                h.str(&f.path);
                counters(h, &f.counters);
            },
        );
        crate::labels::feed(h, &self.labels);
    }
}

/// Decides a RecordCoverage whose key is taken. Same content: the stored
/// report, which is what the first call returned (reports never change)
/// and holds only what the caller sent plus the id, creation time and file
/// count. Other content: IDEMPOTENCY_KEY_REUSED. A report from before V11
/// has no digest and cannot be compared (its `recorded_at` may have been
/// the server's clock): the replay is refused the same way.
fn replay(
    new: &NewReport,
    digest: &[u8],
    stored: Report,
    stored_digest: Option<Vec<u8>>,
) -> Result<Report> {
    digest::check_replay(
        digest,
        stored_digest.as_deref(),
        || None,
        || {
            digest::key_reused(
                "client_key",
                &new.client_key,
                "a report of this commit and subsystem",
            )
        },
    )?;
    Ok(stored)
}

fn no_report(role: &str, commit: &str, subsystem: &str) -> Error {
    let scope = if subsystem.is_empty() {
        "the whole code base (no subsystem)".to_string()
    } else {
        format!("subsystem {subsystem:?}")
    };
    Error::FailedPrecondition(
        Reason::CoverageCommitMissing,
        format!(
            "the {role} commit {commit} has no coverage report for {scope}; record one before comparing"
        ),
    )
}

/// A report the call's project does not have.
fn report_not_found(id: Uuid) -> Error {
    Error::NotFound(format!("coverage report {id} not found"))
}

#[tonic::async_trait]
impl CoverageService for CoverageApi {
    async fn get_coverage_report(
        &self,
        request: Request<proto::GetCoverageReportRequest>,
    ) -> RpcResult<proto::GetCoverageReportResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = crate::validate::Validator::new();
        let id = v.uuid("id", &req.id);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let report = readback::get(conn.client().await?, project, id)
            .await?
            .ok_or_else(|| report_not_found(id))?;
        Ok(Response::new(proto::GetCoverageReportResponse {
            report: Some(report.into()),
        }))
    }

    async fn list_coverage_files(
        &self,
        request: Request<proto::ListCoverageFilesRequest>,
    ) -> RpcResult<proto::ListCoverageFilesResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = readback::ListFiles::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = readback::list_files(c, project, &query).await?;
        if rows.is_empty() && readback::get(c, project, query.report_id).await?.is_none() {
            return Err(report_not_found(query.report_id).into());
        }
        let (files, next_page_token) = crate::pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| last.path.clone(),
            |file| file,
        )?;
        let (total, total_mode) =
            readback::count_files(c, project, &query, count, self.state.count_exact_below)
                .await?
                .wire();
        Ok(Response::new(proto::ListCoverageFilesResponse {
            files,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn list_coverage_reports(
        &self,
        request: Request<proto::ListCoverageReportsRequest>,
    ) -> RpcResult<proto::ListCoverageReportsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = readback::ListReports::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = readback::list_reports(c, project, &query).await?;
        let (reports, next_page_token) = crate::pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            readback::report_key,
            Into::into,
        )?;
        let (total, total_mode) = readback::count_reports(
            c,
            project,
            &query.filter,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListCoverageReportsResponse {
            reports,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn record_coverage(
        &self,
        request: Request<proto::RecordCoverageRequest>,
    ) -> RpcResult<proto::RecordCoverageResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let new = NewReport::try_from(req)?;
        let digest = digest::of("RecordCoverage", &new);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        // A replay is recognised first, even once the session stopped
        // accepting writes: it writes nothing.
        let (report, created) = match sql::get_for_replay(&tx, project, &new).await? {
            Some((stored, stored_digest)) => (replay(&new, &digest, stored, stored_digest)?, false),
            None => {
                if let Some(session_id) = new.session_id {
                    // Another project's session is not found, whatever its
                    // status.
                    sessions::sql::lock_accepting(&tx, project, session_id).await?;
                }
                match sql::insert(&tx, project, Uuid::now_v7(), &new, &digest).await? {
                    Some(report) => {
                        sql::copy_files(&tx, project, &report, &new).await?;
                        (report, true)
                    }
                    // A concurrent first call took the key and committed.
                    None => {
                        let (stored, stored_digest) = sql::get_for_replay(&tx, project, &new)
                            .await?
                            .ok_or_else(|| {
                                Error::Aborted(
                                    Reason::ConcurrentChange,
                                    "the report with this key was deleted concurrently; retry"
                                        .into(),
                                )
                            })?;
                        (replay(&new, &digest, stored, stored_digest)?, false)
                    }
                }
            }
        };
        let outcome = if created {
            Outcome::Created
        } else {
            Outcome::Replayed
        };
        audit::record(&tx, &call, &[report.id.to_string()], outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::RecordCoverageResponse {
            report: Some(report.into()),
            created,
        }))
    }

    async fn get_aggregate_coverage(
        &self,
        request: Request<proto::GetAggregateCoverageRequest>,
    ) -> RpcResult<proto::GetAggregateCoverageResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let query = AggregateQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::aggregate(conn.client().await?, project, &query).await?;
        let mut out = proto::GetAggregateCoverageResponse {
            counters: Some(Counters::default().into()),
            percentages: Some(Counters::default().percentages()),
            ..Default::default()
        };
        for row in rows {
            match row.subsystem {
                None => {
                    out.report_count = row.report_count;
                    out.percentages = Some(row.counters.percentages());
                    out.counters = Some(row.counters.into());
                }
                Some(subsystem) => out.by_subsystem.push(proto::SubsystemCoverage {
                    subsystem,
                    report_count: row.report_count,
                    percentages: Some(row.counters.percentages()),
                    counters: Some(row.counters.into()),
                }),
            }
        }
        Ok(Response::new(out))
    }

    async fn get_coverage_trend(
        &self,
        request: Request<proto::GetCoverageTrendRequest>,
    ) -> RpcResult<proto::GetCoverageTrendResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let query = TrendQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let buckets = sql::trend(conn.client().await?, project, &query).await?;
        Ok(Response::new(proto::GetCoverageTrendResponse {
            buckets: buckets
                .into_iter()
                .map(|b| proto::CoverageBucket {
                    start_time: Some(timestamp(b.start)),
                    end_time: Some(timestamp(b.end)),
                    report_count: b.report_count,
                    percentages: Some(b.counters.percentages()),
                    counters: Some(b.counters.into()),
                })
                .collect(),
        }))
    }

    async fn compare_coverage(
        &self,
        request: Request<proto::CompareCoverageRequest>,
    ) -> RpcResult<proto::CompareCoverageResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let q = CompareQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let base = sql::latest_of_commit(c, project, &q.base, &q.subsystem)
            .await?
            .ok_or_else(|| no_report("base", &q.base, &q.subsystem))?;
        let head = sql::latest_of_commit(c, project, &q.head, &q.subsystem)
            .await?
            .ok_or_else(|| no_report("head", &q.head, &q.subsystem))?;
        let files_compared = base.file_count > 0 && head.file_count > 0;
        let (files, counts) = if files_compared {
            sql::file_diff(c, project, base.id, head.id, q.max_files).await?
        } else {
            (Vec::new(), sql::DiffCounts::default())
        };
        let (b, h) = (base.totals, head.totals);
        let totals_delta = proto::CoverageDelta {
            counters: Some(h.minus(b).into()),
            lines_percent: percent_delta(h.lines_percent(), b.lines_percent()),
            branches_percent: percent_delta(h.branches_percent(), b.branches_percent()),
            functions_percent: percent_delta(h.functions_percent(), b.functions_percent()),
        };
        let files_truncated = (files.len() as i64) < counts.added + counts.removed + counts.changed;
        Ok(Response::new(proto::CompareCoverageResponse {
            base: Some(base.into()),
            head: Some(head.into()),
            totals_delta: Some(totals_delta),
            files_added: counts.added,
            files_removed: counts.removed,
            files_changed: counts.changed,
            files: files
                .into_iter()
                .map(|f| proto::FileDelta {
                    lines_percent_delta: percent_delta(
                        f.head.and_then(|c| c.lines_percent()),
                        f.base.and_then(|c| c.lines_percent()),
                    ),
                    path: f.path,
                    change: match f.change {
                        Change::Added => proto::FileChange::Added,
                        Change::Removed => proto::FileChange::Removed,
                        Change::Changed => proto::FileChange::Changed,
                    } as i32,
                    base: f.base.map(Into::into),
                    head: f.head.map(Into::into),
                })
                .collect(),
            files_truncated,
            files_compared,
        }))
    }
}
