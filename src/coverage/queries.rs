//! The read queries of coverage: aggregates, trends and comparisons,
//! validated.

use super::{MAX_BRANCH, commit_sha};
use crate::error::{Error, Result};
use crate::labels::LabelFilter;
use crate::proto;
use crate::test_cases::MAX_SUBSYSTEM;
use crate::validate::Validator;
use chrono::{DateTime, Duration, Utc};

const DEFAULT_TREND_DAYS: i64 = 30;
const MAX_TREND_DAYS: i64 = 730;
const DEFAULT_COMPARE_FILES: i64 = 1000;
const MAX_COMPARE_FILES: i64 = 10_000;

/// A validated GetAggregateCoverage call.
#[derive(Debug, Clone)]
pub struct AggregateQuery {
    pub branch: Option<String>,
    pub subsystem: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub latest_per_subsystem: bool,
    pub labels: LabelFilter,
}

impl TryFrom<proto::GetAggregateCoverageRequest> for AggregateQuery {
    type Error = Error;

    fn try_from(r: proto::GetAggregateCoverageRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (from, to) = v.time_range("recorded", r.recorded.as_ref());
        let query = AggregateQuery {
            branch: v.optional_text("branch", &r.branch, MAX_BRANCH),
            subsystem: v.optional_text("subsystem", &r.subsystem, MAX_SUBSYSTEM),
            from,
            to,
            latest_per_subsystem: r.latest_per_subsystem,
            labels: LabelFilter::validate(&mut v, &r.labels, &r.label_keys),
        };
        v.finish()?;
        Ok(query)
    }
}

/// A validated GetCoverageTrend call: buckets of `step_days` from the bucket
/// holding `start` to the one holding `end`.
#[derive(Debug, Clone)]
pub struct TrendQuery {
    pub branch: Option<String>,
    pub subsystem: Option<String>,
    /// `date_trunc` unit: `day` or `week`.
    pub unit: &'static str,
    pub step_days: i32,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub labels: LabelFilter,
}

impl TryFrom<proto::GetCoverageTrendRequest> for TrendQuery {
    type Error = Error;

    fn try_from(r: proto::GetCoverageTrendRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (unit, step_days) = match proto::TrendInterval::try_from(r.interval) {
            Ok(proto::TrendInterval::Unspecified | proto::TrendInterval::Daily) => ("day", 1),
            Ok(proto::TrendInterval::Weekly) => ("week", 7),
            Err(_) => {
                v.violation("interval", format!("{} is not a known value", r.interval));
                ("day", 1)
            }
        };
        let days = match i64::from(r.days) {
            0 => DEFAULT_TREND_DAYS,
            n if (1..=MAX_TREND_DAYS).contains(&n) => n,
            _ => {
                v.violation(
                    "days",
                    format!(
                        "must be between 0 (default {DEFAULT_TREND_DAYS}) and {MAX_TREND_DAYS}"
                    ),
                );
                DEFAULT_TREND_DAYS
            }
        };
        let end = v
            .timestamp("end_time", r.end_time.as_ref())
            .unwrap_or_else(Utc::now);
        let query = TrendQuery {
            branch: v.optional_text("branch", &r.branch, MAX_BRANCH),
            subsystem: v.optional_text("subsystem", &r.subsystem, MAX_SUBSYSTEM),
            unit,
            step_days,
            start: end - Duration::days(days - 1),
            end,
            labels: LabelFilter::validate(&mut v, &r.labels, &r.label_keys),
        };
        v.finish()?;
        Ok(query)
    }
}

/// A validated CompareCoverage call.
#[derive(Debug, Clone)]
pub struct CompareQuery {
    pub base: String,
    pub head: String,
    pub subsystem: String,
    pub max_files: i64,
}

impl TryFrom<proto::CompareCoverageRequest> for CompareQuery {
    type Error = Error;

    fn try_from(r: proto::CompareCoverageRequest) -> Result<Self> {
        let mut v = Validator::new();
        let max_files = match i64::from(r.max_files) {
            0 => DEFAULT_COMPARE_FILES,
            n if (1..=MAX_COMPARE_FILES).contains(&n) => n,
            _ => {
                v.violation(
                    "max_files",
                    format!(
                        "must be between 0 (default {DEFAULT_COMPARE_FILES}) and {MAX_COMPARE_FILES}"
                    ),
                );
                DEFAULT_COMPARE_FILES
            }
        };
        let query = CompareQuery {
            base: commit_sha(&mut v, "base_commit_sha", &r.base_commit_sha),
            head: commit_sha(&mut v, "head_commit_sha", &r.head_commit_sha),
            subsystem: v
                .optional_text("subsystem", &r.subsystem, MAX_SUBSYSTEM)
                .unwrap_or_default(),
            max_files,
        };
        v.finish()?;
        Ok(query)
    }
}
