//! QueryTimeSeries over the hourly aggregates (issue 18): per metric name
//! across its series (V38, read without a label filter), per name and label
//! pair (V39, read with a filter of one pair) — one row per hour whatever
//! the number of series — and per series (V34, read with a filter of two or
//! more pairs). Which calls may use them, and how a bucket's parts (hours
//! and edge points) add up, with percentiles estimated from the merged
//! log-bucket histogram.

use super::sql::{self, BucketRow, Hist, PartRow};
use super::{Buckets, SeriesQuery};
use crate::error::{Error, Result};
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

/// Appends the (bucket number, count) entries of a packed histogram to
/// `into` (V40's `verdict_hist_pack`: `array_send(buckets) ||
/// array_send(counts)`, two one-dimensional arrays in PostgreSQL's binary
/// format, int4 then int8, of the same length and without NULLs); None when
/// the bytes are not that (`into` may then hold some of them).
pub fn unpack_into(bytes: &[u8], into: &mut Vec<(i32, i64)>) -> Option<()> {
    // One array: its number of elements, their bytes (each preceded by its
    // length) and the rest after it.
    fn array(b: &[u8], width: usize) -> Option<(usize, &[u8], &[u8])> {
        let word = |at: usize| {
            b.get(at..at + 4)
                .map(|w| i32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        };
        match (word(0)?, word(4)?) {
            (0, 0) => Some((0, &[][..], b.get(12..)?)),
            (1, 0) => {
                let n = usize::try_from(word(12)?).ok()?;
                let len = n.checked_mul(4 + width)?;
                let elems = b.get(20..20 + len)?;
                Some((n, elems, &b[20 + len..]))
            }
            _ => None,
        }
    }
    let (n, keys, rest) = array(bytes, 4)?;
    let (m, counts, rest) = array(rest, 8)?;
    if n != m || !rest.is_empty() {
        return None;
    }
    into.reserve(n);
    for (k, c) in keys.chunks_exact(8).zip(counts.chunks_exact(12)) {
        if k[..4] != 4i32.to_be_bytes() || c[..4] != 8i32.to_be_bytes() {
            return None;
        }
        let key = i32::from_be_bytes(k[4..8].try_into().ok()?);
        let count = i64::from_be_bytes(c[4..12].try_into().ok()?);
        into.push((key, count));
    }
    Some(())
}

/// A bucket's histogram entries (bucket number, count), in any order until
/// ordered (see `Merger::order`); a bucket number may repeat.
type Histogram = Vec<(i32, i64)>;

/// The aggregates of each bucket from its parts (rows in any order; every
/// bucket has at least one), oldest bucket first, and the number of points
/// in the range. A bucket's histogram entries are gathered in one Vec and
/// ordered once (see `Merger::order`), not merged entry by entry into a
/// map.
pub fn fold<'a>(rows: impl IntoIterator<Item = PartRow<'a>>) -> Result<(Vec<BucketRow>, i64)> {
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
            match p.hist {
                Hist::Point(k) => hist.push((k, 1)),
                Hist::Packed(bytes) => unpack_into(bytes, hist)
                    .ok_or_else(|| Error::Internal("a malformed packed hour histogram".into()))?,
            }
        }
    }
    let mut merger = Merger::default();
    let out = buckets
        .into_values()
        .map(|(mut b, mut hist)| {
            if b.count > 0 {
                merger.order(&mut hist);
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
    Ok((out, total))
}

/// Merges the histogram entries of buckets: one count per possible bucket
/// number (-NON_FINITE..=NON_FINITE), zero between merges, and the numbers
/// a merge touched.
#[derive(Default)]
struct Merger {
    counts: Vec<i64>,
    touched: Vec<i32>,
}

impl Merger {
    /// Puts a bucket's histogram entries in bucket-number order, one entry
    /// per number (as they already are when they come from one part):
    /// counted by number, then only the numbers present are
    /// sorted (a 1 d bucket merges 24 hours of one metric: about 650
    /// entries at L, under 100 distinct numbers). Entries outside the
    /// numbers `bucket_of` gives (only a direct SQL write stores such) are
    /// sorted instead.
    fn order(&mut self, hist: &mut Vec<(i32, i64)>) {
        // One part (an hour of a 1 h bucket): its numbers come in order.
        if hist.windows(2).all(|w| w[0].0 < w[1].0) {
            return;
        }
        if hist
            .iter()
            .any(|&(k, _)| k.unsigned_abs() > NON_FINITE.unsigned_abs())
        {
            hist.sort_by_key(|&(k, _)| k);
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; 2 * NON_FINITE as usize + 1];
        }
        let slot = |k: i32| (k + NON_FINITE) as usize;
        self.touched.clear();
        for &(k, c) in hist.iter() {
            let n = &mut self.counts[slot(k)];
            if *n == 0 {
                self.touched.push(k);
            }
            *n = n.wrapping_add(c);
        }
        // A count back at zero and raised again was listed twice.
        self.touched.sort_unstable();
        self.touched.dedup();
        hist.clear();
        for &k in &self.touched {
            let n = std::mem::take(&mut self.counts[slot(k)]);
            if n != 0 {
                hist.push((k, n));
            }
        }
    }
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
        let rows = sql::series_parts(c, project, q, h0, h1).await?;
        let parts = rows.iter().map(sql::part_row).collect::<Result<Vec<_>>>()?;
        let (rows, total) = fold(parts)?;
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
        fn part<'a>(start: DateTime<Utc>, vs: &[f64], packed: &'a [u8]) -> PartRow<'a> {
            PartRow {
                start,
                part: Some(Part {
                    count: vs.len() as i64,
                    sum: vs.iter().sum(),
                    min: vs.iter().copied().fold(f64::MAX, f64::min),
                    max: vs.iter().copied().fold(f64::MIN, f64::max),
                    hist: Hist::Packed(packed),
                }),
            }
        }
        fn packed(vs: &[f64]) -> Vec<u8> {
            let mut hist = BTreeMap::<i32, i64>::new();
            for v in vs {
                *hist.entry(bucket_of(*v)).or_default() += 1;
            }
            pack(&hist.into_iter().collect::<Vec<_>>())
        }
        let start = DateTime::<Utc>::from_timestamp(3600, 0).unwrap();
        // Values 1..=60 split over three hours whose histograms overlap and
        // one point (60).
        let values: Vec<f64> = (1..=60).map(f64::from).collect();
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
        let (a, b, c) = (packed(&even[..20]), packed(&odd), packed(&even[20..29]));
        let rows = vec![
            part(start, &even[..20], &a),
            PartRow { start, part: None },
            part(start, &odd, &b),
            part(start, &even[20..29], &c),
            PartRow {
                start,
                part: Some(Part {
                    count: 1,
                    sum: 60.0,
                    min: 60.0,
                    max: 60.0,
                    hist: Hist::Point(bucket_of(60.0)),
                }),
            },
        ];
        let (out, total) = fold(rows).unwrap();
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
        // A malformed packed histogram fails the call, not a silent answer.
        assert!(fold(vec![part(start, &[1.0], &[0, 0, 0, 1])]).is_err());
    }

    #[test]
    fn order_merges_repeated_bucket_numbers_by_counting_or_by_sorting() {
        // Clustered numbers, numbers spread from -infinity to +infinity
        // (both counted), and numbers beyond those (sorted), with repeats;
        // one merger for all, as for the buckets of a call.
        let mut merger = Merger::default();
        for spread in [0, 1, 2] {
            let mut hist = Vec::new();
            let mut want = BTreeMap::<i32, i64>::new();
            for i in 0..300i32 {
                let k = if spread > 0 && i % 7 == 0 {
                    [-NON_FINITE, NON_FINITE, 0, i32::MIN, 40_000][(i % (1 + 2 * spread)) as usize]
                } else {
                    OFFSET + (i * 37) % 50
                };
                let c = i64::from(i % 5 + 1);
                hist.push((k, c));
                *want.entry(k).or_default() += c;
            }
            merger.order(&mut hist);
            let sorted = hist.windows(2).all(|w| w[0].0 <= w[1].0);
            let mut merged = BTreeMap::<i32, i64>::new();
            for (k, c) in &hist {
                *merged.entry(*k).or_default() += c;
            }
            assert!(sorted && merged == want, "spread {spread}");
            if spread < 2 {
                assert_eq!(hist, want.into_iter().collect::<Vec<_>>());
            }
        }
        // Counts that cancel out leave no entry and nothing behind.
        let mut hist = vec![(5, 2), (5, -2), (5, 3), (7, 1), (7, -1)];
        merger.order(&mut hist);
        assert_eq!(hist, vec![(5, 3)]);
        assert!(merger.counts.iter().all(|c| *c == 0));
        let mut empty = Vec::new();
        merger.order(&mut empty);
        assert!(empty.is_empty());
    }

    /// `array_send` of a one-dimensional array without NULLs.
    fn array_send(oid: u32, elems: &[Vec<u8>]) -> Vec<u8> {
        let mut b = Vec::new();
        if elems.is_empty() {
            b.extend(0i32.to_be_bytes());
            b.extend(0i32.to_be_bytes());
            b.extend(oid.to_be_bytes());
            return b;
        }
        for w in [1i32, 0] {
            b.extend(w.to_be_bytes());
        }
        b.extend(oid.to_be_bytes());
        b.extend((elems.len() as i32).to_be_bytes());
        b.extend(1i32.to_be_bytes());
        for e in elems {
            b.extend((e.len() as i32).to_be_bytes());
            b.extend(e);
        }
        b
    }

    fn pack(hist: &[(i32, i64)]) -> Vec<u8> {
        let keys: Vec<Vec<u8>> = hist.iter().map(|(k, _)| k.to_be_bytes().to_vec()).collect();
        let counts: Vec<Vec<u8>> = hist.iter().map(|(_, c)| c.to_be_bytes().to_vec()).collect();
        [array_send(23, &keys), array_send(20, &counts)].concat()
    }

    #[test]
    fn packed_histograms_unpack_and_malformed_ones_are_refused() {
        let hist = vec![(-20_000, 1), (0, 7), (9_000, 1 << 40), (20_000, 2)];
        let unpack = |b: &[u8]| {
            let mut v = Vec::new();
            unpack_into(b, &mut v).map(|()| v)
        };
        assert_eq!(unpack(&pack(&hist)), Some(hist.clone()));
        assert_eq!(unpack(&pack(&[])), Some(vec![]));
        let good = pack(&hist);
        // Truncated anywhere, or with bytes after the counts.
        for cut in 0..good.len() {
            assert_eq!(unpack(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(unpack(&[good.clone(), vec![0]].concat()), None);
        // Arrays of different lengths, or an element of the wrong width.
        let keys = vec![1i32.to_be_bytes().to_vec()];
        let two = vec![1i64.to_be_bytes().to_vec(), 2i64.to_be_bytes().to_vec()];
        assert_eq!(
            unpack(&[array_send(23, &keys), array_send(20, &two)].concat()),
            None
        );
        let narrow = vec![1i32.to_be_bytes().to_vec()];
        assert_eq!(
            unpack(&[array_send(23, &keys), array_send(20, &narrow)].concat()),
            None
        );
        // A NULL flag or two dimensions.
        let mut nulls = good.clone();
        nulls[7] = 1;
        assert_eq!(unpack(&nulls), None);
        let mut dims = good;
        dims[3] = 2;
        assert_eq!(unpack(&dims), None);
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
