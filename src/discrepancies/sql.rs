//! The SQL of discrepancies, their resolution history and fingerprint rules.
//!
//! Every statement works within one project (its `project_id` parameter,
//! the call's project): a discrepancy, session or fingerprint rule of
//! another project is never read, changed or counted.

use super::{
    Discrepancy, DiscrepancyKey, ListDiscrepancies, NewDiscrepancy, Resolution, ResolutionChange,
    Resolve, Severity,
};
use crate::db::Stmt;
use crate::error::{Error, Result};
use crate::ingest::Sink;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use futures::pin_mut;
use std::collections::HashSet;
use tokio_postgres::Row;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

macro_rules! discrepancy_columns {
    () => {
        "id, session_id, result_id, kind, severity, description, source_element, target_element, \
         recommendation, confidence, fingerprint, resolution, resolved_by, resolution_note, \
         resolution_updated_at, created_at"
    };
}

fn from_row(row: &Row) -> Result<Discrepancy> {
    Ok(Discrepancy {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        result_id: row.try_get("result_id")?,
        kind: row.try_get("kind")?,
        severity: Severity::from_rank(row.try_get("severity")?)?,
        description: row.try_get("description")?,
        source_element: row.try_get("source_element")?,
        target_element: row.try_get("target_element")?,
        recommendation: row.try_get("recommendation")?,
        confidence: row.try_get("confidence")?,
        fingerprint: row.try_get("fingerprint")?,
        resolution: Resolution::from_db(row.try_get("resolution")?)?,
        resolved_by: row.try_get("resolved_by")?,
        resolution_note: row.try_get("resolution_note")?,
        resolution_updated_at: row.try_get("resolution_updated_at")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Appends the discrepancy of a row that starts with
/// `discrepancy_columns!()` to `out` as field `field` of a reply (key,
/// length and `verdict.v1.Discrepancy`), straight from the row's bytes: what
/// `from_row` and the proto conversion give, without building either (see
/// [`crate::encode`]).
pub fn discrepancy_to_wire(row: &Row, field: u32, out: &mut Vec<u8>) -> Result<()> {
    use crate::encode::*;
    let at = start_message(out, field);
    put_uuid(out, 1, row.try_get(0)?);
    put_uuid(out, 2, row.try_get(1)?);
    if let Some(result_id) = row.try_get(2)? {
        put_uuid(out, 3, result_id);
    }
    put_str(out, 4, row.try_get(3)?);
    put_varint(
        out,
        5,
        Severity::from_rank(row.try_get(4)?)?.to_proto() as i64,
    );
    // description, source_element, target_element, recommendation.
    for column in 5..=8 {
        put_str(out, column as u32 + 1, row.try_get(column)?);
    }
    put_double(out, 10, row.try_get(9)?);
    put_str(out, 11, row.try_get(10)?);
    put_varint(
        out,
        12,
        Resolution::from_db(row.try_get(11)?)?.to_proto() as i64,
    );
    put_str(out, 13, row.try_get(12)?);
    put_str(out, 14, row.try_get(13)?);
    put_opt_timestamp(out, 15, row.try_get(14)?);
    put_timestamp(out, 16, row.try_get(15)?);
    end_message(out, at);
    Ok(())
}

/// The list-order key of a row that starts with `discrepancy_columns!()`.
pub fn row_key(row: &Row) -> Result<DiscrepancyKey> {
    let created_at: chrono::DateTime<chrono::Utc> = row.try_get(15)?;
    Ok((
        row.try_get(4)?,
        created_at.timestamp_micros(),
        row.try_get(0)?,
    ))
}

pub fn key(d: &Discrepancy) -> DiscrepancyKey {
    (d.severity.rank(), d.created_at.timestamp_micros(), d.id)
}

/// Writes discrepancies of one session (of `project_id`) with binary COPY.
pub struct DiscrepancySink {
    pub project_id: Uuid,
    pub session_id: Uuid,
    /// Set for RecordDiscrepancies: rows remember their batch and position.
    pub batch_id: Option<String>,
}

const KNOWN_RESULTS: Stmt = Stmt::new(
    "SELECT",
    "results",
    "SELECT id FROM results WHERE session_id = $1 AND id = ANY($2)",
);

const MUTED: Stmt = Stmt::new(
    "SELECT",
    "fingerprint_rules",
    "SELECT fingerprint, actor, note FROM fingerprint_rules \
     WHERE project_id = $1 AND fingerprint = ANY($2)",
);

/// The binary COPY every discrepancy write uses (also the floor that
/// `verdict-bench` compares ingest with).
pub const COPY: Stmt = Stmt::new(
    "COPY",
    "discrepancies",
    "COPY discrepancies (project_id, session_id, id, result_id, kind, severity, description, source_element, \
     target_element, recommendation, confidence, fingerprint, resolution, resolved_by, \
     resolution_note, resolution_updated_at, batch_id, batch_position) FROM STDIN BINARY",
);

/// Column types of [`COPY`], in order.
pub const COPY_TYPES: [Type; 18] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::INT2,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::FLOAT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::INT4,
];

impl Sink for DiscrepancySink {
    type Item = NewDiscrepancy;

    async fn write<'a>(
        &'a self,
        tx: &'a deadpool_postgres::Transaction<'a>,
        items: &'a [NewDiscrepancy],
    ) -> Result<u64> {
        // A named result must be a result of the same session: say which
        // one is not, instead of a bare foreign-key failure.
        let named: HashSet<Uuid> = items.iter().filter_map(|d| d.result_id).collect();
        if !named.is_empty() {
            let wanted: Vec<Uuid> = named.iter().copied().collect();
            let found: HashSet<Uuid> = KNOWN_RESULTS
                .query(tx, &[&self.session_id, &wanted])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if let Some((i, d)) = items
                .iter()
                .enumerate()
                .find(|(_, d)| d.result_id.is_some_and(|r| !found.contains(&r)))
            {
                return Err(Error::invalid(
                    format!("items[{i}].result_id"),
                    format!(
                        "{} is not a result of session {}",
                        d.result_id.unwrap_or_default(),
                        self.session_id
                    ),
                ));
            }
        }

        // Fingerprints muted for good arrive muted.
        let fingerprints: Vec<&str> = items
            .iter()
            .map(|d| d.fingerprint.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let rules: std::collections::HashMap<String, (String, String)> = MUTED
            .query(tx, &[&self.project_id, &fingerprints])
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?))))
            .collect::<Result<_>>()?;
        let now = Utc::now();

        COPY.traced_copy(async {
            let sink = tx.copy_in(COPY.sql).await?;
            let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
            pin_mut!(writer);
            for (position, d) in items.iter().enumerate() {
                let rule = rules.get(&d.fingerprint);
                let (resolution, by, note, at) = match rule {
                    Some((actor, note)) => (
                        Resolution::Muted.as_str(),
                        actor.as_str(),
                        note.as_str(),
                        Some(now),
                    ),
                    None => (Resolution::Open.as_str(), "", "", None),
                };
                let position = self.batch_id.as_ref().map(|_| position as i32);
                let row: [&(dyn ToSql + Sync); 18] = [
                    &self.project_id,
                    &self.session_id,
                    &d.id,
                    &d.result_id,
                    &d.kind,
                    &d.severity.rank(),
                    &d.description,
                    &d.source_element,
                    &d.target_element,
                    &d.recommendation,
                    &d.confidence,
                    &d.fingerprint,
                    &resolution,
                    &by,
                    &note,
                    &at,
                    &self.batch_id,
                    &position,
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await
        })
        .await
    }
}

const BATCH_IDS: Stmt = Stmt::new(
    "SELECT",
    "discrepancies",
    "SELECT id FROM discrepancies WHERE project_id = $1 AND session_id = $2 AND batch_id = $3 \
     ORDER BY batch_position",
);

/// Ids of a committed batch, in item order.
pub async fn batch_ids(
    c: &impl GenericClient,
    project_id: Uuid,
    session_id: Uuid,
    batch_id: &str,
) -> Result<Vec<Uuid>> {
    BATCH_IDS
        .query(c, &[&project_id, &session_id, &batch_id])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

/// ListDiscrepancies with `$extra` (a further predicate) in its WHERE.
macro_rules! list_sql {
    ($extra:expr) => {
        concat!(
            "SELECT ",
            discrepancy_columns!(),
            " FROM discrepancies \
             WHERE project_id = $12 \
               AND ($1::uuid IS NULL OR session_id = $1) \
               AND ($2::uuid IS NULL OR result_id = $2) \
               AND ($3::int2[] IS NULL OR severity = ANY($3)) \
               AND ($4::text IS NULL OR kind = $4) \
               AND ($5::text[] IS NULL OR resolution = ANY($5)) \
               AND ($6::text IS NULL OR fingerprint = $6) \
               AND ($7::float8 IS NULL OR confidence >= $7) \
               AND ($13::uuid[] IS NULL OR id = ANY($13)) \
               AND ($8::int2 IS NULL OR severity > $8 \
                    OR (severity = $8 AND (created_at, id) < ($9, $10)))",
            $extra,
            " ORDER BY severity, created_at DESC, id DESC LIMIT $11"
        )
    };
}

const LIST: Stmt = Stmt::new("SELECT", "discrepancies", list_sql!(""));

/// ListDiscrepancies with a full-text `query` (`$14`) over descriptions: a
/// statement of its own, so the plan of the list without one stays what it
/// was.
const LIST_SEARCH: Stmt = Stmt::new(
    "SELECT",
    "discrepancies",
    list_sql!(" AND search_vector @@ websearch_to_tsquery('simple', $14)"),
);

/// The total of ListDiscrepancies: LIST's filters, without paging.
const COUNT: crate::totals::Counter = crate::counter!(
    "discrepancies",
    "discrepancies \
     WHERE project_id = $1 \
       AND ($2::uuid IS NULL OR session_id = $2) \
       AND ($3::uuid IS NULL OR result_id = $3) \
       AND ($4::int2[] IS NULL OR severity = ANY($4)) \
       AND ($5::text IS NULL OR kind = $5) \
       AND ($6::text[] IS NULL OR resolution = ANY($6)) \
       AND ($7::text IS NULL OR fingerprint = $7) \
       AND ($8::float8 IS NULL OR confidence >= $8) \
       AND ($9::uuid[] IS NULL OR id = ANY($9)) \
       AND ($10::text IS NULL OR search_vector @@ websearch_to_tsquery('simple', $10))"
);

/// How many discrepancies of `project` pass `f`, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project_id: Uuid,
    f: &super::DiscrepancyFilter,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let severities: Option<Vec<i16>> =
        (!f.severities.is_empty()).then(|| f.severities.iter().map(|s| s.rank()).collect());
    let resolutions: Option<Vec<&str>> =
        (!f.resolutions.is_empty()).then(|| f.resolutions.iter().map(|r| r.as_str()).collect());
    let ids = (!f.ids.is_empty()).then_some(&f.ids);
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project_id,
        &f.session_id,
        &f.result_id,
        &severities,
        &f.kind,
        &resolutions,
        &f.fingerprint,
        &f.min_confidence,
        &ids,
        &f.query,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

/// One page, most severe first, plus one extra row when more follow.
pub async fn list(
    c: &impl GenericClient,
    project_id: Uuid,
    q: &ListDiscrepancies,
) -> Result<Vec<Row>> {
    let f = &q.filter;
    let severities: Option<Vec<i16>> =
        (!f.severities.is_empty()).then(|| f.severities.iter().map(|s| s.rank()).collect());
    let resolutions: Option<Vec<&str>> =
        (!f.resolutions.is_empty()).then(|| f.resolutions.iter().map(|r| r.as_str()).collect());
    let (after_rank, after_time) = match q.after {
        Some((rank, micros, id)) => (Some(rank), Some((micros, id))),
        None => (None, None),
    };
    let (after_at, after_id) = crate::pagination::time_key(after_time)?;
    let limit = q.page_size + 1;
    let ids = (!f.ids.is_empty()).then_some(&f.ids);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &f.session_id,
        &f.result_id,
        &severities,
        &f.kind,
        &resolutions,
        &f.fingerprint,
        &f.min_confidence,
        &after_rank,
        &after_at,
        &after_id,
        &limit,
        &project_id,
        &ids,
    ];
    let rows = match &f.query {
        None => LIST.query(c, &params).await?,
        Some(query) => {
            params.push(query);
            LIST_SEARCH.query(c, &params).await?
        }
    };
    Ok(rows)
}

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "discrepancies",
    concat!(
        "SELECT ",
        discrepancy_columns!(),
        " FROM discrepancies WHERE project_id = $1 AND id = $2"
    ),
);

pub async fn get(
    c: &impl GenericClient,
    project_id: Uuid,
    id: Uuid,
) -> Result<Option<Discrepancy>> {
    BY_ID
        .query_opt(c, &[&project_id, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

const BY_ID_FOR_UPDATE: Stmt = Stmt::new(
    "SELECT",
    "discrepancies",
    concat!(
        "SELECT ",
        discrepancy_columns!(),
        " FROM discrepancies WHERE project_id = $1 AND id = $2 FOR UPDATE"
    ),
);

pub async fn get_for_update(
    c: &impl GenericClient,
    project_id: Uuid,
    id: Uuid,
) -> Result<Option<Discrepancy>> {
    BY_ID_FOR_UPDATE
        .query_opt(c, &[&project_id, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

const RESOLVE_ONE: Stmt = Stmt::new(
    "UPDATE",
    "discrepancies",
    "WITH changed AS ( \
         UPDATE discrepancies SET resolution = $3, resolved_by = $4, resolution_note = $5, \
                resolution_updated_at = now() \
         WHERE project_id = $7 AND session_id = $1 AND id = $2 \
         RETURNING project_id, session_id, id) \
     INSERT INTO discrepancy_resolutions \
         (project_id, session_id, discrepancy_id, from_resolution, to_resolution, actor, note, \
          via_fingerprint) \
     SELECT project_id, session_id, id, $6, $3, $4, $5, false FROM changed",
);

/// Sets one discrepancy's resolution and records the change.
pub async fn resolve_one(
    c: &impl GenericClient,
    project_id: Uuid,
    d: &Discrepancy,
    to: Resolution,
    actor: &str,
    note: &str,
) -> Result<u64> {
    RESOLVE_ONE
        .execute(
            c,
            &[
                &d.session_id,
                &d.id,
                &to.as_str(),
                &actor,
                &note,
                &d.resolution.as_str(),
                &project_id,
            ],
        )
        .await
}

const RESOLVE_FINGERPRINT: Stmt = Stmt::new(
    "UPDATE",
    "discrepancies",
    "WITH targets AS ( \
         SELECT session_id, id, resolution AS before FROM discrepancies \
         WHERE project_id = $7 AND fingerprint = $1 AND (resolution = $2 OR id = $3) FOR UPDATE), \
     changed AS ( \
         UPDATE discrepancies d SET resolution = $4, resolved_by = $5, resolution_note = $6, \
                resolution_updated_at = now() \
         FROM targets t \
         WHERE d.project_id = $7 AND d.session_id = t.session_id AND d.id = t.id \
         RETURNING d.project_id, d.session_id, d.id, t.before) \
     INSERT INTO discrepancy_resolutions \
         (project_id, session_id, discrepancy_id, from_resolution, to_resolution, actor, note, \
          via_fingerprint) \
     SELECT project_id, session_id, id, before, $4, $5, $6, true FROM changed",
);

/// Applies `r` (its resolution, actor and note) to every discrepancy of
/// `fingerprint` currently in `from` (plus the one `r` names) in
/// `project_id`, recording each change.
pub async fn resolve_fingerprint(
    c: &impl GenericClient,
    project_id: Uuid,
    fingerprint: &str,
    from: Resolution,
    r: &Resolve,
) -> Result<u64> {
    RESOLVE_FINGERPRINT
        .execute(
            c,
            &[
                &fingerprint,
                &from.as_str(),
                &r.id,
                &r.resolution.as_str(),
                &r.actor,
                &r.note,
                &project_id,
            ],
        )
        .await
}

const MUTE: Stmt = Stmt::new(
    "INSERT",
    "fingerprint_rules",
    "INSERT INTO fingerprint_rules (project_id, fingerprint, resolution, actor, note) \
     VALUES ($1, $2, 'muted', $3, $4) \
     ON CONFLICT (project_id, fingerprint) DO UPDATE SET actor = EXCLUDED.actor, note = EXCLUDED.note",
);

/// Mutes `fingerprint` for good in `project_id` (only there).
pub async fn mute(
    c: &impl GenericClient,
    project_id: Uuid,
    fingerprint: &str,
    actor: &str,
    note: &str,
) -> Result<()> {
    MUTE.execute(c, &[&project_id, &fingerprint, &actor, &note])
        .await?;
    Ok(())
}

const UNMUTE: Stmt = Stmt::new(
    "DELETE",
    "fingerprint_rules",
    "DELETE FROM fingerprint_rules WHERE project_id = $1 AND fingerprint = $2",
);

pub async fn unmute(c: &impl GenericClient, project_id: Uuid, fingerprint: &str) -> Result<()> {
    UNMUTE.execute(c, &[&project_id, &fingerprint]).await?;
    Ok(())
}

const HISTORY: Stmt = Stmt::new(
    "SELECT",
    "discrepancy_resolutions",
    "SELECT id, from_resolution, to_resolution, actor, note, via_fingerprint, changed_at \
     FROM discrepancy_resolutions \
     WHERE project_id = $5 AND session_id = $1 AND discrepancy_id = $2 AND id > $3 \
     ORDER BY id LIMIT $4",
);

/// The total of ListResolutionHistory: every change of one discrepancy.
const COUNT_HISTORY: crate::totals::Counter = crate::counter!(
    "discrepancy_resolutions",
    "discrepancy_resolutions \
     WHERE project_id = $1 AND session_id = $2 AND discrepancy_id = $3"
);

/// How many resolution changes discrepancy `d` has, counted as `mode` asks.
pub async fn count_history(
    c: &impl GenericClient,
    project_id: Uuid,
    d: &Discrepancy,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&project_id, &d.session_id, &d.id];
    crate::totals::count(c, &COUNT_HISTORY, params, mode, exact_below).await
}

/// Resolution changes of a discrepancy after `after_id`, oldest first.
pub async fn history(
    c: &impl GenericClient,
    project_id: Uuid,
    d: &Discrepancy,
    after_id: i64,
    limit: i64,
) -> Result<Vec<ResolutionChange>> {
    HISTORY
        .query(c, &[&d.session_id, &d.id, &after_id, &limit, &project_id])
        .await?
        .iter()
        .map(|r| {
            Ok(ResolutionChange {
                id: r.try_get(0)?,
                from: Resolution::from_db(r.try_get(1)?)?,
                to: Resolution::from_db(r.try_get(2)?)?,
                actor: r.try_get(3)?,
                note: r.try_get(4)?,
                via_fingerprint: r.try_get(5)?,
                changed_at: r.try_get(6)?,
            })
        })
        .collect()
}

/// Counts of a summary: `dimension` is `severity`, `kind`, `resolution` or
/// `total`.
pub struct SummaryRow {
    pub dimension: String,
    pub key: String,
    pub count: i64,
}

// Summaries read the counts the triggers of V27 keep at write time
// (discrepancy_session_counts, discrepancy_day_counts): a session's ~15 rows,
// or a range's whole UTC days plus the sessions of its partial edge days,
// instead of every discrepancy of the sessions named. The answer is the one
// GROUPING SETS over the rows gives: every non-zero count per dimension, the
// total always (0 when nothing matches), in (dimension, count DESC, key) order.
macro_rules! summary_of_counts {
    ($counts:literal) => {
        concat!(
            "WITH c AS (",
            $counts,
            "), \
             g AS (SELECT dimension, key, sum(n)::int8 AS n FROM c GROUP BY 1, 2 HAVING sum(n) <> 0) \
             SELECT dimension, key, n FROM g \
             UNION ALL \
             SELECT 'total', '', COALESCE(sum(n), 0)::int8 FROM g WHERE dimension = 'severity' \
             ORDER BY 1, 3 DESC, 2"
        )
    };
}

pub const SUMMARY_SESSION: Stmt = Stmt::new(
    "SELECT",
    "discrepancy_session_counts",
    summary_of_counts!(
        "SELECT dimension, key, n FROM discrepancy_session_counts \
         WHERE project_id = $2 AND session_id = $1"
    ),
);

/// $2..$3: the whole days; $4..$5 and $6..$7: the partial days at the edges.
pub const SUMMARY_RANGE: Stmt = Stmt::new(
    "SELECT",
    "discrepancy_day_counts",
    summary_of_counts!(
        "SELECT dimension, key, n FROM discrepancy_day_counts \
         WHERE project_id = $1 AND day >= $2 AND day < $3 \
         UNION ALL \
         SELECT dimension, key, n FROM discrepancy_session_counts \
         WHERE project_id = $1 AND session_created_at >= $4 AND session_created_at < $5 \
         UNION ALL \
         SELECT dimension, key, n FROM discrepancy_session_counts \
         WHERE project_id = $1 AND session_created_at >= $6 AND session_created_at < $7"
    ),
);

/// The UTC midnight at or before `t`.
fn floor_day(t: DateTime<Utc>) -> DateTime<Utc> {
    t.date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc())
        .unwrap_or(t)
}

/// A half-open range of instants, [start, end).
pub type Span = (DateTime<Utc>, DateTime<Utc>);

/// [lo, hi) split into whole UTC days [full_lo, full_hi) (empty when the
/// range holds no whole day) and the partial edges before and after them:
/// (whole days, first edge, last edge).
pub fn split_days(lo: DateTime<Utc>, hi: DateTime<Utc>) -> (Span, Span, Span) {
    let floor_lo = floor_day(lo);
    let full_lo = if floor_lo == lo {
        lo
    } else {
        floor_lo + chrono::Duration::days(1)
    };
    let full_hi = floor_day(hi);
    let first_end = full_lo.min(hi);
    let last_start = full_hi.max(first_end);
    ((full_lo, full_hi), (lo, first_end), (last_start, hi))
}

fn summary_rows(rows: Vec<Row>) -> Result<Vec<SummaryRow>> {
    rows.iter()
        .map(|r| {
            Ok(SummaryRow {
                dimension: r.try_get(0)?,
                key: r.try_get(1)?,
                count: r.try_get(2)?,
            })
        })
        .collect()
}

pub async fn summary_of_session(
    c: &impl GenericClient,
    project_id: Uuid,
    session_id: Uuid,
) -> Result<Vec<SummaryRow>> {
    summary_rows(
        SUMMARY_SESSION
            .query(c, &[&session_id, &project_id])
            .await?,
    )
}

pub async fn summary_of_range(
    c: &impl GenericClient,
    project_id: Uuid,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Vec<SummaryRow>> {
    let (lo, hi) = crate::metrics::sql::bounds(from, to);
    if lo >= hi {
        return summary_rows(
            SUMMARY_SESSION
                .query(c, &[&Uuid::nil(), &project_id])
                .await?,
        );
    }
    let ((d_lo, d_hi), (a_lo, a_hi), (b_lo, b_hi)) = split_days(lo, hi);
    summary_rows(
        SUMMARY_RANGE
            .query(c, &[&project_id, &d_lo, &d_hi, &a_lo, &a_hi, &b_lo, &b_hi])
            .await?,
    )
}

const PAGE_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "discrepancies",
    concat!(
        "SELECT ",
        discrepancy_columns!(),
        " FROM discrepancies \
          WHERE project_id = (SELECT project_id FROM sessions WHERE id = $1) AND session_id = $1 \
            AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
    ),
);

/// Discrepancies of a session in id order after `after`, for exports (in
/// the session's project: the caller checks that the session is one of the
/// call's project before exporting it).
pub async fn page_of_session(
    c: &impl GenericClient,
    session_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Discrepancy>> {
    PAGE_OF_SESSION
        .query(c, &[&session_id, &after, &limit])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

const RESOLUTIONS_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "discrepancy_resolutions",
    "SELECT discrepancy_id, id, from_resolution, to_resolution, actor, note, via_fingerprint, changed_at \
     FROM discrepancy_resolutions \
     WHERE project_id = (SELECT project_id FROM sessions WHERE id = $1) AND session_id = $1 \
       AND ($2::uuid IS NULL OR (discrepancy_id, id) > ($2, $3)) \
     ORDER BY discrepancy_id, id LIMIT $4",
);

/// Resolution changes of a session's discrepancies after a position, for
/// exports (in the session's project, as [`page_of_session`]).
pub async fn resolutions_of_session(
    c: &impl GenericClient,
    session_id: Uuid,
    after: Option<(Uuid, i64)>,
    limit: i64,
) -> Result<Vec<(Uuid, ResolutionChange)>> {
    let (after_d, after_id) = (after.map(|a| a.0), after.map(|a| a.1).unwrap_or(0));
    RESOLUTIONS_OF_SESSION
        .query(c, &[&session_id, &after_d, &after_id, &limit])
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                ResolutionChange {
                    id: r.try_get(1)?,
                    from: Resolution::from_db(r.try_get(2)?)?,
                    to: Resolution::from_db(r.try_get(3)?)?,
                    actor: r.try_get(4)?,
                    note: r.try_get(5)?,
                    via_fingerprint: r.try_get(6)?,
                    changed_at: r.try_get(7)?,
                },
            ))
        })
        .collect()
}
