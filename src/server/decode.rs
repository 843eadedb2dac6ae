//! Statuses tonic's codec makes by itself, reclassified. Undecodable request
//! bytes are the caller's fault, yet tonic answers them with INTERNAL; a
//! message over the size limit is RESOURCE_EXHAUSTED by gRPC convention,
//! yet tonic answers OUT_OF_RANGE. [`rewrite`] turns both into the status a
//! caller can act on, with Verdict's ErrorInfo (the
//! [`super::error_info`] layer applies it to every reply).

use crate::error::{Error, Reason, error_info};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// How tonic's codec begins the message of a decode failure.
const DECODE_FAILURE: &str = "failed to decode Protobuf message";
/// How tonic's codec begins the message of a request over the limit.
const DECODE_TOO_LARGE: &str = "Error, decoded message length too large";
/// How tonic's codec begins the message of a reply over the limit.
const ENCODE_TOO_LARGE: &str = "Error, encoded message length too large";

/// The status to send instead of tonic's `code` + `message`, when they are
/// one of the codec's own failures.
pub fn rewrite(code: Code, message: &str) -> Option<Status> {
    match code {
        Code::Internal if message.starts_with(DECODE_FAILURE) => Some(malformed()),
        Code::OutOfRange if message.starts_with(DECODE_TOO_LARGE) => {
            let text = match sizes(message) {
                Some((found, limit)) => format!(
                    "the request message is {found} bytes, more than the {limit} bytes this gateway accepts; send smaller batches"
                ),
                None => {
                    "the request message is larger than this gateway accepts; send smaller batches"
                        .to_owned()
                }
            };
            Some(Error::ResourceExhausted(Reason::MessageTooLarge, text).into())
        }
        Code::OutOfRange if message.starts_with(ENCODE_TOO_LARGE) => {
            let text = match sizes(message) {
                Some((found, limit)) => format!(
                    "the reply would be {found} bytes, more than the {limit} bytes this gateway sends; ask for less (a smaller page_size)"
                ),
                None => "the reply would be larger than this gateway sends; ask for less (a smaller page_size)".to_owned(),
            };
            Some(Error::ResourceExhausted(Reason::MessageTooLarge, text).into())
        }
        _ => None,
    }
}

/// INVALID_ARGUMENT, reason MALFORMED_MESSAGE, with a BadRequest naming
/// the request as a whole.
pub fn malformed() -> Status {
    let mut details: ErrorDetails = error_info(Reason::MalformedMessage);
    let why = "is not a valid protobuf encoding of this RPC's request message \
               (wrong wire format, or a string that is not UTF-8)";
    details.add_bad_request_violation("request", why);
    Status::with_error_details(Code::InvalidArgument, format!("request: {why}"), details)
}

/// The two sizes of tonic's "found N bytes, the limit is: M bytes".
fn sizes(message: &str) -> Option<(u64, u64)> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &message[message.find(marker)? + marker.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((number_after("found")?, number_after("limit is:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonic_codec_failures_are_rewritten() {
        let s = rewrite(
            Code::Internal,
            "failed to decode Protobuf message: invalid wire type",
        )
        .unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "MALFORMED_MESSAGE"
        );
        let s = rewrite(
            Code::OutOfRange,
            "Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes",
        )
        .unwrap();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("5000") && s.message().contains("4096"));
        assert_eq!(
            s.get_details_error_info().unwrap().reason,
            "MESSAGE_TOO_LARGE"
        );
        assert!(s.get_details_retry_info().is_none(), "not retryable as is");
        assert!(rewrite(Code::Internal, "internal error").is_none());
        assert!(rewrite(Code::OutOfRange, "page_size out of range").is_none());
        assert!(rewrite(Code::InvalidArgument, DECODE_FAILURE).is_none());
    }
}
