//! Request middleware for both APIs. One log line per request: request id, method, path,
//! status, time; never the query string's values or headers (tokens), never bodies
//! (passwords). Each request is counted and timed per route template, and runs in a span
//! carrying its request id, so every line it logs names it.

use crate::metrics::{method_label, RequestLabels, ServerMetrics};
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// The header OpenStack services and clients use for a request's id.
pub const REQUEST_ID: &str = "x-openstack-request-id";

/// The route label of requests no route matched (unbounded paths must not become labels).
const UNMATCHED: &str = "unmatched";

/// What the access log of one API needs.
#[derive(Clone)]
pub struct AccessLog {
    /// `identity` or `network`.
    pub api: &'static str,
    pub metrics: Arc<ServerMetrics>,
    /// Route parameters named `{collection}` whose value this says is a real collection are
    /// shown by name in the route label (`/v2.0/networks`), others stay a template.
    pub known_collection: fn(&str) -> bool,
}

/// The route a request matched, passed from inside the router (where it is known) to the
/// access log around it.
#[derive(Clone)]
struct Route(String);

/// An incoming id kept only if it is well-formed, `req-` and a hyphenated UUID, as
/// OpenStack services make them: a client's text never reaches logs or headers as it is.
pub fn request_id(incoming: Option<&HeaderValue>) -> String {
    incoming
        .and_then(|v| v.to_str().ok())
        .filter(|s| well_formed(s))
        .map(str::to_string)
        .unwrap_or_else(|| format!("req-{}", uuid::Uuid::new_v4()))
}

fn well_formed(s: &str) -> bool {
    s.strip_prefix("req-")
        .is_some_and(|u| u.len() == 36 && uuid::Uuid::try_parse(u).is_ok())
}

/// Inside the router (a route layer): notes the matched route for [`log`].
pub async fn note_route(State(a): State<AccessLog>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| route_label(m.as_str(), req.uri().path(), a.known_collection));
    let mut resp = next.run(req).await;
    if let Some(r) = route {
        resp.extensions_mut().insert(Route(r));
    }
    resp
}

/// The route template, with a `{collection}` parameter replaced by its value when that is a
/// known collection (so networks and ports are told apart).
pub fn route_label(template: &str, path: &str, known_collection: fn(&str) -> bool) -> String {
    if !template.contains("{collection}") {
        return template.to_string();
    }
    let segments: Vec<&str> = path.split('/').collect();
    template
        .split('/')
        .enumerate()
        .map(|(i, t)| match segments.get(i) {
            Some(s) if t == "{collection}" && known_collection(s) => s,
            _ => t,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Around the router: the request id, the span, the log line and the metrics.
pub async fn log(State(a): State<AccessLog>, req: Request, next: Next) -> Response {
    let id = request_id(req.headers().get(REQUEST_ID));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %id);
    let mut resp = next.run(req).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    let route = resp
        .extensions_mut()
        .remove::<Route>()
        .map_or_else(|| UNMATCHED.to_string(), |r| r.0);
    let labels = RequestLabels {
        api: a.api,
        method: method_label(&method),
        route,
        status,
    };
    a.metrics.requests.get_or_create(&labels).inc();
    a.metrics
        .request_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let ms = elapsed.as_secs_f64() * 1000.0;
    let _e = span.enter();
    if status >= 500 {
        tracing::warn!(%method, %path, status, ms, "request failed");
    } else {
        tracing::debug!(%method, %path, status, ms, "request");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_ids_are_kept() {
        let good = "req-0b9b7b8e-9d0c-4f0e-9f3a-2a9b5c1d7e11";
        assert_eq!(request_id(Some(&HeaderValue::from_static(good))), good);
        let upper = "req-0B9B7B8E-9D0C-4F0E-9F3A-2A9B5C1D7E11";
        assert_eq!(request_id(Some(&HeaderValue::from_static(upper))), upper);
        for bad in [
            "",
            "req-",
            "0b9b7b8e-9d0c-4f0e-9f3a-2a9b5c1d7e11",
            "req-0b9b7b8e9d0c4f0e9f3a2a9b5c1d7e11",
            "req-{0b9b7b8e-9d0c-4f0e-9f3a-2a9b5c1d7e11}",
            "req-0b9b7b8e-9d0c-4f0e-9f3a-2a9b5c1d7e11 extra",
            "<script>",
        ] {
            let got = request_id(Some(&HeaderValue::from_str(bad).unwrap()));
            assert_ne!(got, bad);
            assert!(well_formed(&got), "{got}");
        }
        assert!(well_formed(&request_id(None)));
    }

    #[test]
    fn route_labels_name_known_collections_only() {
        let known = |c: &str| c == "networks";
        assert_eq!(
            route_label("/v2.0/{collection}", "/v2.0/networks", known),
            "/v2.0/networks"
        );
        assert_eq!(
            route_label("/v2.0/{collection}/{id}", "/v2.0/networks/abc", known),
            "/v2.0/networks/{id}"
        );
        assert_eq!(
            route_label("/v2.0/{collection}", "/v2.0/whatever", known),
            "/v2.0/{collection}"
        );
        assert_eq!(route_label("/v3/users/{id}", "/v3/users/u1", known), "/v3/users/{id}");
    }
}
