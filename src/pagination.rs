//! Opaque keyset page tokens, bound to the filter they were issued for and
//! signed so they cannot be forged or altered.
//!
//! A token is `<payload>.<mac>`: base64url of a small JSON document (a
//! format version, a fingerprint of the list and its filters, the sort key
//! of the last row returned) and base64url of its HMAC-SHA256 (first 16
//! bytes). A token presented with other filters (or to another list) is
//! refused, so a client can never silently skip or repeat rows; one whose
//! bytes were changed, or that was made up, fails the MAC.
//!
//! The signing key belongs to the gateway serving the call: the server
//! layer runs every call inside [`scoped`], so the areas' conversions
//! call [`encode`] and [`decode`] without passing it around.

use crate::error::{Error, Reason, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use tokio::task::futures::TaskLocalFuture;

const VERSION: u8 = 2;
/// Tokens are small; anything much longer is not one of ours.
const MAX_TOKEN_LEN: usize = 1024;
/// Bytes of the HMAC kept in a token.
const MAC_LEN: usize = 16;

/// The page-token signing key of one gateway, set once when known: at
/// build from `VERDICT_PAGE_TOKEN_SECRET`, else after migrations from the
/// database's shared secret.
#[derive(Clone, Default)]
pub struct Signer(Arc<OnceLock<[u8; 32]>>);

impl Signer {
    pub fn new() -> Self {
        Signer::default()
    }

    /// Sets the key from secret material (a configured string or the
    /// database's random bytes). Later calls are ignored.
    pub fn set(&self, secret: &[u8]) {
        let mut h = Sha256::new();
        h.update(b"verdict page tokens v2\0");
        h.update(secret);
        let _ = self.0.set(h.finalize().into());
    }

    pub fn is_set(&self) -> bool {
        self.0.get().is_some()
    }

    fn mac(&self, payload: &[u8]) -> Option<Hmac<Sha256>> {
        let key = self.0.get()?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
        mac.update(payload);
        Some(mac)
    }
}

tokio::task_local! {
    static SIGNER: Signer;
    static PROJECT: uuid::Uuid;
}

/// A call's future running in its project with the gateway's page-token
/// key current (what [`scoped`] makes): a named type, so a layer can return
/// it without a box.
pub type Scoped<F> = TaskLocalFuture<uuid::Uuid, TaskLocalFuture<Signer, F>>;

/// Runs `f` (a call) in the project `project`, with `signer` as the key of
/// its page tokens: every token issued or accepted inside is bound to the
/// project, as to the list's filters, so a token of one project's list is
/// refused in another's.
pub fn scoped<F: Future>(project: uuid::Uuid, signer: Signer, f: F) -> Scoped<F> {
    PROJECT.scope(project, SIGNER.scope(signer, f))
}

/// Runs `f` synchronously with `signer` (tests and tools).
pub fn with_signer_sync<R>(signer: Signer, f: impl FnOnce() -> R) -> R {
    SIGNER.sync_scope(signer, f)
}

fn current_signer() -> Option<Signer> {
    SIGNER.try_with(Clone::clone).ok().filter(Signer::is_set)
}

#[derive(Serialize, Deserialize)]
struct Token<K> {
    v: u8,
    f: String,
    k: K,
}

/// A fingerprint of one list (`scope`, e.g. `sessions`) with its filters,
/// in the call's project (see [`scoped`]).
pub fn fingerprint(scope: &str, filter: &impl Serialize) -> String {
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    if let Ok(project) = PROJECT.try_with(|p| *p) {
        h.update(project.as_bytes());
    }
    h.update(serde_json::to_vec(filter).unwrap_or_default());
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The token for the page after the row whose sort key is `key`. Outside
/// a call (no signer) the token is unsigned and no gateway accepts it.
pub fn encode<K: Serialize>(fingerprint: &str, key: &K) -> String {
    let token = Token {
        v: VERSION,
        f: fingerprint.to_owned(),
        k: key,
    };
    let payload = serde_json::to_vec(&token).unwrap_or_default();
    let mac = current_signer()
        .and_then(|s| s.mac(&payload))
        .map(|m| m.finalize().into_bytes()[..MAC_LEN].to_vec())
        .unwrap_or_default();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(mac)
    )
}

/// A refused page token: INVALID_ARGUMENT, reason INVALID_PAGE_TOKEN, with
/// a violation of `field`.
fn token_error(field: &str, description: &str) -> Error {
    Error::InvalidPageToken(crate::error::FieldViolation::new(field, description))
}

/// The sort key a token resumes after; `None` for an empty token (first page).
pub fn decode<K: DeserializeOwned>(
    field: &str,
    token: &str,
    fingerprint: &str,
) -> Result<Option<K>> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed = || token_error(field, "is not a page token issued by this list");
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed());
    }
    let (payload, mac) = token.split_once('.').ok_or_else(malformed)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| malformed())?;
    let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| malformed())?;
    let signer = current_signer().ok_or_else(|| {
        Error::Unavailable(
            Reason::DatabaseUnavailable,
            "the page-token key is not loaded yet (database not ready)".into(),
        )
    })?;
    let expected = signer
        .mac(&payload)
        .ok_or_else(|| Error::Internal("page-token key unusable".into()))?;
    // Constant time: a forger learns nothing from how long the check took.
    if mac.len() != MAC_LEN || expected.verify_truncated_left(&mac).is_err() {
        return Err(malformed());
    }
    let parsed: Token<K> = serde_json::from_slice(&payload).map_err(|_| malformed())?;
    if parsed.v != VERSION {
        return Err(malformed());
    }
    if parsed.f != fingerprint {
        return Err(token_error(
            field,
            "was issued for a different list, filter or view; repeat the list, filters and view of the call that returned it, or start again without a token",
        ));
    }
    Ok(Some(parsed.k))
}

/// A newest-first keyset position, (created_at in microseconds, id), as
/// the two SQL parameters of a `(created_at, id) < ($n, $m)` predicate.
pub fn time_key(
    key: Option<(i64, uuid::Uuid)>,
) -> Result<(Option<chrono::DateTime<chrono::Utc>>, Option<uuid::Uuid>)> {
    match key {
        Some((micros, id)) => Ok((
            Some(
                chrono::DateTime::from_timestamp_micros(micros).ok_or_else(|| {
                    token_error("page_token", "is not a page token issued by this list")
                })?,
            ),
            Some(id),
        )),
        None => Ok((None, None)),
    }
}

/// Which fields a list returns: every field, or all but the large ones
/// (each list's proto view enum says which). The wire enums
/// (`ResultView`, `ExecutionView`, `SessionView`) share one numbering:
/// 0 UNSPECIFIED (= FULL, what clients written before views get), 1 BASIC,
/// 2 FULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Basic,
    Full,
}

impl View {
    /// The view of a request's `field`; an unknown value is a violation.
    pub fn from_wire(v: &mut crate::validate::Validator, field: &str, raw: i32) -> View {
        match raw {
            0 | 2 => View::Full,
            1 => View::Basic,
            _ => {
                v.violation(field, "must be UNSPECIFIED (0), BASIC (1) or FULL (2)");
                View::Full
            }
        }
    }

    /// The page-token scope of list `scope` in this view: a token is bound
    /// to its view like to a filter. FULL keeps the bare scope, so tokens
    /// issued before views existed stay valid.
    pub fn scope(self, scope: &str) -> String {
        match self {
            View::Full => scope.to_owned(),
            View::Basic => format!("{scope}/basic"),
        }
    }
}

/// The rows a list query fetched, in list order: normally `page_size + 1`
/// (one past the page tells that more follow). A query that bounds its
/// rows by bytes too (large rows) sets `cut` when it left rows out, so the
/// page ends with a token even when every row fetched fits.
pub struct Fetched<R> {
    pub rows: Vec<R>,
    pub cut: bool,
}

impl<R> From<Vec<R>> for Fetched<R> {
    fn from(rows: Vec<R>) -> Self {
        Fetched { rows, cut: false }
    }
}

/// Runs one page of a list in the view asked for. FULL runs `full`, whose
/// last parameter is the reply's byte budget: it stops reading rows once
/// their large columns reach it and reports in `batch_rows` how many rows
/// it saw, so a page it cut ends with a token. BASIC runs `basic`, which
/// never reads the large columns, with every parameter but that budget.
pub async fn fetch_view<R>(
    c: &impl deadpool_postgres::GenericClient,
    view: View,
    full: &crate::db::Stmt,
    basic: &crate::db::Stmt,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    convert: impl Fn(&tokio_postgres::Row) -> Result<R>,
) -> Result<Fetched<R>> {
    let Fetched { rows, cut } = fetch_rows(c, view, full, basic, params).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        items.push(convert(row)?);
    }
    Ok(Fetched { rows: items, cut })
}

/// [`fetch_view`], keeping the rows as read.
pub async fn fetch_rows(
    c: &impl deadpool_postgres::GenericClient,
    view: View,
    full: &crate::db::Stmt,
    basic: &crate::db::Stmt,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Fetched<tokio_postgres::Row>> {
    let (rows, cut) = match view {
        View::Full => {
            let rows = full.query(c, params).await?;
            let seen: i64 = match rows.first() {
                Some(row) => row.try_get("batch_rows")?,
                None => 0,
            };
            let cut = (rows.len() as i64) < seen;
            (rows, cut)
        }
        View::Basic => (basic.query(c, &params[..params.len() - 1]).await?, false),
    };
    Ok(Fetched { rows, cut })
}

/// Bytes of a list reply's `total` (int64, field 30: two-byte tag and at
/// most ten bytes of varint) and `total_mode` (enum, field 31: two-byte tag
/// and one byte), see [`crate::totals`].
pub const TOTALS_RESERVE: usize = (2 + 10) + (2 + 1);

/// Bytes of a list reply kept free for its `next_page_token` field (tag,
/// length and a token of at most [`MAX_TOKEN_LEN`] bytes) and its totals.
pub const TOKEN_RESERVE: usize = 1 + 2 + MAX_TOKEN_LEN + TOTALS_RESERVE;

/// Bytes one item adds to a list reply: every list reply is
/// `{ repeated Item items = 1; string next_page_token = 2; }`, so an item
/// costs its own encoding plus a one-byte tag and its length prefix.
pub fn item_cost(encoded_len: usize) -> usize {
    1 + prost::length_delimiter_len(encoded_len) + encoded_len
}

/// The page to return from `rows` (fetched in list order, normally
/// `page_size + 1` of them) and the token of the next page, empty when this
/// page is the last.
///
/// A page stops at whichever comes first: `page_size` items, or the item
/// that would take the encoded reply past `reply_limit` bytes less
/// [`TOKEN_RESERVE`] (the gateway's `max_message_bytes`; tonic refuses to
/// send a larger reply). Either way the token resumes right after the last
/// item returned, so paging on returns every row exactly once. `key` gives
/// the sort key of a row, `convert` its reply item; each item is measured
/// with [`prost::Message::encoded_len`].
///
/// The first item is always returned, even when it alone is over the
/// budget, so a list always moves on. It fits a reply whenever it fits with
/// its token: a row was accepted in a request of at most the same limit,
/// and a reply adds only ids, timestamps and the token (a few hundred
/// bytes). Only a row that cannot be sent at all — stored while the limit
/// was higher, or recorded within those few hundred bytes of it — fails the
/// call, RESOURCE_EXHAUSTED (`MESSAGE_TOO_LARGE`), rather than being
/// skipped silently; a BASIC view, where the list has one, gets past it.
pub fn page<R, T, K>(
    rows: impl Into<Fetched<R>>,
    page_size: i64,
    reply_limit: usize,
    fingerprint: &str,
    key: impl Fn(&R) -> K,
    mut convert: impl FnMut(R) -> T,
) -> Result<(Vec<T>, String)>
where
    T: prost::Message,
    K: Serialize,
{
    let rows = rows.into();
    let mut items = Vec::with_capacity(rows.rows.len().min(page_size.max(0) as usize));
    let token = page_with(
        rows,
        page_size,
        reply_limit,
        fingerprint,
        |r| Ok(key(r)),
        |row, room| {
            let item = convert(row);
            let cost = item_cost(item.encoded_len());
            if room.is_some_and(|room| cost > room) {
                return Ok(None);
            }
            items.push(item);
            Ok(Some(cost))
        },
    )?;
    Ok((items, token))
}

/// [`page`] for a list whose reply items are written straight from their
/// rows: `encode` appends a row's item, as the reply's field 1 (tag, length
/// and message), to the bytes returned. Those bytes go in the reply
/// message's pre-encoded items (e.g. `sessions::encode::ListSessionsResponse`).
pub fn page_encoded<K: Serialize>(
    rows: Fetched<tokio_postgres::Row>,
    page_size: i64,
    reply_limit: usize,
    fingerprint: &str,
    key: impl Fn(&tokio_postgres::Row) -> Result<K>,
    encode: impl Fn(&tokio_postgres::Row, &mut Vec<u8>) -> Result<()>,
) -> Result<(Vec<u8>, String)> {
    // A few hundred bytes per item is the common case; larger ones grow it.
    let mut out = Vec::with_capacity((rows.rows.len() * 512).min(reply_limit));
    let token = page_with(
        rows,
        page_size,
        reply_limit,
        fingerprint,
        key,
        |row, room| {
            let start = out.len();
            encode(&row, &mut out)?;
            let cost = out.len() - start;
            if room.is_some_and(|room| cost > room) {
                out.truncate(start);
                return Ok(None);
            }
            Ok(Some(cost))
        },
    )?;
    Ok((out, token))
}

/// What [`page`] and [`page_encoded`] share: walks `rows`, offering each to
/// `add` with the bytes still free in the reply (`None` for the first item,
/// which always goes in). `add` takes the item and returns its cost in
/// bytes, or returns `None` and takes nothing when it would not fit. The
/// token of the next page is returned.
fn page_with<R, K: Serialize>(
    rows: Fetched<R>,
    page_size: i64,
    reply_limit: usize,
    fingerprint: &str,
    key: impl Fn(&R) -> Result<K>,
    mut add: impl FnMut(R, Option<usize>) -> Result<Option<usize>>,
) -> Result<String> {
    let Fetched { rows, cut } = rows;
    let budget = reply_limit.saturating_sub(TOKEN_RESERVE);
    let mut count = 0i64;
    let mut used = 0usize;
    let mut last_key = None;
    // Rows the query itself left out follow the last one fetched.
    let mut more = cut;
    for row in rows {
        if count >= page_size {
            more = true;
            break;
        }
        let row_key = key(&row)?;
        let room = (count > 0).then(|| budget.saturating_sub(used));
        match add(row, room)? {
            Some(cost) => {
                used += cost;
                count += 1;
                last_key = Some(row_key);
            }
            None => {
                more = true;
                break;
            }
        }
    }
    let token = match (more, last_key) {
        (true, Some(k)) => encode(fingerprint, &k),
        _ => String::new(),
    };
    let token_cost = if token.is_empty() {
        0
    } else {
        item_cost(token.len())
    };
    if used + token_cost + TOTALS_RESERVE > reply_limit {
        return Err(Error::ResourceExhausted(
            Reason::MessageTooLarge,
            format!(
                "the next item of this list encodes to {used} bytes, more than the gateway's \
                 {reply_limit}-byte reply limit; read it with a view that leaves large fields \
                 out where the list has one, or raise VERDICT_MAX_MESSAGE_BYTES"
            ),
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(secret: &str) -> Signer {
        let s = Signer::new();
        s.set(secret.as_bytes());
        s
    }

    #[test]
    fn a_token_round_trips_with_its_filter() {
        with_signer_sync(signer("s"), || {
            let f = fingerprint("sessions", &("pending", 3));
            let t = encode(&f, &(17_i64, "x".to_string()));
            let k: Option<(i64, String)> = decode("page_token", &t, &f).unwrap();
            assert_eq!(k, Some((17, "x".into())));
        });
    }

    #[test]
    fn a_token_from_another_filter_is_refused() {
        with_signer_sync(signer("s"), || {
            let t = encode(&fingerprint("sessions", &"a"), &1_i64);
            let err = decode::<i64>("page_token", &t, &fingerprint("sessions", &"b")).unwrap_err();
            assert!(matches!(err, Error::InvalidPageToken(_)));
        });
    }

    #[test]
    fn garbage_is_refused() {
        with_signer_sync(signer("s"), || {
            for t in ["!!", "e30", "bm90IGpzb24", ".", "e30.", &"A".repeat(5000)] {
                assert!(decode::<i64>("page_token", t, "f").is_err(), "{t}");
            }
        });
    }

    #[test]
    fn tampered_forged_and_foreign_tokens_are_refused() {
        let f = fingerprint("sessions", &"a");
        let token = with_signer_sync(signer("one"), || encode(&f, &(5_i64, "id")));
        let (payload, mac) = token.split_once('.').unwrap();
        // The same payload with the key moved: no valid MAC.
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        let moved = URL_SAFE_NO_PAD.encode(json.replace("5", "4"));
        let unsigned = encode(&f, &(5_i64, "id"));
        with_signer_sync(signer("one"), || {
            assert!(decode::<(i64, String)>("page_token", &token, &f).is_ok());
            for bad in [
                format!("{moved}.{mac}"),
                format!("{payload}.{}", URL_SAFE_NO_PAD.encode([0u8; 16])),
                unsigned.clone(),
                payload.to_string(),
            ] {
                let err = decode::<(i64, String)>("page_token", &bad, &f).unwrap_err();
                assert!(matches!(err, Error::InvalidPageToken(_)), "{bad}");
            }
        });
        // A gateway with another secret refuses it.
        with_signer_sync(signer("two"), || {
            assert!(decode::<(i64, String)>("page_token", &token, &f).is_err());
        });
    }

    /// Rows of `sizes` bytes each, keyed by position.
    fn rows(sizes: &[usize]) -> Vec<(usize, String)> {
        sizes.iter().map(|n| "x".repeat(*n)).enumerate().collect()
    }

    fn run(
        sizes: &[usize],
        page_size: i64,
        limit: usize,
    ) -> (Result<(Vec<String>, String)>, Option<usize>) {
        with_signer_sync(signer("s"), || {
            let got = page(rows(sizes), page_size, limit, "f", |r| r.0, |r| r.1);
            let resumes_after = got
                .as_ref()
                .ok()
                .and_then(|(_, t)| decode::<usize>("page_token", t, "f").unwrap());
            (got, resumes_after)
        })
    }

    #[test]
    fn a_page_stops_at_page_size_or_before_the_reply_limit() {
        // By count: 3 of 5 small rows, resuming after the third.
        let (got, after) = run(&[10; 5], 3, 4096);
        assert_eq!(got.unwrap().0.len(), 3);
        assert_eq!(after, Some(2));
        // By bytes: rows of 1000 bytes cost 1003 each in the reply; 8 KiB
        // less the token reserve (1027) leaves room for 7.
        let limit = 8 * 1024;
        let (got, after) = run(&[1000; 20], 50, limit);
        let (items, token) = got.unwrap();
        assert_eq!(items.len(), 7);
        assert_eq!(after, Some(6));
        let reply: usize =
            items.iter().map(|i| item_cost(i.len())).sum::<usize>() + item_cost(token.len());
        assert!(reply <= limit, "{reply}");
        // The last page has no token.
        let (got, after) = run(&[1000; 3], 50, limit);
        assert_eq!(got.unwrap(), (vec!["x".repeat(1000); 3], String::new()));
        assert_eq!(after, None);
    }

    #[test]
    fn a_row_over_the_budget_comes_alone_and_one_over_the_limit_fails() {
        let limit = 8 * 1024;
        // Over the budget (limit less the reserve) but within the limit.
        let (got, after) = run(&[limit - 500, 10], 50, limit);
        assert_eq!(got.unwrap().0.len(), 1);
        assert_eq!(after, Some(0));
        // Alone and last, it may use the token's reserve too.
        let (got, _) = run(&[limit - 10 - TOTALS_RESERVE], 50, limit);
        assert_eq!(got.unwrap().0.len(), 1);
        // Too large for any reply: a clear error, never a skipped row.
        let (got, _) = run(&[limit + 1, 10], 50, limit);
        let err = got.unwrap_err();
        assert_eq!(err.reason(), Reason::MessageTooLarge);
        // After small rows, a large one starts the next page.
        let (got, after) = run(&[10, 10, limit], 50, limit);
        assert_eq!(got.unwrap().0.len(), 2);
        assert_eq!(after, Some(1));
    }
}
