//! What every network API handler shares: authentication, body parsing, error rendering.

use crate::identity::AuthContext;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::NeutronError;
use serde_json::Value;

/// An API error, rendered as Neutron renders it.
pub struct ApiError(pub NeutronError);

impl From<NeutronError> for ApiError {
    fn from(e: NeutronError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(kind = %self.0.kind, message = %self.0.message, "request failed");
        } else {
            tracing::debug!(status = self.0.status, kind = %self.0.kind, message = %self.0.message, "request refused");
        }
        (status, axum::Json(self.0.body())).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// Marks a GET that was a HEAD, for handlers whose GET starts something (a node stream).
#[derive(Clone, Copy, Debug)]
pub struct HeadRequest;

/// Resolves the caller from `X-Auth-Token`.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<AuthContext, NeutronError> {
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .ok_or_else(NeutronError::unauthorized)?;
    state.identity.validate(token).await.map_err(|e| {
        tracing::info!(error = %e, "network API request with an unusable token");
        match e {
            crate::identity::IdentityError::Store(_) => NeutronError::unavailable("identity backend unavailable"),
            _ => NeutronError::unauthorized(),
        }
    })
}

/// A request body over the size limit: 413, as Neutron answers.
pub fn body_too_large() -> NeutronError {
    NeutronError::new(
        413,
        "HTTPRequestEntityTooLarge",
        "Request body is larger than the limit.",
    )
}

/// Turns the raw body into JSON with Neutron's errors for the usual ways it goes wrong.
pub fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, NeutronError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            body_too_large()
        } else {
            NeutronError::bad_request(format!("Could not read the request body: {rej}"))
        }
    })?;
    if bytes.is_empty() {
        return Err(NeutronError::bad_request("Resource body required"));
    }
    serde_json::from_slice(&bytes).map_err(|e| NeutronError::bad_request(format!("Malformed request body: {e}")))
}

/// `If-Match: revision_number=N`, if present. A value that is no revision can never match:
/// 412, as Neutron answers a failed constraint.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, NeutronError> {
    let Some(v) = headers.get("if-match") else {
        return Ok(None);
    };
    let failed = |shown: &str| {
        NeutronError::new(
            412,
            "PreconditionFailed",
            format!("Invalid If-Match constraint: {shown}"),
        )
    };
    let s = v.to_str().map_err(|_| failed("not ASCII"))?;
    for part in s.split(',') {
        if let Some(n) = part.trim().strip_prefix("revision_number=") {
            return n.trim().parse().map(Some).map_err(|_| failed(s));
        }
    }
    Ok(None)
}
