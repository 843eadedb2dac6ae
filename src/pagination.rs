//! Opaque keyset page tokens, bound to the filter they were issued for.
//!
//! A token is base64url of a small JSON document: a format version, a
//! fingerprint of the list and its filters, and the sort key of the last row
//! returned. A token presented with other filters (or to another list) is
//! refused, so a client can never silently skip or repeat rows.

use crate::error::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
/// Tokens are small; anything much longer is not one of ours.
const MAX_TOKEN_LEN: usize = 1024;

#[derive(Serialize, Deserialize)]
struct Token<K> {
    v: u8,
    f: String,
    k: K,
}

/// A fingerprint of one list (`scope`, e.g. `sessions`) with its filters.
pub fn fingerprint(scope: &str, filter: &impl Serialize) -> String {
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(filter).unwrap_or_default());
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The token for the page after the row whose sort key is `key`.
pub fn encode<K: Serialize>(fingerprint: &str, key: &K) -> String {
    let token = Token {
        v: VERSION,
        f: fingerprint.to_owned(),
        k: key,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
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
    let malformed = || Error::invalid(field, "is not a page token issued by this list");
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
    let parsed: Token<K> = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    if parsed.v != VERSION {
        return Err(malformed());
    }
    if parsed.f != fingerprint {
        return Err(Error::invalid(
            field,
            "was issued for a different filter; repeat the filters of the call that returned it, or start again without a token",
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
                    Error::invalid("page_token", "is not a page token issued by this list")
                })?,
            ),
            Some(id),
        )),
        None => Ok((None, None)),
    }
}

/// Splits one extra row fetched past the page: returns the page and whether
/// another page follows.
pub fn split_page<T>(mut rows: Vec<T>, page_size: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > page_size;
    rows.truncate(page_size as usize);
    (rows, more)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_with_its_filter() {
        let f = fingerprint("sessions", &("pending", 3));
        let t = encode(&f, &(17_i64, "x".to_string()));
        let k: Option<(i64, String)> = decode("page_token", &t, &f).unwrap();
        assert_eq!(k, Some((17, "x".into())));
    }

    #[test]
    fn a_token_from_another_filter_is_refused() {
        let t = encode(&fingerprint("sessions", &"a"), &1_i64);
        let err = decode::<i64>("page_token", &t, &fingerprint("sessions", &"b")).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
    }

    #[test]
    fn garbage_is_refused() {
        for t in ["!!", "e30", "bm90IGpzb24", &"A".repeat(5000)] {
            assert!(decode::<i64>("page_token", t, "f").is_err(), "{t}");
        }
    }
}
