//! The TestRunService.

use super::sql::{self, Counts, RunRow};
use super::{Finish, ListRuns, NewRun, RunStatus};
use crate::audit::{self, Outcome};
use crate::convert::timestamp;
use crate::digest;
use crate::error::{Error, Reason, Result};
use crate::labels;
use crate::pagination;
use crate::proto::{self, test_run_service_server::TestRunService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use deadpool_postgres::GenericClient;
use tonic::{Request, Response};
use uuid::Uuid;

/// The TestRunService implementation.
pub struct TestRunApi {
    state: AppState,
}

impl TestRunApi {
    pub fn new(state: AppState) -> Self {
        TestRunApi { state }
    }
}

fn to_proto(r: RunRow, counts: Option<Counts>) -> proto::TestRun {
    proto::TestRun {
        id: r.id.to_string(),
        client_key: r.client_key,
        name: r.name,
        build_number: r.build_number,
        build_url: r.build_url,
        commit_sha: r.commit_sha,
        branch: r.branch,
        pull_request: r.pull_request,
        status: r.status.to_proto() as i32,
        labels: labels::from_json(&r.labels),
        started_at: Some(timestamp(r.started_at)),
        finished_at: r.finished_at.map(timestamp),
        created_at: Some(timestamp(r.created_at)),
        version: r.version,
        counts: counts.map(|c| proto::TestRunCounts {
            tests: c.tests,
            passed: c.passed,
            failed: c.failed,
            skipped: c.skipped,
            errored: c.errored,
            passed_on_retry: c.passed_on_retry,
            executions: c.executions,
            pass_rate: {
                let decided = c.passed + c.failed + c.errored;
                if decided == 0 {
                    0.0
                } else {
                    c.passed as f64 / decided as f64
                }
            },
            total_duration_ms: c.total_duration_ms,
        }),
    }
}

/// The run as its first CreateTestRun made it: what this caller sent plus
/// the stored id and times (a replay shows nothing else of what is stored).
fn as_created(sent: &NewRun, stored: &RunRow) -> proto::TestRun {
    to_proto(
        RunRow {
            id: stored.id,
            client_key: sent.client_key.clone(),
            content_digest: Vec::new(),
            name: sent.name.clone(),
            build_number: sent.build_number.clone(),
            build_url: sent.build_url.clone(),
            commit_sha: sent.commit_sha.clone(),
            branch: sent.branch.clone(),
            pull_request: sent.pull_request,
            status: RunStatus::Running,
            labels: labels::to_json(&sent.labels),
            started_at: stored.started_at,
            finished_at: None,
            created_at: stored.created_at,
            version: 1,
        },
        None,
    )
}

/// CompareTestRuns' duration threshold when the request gives none.
const DEFAULT_DURATION_CHANGE_MS: i64 = 1000;

fn status_of(text: Option<&str>) -> Result<i32> {
    Ok(match text {
        None => proto::ExecutionStatus::Unspecified as i32,
        Some(s) => crate::test_cases::ExecutionStatus::from_db(s)?.to_proto() as i32,
    })
}

/// The reply of CompareTestRuns from its rows.
fn comparison(rows: Vec<sql::Compared>) -> Result<proto::CompareTestRunsResponse> {
    let mut reply = proto::CompareTestRunsResponse::default();
    let mut counts = proto::TestRunComparisonCounts::default();
    for row in rows {
        let item = proto::ComparedTest {
            test_case_id: row.test_case_id.to_string(),
            test_case_key: row.test_case_key,
            base_status: status_of(row.base_status.as_deref())?,
            head_status: status_of(row.head_status.as_deref())?,
            base_duration_ms: row.base_duration_ms.unwrap_or(0),
            head_duration_ms: row.head_duration_ms.unwrap_or(0),
        };
        let (list, total) = match row.category.as_str() {
            "new_failures" => (&mut reply.new_failures, &mut counts.new_failures),
            "fixed" => (&mut reply.fixed, &mut counts.fixed),
            "still_failing" => (&mut reply.still_failing, &mut counts.still_failing),
            "new_tests" => (&mut reply.new_tests, &mut counts.new_tests),
            "removed_tests" => (&mut reply.removed_tests, &mut counts.removed_tests),
            "duration_changes" => (&mut reply.duration_changes, &mut counts.duration_changes),
            other => {
                return Err(Error::Internal(format!(
                    "unknown comparison category {other:?}"
                )));
            }
        };
        list.push(item);
        *total = row.total;
    }
    reply.counts = Some(counts);
    Ok(reply)
}

fn not_found(what: &str) -> Error {
    Error::NotFound(format!("no test run is {what}"))
}

async fn with_counts(c: &impl GenericClient, run: RunRow) -> Result<proto::TestRun> {
    let counts = sql::counts(c, run.id).await?;
    Ok(to_proto(run, Some(counts)))
}

#[tonic::async_trait]
impl TestRunService for TestRunApi {
    async fn create_test_run(
        &self,
        request: Request<proto::CreateTestRunRequest>,
    ) -> RpcResult<proto::CreateTestRunResponse> {
        let (call, req) = rpc::split(request);
        let run = NewRun::try_from(req)?;
        let project = call.project()?;
        let digest = digest::of("test_run", &run);
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let (reply, created) = match sql::insert(&tx, project, Uuid::new_v4(), &run, &digest)
            .await?
        {
            Some(stored) => {
                audit::record(&tx, &call, &[stored.id.to_string()], Outcome::Created).await?;
                (to_proto(stored, None), true)
            }
            None => {
                let stored = sql::by_key(&tx, project, &run.client_key)
                    .await?
                    .ok_or_else(|| {
                        Error::Aborted(
                            Reason::ConcurrentChange,
                            "the test run was deleted meanwhile; retry".into(),
                        )
                    })?;
                if stored.content_digest != digest {
                    return Err(
                        digest::key_reused("client_key", &run.client_key, "a test run").into(),
                    );
                }
                audit::record(&tx, &call, &[stored.id.to_string()], Outcome::Replayed).await?;
                (as_created(&run, &stored), false)
            }
        };
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::CreateTestRunResponse {
            run: Some(reply),
            created,
        }))
    }

    async fn get_test_run(
        &self,
        request: Request<proto::GetTestRunRequest>,
    ) -> RpcResult<proto::GetTestRunResponse> {
        use proto::get_test_run_request::Lookup;
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let lookup = match req.lookup {
            Some(Lookup::Id(id)) => Some(Ok(v.uuid("id", &id))),
            Some(Lookup::ClientKey(key)) => Some(Err(v.required_text("client_key", &key, 200))),
            None => {
                v.violation("lookup", "give the run's id or client_key");
                None
            }
        };
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let run = match lookup {
            Some(Ok(id)) => sql::by_id(c, project, id)
                .await?
                .ok_or_else(|| not_found(&id.to_string()))?,
            Some(Err(key)) => sql::by_key(c, project, &key)
                .await?
                .ok_or_else(|| not_found(&format!("{key:?}")))?,
            None => return Err(Error::invalid("lookup", "give the run's id or client_key").into()),
        };
        Ok(Response::new(proto::GetTestRunResponse {
            run: Some(with_counts(c, run).await?),
        }))
    }

    async fn list_test_runs(
        &self,
        request: Request<proto::ListTestRunsRequest>,
    ) -> RpcResult<proto::ListTestRunsResponse> {
        let (call, req) = rpc::split(request);
        let count = crate::totals::requested(req.count)?;
        let query = ListRuns::try_from(req)?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list(conn.client().await?, project, &query).await?;
        let (runs, next_page_token) = pagination::page(
            rows,
            query.page_size,
            self.state.max_message_bytes,
            &query.fingerprint,
            |last| (last.started_at.timestamp_micros(), last.id),
            |row| to_proto(row, None),
        )?;
        let (total, total_mode) = sql::count(
            conn.client().await?,
            project,
            &query,
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListTestRunsResponse {
            runs,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn finish_test_run(
        &self,
        request: Request<proto::FinishTestRunRequest>,
    ) -> RpcResult<proto::FinishTestRunResponse> {
        let (call, req) = rpc::split(request);
        let finish = Finish::try_from(req)?;
        let project = call.project()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = sql::lock(&tx, project, finish.id)
            .await?
            .ok_or_else(|| not_found(&finish.id.to_string()))?;
        if let Some(expected) = finish.expected_version
            && expected != current.version
        {
            return Err(Error::Aborted(
                Reason::VersionMismatch,
                format!(
                    "test run {} is at version {}, not {expected}; re-read it and retry",
                    current.id, current.version
                ),
            )
            .into());
        }
        if current.status != RunStatus::Running {
            return Err(Error::FailedPrecondition(
                Reason::IllegalStatusTransition,
                format!(
                    "test run {} is already {}; only a RUNNING run can be finished",
                    current.id,
                    current.status.as_str()
                ),
            )
            .into());
        }
        if let Some(at) = finish.finished_at
            && at < current.started_at
        {
            return Err(
                Error::invalid("finished_at", "must not be before the run's started_at").into(),
            );
        }
        let counts = sql::counts(&tx, current.id).await?;
        let status = finish
            .status
            .unwrap_or(if counts.failed + counts.errored > 0 {
                RunStatus::Failed
            } else {
                RunStatus::Passed
            });
        let finished = sql::finish(&tx, project, current.id, status, finish.finished_at).await?;
        audit::record(&tx, &call, &[current.id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::FinishTestRunResponse {
            run: Some(to_proto(finished, Some(counts))),
        }))
    }

    async fn compare_test_runs(
        &self,
        request: Request<proto::CompareTestRunsRequest>,
    ) -> RpcResult<proto::CompareTestRunsResponse> {
        let (call, req) = rpc::split(request);
        let project = call.project()?;
        let mut v = Validator::new();
        let base = v.uuid("base_run_id", &req.base_run_id);
        let head = v.uuid("head_run_id", &req.head_run_id);
        let min_change = match v.non_negative("min_duration_change_ms", req.min_duration_change_ms)
        {
            0 => DEFAULT_DURATION_CHANGE_MS,
            ms => ms,
        };
        let max_items = match req.max_items {
            0 => 100,
            n @ 1..=1000 => i64::from(n),
            _ => {
                v.violation("max_items", "must be between 0 (default 100) and 1000");
                100
            }
        };
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        for id in [base, head] {
            if sql::by_id(c, project, id).await?.is_none() {
                return Err(not_found(&id.to_string()).into());
            }
        }
        let rows = sql::compare(c, project, base, head, min_change, max_items).await?;
        Ok(Response::new(comparison(rows)?))
    }
}
