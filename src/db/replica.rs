//! Read replicas with read-your-writes.
//!
//! With read endpoints configured (`VERDICT_DATABASE_READ_URL`: streaming
//! replicas, or CloudNativePG's `-ro` service), the read RPCs listed in
//! [`READ_RPCS`] take their connection from a replica pool; everything
//! else (writes, watches, exports, admin, transactions) stays on the
//! primary. The routing is central: [`ConsistencyLayer`] marks each call
//! (a task-local [`Scope`]) and [`super::Db::conn`] reads the mark, so
//! handlers do not change.
//!
//! **Consistency token.** Every successful reply of a call that began a
//! write transaction on the primary carries [`TOKEN_HEADER`]: a WAL
//! position (PostgreSQL's `X/Y` LSN text) read on the primary after the
//! commit — `pg_current_wal_flush_lsn()` (with `synchronous_commit` off,
//! `pg_current_wal_insert_lsn()`), which is at or past the end of the
//! commit record, and which a streaming replica can reach. A read that
//! sends the token back is served by a replica only once that replica's
//! `pg_last_wal_replay_lsn()` is at or past it — checked on the very
//! connection that serves the read, so it holds behind a load-balanced
//! endpoint too — waiting at most `VERDICT_READ_TOKEN_WAIT`, else the
//! primary serves it. A read without a token goes to a replica known to
//! have replayed everything the primary had flushed at most
//! `VERDICT_READ_MAX_LAG` ago (sampled on both sides every quarter of
//! that, at most every 250 ms): it may miss writes acknowledged within
//! that bound, never older ones.
//!
//! **Failures.** A replica that cannot be reached, is not a standby, or
//! lags beyond `VERDICT_READ_MAX_LAG` is skipped by every read; a read that
//! fails on a replica (UNAVAILABLE, ABORTED by a recovery conflict,
//! INTERNAL) is run again on the primary before the caller hears of it.
//! Readiness depends on the primary alone.

use super::{Conn, Db, Stmt};
use crate::call::Call;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::body::Body;
use tower::{Layer, Service};

/// The response header carrying a write's consistency token, and the
/// request header a read sends it back in.
pub const TOKEN_HEADER: &str = "x-verdict-consistency-token";

/// The unary read RPCs a replica may serve: pure reads, no transaction
/// that writes, no stream. Everything else uses the primary.
pub const READ_RPCS: &[&str] = &[
    "/verdict.v1.SessionService/GetSession",
    "/verdict.v1.SessionService/ListSessions",
    "/verdict.v1.SessionService/ListSessionLogs",
    "/verdict.v1.ResultService/GetResult",
    "/verdict.v1.ResultService/ListResults",
    "/verdict.v1.DiscrepancyService/ListDiscrepancies",
    "/verdict.v1.DiscrepancyService/ListResolutionHistory",
    "/verdict.v1.DiscrepancyService/SummarizeDiscrepancies",
    "/verdict.v1.MetricsService/QueryTimeSeries",
    "/verdict.v1.MetricsService/ListRollups",
    "/verdict.v1.MetricsService/GetTechnologyUsage",
    "/verdict.v1.TestCaseService/GetTestCase",
    "/verdict.v1.TestCaseService/ListTestCases",
    "/verdict.v1.TestCaseService/ListExecutions",
    "/verdict.v1.TestCaseService/GetTestStatistics",
    "/verdict.v1.CoverageService/GetAggregateCoverage",
    "/verdict.v1.CoverageService/GetCoverageTrend",
    "/verdict.v1.CoverageService/CompareCoverage",
    "/verdict.v1.TestRunService/GetTestRun",
    "/verdict.v1.TestRunService/ListTestRuns",
    "/verdict.v1.TestRunService/CompareTestRuns",
    "/verdict.v1.FailureService/ListFailureSignatures",
    "/verdict.v1.FailureService/ListTriageHistory",
    "/verdict.v1.TestCaseService/GetExecution",
    "/verdict.v1.DiscrepancyService/GetDiscrepancy",
    "/verdict.v1.CoverageService/GetCoverageReport",
    "/verdict.v1.CoverageService/ListCoverageFiles",
    "/verdict.v1.CoverageService/ListCoverageReports",
    "/verdict.v1.MetricsService/ListMetricPoints",
];

/// A WAL position: a byte offset in the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's text form, `X/Y` (each 1–8 hex digits).
    pub fn parse(text: &str) -> Option<Lsn> {
        let (hi, lo) = text.trim().split_once('/')?;
        let part = |p: &str| {
            (!p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(p, 16).ok())
                .flatten()
        };
        Some(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The primary's position every commit acknowledged so far is at or
/// before: the flushed WAL, or the inserted WAL when commits do not wait
/// for the flush (`synchronous_commit = off`).
const COMMITTED_LSN: Stmt = Stmt::new(
    "SELECT",
    "pg_current_wal_flush_lsn",
    "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off' \
     THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END \
     - '0/0'::pg_lsn)::bigint",
);

/// How far a standby has replayed; NULL on a server that is not one.
const REPLAYED_LSN: Stmt = Stmt::new(
    "SELECT",
    "pg_last_wal_replay_lsn",
    "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint",
);

/// How often a read with a token re-checks its replica's replay position.
const TOKEN_POLL: Duration = Duration::from_millis(2);

tokio::task_local! {
    static SCOPE: Arc<Scope>;
}

/// What [`ConsistencyLayer`] knows of the call running on this task.
#[derive(Debug, Default)]
pub struct Scope {
    /// The RPC may be served by a replica.
    read: bool,
    /// The token the caller sent back.
    token: Option<Lsn>,
    /// A replica served (part of) the call.
    replica_used: AtomicBool,
    /// The call began a write transaction on the primary.
    wrote: AtomicBool,
}

/// Notes that the running call began a transaction on the primary, so its
/// reply carries a consistency token.
pub(crate) fn note_write() {
    let _ = SCOPE.try_with(|s| s.wrote.store(true, Ordering::Relaxed));
}

/// The settings of [`Replicas`].
#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    /// A read without a token skips a replica not known to be this fresh.
    pub max_lag: Duration,
    /// How long a read with a token waits for a replica to replay to it.
    pub token_wait: Duration,
}

/// The read endpoints of a gateway and what is known of them.
#[derive(Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

struct Inner {
    replicas: Vec<Replica>,
    settings: ReadSettings,
    next: AtomicUsize,
    /// Recent samples of the primary's committed position: (when, where).
    samples: Mutex<VecDeque<(Instant, Lsn)>>,
}

struct Replica {
    db: Db,
    /// A label for logs (the endpoint's position in the setting).
    index: usize,
    state: Mutex<ReplicaState>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ReplicaState {
    /// Answered its last check as a standby.
    up: bool,
    /// The newest primary sample it had replayed at its last check.
    fresh_as_of: Option<Instant>,
}

impl Replicas {
    /// Read endpoints over the given replica pools.
    pub fn new(pools: Vec<Db>, settings: ReadSettings) -> Self {
        Replicas {
            inner: Arc::new(Inner {
                replicas: pools
                    .into_iter()
                    .enumerate()
                    .map(|(index, db)| Replica {
                        db,
                        index,
                        state: Mutex::new(ReplicaState::default()),
                    })
                    .collect(),
                settings,
                next: AtomicUsize::new(0),
                samples: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// How often positions are sampled.
    fn interval(&self) -> Duration {
        (self.inner.settings.max_lag / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250))
    }

    /// Opens the replica pools' gates (they need no migration).
    pub fn set_ready(&self) {
        for r in &self.inner.replicas {
            r.db.set_ready();
        }
    }

    pub fn close(&self) {
        for r in &self.inner.replicas {
            r.db.close();
        }
    }

    /// Samples the primary's committed position and every replica's replay
    /// position, for as long as the gateway runs; closes the replicas'
    /// idle connections like the primary's.
    pub async fn run(self, primary: Db) {
        let maintain =
            futures::future::join_all(self.inner.replicas.iter().map(|r| r.db.clone().maintain()));
        let sample = async {
            let keep = (self.inner.settings.max_lag.as_micros()
                / self.interval().as_micros().max(1)) as usize
                + 4;
            let mut tick = tokio::time::interval(self.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match committed_lsn(&primary).await {
                    Ok(lsn) => {
                        let mut samples = self.inner.samples.lock().expect("samples");
                        samples.push_back((Instant::now(), lsn));
                        while samples.len() > keep {
                            samples.pop_front();
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot sample the primary's WAL position")
                    }
                }
                futures::future::join_all(self.inner.replicas.iter().map(|r| self.check(r))).await;
            }
        };
        tokio::join!(maintain, sample);
    }

    /// Checks one replica: whether it answers as a standby, and which
    /// primary sample it has replayed.
    async fn check(&self, replica: &Replica) {
        let checked = async {
            let mut conn = replica.db.conn_here(&Call::default()).await?;
            let row = REPLAYED_LSN.query_one(conn.client().await?, &[]).await?;
            Ok::<_, crate::error::Error>(row.get::<_, Option<i64>>(0))
        };
        let replayed = tokio::time::timeout(self.interval().max(Duration::from_secs(1)), checked)
            .await
            .unwrap_or(Err(crate::error::Error::DeadlineExceeded));
        let mut state = replica.state.lock().expect("replica state");
        let was_up = state.up;
        match replayed {
            Ok(Some(replayed)) => {
                let replayed = Lsn(replayed as u64);
                state.up = true;
                let samples = self.inner.samples.lock().expect("samples");
                if let Some(at) = samples
                    .iter()
                    .rev()
                    .find(|(_, lsn)| *lsn <= replayed)
                    .map(|(at, _)| *at)
                {
                    state.fresh_as_of = Some(state.fresh_as_of.map_or(at, |f| f.max(at)));
                }
            }
            Ok(None) => {
                if was_up || state.fresh_as_of.is_none() {
                    tracing::warn!(
                        replica = replica.index,
                        "a read endpoint is not a standby (pg_is_in_recovery() is false); not used for reads"
                    );
                }
                *state = ReplicaState::default();
            }
            Err(e) => {
                if was_up {
                    tracing::warn!(replica = replica.index, error = %e, "a read replica is unreachable; reads use the primary");
                }
                *state = ReplicaState::default();
            }
        }
        if state.up && !was_up {
            tracing::info!(replica = replica.index, "a read replica is available");
        }
    }

    /// A replica connection for a read with `token` (or without), or `None`
    /// when no replica qualifies in time (the primary then serves it).
    async fn read_conn(&self, call: &Call, token: Option<Lsn>) -> Option<Conn> {
        let n = self.inner.replicas.len();
        let first = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let wait = match call.remaining() {
            Some(left) => self.inner.settings.token_wait.min(left / 2),
            None => self.inner.settings.token_wait,
        };
        let until = Instant::now() + wait;
        for k in 0..n {
            let replica = &self.inner.replicas[(first + k) % n];
            let state = *replica.state.lock().expect("replica state");
            if !state.up {
                continue;
            }
            // A replica lagging beyond the bound is skipped by every read:
            // one with a token would only wait for it in vain.
            if state
                .fresh_as_of
                .is_none_or(|at| at.elapsed() > self.inner.settings.max_lag)
            {
                continue;
            }
            let mut conn = match replica.db.conn_here(call).await {
                Ok(conn) => conn,
                // Busy, not broken: the primary serves this one.
                Err(crate::error::Error::ResourceExhausted(..)) => continue,
                Err(e) => {
                    replica.set_down(&e);
                    continue;
                }
            };
            let Some(token) = token else {
                return Some(conn);
            };
            match replayed_to(&mut conn, token, until).await {
                Ok(true) => return Some(conn),
                Ok(false) => {}
                Err(e) => replica.set_down(&e),
            }
        }
        None
    }
}

impl Replica {
    fn set_down(&self, e: &crate::error::Error) {
        let mut state = self.state.lock().expect("replica state");
        if state.up {
            tracing::warn!(replica = self.index, error = %e, "a read replica failed; reads use the primary until it answers again");
        }
        *state = ReplicaState::default();
    }
}

/// Waits (until `until`) for the server of `conn` to replay to `token`.
async fn replayed_to(conn: &mut Conn, token: Lsn, until: Instant) -> crate::error::Result<bool> {
    loop {
        let row = REPLAYED_LSN.query_one(conn.client().await?, &[]).await?;
        match row.get::<_, Option<i64>>(0) {
            None => return Ok(false),
            Some(lsn) if Lsn(lsn as u64) >= token => return Ok(true),
            Some(_) if Instant::now() + TOKEN_POLL > until => return Ok(false),
            Some(_) => tokio::time::sleep(TOKEN_POLL).await,
        }
    }
}

/// The primary's committed position now (see [`COMMITTED_LSN`]).
async fn committed_lsn(primary: &Db) -> crate::error::Result<Lsn> {
    let mut conn = primary.conn_here(&Call::default()).await?;
    let row = COMMITTED_LSN.query_one(conn.client().await?, &[]).await?;
    Ok(Lsn(row.get::<_, i64>(0) as u64))
}

/// Picks a replica for the running call when it is a read (see the
/// module); `None` for the primary.
pub(crate) async fn route(replicas: &Replicas, call: &Call) -> Option<Conn> {
    let scope = SCOPE.try_with(|s| s.clone()).ok()?;
    if !scope.read {
        return None;
    }
    let conn = replicas.read_conn(call, scope.token).await?;
    scope.replica_used.store(true, Ordering::Relaxed);
    Some(conn)
}

/// The tower layer that routes reads and stamps consistency tokens (see
/// the module). Without read endpoints it does nothing.
#[derive(Clone)]
pub struct ConsistencyLayer {
    db: Db,
    max_request_bytes: usize,
}

impl ConsistencyLayer {
    /// `max_request_bytes` bounds what a read's request may hold (it is
    /// kept to run the read again on the primary).
    pub fn new(db: Db, max_request_bytes: usize) -> Self {
        ConsistencyLayer {
            db,
            max_request_bytes,
        }
    }
}

impl<S> Layer<S> for ConsistencyLayer {
    type Service = Consistency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Consistency {
            inner,
            layer: Arc::new(self.clone()),
        }
    }
}

#[derive(Clone)]
pub struct Consistency<S> {
    inner: S,
    /// Behind one `Arc`: the stack is cloned for every call, and the
    /// database handle holds several.
    layer: Arc<ConsistencyLayer>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<Body>> for Consistency<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, BoxFuture<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // Without read endpoints the layer is not there at all: the ready
        // service takes the call as it is (no clone, no allocation, no
        // task-local; `note_write` finds no scope and does nothing).
        let Some(replicas) = self.layer.db.replicas().cloned() else {
            return futures::future::Either::Left(self.inner.call(req));
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        futures::future::Either::Right(Box::pin(async move {
            // A token that does not parse cannot be checked: the primary
            // serves that read, which is never stale.
            let (read, token) = match req.headers().get(TOKEN_HEADER) {
                None => (READ_RPCS.contains(&req.uri().path()), None),
                Some(v) => match v.to_str().ok().and_then(Lsn::parse) {
                    Some(token) => (READ_RPCS.contains(&req.uri().path()), Some(token)),
                    None => (false, None),
                },
            };
            if !read {
                let scope = Arc::new(Scope::default());
                let mut response = SCOPE.scope(scope.clone(), inner.call(req)).await?;
                if scope.wrote.load(Ordering::Relaxed) && !is_error(&response) {
                    match committed_lsn(&layer.db).await {
                        Ok(lsn) => {
                            if let Ok(value) = http::HeaderValue::from_str(&lsn.to_string()) {
                                response.headers_mut().insert(TOKEN_HEADER, value);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the consistency token of a write")
                        }
                    }
                }
                return Ok(response);
            }
            // A read: keep its (small, unary) request to run it again on
            // the primary should the replica fail it.
            let (parts, body) = req.into_parts();
            let body = match collect(body, layer.max_request_bytes).await {
                Ok(bytes) => bytes,
                Err(failed) => {
                    // Let the handler see the broken or oversized body.
                    let req = http::Request::from_parts(parts, Body::new(failed));
                    return inner.call(req).await;
                }
            };
            let scope = Arc::new(Scope {
                read: true,
                token,
                ..Scope::default()
            });
            let first = http::Request::from_parts(parts.clone(), Body::new(Buffered::of(&body)));
            let response = SCOPE.scope(scope.clone(), inner.call(first)).await?;
            if !(scope.replica_used.load(Ordering::Relaxed) && retry_on_primary(&response)) {
                return Ok(response);
            }
            tracing::debug!(
                rpc = parts.uri.path(),
                "a read failed on a replica; running it on the primary"
            );
            replicas.note_failed_read();
            let again = http::Request::from_parts(parts, Body::new(Buffered::of(&body)));
            let primary = Arc::new(Scope::default());
            SCOPE.scope(primary, inner.call(again)).await
        }))
    }
}

impl Replicas {
    /// A read failed on a replica: have every replica checked again before
    /// the next read trusts it.
    fn note_failed_read(&self) {
        for r in &self.inner.replicas {
            let mut state = r.state.lock().expect("replica state");
            state.fresh_as_of = None;
        }
    }
}

/// Whether the reply is an error (a trailers-only response).
fn is_error<B>(response: &http::Response<B>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0")
}

/// Whether a read that a replica served failed in a way the primary may
/// not: the replica went away (UNAVAILABLE), cancelled the query for a
/// recovery conflict (ABORTED), or failed otherwise (INTERNAL, UNKNOWN).
fn retry_on_primary<B>(response: &http::Response<B>) -> bool {
    matches!(
        response.headers().get("grpc-status").map(|s| s.as_bytes()),
        Some(b"14" | b"10" | b"13" | b"2")
    )
}

/// Reads a request body whole, up to `limit` bytes; on failure, a body
/// that fails the same way.
async fn collect(mut body: Body, limit: usize) -> Result<Bytes, Buffered> {
    use http_body::Body as _;
    let mut bytes = BytesMut::new();
    loop {
        let frame = futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => return Ok(bytes.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if bytes.len() + data.len() > limit {
                        return Err(Buffered::failed(tonic::Status::resource_exhausted(
                            "the request is larger than the gateway accepts",
                        )));
                    }
                    bytes.extend_from_slice(&data);
                }
            }
            Some(Err(status)) => return Err(Buffered::failed(status)),
        }
    }
}

/// A request body held in memory (or the failure reading it).
struct Buffered {
    data: Option<Bytes>,
    failure: Option<tonic::Status>,
}

impl Buffered {
    fn of(bytes: &Bytes) -> Self {
        Buffered {
            data: (!bytes.is_empty()).then(|| bytes.clone()),
            failure: None,
        }
    }

    fn failed(status: tonic::Status) -> Self {
        Buffered {
            data: None,
            failure: Some(status),
        }
    }
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        Poll::Ready(self.failure.take().map(Err))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.failure.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::Lsn;

    #[test]
    fn lsns_read_and_print_as_postgresql_does() {
        assert_eq!(Lsn::parse("16/B374D848"), Some(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::parse("FFFFFFFF/FFFFFFFF"), Some(Lsn(u64::MAX)));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1/2/3",
            "+1/2",
            "123456789/0",
            "g/0",
            "1",
        ] {
            assert_eq!(Lsn::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn read_rpcs_are_unique_full_paths() {
        let mut seen = std::collections::HashSet::new();
        for rpc in super::READ_RPCS {
            assert!(rpc.starts_with("/verdict.v1.") && rpc.matches('/').count() == 2);
            assert!(seen.insert(rpc), "{rpc} twice");
        }
    }
}
