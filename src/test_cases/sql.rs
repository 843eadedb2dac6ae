//! The SQL of test cases.

use super::{ListTestCases, NewTestCase, TestCase, TestCaseRef, TestCaseUpdate, TestType};
use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

macro_rules! test_case_columns {
    () => {
        "id, key, name, description, test_type, target_subsystem, required_hardware, tags, \
         version, created_at, updated_at"
    };
}

fn from_row(row: &Row) -> Result<TestCase> {
    Ok(TestCase {
        id: row.try_get("id")?,
        key: row.try_get("key")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        test_type: TestType::from_db(row.try_get("test_type")?)?,
        target_subsystem: row.try_get("target_subsystem")?,
        required_hardware: row.try_get("required_hardware")?,
        tags: row.try_get("tags")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn one(row: Option<Row>) -> Result<Option<TestCase>> {
    row.as_ref().map(from_row).transpose()
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "test_cases",
    concat!(
        "INSERT INTO test_cases (project_id, id, key, name, description, test_type, \
         target_subsystem, required_hardware, tags, content_digest) \
         VALUES ($10, $1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (project_id, key) DO NOTHING RETURNING ",
        test_case_columns!()
    ),
);

/// Inserts a test case in `project` unless its key is taken there; `None`
/// when it is. `digest` is the canonical digest of `t`, kept to decide
/// replays.
pub async fn insert(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    t: &NewTestCase,
    digest: &[u8],
) -> Result<Option<TestCase>> {
    let f = &t.fields;
    one(INSERT
        .query_opt(
            c,
            &[
                &id,
                &t.key,
                &f.name,
                &f.description,
                &f.test_type.as_str(),
                &f.target_subsystem,
                &f.required_hardware,
                &f.tags,
                &digest,
                &project,
            ],
        )
        .await?)
}

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    concat!(
        "SELECT ",
        test_case_columns!(),
        " FROM test_cases WHERE project_id = $1 AND id = $2"
    ),
);

const BY_KEY: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    concat!(
        "SELECT ",
        test_case_columns!(),
        " FROM test_cases WHERE project_id = $1 AND key = $2"
    ),
);

/// A test case of `project` by id or key (`None` for one of another project).
pub async fn get(
    c: &impl GenericClient,
    project: Uuid,
    r: &TestCaseRef,
) -> Result<Option<TestCase>> {
    match r {
        TestCaseRef::Id(id) => one(BY_ID.query_opt(c, &[&project, id]).await?),
        TestCaseRef::Key(key) => one(BY_KEY.query_opt(c, &[&project, key]).await?),
    }
}

const BY_KEY_FOR_REPLAY: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    concat!(
        "SELECT ",
        test_case_columns!(),
        ", content_digest FROM test_cases WHERE project_id = $1 AND key = $2"
    ),
);

/// The test case holding `key` in `project` and the digest of the content
/// that created it (`None` for one created before V11), to decide a
/// CreateTestCase replay.
pub async fn get_for_replay(
    c: &impl GenericClient,
    project: Uuid,
    key: &str,
) -> Result<Option<(TestCase, Option<Vec<u8>>)>> {
    BY_KEY_FOR_REPLAY
        .query_opt(c, &[&project, &key])
        .await?
        .map(|row| Ok((from_row(&row)?, row.try_get("content_digest")?)))
        .transpose()
}

const BY_ID_FOR_UPDATE: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    concat!(
        "SELECT ",
        test_case_columns!(),
        " FROM test_cases WHERE project_id = $1 AND id = $2 FOR UPDATE"
    ),
);

/// Reads a test case of `project` and locks it until the transaction ends.
/// The lock waits for transactions still inserting executions of it (they
/// hold a key-share lock through the foreign key), so what follows sees
/// them.
pub async fn get_for_update(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
) -> Result<Option<TestCase>> {
    one(BY_ID_FOR_UPDATE.query_opt(c, &[&project, &id]).await?)
}

/// ListTestCases with `$extra` (a further predicate) in its WHERE.
macro_rules! list_sql {
    ($extra:expr) => {
        concat!(
            "SELECT ",
            test_case_columns!(),
            " FROM test_cases \
             WHERE project_id = $7 \
               AND ($1::text[] IS NULL OR test_type = ANY($1)) \
               AND ($2::text IS NULL OR target_subsystem = $2) \
               AND ($3::text IS NULL OR tags @> ARRAY[$3::text]) \
               AND ($4::text IS NULL OR starts_with(name, $4)) \
               AND ($5::text IS NULL OR key > $5)",
            $extra,
            " ORDER BY key LIMIT $6"
        )
    };
}

const LIST: Stmt = Stmt::new("SELECT", "test_cases", list_sql!(""));

/// ListTestCases with a full-text `query` (`$8`) over names and
/// descriptions: a statement of its own, so the plan of the list without
/// one stays what it was.
const LIST_SEARCH: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    list_sql!(" AND search_vector @@ websearch_to_tsquery('simple', $8)"),
);

/// The total of ListTestCases: LIST's filters, without paging.
const COUNT: crate::totals::Counter = crate::counter!(
    "test_cases",
    "test_cases \
     WHERE project_id = $1 \
       AND ($2::text[] IS NULL OR test_type = ANY($2)) \
       AND ($3::text IS NULL OR target_subsystem = $3) \
       AND ($4::text IS NULL OR tags @> ARRAY[$4::text]) \
       AND ($5::text IS NULL OR starts_with(name, $5)) \
       AND ($6::text IS NULL OR search_vector @@ websearch_to_tsquery('simple', $6))"
);

/// How many test cases of `project` pass `f`, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    f: &super::TestCaseFilter,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let types: Option<Vec<&str>> =
        (!f.test_types.is_empty()).then(|| f.test_types.iter().map(|t| t.as_str()).collect());
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &types,
        &f.target_subsystem,
        &f.tag,
        &f.name_prefix,
        &f.query,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

/// One page of the test cases of `project` in key order, plus one extra row
/// when more follow.
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListTestCases,
) -> Result<Vec<TestCase>> {
    let f = &q.filter;
    let types: Option<Vec<&str>> =
        (!f.test_types.is_empty()).then(|| f.test_types.iter().map(|t| t.as_str()).collect());
    let limit = q.page_size + 1;
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &types,
        &f.target_subsystem,
        &f.tag,
        &f.name_prefix,
        &q.after,
        &limit,
        &project,
    ];
    let rows = match &f.query {
        None => LIST.query(c, &params).await?,
        Some(query) => {
            params.push(query);
            LIST_SEARCH.query(c, &params).await?
        }
    };
    rows.iter().map(from_row).collect()
}

const UPDATE: Stmt = Stmt::new(
    "UPDATE",
    "test_cases",
    concat!(
        "UPDATE test_cases SET name = COALESCE($2, name), \
           description = COALESCE($3, description), \
           test_type = COALESCE($4, test_type), \
           target_subsystem = COALESCE($5, target_subsystem), \
           required_hardware = COALESCE($6, required_hardware), \
           tags = COALESCE($7, tags), \
           version = version + 1, updated_at = now() \
         WHERE project_id = $8 AND id = $1 RETURNING ",
        test_case_columns!()
    ),
);

/// Applies the fields an update names (the others are NULL and kept) to a
/// test case of `project` (the caller has locked it with
/// [`get_for_update`]).
pub async fn update(c: &impl GenericClient, project: Uuid, u: &TestCaseUpdate) -> Result<TestCase> {
    from_row(
        &UPDATE
            .query_one(
                c,
                &[
                    &u.id,
                    &u.name,
                    &u.description,
                    &u.test_type.map(|t| t.as_str()),
                    &u.target_subsystem,
                    &u.required_hardware,
                    &u.tags,
                    &project,
                ],
            )
            .await?,
    )
}

const HAS_EXECUTIONS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT EXISTS (SELECT 1 FROM test_executions WHERE project_id = $1 AND test_case_id = $2)",
);

/// Whether the test case `id` of `project` has executions.
pub async fn has_executions(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<bool> {
    Ok(HAS_EXECUTIONS
        .query_one(c, &[&project, &id])
        .await?
        .try_get(0)?)
}

const DELETE_EXECUTIONS: Stmt = Stmt::new(
    "DELETE",
    "test_executions",
    "DELETE FROM test_executions WHERE project_id = $1 AND test_case_id = $2",
);

/// Deletes the executions of the test case `id` of `project`.
pub async fn delete_executions(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<u64> {
    DELETE_EXECUTIONS.execute(c, &[&project, &id]).await
}

const DELETE: Stmt = Stmt::new(
    "DELETE",
    "test_cases",
    "DELETE FROM test_cases WHERE project_id = $1 AND id = $2",
);

/// Deletes the test case `id` of `project`.
pub async fn delete(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<u64> {
    DELETE.execute(c, &[&project, &id]).await
}
