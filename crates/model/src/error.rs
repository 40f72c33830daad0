//! Errors in the shape Neutron sends them, so clients and tempest recognise them.

use serde_json::json;

/// A Neutron API error: HTTP status, Neutron's exception type name and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} ({status}): {message}")]
pub struct NeutronError {
    pub status: u16,
    pub kind: String,
    pub message: String,
}

impl NeutronError {
    pub fn new(status: u16, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status,
            kind: kind.into(),
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "HTTPBadRequest", message)
    }
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(
            400,
            "InvalidInput",
            format!("Invalid input for operation: {}.", message.into()),
        )
    }
    /// 400 for an attribute that fails validation, worded as Neutron words it.
    pub fn invalid_attr(attr: &str, reason: impl Into<String>) -> Self {
        Self::bad_request(format!("Invalid input for {attr}. Reason: {}.", reason.into()))
    }
    pub fn not_found(kind: &str, what: &str, id: &str) -> Self {
        Self::new(
            404,
            format!("{kind}NotFound"),
            format!("{what} {id} could not be found."),
        )
    }
    pub fn conflict(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(409, kind, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "PolicyNotAuthorized", message)
    }
    pub fn unauthorized() -> Self {
        Self::new(
            401,
            "HTTPUnauthorized",
            "The request you have made requires authentication.",
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "HTTPInternalServerError", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }

    /// The response body: `{"NeutronError": {"type", "message", "detail"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({"NeutronError": {"type": self.kind, "message": self.message, "detail": ""}})
    }
}

pub type NResult<T> = std::result::Result<T, NeutronError>;
