//! AdminService handlers.

use super::{ListAuditEvents, sql};
use crate::audit::{self, Outcome};
use crate::error::Error;
use crate::pagination;
use crate::proto::{self, admin_service_server::AdminService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use tonic::{Request, Response};

/// The AdminService implementation.
pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        AdminApi { state }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> RpcResult<proto::ListAuditEventsResponse> {
        let (call, req) = rpc::split(request);
        let query = ListAuditEvents::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        // Reading the trail is an admin call: it is recorded too, after the
        // read so a page never shows the call that fetched it.
        let tx = conn.begin().await?;
        let rows = sql::list_audit(&tx, &query).await?;
        audit::record(&tx, &call, &[], Outcome::Read).await?;
        tx.commit().await.map_err(Error::from)?;
        let (page, more) = pagination::split_page(rows, query.page_size);
        let next_page_token = match (more, page.last()) {
            (true, Some(last)) => pagination::encode(&query.fingerprint, &last.id),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: page.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
