//! Integration tests: a real gateway, a real tonic client, a real PostgreSQL.

mod admin;
mod coverage;
mod discrepancies;
mod gateway;
mod helpers;
mod metrics;
mod results;
mod sessions;
mod test_cases;
mod watch;
