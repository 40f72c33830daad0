//! Keystone-style error responses: `{"error": {"code": N, "title": "...", "message": "..."}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::IdentityError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

pub const UNAUTHORIZED_MESSAGE: &str = "The request you have made requires authentication.";

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, UNAUTHORIZED_MESSAGE)
    }
    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "You are not authorized to perform the requested action.",
        )
    }
    pub fn not_found(kind: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("Could not find {kind}: {id}."))
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An unexpected error prevented the server from fulfilling your request.",
        )
    }
}

fn title(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "Bad Request",
        StatusCode::UNAUTHORIZED => "Unauthorized",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "Not Found",
        StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed",
        StatusCode::CONFLICT => "Conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "Request Entity Too Large",
        StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
        _ => status.canonical_reason().unwrap_or("Error"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {"code": self.status.as_u16(), "title": title(self.status), "message": self.message}
        });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Keystone"));
        }
        resp
    }
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Unauthorized => ApiError::unauthorized(),
            IdentityError::Cache(ref c) => {
                tracing::error!(error = %c, "identity write not visible in the cache");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The service is temporarily unavailable.",
                )
            }
            IdentityError::Store(ref s) => {
                tracing::error!(error = %s, "identity store error");
                match s {
                    isthmus_store::StoreError::Unavailable(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "The service is temporarily unavailable.",
                    ),
                    _ => ApiError::internal(),
                }
            }
            IdentityError::Hash(ref h) => {
                tracing::error!(error = %h, "password hashing failed");
                ApiError::internal()
            }
            IdentityError::NotFound { kind, id } => ApiError::not_found(kind, &id),
            IdentityError::Conflict(m) => ApiError::conflict(m),
            IdentityError::Invalid(m) => ApiError::bad_request(m),
            IdentityError::Contention => ApiError::conflict("Conflicting concurrent update; retry the request."),
            IdentityError::NotReady => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The identity service is not bootstrapped yet.",
            ),
        }
    }
}
