//! Neutron v2.0 network API.
//!
//! Handlers parse and authorize, then find the collection in the registry and call its
//! resource, which reads the cache and writes with compare-and-swap transactions. Every error
//! leaves as Neutron's `NeutronError` body.
//!
//! Module layers (each imports only from layers below it):
//! - handlers: this module, `tags`, `quotas`, `nodeports`, `nodeview`, `agents`, `router_interfaces`,
//!   `nested` (and `trunk_credentials`, which authenticates it)
//!   (and `routers::change_routes` for `add_extraroutes` / `remove_extraroutes`,
//!   `subnetpools::change_prefixes` for `add_prefixes` / `remove_prefixes`);
//! - `registry`: the list of resources;
//! - `qos` (policies and their rules, with their own routes);
//! - resources: `networks`, `subnets`, `subnetpools`, `address_scopes`, `ports`, `routers`,
//!   `floatingips`, `security_groups`, `rbac_policies`, each implementing `resource::Resource`;
//! - shared operations: `resource` (the trait and the generic request handling), `portops`,
//!   `default_sg`, `grants` (RBAC object types and grants), `lookup`, `quota` (limits and their
//!   check on create);
//! - `common`, `query`, `http`.

mod address_scopes;
mod agents;
mod common;
mod default_sg;
mod floatingips;
mod grants;
mod http;
mod ipavail;
pub mod l3sched;
pub mod liveness;
mod lookup;
mod nested;
mod networks;
mod nodeports;
pub mod nodeview;
mod portops;
mod ports;
mod qos;
pub mod query;
mod quota;
mod quotas;
mod rbac_policies;
mod registry;
mod resource;
mod router_interfaces;
mod routers;
mod security_groups;
mod subnetpools;
mod subnets;
mod tags;
mod trunk_credentials;
mod trunks;
pub mod viewindex;

use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use http::{if_match, json_response};
use isthmus_model::NeutronError;
use serde_json::{json, Value};
use std::sync::Arc;

pub use common::Ctx;
pub use http::{authenticate, parse_body, ApiError, ApiResult, HeadRequest};

/// Per-server network API state.
#[derive(Default)]
pub struct NeutronState {
    /// Addresses being claimed by requests in flight on this server.
    pub inflight: portops::InFlight,
    /// What each node's stream last sent, for resuming.
    pub node_sessions: nodeview::Sessions,
    /// Every node's view, kept up to date change by change.
    pub fanout: nodeview::Fanout,
    /// Which nodes are alive, renewed by heartbeats without store writes.
    pub liveness: liveness::Liveness,
    /// Ends the node streams at shutdown.
    pub stopping: nodeview::Stopping,
}

/// Extensions this server really implements; tempest and clients decide what to test from this.
pub const EXTENSIONS: &[(&str, &str, &str)] = &[
    (
        "allowed-address-pairs",
        "Allowed Address Pairs",
        "Provides allowed address pairs",
    ),
    (
        "address-scope",
        "Address scope",
        "Address scopes extension.",
    ),
    ("agent", "agent", "The agent management extension."),
    (
        "binding",
        "Port Binding",
        "Expose port bindings of a virtual port to external application",
    ),
    (
        "default-subnetpools",
        "Default Subnetpools",
        "Provides ability to mark and use a subnetpool as the default.",
    ),
    (
        "dns-integration",
        "DNS Integration",
        "Provides integration with DNS.",
    ),
    (
        "dvr",
        "Distributed Virtual Router",
        "Enables configuration of Distributed Virtual Routers.",
    ),
    (
        "empty-string-filtering",
        "Empty String Filtering Extension",
        "Allow filtering by attributes with empty string value",
    ),
    (
        "external-net",
        "Neutron external network",
        "Adds external network attribute to network resource.",
    ),
    (
        "ext-gw-mode",
        "Neutron L3 Configurable external gateway mode",
        "Extension of the router abstraction for specifying whether SNAT should occur on the external gateway",
    ),
    (
        "extraroute",
        "Neutron Extra Route",
        "Extra routes configuration for L3 router",
    ),
    (
        "extraroute-atomic",
        "Atomically add/remove extra routes",
        "Edit extra routes of a router on server side by atomically adding/removing extra routes",
    ),
    (
        "extra_dhcp_opt",
        "Neutron Extra DHCP options",
        "Extra options configuration for DHCP. For example PXE boot options to DHCP clients can be specified (e.g. tftp-server, server-ip-address, bootfile-name)",
    ),
    (
        "fip-port-details",
        "Floating IP Port Details Extension",
        "Add port_details attribute to Floating IP resource",
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
        "network-ip-availability",
        "Network IP Availability",
        "Provides IP availability data for each network and subnet.",
    ),
    (
        "pagination",
        "Pagination support",
        "Extension that indicates that pagination is enabled.",
    ),
    (
        "port-mac-address-regenerate",
        "Neutron Port MAC address regenerate",
        "Network port MAC address regenerate",
    ),
    ("port-security", "Port Security", "Provides port security"),
    (
        "qos",
        "Quality of Service",
        "The Quality of Service extension.",
    ),
    (
        "qos-bw-limit-direction",
        "Direction for QoS bandwidth limit rule",
        "Allow to configure QoS bandwidth limit rule with specific direction: ingress or egress",
    ),
    (
        "qos-default",
        "QoS default policy",
        "Expose the QoS default policy per project",
    ),
    (
        "rbac-policies",
        "RBAC Policies",
        "Allows creation and modification of policies that control project access to resources.",
    ),
    (
        "rbac-security-groups",
        "Add security_group type to network RBAC",
        "Add security_group type to network RBAC",
    ),
    (
        "rbac-address-scope",
        "Add address_scope type to RBAC",
        "Add address_scope type to RBAC",
    ),
    (
        "rbac-subnetpool",
        "Add subnetpool type to RBAC",
        "Add subnetpool type to RBAC",
    ),
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
    (
        "router",
        "Neutron L3 Router",
        "Router abstraction for basic L3 forwarding between L2 Neutron networks and access to external networks via a NAT gateway.",
    ),
    ("security-group", "security-group", "The security groups extension."),
    (
        "trunk",
        "Trunk Extension",
        "Provides support for trunk ports",
    ),
    (
        "trunk-details",
        "Trunk port details",
        "Expose trunk port details",
    ),
    (
        "sorting",
        "Sorting support",
        "Extension that indicates that sorting is enabled.",
    ),
    (
        "subnet_allocation",
        "Subnet Allocation",
        "Enables allocation of subnets from a subnet pool",
    ),
    (
        "subnetpool-prefix-ops",
        "Subnet Pool Prefix Operations",
        "Provides support for adjusting the prefix list of subnet pools",
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
    (
        "quotas",
        "Quota management support",
        "Expose functions for quotas management per project",
    ),
    (
        "quota_details",
        "Quota details management support",
        "Expose functions for quotas usage statistics per project",
    ),
    ("tag", "Tag support", "Enables to set tag on resources."),
    (
        "standard-attr-tag",
        "Tag support for resources with standard attribute",
        "Enables to set tag on resources with standard attribute.",
    ),
    // The alias Neutron used before Stein for the same thing; older clients look for it.
    (
        "tag-ext",
        "Tag support for resources: subnet, subnetpool, port, router",
        "Extends tag support to more L2 and L3 resources.",
    ),
    (
        "tag-creation",
        "Tag creation extension",
        "Allow to create multiple tags for a resource",
    ),
    (
        "tag-ports-during-bulk-creation",
        "Tag Ports During Bulk Creation",
        "Allow to tag ports during bulk creation",
    ),
];

/// Whether `/v2.0/<name>` is a collection of the API.
pub fn is_collection(name: &str) -> bool {
    registry::find(name).is_some()
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
        .route(
            "/isthmus/v1/trunks/{id}/credentials",
            get(trunk_credentials::list).post(trunk_credentials::create),
        )
        .route(
            "/isthmus/v1/trunks/{id}/credentials/{credential}",
            delete(trunk_credentials::delete),
        )
        .route(
            "/isthmus/v1/nested/attachments/{container_id}/{ifname}",
            get(nested::get).put(nested::put).delete(nested::delete),
        )
        .route("/v2.0/network-ip-availabilities", get(ipavail::list))
        .route("/v2.0/network-ip-availabilities/{id}", get(ipavail::show))
        .route("/v2.0/quotas", get(quotas::collection).post(quotas::collection))
        .route(
            "/v2.0/quotas/{id}",
            get(quotas::member).put(quotas::member).delete(quotas::member),
        )
        .route("/v2.0/quotas/{id}/{action}", get(quotas::action))
        .route("/v2.0/qos/policies", get(qos::policies).post(qos::policies))
        .route(
            "/v2.0/qos/policies/{id}",
            get(qos::policy).put(qos::policy).delete(qos::policy),
        )
        .route(
            "/v2.0/qos/policies/{id}/bandwidth_limit_rules",
            get(qos::rules).post(qos::rules),
        )
        .route(
            "/v2.0/qos/policies/{id}/bandwidth_limit_rules/{rule}",
            get(qos::rule).put(qos::rule).delete(qos::rule),
        )
        .route(
            "/v2.0/qos/policies/{id}/tags",
            get(tags::qos_all_tags)
                .put(tags::qos_all_tags)
                .post(tags::qos_all_tags)
                .delete(tags::qos_all_tags),
        )
        .route(
            "/v2.0/qos/policies/{id}/tags/{tag}",
            get(tags::qos_one_tag).put(tags::qos_one_tag).delete(tags::qos_one_tag),
        )
        .route("/v2.0/qos/rule-types", get(qos::rule_types))
        .route("/v2.0/qos/rule-types/{kind}", get(qos::rule_type))
        .route("/v2.0/{collection}", get(collection).post(collection))
        .route("/v2.0/{collection}/{id}", get(member).put(member).delete(member))
        .route("/v2.0/routers/{id}/add_router_interface", put(router_interface))
        .route("/v2.0/routers/{id}/remove_router_interface", put(router_interface))
        .route("/v2.0/subnetpools/{id}/add_prefixes", put(add_remove))
        .route("/v2.0/subnetpools/{id}/remove_prefixes", put(add_remove))
        .route("/v2.0/trunks/{id}/add_subports", put(add_remove))
        .route("/v2.0/trunks/{id}/remove_subports", put(add_remove))
        .route("/v2.0/trunks/{id}/get_subports", get(get_subports))
        .route("/v2.0/routers/{id}/add_extraroutes", put(add_remove))
        .route("/v2.0/routers/{id}/remove_extraroutes", put(add_remove))
        .route(
            "/v2.0/{collection}/{id}/tags",
            get(tags::all_tags)
                .put(tags::all_tags)
                .post(tags::all_tags)
                .delete(tags::all_tags),
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
    if !has_body {
        return next.run(req).await;
    }
    // The nested API takes a trunk credential, never a token.
    let checked = if nested::is_nested_path(req.uri().path()) {
        trunk_credentials::authenticate_credential(&state, headers).map(|_| ())
    } else {
        authenticate(&state, headers).await.map(|_| ())
    };
    if let Err(e) = checked {
        return ApiError(e).into_response();
    }
    // Read the whole body now, within the size limit, so the request no longer depends on the
    // connection: a client that sent everything and closed still gets its request carried out.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, state.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// A body that could not be read whole: too large (413, as Neutron answers) or cut off.
fn body_error(e: axum::Error) -> Response {
    let too_large = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |err| err.source())
        .any(|err| err.to_string().contains("length limit exceeded"));
    let err = if too_large {
        http::body_too_large()
    } else {
        NeutronError::bad_request(format!("Could not read the request body: {e}"))
    };
    ApiError(err).into_response()
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
    let resources: Vec<Value> = registry::all()
        .iter()
        .map(|r| r.meta())
        .filter(|m| m.indexed)
        .map(|m| (m.singular, m.collection))
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
    let res = registry::find(&coll).ok_or_else(|| unknown_collection(&coll))?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    if method == Method::GET {
        let q = query::Query::parse(q.as_deref().unwrap_or(""))?;
        let items = resource::list_visible(&ctx, res, &q.prefilter()).await?;
        let url = format!("{}v2.0/{}", state.network_url, coll);
        let out = q.apply(items, res.meta().plural, &url)?;
        return Ok(json_response(StatusCode::OK, out));
    }
    let body = parse_body(body)?;
    let out = resource::create(&ctx, res, body).await?;
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
    let res = registry::find(&coll).ok_or_else(|| unknown_collection(&coll))?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    match method {
        Method::GET => {
            let q = query::Query::parse(q.as_deref().unwrap_or(""))?;
            let view = resource::show(&ctx, res, &id)?;
            Ok(json_response(
                StatusCode::OK,
                json!({ res.meta().singular: q.select_fields(view) }),
            ))
        }
        Method::PUT => {
            let body = parse_body(body)?;
            let out = resource::update(&ctx, res, &id, body, if_match(&headers)?).await?;
            Ok(json_response(StatusCode::OK, json!({ res.meta().singular: out })))
        }
        _ => {
            resource::delete(&ctx, res, &id, if_match(&headers)?).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// `PUT .../add_<what>` and `.../remove_<what>` on a member: a router's extra routes or a
/// subnet pool's prefixes, told apart by the path.
async fn add_remove(
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
    let path = uri.path();
    let add = path.rsplit('/').next().is_some_and(|last| last.starts_with("add_"));
    let out = if path.starts_with("/v2.0/subnetpools/") {
        subnetpools::change_prefixes(&ctx, &id, body, add).await?
    } else if path.starts_with("/v2.0/trunks/") {
        trunks::change_subports(&ctx, &id, body, add).await?
    } else {
        routers::change_routes(&ctx, &id, body, add).await?
    };
    Ok(json_response(StatusCode::OK, out))
}

/// `GET /v2.0/trunks/{id}/get_subports`.
async fn get_subports(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    Ok(json_response(StatusCode::OK, trunks::get_subports(&ctx, &id)?))
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
        router_interfaces::add_interface(&ctx, &id, body).await?
    } else {
        router_interfaces::remove_interface(&ctx, &id, body).await?
    };
    Ok(json_response(StatusCode::OK, out))
}
