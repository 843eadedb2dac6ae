//! Statements that trace themselves: every statement runs in a client span
//! named after its operation and table, carrying the SQL text with its
//! placeholders (never the values) and the number of rows.

use crate::error::Result;
use deadpool_postgres::GenericClient;
use futures::TryStreamExt;
use std::future::Future;
use std::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tracing::{Instrument, Span, field::Empty};

/// A static SQL statement with the names its span carries.
#[derive(Debug, Clone, Copy)]
pub struct Stmt {
    /// `db.operation.name`, e.g. `SELECT`.
    pub op: &'static str,
    /// The main table (`db.collection.name` when it is one of
    /// [`COLLECTIONS`]), or what the statement works on.
    pub table: &'static str,
    /// The SQL text, with `$n` placeholders.
    pub sql: &'static str,
}

/// The tables of the schema (`migrations/`): the statement names that are
/// collections. Anything else a [`Stmt`] names (a function, a lock) is not.
const COLLECTIONS: &[&str] = &[
    "api_keys",
    "audit_events",
    "coverage_files",
    "coverage_reports",
    "discrepancies",
    "discrepancy_resolutions",
    "execution_triage",
    "failure_signature_triage",
    "fingerprint_rules",
    "gateway_secrets",
    "ingest_batches",
    "ingest_marks",
    "metric_points",
    "metric_rollups",
    "projects",
    "results",
    "rollup_watermarks",
    "session_logs",
    "sessions",
    "test_cases",
    "test_executions",
    "test_runs",
    "triage_history",
    "pg_stat_user_tables",
];

/// The span field of the rows a query returned.
const RETURNED: &str = "db.response.returned_rows";

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Stmt {
    pub const fn new(op: &'static str, table: &'static str, sql: &'static str) -> Self {
        Stmt { op, table, sql }
    }

    /// `db.collection.name`: the table, when it is one (functions such as
    /// `advisory_lock` or `generate_series` are not collections).
    pub fn collection(&self) -> Option<&'static str> {
        COLLECTIONS.contains(&self.table).then_some(self.table)
    }

    /// The span of one execution of this statement; `COPY` code that drives
    /// the protocol itself instruments its work with it. Attributes follow
    /// the database client conventions (semconv 1.33+, stable).
    fn span(&self) -> Span {
        let span = tracing::info_span!(
            "db.statement",
            otel.name = %format_args!("{} {}", self.op, self.table),
            otel.kind = "client",
            otel.status_code = Empty,
            db.system.name = "postgresql",
            db.namespace = Empty,
            server.address = Empty,
            server.port = Empty,
            db.operation.name = self.op,
            db.collection.name = self.collection(),
            db.query.summary = %format_args!("{} {}", self.op, self.table),
            db.query.text = self.sql,
            db.response.returned_rows = Empty,
            db.response.affected_rows = Empty,
            db.response.status_code = Empty,
            error.type = Empty,
        );
        if let Some(target) = crate::observability::database()
            && !span.is_disabled()
        {
            span.record("db.namespace", target.namespace.as_str());
            span.record("server.address", target.address.as_str());
            span.record("server.port", target.port);
        }
        span
    }

    /// Records the statement's duration and outcome in the metrics.
    fn measure(&self, started: Instant, error: Option<&tokio_postgres::Error>) {
        let error = error.map(|e| e.code().map_or("_OTHER", |c| c.code()));
        crate::observability::statement_finished(
            self.op,
            self.collection(),
            error,
            started.elapsed(),
        );
    }

    /// Runs `copy` — code driving this `COPY` statement's protocol itself —
    /// in the statement's span, recording the rows copied or the failure.
    pub async fn traced_copy(
        &self,
        copy: impl Future<Output = Result<u64, tokio_postgres::Error>>,
    ) -> Result<u64> {
        let span = self.span();
        let started = Instant::now();
        let copied = copy.instrument(span.clone()).await;
        self.measure(started, copied.as_ref().err());
        match copied {
            Ok(n) => {
                Self::record_copied(&span, n);
                Ok(n)
            }
            Err(e) => {
                Self::fail(&span, &e);
                Err(e.into())
            }
        }
    }

    /// Records rows written by a `COPY` on its span.
    fn record_copied(span: &Span, rows: u64) {
        span.record("db.response.affected_rows", rows as i64);
    }

    /// Marks a span failed with the statement's SQLSTATE (`error.type` is
    /// the SQLSTATE too, or `_OTHER` for a failure without one).
    fn fail(span: &Span, e: &tokio_postgres::Error) {
        span.record("otel.status_code", "ERROR");
        match e.code() {
            Some(code) => {
                span.record("db.response.status_code", code.code());
                span.record("error.type", code.code());
            }
            None => {
                span.record("error.type", "_OTHER");
            }
        }
    }

    /// Runs `run` (this statement's preparation and execution) in the
    /// statement's span, recording its duration and outcome and, on
    /// success, `rows(&out)` in the span's `field` (the rows it returned,
    /// or those it affected).
    async fn traced<T>(
        &self,
        run: impl Future<Output = Result<T, tokio_postgres::Error>>,
        field: &'static str,
        rows: impl FnOnce(&T) -> u64,
    ) -> Result<T> {
        let span = self.span();
        async {
            let started = Instant::now();
            let ran = super::driven::flushed(run).await;
            self.measure(started, ran.as_ref().err());
            match ran {
                Ok(out) => {
                    Span::current().record(field, rows(&out) as i64);
                    Ok(out)
                }
                Err(e) => {
                    Self::fail(&Span::current(), &e);
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Runs a query and returns every row.
    pub async fn query(&self, c: &impl GenericClient, params: Params<'_>) -> Result<Vec<Row>> {
        self.traced(
            async {
                let stmt = c.prepare_cached(self.sql).await?;
                c.query(&stmt, params).await
            },
            RETURNED,
            |rows| rows.len() as u64,
        )
        .await
    }

    /// Runs a query expected to return at most one row. The rows are read
    /// off the stream as they come, not gathered first: a second one is an
    /// error.
    pub async fn query_opt(
        &self,
        c: &impl GenericClient,
        params: Params<'_>,
    ) -> Result<Option<Row>> {
        let (first, more) = self
            .traced(
                async {
                    let stmt = c.prepare_cached(self.sql).await?;
                    let rows = c
                        .query_raw(&stmt, params.iter().map(|p| *p as &dyn ToSql))
                        .await?;
                    let mut rows = std::pin::pin!(rows);
                    let first = rows.try_next().await?;
                    let mut more = 0usize;
                    if first.is_some() {
                        while rows.try_next().await?.is_some() {
                            more += 1;
                        }
                    }
                    Ok((first, more))
                },
                RETURNED,
                |(first, more)| u64::from(first.is_some()) + *more as u64,
            )
            .await?;
        if more > 0 {
            return Err(crate::error::Error::Internal(format!(
                "{} {} returned {} rows where at most one was expected",
                self.op,
                self.table,
                more + 1
            )));
        }
        Ok(first)
    }

    /// Runs a query expected to return exactly one row.
    pub async fn query_one(&self, c: &impl GenericClient, params: Params<'_>) -> Result<Row> {
        self.query_opt(c, params).await?.ok_or_else(|| {
            crate::error::Error::Internal(format!("{} {} returned no row", self.op, self.table))
        })
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute(&self, c: &impl GenericClient, params: Params<'_>) -> Result<u64> {
        self.traced(
            async {
                let stmt = c.prepare_cached(self.sql).await?;
                c.execute(&stmt, params).await
            },
            "db.response.affected_rows",
            |n| *n,
        )
        .await
    }
}
