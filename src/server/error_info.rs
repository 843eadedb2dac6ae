//! Every non-OK status leaves the gateway with a `google.rpc.ErrorInfo`
//! (domain `verdict.v1`), whoever made it: statuses from [`crate::error::Error`]
//! carry one already; those tonic makes by itself (unknown method, codec
//! failures, a handler returning a stream's error as is) get one here, with
//! a reason chosen by code, and tonic's codec failures are reclassified
//! (see [`super::decode`]).
//!
//! The trace layer ([`super::trace`]) applies [`complete`] to every reply's
//! status, in the headers of a trailers-only reply or in the trailers of a
//! streamed one, before it records the status: the OK path costs one
//! comparison; only a non-OK status is parsed.

use super::decode;
use crate::error::{ERROR_DOMAIN, RETRY_DELAY, Reason};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::HeaderMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetail, ErrorInfo, RetryInfo, StatusExt};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";
const GRPC_DETAILS: &str = "grpc-status-details-bin";

/// `grpc-status-details-bin` is base64 with or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Gives the status in `headers` (headers of a trailers-only reply, or
/// trailers) an ErrorInfo when it is non-OK and has none, and rewrites
/// tonic's codec failures. OK statuses are left untouched at the cost of
/// one comparison.
pub fn complete(headers: &mut HeaderMap) {
    let Some(code) = headers.get(GRPC_STATUS) else {
        return;
    };
    if code.as_bytes() == b"0" {
        return;
    }
    let code = Code::from_bytes(code.as_bytes());
    let message = headers
        .get(GRPC_MESSAGE)
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    if let Some(status) = decode::rewrite(code, &message) {
        replace(headers, &status);
        return;
    }
    let details = headers
        .get(GRPC_DETAILS)
        .and_then(|d| BASE64.decode(d.as_bytes()).ok())
        .map(Bytes::from)
        .unwrap_or_default();
    let mut parts = Status::with_details(code, message.clone(), details).get_error_details_vec();
    if parts.iter().any(|d| matches!(d, ErrorDetail::ErrorInfo(_))) {
        return;
    }
    let reason = match code {
        Code::Unavailable if message.contains("shutting down") => Reason::ShuttingDown,
        code => Reason::for_code(code),
    };
    parts.push(ErrorDetail::ErrorInfo(ErrorInfo::new(
        reason.as_str(),
        ERROR_DOMAIN,
        std::collections::HashMap::<String, String>::new(),
    )));
    if reason.is_retryable() && !parts.iter().any(|d| matches!(d, ErrorDetail::RetryInfo(_))) {
        parts.push(ErrorDetail::RetryInfo(RetryInfo::new(Some(RETRY_DELAY))));
    }
    let message = if message.is_empty() && code == Code::Unimplemented {
        "this gateway has no such service or method".to_owned()
    } else {
        message
    };
    replace(
        headers,
        &Status::with_error_details_vec(code, message, parts),
    );
}

fn replace(headers: &mut HeaderMap, status: &Status) {
    headers.remove(GRPC_STATUS);
    headers.remove(GRPC_MESSAGE);
    headers.remove(GRPC_DETAILS);
    if status.add_header(headers).is_err() {
        // Only a message that cannot be a header value fails: send the bare code.
        headers.insert(GRPC_STATUS, (status.code() as i32).into());
    }
}

/// `grpc-message` is percent-encoded (RFC 3986 style, UTF-8).
fn percent_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(headers: &HeaderMap) -> Status {
        let mut h = headers.clone();
        if let Some(d) = h.get(GRPC_DETAILS) {
            let padded = base64::engine::general_purpose::STANDARD
                .encode(BASE64.decode(d.as_bytes()).unwrap());
            h.insert(GRPC_DETAILS, padded.parse().unwrap());
        }
        Status::from_header_map(&h).unwrap()
    }

    #[test]
    fn a_bare_status_gets_an_error_info_by_code() {
        let mut h = HeaderMap::new();
        h.insert(GRPC_STATUS, "12".parse().unwrap());
        complete(&mut h);
        let s = status_of(&h);
        assert_eq!(s.code(), Code::Unimplemented);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("UNKNOWN_METHOD", "verdict.v1")
        );
        assert!(!s.message().is_empty());
    }

    #[test]
    fn an_existing_error_info_and_other_details_are_kept() {
        let original: Status = crate::error::Error::invalid("name", "is required").into();
        let mut h = HeaderMap::new();
        original.add_header(&mut h).unwrap();
        let before = h.clone();
        complete(&mut h);
        assert_eq!(h, before);

        // BadRequest without ErrorInfo: ErrorInfo is added, BadRequest kept.
        let mut details = tonic_types::ErrorDetails::new();
        details.add_bad_request_violation("x", "bad");
        let bare = Status::with_error_details(Code::InvalidArgument, "x: bad 100%", details);
        let mut h = HeaderMap::new();
        bare.add_header(&mut h).unwrap();
        complete(&mut h);
        let s = status_of(&h);
        assert_eq!(s.message(), "x: bad 100%");
        assert_eq!(s.get_details_error_info().unwrap().reason, "INVALID_FIELD");
        assert_eq!(
            s.get_details_bad_request().unwrap().field_violations.len(),
            1
        );
    }

    #[test]
    fn ok_statuses_are_untouched() {
        let mut h = HeaderMap::new();
        h.insert(GRPC_STATUS, "0".parse().unwrap());
        complete(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn unavailable_statuses_are_retryable() {
        let mut h = HeaderMap::new();
        Status::unavailable("the gateway is shutting down; watch again")
            .add_header(&mut h)
            .unwrap();
        complete(&mut h);
        let s = status_of(&h);
        assert_eq!(s.get_details_error_info().unwrap().reason, "SHUTTING_DOWN");
        assert!(s.get_details_retry_info().is_some());
    }
}
