//! The tags sub-API: `/v2.0/<collection>/<id>/tags[/<tag>]`.

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
    match registry::find(coll) {
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
/// Neutron's policy rule (`update` gives `update_networks_tags`).
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
        ctx.require_member(&format!("{action}_{}_tags", meta.plural))?;
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

pub async fn all_tags(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((coll, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let res = taggable(&coll)?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    match method {
        Method::GET => Ok(axum::Json(json!({"tags": current_tags(&ctx, res, &id)?})).into_response()),
        Method::PUT => {
            let body = parse_body(body)?;
            let list = body
                .get("tags")
                .and_then(|t| t.as_array())
                .ok_or_else(|| NeutronError::bad_request("Invalid input: body must be {\"tags\": [...]}"))?;
            let list = list
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| NeutronError::invalid_input(format!("'{t}' is not a valid tag")))
                })
                .collect::<NResult<Vec<String>>>()?;
            let c = &state.config;
            let new = unique_tags(list, c.max_tags_per_resource, c.max_tag_length)?;
            let tags = modify(&ctx, res, &id, "update", |tags| {
                *tags = new.clone();
                Ok(())
            })
            .await?;
            Ok(axum::Json(json!({"tags": tags})).into_response())
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
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((coll, id, tag)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let res = taggable(&coll)?;
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    let not_found = || {
        NeutronError::new(
            404,
            "TagNotFound",
            format!("Tag {tag} could not be found for {} {id}.", res.meta().singular),
        )
    };
    match method {
        Method::GET => {
            if current_tags(&ctx, res, &id)?.contains(&tag) {
                Ok(StatusCode::NO_CONTENT.into_response())
            } else {
                Err(not_found().into())
            }
        }
        Method::PUT => {
            validate_tag(&tag, state.config.max_tag_length)?;
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
