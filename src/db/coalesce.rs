//! One Sync for the short reads written together (issue 13).
//!
//! tokio-postgres ends every statement with a Sync, and PostgreSQL answers
//! each Sync with ReadyForQuery and flushes its output there: one `send`
//! per statement, and for the gateway one more wake-up and `recv`, however
//! many statements a pipelined write carried. Measured on a shared read
//! connection under h2load (GetSession, 8 calls in flight), the backend made
//! 0.97 `sendto` calls per read, and they were 31 % of its CPU.
//!
//! [`Coalesce`] sits between a shared read connection's tokio-postgres half
//! and its socket (or TLS stream); those connections, from a pool of their
//! own, run only the reads of [`super::short_read!`] (and, when one is
//! abandoned, an empty query behind what it still runs). When one write
//! carries several executions of the statements in [`READS`] (read-only
//! lookups by key), it drops the Sync between each and the next, so the
//! server runs them as one batch and flushes once; on the way back it puts
//! a ReadyForQuery after each statement's result, so tokio-postgres sees
//! exactly the answers it would have seen. Everything else passes through unchanged, and a Sync is only
//! ever dropped between two such reads, so no write shares a transaction
//! with anything.
//!
//! Statements of one batch share its implicit transaction: when one fails
//! (a cancel, a statement timeout), the server skips the rest of the batch
//! until the Sync. Those reads are sent again, each with its own Sync, and
//! the answers to whatever was written after the batch are held back until
//! theirs, so every caller still gets its own statement's answer, in order.
//! (Holding answers back suits these connections: short reads, at most
//! [`super::shared::DEPTH`] in flight. A connection that also ran a
//! `COPY … FROM STDIN`, which waits for its CopyInResponse before it sends
//! its rows, or streamed large results, must not use this.)
//!
//! Sync messages are counted to know which answer belongs to which request:
//! every Sync, simple Query and FunctionCall gets one ReadyForQuery, except
//! the Sync tokio-postgres writes right after a `COPY … FROM STDIN`'s
//! Execute, which the server ignores in copy-in mode (it is known by the
//! CopyInResponse that precedes it).

use bytes::{Buf, Bytes, BytesMut};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The statements that may share a Sync: read-only, one short lookup each.
pub static READS: &[&str] = &[
    crate::sessions::sql::BY_ID.sql,
    crate::sessions::sql::BY_REQUEST_ID.sql,
    crate::sessions::SUMMARY_SQL,
];

/// Most reads one Sync covers (the reads of a shared connection at most).
const MOST_IN_BATCH: usize = super::shared::DEPTH;

const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// A connection's stream with its reads' Syncs coalesced (see the module).
pub struct Coalesce<S> {
    inner: S,
    /// Past startup (the first ReadyForQuery): before it, bytes pass as
    /// they are.
    live: bool,
    /// From tokio-postgres, not yet a whole message.
    from_client: BytesMut,
    /// For the server.
    to_server: BytesMut,
    /// Names of the prepared statements whose SQL is one of [`READS`].
    reads: HashSet<Bytes>,
    /// The next Sync from the client is the one a COPY's copy-in ignores.
    ignored_sync: bool,
    /// What the server owes, in the order it answers.
    owed: VecDeque<Owed>,
    /// The next request's place in the client's order.
    next_seq: u64,
    /// The request whose answer tokio-postgres reads next.
    turn: u64,
    /// Answers that came before their turn: bytes, and whether complete.
    held: BTreeMap<u64, (BytesMut, bool)>,
    /// Batches written so far (names a batch).
    batches: u64,
    /// From the server, not yet a whole message.
    from_server: BytesMut,
    /// For tokio-postgres.
    to_client: BytesMut,
}

/// One answer the server owes.
struct Owed {
    /// The request's place in the client's order (`u64::MAX`: none).
    seq: u64,
    kind: Kind,
}

enum Kind {
    /// A Sync: ends at the server's ReadyForQuery.
    Plain,
    /// A simple Query (or FunctionCall): ends at the server's
    /// ReadyForQuery.
    Query,
    /// A read of a batch, ended by its result when it is not the last
    /// (`last`); `again` is its Bind and Execute, sent again if an earlier
    /// read of the batch fails.
    Read {
        batch: u64,
        last: bool,
        again: Bytes,
    },
    /// The ReadyForQuery of a batch whose last reads were skipped; it ends
    /// no request and is dropped.
    Dropped,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Coalesce {
            inner,
            live: false,
            from_client: BytesMut::new(),
            to_server: BytesMut::new(),
            reads: HashSet::new(),
            ignored_sync: false,
            owed: VecDeque::new(),
            next_seq: 0,
            turn: 0,
            held: BTreeMap::new(),
            batches: 0,
            from_server: BytesMut::new(),
            to_client: BytesMut::new(),
        }
    }

    /// Moves the whole messages from the client to the server, dropping
    /// the Syncs between reads.
    fn take_client_messages(&mut self) {
        let mut taken = std::mem::take(&mut self.from_client);
        let buf = &taken[..];
        let mut spans: Vec<(u8, usize, usize)> = Vec::new();
        let mut at = 0;
        while let Some((ty, end)) = whole_message(buf, at) {
            spans.push((ty, at, end));
            at = end;
        }
        // The messages of the request being written since the last Sync.
        let mut request_from = 0;
        let mut in_batch = 0usize;
        let mut batched = 0;
        for i in 0..spans.len() {
            let (ty, from, end) = spans[i];
            let body = &buf[from + 5..end];
            match ty {
                b'P' => self.parsed(body),
                b'C' if body.first() == Some(&b'S') => {
                    if let Some(name) = cstr(&body[1..]) {
                        self.reads.remove(name);
                    }
                }
                b'Q' | b'F' => self.owe(Kind::Query),
                b'S' if self.ignored_sync => self.ignored_sync = false,
                b'S' => {
                    let read = i == request_from + 2 && self.is_read(&spans[request_from..i], buf);
                    let next_read = read
                        && spans.len() >= i + 4
                        && spans[i + 3].0 == b'S'
                        && self.is_read(&spans[i + 1..i + 3], buf);
                    if read && (in_batch > 0 || next_read) {
                        let again = Bytes::copy_from_slice(&buf[spans[request_from].1..from]);
                        let last = !(next_read && in_batch + 1 < MOST_IN_BATCH);
                        self.owe(Kind::Read {
                            batch: self.batches,
                            last,
                            again,
                        });
                        batched += 1;
                        request_from = i + 1;
                        if last {
                            in_batch = 0;
                            self.batches += 1;
                        } else {
                            in_batch += 1;
                            // The Sync is dropped.
                            continue;
                        }
                    } else {
                        self.owe(Kind::Plain);
                    }
                }
                _ => {}
            }
            if ty == b'S' || ty == b'Q' || ty == b'F' {
                request_from = i + 1;
            }
            self.to_server.extend_from_slice(&buf[from..end]);
        }
        taken.advance(at);
        self.from_client = taken;
        if batched > 0 {
            crate::observability::reads_batched(batched);
        }
    }

    /// Whether `spans` (two messages) are a Bind of one of [`READS`] and
    /// an Execute.
    fn is_read(&self, spans: &[(u8, usize, usize)], buf: &[u8]) -> bool {
        let [(b'B', bind, bind_end), (b'E', _, _)] = spans else {
            return false;
        };
        // Bind: portal name, then statement name.
        let body = &buf[bind + 5..*bind_end];
        let Some(portal) = cstr(body) else {
            return false;
        };
        cstr(&body[portal.len() + 1..]).is_some_and(|name| self.reads.contains(name))
    }

    /// A Parse: its statement is a read when its SQL is one of [`READS`].
    fn parsed(&mut self, body: &[u8]) {
        let Some(name) = cstr(body) else { return };
        if name.is_empty() {
            return;
        }
        let sql = cstr(&body[name.len() + 1..]);
        if sql.is_some_and(|sql| READS.iter().any(|r| r.as_bytes() == sql)) {
            self.reads.insert(Bytes::copy_from_slice(name));
        } else {
            self.reads.remove(name);
        }
    }

    fn owe(&mut self, kind: Kind) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.owed.push_back(Owed { seq, kind });
    }

    /// Moves the whole messages from the server to the client, each to
    /// its request's turn.
    fn take_server_messages(&mut self) -> io::Result<()> {
        while let Some((ty, end)) = whole_message(&self.from_server, 0) {
            let message = self.from_server.split_to(end).freeze();
            if !self.live {
                self.live = ty == b'Z';
                self.to_client.extend_from_slice(&message);
                continue;
            }
            self.answer(ty, message)?;
        }
        Ok(())
    }

    fn answer(&mut self, ty: u8, message: Bytes) -> io::Result<()> {
        // Notices, notifications and parameter changes belong to no request.
        if matches!(ty, b'N' | b'A' | b'S') {
            self.to_client.extend_from_slice(&message);
            return Ok(());
        }
        let Some(front) = self.owed.front() else {
            // Nothing owed: an error the server sends before it closes.
            self.to_client.extend_from_slice(&message);
            return Ok(());
        };
        let seq = front.seq;
        match (&front.kind, ty) {
            (Kind::Dropped, b'Z') => {
                self.owed.pop_front();
            }
            (Kind::Dropped, _) => {}
            (Kind::Read { last: false, .. }, b'Z') => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server ended a batch of reads early",
                ));
            }
            (
                Kind::Read {
                    last: false, batch, ..
                },
                b'C' | b'I' | b's' | b'E',
            ) => {
                let batch = *batch;
                self.owed.pop_front();
                self.deliver(seq, &message);
                self.deliver(seq, &ready_for_query());
                self.completed(seq);
                if ty == b'E' {
                    self.send_skipped_again(batch);
                }
            }
            (_, b'Z') => {
                self.owed.pop_front();
                self.deliver(seq, &message);
                self.completed(seq);
            }
            (kind, _) => {
                if ty == b'G' && matches!(kind, Kind::Plain) {
                    // COPY FROM STDIN by Bind/Execute: copy-in ignores the
                    // Sync written after the Execute.
                    self.ignored_sync = true;
                }
                self.deliver(seq, &message);
            }
        }
        Ok(())
    }

    /// The reads of `batch` after the one that failed were skipped by the
    /// server: each goes again with its own Sync, answered after what is
    /// owed now.
    fn send_skipped_again(&mut self, batch: u64) {
        let mut again = Vec::new();
        while let Some(Owed {
            kind: Kind::Read { batch: b, .. },
            ..
        }) = self.owed.front()
        {
            if *b != batch {
                break;
            }
            let Some(Owed {
                seq,
                kind: Kind::Read { again: bytes, .. },
            }) = self.owed.pop_front()
            else {
                unreachable!("matched above");
            };
            again.push((seq, bytes));
        }
        if again.is_empty() {
            return;
        }
        // The batch's ReadyForQuery still comes, and ends none of them.
        self.owed.push_front(Owed {
            seq: u64::MAX,
            kind: Kind::Dropped,
        });
        crate::observability::reads_sent_again(again.len() as u64);
        for (seq, bytes) in again {
            self.to_server.extend_from_slice(&bytes);
            self.to_server.extend_from_slice(&SYNC);
            self.owed.push_back(Owed {
                seq,
                kind: Kind::Plain,
            });
        }
    }

    /// Part of request `seq`'s answer: to the client if it is its turn,
    /// else held.
    fn deliver(&mut self, seq: u64, bytes: &[u8]) {
        if seq == self.turn {
            self.to_client.extend_from_slice(bytes);
        } else {
            self.held
                .entry(seq)
                .or_insert_with(|| (BytesMut::new(), false))
                .0
                .extend_from_slice(bytes);
        }
    }

    /// Request `seq` has its whole answer.
    fn completed(&mut self, seq: u64) {
        if seq != self.turn {
            self.held
                .entry(seq)
                .or_insert_with(|| (BytesMut::new(), false))
                .1 = true;
            return;
        }
        self.turn += 1;
        while let Some((bytes, done)) = self.held.remove(&self.turn) {
            self.to_client.extend_from_slice(&bytes);
            if !done {
                break;
            }
            self.turn += 1;
        }
    }
}

/// ReadyForQuery, idle (tokio-postgres reads no more of it).
fn ready_for_query() -> [u8; 6] {
    [b'Z', 0, 0, 0, 5, b'I']
}

/// The type and end of the whole message at `at` of `buf`, if it is whole.
fn whole_message(buf: &[u8], at: usize) -> Option<(u8, usize)> {
    let header = buf.get(at..at + 5)?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let end = at.checked_add(1)?.checked_add(len.max(4))?;
    (end <= buf.len()).then_some((header[0], end))
}

/// The NUL-terminated string at the start of `bytes` (without the NUL).
fn cstr(bytes: &[u8]) -> Option<&[u8]> {
    let nul = bytes.iter().position(|&b| b == 0)?;
    Some(&bytes[..nul])
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes what is queued for the server.
    fn poll_to_server(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.to_server.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.to_server) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.to_server.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.to_client.is_empty() {
                let n = this.to_client.len().min(buf.remaining());
                buf.put_slice(&this.to_client[..n]);
                this.to_client.advance(n);
                return Poll::Ready(Ok(()));
            }
            match tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.from_server,
            ) {
                Poll::Ready(Ok(0)) => {
                    // End of stream: what is whole was delivered already.
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            this.take_server_messages()?;
            // Reads sent again go out now. A failure to write them is left
            // for tokio-postgres's next write or flush to meet, after the
            // answers already here are read.
            if !this.to_server.is_empty() {
                let _ = this.poll_to_server(cx);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.live {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // Back-pressure: take more only once the last is on its way.
        if this.to_server.len() >= 64 * 1024 {
            match this.poll_to_server(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.from_client.extend_from_slice(buf);
        this.take_client_messages();
        match this.poll_to_server(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_to_server(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.poll_to_server(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

impl<S: tokio_postgres::tls::TlsStream + Unpin> tokio_postgres::tls::TlsStream for Coalesce<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose streams are [`Coalesce`]d above the TLS.
pub struct CoalescingTls<T>(pub T);

impl<S, T: tokio_postgres::tls::TlsConnect<S>> tokio_postgres::tls::TlsConnect<S>
    for CoalescingTls<T>
{
    type Stream = Coalesce<T::Stream>;
    type Error = T::Error;
    type Future = futures::future::MapOk<T::Future, fn(T::Stream) -> Coalesce<T::Stream>>;

    fn connect(self, stream: S) -> Self::Future {
        use futures::TryFutureExt;
        self.0
            .connect(stream)
            .map_ok(Coalesce::new as fn(T::Stream) -> Coalesce<T::Stream>)
    }
}

/// A connection whose stream is [`Coalesce`]d, or `None` when `config` is
/// not one this connects itself (several hosts or addresses, a target
/// session kind, load balancing) or the socket could not be opened: the
/// caller then connects through tokio-postgres as usual, which reports the
/// failure in its own terms.
///
/// tokio-postgres does not know where such a connection goes, so its
/// cancel token is used through [`cancel`].
pub async fn connect(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Option<
    Result<
        (
            tokio_postgres::Client,
            impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + use<>,
        ),
        tokio_postgres::Error,
    >,
> {
    use futures::future::Either::{Left, Right};
    let connected = match open(config).await? {
        Opened::Unix(socket) => config
            .connect_raw(Coalesce::new(socket), tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| (client, Left(connection))),
        Opened::Tcp(socket, _) if config.get_ssl_mode() == SslMode::Disable => config
            .connect_raw(Coalesce::new(socket), tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| (client, Right(Left(connection)))),
        Opened::Tcp(socket, host) => {
            let tls = tls_for(tls, &host)?;
            config
                .connect_raw(socket, CoalescingTls(tls))
                .await
                .map(|(client, connection)| (client, Right(Right(connection))))
        }
    };
    Some(connected)
}

/// Cancels the statement running on the connection of `token`, made from
/// `config` by [`connect`] or by tokio-postgres.
pub async fn cancel(
    token: &tokio_postgres::CancelToken,
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if !own_socket(config) {
        return Ok(token.cancel_query(tls.clone()).await?);
    }
    match open(config)
        .await
        .ok_or("cannot reach the server to cancel")?
    {
        Opened::Unix(socket) => {
            token
                .cancel_query_raw(socket, tokio_postgres::NoTls)
                .await?
        }
        Opened::Tcp(socket, _) if config.get_ssl_mode() == SslMode::Disable => {
            token
                .cancel_query_raw(socket, tokio_postgres::NoTls)
                .await?
        }
        Opened::Tcp(socket, host) => {
            let tls = tls_for(tls, &host).ok_or("no TLS for the server's name")?;
            token.cancel_query_raw(socket, tls).await?
        }
    }
    Ok(())
}

/// A socket [`connect`] opened, with the host name TLS checks.
enum Opened {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, String),
}

/// Whether [`connect`] opens the sockets for `config`: one host, at most
/// one address, any session kind, no load balancing.
fn own_socket(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::{LoadBalanceHosts, TargetSessionAttrs};
    config.get_hosts().len() == 1
        && config.get_hostaddrs().len() <= 1
        && config.get_target_session_attrs() == TargetSessionAttrs::Any
        && config.get_load_balance_hosts() == LoadBalanceHosts::Disable
}

/// The socket to `config`'s server, opened as tokio-postgres would.
async fn open(config: &tokio_postgres::Config) -> Option<Opened> {
    use tokio_postgres::config::Host;
    if !own_socket(config) {
        return None;
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let timeout = config.get_connect_timeout().copied();
    match config.get_hosts().first()? {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Some(Opened::Unix(
                within(timeout, tokio::net::UnixStream::connect(path)).await?,
            ))
        }
        Host::Tcp(name) => {
            let socket = match config.get_hostaddrs().first() {
                Some(addr) => {
                    within(timeout, tokio::net::TcpStream::connect((*addr, port))).await?
                }
                None => {
                    within(
                        timeout,
                        tokio::net::TcpStream::connect((name.as_str(), port)),
                    )
                    .await?
                }
            };
            tcp_options(&socket, config).ok()?;
            Some(Opened::Tcp(socket, name.clone()))
        }
    }
}

/// The TLS connector for `host`.
fn tls_for(
    tls: &MakeRustlsConnect,
    host: &str,
) -> Option<
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio::net::TcpStream>>::TlsConnect,
> {
    let mut make = tls.clone();
    tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, host)
        .ok()
}

/// `open`'s socket, or `None` when it failed or took longer than `timeout`.
async fn within<T>(
    timeout: Option<std::time::Duration>,
    open: impl std::future::Future<Output = io::Result<T>>,
) -> Option<T> {
    match timeout {
        Some(t) => tokio::time::timeout(t, open).await.ok()?.ok(),
        None => open.await.ok(),
    }
}

/// The socket options tokio-postgres sets on its own TCP connections.
fn tcp_options(socket: &tokio::net::TcpStream, config: &tokio_postgres::Config) -> io::Result<()> {
    socket.set_nodelay(true)?;
    let socket = socket2::SockRef::from(socket);
    if config.get_keepalives() {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if let Some(timeout) = config.get_tcp_user_timeout() {
        socket.set_tcp_user_timeout(Some(*timeout))?;
    }
    Ok(())
}
