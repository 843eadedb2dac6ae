//! Integration tests: a real gateway, a real tonic client, a real PostgreSQL.

mod audit;
mod auth;
mod discrepancies;
mod fuzz;
mod gateway;
mod helpers;
mod hostile;
mod results;
mod sessions;
mod tls;
mod watch;
