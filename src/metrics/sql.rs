//! The SQL of time series, technology usage and stored rollups.

use super::{Buckets, Point, RollupPeriod, SeriesQuery};
use crate::db::Stmt;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

const INSERT_POINTS: Stmt = Stmt::new(
    "INSERT",
    "metric_points",
    "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
     SELECT $6::uuid, * \
     FROM UNNEST($1::text[], $2::float8[], $3::text[], $4::jsonb[], $5::timestamptz[])",
);

/// Stores points of `project` with one statement (arrays unnested
/// server-side).
pub async fn insert_points(c: &impl GenericClient, project: Uuid, points: &[Point]) -> Result<u64> {
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let units: Vec<&str> = points.iter().map(|p| p.unit.as_str()).collect();
    let labels: Vec<&serde_json::Value> = points.iter().map(|p| &p.labels).collect();
    let times: Vec<DateTime<Utc>> = points.iter().map(|p| p.recorded_at).collect();
    INSERT_POINTS
        .execute(c, &[&names, &values, &units, &labels, &times, &project])
        .await
}

/// One bucket's aggregates.
pub struct BucketRow {
    pub start: DateTime<Utc>,
    pub count: i64,
    pub sum: Option<f64>,
    pub avg: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

// A float8 sum that overflows fails the whole query. Points are bounded to
// +-MAX_VALUE (1e100) on input, so the clamp below changes nothing for them;
// rows stored before that bound existed count as +-1e100 in sum and mean,
// and the query answers instead of failing. min, max and the percentiles
// never fail and see the stored values. (GREATEST skips NULLs: the FILTER
// keeps the empty buckets' NULL.)
macro_rules! aggregates {
    () => {
        "SELECT b.bucket_start, count(p.value), \
                sum(LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8)) \
                    FILTER (WHERE p.value IS NOT NULL), \
                avg(LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8)) \
                    FILTER (WHERE p.value IS NOT NULL), \
                min(p.value), max(p.value), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY p.value), \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY p.value), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY p.value) \
         FROM buckets b LEFT JOIN points p USING (bucket_start) \
         GROUP BY b.bucket_start ORDER BY b.bucket_start"
    };
}

// One constant statement per filter shape (issue 18): with a label filter
// the points are found by the (project_id, name, recorded_at) index and
// checked against `labels @> $n` on the heap; without one the statement has
// no label predicate at all, and the same index, which INCLUDEs the value
// (V28), answers by an index-only scan without visiting the heap.
macro_rules! fixed_series {
    ($labels:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT generate_series(date_bin(($4::float8 * interval '1 second'), $2::timestamptz, 'epoch'::timestamptz), \
                                        $3::timestamptz - interval '1 microsecond', ($4::float8 * interval '1 second')) AS bucket_start), \
             points AS ( \
                 SELECT date_bin(($4::float8 * interval '1 second'), recorded_at, 'epoch'::timestamptz) AS bucket_start, value \
                 FROM metric_points \
                 WHERE project_id = $6 AND name = $1 AND recorded_at >= $2 AND recorded_at < $3",
            $labels,
            ") ",
            aggregates!()
        )
    };
}

macro_rules! month_series {
    ($labels:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT generate_series(date_trunc('month', $2::timestamptz), \
                                        $3::timestamptz - interval '1 microsecond', interval '1 month') AS bucket_start), \
             points AS ( \
                 SELECT date_trunc('month', recorded_at) AS bucket_start, value \
                 FROM metric_points \
                 WHERE project_id = $5 AND name = $1 AND recorded_at >= $2 AND recorded_at < $3",
            $labels,
            ") ",
            aggregates!()
        )
    };
}

/// Fixed-width buckets, points with the labels $5 (public for
/// `verdict-bench`'s same-SQL baseline).
pub const SERIES_FIXED: Stmt = Stmt::new(
    "SELECT",
    "metric_points",
    fixed_series!(" AND labels @> $5"),
);

/// Fixed-width buckets, every point of the metric ($5 unused: no label filter).
pub const SERIES_FIXED_ALL: Stmt = Stmt::new(
    "SELECT",
    "metric_points",
    fixed_series!(" AND $5::jsonb IS NOT NULL"),
);

pub const SERIES_MONTH: Stmt = Stmt::new(
    "SELECT",
    "metric_points",
    month_series!(" AND labels @> $4"),
);

pub const SERIES_MONTH_ALL: Stmt = Stmt::new(
    "SELECT",
    "metric_points",
    month_series!(" AND $4::jsonb IS NOT NULL"),
);

/// Every bucket of the range with the aggregates of `project`'s points
/// (sessions run in UTC).
pub async fn series(
    c: &impl GenericClient,
    project: Uuid,
    q: &SeriesQuery,
) -> Result<Vec<BucketRow>> {
    let unfiltered = q.labels.as_object().is_none_or(|m| m.is_empty());
    let rows = match q.buckets {
        Buckets::Fixed(width) => {
            let width = width.as_secs_f64();
            let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                &[&q.name, &q.from, &q.to, &width, &q.labels, &project];
            if unfiltered {
                SERIES_FIXED_ALL.query(c, params).await?
            } else {
                SERIES_FIXED.query(c, params).await?
            }
        }
        Buckets::Month => {
            let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                &[&q.name, &q.from, &q.to, &q.labels, &project];
            if unfiltered {
                SERIES_MONTH_ALL.query(c, params).await?
            } else {
                SERIES_MONTH.query(c, params).await?
            }
        }
    };
    rows.iter()
        .map(|r| {
            Ok(BucketRow {
                start: r.try_get(0)?,
                count: r.try_get(1)?,
                sum: r.try_get(2)?,
                avg: r.try_get(3)?,
                min: r.try_get(4)?,
                max: r.try_get(5)?,
                p50: r.try_get(6)?,
                p95: r.try_get(7)?,
                p99: r.try_get(8)?,
            })
        })
        .collect()
}

// The aggregated path (issue 18, V34, V38, V39): whole hours [$h0, $h1)
// from the hourly aggregates, and the points of the partial hours
// [from, $h0) and [$h1, to) one by one (each as a one-point part: its
// histogram bucket), in no order, and one row of NULLs per bucket of the
// range (so empty buckets are answered; no join or sort of the parts'
// arrays, which would spill); the gateway adds the parts of a bucket up and
// merges their histograms. An hour's histogram comes packed (V40: its two
// arrays in binary form in one bytea, sent as one value, not element by
// element): stored so in the name- and label-pair hours, packed by the
// statement for the series-hours (verdict_hist_pack's expression written
// out: a SQL function declared IMMUTABLE around STABLE array_send is not
// inlined: it would run as a function call per series-hour).
// Without a label filter the hours come from metric_name_hours, and with a
// filter of one pair from metric_label_hours: one row per hour of the
// metric (one index range of the key), whatever the number of series. With
// two or more pairs they are read per matching series from
// metric_series_hours (a LATERAL kept from being flattened by OFFSET 0: an
// index range of the key for each series of the name, never a scan of the
// hours table).
macro_rules! parts {
    ($bin_hour:literal, $bin_point:literal, $hours:expr, $points:literal, $project:literal, $h0:literal, $h1:literal) => {
        concat!(
            "SELECT bucket_start, NULL::int8, NULL::float8, NULL::float8, NULL::float8, NULL::int4, NULL::bytea \
             FROM buckets \
             UNION ALL \
             SELECT ", $bin_hour, ", h.count, h.sum, h.min, h.max, NULL::int4, h.hist \
             FROM ", $hours, " \
             UNION ALL \
             SELECT ", $bin_point, ", 1::bigint, LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8), \
                    p.value, p.value, verdict_metric_bucket(p.value), NULL::bytea \
             FROM metric_points p \
             WHERE p.project_id = ", $project, " AND p.name = $1", $points,
             " AND p.recorded_at >= $2 AND p.recorded_at < ", $h0, " \
             UNION ALL \
             SELECT ", $bin_point, ", 1::bigint, LEAST(GREATEST(p.value, -1e100::float8), 1e100::float8), \
                    p.value, p.value, verdict_metric_bucket(p.value), NULL::bytea \
             FROM metric_points p \
             WHERE p.project_id = ", $project, " AND p.name = $1", $points,
             " AND p.recorded_at >= ", $h1, " AND p.recorded_at < $3"
        )
    };
}

// The hours of the series of the name with the labels `$labels` (V34);
// `$key` and `$value` are not used (the one-pair statements' parameters).
macro_rules! series_hours {
    ($labels:literal, $project:literal, $h0:literal, $h1:literal, $key:literal, $value:literal) => {
        concat!(
            "metric_series s \
             CROSS JOIN LATERAL ( \
                 SELECT h.hour, h.count, h.sum, h.min, h.max, \
                        array_send(h.hist_buckets) || array_send(h.hist_counts) AS hist \
                 FROM metric_series_hours h \
                 WHERE h.project_id = s.project_id AND h.series_id = s.id \
                   AND h.hour >= ",
            $h0,
            " AND h.hour < ",
            $h1,
            " OFFSET 0) h \
             WHERE s.project_id = ",
            $project,
            " AND s.name = $1 AND s.labels @> ",
            $labels
        )
    };
}

// The hours of the name across all its series (V38); `$unused` names the
// label parameter, unused but typed (`$key` and `$value` are not used).
macro_rules! name_hours {
    ($unused:literal, $project:literal, $h0:literal, $h1:literal, $key:literal, $value:literal) => {
        concat!(
            "metric_name_hours h \
             WHERE h.project_id = ",
            $project,
            " AND h.name = $1 \
               AND h.hour >= ",
            $h0,
            " AND h.hour < ",
            $h1,
            " AND ",
            $unused,
            "::jsonb IS NOT NULL"
        )
    };
}

// The hours of the name's points with the one label pair `$key` = `$value`
// across the series holding it (V39): one row per hour, one index range of
// the key; `$unused` names the label parameter (the edge points' filter).
macro_rules! label_hours {
    ($unused:literal, $project:literal, $h0:literal, $h1:literal, $key:literal, $value:literal) => {
        concat!(
            "metric_label_hours h \
             WHERE h.project_id = ",
            $project,
            " AND h.name = $1 AND h.label_key = ",
            $key,
            " AND h.label_value = ",
            $value,
            " AND h.hour >= ",
            $h0,
            " AND h.hour < ",
            $h1,
            " AND ",
            $unused,
            "::jsonb IS NOT NULL"
        )
    };
}

macro_rules! fixed_hours {
    ($hours:ident, $points:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT generate_series(date_bin(($4::float8 * interval '1 second'), $2::timestamptz, 'epoch'::timestamptz), \
                                        $3::timestamptz - interval '1 microsecond', ($4::float8 * interval '1 second')) AS bucket_start) ",
            parts!(
                "date_bin(($4::float8 * interval '1 second'), h.hour, 'epoch'::timestamptz)",
                "date_bin(($4::float8 * interval '1 second'), p.recorded_at, 'epoch'::timestamptz)",
                $hours!(
                    "$5",
                    "$6::uuid",
                    "$7::timestamptz",
                    "$8::timestamptz",
                    "$9::text",
                    "$10::text"
                ),
                $points,
                "$6::uuid",
                "$7::timestamptz",
                "$8::timestamptz"
            )
        )
    };
}

macro_rules! month_hours {
    ($hours:ident, $points:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT generate_series(date_trunc('month', $2::timestamptz), \
                                        $3::timestamptz - interval '1 microsecond', interval '1 month') AS bucket_start) ",
            parts!(
                "date_trunc('month', h.hour)",
                "date_trunc('month', p.recorded_at)",
                $hours!(
                    "$4",
                    "$5::uuid",
                    "$6::timestamptz",
                    "$7::timestamptz",
                    "$8::text",
                    "$9::text"
                ),
                $points,
                "$5::uuid",
                "$6::timestamptz",
                "$7::timestamptz"
            )
        )
    };
}

/// Hour-multiple buckets from the per-series hourly aggregates, series with
/// the labels $5 (their edge points carry them too); for filters of two or
/// more pairs.
pub const HOURS_FIXED: Stmt = Stmt::new(
    "SELECT",
    "metric_series_hours",
    fixed_hours!(series_hours, " AND p.labels @> $5"),
);

/// Hour-multiple buckets from the per-metric hourly aggregates (V38), every
/// series of the metric ($5 unused: no label filter).
pub const HOURS_FIXED_ALL: Stmt =
    Stmt::new("SELECT", "metric_name_hours", fixed_hours!(name_hours, ""));

/// Hour-multiple buckets from the per-label-pair hourly aggregates (V39):
/// the points with the one label pair $9 = $10 (the filter $5 holds exactly
/// that pair; the edge points are checked against it).
pub const HOURS_FIXED_LABEL: Stmt = Stmt::new(
    "SELECT",
    "metric_label_hours",
    fixed_hours!(label_hours, " AND p.labels @> $5"),
);

/// Month buckets from the per-series hourly aggregates, series with the
/// labels $4 (two or more pairs).
pub const HOURS_MONTH: Stmt = Stmt::new(
    "SELECT",
    "metric_series_hours",
    month_hours!(series_hours, " AND p.labels @> $4"),
);

/// Month buckets from the per-metric hourly aggregates (V38), every series
/// of the metric ($4 unused).
pub const HOURS_MONTH_ALL: Stmt =
    Stmt::new("SELECT", "metric_name_hours", month_hours!(name_hours, ""));

/// Month buckets from the per-label-pair hourly aggregates (V39): the
/// points with the one label pair $8 = $9 (the filter $4).
pub const HOURS_MONTH_LABEL: Stmt = Stmt::new(
    "SELECT",
    "metric_label_hours",
    month_hours!(label_hours, " AND p.labels @> $4"),
);

/// One part of a bucket on the aggregated path: an hour of one series, or
/// one edge point (None: the bucket has no part); borrowed from its row.
pub struct PartRow<'a> {
    pub start: DateTime<Utc>,
    pub part: Option<Part<'a>>,
}

/// The aggregates of an hour of a series, or of one point.
pub struct Part<'a> {
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub hist: Hist<'a>,
}

/// A part's histogram: one point's bucket number, or an hour's histogram
/// packed (V40; see `hours::unpack_into`).
pub enum Hist<'a> {
    Point(i32),
    Packed(&'a [u8]),
}

/// Which hourly aggregates a label filter reads: those of the whole name
/// (no filter, V38), of its one pair (V39), or of the matching series (two
/// or more pairs, V34).
enum Filter<'a> {
    None,
    Pair(&'a str, &'a str),
    Series,
}

fn filter(labels: &serde_json::Value) -> Filter<'_> {
    match labels.as_object() {
        None => Filter::None,
        Some(m) if m.is_empty() => Filter::None,
        Some(m) if m.len() == 1 => match m.iter().next() {
            Some((k, serde_json::Value::String(v))) => Filter::Pair(k, v),
            _ => Filter::Series,
        },
        Some(_) => Filter::Series,
    }
}

/// Every bucket of the range with its parts from the hourly aggregates:
/// whole hours in [h0, h1), points in [from, h0) and [h1, to); rows read by
/// `part_row`.
pub async fn series_parts(
    c: &impl GenericClient,
    project: Uuid,
    q: &SeriesQuery,
    h0: DateTime<Utc>,
    h1: DateTime<Utc>,
) -> Result<Vec<Row>> {
    let rows = match (q.buckets, filter(&q.labels)) {
        (Buckets::Fixed(width), f) => {
            let width = width.as_secs_f64();
            let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
                &q.name, &q.from, &q.to, &width, &q.labels, &project, &h0, &h1,
            ];
            match f {
                Filter::None => HOURS_FIXED_ALL.query(c, params).await?,
                Filter::Pair(key, value) => {
                    let params = [params, &[&key, &value]].concat();
                    HOURS_FIXED_LABEL.query(c, &params).await?
                }
                Filter::Series => HOURS_FIXED.query(c, params).await?,
            }
        }
        (Buckets::Month, f) => {
            let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
                &[&q.name, &q.from, &q.to, &q.labels, &project, &h0, &h1];
            match f {
                Filter::None => HOURS_MONTH_ALL.query(c, params).await?,
                Filter::Pair(key, value) => {
                    let params = [params, &[&key, &value]].concat();
                    HOURS_MONTH_LABEL.query(c, &params).await?
                }
                Filter::Series => HOURS_MONTH.query(c, params).await?,
            }
        }
    };
    Ok(rows)
}

/// A row of `series_parts` as the part it holds.
pub fn part_row(r: &Row) -> Result<PartRow<'_>> {
    let count: Option<i64> = r.try_get(1)?;
    Ok(PartRow {
        start: r.try_get(0)?,
        part: match count {
            None => None,
            Some(count) => Some(Part {
                count,
                sum: r.try_get(2)?,
                min: r.try_get(3)?,
                max: r.try_get(4)?,
                hist: match (r.try_get::<_, Option<i32>>(5)?, r.try_get(6)?) {
                    (Some(point), _) => Hist::Point(point),
                    (None, Some(packed)) => Hist::Packed(packed),
                    (None, None) => {
                        return Err(Error::Internal("an hour without its histogram".into()));
                    }
                },
            }),
        },
    })
}

/// Usage of one technology pair.
pub struct UsageRow {
    pub source: String,
    pub target: String,
    pub sessions: i64,
    pub completed: i64,
    pub finished: i64,
}

const USAGE: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT source_technology, target_technology, count(*), \
            count(*) FILTER (WHERE status = 'completed'), \
            count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled')) \
     FROM sessions \
     WHERE project_id = $3 AND created_at >= $1 AND created_at < $2 \
     GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
);

/// An open end of a range as an instant beyond every stored timestamp (so a
/// range is always two bounds: no `$n IS NULL OR` predicate, whose generic
/// plan cannot use the time index).
pub fn bounds(
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let at_year = |year: i32| {
        chrono::NaiveDate::from_ymd_opt(year, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
            .unwrap_or_default()
    };
    (
        from.unwrap_or_else(|| at_year(1)),
        to.unwrap_or_else(|| at_year(99_999)),
    )
}

/// Sessions of `project` per technology pair, created within [from, to).
pub async fn technology_usage(
    c: &impl GenericClient,
    project: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Vec<UsageRow>> {
    let (from, to) = bounds(from, to);
    USAGE
        .query(c, &[&from, &to, &project])
        .await?
        .iter()
        .map(|r| {
            Ok(UsageRow {
                source: r.try_get(0)?,
                target: r.try_get(1)?,
                sessions: r.try_get(2)?,
                completed: r.try_get(3)?,
                finished: r.try_get(4)?,
            })
        })
        .collect()
}

/// A stored rollup row.
pub struct RollupRow(pub Row);

const LIST_ROLLUPS: Stmt = Stmt::new(
    "SELECT",
    "metric_rollups",
    "SELECT * FROM metric_rollups \
     WHERE project_id = $6 AND period = $1 \
       AND ($2::timestamptz IS NULL OR period_start >= $2) \
       AND ($3::timestamptz IS NULL OR period_start < $3) \
       AND ($4::timestamptz IS NULL OR period_start > $4) \
     ORDER BY period_start LIMIT $5",
);

/// The total of ListRollups: LIST_ROLLUPS's filters, without paging.
const COUNT_ROLLUPS: crate::totals::Counter = crate::counter!(
    "metric_rollups",
    "metric_rollups \
     WHERE project_id = $1 AND period = $2 \
       AND ($3::timestamptz IS NULL OR period_start >= $3) \
       AND ($4::timestamptz IS NULL OR period_start < $4)"
);

/// How many of `project`'s rollups of `period` start within the range.
pub async fn count_rollups(
    c: &impl GenericClient,
    project: Uuid,
    period: RollupPeriod,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&project, &period.as_str(), &from, &to];
    crate::totals::count(c, &COUNT_ROLLUPS, params, mode, exact_below).await
}

/// A page of `project`'s rollups, oldest first, plus one extra row when
/// more follow.
pub async fn list_rollups(
    c: &impl GenericClient,
    project: Uuid,
    period: RollupPeriod,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    after: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<RollupRow>> {
    Ok(LIST_ROLLUPS
        .query(c, &[&period.as_str(), &from, &to, &after, &limit, &project])
        .await?
        .into_iter()
        .map(RollupRow)
        .collect())
}
