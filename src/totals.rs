//! Totals of list calls: how many rows match a list's filters over every
//! page, counted exactly or estimated by the planner (request field
//! `count`, reply fields `total` and `total_mode`; `CountMode` in
//! common.proto).
//!
//! Each list declares one [`Counter`] next to its list statement with
//! [`counter!`](crate::counter): the `FROM … WHERE …` of its filters, written once, becomes
//! a `SELECT count(*)` (EXACT) and an `EXPLAIN (FORMAT JSON) SELECT 1`
//! (ESTIMATED) with the same bound parameters. Both are constant SQL. The
//! handler then makes one call, [`count`], with the mode the request asked
//! for (parsed by [`requested`]).
//!
//! ESTIMATED reads the top plan node's `Plan Rows` — the planner's estimate
//! of the rows the statement returns, with the call's parameter values
//! bound (an EXPLAIN over the extended protocol plans with the values, as
//! a custom plan). PostgREST's `count=estimated` does the same. Below
//! `VERDICT_COUNT_EXACT_BELOW` the estimate is replaced by an exact count,
//! and the reply says EXACT.

use crate::db::Stmt;
use crate::error::{Error, Result};
use crate::proto;
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;

/// How a list call asked to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No total (the default).
    None,
    /// `count(*)` with the list's filters.
    Exact,
    /// The planner's estimate, or exact when that is small.
    Estimated,
}

/// The mode of a request's `count` field; an unknown value is
/// INVALID_ARGUMENT with a violation of `count`.
pub fn requested(raw: i32) -> Result<Mode> {
    match proto::CountMode::try_from(raw) {
        Ok(proto::CountMode::Unspecified) => Ok(Mode::None),
        Ok(proto::CountMode::Exact) => Ok(Mode::Exact),
        Ok(proto::CountMode::Estimated) => Ok(Mode::Estimated),
        Err(_) => {
            let mut v = crate::validate::Validator::new();
            v.violation(
                "count",
                "must be COUNT_MODE_UNSPECIFIED (0, no total), COUNT_MODE_EXACT (1) or COUNT_MODE_ESTIMATED (2)",
            );
            v.finish()?;
            Err(Error::Internal("a refused count mode passed".into()))
        }
    }
}

/// The two statements that count one list's rows (see [`counter!`](crate::counter)).
#[derive(Debug, Clone, Copy)]
pub struct Counter {
    /// `SELECT count(*) FROM …`: one row, one bigint.
    pub exact: Stmt,
    /// `EXPLAIN (FORMAT JSON) SELECT 1 FROM …`: one row, the plan.
    pub estimate: Stmt,
}

/// A [`Counter`] over `FROM <from_where>` of table `$table`: write the
/// list's filters once, without paging (no keyset position, no LIMIT),
/// numbering its parameters `$1…` as the values passed to [`count`].
#[macro_export]
macro_rules! counter {
    ($table:literal, $($from_where:tt)+) => {
        $crate::totals::Counter {
            exact: $crate::db::Stmt::new(
                "SELECT",
                $table,
                concat!("SELECT count(*) AS total FROM ", $($from_where)+),
            ),
            estimate: $crate::db::Stmt::new(
                "EXPLAIN",
                $table,
                concat!("EXPLAIN (FORMAT JSON) SELECT 1 FROM ", $($from_where)+),
            ),
        }
    };
}

/// A list's total as the reply carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Total {
    /// The number of rows (0 when not asked).
    pub total: i64,
    /// How it was obtained.
    pub mode: Mode,
}

impl Total {
    /// The reply's `total` and `total_mode` fields.
    pub fn wire(self) -> (i64, i32) {
        let mode = match self.mode {
            Mode::None => proto::CountMode::Unspecified,
            Mode::Exact => proto::CountMode::Exact,
            Mode::Estimated => proto::CountMode::Estimated,
        };
        (self.total, mode as i32)
    }
}

/// Counts the rows `counter` matches with `params` as `mode` asks;
/// ESTIMATED falls back to EXACT when the estimate is below `exact_below`.
/// NONE sends nothing to the database.
pub async fn count(
    c: &impl GenericClient,
    counter: &Counter,
    params: &[&(dyn ToSql + Sync)],
    mode: Mode,
    exact_below: i64,
) -> Result<Total> {
    match mode {
        Mode::None => Ok(Total {
            total: 0,
            mode: Mode::None,
        }),
        Mode::Exact => exact(c, counter, params).await,
        Mode::Estimated => {
            let estimated = estimate(c, counter, params).await?;
            if estimated < exact_below {
                exact(c, counter, params).await
            } else {
                Ok(Total {
                    total: estimated,
                    mode: Mode::Estimated,
                })
            }
        }
    }
}

async fn exact(
    c: &impl GenericClient,
    counter: &Counter,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Total> {
    let row = counter.exact.query_one(c, params).await?;
    Ok(Total {
        total: row.try_get("total")?,
        mode: Mode::Exact,
    })
}

/// The planner's estimate of the rows `counter` matches.
async fn estimate(
    c: &impl GenericClient,
    counter: &Counter,
    params: &[&(dyn ToSql + Sync)],
) -> Result<i64> {
    let row = counter.estimate.query_one(c, params).await?;
    let plan: serde_json::Value = row.try_get(0)?;
    plan_rows(&plan).ok_or_else(|| Error::Internal("EXPLAIN returned no Plan Rows".into()))
}

/// `Plan Rows` of the top node of an `EXPLAIN (FORMAT JSON)` document.
fn plan_rows(plan: &serde_json::Value) -> Option<i64> {
    let rows = plan.get(0)?.get("Plan")?.get("Plan Rows")?.as_f64()?;
    Some(rows.max(0.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_rows_reads_the_top_node() {
        let plan = serde_json::json!([{"Plan": {"Node Type": "Gather", "Plan Rows": 999_312.0,
            "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 416_380}]}}]);
        assert_eq!(plan_rows(&plan), Some(999_312));
        assert_eq!(plan_rows(&serde_json::json!([{}])), None);
    }

    #[test]
    fn unknown_modes_are_refused() {
        assert_eq!(requested(0).unwrap(), Mode::None);
        assert_eq!(requested(2).unwrap(), Mode::Estimated);
        assert!(matches!(requested(3), Err(Error::InvalidArgument(..))));
        assert!(matches!(requested(-1), Err(Error::InvalidArgument(..))));
    }
}
