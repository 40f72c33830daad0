//! The tags sub-API: `/v2.0/<collection>/<id>/tags[/<tag>]`, on every resource the registry
//! marks taggable. Policy rules are Neutron's `<action>_<singular>:tags`.

use super::common::{json_bytes, now, retry, Ctx, NResult};
use super::http::{authenticate, parse_body, ApiResult};
use super::registry;
use super::resource::{show, Resource};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::validate::{too_many_tags, unique_tags, validate_tag};
use isthmus_model::{keys, NeutronError};
use isthmus_store::{Compare, Op};
use serde_json::{json, Value};
use std::sync::Arc;

/// The resource at `coll`, if it takes tags.
fn taggable(coll: &str) -> NResult<&'static dyn Resource> {
    let found = if coll == super::qos::QosPolicies.meta().collection {
        Some(&super::qos::QosPolicies as &'static dyn Resource)
    } else {
        registry::find(coll)
    };
    match found {
        Some(r) if r.meta().tags => Ok(r),
        _ => Err(NeutronError::new(
            404,
            "HTTPNotFound",
            format!("Tags are not supported on {coll}"),
        )),
    }
}

/// Current tags of a resource the caller may see.
fn current_tags(ctx: &Ctx<'_>, res: &dyn Resource, id: &str) -> NResult<Vec<String>> {
    let view = show(ctx, res, id)?;
    Ok(view
        .get("tags")
        .and_then(|t| t.as_array())
        .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}

/// Rewrites the stored resource's tags with `f`, bumping its revision. `action` names
/// Neutron's policy rule (`update` gives `update_network:tags`).
async fn modify(
    ctx: &Ctx<'_>,
    res: &dyn Resource,
    id: &str,
    action: &str,
    f: impl Fn(&mut Vec<String>) -> NResult<()>,
) -> NResult<Vec<String>> {
    let meta = res.meta();
    let key = keys::resource(meta.store, id);
    retry(ctx, |ctx| {
        let view = show(ctx, res, id)?;
        ctx.require_member(&format!("{action}_{}:tags", meta.singular))?;
        let owner = view.get("project_id").and_then(|p| p.as_str()).unwrap_or_default();
        if !ctx.admin() && !ctx.owns(owner) {
            return Err(NeutronError::forbidden(
                "Changing tags of another project's resource is not allowed",
            ));
        }
        let kv = ctx.state.cache.get(&key).ok_or_else(|| meta.not_found(id))?;
        let mut stored: Value =
            serde_json::from_slice(&kv.value).map_err(|_| NeutronError::internal("stored resource is unreadable"))?;
        let mut tags: Vec<String> = stored
            .get("tags")
            .and_then(|t| t.as_array())
            .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        f(&mut tags)?;
        if let Some(obj) = stored.as_object_mut() {
            obj.insert("tags".into(), json!(tags));
            let rev = obj.get("revision_number").and_then(|r| r.as_u64()).unwrap_or(0);
            obj.insert("revision_number".into(), json!(rev + 1));
            obj.insert("updated_at".into(), json!(now()));
        }
        Ok((
            vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
            vec![Op::put(key.clone(), json_bytes(&stored))],
            tags,
        ))
    })
    .await
}

/// The `{"tags": [...]}` body of a bulk tag request: valid tags, no duplicates (Neutron's
/// `list_of_unique_strings`).
fn body_tags(state: &AppState, body: Value) -> NResult<Vec<String>> {
    let list = body
        .get("tags")
        .and_then(|t| t.as_array())
        .ok_or_else(|| NeutronError::invalid_input("Invalid tags body"))?;
    let list = list
        .iter()
        .map(|t| {
            t.as_str()
                .map(str::to_string)
                .ok_or_else(|| NeutronError::invalid_input(format!("'{t}' is not a valid string")))
        })
        .collect::<NResult<Vec<String>>>()?;
    // Each duplicate named once, in order of first repetition.
    let mut seen = std::collections::HashSet::new();
    let mut named = std::collections::HashSet::new();
    let dups: Vec<&str> = list
        .iter()
        .filter(|t| !seen.insert(t.as_str()) && named.insert(t.as_str()))
        .map(String::as_str)
        .collect();
    if !dups.is_empty() {
        return Err(NeutronError::invalid_input(format!(
            "Duplicate items in the list: '{}'",
            dups.join(", ")
        )));
    }
    let c = &state.config;
    unique_tags(list, c.max_tags_per_resource, c.max_tag_length)
}

pub async fn all_tags(
    state: State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((coll, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    all_tags_of(state, method, headers, &coll, id, body).await
}

/// [`all_tags`] for QoS policies, whose collection path has two segments.
pub async fn qos_all_tags(
    state: State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    all_tags_of(state, method, headers, "qos/policies", id, body).await
}

/// [`one_tag`] for QoS policies.
pub async fn qos_one_tag(
    state: State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((id, tag)): Path<(String, String)>,
) -> ApiResult<Response> {
    one_tag_of(state, method, headers, "qos/policies", id, tag).await
}

async fn all_tags_of(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    coll: &str,
    id: String,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let res = taggable(coll)?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    match method {
        Method::GET => Ok(axum::Json(json!({"tags": current_tags(&ctx, res, &id)?})).into_response()),
        Method::PUT | Method::POST => {
            let new = body_tags(&state, parse_body(body)?)?;
            // PUT replaces the whole set; POST (Neutron's `tag-creation`) adds to it.
            let (action, replace) = if method == Method::PUT {
                ("update", true)
            } else {
                ("create", false)
            };
            let max = state.config.max_tags_per_resource;
            let tags = modify(&ctx, res, &id, action, |tags| {
                if replace {
                    tags.clear();
                }
                for t in &new {
                    if !tags.contains(t) {
                        tags.push(t.clone());
                    }
                }
                if tags.len() > max {
                    return Err(too_many_tags(max));
                }
                Ok(())
            })
            .await?;
            if replace {
                Ok(axum::Json(json!({"tags": tags})).into_response())
            } else {
                Ok((StatusCode::CREATED, axum::Json(json!({"tags": new}))).into_response())
            }
        }
        _ => {
            modify(&ctx, res, &id, "delete", |tags| {
                tags.clear();
                Ok(())
            })
            .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

pub async fn one_tag(
    state: State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((coll, id, tag)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    one_tag_of(state, method, headers, &coll, id, tag).await
}

async fn one_tag_of(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    coll: &str,
    id: String,
    tag: String,
) -> ApiResult<Response> {
    let res = taggable(coll)?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    // Neutron checks the tag itself before looking at the resource, whatever the method.
    validate_tag(&tag, state.config.max_tag_length)?;
    let not_found = || NeutronError::new(404, "TagNotFound", format!("Tag {tag} could not be found."));
    match method {
        Method::GET => {
            if current_tags(&ctx, res, &id)?.contains(&tag) {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(not_found().into())
            }
        }
        Method::PUT => {
            let max = state.config.max_tags_per_resource;
            modify(&ctx, res, &id, "update", |tags| {
                if !tags.contains(&tag) {
                    if tags.len() >= max {
                        return Err(too_many_tags(max));
                    }
                    tags.push(tag.clone());
                }
                Ok(())
            })
            .await?;
            Ok(StatusCode::CREATED.into_response())
        }
        _ => {
            modify(&ctx, res, &id, "delete", |tags| {
                let before = tags.len();
                tags.retain(|t| *t != tag);
                if tags.len() == before {
                    Err(not_found())
                } else {
                    Ok(())
                }
            })
            .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}
