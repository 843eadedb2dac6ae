//! ResultService handlers.

use super::{ListResults, NewResult, ValidationResult, sql};
use crate::audit::{self, Outcome};
use crate::convert::JsonDoc;
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Reason, Result};
use crate::pagination;
use crate::proto::{self, result_service_server::ResultService};
use crate::rpc::{self, RpcResult};
use crate::sessions;
use crate::state::AppState;
use crate::validate::Validator;
use tonic::{Request, Response};
use uuid::Uuid;

/// The content of RecordResult, for its digest: everything the caller sets
/// (representations with their keys sorted).
impl Content for NewResult {
    fn feed(&self, h: &mut Canonical) {
        h.bytes(self.session_id.as_bytes())
            .str(&self.request_id)
            .str(self.result_type.as_str())
            .str(self.overall_status.as_str())
            .f64(self.fidelity_score)
            .str(&self.summary)
            .i64(self.execution_time_ms)
            .json(&self.source_representation)
            .json(&self.target_representation);
    }
}

impl From<&ValidationResult> for NewResult {
    fn from(r: &ValidationResult) -> Self {
        NewResult {
            session_id: r.session_id,
            request_id: r.request_id.clone(),
            result_type: r.result_type,
            overall_status: r.overall_status,
            fidelity_score: r.fidelity_score,
            summary: r.summary.clone(),
            execution_time_ms: r.execution_time_ms,
            source_representation: JsonDoc::json_or_null(r.source_representation.as_ref()),
            target_representation: JsonDoc::json_or_null(r.target_representation.as_ref()),
        }
    }
}

/// Decides a RecordResult whose request_id is taken in the session. Same
/// content: the stored result, which is what the first call returned
/// (results never change) and holds only what the caller sent plus the id
/// and creation time. Other content: IDEMPOTENCY_KEY_REUSED. A result from
/// before V11 has no digest: it is recomputed from the row.
fn replay(
    new: &NewResult,
    digest: &[u8],
    stored: ValidationResult,
    stored_digest: Option<Vec<u8>>,
) -> Result<ValidationResult> {
    digest::check_replay(
        digest,
        stored_digest.as_deref(),
        || Some(digest::of("RecordResult", &NewResult::from(&stored))),
        || digest::key_reused("request_id", &new.request_id, "a result of this session"),
    )?;
    Ok(stored)
}

/// The ResultService implementation.
pub struct ResultApi {
    state: AppState,
}

impl ResultApi {
    pub fn new(state: AppState) -> Self {
        ResultApi { state }
    }
}

#[tonic::async_trait]
impl ResultService for ResultApi {
    async fn record_result(
        &self,
        request: Request<proto::RecordResultRequest>,
    ) -> RpcResult<proto::RecordResultResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let new = NewResult::try_from(req)?;
        let digest = digest::of("RecordResult", &new);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        // A replay is recognised first, even once the session stopped
        // accepting writes: it writes nothing.
        let stored = sql::get_for_replay(&tx, project, new.session_id, &new.request_id).await?;
        let (result, created) = match stored {
            Some((stored, stored_digest)) => (replay(&new, &digest, stored, stored_digest)?, false),
            None => {
                // NOT_FOUND for a session of another project.
                sessions::sql::lock_accepting(&tx, project, new.session_id).await?;
                match sql::insert(&tx, project, Uuid::now_v7(), &new, &digest).await? {
                    Some(r) => (r, true),
                    // A concurrent first call took the key and committed.
                    None => {
                        let (stored, stored_digest) =
                            sql::get_for_replay(&tx, project, new.session_id, &new.request_id)
                                .await?
                                .ok_or_else(|| {
                                    Error::Aborted(
                                        Reason::ConcurrentChange,
                                        "the result was deleted concurrently; retry".into(),
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
        let targets = [new.session_id.to_string(), result.id.to_string()];
        audit::record(&tx, &call, &targets, outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::RecordResultResponse {
            result: Some(result.into()),
            created,
        }))
    }

    async fn get_result(
        &self,
        request: Request<proto::GetResultRequest>,
    ) -> RpcResult<proto::GetResultResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let id = v.uuid("id", &req.id);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let result = sql::get(conn.client().await?, project, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("result {id} not found")))?;
        Ok(Response::new(proto::GetResultResponse {
            result: Some(result.into()),
        }))
    }

    async fn list_results(
        &self,
        request: Request<proto::ListResultsRequest>,
    ) -> RpcResult<proto::ListResultsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = ListResults::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let max_bytes = i64::try_from(self.state.max_message_bytes).unwrap_or(i64::MAX);
        let rows = sql::list(conn.client().await?, project, &query, max_bytes).await?;
        // The results are written straight from their rows.
        let (encoded_results, next_page_token) = pagination::page_encoded(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::row_key,
            |row, out| sql::result_to_wire(row, 1, out),
        )?;
        let (total, total_mode) = sql::count(
            conn.client().await?,
            project,
            &query.filter,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListResultsResponse {
            encoded_results,
            next_page_token,
            total,
            total_mode,
            ..Default::default()
        }))
    }
}
