//! ResultService handlers.

use super::{ListResults, NewResult, sql};
use crate::audit::{self, Outcome};
use crate::error::{Error, Reason};
use crate::pagination;
use crate::proto::{self, result_service_server::ResultService};
use crate::rpc::{self, RpcResult};
use crate::sessions;
use crate::state::AppState;
use crate::validate::Validator;
use tonic::{Request, Response};
use uuid::Uuid;

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
        let new = NewResult::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        sessions::sql::lock_accepting(&tx, new.session_id).await?;
        let (result, created) = match sql::insert(&tx, Uuid::now_v7(), &new).await? {
            Some(r) => (r, true),
            None => (
                sql::get_by_request_id(&tx, new.session_id, &new.request_id)
                    .await?
                    .ok_or_else(|| {
                        Error::Aborted(
                            Reason::ConcurrentChange,
                            "the result was deleted concurrently; retry".into(),
                        )
                    })?,
                false,
            ),
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
        let mut v = Validator::new();
        let id = v.uuid("id", &req.id);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let result = sql::get(conn.client().await?, id)
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
        let query = ListResults::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let max_bytes = i64::try_from(self.state.max_message_bytes).unwrap_or(i64::MAX);
        let rows = sql::list(conn.client().await?, &query, max_bytes).await?;
        let (results, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::key,
            Into::into,
        )?;
        Ok(Response::new(proto::ListResultsResponse {
            results,
            next_page_token,
        }))
    }
}
