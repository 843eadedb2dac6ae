//! CI test runs: one per pipeline build, with CI fields, labels and counts
//! computed from the executions attached to it.

mod service;
pub mod sql;

pub use service::TestRunApi;

use crate::digest::{Canonical, Content};
use crate::error::{Error, Result};
use crate::labels::{self, Labels};
use crate::pagination;
use crate::proto;
use crate::results::enum_set;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};

const MAX_CLIENT_KEY: usize = 200;
const MAX_NAME: usize = 200;
const MAX_BUILD_NUMBER: usize = 100;
const MAX_BUILD_URL: usize = 2000;
const MAX_COMMIT: usize = 64;
const MAX_BRANCH: usize = 200;

wire_enum!(RunStatus, proto::TestRunStatus, {
    Running = "running",
    Passed = "passed",
    Failed = "failed",
    Cancelled = "cancelled",
});

/// A validated CreateTestRun.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub client_key: String,
    pub name: String,
    pub build_number: String,
    pub build_url: String,
    pub commit_sha: String,
    pub branch: String,
    pub pull_request: i64,
    pub labels: Labels,
    pub started_at: Option<DateTime<Utc>>,
}

impl Content for NewRun {
    fn feed(&self, h: &mut Canonical) {
        h.str(&self.client_key)
            .str(&self.name)
            .str(&self.build_number)
            .str(&self.build_url)
            .str(&self.commit_sha)
            .str(&self.branch)
            .i64(self.pull_request)
            .seq(self.labels.iter(), |h, (k, v)| {
                h.str(k).str(v);
            })
            .opt(self.started_at.as_ref(), |h, t| {
                h.time(t);
            });
    }
}

impl TryFrom<proto::CreateTestRunRequest> for NewRun {
    type Error = Error;

    fn try_from(r: proto::CreateTestRunRequest) -> Result<Self> {
        let mut v = Validator::new();
        let run = NewRun {
            client_key: v.required_text("client_key", &r.client_key, MAX_CLIENT_KEY),
            name: text(&mut v, "name", &r.name, MAX_NAME),
            build_number: text(&mut v, "build_number", &r.build_number, MAX_BUILD_NUMBER),
            build_url: text(&mut v, "build_url", &r.build_url, MAX_BUILD_URL),
            commit_sha: text(&mut v, "commit_sha", &r.commit_sha, MAX_COMMIT),
            branch: text(&mut v, "branch", &r.branch, MAX_BRANCH),
            pull_request: v.non_negative("pull_request", r.pull_request),
            labels: labels::validate(&mut v, "labels", &r.labels),
            started_at: v.timestamp("started_at", r.started_at.as_ref()),
        };
        v.finish()?;
        Ok(run)
    }
}

fn text(v: &mut Validator, field: &str, value: &str, max: usize) -> String {
    v.optional_text(field, value, max).unwrap_or_default()
}

/// The filters of ListTestRuns (bound into its page tokens).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunFilter {
    pub statuses: Vec<RunStatus>,
    pub branch: Option<String>,
    pub commit_sha: Option<String>,
    pub labels: Labels,
    pub label_keys: Vec<String>,
    pub started_from: Option<DateTime<Utc>>,
    pub started_to: Option<DateTime<Utc>>,
}

/// A validated ListTestRuns.
#[derive(Debug, Clone)]
pub struct ListRuns {
    pub filter: RunFilter,
    pub page_size: i64,
    /// (started_at in microseconds, id) of the last run of the previous page.
    pub after: Option<(i64, uuid::Uuid)>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListTestRunsRequest> for ListRuns {
    type Error = Error;

    fn try_from(r: proto::ListTestRunsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (started_from, started_to) = v.time_range("started", r.started.as_ref());
        let filter = RunFilter {
            statuses: enum_set(&mut v, "statuses", &r.statuses, RunStatus::from_proto),
            branch: v.optional_text("branch", &r.branch, MAX_BRANCH),
            commit_sha: v.optional_text("commit_sha", &r.commit_sha, MAX_COMMIT),
            labels: labels::validate(&mut v, "labels", &r.labels),
            label_keys: labels::validate_keys(&mut v, "label_keys", &r.label_keys),
            started_from,
            started_to,
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("test_runs", &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListRuns {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

/// A validated FinishTestRun.
#[derive(Debug, Clone)]
pub struct Finish {
    pub id: uuid::Uuid,
    /// `None`: derived from the executions.
    pub status: Option<RunStatus>,
    pub finished_at: Option<DateTime<Utc>>,
    pub expected_version: Option<i64>,
}

impl TryFrom<proto::FinishTestRunRequest> for Finish {
    type Error = Error;

    fn try_from(r: proto::FinishTestRunRequest) -> Result<Self> {
        let mut v = Validator::new();
        let status = match RunStatus::from_proto(r.status) {
            _ if r.status == 0 => None,
            Some(RunStatus::Running) | None => {
                v.violation(
                    "status",
                    "must be PASSED, FAILED, CANCELLED or UNSPECIFIED (derive it)",
                );
                None
            }
            some => some,
        };
        let finish = Finish {
            id: v.uuid("id", &r.id),
            status,
            finished_at: v.timestamp("finished_at", r.finished_at.as_ref()),
            expected_version: v.expected_version("expected_version", r.expected_version),
        };
        v.finish()?;
        Ok(finish)
    }
}
