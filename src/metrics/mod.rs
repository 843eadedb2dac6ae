//! Metrics: free time series, and validation rollups computed from what the
//! other areas store.

pub mod hours;
pub mod readback;
pub mod rollups;
mod service;
pub mod sql;

pub use service::MetricsApi;

use crate::error::{Error, Result};
use crate::proto;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::time::Duration;

/// Most points per RecordMetricPoints call.
pub const MAX_POINTS: usize = 10_000;
/// Most buckets one QueryTimeSeries may return.
pub const MAX_BUCKETS: i64 = 10_000;
/// Largest magnitude of a point's value (1e100): beyond any measurement,
/// and small enough that sums and averages over any number of points stay
/// finite in float8 (PostgreSQL fails a float8 sum that overflows).
pub const MAX_VALUE: f64 = 1e100;
const MAX_NAME: usize = 128;
const MAX_UNIT: usize = 32;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 64;
const MAX_LABEL_VALUE: usize = 256;

wire_enum!(RollupPeriod, proto::RollupPeriod, {
    Day = "day",
    Week = "week",
    Month = "month",
});

/// A validated point.
#[derive(Debug, Clone)]
pub struct Point {
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub labels: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

fn labels(
    v: &mut Validator,
    field: &str,
    raw: &std::collections::HashMap<String, String>,
) -> serde_json::Value {
    if raw.len() > MAX_LABELS {
        v.violation(
            field,
            format!("holds {} labels; at most {MAX_LABELS}", raw.len()),
        );
    }
    let mut map = serde_json::Map::new();
    // Sorted, so equal label sets hash and compare equal.
    for (k, val) in raw.iter().collect::<BTreeMap<_, _>>() {
        v.required_text(&format!("{field}[{k:?}]"), k, MAX_LABEL_KEY);
        v.optional_message(&format!("{field}[{k:?}]"), val, MAX_LABEL_VALUE);
        map.insert(k.clone(), serde_json::Value::String(val.clone()));
    }
    serde_json::Value::Object(map)
}

/// Validates a batch of points.
pub fn validate_points(v: &mut Validator, raw: Vec<proto::MetricPoint>) -> Vec<Point> {
    v.items("points", raw, MAX_POINTS, false, |v, i, p| {
        let mut pv = Validator::scoped(format!("points[{i}]."));
        let point = Point {
            name: pv.required_text("name", &p.name, MAX_NAME),
            value: pv.bounded("value", p.value, MAX_VALUE),
            unit: pv
                .optional_text("unit", &p.unit, MAX_UNIT)
                .unwrap_or_default(),
            labels: labels(&mut pv, "labels", &p.labels),
            recorded_at: match p.recorded_at.as_ref() {
                None => {
                    pv.violation("recorded_at", "is required");
                    DateTime::<Utc>::UNIX_EPOCH
                }
                some => pv
                    .timestamp("recorded_at", some)
                    .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
            },
        };
        v.absorb(pv);
        point
    })
}

/// How QueryTimeSeries buckets time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Buckets {
    /// Fixed width, aligned to the Unix epoch.
    Fixed(Duration),
    /// Calendar months (UTC).
    Month,
}

/// A validated QueryTimeSeries call.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub name: String,
    pub labels: serde_json::Value,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub buckets: Buckets,
}

impl TryFrom<proto::QueryTimeSeriesRequest> for SeriesQuery {
    type Error = Error;

    fn try_from(r: proto::QueryTimeSeriesRequest) -> Result<Self> {
        let mut v = Validator::new();
        let name = v.required_text("name", &r.name, MAX_NAME);
        let labels = labels(&mut v, "label_filter", &r.label_filter);
        let (from, to) = v.time_range("range", r.range.as_ref());
        if from.is_none() || to.is_none() {
            v.violation("range", "both start_time and end_time are required");
        }
        let buckets = match r.calendar_bucket {
            0 => match r.bucket_width {
                Some(d) if d.nanos == 0 && (1..=31 * 86_400).contains(&d.seconds) => {
                    Buckets::Fixed(Duration::from_secs(d.seconds as u64))
                }
                _ => {
                    v.violation(
                        "bucket_width",
                        "must be whole seconds from 1 s to 31 days (or set calendar_bucket)",
                    );
                    Buckets::Fixed(Duration::from_secs(60))
                }
            },
            1 => Buckets::Month,
            other => {
                v.violation("calendar_bucket", format!("{other} is not a known value"));
                Buckets::Month
            }
        };
        if let (Some(f), Some(t)) = (from, to) {
            let count = match buckets {
                Buckets::Fixed(w) => (t - f).num_seconds() / (w.as_secs() as i64).max(1) + 1,
                Buckets::Month => (t - f).num_days() / 28 + 1,
            };
            if count > MAX_BUCKETS {
                v.violation(
                    "range",
                    format!("spans {count} buckets; at most {MAX_BUCKETS}"),
                );
            }
        }
        v.finish()?;
        Ok(SeriesQuery {
            name,
            labels,
            from: from.expect("validated"),
            to: to.expect("validated"),
            buckets,
        })
    }
}
