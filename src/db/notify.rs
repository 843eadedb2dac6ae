//! The LISTEN side of change notifications: one connection outside the pool
//! per gateway, fanned out in-process to every watcher.
//!
//! The connection is open only while something is watched: every write to
//! a session notifies, and a gateway nobody watches would otherwise take
//! and drop a notification per write. When watching starts, LISTEN runs
//! first and a [`Notice::Resync`] follows it, so whatever committed before
//! the listener heard it is read again, just as after a reconnect.

use super::PgConfig;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
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
    /// Whether anything is watched: the listener runs only while it is.
    wanted: watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Hub {
            tx,
            wanted: watch::Sender::new(false),
        }
    }

    /// Says whether anything is watched now: the listener connects (and
    /// resyncs every watcher) when this turns true and disconnects when it
    /// turns false.
    pub fn set_watched(&self, watched: bool) {
        self.wanted
            .send_if_modified(|w| std::mem::replace(w, watched) != watched);
    }

    /// Subscribe before reading the state to watch, so nothing committed in
    /// between is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.tx.subscribe()
    }

    /// Keeps a LISTEN connection open while anything is watched, for as
    /// long as the gateway runs, reconnecting with capped backoff.
    pub async fn listen(self, config: PgConfig) {
        let mut wanted = self.wanted.subscribe();
        let mut delay = Duration::from_millis(100);
        loop {
            if wanted.wait_for(|w| *w).await.is_err() {
                return;
            }
            match self.listen_once(&config, &mut wanted).await {
                Ok(Ended::Unwatched) => {
                    delay = Duration::from_millis(100);
                    continue;
                }
                Ok(Ended::Closed) => delay = Duration::from_millis(100),
                Err(e) => tracing::warn!(error = %e, "notification listener lost its connection"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(
        &self,
        config: &PgConfig,
        wanted: &mut watch::Receiver<bool>,
    ) -> Result<Ended, tokio_postgres::Error> {
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
        let ended = loop {
            tokio::select! {
                n = nrx.recv() => match n {
                    Some(n) => {
                        if let Ok(id) = n.payload().parse::<Uuid>() {
                            let _ = self.tx.send(Notice::SessionChanged(id));
                        }
                    }
                    None => break Ended::Closed,
                },
                // Nothing watched any more: the connection closes. Watching
                // again reconnects and resyncs.
                unwatched = wanted.wait_for(|w| !*w) => {
                    if unwatched.is_err() {
                        break Ended::Closed;
                    }
                    tracing::debug!("nothing watched: the notification listener disconnects");
                    break Ended::Unwatched;
                }
            }
        };
        driver.abort();
        drop(client);
        if ended == Ended::Closed {
            let _ = self.tx.send(Notice::Resync);
        }
        Ok(ended)
    }
}

/// Why a listening connection ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The server closed it: watchers resync once it is back.
    Closed,
    /// Nothing is watched any more.
    Unwatched,
}
