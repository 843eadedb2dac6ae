//! DiscrepancyService handlers.

use super::sql::{self, DiscrepancySink};
use super::{ListDiscrepancies, NewDiscrepancy, Resolution, Resolve, Severity, validate_items};
use crate::audit::{self, Outcome};
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Result};
use crate::ingest::{self, Chunk, Claim, IngestKey};
use crate::pagination;
use crate::proto::{self, discrepancy_service_server::DiscrepancyService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use futures::StreamExt;
use prost::Message as _;
use std::sync::Arc;
use tonic::{Request, Response, Streaming};
use uuid::Uuid;

/// Discrepancies committed per transaction of a streamed ingest.
const INGEST_BATCH_ITEMS: usize = 10_000;
/// `kind` of discrepancy ingests in the shared ingest tables.
const INGEST_KIND: &str = "discrepancies";

/// `kind` of discrepancy batches in the shared ingest tables.
const KIND: &str = "discrepancies";

/// The content of a reported discrepancy for batch digests (its id is
/// assigned by the gateway and left out).
impl Content for NewDiscrepancy {
    fn feed(&self, h: &mut Canonical) {
        h.opt(self.result_id, |h, id| {
            h.bytes(id.as_bytes());
        })
        .str(&self.kind)
        .str(self.severity.as_str())
        .str(&self.description)
        .str(&self.source_element)
        .str(&self.target_element)
        .str(&self.recommendation)
        .f64(self.confidence)
        .str(&self.fingerprint);
    }
}

/// The DiscrepancyService implementation.
pub struct DiscrepancyApi {
    state: AppState,
}

impl DiscrepancyApi {
    pub fn new(state: AppState) -> Self {
        DiscrepancyApi { state }
    }
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("discrepancy {id} not found"))
}

#[tonic::async_trait]
impl DiscrepancyService for DiscrepancyApi {
    async fn record_discrepancies(
        &self,
        request: Request<proto::RecordDiscrepanciesRequest>,
    ) -> RpcResult<proto::RecordDiscrepanciesResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let session_id = v.uuid("session_id", &req.session_id);
        let batch_id = v.required_text("batch_id", &req.batch_id, crate::sessions::MAX_REQUEST_ID);
        let items = validate_items(&mut v, req.items, false);
        v.finish()?;
        let digest = digest::of_batch("RecordDiscrepancies", &items);

        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let scope = session_id.to_string();
        // A replay is recognised first, even once the session stopped
        // accepting writes: it writes nothing. Batch ids are per project.
        let claim = match ingest::find_batch(&tx, &call, KIND, &scope, &batch_id, &digest).await? {
            Some(replay) => replay,
            None => {
                crate::sessions::sql::lock_accepting(&tx, project, session_id).await?;
                ingest::claim_batch(&tx, &call, KIND, &scope, &batch_id, &digest, items.len())
                    .await?
            }
        };
        let (ids, replayed) = match claim {
            Claim::Replay { .. } => (
                sql::batch_ids(&tx, project, session_id, &batch_id).await?,
                true,
            ),
            Claim::New => {
                let sink = DiscrepancySink {
                    project_id: project,
                    session_id,
                    batch_id: Some(batch_id.clone()),
                };
                let written = ingest::Sink::write(&sink, &tx, &items).await?;
                crate::observability::ingest_rows(KIND, written);
                (items.iter().map(|d| d.id).collect(), false)
            }
        };
        let outcome = if replayed {
            Outcome::Replayed
        } else {
            Outcome::Created
        };
        audit::record(&tx, &call, &[session_id.to_string()], outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::RecordDiscrepanciesResponse {
            ids: ids.into_iter().map(|id| id.to_string()).collect(),
            replayed,
        }))
    }

    async fn ingest_discrepancies(
        &self,
        request: Request<Streaming<proto::IngestDiscrepanciesRequest>>,
    ) -> RpcResult<proto::IngestDiscrepanciesResponse> {
        let revocation = ingest::revocation_of(&request);
        let (call, stream) = rpc::split(request);
        let ((ingest_id, session_id), messages) = ingest::open(
            stream,
            self.state.ingest,
            |first: &proto::IngestDiscrepanciesRequest| {
                let mut v = Validator::new();
                let ingest_id = v.required_text(
                    "ingest_id",
                    &first.ingest_id,
                    crate::sessions::MAX_REQUEST_ID,
                );
                let session_id = v.uuid("session_id", &first.session_id);
                v.finish()?;
                Ok((ingest_id, session_id))
            },
        )
        .await?;
        let project = call.project()?;
        {
            let mut conn = self.state.db.conn(&call).await?;
            let tx = conn.begin().await?;
            crate::sessions::sql::lock_accepting(&tx, project, session_id).await?;
            tx.commit().await.map_err(Error::from)?;
        }

        let header = (ingest_id.clone(), session_id.to_string());
        let chunks = messages.map(move |m| to_chunk(&header, m?));
        let outcome = ingest::run(
            &self.state.db,
            &call,
            IngestKey {
                kind: INGEST_KIND,
                ingest_id,
                scope: session_id.to_string(),
                revocation,
            },
            Arc::new(DiscrepancySink {
                project_id: project,
                session_id,
                batch_id: None,
            }),
            Box::pin(chunks),
            INGEST_BATCH_ITEMS,
            self.state.ingest,
        )
        .await?;
        Ok(Response::new(proto::IngestDiscrepanciesResponse {
            committed_items: outcome.committed_items,
            committed_chunks: outcome.committed_chunks,
            skipped_chunks: outcome.skipped_chunks,
            high_water_mark: outcome.high_water_mark,
        }))
    }

    async fn get_ingest_status(
        &self,
        request: Request<proto::DiscrepancyServiceGetIngestStatusRequest>,
    ) -> RpcResult<proto::DiscrepancyServiceGetIngestStatusResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let ingest_id =
            v.required_text("ingest_id", &req.ingest_id, crate::sessions::MAX_REQUEST_ID);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let status = ingest::status(conn.client().await?, &call, INGEST_KIND, &ingest_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no chunk of ingest {ingest_id:?} was ever committed"
                ))
            })?;
        Ok(Response::new(
            proto::DiscrepancyServiceGetIngestStatusResponse {
                status: Some(ingest::to_proto(ingest_id, status)),
            },
        ))
    }

    async fn list_discrepancies(
        &self,
        request: Request<proto::ListDiscrepanciesRequest>,
    ) -> RpcResult<proto::ListDiscrepanciesResponse> {
        let (call, req) = rpc::split(request);
        let count = crate::totals::requested(req.count)?;
        let query = ListDiscrepancies::try_from(req)?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list(conn.client().await?, project, &query).await?;
        // The discrepancies are written straight from their rows.
        let (encoded_discrepancies, next_page_token) = pagination::page_encoded(
            rows.into(),
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            sql::row_key,
            |row, out| sql::discrepancy_to_wire(row, 1, out),
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
        Ok(Response::new(proto::ListDiscrepanciesResponse {
            encoded_discrepancies,
            next_page_token,
            total,
            total_mode,
            ..Default::default()
        }))
    }

    async fn resolve_discrepancy(
        &self,
        request: Request<proto::ResolveDiscrepancyRequest>,
    ) -> RpcResult<proto::ResolveDiscrepancyResponse> {
        let (call, req) = rpc::split(request);
        let r = Resolve::try_from(req)?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, project, r.id)
            .await?
            .ok_or_else(|| not_found(r.id))?;
        let updated = if r.apply_to_fingerprint {
            // Reopening lifts a mute; anything else applies to the open ones.
            let from = if r.resolution == Resolution::Open {
                sql::unmute(&tx, project, &current.fingerprint).await?;
                Resolution::Muted
            } else {
                if r.resolution == Resolution::Muted {
                    sql::mute(&tx, project, &current.fingerprint, &r.actor, &r.note).await?;
                }
                Resolution::Open
            };
            sql::resolve_fingerprint(&tx, project, &current.fingerprint, from, &r).await?
        } else {
            sql::resolve_one(&tx, project, &current, r.resolution, &r.actor, &r.note).await?
        };
        let after = sql::get(&tx, project, r.id)
            .await?
            .ok_or_else(|| not_found(r.id))?;
        audit::record(&tx, &call, &[r.id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::ResolveDiscrepancyResponse {
            discrepancy: Some(after.into()),
            updated_count: updated as i64,
        }))
    }

    async fn list_resolution_history(
        &self,
        request: Request<proto::ListResolutionHistoryRequest>,
    ) -> RpcResult<proto::ListResolutionHistoryResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let id = v.uuid("id", &req.id);
        let page_size = v.page_size("page_size", req.page_size);
        v.finish()?;
        let count = crate::totals::requested(req.count)?;
        let fingerprint = pagination::fingerprint("discrepancy_resolutions", &id);
        let after: i64 =
            pagination::decode("page_token", &req.page_token, &fingerprint)?.unwrap_or(0);
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let d = sql::get(c, project, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        let rows = sql::history(c, project, &d, after, page_size + 1).await?;
        let (changes, next_page_token) = pagination::page(
            rows,
            page_size,
            self.state.max_message_bytes,
            &fingerprint,
            |last| last.id,
            Into::into,
        )?;
        let (total, total_mode) =
            sql::count_history(c, project, &d, count, self.state.count_exact_below)
                .await?
                .wire();
        Ok(Response::new(proto::ListResolutionHistoryResponse {
            changes,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn get_discrepancy(
        &self,
        request: Request<proto::GetDiscrepancyRequest>,
    ) -> RpcResult<proto::GetDiscrepancyResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let id = v.uuid("id", &req.id);
        v.finish()?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let d = sql::get(conn.client().await?, project, id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok(Response::new(proto::GetDiscrepancyResponse {
            discrepancy: Some(d.into()),
        }))
    }

    async fn summarize_discrepancies(
        &self,
        request: Request<proto::SummarizeDiscrepanciesRequest>,
    ) -> RpcResult<proto::SummarizeDiscrepanciesResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let session_id = v.optional_uuid("session_id", &req.session_id);
        let (from, to) = v.time_range("sessions_created", req.sessions_created.as_ref());
        if session_id.is_some() == req.sessions_created.is_some() {
            v.violation(
                "session_id",
                "set exactly one of session_id and sessions_created",
            );
        }
        v.finish()?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let rows = match session_id {
            Some(id) => {
                crate::sessions::sql::get(c, project, id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("session {id} not found")))?;
                sql::summary_of_session(c, project, id).await?
            }
            None => sql::summary_of_range(c, project, from, to).await?,
        };
        Ok(Response::new(summary(rows)?))
    }
}

/// Turns a chunk message into validated items, checking it belongs to the
/// stream's ingest.
fn to_chunk(
    (ingest_id, session_id): &(String, String),
    m: proto::IngestDiscrepanciesRequest,
) -> Result<Chunk<super::NewDiscrepancy>> {
    let mut v = Validator::new();
    if !m.ingest_id.is_empty() && &m.ingest_id != ingest_id {
        v.violation("ingest_id", "differs from the first message of the stream");
    }
    if !m.session_id.is_empty() && &m.session_id != session_id {
        v.violation("session_id", "differs from the first message of the stream");
    }
    if m.sequence < 1 {
        v.violation("sequence", "must be 1 or more");
    }
    let bytes = m.encoded_len();
    let items = validate_items(&mut v, m.items, true);
    v.finish().map_err(|e| ingest::in_chunk(e, m.sequence))?;
    Ok(Chunk {
        sequence: m.sequence,
        items,
        bytes,
    })
}

fn summary(rows: Vec<sql::SummaryRow>) -> Result<proto::SummarizeDiscrepanciesResponse> {
    let mut out = proto::SummarizeDiscrepanciesResponse::default();
    let mut severities = Vec::new();
    for row in rows {
        match row.dimension.as_str() {
            "total" => out.total = row.count,
            "severity" => {
                let rank: i16 = row
                    .key
                    .parse()
                    .map_err(|_| Error::Internal(format!("severity {:?} in a summary", row.key)))?;
                severities.push((Severity::from_rank(rank)?, row.count));
            }
            "kind" => out.by_kind.push(proto::DiscrepancyCount {
                key: row.key,
                count: row.count,
            }),
            "resolution" => out.by_resolution.push(proto::DiscrepancyCount {
                key: Resolution::from_db(&row.key)?
                    .to_proto()
                    .as_str_name()
                    .to_owned(),
                count: row.count,
            }),
            other => return Err(Error::Internal(format!("summary dimension {other:?}"))),
        }
    }
    severities.sort_by_key(|(s, _)| s.rank());
    out.by_severity = severities
        .into_iter()
        .map(|(s, count)| proto::DiscrepancyCount {
            key: s.to_proto().as_str_name().to_owned(),
            count,
        })
        .collect();
    Ok(out)
}
