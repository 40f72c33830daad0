//! HTTP: domains, projects, users, roles and role assignments.

use super::error::{ApiError, ApiResult};
use super::handlers::{
    authenticate, base_url, collection_links, refuse, require_admin, require_admin_or_self, self_link, Body, Params, St,
};
use super::model::{Project, Role, User};
use super::writes::{NewProject, NewUser, ProjectPatch, RolePatch, UserPatch};
use super::{Domain, Identity, IdentityError};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v3/domains", get(list_domains))
        .route("/v3/domains/{id}", get(show_domain))
        .route("/v3/projects", get(list_projects).post(create_project))
        .route(
            "/v3/projects/{id}",
            get(show_project).patch(update_project).delete(delete_project),
        )
        .route("/v3/projects/{p}/users/{u}/roles", get(list_grants))
        .route(
            "/v3/projects/{p}/users/{u}/roles/{r}",
            put(put_grant).get(check_grant).head(check_grant).delete(delete_grant),
        )
        .route("/v3/users", get(list_users).post(create_user))
        .route("/v3/users/{id}", get(show_user).patch(update_user).delete(delete_user))
        .route("/v3/users/{id}/password", post(change_password))
        .route("/v3/users/{id}/projects", get(user_projects))
        .route("/v3/roles", get(list_roles).post(create_role))
        .route("/v3/roles/{id}", get(show_role).patch(update_role).delete(delete_role))
        .route("/v3/role_assignments", get(list_assignments))
}

type Created = (StatusCode, Json<Value>);

// ----- request body helpers -----

/// `body[key]`, which must be an object.
fn object(body: Value, key: &str) -> ApiResult<Map<String, Value>> {
    match body {
        Value::Object(mut m) => match m.remove(key) {
            Some(Value::Object(o)) => Ok(o),
            _ => Err(ApiError::bad_request(format!(
                "Expecting to find {key} in the request body."
            ))),
        },
        _ => Err(ApiError::bad_request("The request body must be a JSON object.")),
    }
}

fn invalid(field: &str, what: &str) -> ApiError {
    ApiError::bad_request(format!("Invalid input for field '{field}': {what}."))
}

/// A string attribute that may not be null.
fn take_str(m: &mut Map<String, Value>, k: &str) -> ApiResult<Option<String>> {
    match m.remove(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(k, "expected a string")),
    }
}

/// A string attribute that may be null: `Some(None)` means "set to null".
fn take_nullable_str(m: &mut Map<String, Value>, k: &str) -> ApiResult<Option<Option<String>>> {
    match m.remove(k) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s))),
        Some(_) => Err(invalid(k, "expected a string or null")),
    }
}

fn take_bool(m: &mut Map<String, Value>, k: &str) -> ApiResult<Option<bool>> {
    match m.remove(k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(invalid(k, "expected a boolean")),
    }
}

fn take_tags(m: &mut Map<String, Value>) -> ApiResult<Option<Vec<String>>> {
    match m.remove("tags") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => {
            let mut tags = Vec::with_capacity(a.len());
            for t in a {
                match t {
                    Value::String(s) if !s.is_empty() && s.len() <= 255 && !s.contains(['/', ',']) => tags.push(s),
                    _ => {
                        return Err(invalid(
                            "tags",
                            "expected a list of non-empty strings without '/' or ','",
                        ))
                    }
                }
            }
            if tags.len() > 80 {
                return Err(invalid("tags", "at most 80 tags"));
            }
            Ok(Some(tags))
        }
        Some(_) => Err(invalid("tags", "expected a list of strings")),
    }
}

/// Attributes the server owns or renders itself; never kept as client extras.
const RESERVED: &[&str] = &[
    "id",
    "links",
    "options",
    "extra",
    "domain",
    "password_hash",
    "password_expires_at",
    "tokens_valid_after",
    "original_password",
];

fn extras(mut m: Map<String, Value>) -> Map<String, Value> {
    for k in RESERVED {
        m.remove(*k);
    }
    m
}

fn domain_unchanged(m: &mut Map<String, Value>, current: Option<&str>) -> ApiResult<()> {
    if let Some(d) = take_nullable_str(m, "domain_id")? {
        if d.as_deref() != current {
            return Err(ApiError::bad_request("Cannot change Domain ID."));
        }
    }
    Ok(())
}

// ----- views -----

fn domain_view(state: &AppState, d: &Domain) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "description": "The default domain",
        "enabled": true,
        "tags": [],
        "options": {},
        "links": self_link(state, &format!("domains/{}", d.id)),
    })
}

pub(crate) fn project_view(state: &AppState, p: &Project) -> Value {
    let mut v = Map::new();
    for (k, x) in &p.extra {
        v.insert(k.clone(), x.clone());
    }
    let fixed = json!({
        "id": p.id,
        "name": p.name,
        "domain_id": p.domain_id,
        "description": p.description,
        "enabled": p.enabled,
        "parent_id": p.domain_id,
        "is_domain": false,
        "tags": p.tags,
        "options": {},
        "links": self_link(state, &format!("projects/{}", p.id)),
    });
    if let Value::Object(f) = fixed {
        v.extend(f);
    }
    Value::Object(v)
}

fn user_view(state: &AppState, u: &User) -> Value {
    let mut v = Map::new();
    for (k, x) in &u.extra {
        v.insert(k.clone(), x.clone());
    }
    v.insert("id".into(), json!(u.id));
    v.insert("name".into(), json!(u.name));
    v.insert("domain_id".into(), json!(u.domain_id));
    v.insert("enabled".into(), json!(u.enabled));
    v.insert("password_expires_at".into(), Value::Null);
    v.insert("options".into(), json!({}));
    v.insert("links".into(), self_link(state, &format!("users/{}", u.id)));
    if let Some(dp) = &u.default_project_id {
        v.insert("default_project_id".into(), json!(dp));
    }
    if let Some(d) = &u.description {
        v.insert("description".into(), json!(d));
    }
    Value::Object(v)
}

fn role_view(state: &AppState, r: &Role) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "domain_id": null,
        "description": r.description,
        "options": {},
        "links": self_link(state, &format!("roles/{}", r.id)),
    })
}

// ----- domains -----

async fn list_domains(State(state): St, headers: HeaderMap, q: Params) -> ApiResult<Json<Value>> {
    authenticate(&state, &headers)?;
    let enabled = q.bool("enabled")?;
    let domains: Vec<Value> = state
        .identity
        .domains()
        .iter()
        .filter(|d| q.get("name").is_none_or(|n| n == d.name))
        .filter(|_| enabled != Some(false))
        .map(|d| domain_view(&state, d))
        .collect();
    Ok(Json(
        json!({"domains": domains, "links": collection_links(&state, "domains")}),
    ))
}

async fn show_domain(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    authenticate(&state, &headers)?;
    let d = state
        .identity
        .domain(&id)
        .ok_or_else(|| ApiError::not_found("domain", &id))?;
    Ok(Json(json!({"domain": domain_view(&state, &d)})))
}

// ----- projects -----

async fn list_projects(State(state): St, headers: HeaderMap, q: Params) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "list projects")?;
    let enabled = q.bool("enabled")?;
    let is_domain = q.bool("is_domain")?;
    let projects: Vec<Value> = state
        .identity
        .projects()
        .iter()
        .filter(|p| q.get("name").is_none_or(|n| n == p.name))
        .filter(|p| q.get("domain_id").is_none_or(|d| d == p.domain_id))
        .filter(|p| q.get("parent_id").is_none_or(|d| d == p.domain_id))
        .filter(|p| enabled.is_none_or(|e| e == p.enabled))
        .filter(|_| is_domain != Some(true))
        .map(|p| project_view(&state, p))
        .collect();
    Ok(Json(
        json!({"projects": projects, "links": collection_links(&state, "projects")}),
    ))
}

async fn create_project(State(state): St, headers: HeaderMap, Body(body): Body<Value>) -> ApiResult<Created> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "create project")?;
    let mut m = object(body, "project")?;
    let name = take_str(&mut m, "name")?.ok_or_else(|| invalid("name", "'name' is a required property"))?;
    let domain_id = take_str(&mut m, "domain_id")?.unwrap_or_else(|| super::model::DEFAULT_DOMAIN_ID.into());
    let description = take_nullable_str(&mut m, "description")?.flatten().unwrap_or_default();
    let enabled = take_bool(&mut m, "enabled")?.unwrap_or(true);
    let tags = take_tags(&mut m)?.unwrap_or_default();
    if let Some(Some(parent)) = take_nullable_str(&mut m, "parent_id")? {
        if parent != domain_id {
            return Err(ApiError::bad_request("Hierarchical projects are not supported."));
        }
    }
    if take_bool(&mut m, "is_domain")? == Some(true) {
        return Err(ApiError::bad_request("Projects acting as domains are not supported."));
    }
    let p = state
        .identity
        .create_project(NewProject {
            name,
            domain_id,
            description,
            enabled,
            tags,
            extra: extras(m),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"project": project_view(&state, &p)}))))
}

async fn show_project(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    if !caller.is_admin() && caller.project.as_ref().is_none_or(|p| p.id != id) {
        return Err(refuse(&caller, "show project"));
    }
    let p = state
        .identity
        .project(&id)
        .ok_or_else(|| ApiError::not_found("project", &id))?;
    Ok(Json(json!({"project": project_view(&state, &p)})))
}

async fn update_project(
    State(state): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "update project")?;
    let current = state
        .identity
        .project(&id)
        .ok_or_else(|| ApiError::not_found("project", &id))?;
    let mut m = object(body, "project")?;
    domain_unchanged(&mut m, Some(&current.domain_id))?;
    let patch = ProjectPatch {
        name: take_str(&mut m, "name")?,
        description: take_nullable_str(&mut m, "description")?.map(Option::unwrap_or_default),
        enabled: take_bool(&mut m, "enabled")?,
        tags: take_tags(&mut m)?,
        extra: {
            m.remove("parent_id");
            m.remove("is_domain");
            extras(m)
        },
    };
    let p = state.identity.update_project(&id, patch).await?;
    Ok(Json(json!({"project": project_view(&state, &p)})))
}

async fn delete_project(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "delete project")?;
    state.identity.delete_project(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- users -----

async fn list_users(State(state): St, headers: HeaderMap, q: Params) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "list users")?;
    let enabled = q.bool("enabled")?;
    let users: Vec<Value> = state
        .identity
        .users()
        .iter()
        .filter(|u| q.get("name").is_none_or(|n| n == u.name))
        .filter(|u| q.get("domain_id").is_none_or(|d| d == u.domain_id))
        .filter(|u| enabled.is_none_or(|e| e == u.enabled))
        .map(|u| user_view(&state, u))
        .collect();
    Ok(Json(
        json!({"users": users, "links": collection_links(&state, "users")}),
    ))
}

async fn create_user(State(state): St, headers: HeaderMap, Body(body): Body<Value>) -> ApiResult<Created> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "create user")?;
    let mut m = object(body, "user")?;
    let name = take_str(&mut m, "name")?.ok_or_else(|| invalid("name", "'name' is a required property"))?;
    let domain_id = take_str(&mut m, "domain_id")?.unwrap_or_else(|| super::model::DEFAULT_DOMAIN_ID.into());
    let password = take_nullable_str(&mut m, "password")?.flatten();
    let default_project_id = take_nullable_str(&mut m, "default_project_id")?.flatten();
    let enabled = take_bool(&mut m, "enabled")?.unwrap_or(true);
    let description = take_nullable_str(&mut m, "description")?.flatten();
    let u = state
        .identity
        .create_user(NewUser {
            name,
            domain_id,
            password,
            default_project_id,
            enabled,
            description,
            extra: extras(m),
        })
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"user": user_view(&state, &u)}))))
}

async fn show_user(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin_or_self(&caller, &id, "show user")?;
    let u = state
        .identity
        .user(&id)
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    Ok(Json(json!({"user": user_view(&state, &u)})))
}

async fn update_user(
    State(state): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "update user")?;
    let current = state
        .identity
        .user(&id)
        .ok_or_else(|| ApiError::not_found("user", &id))?;
    let mut m = object(body, "user")?;
    domain_unchanged(&mut m, Some(&current.domain_id))?;
    let password = match take_nullable_str(&mut m, "password")? {
        Some(None) => return Err(invalid("password", "expected a string")),
        Some(Some(p)) => Some(p),
        None => None,
    };
    let patch = UserPatch {
        name: take_str(&mut m, "name")?,
        password,
        default_project_id: take_nullable_str(&mut m, "default_project_id")?,
        enabled: take_bool(&mut m, "enabled")?,
        description: take_nullable_str(&mut m, "description")?,
        extra: extras(m),
    };
    let u = state.identity.update_user(&id, patch).await?;
    Ok(Json(json!({"user": user_view(&state, &u)})))
}

async fn delete_user(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "delete user")?;
    state.identity.delete_user(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v3/users/{id}/password`: authenticated by the original password, as in Keystone (so a
/// user can change it without a token).
async fn change_password(State(state): St, Path(id): Path<String>, Body(body): Body<Value>) -> ApiResult<StatusCode> {
    let mut m = object(body, "user")?;
    let original = take_str(&mut m, "original_password")?
        .ok_or_else(|| invalid("original_password", "'original_password' is a required property"))?;
    let new = take_str(&mut m, "password")?.ok_or_else(|| invalid("password", "'password' is a required property"))?;
    match state.identity.change_password(&id, original, new).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT),
        // Unknown user or wrong original password: the same answer.
        Err(IdentityError::NotFound { .. }) | Err(IdentityError::Unauthorized) => Err(ApiError::unauthorized()),
        Err(e) => Err(e.into()),
    }
}

async fn user_projects(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin_or_self(&caller, &id, "list a user's projects")?;
    if state.identity.user(&id).is_none() {
        return Err(ApiError::not_found("user", &id));
    }
    let projects: Vec<Value> = state
        .identity
        .user_projects(&id)
        .iter()
        .map(|p| project_view(&state, p))
        .collect();
    Ok(Json(
        json!({"projects": projects, "links": collection_links(&state, &format!("users/{id}/projects"))}),
    ))
}

// ----- roles -----

async fn list_roles(State(state): St, headers: HeaderMap, q: Params) -> ApiResult<Json<Value>> {
    // Keystone's default policy: roles are listed by admins (and system readers) only.
    require_admin(&authenticate(&state, &headers)?, "list roles")?;
    let roles: Vec<Value> = if q.get("domain_id").is_some() {
        Vec::new() // no domain-specific roles
    } else {
        state
            .identity
            .roles()
            .iter()
            .filter(|r| q.get("name").is_none_or(|n| n == r.name))
            .map(|r| role_view(&state, r))
            .collect()
    };
    Ok(Json(
        json!({"roles": roles, "links": collection_links(&state, "roles")}),
    ))
}

async fn create_role(State(state): St, headers: HeaderMap, Body(body): Body<Value>) -> ApiResult<Created> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "create role")?;
    let mut m = object(body, "role")?;
    let name = take_str(&mut m, "name")?.ok_or_else(|| invalid("name", "'name' is a required property"))?;
    if let Some(Some(_)) = take_nullable_str(&mut m, "domain_id")? {
        return Err(ApiError::bad_request("Domain-specific roles are not supported."));
    }
    let description = take_nullable_str(&mut m, "description")?.flatten();
    let r = state.identity.create_role(name, description).await?;
    Ok((StatusCode::CREATED, Json(json!({"role": role_view(&state, &r)}))))
}

async fn show_role(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    require_admin(&authenticate(&state, &headers)?, "show a role")?;
    let r = state
        .identity
        .role(&id)
        .ok_or_else(|| ApiError::not_found("role", &id))?;
    Ok(Json(json!({"role": role_view(&state, &r)})))
}

async fn update_role(
    State(state): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(body): Body<Value>,
) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "update role")?;
    let mut m = object(body, "role")?;
    domain_unchanged(&mut m, None)?;
    let patch = RolePatch {
        name: take_str(&mut m, "name")?,
        description: take_nullable_str(&mut m, "description")?,
    };
    let r = state.identity.update_role(&id, patch).await?;
    Ok(Json(json!({"role": role_view(&state, &r)})))
}

async fn delete_role(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "delete role")?;
    state.identity.delete_role(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- role assignments -----

fn grant_target(identity: &Identity, p: &str, u: &str) -> ApiResult<()> {
    if !identity.project_exists(p) {
        return Err(ApiError::not_found("project", p));
    }
    if identity.user(u).is_none() {
        return Err(ApiError::not_found("user", u));
    }
    Ok(())
}

async fn list_grants(
    State(state): St,
    headers: HeaderMap,
    Path((p, u)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    require_admin_or_self(&caller, &u, "list role grants")?;
    grant_target(&state.identity, &p, &u)?;
    let roles: Vec<Value> = state
        .identity
        .direct_roles(&u, &p)
        .iter()
        .map(|r| role_view(&state, r))
        .collect();
    Ok(Json(
        json!({"roles": roles, "links": collection_links(&state, &format!("projects/{p}/users/{u}/roles"))}),
    ))
}

async fn check_grant(
    State(state): St,
    headers: HeaderMap,
    Path((p, u, r)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin_or_self(&caller, &u, "check a role grant")?;
    if state.identity.has_assignment(&p, &u, &r) && state.identity.role(&r).is_some() {
        grant_target(&state.identity, &p, &u)?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "role assignment",
            &format!("role {r}, user {u}, project {p}"),
        ))
    }
}

async fn put_grant(
    State(state): St,
    headers: HeaderMap,
    Path((p, u, r)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "grant a role")?;
    state.identity.grant(&p, &u, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_grant(
    State(state): St,
    headers: HeaderMap,
    Path((p, u, r)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    let caller = authenticate(&state, &headers)?;
    require_admin(&caller, "revoke a role")?;
    state.identity.revoke_grant(&p, &u, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_assignments(State(state): St, headers: HeaderMap, q: Params) -> ApiResult<Json<Value>> {
    let caller = authenticate(&state, &headers)?;
    let user_filter = q.get("user.id");
    if !caller.is_admin() && user_filter != Some(caller.user.id.as_str()) {
        return Err(refuse(&caller, "list role assignments"));
    }
    let links = collection_links(&state, "role_assignments");
    // Groups, domain and system scopes do not exist here.
    if q.has("group.id") || q.has("scope.domain.id") || q.has("scope.system") {
        return Ok(Json(json!({"role_assignments": [], "links": links})));
    }
    let identity = &state.identity;
    let include_names = q.bool("include_names")?.unwrap_or(false);
    let effective = q.has("effective");
    let mut triples: Vec<(String, String, String)> = identity
        .assignments()
        .into_iter()
        .filter(|(p, u, _)| user_filter.is_none_or(|f| f == u) && q.get("scope.project.id").is_none_or(|f| f == p))
        .collect();
    if effective {
        let mut pairs: Vec<(String, String)> = triples.iter().map(|(p, u, _)| (p.clone(), u.clone())).collect();
        pairs.dedup();
        triples = pairs
            .into_iter()
            .flat_map(|(p, u)| {
                identity
                    .effective_roles(&u, &p)
                    .into_iter()
                    .map(move |r| (p.clone(), u.clone(), r.id))
            })
            .collect();
    }
    let base = base_url(&state).to_string();
    let out: Vec<Value> = triples
        .iter()
        .filter(|(_, _, r)| q.get("role.id").is_none_or(|f| f == r))
        .map(|(p, u, r)| {
            let mut role = json!({"id": r});
            let mut user = json!({"id": u});
            let mut project = json!({"id": p});
            if include_names {
                if let Some(x) = identity.role(r) {
                    role["name"] = json!(x.name);
                }
                if let Some(x) = identity.user(u) {
                    user["name"] = json!(x.name);
                    user["domain"] = json!({"id": x.domain_id, "name": identity.domain(&x.domain_id).map(|d| d.name)});
                }
                if let Some(x) = identity.project(p) {
                    project["name"] = json!(x.name);
                    project["domain"] =
                        json!({"id": x.domain_id, "name": identity.domain(&x.domain_id).map(|d| d.name)});
                }
            }
            json!({
                "role": role,
                "user": user,
                "scope": {"project": project},
                "links": {"assignment": format!("{base}/projects/{p}/users/{u}/roles/{r}")},
            })
        })
        .collect();
    Ok(Json(json!({"role_assignments": out, "links": links})))
}
