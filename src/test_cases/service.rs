//! TestCaseService handlers.

use super::executions::{ListExecutions, StatisticsQuery, StatsScope, validate_items};
use super::executions_sql::{self, ExecutionSink};
use super::{
    ExecutionStatus, ListTestCases, NewTestCase, TestCase, TestCaseFields, TestCaseRef,
    TestCaseUpdate, sql, statistics_sql,
};
use crate::audit::{self, Outcome};
use crate::digest::{self, Canonical, Content};
use crate::error::{Error, Reason, Result};
use crate::ingest::{self, Chunk, Claim, IngestKey};
use crate::pagination;
use crate::proto::{self, test_case_service_server::TestCaseService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use deadpool_postgres::GenericClient;
use futures::StreamExt;
use prost::Message as _;
use std::sync::Arc;
use tonic::{Request, Response, Streaming};
use uuid::Uuid;

/// Executions committed per transaction of a streamed ingest.
const INGEST_BATCH_ITEMS: usize = 10_000;
/// `kind` of execution batches and ingests in the shared ingest tables.
const INGEST_KIND: &str = "test_executions";
/// The scope of execution batches and ingests: executions have no parent
/// record, so their batch and ingest ids are unique within their project
/// (the ingest tables are keyed by project).
const INGEST_SCOPE: &str = "*";

/// The TestCaseService implementation.
pub struct TestCaseApi {
    state: AppState,
}

impl TestCaseApi {
    pub fn new(state: AppState) -> Self {
        TestCaseApi { state }
    }
}

/// The id of a test case of `project` named by id or key; NOT_FOUND when
/// there is none (a test case of another project included).
async fn resolve(c: &impl GenericClient, project: Uuid, r: &TestCaseRef) -> Result<Uuid> {
    Ok(sql::get(c, project, r)
        .await?
        .ok_or_else(|| r.not_found())?
        .id)
}

/// The content of CreateTestCase, for its digest: the key and every field
/// (tags as normalised, sorted and deduplicated; required_hardware with its
/// keys sorted).
impl Content for NewTestCase {
    fn feed(&self, h: &mut Canonical) {
        let f = &self.fields;
        h.str(&self.key)
            .str(&f.name)
            .str(&f.description)
            .str(f.test_type.as_str())
            .str(&f.target_subsystem)
            .json(&f.required_hardware)
            .seq(f.tags.iter(), |h, t| {
                h.str(t);
            });
    }
}

/// Decides a CreateTestCase whose key is taken. Same content as the create
/// that took it: the reply of that first call — the test case as created
/// (version 1), rebuilt from what this caller sent plus the stored id and
/// creation time — whatever UpdateTestCase changed since, so a replay shows
/// a write-only caller nothing it did not send. Other content (including
/// content equal to a later update): IDEMPOTENCY_KEY_REUSED. A test case
/// from before V11 has no digest: at version 1 it still holds its creation
/// content and the digest is recomputed from it; once updated it is refused.
fn replay(
    new: NewTestCase,
    digest: &[u8],
    stored: TestCase,
    stored_digest: Option<Vec<u8>>,
) -> Result<TestCase> {
    digest::check_replay(
        digest,
        stored_digest.as_deref(),
        || (stored.version == 1).then(|| digest::of("CreateTestCase", &creation_content(&stored))),
        || digest::key_reused("key", &new.key, "a test case"),
    )?;
    let f = new.fields;
    Ok(TestCase {
        id: stored.id,
        key: new.key,
        name: f.name,
        description: f.description,
        test_type: f.test_type,
        target_subsystem: f.target_subsystem,
        required_hardware: f.required_hardware,
        tags: f.tags,
        version: 1,
        created_at: stored.created_at,
        updated_at: stored.created_at,
    })
}

/// What a test case still at version 1 was created with.
fn creation_content(t: &TestCase) -> NewTestCase {
    NewTestCase {
        key: t.key.clone(),
        fields: TestCaseFields {
            name: t.name.clone(),
            description: t.description.clone(),
            test_type: t.test_type,
            target_subsystem: t.target_subsystem.clone(),
            required_hardware: t.required_hardware.clone(),
            tags: t.tags.clone(),
        },
    }
}

fn stale(id: Uuid, current: i64, expected: i64) -> Error {
    Error::Aborted(
        Reason::VersionMismatch,
        format!("test case {id} is at version {current}, not {expected}; re-read it and retry"),
    )
}

#[tonic::async_trait]
impl TestCaseService for TestCaseApi {
    async fn create_test_case(
        &self,
        request: Request<proto::CreateTestCaseRequest>,
    ) -> RpcResult<proto::CreateTestCaseResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let new = NewTestCase::try_from(req)?;
        let digest = digest::of("CreateTestCase", &new);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let (test_case, created) = match sql::insert(&tx, project, Uuid::now_v7(), &new, &digest)
            .await?
        {
            Some(t) => (t, true),
            // The key was taken (a concurrent first call waited for):
            // a replay, or a reused key.
            None => {
                let (stored, stored_digest) = sql::get_for_replay(&tx, project, &new.key)
                    .await?
                    .ok_or_else(|| {
                        Error::Aborted(
                            Reason::ConcurrentChange,
                            "the test case with this key was deleted concurrently; retry".into(),
                        )
                    })?;
                (replay(new, &digest, stored, stored_digest)?, false)
            }
        };
        let outcome = if created {
            Outcome::Created
        } else {
            Outcome::Replayed
        };
        audit::record(&tx, &call, &[test_case.id.to_string()], outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::CreateTestCaseResponse {
            test_case: Some(test_case.into()),
            created,
        }))
    }

    async fn get_test_case(
        &self,
        request: Request<proto::GetTestCaseRequest>,
    ) -> RpcResult<proto::GetTestCaseResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let lookup = TestCaseRef::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let test_case = sql::get(conn.client().await?, project, &lookup)
            .await?
            .ok_or_else(|| lookup.not_found())?;
        Ok(Response::new(proto::GetTestCaseResponse {
            test_case: Some(test_case.into()),
        }))
    }

    async fn list_test_cases(
        &self,
        request: Request<proto::ListTestCasesRequest>,
    ) -> RpcResult<proto::ListTestCasesResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = ListTestCases::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list(conn.client().await?, project, &query).await?;
        let (test_cases, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| last.key.clone(),
            Into::into,
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
        Ok(Response::new(proto::ListTestCasesResponse {
            test_cases,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn update_test_case(
        &self,
        request: Request<proto::UpdateTestCaseRequest>,
    ) -> RpcResult<proto::UpdateTestCaseResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let update = TestCaseUpdate::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, project, update.id)
            .await?
            .ok_or_else(|| TestCaseRef::Id(update.id).not_found())?;
        if let Some(expected) = update.expected_version
            && expected != current.version
        {
            return Err(stale(update.id, current.version, expected).into());
        }
        let updated = sql::update(&tx, project, &update).await?;
        audit::record(&tx, &call, &[update.id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::UpdateTestCaseResponse {
            test_case: Some(updated.into()),
        }))
    }

    async fn delete_test_case(
        &self,
        request: Request<proto::DeleteTestCaseRequest>,
    ) -> RpcResult<proto::DeleteTestCaseResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let id = v.uuid("id", &req.id);
        if let Some(ver) = req.expected_version
            && ver < 1
        {
            v.violation("expected_version", "must be at least 1");
        }
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, project, id)
            .await?
            .ok_or_else(|| TestCaseRef::Id(id).not_found())?;
        if let Some(expected) = req.expected_version
            && expected != current.version
        {
            return Err(stale(id, current.version, expected).into());
        }
        let deleted_executions = if req.force {
            sql::delete_executions(&tx, project, id).await?
        } else if sql::has_executions(&tx, project, id).await? {
            return Err(Error::FailedPrecondition(
                Reason::TestCaseHasExecutions,
                format!(
                    "test case {id} ({}) has executions; delete with force to remove them too",
                    current.key
                ),
            )
            .into());
        } else {
            0
        };
        sql::delete(&tx, project, id).await?;
        audit::record(&tx, &call, &[id.to_string()], Outcome::Deleted).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::DeleteTestCaseResponse {
            deleted_executions: deleted_executions as i64,
        }))
    }

    async fn record_executions(
        &self,
        request: Request<proto::RecordExecutionsRequest>,
    ) -> RpcResult<proto::RecordExecutionsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let batch_id = v.required_text("batch_id", &req.batch_id, crate::sessions::MAX_REQUEST_ID);
        let items = validate_items(&mut v, req.items, None, false);
        v.finish()?;
        let digest = digest::of_batch("RecordExecutions", &items);

        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let claim = ingest::claim_batch(
            &tx,
            &call,
            INGEST_KIND,
            INGEST_SCOPE,
            &batch_id,
            &digest,
            items.len(),
        )
        .await?;
        let (ids, replayed) = match claim {
            Claim::Replay { .. } => (
                executions_sql::batch_ids(&tx, project, &batch_id).await?,
                true,
            ),
            Claim::New => {
                let sink = ExecutionSink {
                    project,
                    batch_id: Some(batch_id.clone()),
                };
                let written = ingest::Sink::write(&sink, &tx, &items).await?;
                crate::observability::ingest_rows(INGEST_KIND, written);
                (items.iter().map(|e| e.id).collect(), false)
            }
        };
        let outcome = if replayed {
            Outcome::Replayed
        } else {
            Outcome::Appended
        };
        audit::record(&tx, &call, std::slice::from_ref(&batch_id), outcome).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::RecordExecutionsResponse {
            ids: ids.into_iter().map(|id| id.to_string()).collect(),
            replayed,
        }))
    }

    async fn ingest_executions(
        &self,
        request: Request<Streaming<proto::IngestExecutionsRequest>>,
    ) -> RpcResult<proto::IngestExecutionsResponse> {
        let revocation = ingest::revocation_of(&request);
        let (call, stream) = rpc::split(request);
        let project = call.project()?;
        let (ingest_id, messages) = ingest::open(
            stream,
            self.state.ingest,
            |first: &proto::IngestExecutionsRequest| {
                let mut v = Validator::new();
                let ingest_id = v.required_text(
                    "ingest_id",
                    &first.ingest_id,
                    crate::sessions::MAX_REQUEST_ID,
                );
                v.finish()?;
                Ok(ingest_id)
            },
        )
        .await?;
        let header = ingest_id.clone();
        let chunks = messages.map(move |m| to_chunk(&header, m?));
        let outcome = ingest::run(
            &self.state.db,
            &call,
            IngestKey {
                kind: INGEST_KIND,
                ingest_id,
                scope: INGEST_SCOPE.to_owned(),
                revocation,
            },
            Arc::new(ExecutionSink {
                project,
                batch_id: None,
            }),
            Box::pin(chunks),
            INGEST_BATCH_ITEMS,
            self.state.ingest,
        )
        .await?;
        Ok(Response::new(proto::IngestExecutionsResponse {
            committed_items: outcome.committed_items,
            committed_chunks: outcome.committed_chunks,
            skipped_chunks: outcome.skipped_chunks,
            high_water_mark: outcome.high_water_mark,
        }))
    }

    async fn get_ingest_status(
        &self,
        request: Request<proto::TestCaseServiceGetIngestStatusRequest>,
    ) -> RpcResult<proto::TestCaseServiceGetIngestStatusResponse> {
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
            proto::TestCaseServiceGetIngestStatusResponse {
                status: Some(ingest::to_proto(ingest_id, status)),
            },
        ))
    }

    async fn list_executions(
        &self,
        request: Request<proto::ListExecutionsRequest>,
    ) -> RpcResult<proto::ListExecutionsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let count = crate::totals::requested(req.count)?;
        let query = ListExecutions::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let test_case_id = match &query.filter.test_case {
            Some(r) => Some(resolve(c, project, r).await?),
            None => None,
        };
        let max_bytes = i64::try_from(self.state.max_message_bytes).unwrap_or(i64::MAX);
        let rows = executions_sql::list(c, project, &query, test_case_id, max_bytes).await?;
        let failures = executions_sql::failure_ids(&rows.rows)?;
        let triage = crate::failures::sql::effective(c, project, &failures).await?;
        // The executions are written straight from their rows.
        let (encoded_executions, next_page_token) = pagination::page_encoded(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            executions_sql::row_key,
            |row, out| {
                let id: uuid::Uuid = row.try_get(0)?;
                executions_sql::execution_to_wire(row, triage.get(&id), 1, out)
            },
        )?;
        let (total, total_mode) = executions_sql::count(
            c,
            project,
            &query,
            test_case_id,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListExecutionsResponse {
            encoded_executions,
            next_page_token,
            total,
            total_mode,
            ..Default::default()
        }))
    }

    async fn get_execution(
        &self,
        request: Request<proto::GetExecutionRequest>,
    ) -> RpcResult<proto::GetExecutionResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = crate::validate::Validator::new();
        let id = v.uuid("id", &req.id);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let execution = executions_sql::get(c, project, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("execution {id} not found")))?;
        let mut one = [execution];
        crate::failures::fill_triage(c, project, &mut one).await?;
        let [execution] = one;
        Ok(Response::new(proto::GetExecutionResponse {
            execution: Some(execution.into()),
        }))
    }

    async fn get_test_statistics(
        &self,
        request: Request<proto::GetTestStatisticsRequest>,
    ) -> RpcResult<proto::GetTestStatisticsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let query = StatisticsQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let test_case_id = match &query.scope {
            StatsScope::TestCase(r) => Some(resolve(c, project, r).await?),
            StatsScope::Run(run) => {
                crate::test_runs::sql::by_id(c, project, *run)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("test run {run} not found")))?;
                None
            }
            _ => None,
        };
        let scope = statistics_sql::Scope::of(&query, test_case_id);
        let totals = statistics_sql::totals(c, project, &query, &scope).await?;
        let (flaky, flaky_test_count) =
            statistics_sql::flakiest(c, project, &query, &scope).await?;
        Ok(Response::new(statistics(totals, flaky, flaky_test_count)))
    }
}

/// Turns a chunk message into validated items, checking it belongs to the
/// stream's ingest.
fn to_chunk(
    ingest_id: &str,
    m: proto::IngestExecutionsRequest,
) -> Result<Chunk<super::executions::NewExecution>> {
    let mut v = Validator::new();
    if !m.ingest_id.is_empty() && m.ingest_id != ingest_id {
        v.violation("ingest_id", "differs from the first message of the stream");
    }
    if m.sequence < 1 {
        v.violation("sequence", "must be 1 or more");
    }
    let bytes = m.encoded_len();
    let items = validate_items(&mut v, m.items, Some(m.sequence), true);
    v.finish().map_err(|e| ingest::in_chunk(e, m.sequence))?;
    Ok(Chunk {
        sequence: m.sequence,
        items,
        bytes,
    })
}

fn statistics(
    totals: statistics_sql::Totals,
    flaky: Vec<statistics_sql::Flaky>,
    flaky_test_count: i64,
) -> proto::GetTestStatisticsResponse {
    let count = |s: ExecutionStatus| {
        totals
            .by_status
            .iter()
            .find(|(x, _)| *x == s)
            .map_or(0, |(_, n)| *n)
    };
    let passed = count(ExecutionStatus::Passed);
    let decided = passed + count(ExecutionStatus::Failed) + count(ExecutionStatus::Error);
    proto::GetTestStatisticsResponse {
        total_executions: totals.total,
        by_status: totals
            .by_status
            .iter()
            .map(|(s, n)| proto::ExecutionStatusCount {
                status: s.to_proto() as i32,
                count: *n,
            })
            .collect(),
        pass_rate: (decided > 0).then(|| passed as f64 / decided as f64),
        duration_p50_ms: totals.p50_ms,
        duration_p95_ms: totals.p95_ms,
        flaky_tests: flaky
            .into_iter()
            .map(|f| proto::FlakyTest {
                test_case_id: f.test_case_id.to_string(),
                test_case_key: f.key,
                name: f.name,
                flips: f.flips,
                executions_considered: f.considered,
                flip_rate: if f.considered > 1 {
                    f.flips as f64 / (f.considered - 1) as f64
                } else {
                    0.0
                },
            })
            .collect(),
        flaky_test_count,
        passed_on_retry_count: totals.passed_on_retry,
        percentiles_estimated: totals.estimated,
    }
}
