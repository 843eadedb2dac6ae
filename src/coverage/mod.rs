//! Code coverage: reports of commits with per-file rows, aggregates,
//! trends and commit-to-commit comparisons.

mod queries;
mod service;
#[macro_use]
pub mod sql;
pub mod readback;

pub use queries::{AggregateQuery, CompareQuery, TrendQuery};

pub use service::CoverageApi;

use crate::convert::timestamp;
use crate::error::{Error, Result};
use crate::labels::{self, Labels};
use crate::proto;
use crate::test_cases::MAX_SUBSYSTEM;
use crate::validate::Validator;
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use uuid::Uuid;

pub(crate) const MAX_BRANCH: usize = 256;
const MAX_CLIENT_KEY: usize = 128;
const MAX_PATH: usize = 1024;
/// Most per-file rows in one report (the message limit usually binds first).
pub const MAX_FILES: usize = 100_000;
/// Largest count a counter accepts (2^40, about 1.1 trillion): far above
/// any code base, and low enough that a report's totals summed from its
/// files (at most `MAX_FILES`) and aggregates over millions of reports stay
/// within int64.
pub const MAX_COUNTER: i64 = 1 << 40;
/// How far in the future a client clock may put `recorded_at`.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Covered and total counts; every covered count is within 0..=total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub lines_covered: i64,
    pub lines_total: i64,
    pub branches_covered: i64,
    pub branches_total: i64,
    pub functions_covered: i64,
    pub functions_total: i64,
}

impl Counters {
    /// Validates counters under `field` (e.g. `files[3].counters`).
    fn validate(v: &mut Validator, field: &str, raw: &proto::CoverageCounters) -> Counters {
        let pairs = [
            ("lines", raw.lines_covered, raw.lines_total),
            ("branches", raw.branches_covered, raw.branches_total),
            ("functions", raw.functions_covered, raw.functions_total),
        ];
        for (name, covered, total) in pairs {
            for (suffix, n) in [("total", total), ("covered", covered)] {
                if n < 0 {
                    v.violation(format!("{field}.{name}_{suffix}"), "must be 0 or more");
                } else if n > MAX_COUNTER {
                    v.violation(
                        format!("{field}.{name}_{suffix}"),
                        format!("must be at most 2^40 ({MAX_COUNTER})"),
                    );
                }
            }
            if (0..=MAX_COUNTER).contains(&covered) && covered > total.max(0) {
                v.violation(
                    format!("{field}.{name}_covered"),
                    format!("{covered} exceeds {name}_total ({total})"),
                );
            }
        }
        Counters::from(raw)
    }

    /// Whether every counter is within `0..=MAX_COUNTER`.
    fn within_bounds(&self) -> bool {
        [
            self.lines_covered,
            self.lines_total,
            self.branches_covered,
            self.branches_total,
            self.functions_covered,
            self.functions_total,
        ]
        .iter()
        .all(|n| (0..=MAX_COUNTER).contains(n))
    }

    fn checked_add(self, o: Counters) -> Option<Counters> {
        Some(Counters {
            lines_covered: self.lines_covered.checked_add(o.lines_covered)?,
            lines_total: self.lines_total.checked_add(o.lines_total)?,
            branches_covered: self.branches_covered.checked_add(o.branches_covered)?,
            branches_total: self.branches_total.checked_add(o.branches_total)?,
            functions_covered: self.functions_covered.checked_add(o.functions_covered)?,
            functions_total: self.functions_total.checked_add(o.functions_total)?,
        })
    }

    /// `self - base`, counter by counter (saturating: rows stored before
    /// `MAX_COUNTER` existed may hold any int64).
    pub fn minus(self, base: Counters) -> Counters {
        Counters {
            lines_covered: self.lines_covered.saturating_sub(base.lines_covered),
            lines_total: self.lines_total.saturating_sub(base.lines_total),
            branches_covered: self.branches_covered.saturating_sub(base.branches_covered),
            branches_total: self.branches_total.saturating_sub(base.branches_total),
            functions_covered: self
                .functions_covered
                .saturating_sub(base.functions_covered),
            functions_total: self.functions_total.saturating_sub(base.functions_total),
        }
    }

    pub fn lines_percent(&self) -> Option<f64> {
        percent(self.lines_covered, self.lines_total)
    }

    pub fn branches_percent(&self) -> Option<f64> {
        percent(self.branches_covered, self.branches_total)
    }

    pub fn functions_percent(&self) -> Option<f64> {
        percent(self.functions_covered, self.functions_total)
    }

    pub fn percentages(&self) -> proto::CoveragePercentages {
        proto::CoveragePercentages {
            lines: self.lines_percent(),
            branches: self.branches_percent(),
            functions: self.functions_percent(),
        }
    }
}

fn percent(covered: i64, total: i64) -> Option<f64> {
    (total > 0).then(|| covered as f64 * 100.0 / total as f64)
}

/// `head - base` of two optional percentages.
pub fn percent_delta(head: Option<f64>, base: Option<f64>) -> Option<f64> {
    Some(head? - base?)
}

impl From<&proto::CoverageCounters> for Counters {
    fn from(c: &proto::CoverageCounters) -> Self {
        Counters {
            lines_covered: c.lines_covered,
            lines_total: c.lines_total,
            branches_covered: c.branches_covered,
            branches_total: c.branches_total,
            functions_covered: c.functions_covered,
            functions_total: c.functions_total,
        }
    }
}

impl From<Counters> for proto::CoverageCounters {
    fn from(c: Counters) -> Self {
        proto::CoverageCounters {
            lines_covered: c.lines_covered,
            lines_total: c.lines_total,
            branches_covered: c.branches_covered,
            branches_total: c.branches_total,
            functions_covered: c.functions_covered,
            functions_total: c.functions_total,
        }
    }
}

/// A commit sha: 7..64 hexadecimal characters, lower-cased.
pub(crate) fn commit_sha(v: &mut Validator, field: &str, raw: &str) -> String {
    if raw.is_empty() {
        v.violation(field, "is required");
    } else if !(7..=64).contains(&raw.len()) || !raw.chars().all(|c| c.is_ascii_hexdigit()) {
        v.violation(field, "must be 7..64 hexadecimal characters");
    }
    raw.to_ascii_lowercase()
}

/// One file of a report to record.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub path: String,
    pub counters: Counters,
}

/// A validated report to record.
#[derive(Debug, Clone)]
pub struct NewReport {
    pub commit_sha: String,
    pub branch: String,
    pub subsystem: String,
    pub session_id: Option<Uuid>,
    pub client_key: String,
    pub totals: Counters,
    pub files: Vec<NewFile>,
    pub recorded_at: Option<DateTime<Utc>>,
    pub labels: Labels,
}

fn files(v: &mut Validator, raw: Vec<proto::FileCoverage>) -> Vec<NewFile> {
    if raw.len() > MAX_FILES {
        v.violation(
            "files",
            format!(
                "holds {} files; at most {MAX_FILES} are accepted",
                raw.len()
            ),
        );
        return Vec::new();
    }
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(raw.len());
    raw.into_iter()
        .enumerate()
        .map(|(i, f)| {
            let path = v.required_text(&format!("files[{i}].path"), &f.path, MAX_PATH);
            if let Some(first) = seen.insert(path.clone(), i) {
                v.violation(
                    format!("files[{i}].path"),
                    format!("duplicates files[{first}].path"),
                );
            }
            let counters = Counters::validate(
                v,
                &format!("files[{i}].counters"),
                &f.counters.unwrap_or_default(),
            );
            NewFile { path, counters }
        })
        .collect()
}

impl TryFrom<proto::RecordCoverageRequest> for NewReport {
    type Error = Error;

    fn try_from(r: proto::RecordCoverageRequest) -> Result<Self> {
        let mut v = Validator::new();
        let recorded_at = v.timestamp("recorded_at", r.recorded_at.as_ref());
        if recorded_at.is_some_and(|t| t > Utc::now() + CLOCK_SKEW) {
            v.violation(
                "recorded_at",
                "must not be more than 5 minutes in the future",
            );
        }
        let commit_sha = commit_sha(&mut v, "commit_sha", &r.commit_sha);
        let branch = v.required_text("branch", &r.branch, MAX_BRANCH);
        let subsystem = v
            .optional_text("subsystem", &r.subsystem, MAX_SUBSYSTEM)
            .unwrap_or_default();
        let session_id = v.optional_uuid("session_id", &r.session_id);
        let client_key = v.required_text("client_key", &r.client_key, MAX_CLIENT_KEY);
        let stated = r
            .totals
            .as_ref()
            .map(|t| Counters::validate(&mut v, "totals", t));
        let files = files(&mut v, r.files);
        let labels = labels::validate(&mut v, "labels", &r.labels);
        let totals = match stated {
            Some(t) => t,
            // A file out of bounds is named already; its sum says nothing new.
            None if !files.iter().all(|f| f.counters.within_bounds()) => Counters::default(),
            None => files
                .iter()
                .try_fold(Counters::default(), |acc, f| acc.checked_add(f.counters))
                .filter(Counters::within_bounds)
                .unwrap_or_else(|| {
                    v.violation(
                        "files",
                        format!(
                            "the sums of the file counters (the report's totals) exceed 2^40 ({MAX_COUNTER})"
                        ),
                    );
                    Counters::default()
                }),
        };
        v.finish()?;
        Ok(NewReport {
            commit_sha,
            branch,
            subsystem,
            session_id,
            client_key,
            totals,
            files,
            recorded_at,
            labels,
        })
    }
}

/// A stored report (its files apart).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub id: Uuid,
    pub commit_sha: String,
    pub branch: String,
    pub subsystem: String,
    pub session_id: Option<Uuid>,
    pub client_key: String,
    pub totals: Counters,
    pub file_count: i32,
    pub recorded_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub labels: Labels,
}

impl From<Report> for proto::CoverageReport {
    fn from(r: Report) -> Self {
        proto::CoverageReport {
            id: r.id.to_string(),
            commit_sha: r.commit_sha,
            branch: r.branch,
            subsystem: r.subsystem,
            session_id: r.session_id.map(|s| s.to_string()).unwrap_or_default(),
            client_key: r.client_key,
            percentages: Some(r.totals.percentages()),
            totals: Some(r.totals.into()),
            file_count: i64::from(r.file_count),
            recorded_at: Some(timestamp(r.recorded_at)),
            created_at: Some(timestamp(r.created_at)),
            labels: r.labels.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_are_unset_without_a_total() {
        let c = Counters {
            lines_covered: 1,
            lines_total: 4,
            ..Counters::default()
        };
        assert_eq!(c.lines_percent(), Some(25.0));
        assert_eq!(c.branches_percent(), None);
        assert_eq!(percent_delta(Some(30.0), None), None);
    }

    #[test]
    fn covered_above_total_is_refused() {
        let mut v = Validator::new();
        Counters::validate(
            &mut v,
            "totals",
            &proto::CoverageCounters {
                lines_covered: 5,
                lines_total: 4,
                branches_covered: -1,
                ..Default::default()
            },
        );
        let Err(Error::InvalidArgument(vs)) = v.finish() else {
            panic!("expected violations")
        };
        let fields: Vec<_> = vs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["totals.lines_covered", "totals.branches_covered"]);
    }

    #[test]
    fn counters_above_two_to_the_fortieth_are_refused() {
        let mut v = Validator::new();
        Counters::validate(
            &mut v,
            "totals",
            &proto::CoverageCounters {
                lines_covered: MAX_COUNTER,
                lines_total: MAX_COUNTER,
                functions_covered: 1,
                functions_total: MAX_COUNTER + 1,
                ..Default::default()
            },
        );
        let Err(Error::InvalidArgument(vs)) = v.finish() else {
            panic!("expected violations")
        };
        let fields: Vec<_> = vs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["totals.functions_total"]);
    }
}
