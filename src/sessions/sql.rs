//! The SQL of sessions and session logs: one small function per statement,
//! each taking the caller's client or transaction.

use super::{
    ListLogs, ListSessions, LogEntry, LogLevel, NewLogEntry, NewSession, Session, SessionKey,
    SessionStatus,
};
use crate::db::Stmt;
use crate::error::{Error, Reason, Result};
use deadpool_postgres::GenericClient;
use serde_json::Value as Json;
use tokio_postgres::Row;
use uuid::Uuid;

macro_rules! session_columns {
    () => {
        "id, request_id, source_technology, target_technology, validation_scope, status, \
         config, input_refs, metadata, created_at, updated_at, started_at, completed_at, version, \
         labels"
    };
}

macro_rules! log_columns {
    () => {
        "id, session_id, seq, logged_at, level, message, fields"
    };
}

/// A session from a row that starts with `session_columns!()`, read by
/// position (no column-name lookups per field).
fn session_from_row(row: &Row) -> Result<Session> {
    Ok(Session {
        id: row.try_get(0)?,
        request_id: row.try_get(1)?,
        source_technology: row.try_get(2)?,
        target_technology: row.try_get(3)?,
        validation_scope: row.try_get(4)?,
        status: SessionStatus::from_db(row.try_get(5)?)?,
        // Parsed straight into protobuf Structs (see `JsonDoc`); NULL (left
        // out by a BASIC list) reads as `None`.
        config: row.try_get(6)?,
        input_refs: row.try_get(7)?,
        metadata: row.try_get(8)?,
        created_at: row.try_get(9)?,
        updated_at: row.try_get(10)?,
        started_at: row.try_get(11)?,
        completed_at: row.try_get(12)?,
        version: row.try_get(13)?,
        labels: row.try_get::<_, crate::labels::LabelsColumn>(14)?.0,
    })
}

/// Appends the session of a row that starts with `session_columns!()` to
/// `out` as field `field` of a reply (key, length and `verdict.v1.Session`),
/// straight from the row's bytes: what `session_from_row` and the proto
/// conversion give, without building either (see [`crate::encode`]).
pub fn session_to_wire(row: &Row, field: u32, out: &mut Vec<u8>) -> Result<()> {
    use crate::encode::*;
    let at = start_message(out, field);
    let id: Uuid = row.try_get(0)?;
    put_str(
        out,
        1,
        id.hyphenated().encode_lower(&mut Uuid::encode_buffer()),
    );
    // request_id, source_technology, target_technology, validation_scope.
    for column in 1..=4 {
        put_str(out, column as u32 + 1, row.try_get(column)?);
    }
    let status = SessionStatus::from_db(row.try_get(5)?)?;
    put_varint(out, 6, status.to_proto() as i64);
    // config, input_refs, metadata; NULL (left out by a BASIC list): unset.
    for column in 6..=8 {
        if let Some(JsonText(text)) = row.try_get(column)? {
            put_struct_json(out, column as u32 + 1, text)?;
        }
    }
    put_timestamp(out, 10, row.try_get(9)?);
    put_timestamp(out, 11, row.try_get(10)?);
    put_opt_timestamp(out, 12, row.try_get(11)?);
    put_opt_timestamp(out, 13, row.try_get(12)?);
    put_varint(out, 14, row.try_get(13)?);
    let labels = row.try_get::<_, crate::labels::LabelsColumn>(14)?.0;
    put_str_map(out, 20, &labels);
    end_message(out, at);
    Ok(())
}

/// The list-order key of a row that starts with `session_columns!()`.
pub fn session_row_key(row: &Row) -> Result<SessionKey> {
    let created_at: chrono::DateTime<chrono::Utc> = row.try_get(9)?;
    Ok((created_at.timestamp_micros(), row.try_get(0)?))
}

/// Writes a log entry from a row that starts with `log_columns!()` as
/// `field` of a reply: the bytes `From<LogEntry>` gives, without the
/// entry in between.
pub fn log_to_wire(row: &Row, field: u32, out: &mut Vec<u8>) -> Result<()> {
    use crate::encode::*;
    let at = start_message(out, field);
    put_varint(out, 1, row.try_get(0)?);
    put_uuid(out, 2, row.try_get(1)?);
    put_timestamp(out, 3, row.try_get(3)?);
    put_varint(
        out,
        4,
        LogLevel::from_db(row.try_get(4)?)?.to_proto() as i64,
    );
    put_str(out, 5, row.try_get(5)?);
    let JsonText(fields) = row.try_get(6)?;
    put_struct_json(out, 6, fields)?;
    put_varint(out, 7, row.try_get(2)?);
    end_message(out, at);
    Ok(())
}

/// The list-order key (`seq`) of a row that starts with `log_columns!()`.
pub fn log_row_key(row: &Row) -> Result<i64> {
    Ok(row.try_get(2)?)
}

/// A log entry from a row that starts with `log_columns!()`, read by
/// position.
fn log_from_row(row: &Row) -> Result<LogEntry> {
    Ok(LogEntry {
        id: row.try_get(0)?,
        session_id: row.try_get(1)?,
        seq: row.try_get(2)?,
        logged_at: row.try_get(3)?,
        level: LogLevel::from_db(row.try_get(4)?)?,
        message: row.try_get(5)?,
        fields: row.try_get(6)?,
    })
}

/// The sort key of a session in list order.
pub fn session_key(s: &Session) -> SessionKey {
    (s.created_at.timestamp_micros(), s.id)
}

/// Inserts a session in project `$10` with labels `$11` (public for `verdict-bench`'s same-SQL
/// baseline); nothing when the project already has a session with the
/// request_id.
pub const INSERT: Stmt = Stmt::new(
    "INSERT",
    "sessions",
    concat!(
        "INSERT INTO sessions (id, request_id, source_technology, target_technology, \
         validation_scope, config, input_refs, metadata, content_digest, project_id, labels) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (project_id, request_id) DO NOTHING RETURNING ",
        session_columns!()
    ),
);

/// Inserts a session in `project` unless its request_id is taken there;
/// `None` when it is. `digest` is the canonical digest of `s`, kept to
/// decide replays.
pub async fn insert(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    s: &NewSession,
    digest: &[u8],
) -> Result<Option<Session>> {
    INSERT
        .query_opt(
            c,
            &[
                &id,
                &s.request_id,
                &s.source_technology,
                &s.target_technology,
                &s.validation_scope,
                &s.config,
                &s.input_refs,
                &s.metadata,
                &digest,
                &project,
                &crate::labels::to_json(&s.labels),
            ],
        )
        .await?
        .as_ref()
        .map(session_from_row)
        .transpose()
}

/// A session of project `$1` by id `$2` (public for `verdict-bench`'s
/// same-SQL baseline).
pub const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE project_id = $1 AND id = $2"
    ),
);

/// The session `id` of `project`: its id and the session as field 1 of a
/// reply (see [`session_to_wire`]); `None` when there is none in that
/// project (whether or not another project has one).
pub async fn get_wire(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<Wire>> {
    wire(BY_ID.query_opt(c, &[&project, &id]).await?)
}

/// [`get_wire`] by request_id.
pub async fn get_by_request_id_wire(
    c: &impl GenericClient,
    project: Uuid,
    request_id: &str,
) -> Result<Option<Wire>> {
    wire(BY_REQUEST_ID.query_opt(c, &[&project, &request_id]).await?)
}

/// A session's id and its encoding as a reply's field 1.
pub type Wire = (Uuid, Vec<u8>);

fn wire(row: Option<Row>) -> Result<Option<Wire>> {
    let Some(row) = row else { return Ok(None) };
    let mut out = Vec::with_capacity(512);
    session_to_wire(&row, 1, &mut out)?;
    Ok(Some((row.try_get(0)?, out)))
}

pub async fn get(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<Session>> {
    BY_ID
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(session_from_row)
        .transpose()
}

const BY_ID_FOR_UPDATE: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE project_id = $1 AND id = $2 FOR UPDATE"
    ),
);

/// Reads a session of `project` and locks it until the transaction ends.
pub async fn get_for_update(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
) -> Result<Option<Session>> {
    BY_ID_FOR_UPDATE
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(session_from_row)
        .transpose()
}

pub const BY_REQUEST_ID: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        " FROM sessions WHERE project_id = $1 AND request_id = $2"
    ),
);

/// The session of `project` holding `request_id`.
pub async fn get_by_request_id(
    c: &impl GenericClient,
    project: Uuid,
    request_id: &str,
) -> Result<Option<Session>> {
    BY_REQUEST_ID
        .query_opt(c, &[&project, &request_id])
        .await?
        .as_ref()
        .map(session_from_row)
        .transpose()
}

const BY_REQUEST_ID_FOR_REPLAY: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        ", content_digest FROM sessions WHERE project_id = $1 AND request_id = $2"
    ),
);

/// The session of `project` holding `request_id` and its content digest
/// (`None` for a session created before V11), to decide a replay of
/// CreateSession.
pub async fn get_for_replay(
    c: &impl GenericClient,
    project: Uuid,
    request_id: &str,
) -> Result<Option<(Session, Option<Vec<u8>>)>> {
    BY_REQUEST_ID_FOR_REPLAY
        .query_opt(c, &[&project, &request_id])
        .await?
        .map(|row| Ok((session_from_row(&row)?, row.try_get("content_digest")?)))
        .transpose()
}

/// The list statement over `columns`: the sessions of project `$1` that
/// pass the filters, newest first.
macro_rules! list_sql {
    ($columns:expr) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM sessions \
             WHERE project_id = $1 \
               AND ($2::text[] IS NULL OR status = ANY($2)) \
               AND ($3::text IS NULL OR source_technology = $3) \
               AND ($4::text IS NULL OR target_technology = $4) \
               AND ($5::text IS NULL OR validation_scope = $5) \
               AND ($6::timestamptz IS NULL OR created_at >= $6) \
               AND ($7::timestamptz IS NULL OR created_at < $7) \
               AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9)) \
               AND ($11::jsonb IS NULL OR labels @> $11) \
               AND ($12::text[] IS NULL OR labels ?& $12) \
             ORDER BY created_at DESC, id DESC \
             LIMIT $10"
        )
    };
}

/// A ListSessions page (public for `verdict-bench`'s same-SQL baseline).
/// SESSION_VIEW_FULL: the page's rows (`$10`, page_size + 1; label filters
/// `$11` and `$12`), cut after the row that brings their JSON to `$13` bytes (the reply limit; the first row
/// always comes). `batch_rows` tells how many rows the cut saw, so a cut page
/// still ends with a token: the gateway never holds more than about one
/// reply of large sessions, whatever the page size.
pub const LIST: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        ", batch_rows FROM (SELECT *, \
           sum(row_bytes) OVER (ORDER BY created_at DESC, id DESC ROWS UNBOUNDED PRECEDING) \
             - row_bytes AS bytes_before, \
           count(*) OVER () AS batch_rows \
         FROM (",
        list_sql!(
            "*, octet_length(config::text) + octet_length(input_refs::text) \
             + octet_length(metadata::text) + octet_length(labels::text) AS row_bytes"
        ),
        ") batch) sized WHERE bytes_before < $13 ORDER BY created_at DESC, id DESC"
    ),
);

/// SESSION_VIEW_BASIC: config, input_refs and metadata are not read at all.
pub const LIST_BASIC: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    list_sql!(
        "id, request_id, source_technology, target_technology, validation_scope, status, \
         NULL::jsonb AS config, NULL::jsonb AS input_refs, NULL::jsonb AS metadata, \
         created_at, updated_at, started_at, completed_at, version, labels"
    ),
);

/// One page of the sessions of `project`, newest first, plus one extra row
/// when more follow; in the FULL view at most about `max_bytes` of them (see
/// LIST).
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListSessions,
    max_bytes: i64,
) -> Result<crate::pagination::Fetched<Row>> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let (after_at, after_id) = crate::pagination::time_key(q.after)?;
    let limit = q.page_size + 1;
    let (labels, label_keys) = f.labels.params();
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &statuses,
        &f.source_technology,
        &f.target_technology,
        &f.validation_scope,
        &f.created_from,
        &f.created_to,
        &after_at,
        &after_id,
        &limit,
        &labels,
        &label_keys,
        &max_bytes,
    ];
    crate::pagination::fetch_rows(c, q.view, &LIST, &LIST_BASIC, params).await
}

/// The total of ListSessions: LIST's filters (`$1`…`$7`), without paging.
pub const COUNT: crate::totals::Counter = crate::counter!(
    "sessions",
    "sessions \
     WHERE project_id = $1 \
       AND ($2::text[] IS NULL OR status = ANY($2)) \
       AND ($3::text IS NULL OR source_technology = $3) \
       AND ($4::text IS NULL OR target_technology = $4) \
       AND ($5::text IS NULL OR validation_scope = $5) \
       AND ($6::timestamptz IS NULL OR created_at >= $6) \
       AND ($7::timestamptz IS NULL OR created_at < $7) \
       AND ($8::jsonb IS NULL OR labels @> $8) \
       AND ($9::text[] IS NULL OR labels ?& $9)"
);

/// How many sessions of `project` pass `f`, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    f: &super::SessionFilter,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let (labels, label_keys) = f.labels.params();
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &statuses,
        &f.source_technology,
        &f.target_technology,
        &f.validation_scope,
        &f.created_from,
        &f.created_to,
        &labels,
        &label_keys,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

const SET_STATUS: Stmt = Stmt::new(
    "UPDATE",
    "sessions",
    concat!(
        "UPDATE sessions SET status = $2, version = version + 1, updated_at = now(), \
           started_at = CASE WHEN $2 = 'processing' THEN now() ELSE started_at END, \
           completed_at = CASE WHEN $2 IN ('completed', 'failed', 'cancelled') THEN now() \
                          ELSE completed_at END \
         WHERE project_id = $3 AND id = $1 RETURNING ",
        session_columns!()
    ),
);

/// Moves the session `id` of `project` to `status` (the caller checked the
/// move under [`get_for_update`]'s lock).
pub async fn set_status(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    status: SessionStatus,
) -> Result<Session> {
    session_from_row(
        &SET_STATUS
            .query_one(c, &[&id, &status.as_str(), &project])
            .await?,
    )
}

const DELETE_LOGS: Stmt = Stmt::new(
    "DELETE",
    "session_logs",
    "DELETE FROM session_logs WHERE project_id = $1 AND session_id = $2",
);

/// Deletes the log of the session `session_id` of `project`.
pub async fn delete_logs(c: &impl GenericClient, project: Uuid, session_id: Uuid) -> Result<u64> {
    DELETE_LOGS.execute(c, &[&project, &session_id]).await
}

const DELETE: Stmt = Stmt::new(
    "DELETE",
    "sessions",
    "DELETE FROM sessions WHERE project_id = $1 AND id = $2",
);

/// Deletes the session `id` of `project` (its results and other children
/// go with it by cascade).
pub async fn delete(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<u64> {
    DELETE.execute(c, &[&project, &id]).await
}

/// AppendSessionLog in one statement, so one round trip, for one entry or
/// a group of entries of one session (see [`super::appends`]): take the
/// next `$3` positions of the session `$2` of project `$1` (unless it is in
/// a final status), store the entries there in item order and each one's
/// audit row with it. One statement is one transaction: every write of the
/// group commits together or none does, and a refused group takes no
/// position.
///
/// The UPDATE locks the session row until the statement commits, so appends
/// to one session (and its status moves) commit one at a time in position
/// order: a reader following `seq > last seen` can never skip an entry. A
/// status move committed while the append waited for the lock is seen (the
/// row is re-read under the lock), so no entry lands after a final status.
/// The audit row's target is the session id as PostgreSQL prints a uuid
/// (lowercase, hyphenated: the same text as everywhere else).
const APPEND_LOGS: Stmt = Stmt::new(
    "INSERT",
    "session_logs",
    concat!(
        "WITH item AS (\
           SELECT * FROM unnest($4::text[], $5::text[], $6::jsonb[], $7::text[], $8::text[]) \
             WITH ORDINALITY AS i (level, message, fields, key_id, trace_id, n)), \
         position AS (\
           UPDATE sessions SET log_seq = log_seq + $3 \
            WHERE project_id = $1 AND id = $2 \
              AND status NOT IN ('completed', 'failed', 'cancelled') \
            RETURNING log_seq - $3 AS base), \
         entry AS (\
           INSERT INTO session_logs (session_id, seq, level, message, fields, project_id) \
           SELECT $2, position.base + item.n, item.level, item.message, item.fields, $1 \
             FROM position, item \
           RETURNING ",
        log_columns!(),
        "), \
         audit AS (\
           INSERT INTO audit_events (key_id, rpc, target_ids, outcome, trace_id, project_id) \
           SELECT item.key_id, $9, ARRAY[$2::text], $10, item.trace_id, $1 \
             FROM entry, position, item WHERE item.n = entry.seq - position.base) \
         SELECT ",
        log_columns!(),
        " FROM entry ORDER BY seq"
    ),
);

/// One entry of an append and who appends it, as its audit row records it.
pub struct Append<'a> {
    pub entry: &'a NewLogEntry,
    pub key_id: Option<&'a str>,
    pub trace_id: Option<&'a str>,
}

/// Appends `items`, entries of the session `session_id` of `project`, at
/// its next positions in item order, each with its audit row (RPC `rpc`,
/// outcome `outcome`; see [`APPEND_LOGS`]), and returns them stored, in item
/// order. NOT_FOUND when `project` has no such session;
/// FAILED_PRECONDITION (SESSION_NOT_ACCEPTING_WRITES) when it is in a final
/// status. All or nothing.
pub async fn append_logs(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    items: &[Append<'_>],
    rpc: &str,
    outcome: &str,
) -> Result<Vec<LogEntry>> {
    let count = items.len() as i64;
    let levels: Vec<&str> = items.iter().map(|a| a.entry.level.as_str()).collect();
    let messages: Vec<&str> = items.iter().map(|a| a.entry.message.as_str()).collect();
    let fields: Vec<&Json> = items.iter().map(|a| &a.entry.fields).collect();
    let key_ids: Vec<Option<&str>> = items.iter().map(|a| a.key_id).collect();
    let trace_ids: Vec<Option<&str>> = items.iter().map(|a| a.trace_id).collect();
    let rows = APPEND_LOGS
        .query(
            c,
            &[
                &project,
                &session_id,
                &count,
                &levels,
                &messages,
                &fields,
                &key_ids,
                &trace_ids,
                &rpc,
                &outcome,
            ],
        )
        .await
        .map_err(|err| match err {
            Error::NotFound(_) => not_found(session_id),
            other => other,
        })?;
    if rows.is_empty() {
        return Err(refused_append(c, project, session_id).await);
    }
    if rows.len() != items.len() {
        return Err(Error::Internal(format!(
            "{} log entries stored for {} appended",
            rows.len(),
            items.len()
        )));
    }
    rows.iter().map(log_from_row).collect()
}

const STATUS: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT status FROM sessions WHERE project_id = $1 AND id = $2",
);

/// Why [`append_log`] stored nothing: the session is not in `project`, or
/// it is in a final status (which no status leaves again).
async fn refused_append(c: &impl GenericClient, project: Uuid, session_id: Uuid) -> Error {
    let status = match STATUS.query_opt(c, &[&project, &session_id]).await {
        Ok(Some(row)) => row
            .try_get(0)
            .map_err(Error::from)
            .and_then(SessionStatus::from_db),
        Ok(None) => return not_found(session_id),
        Err(e) => return e,
    };
    match status {
        Ok(status) if status.is_final() => Error::FailedPrecondition(
            Reason::SessionNotAcceptingWrites,
            format!(
                "session {session_id} is {}; its log takes no more entries",
                status.as_str()
            ),
        ),
        // Not final, so the append's own check passed it: it was deleted
        // and is back under the same id, or the status check and this read
        // disagree. Either way nothing was stored; the caller may retry.
        Ok(_) => Error::Aborted(
            Reason::ConcurrentChange,
            format!("session {session_id} changed while the entry was appended; retry"),
        ),
        Err(e) => e,
    }
}

fn not_found(session_id: Uuid) -> Error {
    Error::NotFound(format!("session {session_id} not found"))
}

/// ListSessionLogs with `$extra` (a further predicate) in its WHERE.
macro_rules! list_logs_sql {
    ($extra:expr) => {
        concat!(
            "SELECT ",
            log_columns!(),
            " FROM session_logs \
             WHERE project_id = $5 AND session_id = $1 AND level = ANY($2) AND seq > $3",
            $extra,
            " ORDER BY seq LIMIT $4"
        )
    };
}

const LIST_LOGS: Stmt = Stmt::new("SELECT", "session_logs", list_logs_sql!(""));

/// ListSessionLogs with a full-text `query` (`$6`): a statement of its own,
/// so the plan of the list without one stays what it was.
const LIST_LOGS_SEARCH: Stmt = Stmt::new(
    "SELECT",
    "session_logs",
    list_logs_sql!(" AND search_vector @@ websearch_to_tsquery('simple', $6)"),
);

/// One page of the log of a session of `project` in sequence order, plus
/// one extra row when more follow (rows of `log_columns!()`).
pub async fn list_logs(c: &impl GenericClient, project: Uuid, q: &ListLogs) -> Result<Vec<Row>> {
    let levels: Vec<&str> = LogLevel::ALL
        .iter()
        .copied()
        .filter(|l| *l >= q.min_level)
        .map(LogLevel::as_str)
        .collect();
    let limit = q.page_size + 1;
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&q.session_id, &levels, &q.after_seq, &limit, &project];
    let rows = match &q.query {
        None => LIST_LOGS.query(c, params).await?,
        Some(query) => {
            let with_query: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().copied().chain([query as _]).collect();
            LIST_LOGS_SEARCH.query(c, &with_query).await?
        }
    };
    Ok(rows)
}

/// The total of ListSessionLogs: LIST_LOGS's filters, without paging.
const COUNT_LOGS: crate::totals::Counter = crate::counter!(
    "session_logs",
    "session_logs WHERE project_id = $1 AND session_id = $2 AND level = ANY($3) \
     AND ($4::text IS NULL OR search_vector @@ websearch_to_tsquery('simple', $4))"
);

/// How many log entries of the session pass `q`'s level filter.
pub async fn count_logs(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListLogs,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let levels = levels_from(q.min_level);
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
        &[&project, &q.session_id, &levels, &q.query];
    crate::totals::count(c, &COUNT_LOGS, params, mode, exact_below).await
}

/// The levels at or above `min`, as stored.
fn levels_from(min: LogLevel) -> Vec<&'static str> {
    LogLevel::ALL
        .iter()
        .copied()
        .filter(|l| *l >= min)
        .map(LogLevel::as_str)
        .collect()
}

const LOGS_AFTER: Stmt = Stmt::new(
    "SELECT",
    "session_logs",
    concat!(
        "SELECT ",
        log_columns!(),
        " FROM session_logs WHERE project_id = $4 AND session_id = $1 AND id > $2 \
         ORDER BY id LIMIT $3"
    ),
);

/// Log entries of the session `session_id` of `project` with a storage id
/// above `after_id`, in id order. Ids are taken before commit, so this is
/// complete only within one snapshot (as the export reads it); live
/// followers use [`logs_in_range`] by sequence.
pub async fn logs_after(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    after_id: i64,
    limit: i64,
) -> Result<Vec<LogEntry>> {
    LOGS_AFTER
        .query(c, &[&session_id, &after_id, &limit, &project])
        .await?
        .iter()
        .map(log_from_row)
        .collect()
}

const LOGS_IN_RANGE: Stmt = Stmt::new(
    "SELECT",
    "session_logs",
    concat!(
        "SELECT ",
        log_columns!(),
        " FROM session_logs WHERE project_id = $5 AND session_id = $1 \
         AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4"
    ),
);

/// Log entries of the session `session_id` of `project` with `after < seq
/// <= through`, in sequence order, at most `limit` of them (watch catch-up).
pub async fn logs_in_range(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    after: i64,
    through: i64,
    limit: i64,
) -> Result<Vec<LogEntry>> {
    LOGS_IN_RANGE
        .query(c, &[&session_id, &after, &through, &limit, &project])
        .await?
        .iter()
        .map(log_from_row)
        .collect()
}

const WATCH_POSITION: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    concat!(
        "SELECT ",
        session_columns!(),
        ", log_seq, state_log_seq FROM sessions WHERE project_id = $1 AND id = $2"
    ),
);

/// A session with the positions a watcher follows.
#[derive(Debug, Clone)]
pub struct WatchedSession {
    pub session: Session,
    /// The last log position handed out: every entry up to it is committed.
    pub log_seq: i64,
    /// The log position when the current state was committed: entries up to
    /// it came before the state, later ones after it.
    pub state_log_seq: i64,
}

/// The session `id` of `project` and its log positions, read in one
/// statement (one snapshot).
pub async fn watch_position(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
) -> Result<Option<WatchedSession>> {
    WATCH_POSITION
        .query_opt(c, &[&project, &id])
        .await?
        .map(|row| {
            Ok(WatchedSession {
                session: session_from_row(&row)?,
                log_seq: row.try_get("log_seq")?,
                state_log_seq: row.try_get("state_log_seq")?,
            })
        })
        .transpose()
}

const STATUS_FOR_SHARE: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT status FROM sessions WHERE project_id = $1 AND id = $2 FOR SHARE",
);

/// Checks, in the caller's transaction, that `project` has the session `id`
/// (NOT_FOUND otherwise, whether or not another project has it) and that it
/// still accepts results and findings (not FAILED or CANCELLED); holds a
/// share lock on it so it cannot move to such a status before the caller
/// commits.
pub async fn lock_accepting(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<()> {
    let row = STATUS_FOR_SHARE
        .query_opt(c, &[&project, &id])
        .await?
        .ok_or_else(|| Error::NotFound(format!("session {id} not found")))?;
    let status = SessionStatus::from_db(row.try_get(0)?)?;
    if matches!(status, SessionStatus::Failed | SessionStatus::Cancelled) {
        return Err(Error::FailedPrecondition(
            Reason::SessionNotAcceptingWrites,
            format!(
                "session {id} is {}; it accepts no more results or findings",
                status.as_str()
            ),
        ));
    }
    Ok(())
}
