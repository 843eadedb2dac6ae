//! ListMetricPoints: the raw points of one metric, read back page by page.

use super::{MAX_NAME, labels};
use crate::db::Stmt;
use crate::error::Result;
use crate::pagination;
use crate::proto;
use crate::totals::{Counter, Mode, Total};
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// The filters of ListMetricPoints; serialised into the page-token
/// fingerprint.
#[derive(Debug, Clone, Serialize)]
pub struct PointFilter {
    pub name: String,
    /// Sorted keys: equal label sets give equal fingerprints.
    pub labels: serde_json::Value,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// Oldest-first position: (recorded_at in microseconds, id).
pub type PointKey = (i64, i64);

/// A validated ListMetricPoints call.
#[derive(Debug, Clone)]
pub struct ListPoints {
    pub filter: PointFilter,
    pub page_size: i64,
    pub after: Option<PointKey>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListMetricPointsRequest> for ListPoints {
    type Error = crate::error::Error;

    fn try_from(r: proto::ListMetricPointsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (from, to) = v.time_range("range", r.range.as_ref());
        let filter = PointFilter {
            name: v.required_text("name", &r.name, MAX_NAME),
            labels: labels(&mut v, "labels", &r.labels),
            from,
            to,
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("metric_points", &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListPoints {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

/// One page of points of metric `$2` of project `$1`, oldest first (ties in
/// id order), found by the (project_id, name, recorded_at) index.
const LIST: Stmt = Stmt::new(
    "SELECT",
    "metric_points",
    "SELECT id, name, value, unit, labels, recorded_at FROM metric_points \
     WHERE project_id = $1 AND name = $2 AND labels @> $3 \
       AND ($4::timestamptz IS NULL OR recorded_at >= $4) \
       AND ($5::timestamptz IS NULL OR recorded_at < $5) \
       AND ($6::timestamptz IS NULL OR (recorded_at, id) > ($6, $7)) \
     ORDER BY recorded_at, id LIMIT $8",
);

/// The total of ListMetricPoints: LIST's filters, without paging.
const COUNT: Counter = crate::counter!(
    "metric_points",
    "metric_points \
     WHERE project_id = $1 AND name = $2 AND labels @> $3 \
       AND ($4::timestamptz IS NULL OR recorded_at >= $4) \
       AND ($5::timestamptz IS NULL OR recorded_at < $5)"
);

/// A stored point with its keyset position.
pub struct StoredPoint {
    pub key: PointKey,
    pub point: proto::MetricPoint,
}

/// One page of `project`'s points, plus one extra row when more follow.
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListPoints,
) -> Result<Vec<StoredPoint>> {
    let f = &q.filter;
    // The time half of the position is decoded like every list's.
    let (after_at, after_id) = match q.after {
        Some((micros, id)) => (
            pagination::time_key(Some((micros, Uuid::nil())))?.0,
            Some(id),
        ),
        None => (None, None),
    };
    let limit = q.page_size + 1;
    let params: &[&(dyn ToSql + Sync)] = &[
        &project, &f.name, &f.labels, &f.from, &f.to, &after_at, &after_id, &limit,
    ];
    LIST.query(c, params)
        .await?
        .iter()
        .map(|r| {
            let id: i64 = r.try_get("id")?;
            let at: DateTime<Utc> = r.try_get("recorded_at")?;
            let labels: serde_json::Value = r.try_get("labels")?;
            Ok(StoredPoint {
                key: (at.timestamp_micros(), id),
                point: proto::MetricPoint {
                    name: r.try_get("name")?,
                    value: r.try_get("value")?,
                    unit: r.try_get("unit")?,
                    labels: crate::labels::from_json(&labels),
                    recorded_at: Some(crate::convert::timestamp(at)),
                },
            })
        })
        .collect()
}

/// How many of `project`'s points pass `f`, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    f: &PointFilter,
    mode: Mode,
    exact_below: i64,
) -> Result<Total> {
    let params: &[&(dyn ToSql + Sync)] = &[&project, &f.name, &f.labels, &f.from, &f.to];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}
