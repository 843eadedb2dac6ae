//! The SQL of results.

use super::{ListResults, NewResult, OverallStatus, ResultKey, ResultType, ValidationResult};
use crate::db::Stmt;
use crate::error::Result;
use crate::pagination;
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

macro_rules! result_columns {
    () => {
        "id, session_id, request_id, result_type, overall_status, fidelity_score, summary, \
         execution_time_ms, source_representation, target_representation, created_at"
    };
}

fn from_row(row: &Row) -> Result<ValidationResult> {
    Ok(ValidationResult {
        id: row.try_get("id")?,
        session_id: row.try_get("session_id")?,
        request_id: row.try_get("request_id")?,
        result_type: ResultType::from_db(row.try_get("result_type")?)?,
        overall_status: OverallStatus::from_db(row.try_get("overall_status")?)?,
        fidelity_score: row.try_get("fidelity_score")?,
        summary: row.try_get("summary")?,
        execution_time_ms: row.try_get("execution_time_ms")?,
        // NULL (left out by a BASIC list) reads as JSON null.
        source_representation: row.try_get("source_representation")?,
        target_representation: row.try_get("target_representation")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Appends the result of a row that starts with `result_columns!()` to `out`
/// as field `field` of a reply (key, length and `verdict.v1.ValidationResult`),
/// straight from the row's bytes: what `from_row` and the proto conversion
/// give, without building either (see [`crate::encode`]).
pub fn result_to_wire(row: &Row, field: u32, out: &mut Vec<u8>) -> Result<()> {
    use crate::encode::*;
    let at = start_message(out, field);
    put_uuid(out, 1, row.try_get(0)?);
    put_uuid(out, 2, row.try_get(1)?);
    put_str(out, 3, row.try_get(2)?);
    put_varint(
        out,
        4,
        ResultType::from_db(row.try_get(3)?)?.to_proto() as i64,
    );
    put_varint(
        out,
        5,
        OverallStatus::from_db(row.try_get(4)?)?.to_proto() as i64,
    );
    put_double(out, 6, row.try_get(5)?);
    put_str(out, 7, row.try_get(6)?);
    put_varint(out, 8, row.try_get(7)?);
    // The representations; unset when NULL (left out by a BASIC list) or
    // JSON null.
    for column in 8..=9 {
        put_opt_struct_json(out, column as u32 + 1, row.try_get(column)?)?;
    }
    put_timestamp(out, 11, row.try_get(10)?);
    end_message(out, at);
    Ok(())
}

/// The list-order key of a row that starts with `result_columns!()`.
pub fn row_key(row: &Row) -> Result<ResultKey> {
    let created_at: chrono::DateTime<chrono::Utc> = row.try_get(10)?;
    Ok((created_at.timestamp_micros(), row.try_get(0)?))
}

pub fn key(r: &ValidationResult) -> ResultKey {
    (r.created_at.timestamp_micros(), r.id)
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "results",
    concat!(
        "INSERT INTO results (id, session_id, request_id, result_type, overall_status, \
         fidelity_score, summary, execution_time_ms, source_representation, target_representation, \
         content_digest, project_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (project_id, session_id, request_id) DO NOTHING RETURNING ",
        result_columns!()
    ),
);

/// Inserts a result of a session of `project` unless its request_id is
/// taken in the session; `digest` is the canonical digest of `r`, kept to
/// decide replays.
pub async fn insert(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    r: &NewResult,
    digest: &[u8],
) -> Result<Option<ValidationResult>> {
    INSERT
        .query_opt(
            c,
            &[
                &id,
                &r.session_id,
                &r.request_id,
                &r.result_type.as_str(),
                &r.overall_status.as_str(),
                &r.fidelity_score,
                &r.summary,
                &r.execution_time_ms,
                &r.source_representation,
                &r.target_representation,
                &digest,
                &project,
            ],
        )
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

const BY_REQUEST_ID: Stmt = Stmt::new(
    "SELECT",
    "results",
    concat!(
        "SELECT ",
        result_columns!(),
        ", content_digest FROM results \
         WHERE project_id = $1 AND session_id = $2 AND request_id = $3"
    ),
);

/// The result holding `request_id` in the session `session_id` of
/// `project` and its content digest (`None` for a result recorded before
/// V11), to decide a replay.
pub async fn get_for_replay(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    request_id: &str,
) -> Result<Option<(ValidationResult, Option<Vec<u8>>)>> {
    BY_REQUEST_ID
        .query_opt(c, &[&project, &session_id, &request_id])
        .await?
        .map(|row| Ok((from_row(&row)?, row.try_get("content_digest")?)))
        .transpose()
}

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "results",
    concat!(
        "SELECT ",
        result_columns!(),
        " FROM results WHERE project_id = $1 AND id = $2"
    ),
);

/// The result `id` of `project`; `None` when that project has none.
pub async fn get(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
) -> Result<Option<ValidationResult>> {
    BY_ID
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The list statement over `columns`: the results of project `$1` that pass
/// the filters, newest first.
macro_rules! list_sql {
    ($columns:expr) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM results \
             WHERE project_id = $1 \
               AND ($2::uuid IS NULL OR session_id = $2) \
               AND ($3::text[] IS NULL OR result_type = ANY($3)) \
               AND ($4::text[] IS NULL OR overall_status = ANY($4)) \
               AND ($5::float8 IS NULL OR fidelity_score >= $5) \
               AND ($6::float8 IS NULL OR fidelity_score <= $6) \
               AND ($7::timestamptz IS NULL OR created_at >= $7) \
               AND ($8::timestamptz IS NULL OR created_at < $8) \
               AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10)) \
             ORDER BY created_at DESC, id DESC LIMIT $11"
        )
    };
}

/// RESULT_VIEW_FULL: the page's rows (`$11`, page_size + 1), cut after the
/// row that brings their JSON and summary text to `$12` bytes (the reply
/// limit; the first row always comes). `batch_rows` tells how many rows the
/// cut saw, so a cut page still ends with a token: the gateway never holds
/// more than about one reply of large results, whatever the page size.
const LIST: Stmt = Stmt::new(
    "SELECT",
    "results",
    concat!(
        "SELECT ",
        result_columns!(),
        ", batch_rows FROM (SELECT *, \
           sum(row_bytes) OVER (ORDER BY created_at DESC, id DESC ROWS UNBOUNDED PRECEDING) \
             - row_bytes AS bytes_before, \
           count(*) OVER () AS batch_rows \
         FROM (",
        list_sql!(
            "*, octet_length(source_representation::text) \
             + octet_length(target_representation::text) + octet_length(summary) AS row_bytes"
        ),
        ") batch) sized WHERE bytes_before < $12 ORDER BY created_at DESC, id DESC"
    ),
);

/// RESULT_VIEW_BASIC: the representations are not read at all (NULL).
const LIST_BASIC: Stmt = Stmt::new(
    "SELECT",
    "results",
    list_sql!(
        "id, session_id, request_id, result_type, overall_status, fidelity_score, summary, \
         execution_time_ms, NULL::jsonb AS source_representation, \
         NULL::jsonb AS target_representation, created_at"
    ),
);

/// The total of ListResults: LIST's filters (`$1`…`$8`), without paging.
const COUNT: crate::totals::Counter = crate::counter!(
    "results",
    "results \
     WHERE project_id = $1 \
       AND ($2::uuid IS NULL OR session_id = $2) \
       AND ($3::text[] IS NULL OR result_type = ANY($3)) \
       AND ($4::text[] IS NULL OR overall_status = ANY($4)) \
       AND ($5::float8 IS NULL OR fidelity_score >= $5) \
       AND ($6::float8 IS NULL OR fidelity_score <= $6) \
       AND ($7::timestamptz IS NULL OR created_at >= $7) \
       AND ($8::timestamptz IS NULL OR created_at < $8)"
);

/// How many results of `project` pass `f`, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    f: &super::ResultFilter,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let types: Option<Vec<&str>> =
        (!f.result_types.is_empty()).then(|| f.result_types.iter().map(|t| t.as_str()).collect());
    let statuses: Option<Vec<&str>> = (!f.overall_statuses.is_empty())
        .then(|| f.overall_statuses.iter().map(|t| t.as_str()).collect());
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &f.session_id,
        &types,
        &statuses,
        &f.min_fidelity,
        &f.max_fidelity,
        &f.created_from,
        &f.created_to,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

/// One page of the results of `project`, newest first, plus one extra row
/// when more follow; in the FULL view at most about `max_bytes` of them (see
/// LIST).
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListResults,
    max_bytes: i64,
) -> Result<pagination::Fetched<Row>> {
    let f = &q.filter;
    let types: Option<Vec<&str>> =
        (!f.result_types.is_empty()).then(|| f.result_types.iter().map(|t| t.as_str()).collect());
    let statuses: Option<Vec<&str>> = (!f.overall_statuses.is_empty())
        .then(|| f.overall_statuses.iter().map(|t| t.as_str()).collect());
    let (after_at, after_id) = pagination::time_key(q.after)?;
    let limit = q.page_size + 1;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &f.session_id,
        &types,
        &statuses,
        &f.min_fidelity,
        &f.max_fidelity,
        &f.created_from,
        &f.created_to,
        &after_at,
        &after_id,
        &limit,
        &max_bytes,
    ];
    pagination::fetch_rows(c, q.view, &LIST, &LIST_BASIC, params).await
}

/// A batch of the results of session `$1` of project `$5` for exports: at
/// most `$3` rows after id
/// `$2`, cut after the row that brings their JSON and summary text to `$4`
/// bytes (the first row always comes), so a batch of large results stays
/// near `$4` bytes however many rows `$3` allows.
const PAGE_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "results",
    concat!(
        "SELECT ",
        result_columns!(),
        " FROM (SELECT *, sum(row_bytes) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - row_bytes AS bytes_before \
           FROM (SELECT *, octet_length(source_representation::text) \
                         + octet_length(target_representation::text) + octet_length(summary) AS row_bytes \
                 FROM results WHERE project_id = $5 AND session_id = $1 \
                 AND ($2::uuid IS NULL OR id > $2) \
                 ORDER BY id LIMIT $3) batch) sized \
         WHERE bytes_before < $4 ORDER BY id"
    ),
);

/// Results of the session `session_id` of `project` in id order after
/// `after`, for exports: at most `limit` rows, fewer when they reach
/// `max_bytes` (see PAGE_OF_SESSION); an empty batch is the end.
pub async fn page_of_session(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<ValidationResult>> {
    PAGE_OF_SESSION
        .query(c, &[&session_id, &after, &limit, &max_bytes, &project])
        .await?
        .iter()
        .map(from_row)
        .collect()
}
