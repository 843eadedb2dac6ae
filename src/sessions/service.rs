//! SessionService: thin handlers — validate, convert, run the SQL inside the
//! transaction the handler owns, convert back.

use super::appends::{Appends, Item};
use super::{
    ListLogs, ListSessions, NewLogEntry, NewSession, Session, SessionLookup, SessionStatus,
    StatusChange, sql, watch,
};
use crate::audit::{self, Outcome};
use crate::convert::JsonDoc;
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Reason, Result};
use crate::pagination;
use crate::proto::{self, session_service_server::SessionService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::totals;
use std::sync::Arc;
use tonic::{Request, Response};
use uuid::Uuid;

/// The SessionService implementation.
pub struct SessionApi {
    state: AppState,
    /// Appends waiting for a statement of their session (group commit).
    appends: Arc<Appends>,
}

impl SessionApi {
    pub fn new(state: AppState) -> Self {
        SessionApi {
            appends: Arc::new(Appends::new(state.db.clone())),
            state,
        }
    }
}

/// The content of CreateSession, for its digest: everything the caller
/// sets (Structs with their keys sorted).
impl Content for NewSession {
    fn feed(&self, h: &mut Canonical) {
        h.str(&self.request_id)
            .str(&self.source_technology)
            .str(&self.target_technology)
            .str(&self.validation_scope)
            .json(&self.config)
            .json(&self.input_refs)
            .json(&self.metadata);
        crate::labels::feed(h, &self.labels);
    }
}

/// Decides a CreateSession whose request_id is taken. Same content: the
/// reply of the first call — the session as it was created (PENDING,
/// version 1), not as it is now, so a replay shows a write-only caller
/// nothing but what it sent, the id and the creation time. Other content:
/// IDEMPOTENCY_KEY_REUSED. A session from before V11 has no digest; its
/// content never changes, so the digest is recomputed from the row.
fn replay(
    new: &NewSession,
    digest: &[u8],
    stored: Session,
    stored_digest: Option<Vec<u8>>,
) -> Result<Session> {
    digest::check_replay(
        digest,
        stored_digest.as_deref(),
        || Some(digest::of("CreateSession", &NewSession::from(&stored))),
        || digest::key_reused("request_id", &new.request_id, "a session"),
    )?;
    Ok(Session {
        status: SessionStatus::Pending,
        updated_at: stored.created_at,
        started_at: None,
        completed_at: None,
        version: 1,
        ..stored
    })
}

impl From<&Session> for NewSession {
    fn from(s: &Session) -> Self {
        NewSession {
            request_id: s.request_id.clone(),
            source_technology: s.source_technology.clone(),
            target_technology: s.target_technology.clone(),
            validation_scope: s.validation_scope.clone(),
            config: JsonDoc::json_or_null(s.config.as_ref()),
            input_refs: JsonDoc::json_or_null(s.input_refs.as_ref()),
            metadata: JsonDoc::json_or_null(s.metadata.as_ref()),
            labels: s.labels.clone(),
        }
    }
}

fn not_found(id: impl std::fmt::Display) -> Error {
    Error::NotFound(format!("session {id} not found"))
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_session(
        &self,
        request: Request<proto::CreateSessionRequest>,
    ) -> RpcResult<proto::CreateSessionResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let new = NewSession::try_from(req)?;
        let digest = digest::of("CreateSession", &new);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let inserted = sql::insert(&tx, project, Uuid::now_v7(), &new, &digest).await?;
        let (session, created) = match inserted {
            Some(s) => (s, true),
            // The key was taken in this project (a concurrent first call
            // waited for): a replay, or a reused key.
            None => match sql::get_for_replay(&tx, project, &new.request_id).await? {
                Some((stored, stored_digest)) => {
                    (replay(&new, &digest, stored, stored_digest)?, false)
                }
                None => {
                    return Err(Error::Aborted(
                        Reason::ConcurrentChange,
                        "the session with this request_id was deleted concurrently; retry".into(),
                    )
                    .into());
                }
            },
        };
        let outcome = if created {
            Outcome::Created
        } else {
            Outcome::Replayed
        };
        audit::record(&tx, &call, &[session.id.to_string()], outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::CreateSessionResponse {
            session: Some(session.into()),
            created,
        }))
    }

    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> RpcResult<proto::GetSessionResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let include_summary = req.include_summary;
        let lookup = SessionLookup::try_from(req)?;
        // The session is written straight from its row.
        let (encoded_session, summary) = crate::db::short_read!(&self.state.db, &call, |c| {
            let (id, session) = match &lookup {
                SessionLookup::Id(id) => sql::get_wire(c, project, *id)
                    .await?
                    .ok_or_else(|| not_found(id))?,
                SessionLookup::RequestId(rid) => sql::get_by_request_id_wire(c, project, rid)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("no session has request_id {rid:?}")))?,
            };
            let summary = if include_summary {
                Some(super::summary::of(c, project, id).await?)
            } else {
                None
            };
            Ok((session, summary))
        })?;
        Ok(Response::new(proto::GetSessionResponse {
            encoded_session,
            summary,
            ..Default::default()
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> RpcResult<proto::ListSessionsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = totals::requested(req.count)?;
        let query = ListSessions::try_from(req)?;
        let max_bytes = i64::try_from(self.state.max_message_bytes).unwrap_or(i64::MAX);
        // A page is read on a pooled connection of its own: its statements
        // cost the server far more than a lookup by key, and pipelined on
        // one shared connection they would all run on one backend.
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = sql::list(c, project, &query, max_bytes).await?;
        let total = sql::count(
            c,
            project,
            &query.filter,
            count,
            self.state.count_exact_below,
        )
        .await?;
        // The sessions are written straight from their rows.
        let (encoded_sessions, next_page_token) = pagination::page_encoded(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::session_row_key,
            |row, out| sql::session_to_wire(row, 1, out),
        )?;
        let (total, total_mode) = total.wire();
        Ok(Response::new(proto::ListSessionsResponse {
            encoded_sessions,
            next_page_token,
            total,
            total_mode,
            ..Default::default()
        }))
    }

    async fn update_session_status(
        &self,
        request: Request<proto::UpdateSessionStatusRequest>,
    ) -> RpcResult<proto::UpdateSessionStatusResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let change = StatusChange::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, project, change.id)
            .await?
            .ok_or_else(|| not_found(change.id))?;
        if let Some(expected) = change.expected_version
            && expected != current.version
        {
            return Err(Error::Aborted(
                Reason::VersionMismatch,
                format!(
                    "session {} is at version {}, not {expected}; re-read it and retry",
                    change.id, current.version
                ),
            )
            .into());
        }
        if !current.status.can_move_to(change.status) {
            return Err(Error::FailedPrecondition(
                Reason::IllegalStatusTransition,
                format!(
                    "session {} cannot move from {} to {}",
                    change.id,
                    current.status.as_str(),
                    change.status.as_str()
                ),
            )
            .into());
        }
        let session = sql::set_status(&tx, project, change.id, change.status).await?;
        audit::record(&tx, &call, &[change.id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::UpdateSessionStatusResponse {
            session: Some(session.into()),
        }))
    }

    async fn append_session_log(
        &self,
        request: Request<proto::AppendSessionLogRequest>,
    ) -> RpcResult<proto::AppendSessionLogResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let bytes = prost::Message::encoded_len(&req);
        let entry = NewLogEntry::try_from(req)?;
        // The reply carries a consistency token, as after any write.
        crate::db::replica::note_write();
        let stored = self
            .appends
            .append(project, Item { entry, call, bytes })
            .await?;
        Ok(Response::new(proto::AppendSessionLogResponse {
            entry: Some(stored.into()),
        }))
    }

    async fn list_session_logs(
        &self,
        request: Request<proto::ListSessionLogsRequest>,
    ) -> RpcResult<proto::ListSessionLogsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = totals::requested(req.count)?;
        let query = ListLogs::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = sql::list_logs(c, project, &query).await?;
        if rows.is_empty() && sql::get(c, project, query.session_id).await?.is_none() {
            return Err(not_found(query.session_id).into());
        }
        // The entries are written straight from their rows.
        let (encoded_entries, next_page_token) = pagination::page_encoded(
            rows.into(),
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::log_row_key,
            |row, out| sql::log_to_wire(row, 1, out),
        )?;
        let (total, total_mode) =
            sql::count_logs(c, project, &query, count, self.state.count_exact_below)
                .await?
                .wire();
        Ok(Response::new(proto::ListSessionLogsResponse {
            encoded_entries,
            next_page_token,
            total,
            total_mode,
            ..Default::default()
        }))
    }

    async fn delete_session(
        &self,
        request: Request<proto::DeleteSessionRequest>,
    ) -> RpcResult<proto::DeleteSessionResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = crate::validate::Validator::new();
        let id = v.uuid("id", &req.id);
        v.expected_version("expected_version", req.expected_version);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, project, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        if let Some(expected) = req.expected_version
            && expected != current.version
        {
            return Err(Error::Aborted(
                Reason::VersionMismatch,
                format!(
                    "session {id} is at version {}, not {expected}; re-read it and retry",
                    current.version
                ),
            )
            .into());
        }
        // Children first, explicitly, so the reply can say what went.
        let deleted_log_entries = sql::delete_logs(&tx, project, id).await?;
        sql::delete(&tx, project, id).await?;
        audit::record(&tx, &call, &[id.to_string()], Outcome::Deleted).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::DeleteSessionResponse {
            deleted_log_entries: deleted_log_entries as i64,
        }))
    }

    type WatchSessionStream = watch::WatchStream;

    async fn watch_session(
        &self,
        request: Request<proto::WatchSessionRequest>,
    ) -> RpcResult<Self::WatchSessionStream> {
        let (call, req) = rpc::split(request);
        let from = watch::WatchFrom::try_from(req)?;
        Ok(Response::new(watch::start(&self.state, &call, from).await?))
    }
}
