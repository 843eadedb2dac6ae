//! The LISTEN side of change notifications: one connection outside the pool
//! per gateway, fanned out in-process to every watcher.

use super::PgConfig;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

/// The channel the migrations' triggers notify on.
pub const SESSION_CHANNEL: &str = "verdict_session_changed";

/// What a watcher hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A committed change touched this session.
    SessionChanged(Uuid),
    /// Notifications may have been missed (the listener reconnected):
    /// every watcher re-reads its state.
    Resync,
}

/// Fan-out point for notifications; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Notice>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Hub { tx }
    }

    /// Subscribe before reading the state to watch, so nothing committed in
    /// between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.tx.subscribe()
    }

    /// Keeps a LISTEN connection open for as long as the gateway runs,
    /// reconnecting with capped backoff.
    pub async fn listen(self, config: PgConfig) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.listen_once(&config).await {
                Ok(()) => delay = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, "notification listener lost its connection"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, config: &PgConfig) -> Result<(), tokio_postgres::Error> {
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
                        tracing::warn!(error = %e, "notification connection failed");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {SESSION_CHANNEL}"))
            .await?;
        tracing::debug!("listening for session changes");
        // Anything committed while we were not listening is caught up now.
        let _ = self.tx.send(Notice::Resync);
        while let Some(n) = nrx.recv().await {
            if let Ok(id) = n.payload().parse::<Uuid>() {
                let _ = self.tx.send(Notice::SessionChanged(id));
            }
        }
        driver.abort();
        let _ = self.tx.send(Notice::Resync);
        Ok(())
    }
}
