//! WatchSession: the current state, then every committed change.
//!
//! A notification (LISTEN/NOTIFY, see `db::notify`) only says "this session
//! changed"; the watcher then re-reads from its own cursors (last log id,
//! last version). So a lost, coalesced or replayed notification can delay an
//! event but never lose or duplicate one.

use super::{Session, sql};
use crate::call::Call;
use crate::db::notify::Notice;
use crate::error::{Error, Result};
use crate::proto::{self, watch_session_response::Event};
use crate::state::AppState;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

pub type WatchStream = ReceiverStream<Result<proto::WatchSessionResponse, Status>>;

/// Log entries read per catch-up query.
const LOG_BATCH: i64 = 500;

struct Watcher {
    state: AppState,
    id: Uuid,
    last_log_id: i64,
    version: i64,
    tx: mpsc::Sender<Result<proto::WatchSessionResponse, Status>>,
}

pub async fn start(state: &AppState, id: Uuid) -> Result<WatchStream> {
    // Subscribe first: a change committed while we read is then not missed.
    let mut notices = state.hub.subscribe();
    let mut shutdown = state.shutdown.clone();
    let (session, last_log_id) = {
        let mut conn = state.db.conn(&Call::default()).await?;
        let c = conn.client().await?;
        let session = sql::get(c, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("session {id} not found")))?;
        let last = sql::last_log_id(c, id).await?;
        (session, last)
    };
    let (tx, rx) = mpsc::channel(64);
    let mut watcher = Watcher {
        state: state.clone(),
        id,
        last_log_id,
        version: session.version,
        tx,
    };
    let done = session.status.is_final();
    tokio::spawn(
        async move {
            if watcher.send(Event::Session(session.into())).await.is_err() || done {
                return;
            }
            loop {
                let notice = tokio::select! {
                    _ = watcher.tx.closed() => return,
                    _ = shutdown.changed() => {
                        let _ = watcher.tx.send(Err(Status::unavailable(
                            "the gateway is shutting down; watch again"))).await;
                        return;
                    }
                    n = notices.recv() => n,
                };
                match notice {
                    Ok(Notice::SessionChanged(changed)) if changed != watcher.id => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
                match watcher.catch_up().await {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        let _ = watcher.tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        }
        .instrument(tracing::Span::current()),
    );
    Ok(ReceiverStream::new(rx))
}

impl Watcher {
    async fn send(&self, event: Event) -> Result<(), ()> {
        self.tx
            .send(Ok(proto::WatchSessionResponse { event: Some(event) }))
            .await
            .map_err(|_| ())
    }

    /// Sends what changed since the last event; true once the session is final.
    async fn catch_up(&mut self) -> Result<bool> {
        let mut conn = self.state.db.conn(&Call::default()).await?;
        let c = conn.client().await?;
        loop {
            let logs = sql::logs_after(c, self.id, self.last_log_id, LOG_BATCH).await?;
            let full = logs.len() as i64 == LOG_BATCH;
            for entry in logs {
                self.last_log_id = entry.id;
                if self.send(Event::LogEntry(entry.into())).await.is_err() {
                    return Ok(true);
                }
            }
            if !full {
                break;
            }
        }
        let session: Session = sql::get(c, self.id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("session {} was deleted", self.id)))?;
        let done = session.status.is_final();
        if session.version > self.version {
            self.version = session.version;
            if self.send(Event::Session(session.into())).await.is_err() {
                return Ok(true);
            }
        }
        Ok(done)
    }
}
