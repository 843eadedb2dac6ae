//! Reply messages written straight from their rows (issue 13).
//!
//! A page of a list is most of what a list call costs the gateway. Read
//! the usual way, each row becomes a domain value (a `String` per text
//! column, a map per labels document), then a generated message, which
//! prost measures, encodes and frees. Written from the row, a page costs
//! one buffer: text columns are copied from the row's bytes, JSON
//! documents encoded from their text ([`crate::structs::encode_json_into`])
//! and each item measured once, as written. The bytes are the same message
//! on the wire; clients decode it as usual.
//!
//! Every writer follows proto3 as prost does: a field holding its default
//! (empty text, zero) is left out, a set message field is written even when
//! empty.

use crate::error::{Error, Result};
use crate::structs::{close, open};
use chrono::{DateTime, Utc};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint};

/// A string field `field`; nothing when `s` is empty.
pub fn put_str(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        encode_key(field, WireType::LengthDelimited, out);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

/// A varint field (int32, int64, enum: negative values as their 64-bit
/// two's complement, as prost writes them); nothing when `v` is 0.
pub fn put_varint(out: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        encode_key(field, WireType::Varint, out);
        encode_varint(v as u64, out);
    }
}

/// A double field; nothing when `v` is 0 (as prost: -0.0 too).
pub fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    if v != 0.0 {
        encode_key(field, WireType::SixtyFourBit, out);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// A string field holding a UUID in its canonical text form.
pub fn put_uuid(out: &mut Vec<u8>, field: u32, id: uuid::Uuid) {
    put_str(
        out,
        field,
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
}

/// Starts a message field: its key and a length placeholder. Returns where
/// its content starts, for [`end_message`].
pub fn start_message(out: &mut Vec<u8>, field: u32) -> usize {
    encode_key(field, WireType::LengthDelimited, out);
    open(out)
}

/// Ends the message field started at `start`, setting its length.
pub fn end_message(out: &mut Vec<u8>, start: usize) {
    close(out, start);
}

/// A `timestamptz` column as a `google.protobuf.Timestamp`'s two fields,
/// read from the column's bytes (microseconds since 2000-01-01 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTimestamp {
    pub seconds: i64,
    pub nanos: i32,
}

/// Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_SECONDS: i64 = 946_684_800;

impl From<DateTime<Utc>> for PgTimestamp {
    fn from(t: DateTime<Utc>) -> Self {
        PgTimestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        }
    }
}

impl<'a> tokio_postgres::types::FromSql<'a> for PgTimestamp {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let micros = i64::from_be_bytes(raw.try_into()?);
        // ±infinity: no Timestamp (as a chrono time, they fail too).
        if micros == i64::MAX || micros == i64::MIN {
            return Err("an infinite timestamp has no protobuf Timestamp".into());
        }
        Ok(PgTimestamp {
            seconds: PG_EPOCH_SECONDS + micros.div_euclid(1_000_000),
            nanos: micros.rem_euclid(1_000_000) as i32 * 1000,
        })
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::TIMESTAMPTZ
    }
}

/// A `google.protobuf.Timestamp` field.
pub fn put_timestamp(out: &mut Vec<u8>, field: u32, t: PgTimestamp) {
    let at = start_message(out, field);
    put_varint(out, 1, t.seconds);
    put_varint(out, 2, i64::from(t.nanos));
    end_message(out, at);
}

/// A `google.protobuf.Timestamp` field when `t` is set.
pub fn put_opt_timestamp(out: &mut Vec<u8>, field: u32, t: Option<PgTimestamp>) {
    if let Some(t) = t {
        put_timestamp(out, field, t);
    }
}

/// A `google.protobuf.Struct` field of a stored JSON document (its text):
/// the object's entries, none when the document is not an object.
pub fn put_struct_json(out: &mut Vec<u8>, field: u32, text: &[u8]) -> Result<()> {
    let at = start_message(out, field);
    crate::structs::encode_json_into(text, out)
        .map_err(|e| Error::Internal(format!("a stored JSON document is unreadable: {e}")))?;
    end_message(out, at);
    Ok(())
}

/// A `repeated string` field: every item, empty ones too.
pub fn put_repeated_str<'a>(
    out: &mut Vec<u8>,
    field: u32,
    items: impl IntoIterator<Item = &'a str>,
) {
    for s in items {
        encode_key(field, WireType::LengthDelimited, out);
        encode_varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }
}

/// A `google.protobuf.Struct` field of a JSON column, as `JsonDoc::into_object`
/// reads one: unset when the column is SQL NULL (left out by a BASIC list)
/// or JSON null.
pub fn put_opt_struct_json(out: &mut Vec<u8>, field: u32, doc: Option<JsonText>) -> Result<()> {
    match doc {
        Some(JsonText(text)) if !crate::convert::is_json_null(text) => {
            put_struct_json(out, field, text)
        }
        _ => Ok(()),
    }
}

/// A `map<string, string>` field of `entries`: one entry message each.
pub fn put_str_map<'a>(
    out: &mut Vec<u8>,
    field: u32,
    entries: impl IntoIterator<Item = (&'a String, &'a String)>,
) {
    for (k, v) in entries {
        let at = start_message(out, field);
        put_str(out, 1, k);
        put_str(out, 2, v);
        end_message(out, at);
    }
}

/// The text of a `json` or `jsonb` column, borrowed from the row.
pub struct JsonText<'a>(pub &'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for JsonText<'a> {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        crate::convert::json_text(ty, raw).map(JsonText)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// Defines the hand-written form of a list reply `{ repeated Item items = 1;
/// string next_page_token = 2; int64 total = 30; CountMode total_mode = 31; }`
/// (every list of the API has this shape), as the build maps it here: the
/// generated fields, plus items the gateway wrote from their rows.
///
/// A client reads the generated fields, as it would the generated message
/// (decoding fills the items' field). The gateway sets the encoded items
/// instead: field 1's entries, each with its tag and length (see
/// [`crate::pagination::page_encoded`]), sent ahead of any decoded ones.
macro_rules! list_reply {
    ($name:ident, $items:ident, $encoded:ident, $item:ty) => {
        #[derive(Clone, PartialEq, Default, Debug)]
        pub struct $name {
            /// The page, in list order.
            pub $items: Vec<$item>,
            /// Token for the next page; empty on the last page and only there.
            pub next_page_token: String,
            /// The number of rows matching the request's filters over every page.
            pub total: i64,
            /// How `total` was obtained (`verdict.v1.CountMode`).
            pub total_mode: i32,
            /// Items already encoded as field 1 (see [`list_reply`]).
            pub $encoded: Vec<u8>,
        }

        impl prost::Message for $name {
            fn encode_raw(&self, buf: &mut impl BufMut) {
                use prost::encoding::{int32, int64, message, string};
                buf.put_slice(&self.$encoded);
                for item in &self.$items {
                    message::encode(1, item, buf);
                }
                if !self.next_page_token.is_empty() {
                    string::encode(2, &self.next_page_token, buf);
                }
                if self.total != 0 {
                    int64::encode(30, &self.total, buf);
                }
                if self.total_mode != 0 {
                    int32::encode(31, &self.total_mode, buf);
                }
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> std::result::Result<(), prost::DecodeError> {
                use prost::encoding::{int32, int64, message, skip_field, string};
                match tag {
                    1 => message::merge_repeated(wire_type, &mut self.$items, buf, ctx),
                    2 => string::merge(wire_type, &mut self.next_page_token, buf, ctx),
                    30 => int64::merge(wire_type, &mut self.total, buf, ctx),
                    31 => int32::merge(wire_type, &mut self.total_mode, buf, ctx),
                    _ => skip_field(wire_type, tag, buf, ctx),
                }
            }

            fn encoded_len(&self) -> usize {
                use prost::encoding::{int32, int64, message, string};
                let token = if self.next_page_token.is_empty() {
                    0
                } else {
                    string::encoded_len(2, &self.next_page_token)
                };
                let total = if self.total != 0 {
                    int64::encoded_len(30, &self.total)
                } else {
                    0
                };
                let mode = if self.total_mode != 0 {
                    int32::encoded_len(31, &self.total_mode)
                } else {
                    0
                };
                self.$encoded.len()
                    + message::encoded_len_repeated(1, &self.$items)
                    + token
                    + total
                    + mode
            }

            fn clear(&mut self) {
                *self = $name::default();
            }
        }
    };
}

list_reply!(
    ListSessionsResponse,
    sessions,
    encoded_sessions,
    crate::proto::Session
);
list_reply!(
    ListResultsResponse,
    results,
    encoded_results,
    crate::proto::ValidationResult
);
list_reply!(
    ListSessionLogsResponse,
    entries,
    encoded_entries,
    crate::proto::SessionLogEntry
);
list_reply!(
    ListExecutionsResponse,
    executions,
    encoded_executions,
    crate::proto::Execution
);
list_reply!(
    ListDiscrepanciesResponse,
    discrepancies,
    encoded_discrepancies,
    crate::proto::Discrepancy
);

/// `verdict.v1.GetSessionResponse`, as the build maps it here: the
/// generated fields, plus the session as the gateway wrote it from its row
/// (`encoded_session`: field 1, tag, length and `Session`, written by
/// `sessions::sql::session_to_wire`). A client reads `session` as usual.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct GetSessionResponse {
    /// The session found.
    pub session: Option<crate::proto::Session>,
    /// Counts of what belongs to the session, when asked for.
    pub summary: Option<crate::proto::SessionSummary>,
    /// The session already encoded as field 1 (see the type).
    pub encoded_session: Vec<u8>,
}

impl prost::Message for GetSessionResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        use prost::encoding::message;
        buf.put_slice(&self.encoded_session);
        if let Some(s) = &self.session {
            message::encode(1, s, buf);
        }
        if let Some(s) = &self.summary {
            message::encode(2, s, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> std::result::Result<(), prost::DecodeError> {
        use prost::encoding::{message, skip_field};
        match tag {
            1 => message::merge(
                wire_type,
                self.session.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            2 => message::merge(
                wire_type,
                self.summary.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::message;
        self.encoded_session.len()
            + self
                .session
                .as_ref()
                .map_or(0, |s| message::encoded_len(1, s))
            + self
                .summary
                .as_ref()
                .map_or(0, |s| message::encoded_len(2, s))
    }

    fn clear(&mut self) {
        *self = GetSessionResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn writers_encode_as_prost_does() {
        use prost_types::Timestamp;
        let t = DateTime::<Utc>::from_timestamp(1_700_000_000, 123_456_000).unwrap();
        let before_1970 = DateTime::<Utc>::from_timestamp(-86_400, 0).unwrap();
        for t in [t, before_1970, DateTime::<Utc>::UNIX_EPOCH] {
            let mut out = Vec::new();
            put_timestamp(&mut out, 3, t.into());
            let expected = crate::convert::timestamp(t);
            let mut want = Vec::new();
            prost::encoding::message::encode::<Timestamp>(3, &expected, &mut want);
            assert_eq!(out, want, "{t}");
        }
        let mut out = Vec::new();
        put_str(&mut out, 2, "");
        put_varint(&mut out, 6, 0);
        assert!(out.is_empty());
        put_double(&mut out, 5, 0.0);
        put_double(&mut out, 5, -0.0);
        assert!(out.is_empty());
        put_str(&mut out, 2, &"é".repeat(100));
        put_varint(&mut out, 6, -1);
        put_double(&mut out, 5, 0.975);
        let mut want = Vec::new();
        prost::encoding::string::encode(2, &"é".repeat(100), &mut want);
        prost::encoding::int64::encode(6, &-1, &mut want);
        prost::encoding::double::encode(5, &0.975, &mut want);
        assert_eq!(out, want);
    }

    #[test]
    fn a_timestamptz_column_reads_as_chrono_reads_it() {
        use tokio_postgres::types::{FromSql, ToSql, Type};
        for t in [
            "2026-11-30T07:00:00.123456Z",
            "1999-12-31T23:59:59.999999Z",
            "2000-01-01T00:00:00Z",
            "1969-07-20T20:17:40.000001Z",
            "0001-01-01T00:00:00Z",
        ] {
            let t: DateTime<Utc> = t.parse().unwrap();
            let mut raw = prost::bytes::BytesMut::new();
            t.to_sql(&Type::TIMESTAMPTZ, &mut raw).unwrap();
            let read = PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &raw).unwrap();
            assert_eq!(read, PgTimestamp::from(t), "{t}");
        }
        let infinity = i64::MAX.to_be_bytes();
        assert!(PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &infinity).is_err());
        assert!(PgTimestamp::from_sql(&Type::TIMESTAMPTZ, b"short").is_err());
    }

    #[test]
    fn a_reply_with_encoded_sessions_decodes_as_the_generated_one() {
        let session = crate::proto::Session {
            id: "a".repeat(36),
            request_id: "r".into(),
            status: 2,
            version: 3,
            labels: [("team".to_string(), "core".to_string())].into(),
            ..Default::default()
        };
        let mut encoded = Vec::new();
        prost::encoding::message::encode(1, &session, &mut encoded);
        let reply = ListSessionsResponse {
            sessions: vec![session.clone()],
            next_page_token: "t".into(),
            total: 2,
            total_mode: 1,
            encoded_sessions: encoded,
        };
        let bytes = reply.encode_to_vec();
        assert_eq!(bytes.len(), reply.encoded_len());
        let back = ListSessionsResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.sessions, vec![session.clone(), session.clone()]);
        assert_eq!(back.next_page_token, "t");
        assert_eq!((back.total, back.total_mode), (2, 1));
        assert!(back.encoded_sessions.is_empty());

        let mut encoded = Vec::new();
        prost::encoding::message::encode(1, &session, &mut encoded);
        let summary = crate::proto::SessionSummary::default();
        let reply = GetSessionResponse {
            encoded_session: encoded,
            summary: Some(summary.clone()),
            ..Default::default()
        };
        let bytes = reply.encode_to_vec();
        assert_eq!(bytes.len(), reply.encoded_len());
        let back = GetSessionResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.session, Some(session));
        assert_eq!(back.summary, Some(summary));
    }
}
