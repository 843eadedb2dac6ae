//! QueryTimeSeries over the hourly aggregates (issue 18): per metric name
//! across its series (V38, read without a label filter), per name and label
//! pair (V39, read with a filter of one pair) — one row per hour whatever
//! the number of series — and per series (V34, read with a filter of two or
//! more pairs). Which calls may use them, and how a bucket's parts (hours
//! and edge points) add up, with percentiles estimated from the merged
//! log-bucket histogram.

use super::sql::{self, BucketRow, PartRow};
use super::{Buckets, SeriesQuery};
use crate::error::Result;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use deadpool_postgres::GenericClient;
use std::collections::BTreeMap;
use uuid::Uuid;

/// A range with at most this many matching points is read point by point,
/// with exact percentiles.
pub const EXACT_MAX_POINTS: i64 = 10_000;

/// Buckets per octave of the histogram (V34's `verdict_metric_bucket`).
const PER_OCTAVE: f64 = 8.0;
/// The bucket number of 1.0 (V34: 9000 + floor(8 log2 v)).
const OFFSET: i32 = 9000;
/// The bucket of NaN and +infinity (negated: -infinity).
const NON_FINITE: i32 = 20_000;

/// The histogram bucket of a value, as V34's `verdict_metric_bucket`.
pub fn bucket_of(v: f64) -> i32 {
    if v == 0.0 {
        0
    } else if v.is_nan() || v == f64::INFINITY {
        NON_FINITE
    } else if v == f64::NEG_INFINITY {
        -NON_FINITE
    } else {
        let b = OFFSET + (PER_OCTAVE * v.abs().ln() / 2f64.ln()).floor() as i32;
        if v > 0.0 { b } else { -b }
    }
}

/// The value a bucket stands for: the geometric middle of its range (within
/// 2^(1/16) - 1 < 4.5 % of every value in it).
pub fn representative(bucket: i32) -> f64 {
    match bucket {
        0 => 0.0,
        b if b >= NON_FINITE => f64::INFINITY,
        b if b <= -NON_FINITE => f64::NEG_INFINITY,
        b => {
            let e = f64::from(b.abs() - OFFSET);
            let v = 2f64.powf((e + 0.5) / PER_OCTAVE);
            if b > 0 { v } else { -v }
        }
    }
}

/// The whole hours [h0, h1) of the range that the aggregates answer, when
/// the call's buckets are made of whole hours; None when every point must
/// be read (other widths). A range within one hour has no whole hour:
/// h0 = h1 = to.
pub fn whole_hours(q: &SeriesQuery) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    match q.buckets {
        Buckets::Fixed(w) if w.as_secs() % 3600 == 0 => {}
        Buckets::Month => {}
        Buckets::Fixed(_) => return None,
    }
    let hour = TimeDelta::hours(1);
    let floor = |t: DateTime<Utc>| t.duration_trunc(hour).ok();
    let down_from = floor(q.from)?;
    let h0 = if down_from == q.from {
        q.from
    } else {
        down_from + hour
    };
    let h1 = floor(q.to)?;
    Some(if h0 < h1 { (h0, h1) } else { (q.to, q.to) })
}

/// A bucket's histogram entries (bucket number, count), in any order until
/// sorted; a bucket number may repeat.
type Histogram = Vec<(i32, i64)>;

/// The aggregates of each bucket from its parts (rows in any order; every
/// bucket has at least one), oldest bucket first, and the number of points
/// in the range. A bucket's histogram entries are gathered in one Vec and
/// sorted once (entries of the same bucket number stay apart; the nearest
/// rank is found by the running count all the same), not merged entry by
/// entry into a map.
pub fn fold(rows: Vec<PartRow>) -> (Vec<BucketRow>, i64) {
    let mut buckets: BTreeMap<DateTime<Utc>, (BucketRow, Histogram)> = BTreeMap::new();
    let mut total = 0i64;
    for row in rows {
        let (b, hist) = buckets.entry(row.start).or_insert_with(|| {
            (
                BucketRow {
                    start: row.start,
                    count: 0,
                    sum: None,
                    avg: None,
                    min: None,
                    max: None,
                    p50: None,
                    p95: None,
                    p99: None,
                },
                Vec::new(),
            )
        });
        if let Some(p) = row.part {
            b.count += p.count;
            total += p.count;
            b.sum = Some(b.sum.unwrap_or(0.0) + p.sum);
            b.min = Some(b.min.map_or(p.min, |m| m.min(p.min)));
            b.max = Some(b.max.map_or(p.max, |m| m.max(p.max)));
            hist.extend(
                p.hist_buckets
                    .iter()
                    .copied()
                    .zip(p.hist_counts.iter().copied()),
            );
        }
    }
    let out = buckets
        .into_values()
        .map(|(mut b, mut hist)| {
            if b.count > 0 {
                hist.sort_unstable_by_key(|&(k, _)| k);
                b.avg = b.sum.map(|s| s / b.count as f64);
                let (lo, hi) = (b.min.unwrap_or(f64::MIN), b.max.unwrap_or(f64::MAX));
                let q = |p: f64| Some(percentile(&hist, b.count, p).max(lo).min(hi));
                b.p50 = q(0.5);
                b.p95 = q(0.95);
                b.p99 = q(0.99);
            }
            b
        })
        .collect();
    (out, total)
}

/// The representative of the bucket holding the point at nearest rank
/// ceil(q n) of a histogram of n points (entries sorted by bucket number).
fn percentile(hist: &[(i32, i64)], n: i64, q: f64) -> f64 {
    let rank = ((q * n as f64).ceil() as i64).clamp(1, n.max(1));
    let mut seen = 0i64;
    for (k, c) in hist {
        seen += c;
        if seen >= rank {
            return representative(*k);
        }
    }
    hist.last().map_or(f64::NAN, |(k, _)| representative(*k))
}

/// Every bucket of the range, and whether its percentiles are estimated:
/// from the hourly aggregates when the widths allow and the range holds
/// more than EXACT_MAX_POINTS points, else from every point.
pub async fn series(
    c: &impl GenericClient,
    project: Uuid,
    q: &SeriesQuery,
) -> Result<(Vec<BucketRow>, bool)> {
    if let Some((h0, h1)) = whole_hours(q) {
        let (rows, total) = fold(sql::series_parts(c, project, q, h0, h1).await?);
        if total > EXACT_MAX_POINTS {
            return Ok((rows, true));
        }
    }
    Ok((sql::series(c, project, q).await?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_finds_the_nearest_rank_in_parts_whose_buckets_repeat() {
        use super::sql::Part;
        let start = DateTime::<Utc>::from_timestamp(3600, 0).unwrap();
        // Values 1..=60 split over three parts whose histograms overlap.
        let values: Vec<f64> = (1..=60).map(f64::from).collect();
        let part = |vs: &[f64]| {
            let mut hist = BTreeMap::<i32, i64>::new();
            for v in vs {
                *hist.entry(bucket_of(*v)).or_default() += 1;
            }
            PartRow {
                start,
                part: Some(Part {
                    count: vs.len() as i64,
                    sum: vs.iter().sum(),
                    min: vs.iter().copied().fold(f64::MAX, f64::min),
                    max: vs.iter().copied().fold(f64::MIN, f64::max),
                    hist_buckets: hist.keys().copied().collect(),
                    hist_counts: hist.values().copied().collect(),
                }),
            }
        };
        let odd: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| *v as i64 % 2 == 1)
            .collect();
        let even: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| *v as i64 % 2 == 0)
            .collect();
        let rows = vec![
            part(&even[..20]),
            PartRow { start, part: None },
            part(&odd),
            part(&even[20..]),
        ];
        let (out, total) = fold(rows);
        assert_eq!((out.len(), total), (1, 60));
        let b = &out[0];
        assert_eq!(
            (b.count, b.sum, b.min, b.max),
            (60, Some(1830.0), Some(1.0), Some(60.0))
        );
        // Nearest ranks 30, 57 and 60 of 1..=60: the middles of their buckets.
        for (got, want) in [(b.p50, 30.0), (b.p95, 57.0), (b.p99, 60.0)] {
            let got = got.unwrap();
            assert!((got - want).abs() <= 0.045 * want, "{got} vs {want}");
        }
    }

    #[test]
    fn representatives_are_within_the_stated_error() {
        let mut v = 1e-300_f64;
        while v < 1e100 {
            for x in [v, -v] {
                let r = representative(bucket_of(x));
                assert!((r - x).abs() <= 0.045 * x.abs(), "{x} -> {r}");
                assert_eq!(r.signum(), x.signum());
            }
            v *= 1.37;
        }
        assert_eq!(representative(bucket_of(0.0)), 0.0);
        assert!(bucket_of(-1.0) < bucket_of(0.0) && bucket_of(0.0) < bucket_of(1e-300));
        assert!(bucket_of(-2.0) < bucket_of(-1.0));
    }
}
