//! MetricsService handlers.

use super::rollups::{self, Locking};
use super::{Point, RollupPeriod, SeriesQuery, sql, validate_points};
use crate::audit::{self, Outcome};
use crate::convert::{opt_timestamp, timestamp};
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Result};
use crate::ingest::{self, Claim};
use crate::pagination;
use crate::proto::{self, metrics_service_server::MetricsService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use tonic::{Request, Response};

/// The MetricsService implementation.
pub struct MetricsApi {
    state: AppState,
}

impl MetricsApi {
    pub fn new(state: AppState) -> Self {
        MetricsApi { state }
    }
}

/// The content of a point for batch digests: labels sorted by key.
impl Content for Point {
    fn feed(&self, h: &mut Canonical) {
        h.str(&self.name)
            .f64(self.value)
            .str(&self.unit)
            .json(&self.labels)
            .time(&self.recorded_at);
    }
}

fn required_period(v: &mut Validator, raw: i32) -> RollupPeriod {
    v.required_enum("period", raw, RollupPeriod::from_proto)
        .unwrap_or(RollupPeriod::Day)
}

#[tonic::async_trait]
impl MetricsService for MetricsApi {
    async fn record_metric_points(
        &self,
        request: Request<proto::RecordMetricPointsRequest>,
    ) -> RpcResult<proto::RecordMetricPointsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let batch_id = v.required_text("batch_id", &req.batch_id, crate::sessions::MAX_REQUEST_ID);
        let points = validate_points(&mut v, req.points);
        v.finish()?;
        let digest = digest::of_batch("RecordMetricPoints", &points);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let claim = ingest::claim_batch(
            &tx,
            &call,
            "metric_points",
            "",
            &batch_id,
            &digest,
            points.len(),
        )
        .await?;
        let (recorded, replayed) = match claim {
            Claim::Replay { item_count } => (i64::from(item_count), true),
            Claim::New => {
                let written = sql::insert_points(&tx, project, &points).await?;
                crate::observability::ingest_rows("metric_points", written);
                (written as i64, false)
            }
        };
        let outcome = if replayed {
            Outcome::Replayed
        } else {
            Outcome::Appended
        };
        audit::record(&tx, &call, std::slice::from_ref(&batch_id), outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::RecordMetricPointsResponse {
            recorded,
            replayed,
        }))
    }

    async fn query_time_series(
        &self,
        request: Request<proto::QueryTimeSeriesRequest>,
    ) -> RpcResult<proto::QueryTimeSeriesResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let query = SeriesQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let (rows, estimated) = super::hours::series(conn.client().await?, project, &query).await?;
        Ok(Response::new(proto::QueryTimeSeriesResponse {
            percentiles_estimated: estimated,
            buckets: rows
                .into_iter()
                .map(|b| proto::TimeSeriesBucket {
                    start_time: Some(timestamp(b.start)),
                    count: b.count,
                    sum: b.sum,
                    avg: b.avg,
                    min: b.min,
                    max: b.max,
                    p50: b.p50,
                    p95: b.p95,
                    p99: b.p99,
                })
                .collect(),
        }))
    }

    async fn compute_rollups(
        &self,
        request: Request<proto::ComputeRollupsRequest>,
    ) -> RpcResult<proto::ComputeRollupsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let period = required_period(&mut v, req.period);
        let (from, to) = v.time_range("range", req.range.as_ref());
        if from.is_none() || to.is_none() {
            v.violation("range", "both start_time and end_time are required");
        }
        v.finish()?;
        let (from, to) = (from.expect("validated"), to.expect("validated"));
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let starts = rollups::compute(
            &tx,
            project,
            period,
            from,
            to,
            req.full_recompute,
            Locking::Wait,
        )
        .await?
        .unwrap_or_default();
        audit::record(&tx, &call, &[period.as_str().to_owned()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::ComputeRollupsResponse {
            period_starts: starts.into_iter().map(timestamp).collect(),
        }))
    }

    async fn list_rollups(
        &self,
        request: Request<proto::ListRollupsRequest>,
    ) -> RpcResult<proto::ListRollupsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let period = required_period(&mut v, req.period);
        let (from, to) = v.time_range("range", req.range.as_ref());
        let page_size = v.page_size("page_size", req.page_size);
        v.finish()?;
        let count = crate::totals::requested(req.count)?;
        let fingerprint = pagination::fingerprint("rollups", &(period, from, to));
        let after: Option<DateTime<Utc>> =
            pagination::decode("page_token", &req.page_token, &fingerprint)?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list_rollups(
            conn.client().await?,
            project,
            period,
            from,
            to,
            after,
            page_size + 1,
        )
        .await?;
        let rollups = rows
            .iter()
            .map(|r| to_proto(period, &r.0))
            .collect::<Result<Vec<_>>>()?;
        let (rollups, next_page_token) = pagination::page(
            rollups,
            page_size,
            self.state.max_message_bytes,
            &fingerprint,
            |last| {
                last.period_start
                    .as_ref()
                    .and_then(crate::convert::from_timestamp)
            },
            |rollup| rollup,
        )?;
        let (total, total_mode) = sql::count_rollups(
            conn.client().await?,
            project,
            period,
            from,
            to,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListRollupsResponse {
            rollups,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn list_metric_points(
        &self,
        request: Request<proto::ListMetricPointsRequest>,
    ) -> RpcResult<proto::ListMetricPointsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = super::readback::ListPoints::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = super::readback::list(c, project, &query).await?;
        let (points, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| last.key,
            |row| row.point,
        )?;
        let (total, total_mode) = super::readback::count(
            c,
            project,
            &query.filter,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListMetricPointsResponse {
            points,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn get_technology_usage(
        &self,
        request: Request<proto::GetTechnologyUsageRequest>,
    ) -> RpcResult<proto::GetTechnologyUsageResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let (from, to) = v.time_range("range", req.range.as_ref());
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::technology_usage(conn.client().await?, project, from, to).await?;
        Ok(Response::new(proto::GetTechnologyUsageResponse {
            pairs: rows
                .into_iter()
                .map(|u| proto::TechnologyUsage {
                    success_rate: (u.finished > 0).then(|| u.completed as f64 / u.finished as f64),
                    source_technology: u.source,
                    target_technology: u.target,
                    sessions: u.sessions,
                    completed: u.completed,
                    finished: u.finished,
                })
                .collect(),
        }))
    }
}

fn to_proto(period: RollupPeriod, r: &tokio_postgres::Row) -> Result<proto::Rollup> {
    let total: i64 = r.try_get("sessions_total")?;
    let completed: i64 = r.try_get("sessions_completed")?;
    let executions: i64 = r.try_get("test_executions")?;
    let passed: i64 = r.try_get("test_passed")?;
    let failed: i64 = r.try_get("test_failed_or_error")?;
    let pairs: serde_json::Value = r.try_get("technology_pairs")?;
    Ok(proto::Rollup {
        period: period.to_proto() as i32,
        period_start: Some(timestamp(r.try_get("period_start")?)),
        sessions_total: total,
        sessions_pending: r.try_get("sessions_pending")?,
        sessions_processing: r.try_get("sessions_processing")?,
        sessions_completed: completed,
        sessions_failed: r.try_get("sessions_failed")?,
        sessions_cancelled: r.try_get("sessions_cancelled")?,
        completion_rate: (total > 0).then(|| completed as f64 / total as f64),
        avg_fidelity: r.try_get("avg_fidelity")?,
        p95_fidelity: r.try_get("p95_fidelity")?,
        discrepancies_critical: r.try_get("discrepancies_critical")?,
        discrepancies_high: r.try_get("discrepancies_high")?,
        discrepancies_medium: r.try_get("discrepancies_medium")?,
        discrepancies_low: r.try_get("discrepancies_low")?,
        discrepancies_info: r.try_get("discrepancies_info")?,
        avg_session_duration_ms: r.try_get("avg_session_duration_ms")?,
        test_executions: executions,
        test_pass_rate: (passed + failed > 0).then(|| passed as f64 / (passed + failed) as f64),
        technology_pairs: pairs
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_i64().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default(),
        computed_at: opt_timestamp(r.try_get("computed_at")?),
    })
}
