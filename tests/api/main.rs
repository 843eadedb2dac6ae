//! Integration tests: a real gateway, a real tonic client, a real PostgreSQL.

mod gateway;
mod helpers;
mod sessions;
mod watch;
