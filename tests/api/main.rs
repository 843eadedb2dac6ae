//! Integration tests: a real gateway, a real tonic client, a real PostgreSQL.

mod coverage;
mod discrepancies;
mod gateway;
mod helpers;
mod results;
mod sessions;
mod test_cases;
mod watch;
