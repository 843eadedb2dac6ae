//! FailureService handlers.

use super::{ExecutionChange, ListSignatures, SignatureChange, Target, sql, stale, to_hex};
use crate::audit::{self, Outcome};
use crate::error::{Error, Reason, Result};
use crate::pagination;
use crate::proto::{self, failure_service_server::FailureService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use tonic::{Request, Response};
use uuid::Uuid;

/// The FailureService implementation.
pub struct FailureApi {
    state: AppState,
}

impl FailureApi {
    pub fn new(state: AppState) -> Self {
        FailureApi { state }
    }
}

fn no_signature(hex: &str) -> Error {
    Error::NotFound(format!("no failure has signature {hex}"))
}

fn no_execution(id: Uuid) -> Error {
    Error::NotFound(format!("execution {id} not found"))
}

/// Checks `expected` (if any) against the stored `current` version.
fn check_version(what: &str, current: i64, expected: Option<i64>) -> Result<()> {
    match expected {
        Some(expected) if expected != current => Err(stale(what, current, expected)),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl FailureService for FailureApi {
    async fn list_failure_signatures(
        &self,
        request: Request<proto::ListFailureSignaturesRequest>,
    ) -> RpcResult<proto::ListFailureSignaturesResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let query = ListSignatures::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        if let Some(run) = query.filter.run_id {
            crate::test_runs::sql::by_id(c, project, run)
                .await?
                .ok_or_else(|| Error::NotFound(format!("test run {run} not found")))?;
        }
        let rows = sql::list(c, project, &query).await?;
        let (signatures, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::key(query.filter.order),
            Into::into,
        )?;
        Ok(Response::new(proto::ListFailureSignaturesResponse {
            signatures,
            next_page_token,
        }))
    }

    async fn triage_failure_signature(
        &self,
        request: Request<proto::TriageFailureSignatureRequest>,
    ) -> RpcResult<proto::TriageFailureSignatureResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let SignatureChange { signature, change } = SignatureChange::try_from(req)?;
        let hex = to_hex(&signature);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let failures = sql::count_failures(&tx, project, &signature).await?;
        if failures == 0 {
            return Err(no_signature(&hex).into());
        }
        let current = sql::lock_signature(&tx, project, &signature).await?;
        check_version(
            &format!("signature {hex}"),
            current,
            change.expected_version,
        )?;
        let triage = sql::set_signature(&tx, project, &signature, &change).await?;
        audit::record(&tx, &call, &[hex], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::TriageFailureSignatureResponse {
            triage: Some(triage.into()),
            failures,
        }))
    }

    async fn triage_execution(
        &self,
        request: Request<proto::TriageExecutionRequest>,
    ) -> RpcResult<proto::TriageExecutionResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let ExecutionChange {
            execution_id: id,
            change,
        } = ExecutionChange::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let signature = sql::execution_signature(&tx, project, id)
            .await?
            .ok_or_else(|| no_execution(id))?
            .ok_or_else(|| {
                Error::FailedPrecondition(
                    Reason::FailedPrecondition,
                    format!(
                        "execution {id} is not a failure with an error message; only failures are triaged"
                    ),
                )
            })?;
        let current = sql::lock_execution(&tx, project, id).await?;
        check_version(&format!("execution {id}"), current, change.expected_version)?;
        let triage = sql::set_execution(&tx, project, id, &change).await?;
        audit::record(&tx, &call, &[id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::TriageExecutionResponse {
            triage: Some(triage.into()),
            error_signature: to_hex(&signature),
        }))
    }

    async fn list_triage_history(
        &self,
        request: Request<proto::ListTriageHistoryRequest>,
    ) -> RpcResult<proto::ListTriageHistoryResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let target = match (req.signature.is_empty(), req.execution_id.is_empty()) {
            (false, true) => Target::Signature(to_hex(&super::parse_signature(
                &mut v,
                "signature",
                &req.signature,
            ))),
            (true, false) => Target::Execution(v.uuid("execution_id", &req.execution_id)),
            _ => {
                v.violation("signature", "set exactly one of signature and execution_id");
                Target::Execution(Uuid::nil())
            }
        };
        let page_size = v.page_size("page_size", req.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("triage_history", &target);
        let after: i64 =
            pagination::decode("page_token", &req.page_token, &fingerprint)?.unwrap_or(0);
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = match &target {
            Target::Signature(hex) => {
                let mut v = Validator::new();
                let signature = super::parse_signature(&mut v, "signature", hex);
                v.finish()?;
                sql::history_of_signature(c, project, &signature, after, page_size + 1).await?
            }
            Target::Execution(id) => {
                sql::history_of_execution(c, project, *id, after, page_size + 1).await?
            }
        };
        let (changes, next_page_token) = pagination::page(
            rows,
            page_size,
            self.state.max_message_bytes,
            &fingerprint,
            |h| h.id,
            Into::into,
        )?;
        Ok(Response::new(proto::ListTriageHistoryResponse {
            changes,
            next_page_token,
        }))
    }
}
