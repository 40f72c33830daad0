//! HTTP: version documents, `/v3/auth/*`, and the plumbing the admin handlers share
//! (body/query extractors, token authentication, links).

use super::error::{ApiError, ApiResult};
use super::model::{self, Project, User};
use super::token::Payload;
use super::{admin, Identity, IdentityError, TokenInfo};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::HashMap;
use std::sync::Arc;

pub type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/", get(versions))
        .route("/v3", get(version_v3))
        .route("/v3/", get(version_v3))
        .route(
            "/v3/auth/tokens",
            get(validate_token).post(issue_token).delete(revoke_token),
        )
        .route("/v3/auth/projects", get(auth_projects))
        .route("/v3/auth/domains", get(auth_domains))
        .route("/v3/auth/catalog", get(auth_catalog))
        .merge(admin::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit.min(IDENTITY_MAX_BODY)))
        .with_state(state)
}

/// Identity bodies are small, and token requests come without credentials: keep what an
/// anonymous client can make the server hold per request small (Keystone's default limit).
const IDENTITY_MAX_BODY: usize = 114_688;

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "The resource could not be found.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "The method is not allowed for the requested URL.",
    )
}

// ----- extractors -----

/// A JSON request body; malformed JSON or a wrong shape is a Keystone-style 400.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("The request body is not valid: {e}")))
    }
}

/// Query parameters (a parameter without a value, like `?nocatalog`, maps to "").
pub struct Params(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|_| ApiError::bad_request("The query string is malformed."))?;
        let mut map = HashMap::new();
        for (k, v) in pairs {
            map.entry(k).or_insert(v);
        }
        Ok(Params(map))
    }
}

impl Params {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.contains_key(k)
    }
    /// A boolean filter (`?enabled=true`); values other than true/false are a 400.
    pub fn bool(&self, k: &str) -> ApiResult<Option<bool>> {
        match self.get(k).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(None),
            Some("true" | "1" | "yes" | "") => Ok(Some(true)),
            Some("false" | "0" | "no") => Ok(Some(false)),
            Some(_) => Err(ApiError::bad_request(format!(
                "Invalid value for query parameter '{k}'."
            ))),
        }
    }
}

// ----- authentication of requests -----

/// The caller's token (`X-Auth-Token`), validated.
pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<TokenInfo> {
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::unauthorized)?;
    state.identity.check_token(token).map_err(ApiError::from)
}

/// Identity administration needs the admin role on the token's project.
pub(crate) fn require_admin(info: &TokenInfo, action: &str) -> ApiResult<()> {
    if info.is_admin() {
        Ok(())
    } else {
        Err(refuse(info, action))
    }
}

/// Admins, and the user acting on themselves.
pub(crate) fn require_admin_or_self(info: &TokenInfo, user_id: &str, action: &str) -> ApiResult<()> {
    if info.is_admin() || info.user.id == user_id {
        Ok(())
    } else {
        Err(refuse(info, action))
    }
}

pub(crate) fn refuse(info: &TokenInfo, action: &str) -> ApiError {
    tracing::info!(user_id = %info.user.id, action, "identity call refused: not permitted");
    ApiError::forbidden()
}

pub(crate) fn base_url(state: &AppState) -> &str {
    state.identity_url.trim_end_matches('/')
}

pub(crate) fn self_link(state: &AppState, path: &str) -> Value {
    json!({"self": format!("{}/{path}", base_url(state))})
}

pub(crate) fn collection_links(state: &AppState, path: &str) -> Value {
    json!({"self": format!("{}/{path}", base_url(state)), "previous": null, "next": null})
}

// ----- versions -----

fn v3_document(state: &AppState) -> Value {
    json!({
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/", base_url(state))}],
        "media-types": [{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}],
    })
}

async fn versions(State(state): St) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(json!({"versions": {"values": [v3_document(&state)]}})),
    )
        .into_response()
}

async fn version_v3(State(state): St) -> Json<Value> {
    Json(json!({"version": v3_document(&state)}))
}

// ----- token rendering -----

fn endpoint_id(parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn catalog(state: &AppState) -> Value {
    let region = &state.config.region;
    let service = |kind: &str, name: &str, url: &str| {
        let endpoints: Vec<Value> = ["public", "internal", "admin"]
            .iter()
            .map(|iface| {
                json!({
                    "id": endpoint_id(&[kind, iface, url]),
                    "interface": iface,
                    "region": region,
                    "region_id": region,
                    "url": url,
                })
            })
            .collect();
        json!({"id": endpoint_id(&[kind, name]), "type": kind, "name": name, "endpoints": endpoints})
    };
    json!([
        service("identity", "keystone", &state.identity_url),
        service("network", "neutron", &state.network_url),
    ])
}

fn domain_ref(id: &str, identity: &Identity) -> Value {
    let name = identity.domain(id).map(|d| d.name).unwrap_or_default();
    json!({"id": id, "name": name})
}

fn keystone_time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(crate::time::keystone_format)
        .unwrap_or_default()
}

pub(crate) fn token_body(state: &AppState, info: &TokenInfo, with_catalog: bool) -> Value {
    let id = &state.identity;
    let p = &info.payload;
    let mut token = json!({
        "methods": p.m,
        "user": {
            "id": info.user.id,
            "name": info.user.name,
            "domain": domain_ref(&info.user.domain_id, id),
            "password_expires_at": null,
        },
        "audit_ids": p.audit_ids(),
        "expires_at": keystone_time(p.exp),
        "issued_at": keystone_time(p.iat),
    });
    if let Some(project) = &info.project {
        token["project"] = json!({
            "id": project.id,
            "name": project.name,
            "domain": domain_ref(&project.domain_id, id),
        });
        token["is_domain"] = json!(false);
        token["roles"] = info.roles.iter().map(|r| json!({"id": r.id, "name": r.name})).collect();
        if with_catalog {
            token["catalog"] = catalog(state);
        }
    }
    json!({ "token": token })
}

fn token_response(status: StatusCode, token: &str, body: Value) -> ApiResult<Response> {
    let mut resp = (status, Json(body)).into_response();
    let v = HeaderValue::from_str(token).map_err(|_| ApiError::internal())?;
    resp.headers_mut().insert("x-subject-token", v);
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("X-Auth-Token"));
    Ok(resp)
}

// ----- POST /v3/auth/tokens -----

#[derive(Deserialize)]
struct AuthRequest {
    auth: AuthBody,
}

#[derive(Deserialize)]
struct AuthBody {
    identity: AuthIdentity,
    #[serde(default)]
    scope: Option<Value>,
}

#[derive(Deserialize)]
struct AuthIdentity {
    methods: Vec<String>,
    #[serde(default)]
    password: Option<PasswordMethod>,
    #[serde(default)]
    token: Option<TokenMethod>,
}

#[derive(Deserialize)]
struct PasswordMethod {
    user: PasswordUser,
}

/// Holds a password: no `Debug`.
#[derive(Deserialize)]
struct PasswordUser {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    domain: Option<DomainRef>,
    password: String,
}

#[derive(Deserialize)]
struct DomainRef {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

/// Holds a token: no `Debug`.
#[derive(Deserialize)]
struct TokenMethod {
    id: String,
}

fn auth_failed(reason: &str, who: &str) -> ApiError {
    tracing::info!(user = who, reason, "authentication failed");
    ApiError::unauthorized()
}

fn resolve_domain(identity: &Identity, d: &DomainRef) -> Option<&'static str> {
    match (&d.id, &d.name) {
        (Some(id), _) => identity.domain(id).map(|d| d.id),
        (None, Some(name)) => identity.domain_by_name(name).map(|d| d.id),
        (None, None) => None,
    }
}

/// The project a scope names, or `Ok(None)` for an explicitly unscoped request.
fn resolve_project_scope(identity: &Identity, scope: &Value, who: &str) -> ApiResult<Option<Project>> {
    if scope.as_str() == Some("unscoped") {
        return Ok(None);
    }
    let Some(obj) = scope.as_object() else {
        return Err(ApiError::bad_request("Invalid scope in the authentication request."));
    };
    if let Some(p) = obj.get("project") {
        let id = p.get("id").and_then(Value::as_str);
        let name = p.get("name").and_then(Value::as_str);
        let project = match (id, name) {
            (Some(id), _) => identity.project(id),
            (None, Some(name)) => {
                let Some(d) = p.get("domain") else {
                    return Err(ApiError::bad_request("Expecting to find domain in project."));
                };
                let d: DomainRef = serde_json::from_value(d.clone())
                    .map_err(|_| ApiError::bad_request("Invalid domain in the project scope."))?;
                resolve_domain(identity, &d).and_then(|did| identity.project_by_name(did, name))
            }
            (None, None) => return Err(ApiError::bad_request("Expecting to find id or name in project.")),
        };
        return match project {
            Some(p) => Ok(Some(p)),
            None => Err(auth_failed("scope project not found", who)),
        };
    }
    if obj.contains_key("domain") || obj.contains_key("system") || obj.contains_key("OS-TRUST:trust") {
        return Err(auth_failed("only project scope is supported", who));
    }
    Err(ApiError::bad_request("Invalid scope in the authentication request."))
}

/// Who authenticated, and what the new token inherits.
struct Authenticated {
    user: User,
    methods: Vec<String>,
    expires_at: i64,
    parent_audit: Option<String>,
    password_version: u64,
    /// For logs: how the user was named (never a secret).
    who: String,
}

async fn password_method(state: &AppState, pw: Option<PasswordMethod>, started: i64) -> ApiResult<Authenticated> {
    let identity = &state.identity;
    let Some(pw) = pw else {
        return Err(ApiError::bad_request("Expecting to find password in auth.identity."));
    };
    let u = pw.user;
    let (user, who) = match (&u.id, &u.name) {
        (Some(id), _) => (identity.user(id), format!("id={id}")),
        (None, Some(name)) => {
            let Some(d) = &u.domain else {
                return Err(ApiError::bad_request("Expecting to find domain in user."));
            };
            let dname = d.id.clone().or_else(|| d.name.clone()).unwrap_or_default();
            let user = resolve_domain(identity, d).and_then(|did| identity.user_by_name(did, name));
            (user, format!("name={name} domain={dname}"))
        }
        (None, None) => {
            return Err(ApiError::bad_request("Expecting to find id or name in user."));
        }
    };
    let ok = identity.verify_password(user.as_ref(), u.password).await;
    let user = match user {
        Some(user) if ok => user,
        Some(_) => return Err(auth_failed("wrong password", &who)),
        None => return Err(auth_failed("unknown user", &who)),
    };
    if !user.enabled {
        return Err(auth_failed("user disabled", &who));
    }
    let ttl_micros = i64::try_from(state.config.token_ttl_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000);
    Ok(Authenticated {
        password_version: user.password_version,
        user,
        methods: vec!["password".into()],
        expires_at: started.saturating_add(ttl_micros),
        parent_audit: None,
        who,
    })
}

/// Re-scoping: the new token keeps the old one's user, expiry and audit chain.
fn token_method(state: &AppState, t: Option<TokenMethod>) -> ApiResult<Authenticated> {
    let Some(t) = t else {
        return Err(ApiError::bad_request("Expecting to find token in auth.identity."));
    };
    let parent = match state.identity.check_token(&t.id) {
        Ok(p) => p,
        Err(IdentityError::Unauthorized) => {
            return Err(auth_failed("invalid token for re-scoping", "?"));
        }
        Err(e) => return Err(e.into()),
    };
    let p = parent.payload;
    let mut methods = vec!["token".to_string()];
    methods.extend(p.m.into_iter().filter(|m| m != "token"));
    Ok(Authenticated {
        who: format!("id={}", parent.user.id),
        user: parent.user,
        methods,
        expires_at: p.exp,
        parent_audit: Some(p.pa.unwrap_or(p.a)),
        password_version: p.pv,
    })
}

async fn issue_token(State(state): St, params: Params, Body(raw): Body<Value>) -> ApiResult<Response> {
    // Parsed in two steps so that a shape error never echoes a password back.
    let req: AuthRequest = serde_json::from_value(raw).map_err(|_| {
        ApiError::bad_request(
            "Invalid authentication request: expecting auth.identity with methods and their \
             credentials.",
        )
    })?;
    let identity = &state.identity;
    let started = model::now_micros();
    let ident = req.auth.identity;
    let auth = if ident.methods.iter().any(|m| m == "password") {
        password_method(&state, ident.password, started).await?
    } else if ident.methods.iter().any(|m| m == "token") {
        token_method(&state, ident.token)?
    } else if ident.methods.is_empty() {
        return Err(ApiError::bad_request(
            "Expecting to find at least one method in auth.identity.methods.",
        ));
    } else {
        return Err(auth_failed("unsupported authentication method", "?"));
    };
    let (user, who) = (&auth.user, &auth.who);

    let project = match &req.auth.scope {
        Some(scope) => resolve_project_scope(identity, scope, who)?,
        // Keystone scopes to the default project when the user has a role there.
        None => user
            .default_project_id
            .as_deref()
            .and_then(|pid| identity.project(pid))
            .filter(|p| p.enabled && !identity.effective_roles(&user.id, &p.id).is_empty()),
    };
    let roles = match &project {
        Some(p) => {
            if !p.enabled {
                return Err(auth_failed("project disabled", who));
            }
            let roles = identity.effective_roles(&user.id, &p.id);
            if roles.is_empty() {
                tracing::info!(user = %who, project_id = %p.id, "authentication failed: no role on the project");
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("User {} has no access to project {}.", user.id, p.id),
                ));
            }
            roles
        }
        None => Vec::new(),
    };

    let payload = Payload {
        v: 1,
        u: user.id.clone(),
        p: project.as_ref().map(|p| p.id.clone()),
        m: auth.methods,
        iat: started,
        exp: auth.expires_at,
        a: super::token::new_audit_id(),
        pv: auth.password_version,
        pa: auth.parent_audit,
    };
    let token = identity.issue_token(&payload)?;
    tracing::info!(
        user_id = %user.id,
        project_id = payload.p.as_deref().unwrap_or("-"),
        audit_id = %payload.a,
        "token issued"
    );
    let info = TokenInfo {
        payload,
        user: auth.user,
        project,
        roles,
    };
    let body = token_body(&state, &info, !params.has("nocatalog"));
    token_response(StatusCode::CREATED, &token, body)
}

// ----- GET/HEAD/DELETE /v3/auth/tokens -----

/// The subject token, validated: 404 when it is not (or no longer) valid.
fn subject(state: &AppState, headers: &HeaderMap) -> ApiResult<(String, TokenInfo)> {
    let Some(t) = headers
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
    else {
        return Err(ApiError::bad_request("The X-Subject-Token header is required."));
    };
    match state.identity.check_token(t) {
        Ok(info) => Ok((t.to_string(), info)),
        Err(IdentityError::Unauthorized) => Err(ApiError::new(StatusCode::NOT_FOUND, "Could not find token.")),
        Err(e) => Err(e.into()),
    }
}

async fn validate_token(State(state): St, headers: HeaderMap, params: Params) -> ApiResult<Response> {
    let caller = authenticate(&state, &headers)?;
    let (token, info) = subject(&state, &headers)?;
    require_admin_or_self(&caller, &info.user.id, "validate another user's token")?;
    let body = token_body(&state, &info, !params.has("nocatalog"));
    token_response(StatusCode::OK, &token, body)
}

async fn revoke_token(State(state): St, headers: HeaderMap) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    let (_, info) = subject(&state, &headers)?;
    require_admin_or_self(&caller, &info.user.id, "revoke another user's token")?;
    state.identity.revoke_token(&info.payload).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- /v3/auth/projects, domains, catalog -----

async fn auth_projects(State(state): St, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    let projects: Vec<Value> = state
        .identity
        .user_projects(&caller.user.id)
        .iter()
        .filter(|p| p.enabled)
        .map(|p| admin::project_view(&state, p))
        .collect();
    Ok(Json(
        json!({"projects": projects, "links": collection_links(&state, "auth/projects")}),
    ))
}

async fn auth_domains(State(state): St, headers: HeaderMap) -> ApiResult<Json<Value>> {
    authenticate(&state, &headers)?;
    // Roles are only ever assigned on projects, so no token can be scoped to a domain.
    Ok(Json(
        json!({"domains": [], "links": collection_links(&state, "auth/domains")}),
    ))
}

async fn auth_catalog(State(state): St, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    if caller.project.is_none() {
        return Err(refuse(&caller, "catalog for an unscoped token"));
    }
    Ok(Json(
        json!({"catalog": catalog(&state), "links": collection_links(&state, "auth/catalog")}),
    ))
}
