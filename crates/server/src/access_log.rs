//! Request middleware for both APIs. One log line per request: method, path, status, time;
//! never the query string's values or headers (tokens), never bodies (passwords).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Instant;

pub async fn log(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(%method, %path, status, ms, "request failed");
    } else {
        tracing::debug!(%method, %path, status, ms, "request");
    }
    resp
}

/// Runs the request in a task of its own, so a client that goes away after sending it does not
/// cancel it halfway: a bulk create either completes or rolls back, and a write the client
/// will never hear about still finishes cleanly, as Neutron and Keystone finish theirs.
pub async fn run_to_completion(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(%method, %path, error = %e, "request handler panicked or was cancelled");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
