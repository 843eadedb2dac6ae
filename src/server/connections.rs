//! The HTTP connections the gateway serves, driven with hyper directly
//! (issue 13).
//!
//! tonic's transport wraps every call in a stack of its own before the
//! gateway's layers see it: the whole service stack cloned into a new box,
//! the connection's info inserted, `grpc-timeout` parsed again (the trace
//! layer enforces the call's deadline, earlier), a span entered that
//! nothing records, and the reply's body wrapped in an error adapter and
//! boxed once more, which every frame of the reply is then polled through.
//! Here a call costs a clone of the stack (reference counts, no box), the
//! connection's info in its extensions (so `remote_addr()` and
//! `peer_certs()` read as with tonic), and nothing around the reply.
//!
//! What the transport did that callers lean on is kept: HTTP/2 with the
//! advertised stream limit and keep-alive pings, HTTP/1.1 on the same port
//! (gRPC-Web), and on shutdown no new connections while every open one is
//! told to finish (GOAWAY) and waited for.

use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::body::Body;
use tonic::transport::server::Connected;
use tower::{Service, ServiceExt};

/// The HTTP settings of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Streams a client may open at once (advertised in SETTINGS).
    pub max_concurrent_streams: u32,
    /// How often an idle connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

/// Serves every connection `incoming` yields with `service` until
/// `shutdown` resolves; then stops accepting (the stream is dropped), asks
/// every open connection to finish its calls, and returns once all have
/// closed.
pub async fn serve<I, IO, S>(
    incoming: I,
    service: S,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) where
    I: Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces its HTTP/1.1 header read timeout only with a timer.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_concurrent_streams)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        // As under tonic's transport (which passes `None` here): no
        // lifetime cap on the streams h2 resets itself. hyper's default
        // (1,024 per connection, never replenished) would end with GOAWAY a
        // long-lived connection whose calls are often answered before their
        // body is read, e.g. a client refused for its key again and again
        // (tests/hostile_net.rs sends 22,000 such calls on one connection).
        .max_local_error_reset_streams(None);
    let graceful = GracefulShutdown::new();
    {
        // Dropped when the loop ends: the listener closes at once.
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            let io = tokio::select! {
                () = &mut shutdown => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "connection not accepted");
                        continue;
                    }
                    None => break,
                },
            };
            // Each call gets the connection's info in its extensions and a
            // clone of the service stack (hyper-util's adapter clones it).
            let info = io.connect_info();
            let calls = TowerToHyperService::new(service.clone().map_request(
                move |req: http::Request<Incoming>| {
                    let mut req = req.map(Body::new);
                    req.extensions_mut().insert(info.clone());
                    req
                },
            ));
            let connection = builder
                .serve_connection(TokioIo::new(io), calls)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }
    graceful.shutdown().await;
}
