//! What every service shares.

use crate::db::Db;
use crate::db::notify::Hub;
use crate::pagination::Signer;
use crate::sessions::Watches;
use tokio::sync::watch;

/// Shared handles of a running gateway; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub hub: Hub,
    /// Flips to true when the gateway starts shutting down, so long-lived
    /// streams end instead of holding the drain open.
    pub shutdown: watch::Receiver<bool>,
    /// The page-token key of this gateway.
    pub signer: Signer,
    /// Verified API keys and their revocation signals.
    pub keys: crate::auth::KeyCache,
    /// The slug → id map of projects (see [`crate::projects`]).
    pub projects: crate::projects::Directory,
    /// Bounds of client-stream ingests.
    pub ingest: crate::ingest::Limits,
    /// The shared feeds of WatchSession, with their own small pool.
    pub watches: Watches,
    /// Largest message the gateway sends or accepts (`max_message_bytes`):
    /// list pages and export chunks stop before a reply grows past it.
    pub max_message_bytes: usize,
    /// Retention defaults and batch bounds (Cleanup, the retention job).
    pub retention: crate::admin::retention::Settings,
    /// `VERDICT_COUNT_EXACT_BELOW`: see [`crate::totals`].
    pub count_exact_below: i64,
}
