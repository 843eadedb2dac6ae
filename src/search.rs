//! The full-text `query` filter of ListExecutions (error messages),
//! ListDiscrepancies (descriptions), ListSessionLogs (messages) and
//! ListTestCases (names and descriptions): PostgreSQL's own text search
//! over a stored `tsvector` column with a GIN index (migrations/V22), with
//! the 'simple' configuration on both sides. Results stay in each list's
//! order (not ranked), so paging works as without a query; the query is
//! bound into the page token like every other filter.

use crate::validate::Validator;

/// Longest `query` filter, in characters.
pub const MAX_QUERY: usize = 200;

/// A full-text `query` filter (ListExecutions, ListDiscrepancies,
/// ListSessionLogs, ListTestCases): at most [`MAX_QUERY`] characters, no
/// control characters but tabs and newlines; `None` (no filter) when empty
/// or only whitespace. It is trimmed, and goes to PostgreSQL as a parameter
/// of `websearch_to_tsquery('simple', $n)`, which accepts any text (quotes,
/// `-`, `or`; every other punctuation separates words), so no text can make
/// the statement fail.
pub fn validate(v: &mut Validator, field: &str, raw: &str) -> Option<String> {
    if raw.chars().count() > MAX_QUERY {
        v.violation(field, format!("must be at most {MAX_QUERY} characters"));
        return None;
    }
    if raw
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        v.violation(field, "must not contain control characters");
        return None;
    }
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}
