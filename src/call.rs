//! What a handler knows about the call it serves, beyond the message.

use crate::auth::{Caller, KeyId};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Per-call context: the deadline the caller set with `grpc-timeout`, who
/// calls (the auth layer's [`Caller`]) and the call's trace id, which the
/// audit trail records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call {
    deadline: Option<Instant>,
    caller: Option<Caller>,
    trace_id: Option<[u8; 16]>,
}

impl Call {
    /// Reads the call's deadline from its metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        Call {
            deadline: timeout.map(|t| Instant::now() + t),
            caller: None,
            trace_id: None,
        }
    }

    /// The context of a request: its metadata, the caller the auth layer
    /// put in its extensions, and the trace id of the current RPC span (or,
    /// without an OpenTelemetry exporter, of an incoming `traceparent`).
    pub fn from_request<T>(request: &tonic::Request<T>) -> Self {
        let mut call = Call::from_metadata(request.metadata());
        call.caller = request.extensions().get::<Caller>().copied();
        call.trace_id = current_trace_id().or_else(|| {
            request
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_traceparent)
        });
        call
    }

    /// The context of a command-line operation (`verdict cleanup`, …), which
    /// the audit trail records under `name` (e.g. `cli:cleanup`).
    pub fn command_line(name: &'static str) -> Self {
        Call {
            caller: Some(Caller {
                key_id: None,
                rpc: name,
                project: None,
                bound: None,
            }),
            ..Call::default()
        }
    }

    /// The same call working in the project `project` (command-line
    /// operations and background jobs, which name their project themselves).
    pub fn in_project(mut self, project: uuid::Uuid) -> Self {
        let caller = self.caller.get_or_insert(Caller {
            key_id: None,
            rpc: "",
            project: None,
            bound: None,
        });
        caller.project = Some(project);
        self
    }

    /// The project the call works in, as the auth layer resolved it (see
    /// [`crate::projects`]). INTERNAL when there is none: every RPC past the
    /// auth layer has one, so its absence is a bug.
    pub fn project(&self) -> crate::error::Result<uuid::Uuid> {
        self.caller
            .and_then(|c| c.project)
            .ok_or_else(|| crate::error::Error::Internal("the call has no project".into()))
    }

    /// The project the caller's key is bound to; `None`: every project.
    pub fn bound_project(&self) -> Option<uuid::Uuid> {
        self.caller.and_then(|c| c.bound)
    }

    /// The caller's API key; `None` when authentication is off.
    pub fn key_id(&self) -> Option<KeyId> {
        self.caller.and_then(|c| c.key_id)
    }

    /// The full gRPC path of the call; empty outside a call.
    pub fn rpc(&self) -> &'static str {
        self.caller.map_or("", |c| c.rpc)
    }

    /// The W3C trace id, 32 lowercase hex characters.
    pub fn trace_id(&self) -> Option<String> {
        self.trace_id
            .map(|t| t.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Time left before the deadline, if the caller set one.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

fn current_trace_id() -> Option<[u8; 16]> {
    let context = tracing::Span::current().context();
    let span = opentelemetry::trace::TraceContextExt::span(&context);
    let id = span.span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_bytes())
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn parse_traceparent(value: &str) -> Option<[u8; 16]> {
    let mut parts = value.split('-');
    let (_version, trace, _parent) = (parts.next()?, parts.next()?, parts.next()?);
    if trace.len() != 32 || trace.bytes().all(|b| b == b'0') {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(trace.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Parses the `grpc-timeout` header: up to 8 digits and a unit
/// (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
    }

    #[test]
    fn traceparent_yields_its_trace_id() {
        let id = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(id.unwrap()[0], 0x4b);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
        assert!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("00-é4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01").is_none()
        );
    }
}
