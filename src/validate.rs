//! Request validation: collects every bad field of a request into one
//! INVALID_ARGUMENT with a field violation each.

use crate::convert::{self, JsonError};
use crate::error::{Error, FieldViolation, Result};
use crate::structs::Struct;
use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use serde_json::Value as Json;
use std::time::Duration;
use uuid::Uuid;

/// Largest JSON document (encoded) accepted in a `Struct` field.
pub const MAX_JSON_BYTES: usize = 64 * 1024;
/// Default and largest page sizes of every list.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Collects violations; `finish` turns them into an error.
#[derive(Default)]
pub struct Validator {
    violations: Vec<FieldViolation>,
    prefix: String,
}

/// Most violations reported for one request; the rest are left out.
const MAX_VIOLATIONS: usize = 100;

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// A validator of a nested message: every field it names gets `prefix`
    /// (e.g. `items[3].`).
    pub fn scoped(prefix: impl Into<String>) -> Self {
        Validator {
            violations: Vec::new(),
            prefix: prefix.into(),
        }
    }

    pub fn violation(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.violations.len() >= MAX_VIOLATIONS {
            return;
        }
        let field = field.into();
        let field = if self.prefix.is_empty() {
            field
        } else {
            format!("{}{field}", self.prefix)
        };
        self.violations
            .push(FieldViolation::new(field, description));
    }

    /// Takes over the violations of a nested validator.
    pub fn absorb(&mut self, other: Validator) {
        for v in other.violations {
            self.violation(v.field, v.description);
        }
    }

    /// A finite number (no NaN or infinity).
    pub fn finite(&mut self, field: &str, value: f64) -> f64 {
        if !value.is_finite() {
            self.violation(field, "must be a finite number (no NaN or infinity)");
        }
        value
    }

    /// A finite number of magnitude at most `max` (documented as such).
    pub fn bounded(&mut self, field: &str, value: f64, max: f64) -> f64 {
        if !value.is_finite() {
            self.finite(field, value);
        } else if value.abs() > max {
            self.violation(
                field,
                format!("must be between -{max:e} and {max:e}, not {value:e}"),
            );
        }
        value
    }

    /// An optional `google.protobuf.Duration` within `min..=max`; `None`
    /// when unset or invalid. A valid duration has `seconds` and `nanos` of
    /// the same sign and `nanos` within one second.
    pub fn duration(
        &mut self,
        field: &str,
        value: Option<&prost_types::Duration>,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let d = value?;
        if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
            self.violation(field, "must be a valid duration of 0 or more");
            return None;
        }
        let d = Duration::new(d.seconds as u64, d.nanos as u32);
        if d < min {
            self.violation(field, format!("must be at least {}", human(min)));
            None
        } else if d > max {
            self.violation(field, format!("must be at most {}", human(max)));
            None
        } else {
            Some(d)
        }
    }

    /// A finite number in [0, 1].
    pub fn unit_interval(&mut self, field: &str, value: f64) -> f64 {
        if !value.is_finite() {
            self.finite(field, value);
        } else if !(0.0..=1.0).contains(&value) {
            self.violation(field, format!("must be between 0 and 1, not {value}"));
        }
        value
    }

    /// A count or duration: 0 or more.
    pub fn non_negative(&mut self, field: &str, value: i64) -> i64 {
        if value < 0 {
            self.violation(field, "must be 0 or more");
        }
        value
    }

    /// An optional `expected_version`: versions start at 1, so a smaller
    /// one can never match and is a mistake, not a conflict.
    pub fn expected_version(&mut self, field: &str, value: Option<i64>) -> Option<i64> {
        if let Some(ver) = value
            && ver < 1
        {
            self.violation(field, "must be at least 1");
        }
        value
    }

    /// An optional UUID (empty means unset).
    pub fn optional_uuid(&mut self, field: &str, value: &str) -> Option<Uuid> {
        if value.is_empty() {
            return None;
        }
        Some(self.uuid(field, value))
    }

    /// An optional free text (may hold newlines) of at most `max` characters.
    pub fn optional_message(&mut self, field: &str, value: &str, max: usize) -> String {
        if value.chars().count() > max {
            self.violation(field, format!("must be at most {max} characters"));
        } else if value.contains('\0') {
            self.violation(field, "must not contain NUL characters");
        }
        value.to_owned()
    }

    /// A required text of `1..=max` characters without control characters.
    pub fn required_text(&mut self, field: &str, value: &str, max: usize) -> String {
        if value.is_empty() {
            self.violation(field, "is required");
        } else {
            self.check_text(field, value, max);
        }
        value.to_owned()
    }

    /// An optional text (empty means unset) of at most `max` characters.
    pub fn optional_text(&mut self, field: &str, value: &str, max: usize) -> Option<String> {
        if value.is_empty() {
            return None;
        }
        self.check_text(field, value, max);
        Some(value.to_owned())
    }

    /// A free text (may hold newlines and tabs) of `1..=max` characters.
    pub fn required_message(&mut self, field: &str, value: &str, max: usize) -> String {
        if value.trim().is_empty() {
            self.violation(field, "is required");
        } else if value.chars().count() > max {
            self.violation(field, format!("must be at most {max} characters"));
        } else if value.contains('\0') {
            self.violation(field, "must not contain NUL characters");
        }
        value.to_owned()
    }

    fn check_text(&mut self, field: &str, value: &str, max: usize) {
        if value.chars().count() > max {
            self.violation(field, format!("must be at most {max} characters"));
        } else if value.chars().any(char::is_control) {
            self.violation(field, "must not contain control characters");
        }
    }

    /// A required UUID in text form.
    pub fn uuid(&mut self, field: &str, value: &str) -> Uuid {
        if value.is_empty() {
            self.violation(field, "is required");
            return Uuid::nil();
        }
        Uuid::parse_str(value).unwrap_or_else(|_| {
            self.violation(field, "must be a UUID");
            Uuid::nil()
        })
    }

    /// An optional JSON object of at most `MAX_JSON_BYTES` encoded.
    pub fn json(&mut self, field: &str, value: Option<&Struct>) -> Json {
        self.json_max(field, value, MAX_JSON_BYTES)
    }

    /// An optional JSON object of at most `max_bytes` encoded.
    pub fn json_max(&mut self, field: &str, value: Option<&Struct>, max_bytes: usize) -> Json {
        let Some(s) = value else {
            return Json::Object(Default::default());
        };
        match convert::struct_to_json(s) {
            Ok(j) => {
                let size = serde_json::to_vec(&j)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > max_bytes {
                    self.violation(
                        field,
                        format!("is {size} bytes as JSON; at most {max_bytes} are accepted"),
                    );
                }
                if contains_nul(&j) {
                    self.violation(field, "must not contain NUL characters");
                }
                j
            }
            Err(JsonError::NotFinite { path }) => {
                self.violation(
                    format!("{field}{path}"),
                    "must be a finite number (no NaN or infinity)",
                );
                Json::Null
            }
            Err(JsonError::TooDeep) => {
                self.violation(
                    field,
                    format!(
                        "nests objects and lists too deeply (at most {} levels)",
                        convert::MAX_DEPTH
                    ),
                );
                Json::Null
            }
        }
    }

    /// The items of a batch or stream chunk (the repeated field `field`): at
    /// most `max` (more refuses the whole list unread), at least one unless
    /// `allow_empty`; each validated by `item` with its index.
    pub fn items<R, T>(
        &mut self,
        field: &str,
        items: Vec<R>,
        max: usize,
        allow_empty: bool,
        mut item: impl FnMut(&mut Validator, usize, R) -> T,
    ) -> Vec<T> {
        if items.len() > max {
            self.violation(
                field,
                format!("holds {} items; at most {max} are accepted", items.len()),
            );
            return Vec::new();
        }
        if items.is_empty() && !allow_empty {
            self.violation(field, "must hold at least one item");
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, raw)| item(self, i, raw))
            .collect()
    }

    /// `page_size`: 0 means the default; otherwise 1..=MAX_PAGE_SIZE.
    pub fn page_size(&mut self, field: &str, value: i32) -> i64 {
        match i64::from(value) {
            0 => DEFAULT_PAGE_SIZE,
            n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
            _ => {
                self.violation(
                    field,
                    format!("must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"),
                );
                DEFAULT_PAGE_SIZE
            }
        }
    }

    /// A protobuf enum field that must hold a known, specified value.
    pub fn required_enum<T>(
        &mut self,
        field: &str,
        value: i32,
        convert: impl Fn(i32) -> Option<T>,
    ) -> Option<T> {
        if value == 0 {
            self.violation(field, "is required (not UNSPECIFIED)");
            return None;
        }
        let v = convert(value);
        if v.is_none() {
            self.violation(field, format!("{value} is not a known value"));
        }
        v
    }

    /// An optional timestamp in the supported range.
    pub fn timestamp(&mut self, field: &str, value: Option<&Timestamp>) -> Option<DateTime<Utc>> {
        let t = value?;
        let dt = convert::from_timestamp(t);
        if dt.is_none() {
            self.violation(field, "is not a valid time between years 1 and 9999");
        }
        dt
    }

    /// An optional time range: both bounds valid and start before end.
    pub fn time_range(
        &mut self,
        field: &str,
        range: Option<&crate::proto::TimeRange>,
    ) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let Some(r) = range else {
            return (None, None);
        };
        let start = self.timestamp(&format!("{field}.start_time"), r.start_time.as_ref());
        let end = self.timestamp(&format!("{field}.end_time"), r.end_time.as_ref());
        if let (Some(s), Some(e)) = (start, end)
            && s >= e
        {
            self.violation(field, "start_time must be before end_time");
        }
        (start, end)
    }

    pub fn finish(self) -> Result<()> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.violations))
        }
    }
}

/// A bound for people: `1 second`, `100 years` (of 366 days), `31 days`.
fn human(d: Duration) -> String {
    const DAY: u64 = 86_400;
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    let secs = d.as_secs();
    match secs {
        _ if d.subsec_nanos() != 0 => format!("{d:?}"),
        0 => "0 seconds".to_owned(),
        s if s % (366 * DAY) == 0 => plural(s / (366 * DAY), "year"),
        s if s % DAY == 0 => plural(s / DAY, "day"),
        s if s % 3_600 == 0 => plural(s / 3_600, "hour"),
        s => plural(s, "second"),
    }
}

/// PostgreSQL text and jsonb cannot hold NUL characters.
fn contains_nul(j: &Json) -> bool {
    match j {
        Json::String(s) => s.contains('\0'),
        Json::Array(a) => a.iter().any(contains_nul),
        Json::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Validator) -> Vec<String> {
        match v.finish() {
            Ok(()) => Vec::new(),
            Err(Error::InvalidArgument(vs)) => vs.into_iter().map(|v| v.field).collect(),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn durations_are_held_to_their_bounds() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(366 * 86_400));
        let mut v = Validator::new();
        assert_eq!(v.duration("a", None, min, max), None);
        assert_eq!(
            v.duration("b", d(1, 0).as_ref(), min, max),
            Some(Duration::from_secs(1))
        );
        assert_eq!(v.duration("c", d(0, 999_999_999).as_ref(), min, max), None);
        assert_eq!(v.duration("d", d(366 * 86_400, 1).as_ref(), min, max), None);
        assert_eq!(v.duration("e", d(-1, 0).as_ref(), min, max), None);
        assert_eq!(v.duration("f", d(1, -1).as_ref(), min, max), None);
        assert_eq!(fields(v), ["c", "d", "e", "f"]);
        assert_eq!(human(min), "1 second");
        assert_eq!(human(max), "1 year");
        assert_eq!(human(Duration::from_secs(31 * 86_400)), "31 days");
    }

    #[test]
    fn bounded_numbers_refuse_magnitudes_above_the_bound() {
        let mut v = Validator::new();
        v.bounded("ok", -1e100, 1e100);
        v.bounded("big", 1e101, 1e100);
        v.bounded("nan", f64::NAN, 1e100);
        v.expected_version("v0", Some(0));
        v.expected_version("v1", Some(1));
        assert_eq!(fields(v), ["big", "nan", "v0"]);
    }
}
