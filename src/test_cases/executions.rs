//! Executions of test cases: validation of reported executions, the stored
//! form, and the list and statistics queries.

use super::{ExecutionStatus, MAX_KEY, MAX_SUBSYSTEM, TestCaseRef, optional_ref};
use crate::convert::{JsonDoc, JsonDocList, timestamp};
use crate::error::{Error, FieldViolation, Result};
use crate::labels::{self, LabelFilter, Labels};
use crate::pagination;
use crate::proto;
use crate::results::enum_set;
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Number, Value as Json};
use uuid::Uuid;

/// Most executions in one RecordExecutions call or one ingest chunk.
pub const MAX_BATCH: usize = 5000;
const MAX_ERROR_MESSAGE: usize = 8192;
const MAX_STACK_TRACE: usize = 65_536;
const MAX_SCREENSHOTS: usize = 100;
const MAX_SCREENSHOT_REF: usize = 2048;
const MAX_STEPS: usize = 1000;
const MAX_LOG_BYTES: usize = 256 * 1024;
const MAX_FIGURES: usize = 100;
const MAX_FIGURE_NAME: usize = 128;
/// Flakiness window and ranking sizes.
const DEFAULT_FLAKINESS_WINDOW: i64 = 20;
const MAX_FLAKINESS_WINDOW: i64 = 1000;
const DEFAULT_TOP_FLAKY: i64 = 10;
const MAX_TOP_FLAKY: i64 = 100;

/// Where an item came from in its request, to name it in errors found only
/// when it is written (an unknown test case or session).
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The chunk of a streamed ingest; `None` in RecordExecutions.
    pub chunk: Option<i64>,
    /// The item's index in its message.
    pub index: usize,
}

impl Origin {
    /// An INVALID_ARGUMENT naming `items[i].field` (and the chunk, if any).
    pub fn invalid(&self, field: &str, description: String) -> Error {
        let description = match self.chunk {
            Some(seq) => format!("{description} (chunk {seq})"),
            None => description,
        };
        Error::InvalidArgument(vec![FieldViolation::new(
            format!("items[{}].{field}", self.index),
            description,
        )])
    }
}

/// A validated execution to store, its id already assigned.
#[derive(Debug, Clone)]
pub struct NewExecution {
    pub id: Uuid,
    pub origin: Origin,
    pub test_case: TestCaseRef,
    pub session_id: Option<Uuid>,
    /// The test run it belongs to, and its attempt there (1 without a run).
    pub run_id: Option<Uuid>,
    pub attempt: i32,
    pub status: ExecutionStatus,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub environment: Json,
    pub error_message: String,
    pub stack_trace: String,
    pub screenshot_refs: Vec<String>,
    /// A JSON array of step objects.
    pub interaction_log: Json,
    /// A JSON object of finite numbers.
    pub performance: Json,
    pub labels: Labels,
}

/// The content of a reported execution for batch digests (its id and its
/// place in the request are left out; `performance` and every Struct are
/// hashed with their keys sorted).
impl crate::digest::Content for NewExecution {
    fn feed(&self, h: &mut crate::digest::Canonical) {
        match &self.test_case {
            TestCaseRef::Id(id) => h.str("id").bytes(id.as_bytes()),
            TestCaseRef::Key(key) => h.str("key").str(key),
        };
        h.opt(self.session_id, |h, id| {
            h.bytes(id.as_bytes());
        })
        .str(self.status.as_str())
        .time(&self.started_at)
        .i64(self.duration_ms)
        .json(&self.environment)
        .str(&self.error_message)
        .str(&self.stack_trace)
        .seq(self.screenshot_refs.iter(), |h, r| {
            h.str(r);
        })
        .json(&self.interaction_log)
        .json(&self.performance);
        // Fed only when set, so digests of batches stored before runs
        // existed still match their replays.
        if let Some(run) = self.run_id {
            h.str("run")
                .bytes(run.as_bytes())
                .i64(i64::from(self.attempt));
        }
        labels::feed(h, &self.labels);
    }
}

/// Validates one reported execution; violations are named `items[i].field`.
pub fn validate_input(
    v: &mut Validator,
    origin: Origin,
    raw: proto::ExecutionInput,
) -> NewExecution {
    use proto::execution_input::TestCase as Which;
    let mut iv = Validator::scoped(format!("items[{}].", origin.index));
    let test_case = match &raw.test_case {
        Some(Which::TestCaseId(id)) => TestCaseRef::Id(iv.uuid("test_case_id", id)),
        Some(Which::TestCaseKey(key)) => {
            TestCaseRef::Key(iv.required_text("test_case_key", key, MAX_KEY))
        }
        None => {
            iv.violation("test_case", "set test_case_id or test_case_key");
            TestCaseRef::Id(Uuid::nil())
        }
    };
    let started_at = match raw.started_at.as_ref() {
        None => {
            iv.violation("started_at", "is required");
            None
        }
        some => iv.timestamp("started_at", some),
    };
    let new = NewExecution {
        id: Uuid::now_v7(),
        origin,
        test_case,
        session_id: iv.optional_uuid("session_id", &raw.session_id),
        run_id: iv.optional_uuid("run_id", &raw.run_id),
        attempt: match raw.attempt {
            0 => 1,
            n @ 1..=1000 => n,
            _ => {
                iv.violation("attempt", "must be between 1 and 1000 (0 means 1)");
                1
            }
        },
        status: iv
            .required_enum("status", raw.status, ExecutionStatus::from_proto)
            .unwrap_or(ExecutionStatus::Error),
        started_at: started_at.unwrap_or_default(),
        duration_ms: iv.non_negative("duration_ms", raw.duration_ms),
        environment: iv.json("environment", raw.environment.as_ref()),
        error_message: iv.optional_message("error_message", &raw.error_message, MAX_ERROR_MESSAGE),
        stack_trace: iv.optional_message("stack_trace", &raw.stack_trace, MAX_STACK_TRACE),
        screenshot_refs: screenshot_refs(&mut iv, &raw.screenshot_refs),
        interaction_log: interaction_log(&mut iv, &raw.interaction_log),
        performance: performance(&mut iv, &raw.performance),
        labels: labels::validate(&mut iv, "labels", &raw.labels),
    };
    v.absorb(iv);
    new
}

fn screenshot_refs(v: &mut Validator, raw: &[String]) -> Vec<String> {
    if raw.len() > MAX_SCREENSHOTS {
        v.violation(
            "screenshot_refs",
            format!(
                "holds {}; at most {MAX_SCREENSHOTS} are accepted",
                raw.len()
            ),
        );
        return Vec::new();
    }
    raw.iter()
        .enumerate()
        .map(|(i, r)| v.required_text(&format!("screenshot_refs[{i}]"), r, MAX_SCREENSHOT_REF))
        .collect()
}

fn interaction_log(v: &mut Validator, raw: &[crate::structs::Struct]) -> Json {
    if raw.len() > MAX_STEPS {
        v.violation(
            "interaction_log",
            format!(
                "holds {} steps; at most {MAX_STEPS} are accepted",
                raw.len()
            ),
        );
        return Json::Array(Vec::new());
    }
    let steps: Vec<Json> = raw
        .iter()
        .enumerate()
        .map(|(i, s)| v.json_max(&format!("interaction_log[{i}]"), Some(s), MAX_LOG_BYTES))
        .collect();
    let log = Json::Array(steps);
    let size = serde_json::to_vec(&log)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_LOG_BYTES {
        v.violation(
            "interaction_log",
            format!("is {size} bytes as JSON; at most {MAX_LOG_BYTES} are accepted"),
        );
    }
    log
}

fn performance(v: &mut Validator, raw: &std::collections::HashMap<String, f64>) -> Json {
    if raw.len() > MAX_FIGURES {
        v.violation(
            "performance",
            format!(
                "holds {} figures; at most {MAX_FIGURES} are accepted",
                raw.len()
            ),
        );
        return Json::Object(Map::new());
    }
    let mut names: Vec<&String> = raw.keys().collect();
    names.sort();
    let mut out = Map::new();
    for name in names {
        let value = raw[name];
        let field = format!("performance[{name:?}]");
        if name.is_empty() || name.chars().count() > MAX_FIGURE_NAME {
            v.violation(
                &field,
                format!("names must be 1..{MAX_FIGURE_NAME} characters"),
            );
        } else if name.chars().any(char::is_control) {
            v.violation(&field, "names must not contain control characters");
        }
        match Number::from_f64(value) {
            Some(n) => {
                out.insert(name.clone(), Json::Number(n));
            }
            None => v.violation(&field, "must be a finite number (no NaN or infinity)"),
        }
    }
    Json::Object(out)
}

/// Validates the items of a batch or chunk (1..=MAX_BATCH unless `allow_empty`).
pub fn validate_items(
    v: &mut Validator,
    items: Vec<proto::ExecutionInput>,
    chunk: Option<i64>,
    allow_empty: bool,
) -> Vec<NewExecution> {
    v.items("items", items, MAX_BATCH, allow_empty, |v, index, raw| {
        validate_input(v, Origin { chunk, index }, raw)
    })
}

/// A stored execution.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Execution {
    pub id: Uuid,
    pub test_case_id: Uuid,
    pub test_case_key: String,
    pub session_id: Option<Uuid>,
    pub run_id: Option<Uuid>,
    pub attempt: i32,
    pub status: ExecutionStatus,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    /// `None` when a BASIC list left it out.
    pub environment: Option<JsonDoc>,
    pub error_message: String,
    pub stack_trace: String,
    pub screenshot_refs: Vec<String>,
    pub interaction_log: Option<JsonDocList>,
    pub performance: Json,
    pub created_at: DateTime<Utc>,
    /// The error signature and effective triage of a failure, when the
    /// list filled them in (`crate::failures::sql::effective`).
    #[serde(skip)]
    pub triage: Option<(Vec<u8>, crate::failures::Triage)>,
    pub labels: Labels,
}

/// The figures of a stored performance document: the numbers of an
/// object (anything else in it, or a document that is no object: none).
pub fn performance_figures(doc: &Json) -> impl Iterator<Item = (&String, f64)> {
    doc.as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
}

impl From<Execution> for proto::Execution {
    fn from(e: Execution) -> Self {
        let steps = e
            .interaction_log
            .map(JsonDocList::into_structs)
            .unwrap_or_default();
        let performance = performance_figures(&e.performance)
            .map(|(k, v)| (k.clone(), v))
            .collect();
        proto::Execution {
            id: e.id.to_string(),
            test_case_id: e.test_case_id.to_string(),
            test_case_key: e.test_case_key,
            session_id: e.session_id.map(|s| s.to_string()).unwrap_or_default(),
            run_id: e.run_id.map(|r| r.to_string()).unwrap_or_default(),
            attempt: e.attempt,
            status: e.status.to_proto() as i32,
            started_at: Some(timestamp(e.started_at)),
            duration_ms: e.duration_ms,
            // Null only when a BASIC list left it out.
            environment: e.environment.and_then(JsonDoc::into_object),
            error_message: e.error_message,
            stack_trace: e.stack_trace,
            screenshot_refs: e.screenshot_refs,
            interaction_log: steps,
            performance,
            created_at: Some(timestamp(e.created_at)),
            error_signature: e
                .triage
                .as_ref()
                .map(|(sig, _)| crate::failures::to_hex(sig))
                .unwrap_or_default(),
            triage: e.triage.map(|(_, t)| t.into()),
            labels: e.labels.into_iter().collect(),
        }
    }
}

/// Filters of ListExecutions; part of the page-token fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExecutionFilter {
    pub test_case: Option<TestCaseRef>,
    pub session_id: Option<Uuid>,
    /// Left out of the fingerprint when unset, so tokens issued before the
    /// filter existed stay valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    pub statuses: Vec<ExecutionStatus>,
    pub started_from: Option<DateTime<Utc>>,
    pub started_to: Option<DateTime<Utc>>,
    /// Left out of the fingerprint when empty (tokens from before stay valid).
    #[serde(flatten)]
    pub labels: LabelFilter,
    /// The full-text filter over error messages; left out of the
    /// fingerprint when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Keyset position in newest-first order: (started_at microseconds, id).
pub type ExecutionKey = (i64, Uuid);

/// A validated ListExecutions call.
#[derive(Debug, Clone)]
pub struct ListExecutions {
    pub filter: ExecutionFilter,
    pub page_size: i64,
    /// BASIC leaves environment, stack trace, interaction log and
    /// performance out (not read at all).
    pub view: pagination::View,
    pub after: Option<ExecutionKey>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListExecutionsRequest> for ListExecutions {
    type Error = Error;

    fn try_from(r: proto::ListExecutionsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (started_from, started_to) = v.time_range("started", r.started.as_ref());
        let filter = ExecutionFilter {
            test_case: optional_ref(
                &mut v,
                ("test_case_id", &r.test_case_id),
                ("test_case_key", &r.test_case_key),
            ),
            session_id: v.optional_uuid("session_id", &r.session_id),
            run_id: v.optional_uuid("run_id", &r.run_id),
            statuses: enum_set(&mut v, "statuses", &r.statuses, ExecutionStatus::from_proto),
            started_from,
            started_to,
            labels: LabelFilter::validate(&mut v, &r.labels, &r.label_keys),
            query: crate::search::validate(&mut v, "query", &r.query),
        };
        let page_size = v.page_size("page_size", r.page_size);
        let view = pagination::View::from_wire(&mut v, "view", r.view);
        v.finish()?;
        let fingerprint = pagination::fingerprint(&view.scope("test_executions"), &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListExecutions {
            filter,
            page_size,
            view,
            after,
            fingerprint,
        })
    }
}

/// Which executions statistics cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsScope {
    All,
    TestCase(TestCaseRef),
    Subsystem(String),
    /// Test cases of one type (their current type).
    TestType(super::TestType),
    /// Executions carrying all these labels (jsonb containment).
    Labels(crate::labels::Labels),
    /// The last attempt of each test case in one test run.
    Run(Uuid),
}

/// A validated GetTestStatistics call.
#[derive(Debug, Clone)]
pub struct StatisticsQuery {
    pub scope: StatsScope,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub flakiness_window: i64,
    pub top_flaky: i64,
}

fn bounded(v: &mut Validator, field: &str, raw: i32, default: i64, max: i64) -> i64 {
    match i64::from(raw) {
        0 => default,
        n if (1..=max).contains(&n) => n,
        _ => {
            v.violation(
                field,
                format!("must be between 0 (default {default}) and {max}"),
            );
            default
        }
    }
}

impl TryFrom<proto::GetTestStatisticsRequest> for StatisticsQuery {
    type Error = Error;

    fn try_from(r: proto::GetTestStatisticsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let test_case = optional_ref(
            &mut v,
            ("test_case_id", &r.test_case_id),
            ("test_case_key", &r.test_case_key),
        );
        let subsystem = v.optional_text("target_subsystem", &r.target_subsystem, MAX_SUBSYSTEM);
        let test_type = match r.test_type {
            0 => None,
            raw => v.required_enum("test_type", raw, super::TestType::from_proto),
        };
        let labels = crate::labels::validate(&mut v, "labels", &r.labels);
        let run = v.optional_uuid("run_id", &r.run_id);
        // The scope fields are mutually exclusive: the first one set wins and
        // every further one is a violation of its own field.
        let mut scope = StatsScope::All;
        let mut set = |v: &mut Validator, field: &str, candidate: Option<StatsScope>| {
            let Some(candidate) = candidate else { return };
            if scope == StatsScope::All {
                scope = candidate;
            } else {
                v.violation(
                    field,
                    "set at most one of test_case_id, test_case_key, target_subsystem, \
                     test_type, labels and run_id",
                );
            }
        };
        set(&mut v, "test_case", test_case.map(StatsScope::TestCase));
        set(
            &mut v,
            "target_subsystem",
            subsystem.map(StatsScope::Subsystem),
        );
        set(&mut v, "test_type", test_type.map(StatsScope::TestType));
        set(
            &mut v,
            "labels",
            (!labels.is_empty()).then_some(StatsScope::Labels(labels)),
        );
        set(&mut v, "run_id", run.map(StatsScope::Run));
        let (from, to) = v.time_range("window", r.window.as_ref());
        if !r.run_id.is_empty() && r.window.is_some() {
            v.violation(
                "window",
                "must be unset with run_id (a run's statistics cover the whole run)",
            );
        }
        let query = StatisticsQuery {
            scope,
            from,
            to,
            flakiness_window: bounded(
                &mut v,
                "flakiness_window",
                r.flakiness_window,
                DEFAULT_FLAKINESS_WINDOW,
                MAX_FLAKINESS_WINDOW,
            ),
            top_flaky: bounded(
                &mut v,
                "top_flaky",
                r.top_flaky,
                DEFAULT_TOP_FLAKY,
                MAX_TOP_FLAKY,
            ),
        };
        v.finish()?;
        Ok(query)
    }
}
