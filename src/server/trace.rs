//! One span per RPC, a child of the caller's W3C trace when `traceparent`
//! arrives, with the gRPC status code recorded when the call ends (from the
//! headers of a trailers-only reply, or from the trailers of a streamed one),
//! and one log line per call at a level chosen by that code.
//!
//! The same layer gives every non-OK status its ErrorInfo (see
//! [`super::error_info`]) before recording it, probes' and tools' calls
//! included (they are not traced): one watch over each reply instead of two.
//!
//! A caller controls the path, so nothing here grows with it: a method the
//! gateway does not serve is named `_OTHER` in spans and metrics, its path
//! is logged cut short, and lines about refused or failed calls pass a rate
//! limit (a token bucket) that reports how many similar lines it dropped.

use super::error_info::complete;
use crate::observability::{OTHER_METHOD, method_label};
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Tower layer adding the RPC span.
#[derive(Clone, Copy, Default)]
pub struct RpcTraceLayer;

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace { inner }
    }
}

#[derive(Clone)]
pub struct RpcTrace<S> {
    inner: S,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Probes and tooling are not traced: they would drown the real calls.
fn is_infrastructure(service: &str) -> bool {
    service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.")
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for RpcTrace<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/');
        let (service, _) = path.split_once('/').unwrap_or((path, ""));
        if is_infrastructure(service) {
            let call = self.inner.call(req);
            return Box::pin(async move { Ok(completed(call.await?, None)) });
        }
        let label = method_label(path);
        let service = if label == OTHER_METHOD {
            OTHER_METHOD
        } else {
            service
        };
        let name = CallName {
            label,
            path: (label == OTHER_METHOD).then(|| cut(path, MAX_LOGGED_PATH).to_owned()),
        };
        // The RPC conventions (semconv 1.38+): `rpc.system.name`, the
        // fully-qualified `rpc.method`, `rpc.response.status_code` as a name
        // and `error.type` on failures. OTEL_SEMCONV_STABILITY_OPT_IN=rpc/dup
        // adds the older `rpc.system`, `rpc.service` and
        // `rpc.grpc.status_code` (not the old bare `rpc.method`: one key
        // cannot hold both forms).
        let span = tracing::info_span!(
            "rpc",
            otel.name = label,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system.name = "grpc",
            rpc.method = label,
            rpc.response.status_code = Empty,
            error.type = Empty,
            rpc.system = Empty,
            rpc.service = Empty,
            rpc.grpc.status_code = Empty,
        );
        if old_conventions() {
            span.record("rpc.system", "grpc");
            span.record("rpc.service", service);
        }
        // A span nothing records (no exporter, logs above `info`) needs no
        // parent: skip reading the caller's trace context.
        if !span.is_disabled() {
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(req.headers()))
            });
            // Fails only when no OpenTelemetry layer is installed.
            let _ = span.set_parent(parent);
        }

        // The call's own deadline, enforced here (the only server-side timer
        // on it) so that a call stuck on an unresponsive database answers
        // DEADLINE_EXCEEDED at its deadline rather than leaving the caller's
        // own timer to give up on it. Statement timeouts fire earlier in the
        // normal case; this is the backstop.
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::call::parse_grpc_timeout)
            .map(|t| t.mul_f64(0.95));

        let method = name;
        // The service polled ready takes the call now (in the call's span,
        // as the inner layers' own work); only its reply is awaited, so
        // nothing needs a clone of it.
        let started = Instant::now();
        let call = span
            .in_scope(|| self.inner.call(req))
            .instrument(span.clone());
        Box::pin(async move {
            let response = match deadline {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(response) => response?,
                    Err(_) => <tonic::Status as tonic_types::StatusExt>::with_error_details(
                        tonic::Code::DeadlineExceeded,
                        "the call's deadline expired before the database answered",
                        crate::error::error_info(crate::error::Reason::DeadlineExceeded),
                    )
                    .into_http(),
                },
                None => call.await?,
            };
            let watch = Watch {
                method,
                span,
                started,
            };
            Ok(completed(response, Some(watch)))
        })
    }
}

/// Completes the status of `response` with its ErrorInfo, and records it
/// on the call's span (`watch`) once it is known: now for a trailers-only
/// reply, else when the body's trailers pass.
fn completed(
    mut response: http::Response<tonic::body::Body>,
    watch: Option<Watch>,
) -> http::Response<tonic::body::Body> {
    if response.headers().contains_key("grpc-status") {
        complete(response.headers_mut());
        if let Some(watch) = watch
            && let Some(code) = grpc_status(response.headers())
        {
            watch.finish(code);
        }
        return response;
    }
    response.map(|inner| tonic::body::Body::new(StatusBody { inner, watch }))
}

/// Whether `OTEL_SEMCONV_STABILITY_OPT_IN` asks for the pre-1.38 RPC
/// attributes alongside the current ones (`rpc/dup`).
fn old_conventions() -> bool {
    static DUP: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("OTEL_SEMCONV_STABILITY_OPT_IN")
            .is_ok_and(|v| v.split(',').any(|c| c.trim() == "rpc/dup"))
    });
    *DUP
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Longest part of an unknown path that is logged, in bytes.
const MAX_LOGGED_PATH: usize = 128;

/// What a call is named in metrics and logs.
struct CallName {
    /// The served method, or `_OTHER`.
    label: &'static str,
    /// For `_OTHER`: the path the caller sent, cut short.
    path: Option<String>,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A token bucket over log lines: `burst` lines at once, then `per_second`.
/// Lines it refuses are counted and reported with the next line it admits.
pub(crate) struct LogBudget {
    burst: f64,
    per_second: f64,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    tokens: f64,
    refilled: Option<Instant>,
    suppressed: u64,
}

impl LogBudget {
    pub(crate) const fn new(burst: u32, per_second: u32) -> Self {
        LogBudget {
            burst: burst as f64,
            per_second: per_second as f64,
            state: Mutex::new(BudgetState {
                tokens: burst as f64,
                refilled: None,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines suppressed since the last admitted one)` when a line may
    /// be written now; `None` (and one more suppressed) otherwise.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let since = s
            .refilled
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        s.tokens = (s.tokens + since.as_secs_f64() * self.per_second).min(self.burst);
        s.refilled = Some(now);
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// Lines about calls refused for the caller's own mistake (no key, bad
/// argument, unknown method): anyone can cause them.
static REJECTED_LINES: LogBudget = LogBudget::new(20, 10);
/// Lines about server-side failures of served methods.
static FAILED_LINES: LogBudget = LogBudget::new(50, 20);

/// Records the outcome on the span and logs the call: client mistakes at
/// `info`, server-side trouble at `warn`/`error`, successes at `debug`;
/// all but successes within a [`LogBudget`].
fn finish(span: &Span, name: &CallName, code: i32, started: Instant) {
    let elapsed = started.elapsed();
    crate::observability::rpc_finished(name.label, code, elapsed, span);
    let code_name = crate::observability::grpc_code_name(code);
    span.record("rpc.response.status_code", code_name);
    if old_conventions() {
        span.record("rpc.grpc.status_code", code);
    }
    let code = tonic::Code::from_i32(code);
    use tonic::Code::*;
    let server_fault = matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    );
    if server_fault {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", code_name);
    }
    let ms = elapsed.as_secs_f64() * 1000.0;
    let _entered = span.enter();
    if code == Ok {
        tracing::debug!(grpc.code = ?code, elapsed_ms = ms, "rpc finished");
        return;
    }
    let unknown_method = name.path.is_some();
    let budget = if unknown_method || !(server_fault || code == ResourceExhausted) {
        &REJECTED_LINES
    } else {
        &FAILED_LINES
    };
    let Some(suppressed) = budget.admit() else {
        return;
    };
    if suppressed > 0 {
        tracing::warn!(
            suppressed,
            "{suppressed} similar lines about refused or failed calls suppressed"
        );
    }
    if let Some(path) = name.path.as_deref() {
        tracing::info!(grpc.code = ?code, elapsed_ms = ms, path, "call to an unknown method");
        return;
    }
    match code {
        Internal | Unknown | DataLoss | Unimplemented => {
            tracing::error!(grpc.code = ?code, elapsed_ms = ms, "rpc failed")
        }
        Unavailable | ResourceExhausted | DeadlineExceeded => {
            tracing::warn!(grpc.code = ?code, elapsed_ms = ms, "rpc failed")
        }
        _ => tracing::info!(grpc.code = ?code, elapsed_ms = ms, "rpc rejected"),
    }
}

/// A traced call whose status is still to come.
struct Watch {
    method: CallName,
    span: Span,
    started: Instant,
}

impl Watch {
    fn finish(self, code: i32) {
        finish(&self.span, &self.method, code, self.started);
    }
}

/// Passes a response body through, completing the status in its trailers
/// and recording it on the call's span (`watch`, taken when done).
struct StatusBody {
    inner: tonic::body::Body,
    watch: Option<Watch>,
}

impl Body for StatusBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    complete(trailers);
                    if let Some(code) = grpc_status(trailers)
                        && let Some(watch) = self.watch.take()
                    {
                        watch.finish(code);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                // The stream ended without a status: the client went away.
                if let Some(watch) = self.watch.take() {
                    watch.finish(tonic::Code::Cancelled as i32);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StatusBody {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.finish(tonic::Code::Cancelled as i32);
        }
    }
}
