//! Hearing of key changes: a LISTEN connection of its own on
//! `verdict_keys_changed` (notified by the `api_keys` trigger of migration
//! V12 in the transaction that inserts, revokes or deletes a key, whether
//! the gateway or `verdict keys revoke` wrote it), reconnecting with capped
//! backoff. Each notification drops the key from the cache and re-reads it
//! when it has calls or streams open, ending them if it is revoked.
//!
//! The backstop: every second while the listener is not connected (or a
//! re-read failed), every key with open streams is re-read in one
//! statement, and cached keys expire after
//! [`super::cache::TTL_UNLISTENED`]; every (re)connection empties the cache.

use super::KeyId;
use super::cache::KeyCache;
use crate::db::PgConfig;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tracing::Instrument as _;

/// The channel the `api_keys` trigger notifies, with the key's id.
pub const CHANNEL: &str = "verdict_keys_changed";
const LISTEN: &str = "LISTEN verdict_keys_changed";

/// How often keys with open streams are re-read while notifications may
/// be missed.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The root span of one re-check of cached keys: its statements belong to
/// a trace that says what they were for.
fn recheck_span() -> tracing::Span {
    tracing::info_span!(parent: None, "keys.recheck", otel.kind = "internal")
}

/// Runs for as long as the gateway does (start it once migrations are done).
pub async fn listen(cache: KeyCache, config: PgConfig) {
    let backstop = async {
        let mut tick = tokio::time::interval(RECHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due = cache.take_recheck_due();
            if (due || !cache.is_listening())
                && let Err(e) = cache.recheck(None).instrument(recheck_span()).await
            {
                tracing::warn!(error = %e, "cannot re-check API keys with open streams");
                cache.mark_recheck_due();
            }
        }
    };
    let listener = async {
        let mut delay = Duration::from_millis(100);
        loop {
            match listen_once(&cache, &config).await {
                Ok(()) => {
                    tracing::warn!("the API key listener lost its connection");
                    delay = Duration::from_millis(100);
                }
                Err(e) => tracing::warn!(error = %e, "the API key listener cannot connect"),
            }
            cache.set_listening(false);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    };
    tokio::join!(backstop, listener);
}

async fn listen_once(cache: &KeyCache, config: &PgConfig) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect().await?;
    let (ntx, mut nrx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if ntx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the API key listener's connection failed");
                    break;
                }
            }
        }
    });
    let listening = client.batch_execute(LISTEN).await;
    if let Err(e) = listening {
        driver.abort();
        return Err(e);
    }
    // From here on no change is missed; what was cached before may be stale.
    cache.flush();
    cache.set_listening(true);
    tracing::debug!("listening for API key changes");
    if let Err(e) = cache.recheck(None).instrument(recheck_span()).await {
        tracing::warn!(error = %e, "cannot re-check API keys with open streams");
        cache.mark_recheck_due();
    }
    while let Some(n) = nrx.recv().await {
        let Some(id) = KeyId::parse(n.payload()) else {
            continue;
        };
        if cache.changed(id) {
            let cache = cache.clone();
            tokio::spawn(async move {
                if let Err(e) = cache
                    .recheck(Some(vec![id]))
                    .instrument(recheck_span())
                    .await
                {
                    tracing::warn!(key_id = %id, error = %e, "cannot re-read a changed API key");
                    cache.mark_recheck_due();
                }
            });
        }
    }
    driver.abort();
    drop(client);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_listener_listens_on_the_channel_the_trigger_notifies() {
        assert_eq!(super::LISTEN.strip_prefix("LISTEN "), Some(super::CHANNEL));
        let migration = include_str!("../../migrations/V12__keys_notify_and_audit_append_only.sql");
        assert!(migration.contains(&format!("pg_notify('{}'", super::CHANNEL)));
    }
}
