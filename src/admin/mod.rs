//! Operations: statistics, retention, integrity, migration status and
//! whole-session export — as AdminService RPCs and as CLI commands.

pub mod cleanup;
pub mod export;
pub mod integrity;
mod service;
pub mod stats;

pub use service::AdminApi;

use crate::error::{Error, Result};
use std::time::Duration;

/// Parses a retention age such as `30d`, `12h`, `90m` or `45s`.
pub fn parse_age(text: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid(
            "older_than",
            format!("{text:?} is not an age like 30d, 12h, 90m or 45s"),
        )
    };
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_their_units() {
        assert_eq!(parse_age("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_age("12h").unwrap(), Duration::from_secs(12 * 3_600));
        assert_eq!(parse_age("45s").unwrap(), Duration::from_secs(45));
        for bad in ["", "d", "0d", "3w", "-1d", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
