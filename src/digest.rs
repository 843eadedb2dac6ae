//! Canonical content digests: how the gateway tells a replay (same key, same
//! content) from a reused key (same key, other content).
//!
//! A digest is never taken over a protobuf re-encoding: prost encodes maps
//! (`map<…>` fields, `google.protobuf.Struct`) from `HashMap`s, so the same
//! message encodes to different bytes from call to call. Instead a handler
//! feeds the *validated* content — what would be stored — field by field
//! into a [`Canonical`] hasher, whose encoding is fixed:
//!
//! - SHA-256 over `"verdict.digest.v1\0"`, then the RPC's label (e.g.
//!   `CreateSession`) as a string, then the fields in a fixed order;
//! - every value is a one-byte tag followed by its bytes: strings and byte
//!   strings carry a u64 little-endian length prefix (so `("ab","c")` and
//!   `("a","bc")` differ), integers are 8 bytes little-endian, floats their
//!   IEEE-754 bits with `-0.0` taken as `0.0`, optional values `n` or `y`
//!   + the value, sequences a count then their items;
//! - JSON (Struct-derived) values recursively: objects as a count and their
//!   entries **sorted by key**, arrays in order, every number as an f64
//!   (Struct numbers are doubles, so `1`, `1.0` and `1e0` are one number);
//! - maps sorted by key; sets (e.g. coverage files by path) sorted too.
//!
//! Changing this encoding changes every digest: bump the version string and
//! treat older digests like rows without one (see `migrations/V11`).

use crate::error::{Error, Reason, Result};
use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

const VERSION: &[u8] = b"verdict.digest.v1\0";

/// A SHA-256 of content fed field by field in canonical form.
pub struct Canonical(Sha256);

impl Canonical {
    /// A hasher for the content of one kind of request, e.g. `CreateSession`.
    pub fn new(label: &str) -> Self {
        let mut h = Canonical(Sha256::new());
        h.0.update(VERSION);
        h.str(label);
        h
    }

    fn tag(&mut self, t: u8) {
        self.0.update([t]);
    }

    fn len(&mut self, n: usize) {
        self.0.update((n as u64).to_le_bytes());
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.tag(b's');
        self.len(s.len());
        self.0.update(s.as_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.tag(b'b');
        self.len(b.len());
        self.0.update(b);
        self
    }

    pub fn i64(&mut self, n: i64) -> &mut Self {
        self.tag(b'i');
        self.0.update(n.to_le_bytes());
        self
    }

    pub fn f64(&mut self, x: f64) -> &mut Self {
        self.tag(b'f');
        let x = if x == 0.0 { 0.0 } else { x };
        self.0.update(x.to_bits().to_le_bytes());
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.tag(if b { b'T' } else { b'F' });
        self
    }

    /// An instant, to the nanosecond.
    pub fn time(&mut self, t: &DateTime<Utc>) -> &mut Self {
        self.tag(b't');
        self.0.update(t.timestamp().to_le_bytes());
        self.0.update(t.timestamp_subsec_nanos().to_le_bytes());
        self
    }

    /// An optional value: absent and present never collide.
    pub fn opt<T>(&mut self, v: Option<T>, feed: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => self.tag(b'n'),
            Some(v) => {
                self.tag(b'y');
                feed(self, v);
            }
        }
        self
    }

    /// A sequence in the order given (use [`Canonical::sorted`] for sets).
    pub fn seq<T>(
        &mut self,
        items: impl ExactSizeIterator<Item = T>,
        mut feed: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        self.tag(b'[');
        self.len(items.len());
        for item in items {
            feed(self, item);
        }
        self
    }

    /// A set or map: its items sorted by `key` first, so the order the
    /// client (or a HashMap) happened to use does not matter.
    pub fn sorted<T, K: Ord>(
        &mut self,
        mut items: Vec<T>,
        key: impl Fn(&T) -> K,
        feed: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        items.sort_by_key(|a| key(a));
        self.seq(items.into_iter(), feed)
    }

    /// A JSON value (from a Struct, a label map …), object keys sorted.
    pub fn json(&mut self, v: &Json) -> &mut Self {
        match v {
            Json::Null => self.tag(b'N'),
            Json::Bool(b) => {
                self.bool(*b);
            }
            // Numbers come from Struct doubles: compare them as doubles, so
            // a value read back from jsonb as `1` equals the `1.0` sent.
            Json::Number(n) => {
                self.f64(n.as_f64().unwrap_or(f64::NAN));
            }
            Json::String(s) => {
                self.str(s);
            }
            Json::Array(items) => {
                self.tag(b'A');
                self.len(items.len());
                for item in items {
                    self.json(item);
                }
            }
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                self.tag(b'O');
                self.len(entries.len());
                for (k, v) in entries {
                    self.str(k);
                    self.json(v);
                }
            }
        }
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.finalize().to_vec()
    }
}

/// Content that has a canonical digest.
pub trait Content {
    /// Feeds every field that makes up the content (not server-assigned
    /// ids or defaults) into `h`.
    fn feed(&self, h: &mut Canonical);
}

/// The digest of one piece of content under `label`.
pub fn of(label: &str, content: &impl Content) -> Vec<u8> {
    let mut h = Canonical::new(label);
    content.feed(&mut h);
    h.finish()
}

/// The digest of a batch of items under `label`, in the batch's order.
pub fn of_batch<T: Content>(label: &str, items: &[T]) -> Vec<u8> {
    let mut h = Canonical::new(label);
    h.seq(items.iter(), |h, item| item.feed(h));
    h.finish()
}

/// FAILED_PRECONDITION `IDEMPOTENCY_KEY_REUSED`: `key_field` = `key` was used
/// before for `what` with other content. Says nothing about that content.
pub fn key_reused(key_field: &str, key: &str, what: &str) -> Error {
    Error::FailedPrecondition(
        Reason::IdempotencyKeyReused,
        format!(
            "{key_field} {key:?} was already used for {what} with other content; \
             send the same content to replay it, or use a new {key_field}"
        ),
    )
}

/// Decides a replay against a stored object: `stored` is its recorded
/// digest; a row written before digests were recorded (`None`) is compared
/// through `legacy`, which rebuilds the digest of its creation content when
/// the row still holds it and returns `None` when it does not.
pub fn check_replay(
    digest: &[u8],
    stored: Option<&[u8]>,
    legacy: impl FnOnce() -> Option<Vec<u8>>,
    reused: impl FnOnce() -> Error,
) -> Result<()> {
    let same = match stored {
        Some(d) => d == digest,
        None => legacy().is_some_and(|d| d == digest),
    };
    if same { Ok(()) } else { Err(reused()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of_json(v: &Json) -> Vec<u8> {
        let mut h = Canonical::new("t");
        h.json(v);
        h.finish()
    }

    #[test]
    fn object_key_order_does_not_change_the_digest() {
        let a: Json = serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":null}}"#).unwrap();
        let b: Json = serde_json::from_str(r#"{"a":{"x":null,"y":[1.0,2]},"b":1.0}"#).unwrap();
        assert_eq!(of_json(&a), of_json(&b));
    }

    #[test]
    fn different_content_gives_different_digests() {
        let cases = [
            json!({"a": 1}),
            json!({"a": 2}),
            json!({"a": "1"}),
            json!({"b": 1}),
            json!({"a": [1]}),
            json!({"a": null}),
            json!({}),
            json!([]),
            json!({"a": {"b": 1}}),
            json!({"a.b": 1}),
        ];
        for (i, x) in cases.iter().enumerate() {
            for y in &cases[i + 1..] {
                assert_ne!(of_json(x), of_json(y), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let mut a = Canonical::new("t");
        a.str("ab").str("c");
        let mut b = Canonical::new("t");
        b.str("a").str("bc");
        assert_ne!(a.finish(), b.finish());
        let mut a = Canonical::new("t");
        a.opt(None::<i64>, |h, n| {
            h.i64(n);
        })
        .i64(0);
        let mut b = Canonical::new("t");
        b.opt(Some(0), |h, n| {
            h.i64(n);
        });
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn labels_separate_kinds_and_negative_zero_is_zero() {
        assert_ne!(Canonical::new("a").finish(), Canonical::new("b").finish());
        let mut a = Canonical::new("t");
        a.f64(-0.0);
        let mut b = Canonical::new("t");
        b.f64(0.0);
        assert_eq!(a.finish(), b.finish());
    }
}
