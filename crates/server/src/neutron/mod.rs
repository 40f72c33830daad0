//! Neutron v2.0 network API.
//!
//! Handlers parse and authorize, then call the resource modules, which read the cache and write
//! with compare-and-swap transactions. Every error leaves as Neutron's `NeutronError` body.

mod agents;
mod common;
mod networks;
mod nodeports;
pub mod nodeview;
mod ports;
pub mod query;
mod routers;
mod security_groups;
mod subnets;
mod tags;

use crate::identity::AuthContext;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use isthmus_model::NeutronError;
use serde_json::{json, Value};
use std::sync::Arc;

pub use common::Ctx;

/// Per-server network API state.
#[derive(Default)]
pub struct NeutronState {
    /// Addresses being claimed by requests in flight on this server.
    pub inflight: ports::InFlight,
    /// What each node's stream last sent, for resuming.
    pub node_sessions: nodeview::Sessions,
}

/// Extensions this server really implements; tempest and clients decide what to test from this.
pub const EXTENSIONS: &[(&str, &str, &str)] = &[
    (
        "allowed-address-pairs",
        "Allowed Address Pairs",
        "Provides allowed address pairs",
    ),
    ("agent", "agent", "The agent management extension."),
    (
        "binding",
        "Port Binding",
        "Expose port bindings of a virtual port to external application",
    ),
    (
        "filter-validation",
        "Filter parameters validation",
        "Provides validation on filter parameters.",
    ),
    (
        "ip-substring-filtering",
        "IP address substring filtering",
        "Provides IP address substring filtering when listing ports",
    ),
    (
        "net-mtu",
        "Network MTU",
        "Provides MTU attribute for a network resource.",
    ),
    (
        "pagination",
        "Pagination support",
        "Extension that indicates that pagination is enabled.",
    ),
    ("port-security", "Port Security", "Provides port security"),
    (
        "project-id",
        "project_id field enabled",
        "Extension that indicates that project_id field is enabled.",
    ),
    (
        "provider",
        "Provider Network",
        "Expose mapping of virtual networks to physical networks",
    ),
    (
        "revision-if-match",
        "If-Match constraints based on revision_number",
        "Extension indicating that If-Match based on revision_number is supported.",
    ),
    ("security-group", "security-group", "The security groups extension."),
    (
        "sorting",
        "Sorting support",
        "Extension that indicates that sorting is enabled.",
    ),
    (
        "standard-attr-description",
        "standard-attr-description",
        "Extension to add descriptions to standard attributes",
    ),
    (
        "standard-attr-revisions",
        "Resource revision numbers",
        "This extension will display the revision number of neutron resources.",
    ),
    (
        "standard-attr-timestamp",
        "Resource timestamps",
        "Adds created_at and updated_at fields to all Neutron resources that have Neutron standard attributes.",
    ),
    (
        "stateful-security-group",
        "Stateful security group",
        "Indicates if the security group is stateful or not",
    ),
    ("tag", "Tag support", "Enables to set tag on resources."),
];

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

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/", get(versions))
        .route("/v2.0", get(v2_index))
        .route("/v2.0/", get(v2_index))
        .route("/v2.0/extensions", get(list_extensions))
        .route("/v2.0/extensions/{alias}", get(show_extension))
        .route("/v2.0/agents", get(agents::list))
        .route(
            "/v2.0/agents/{id}",
            get(agents::member).put(agents::member).delete(agents::member),
        )
        .route("/isthmus/v1/nodes/{host}", put(agents::heartbeat))
        .route("/isthmus/v1/nodes/{host}/watch", get(nodeview::watch))
        .route("/isthmus/v1/nodes/{host}/ports", post(nodeports::create))
        .route(
            "/isthmus/v1/nodes/{host}/ports/{id}",
            put(agents::port_status).delete(nodeports::delete),
        )
        .route("/v2.0/{collection}", get(collection).post(collection))
        .route("/v2.0/{collection}/{id}", get(member).put(member).delete(member))
        .route("/v2.0/routers/{id}/add_router_interface", put(router_interface))
        .route("/v2.0/routers/{id}/remove_router_interface", put(router_interface))
        .route(
            "/v2.0/{collection}/{id}/tags",
            get(tags::all_tags).put(tags::all_tags).delete(tags::all_tags),
        )
        .route(
            "/v2.0/{collection}/{id}/tags/{tag}",
            get(tags::one_tag).put(tags::one_tag).delete(tags::one_tag),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate_before_body,
        ))
        .layer(axum::middleware::map_request(head_as_get))
        .with_state(state)
}

/// Every request with a body needs a valid token before the body is read, so a client
/// without credentials cannot make the server wait for, or hold, request bodies.
async fn authenticate_before_body(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    let has_body = headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        if let Err(e) = authenticate(&state, headers).await {
            return ApiError(e).into_response();
        }
    }
    next.run(req).await
}

/// HEAD is served as a GET whose body hyper does not send. Rewritten before routing, so
/// handlers that serve several methods only ever see the ones their route names, and a route
/// without GET answers HEAD with 405.
async fn head_as_get(mut req: axum::extract::Request) -> axum::extract::Request {
    if req.method() == Method::HEAD {
        *req.method_mut() = Method::GET;
        req.extensions_mut().insert(HeadRequest);
    }
    req
}

/// Marks a GET that was a HEAD, for handlers whose GET starts something (a node stream).
#[derive(Clone, Copy, Debug)]
pub struct HeadRequest;

/// 405 for a method the route does not serve; axum adds the `Allow` header.
async fn method_not_allowed(method: Method) -> ApiError {
    ApiError(NeutronError::new(
        405,
        "HTTPMethodNotAllowed",
        format!("The method {method} is not allowed for this resource."),
    ))
}

async fn not_found() -> ApiError {
    ApiError(NeutronError::new(
        404,
        "HTTPNotFound",
        "The resource could not be found.",
    ))
}

async fn versions(State(state): State<Arc<AppState>>) -> Response {
    let href = format!("{}v2.0/", state.network_url);
    json_response(
        StatusCode::OK,
        json!({"versions": [{"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}]}),
    )
}

async fn v2_index(State(state): State<Arc<AppState>>) -> Response {
    let resources: Vec<Value> = [
        ("network", "networks"),
        ("subnet", "subnets"),
        ("port", "ports"),
        ("security_group", "security-groups"),
        ("security_group_rule", "security-group-rules"),
    ]
    .iter()
    .map(|(name, coll)| {
        json!({"name": name, "collection": coll,
               "links": [{"rel": "self", "href": format!("{}v2.0/{coll}", state.network_url)}]})
    })
    .collect();
    json_response(StatusCode::OK, json!({"resources": resources}))
}

fn extension_json(alias: &str, name: &str, description: &str) -> Value {
    json!({"alias": alias, "name": name, "description": description,
           "updated": "2013-01-01T10:00:00-00:00", "links": []})
}

async fn list_extensions(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    authenticate(&state, &headers).await?;
    let exts: Vec<Value> = EXTENSIONS.iter().map(|(a, n, d)| extension_json(a, n, d)).collect();
    Ok(json_response(StatusCode::OK, json!({"extensions": exts})))
}

async fn show_extension(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(alias): Path<String>,
) -> ApiResult<Response> {
    authenticate(&state, &headers).await?;
    match EXTENSIONS.iter().find(|(a, _, _)| *a == alias) {
        Some((a, n, d)) => Ok(json_response(
            StatusCode::OK,
            json!({"extension": extension_json(a, n, d)}),
        )),
        None => Err(NeutronError::new(
            404,
            "HTTPNotFound",
            format!("Extension with alias {alias} does not exist"),
        )
        .into()),
    }
}

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

/// Turns the raw body into JSON with Neutron's errors for the usual ways it goes wrong.
pub fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Value, NeutronError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            NeutronError::new(
                413,
                "HTTPRequestEntityTooLarge",
                "Request body is larger than the limit.",
            )
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
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, NeutronError> {
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Network,
    Subnet,
    Port,
    Router,
    SecurityGroup,
    SecurityGroupRule,
}

impl Kind {
    pub fn from_collection(c: &str) -> Option<Kind> {
        Some(match c {
            "networks" => Kind::Network,
            "subnets" => Kind::Subnet,
            "ports" => Kind::Port,
            "routers" => Kind::Router,
            "security-groups" => Kind::SecurityGroup,
            "security-group-rules" => Kind::SecurityGroupRule,
            _ => return None,
        })
    }
    /// Singular name used in bodies.
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Network => "network",
            Kind::Subnet => "subnet",
            Kind::Port => "port",
            Kind::Router => "router",
            Kind::SecurityGroup => "security_group",
            Kind::SecurityGroupRule => "security_group_rule",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Network => "networks",
            Kind::Subnet => "subnets",
            Kind::Port => "ports",
            Kind::Router => "routers",
            Kind::SecurityGroup => "security_groups",
            Kind::SecurityGroupRule => "security_group_rules",
        }
    }
    /// Store collection name.
    pub fn store_name(self) -> &'static str {
        self.plural()
    }
    /// Neutron's NotFound exception prefix and display name.
    pub fn not_found(self, id: &str) -> NeutronError {
        match self {
            Kind::Network => NeutronError::not_found("Network", "Network", id),
            Kind::Subnet => NeutronError::not_found("Subnet", "Subnet", id),
            Kind::Port => NeutronError::not_found("Port", "Port", id),
            Kind::Router => NeutronError::not_found("Router", "Router", id),
            Kind::SecurityGroup => NeutronError::not_found("SecurityGroup", "Security group", id),
            Kind::SecurityGroupRule => NeutronError::not_found("SecurityGroupRule", "Security group rule", id),
        }
    }
}

fn unknown_collection(c: &str) -> ApiError {
    ApiError(NeutronError::new(
        404,
        "HTTPNotFound",
        format!("The resource could not be found: {c}"),
    ))
}

async fn collection(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(coll): Path<String>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = Kind::from_collection(&coll).ok_or_else(|| unknown_collection(&coll))?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    if method == Method::GET {
        let q = query::Query::parse(q.as_deref().unwrap_or(""))?;
        let items = common::visible_views(&ctx, kind).await?;
        let url = format!("{}v2.0/{}", state.network_url, coll);
        let out = q.apply(items, kind.plural(), &url)?;
        return Ok(json_response(StatusCode::OK, out));
    }
    let body = parse_body(body)?;
    let out = common::create(&ctx, kind, body).await?;
    Ok(json_response(StatusCode::CREATED, out))
}

async fn member(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((coll, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let kind = Kind::from_collection(&coll).ok_or_else(|| unknown_collection(&coll))?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    match method {
        Method::GET => {
            let q = query::Query::parse(q.as_deref().unwrap_or(""))?;
            let view = common::show(&ctx, kind, &id)?;
            Ok(json_response(
                StatusCode::OK,
                json!({ kind.singular(): q.select_fields(view) }),
            ))
        }
        Method::PUT => {
            let body = parse_body(body)?;
            let out = common::update(&ctx, kind, &id, body, if_match(&headers)?).await?;
            Ok(json_response(StatusCode::OK, json!({ kind.singular(): out })))
        }
        _ => {
            common::delete(&ctx, kind, &id, if_match(&headers)?).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

async fn router_interface(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    let body = parse_body(body)?;
    let out = if uri.path().ends_with("/add_router_interface") {
        routers::add_interface(&ctx, &id, body).await?
    } else {
        routers::remove_interface(&ctx, &id, body).await?
    };
    Ok(json_response(StatusCode::OK, out))
}
