//! Small helpers every handler shares.

use crate::call::Call;
use tonic::{Request, Response, Status};

/// What a unary handler returns.
pub type RpcResult<T> = Result<Response<T>, Status>;

/// Splits a request into its call context and its message.
pub fn split<T>(request: Request<T>) -> (Call, T) {
    (Call::from_request(&request), request.into_inner())
}
