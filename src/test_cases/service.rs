//! TestCaseService handlers.

use super::executions::{ListExecutions, StatisticsQuery, StatsScope, validate_items};
use super::executions_sql::{self, ExecutionSink};
use super::{
    ExecutionStatus, ListTestCases, NewTestCase, TestCaseRef, TestCaseUpdate, sql, statistics_sql,
};
use crate::audit::{self, Outcome};
use crate::error::{Error, Reason, Result};
use crate::ingest::{self, Chunk, Claim, IngestKey};
use crate::pagination;
use crate::proto::{self, test_case_service_server::TestCaseService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use deadpool_postgres::GenericClient;
use futures::StreamExt;
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Streaming};
use uuid::Uuid;

/// Executions committed per transaction of a streamed ingest.
const INGEST_BATCH_ITEMS: usize = 10_000;
/// `kind` of execution batches and ingests in the shared ingest tables.
const INGEST_KIND: &str = "test_executions";
/// Executions are not scoped to one parent: batch and ingest ids are unique
/// across all of them.
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

/// The id of a test case named by id or key; NOT_FOUND when there is none.
async fn resolve(c: &impl GenericClient, r: &TestCaseRef) -> Result<Uuid> {
    Ok(sql::get(c, r).await?.ok_or_else(|| r.not_found())?.id)
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
        let new = NewTestCase::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let (test_case, created) = match sql::insert(&tx, Uuid::now_v7(), &new).await? {
            Some(t) => (t, true),
            None => (
                sql::get(&tx, &TestCaseRef::Key(new.key.clone()))
                    .await?
                    .ok_or_else(|| {
                        Error::Aborted(
                            Reason::ConcurrentChange,
                            "the test case with this key was deleted concurrently; retry".into(),
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
        let lookup = TestCaseRef::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let test_case = sql::get(conn.client().await?, &lookup)
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
        let query = ListTestCases::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list(conn.client().await?, &query).await?;
        let (test_cases, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| last.key.clone(),
            Into::into,
        )?;
        Ok(Response::new(proto::ListTestCasesResponse {
            test_cases,
            next_page_token,
        }))
    }

    async fn update_test_case(
        &self,
        request: Request<proto::UpdateTestCaseRequest>,
    ) -> RpcResult<proto::UpdateTestCaseResponse> {
        let (call, req) = rpc::split(request);
        let update = TestCaseUpdate::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::get_for_update(&tx, update.id)
            .await?
            .ok_or_else(|| TestCaseRef::Id(update.id).not_found())?;
        if let Some(expected) = update.expected_version
            && expected != current.version
        {
            return Err(stale(update.id, current.version, expected).into());
        }
        let updated = sql::update(&tx, &update).await?;
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
        let current = sql::get_for_update(&tx, id)
            .await?
            .ok_or_else(|| TestCaseRef::Id(id).not_found())?;
        if let Some(expected) = req.expected_version
            && expected != current.version
        {
            return Err(stale(id, current.version, expected).into());
        }
        let deleted_executions = if req.force {
            sql::delete_executions(&tx, id).await?
        } else if sql::has_executions(&tx, id).await? {
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
        sql::delete(&tx, id).await?;
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
        let encoded: Vec<Vec<u8>> = req.items.iter().map(|i| i.encode_to_vec()).collect();
        let digest = ingest::digest(encoded.iter().map(Vec::as_slice));
        let mut v = Validator::new();
        let batch_id = v.required_text("batch_id", &req.batch_id, crate::sessions::MAX_REQUEST_ID);
        let items = validate_items(&mut v, req.items, None, false);
        v.finish()?;

        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let claim = ingest::claim_batch(
            &tx,
            INGEST_KIND,
            INGEST_SCOPE,
            &batch_id,
            &digest,
            items.len(),
        )
        .await?;
        let (ids, replayed) = match claim {
            Claim::Replay { .. } => (executions_sql::batch_ids(&tx, &batch_id).await?, true),
            Claim::New => {
                let sink = ExecutionSink {
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
        let (call, stream) = rpc::split(request);
        let (ingest_id, messages) =
            ingest::open(stream, |first: &proto::IngestExecutionsRequest| {
                let mut v = Validator::new();
                let ingest_id = v.required_text(
                    "ingest_id",
                    &first.ingest_id,
                    crate::sessions::MAX_REQUEST_ID,
                );
                v.finish()?;
                Ok(ingest_id)
            })
            .await?;
        let header = ingest_id.clone();
        let chunks = messages.map(move |m| to_chunk(&header, m?));
        let outcome = ingest::run(
            &self.state.db,
            &call,
            IngestKey {
                kind: INGEST_KIND,
                ingest_id,
                scope: INGEST_SCOPE.into(),
            },
            Arc::new(ExecutionSink { batch_id: None }),
            Box::pin(chunks),
            INGEST_BATCH_ITEMS,
        )
        .await?;
        Ok(Response::new(proto::IngestExecutionsResponse {
            committed_items: outcome.committed_items,
            committed_chunks: outcome.committed_chunks,
            skipped_chunks: outcome.skipped_chunks,
            high_water_mark: outcome.high_water_mark,
        }))
    }

    async fn list_executions(
        &self,
        request: Request<proto::ListExecutionsRequest>,
    ) -> RpcResult<proto::ListExecutionsResponse> {
        let (call, req) = rpc::split(request);
        let query = ListExecutions::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let test_case_id = match &query.filter.test_case {
            Some(r) => Some(resolve(c, r).await?),
            None => None,
        };
        let max_bytes = i64::try_from(self.state.max_message_bytes).unwrap_or(i64::MAX);
        let rows = executions_sql::list(c, &query, test_case_id, max_bytes).await?;
        let (executions, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            executions_sql::key,
            Into::into,
        )?;
        Ok(Response::new(proto::ListExecutionsResponse {
            executions,
            next_page_token,
        }))
    }

    async fn get_test_statistics(
        &self,
        request: Request<proto::GetTestStatisticsRequest>,
    ) -> RpcResult<proto::GetTestStatisticsResponse> {
        let (call, req) = rpc::split(request);
        let query = StatisticsQuery::try_from(req)?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let (test_case_id, subsystem) = match &query.scope {
            StatsScope::All => (None, None),
            StatsScope::TestCase(r) => (Some(resolve(c, r).await?), None),
            StatsScope::Subsystem(s) => (None, Some(s.as_str())),
        };
        let totals = statistics_sql::totals(c, &query, test_case_id, subsystem).await?;
        let (flaky, flaky_test_count) =
            statistics_sql::flakiest(c, &query, test_case_id, subsystem).await?;
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
    let items = validate_items(&mut v, m.items, Some(m.sequence), true);
    v.finish().map_err(|e| ingest::in_chunk(e, m.sequence))?;
    Ok(Chunk {
        sequence: m.sequence,
        items,
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
    }
}
