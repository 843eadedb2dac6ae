//! Integration tests: a real gateway, a real tonic client, a real PostgreSQL.

mod admin;
mod audit;
mod auth;
mod bounds;
mod coverage;
mod discrepancies;
mod errors;
mod fuzz;
mod gateway;
mod helpers;
mod hostile;
mod idempotency;
mod ingest;
mod keys;
mod metrics;
mod pages;
mod pg_tls;
mod projects;
mod projects_coverage_metrics;
mod results;
mod sequences;
mod sessions;
mod test_cases;
mod tls;
mod watch;
