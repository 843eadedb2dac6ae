//! The connections the gRPC server is handed, plain or TLS, under limits
//! that keep clients who never speak from costing more than a socket each
//! for a bounded time:
//!
//! - a cap on open connections and on connections per peer IP address
//!   (loopback included): the excess is closed at accept, except that when
//!   the total cap is reached the oldest connection still in its handshake
//!   is closed to make room (so a crowd that never speaks cannot keep out a
//!   client that does: it finishes its handshake in milliseconds);
//! - a handshake deadline: within it a connection must finish TLS (when on)
//!   and send the HTTP/2 connection preface (or, for gRPC-Web and the
//!   console, the method of an HTTP/1.1 request), or it is closed;
//! - handshakes run each on a task of their own, so one slow client cannot
//!   hold up the next.
//!
//! Every connection carries a guard that gives its place back when it closes.

use super::trace::LogBudget;
use futures::Stream;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first four bytes of the HTTP/1.1 requests browsers make of the
/// gateway: gRPC-Web calls, CORS preflights, the console's files.
const HTTP1_STARTS: [&[u8; 4]; 4] = [b"POST", b"OPTI", b"GET ", b"HEAD"];

/// Lines about refused connections: a flood must not flood the log.
static REFUSED_LINES: LogBudget = LogBudget::new(10, 1);
/// Lines about failed or abandoned handshakes.
static HANDSHAKE_LINES: LogBudget = LogBudget::new(10, 1);

/// Limits on the connections of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a connection may take to finish TLS and send the preface.
    pub handshake_timeout: Duration,
    /// Most connections open at once (handshaking ones included).
    pub max_connections: usize,
    /// Most connections open at once from one IP address.
    pub max_per_peer: usize,
}

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Limits {
            handshake_timeout: config.handshake_timeout(),
            max_connections: config.max_connections(),
            max_per_peer: config.max_connections_per_peer.max(1),
        }
    }
}

/// Open connections, in total and per peer.
struct Tracker {
    limits: Limits,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    /// Connections still in their handshake, oldest first, with the signal
    /// that closes them.
    handshaking: VecDeque<(u64, Arc<Notify>)>,
    next_id: u64,
}

impl Counts {
    fn handshake_over(&mut self, id: u64) {
        if let Some(at) = self.handshaking.iter().position(|(i, _)| *i == id) {
            self.handshaking.remove(at);
        }
    }
}

impl Tracker {
    /// A place for a new connection from `ip` and the signal that evicts it
    /// while it handshakes, or why there is none.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<(Guard, Arc<Notify>), &'static str> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.per_peer.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_peer {
            return Err("too many open connections from this address");
        }
        if counts.total >= self.limits.max_connections {
            // The evicted connection gives its place back as soon as its
            // task sees the signal.
            match counts.handshaking.pop_front() {
                Some((_, evict)) => evict.notify_one(),
                None => return Err("too many open connections"),
            }
        }
        let id = counts.next_id;
        counts.next_id += 1;
        let evict = Arc::new(Notify::new());
        counts.handshaking.push_back((id, evict.clone()));
        *counts.per_peer.entry(ip).or_default() += 1;
        counts.total += 1;
        let guard = Guard {
            tracker: self.clone(),
            ip,
            id,
        };
        Ok((guard, evict))
    }
}

/// A connection's place; given back when dropped.
struct Guard {
    tracker: Arc<Tracker>,
    ip: IpAddr,
    id: u64,
}

impl Guard {
    /// The connection is established: it can no longer be evicted.
    fn established(&self) {
        self.tracker
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handshake_over(self.id);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut counts = self
            .tracker
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        counts.handshake_over(self.id);
        counts.total -= 1;
        if let Some(n) = counts.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.per_peer.remove(&self.ip);
            }
        }
    }
}

/// An admitted connection whose first bytes were read (and are replayed to
/// the HTTP server before anything else).
pub struct Conn<IO> {
    io: IO,
    /// The bytes read in the handshake: the HTTP/2 preface, or the first
    /// four bytes of an HTTP/1.1 request.
    head: [u8; PREFACE.len()],
    head_len: usize,
    /// How much of `head` has been replayed.
    replayed: usize,
    _guard: Guard,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replayed < self.head_len {
            let n = (self.head_len - self.replayed).min(buf.remaining());
            let start = self.replayed;
            buf.put_slice(&self.head[start..start + n]);
            self.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Conn<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Plain TCP: the handshake is the preface alone.
pub fn plain(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = io::Result<Conn<TcpStream>>> + Send + 'static {
    incoming(listener, limits, |tcp| async move { Ok(tcp) })
}

/// Connections accepted on `listener` under `limits`; `handshake` turns a
/// TCP connection into the stream HTTP/2 runs on (e.g. TLS). Ends when the
/// consumer drops the stream.
pub fn incoming<IO, F, Fut>(
    listener: TcpListener,
    limits: Limits,
    handshake: F,
) -> impl Stream<Item = io::Result<Conn<IO>>> + Send + 'static
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let tracker = Arc::new(Tracker {
        limits,
        counts: Mutex::default(),
    });
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off a little, keep serving.
                    if REFUSED_LINES.admit().is_some() {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (guard, evict) = match tracker.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(reason) => {
                    if let Some(suppressed) = REFUSED_LINES.admit() {
                        tracing::warn!(%peer, suppressed, "connection refused: {reason}");
                    }
                    drop(tcp);
                    continue;
                }
            };
            // Without nodelay, replies larger than a segment wait out
            // delayed ACKs (40 ms).
            let _ = tcp.set_nodelay(true);
            let handshake = handshake(tcp);
            let tx = tx.clone();
            tokio::spawn(async move {
                let opened = async {
                    let mut io = handshake.await?;
                    let mut head = [0u8; PREFACE.len()];
                    io.read_exact(&mut head[..4]).await?;
                    if HTTP1_STARTS.iter().any(|start| head[..4] == start[..]) {
                        return Ok((io, head, 4));
                    }
                    io.read_exact(&mut head[4..]).await?;
                    if &head != PREFACE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "neither an HTTP/2 connection preface nor an HTTP/1.1 request",
                        ));
                    }
                    Ok((io, head, PREFACE.len()))
                };
                let opened = tokio::time::timeout(limits.handshake_timeout, opened);
                let outcome = tokio::select! {
                    outcome = opened => outcome,
                    () = evict.notified() => {
                        if let Some(suppressed) = HANDSHAKE_LINES.admit() {
                            tracing::info!(%peer, suppressed, "connection closed in its handshake to make room for a new one");
                        }
                        return;
                    }
                };
                match outcome {
                    Ok(Ok((io, head, head_len))) => {
                        guard.established();
                        let _ = tx
                            .send(Ok(Conn {
                                io,
                                head,
                                head_len,
                                replayed: 0,
                                _guard: guard,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        if let Some(suppressed) = HANDSHAKE_LINES.admit() {
                            tracing::info!(%peer, suppressed, error = %e, "connection handshake failed")
                        }
                    }
                    Err(_) => {
                        if let Some(suppressed) = HANDSHAKE_LINES.admit() {
                            tracing::info!(%peer, suppressed, "connection handshake timed out")
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
