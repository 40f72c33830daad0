//! The quotas API (`quotas`, `quota_details`): `/v2.0/quotas[/<project>[/default|/details]]`
//! and `/v2.0/quotas/{tenant,project}`. The quota resources are the registry's resources that
//! name one; limits a project was given live in one record per project.

use super::common::{json_bytes, policy_denied, retry, Ctx, NResult};
use super::http::{authenticate, json_response, parse_body, ApiResult};
use super::quota::{stored_limits, touch, unchanged, Record};
use super::registry;
use super::resource::Resource;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::{keys, NeutronError};
use isthmus_store::Op;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The largest limit Neutron stores (a database integer).
const MAX_LIMIT: i64 = i32::MAX as i64;

/// Every resource that has a quota, with its quota name, in the registry's order.
fn quota_resources() -> impl Iterator<Item = (&'static str, &'static dyn Resource)> {
    registry::all().iter().filter_map(|r| r.meta().quota.map(|q| (q, *r)))
}

/// `project`'s limits: its own where it has them, the defaults elsewhere.
fn effective(ctx: &Ctx<'_>, project: &str) -> Map<String, Value> {
    let own = stored_limits(ctx, project).map(|(m, _)| m).unwrap_or_default();
    quota_resources()
        .map(|(q, _)| {
            let l = own.get(q).copied().unwrap_or_else(|| ctx.state.config.quota_default(q));
            (q.to_string(), json!(l))
        })
        .collect()
}

fn defaults(ctx: &Ctx<'_>) -> Map<String, Value> {
    quota_resources()
        .map(|(q, _)| (q.to_string(), json!(ctx.state.config.quota_default(q))))
        .collect()
}

/// Neutron reads quotas of another project only with `get_quota` (admin).
fn may_read(ctx: &Ctx<'_>, project: &str) -> NResult<()> {
    if ctx.owns(project) || ctx.admin() {
        Ok(())
    } else {
        Err(policy_denied("rule:get_quota"))
    }
}

/// Neutron takes `.json` at the end of a path as the response format.
fn strip_format(s: &str) -> &str {
    s.strip_suffix(".json").unwrap_or(s)
}

fn unsupported_post() -> NeutronError {
    NeutronError::new(
        501,
        "HTTPNotImplemented",
        "POST requests are not supported on this resource.",
    )
}

pub async fn collection(State(state): State<Arc<AppState>>, method: Method, headers: HeaderMap) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    if method == Method::POST {
        return Err(unsupported_post().into());
    }
    if !ctx.admin() {
        return Err(policy_denied("rule:get_quota").into());
    }
    let mut out = vec![];
    for (rec, _) in state.cache.list_json::<Record>(keys::QUOTA_PREFIX) {
        let mut q = effective(&ctx, &rec.project_id);
        q.insert("project_id".into(), json!(rec.project_id));
        q.insert("tenant_id".into(), json!(rec.project_id));
        out.push(Value::Object(q));
    }
    Ok(json_response(StatusCode::OK, json!({ "quotas": out })))
}

pub async fn member(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    let id = strip_format(&id);
    match (method, id) {
        // The caller's own project, as Neutron's `tenant` and `project` collection actions.
        (Method::GET, "tenant") => Ok(json_response(
            StatusCode::OK,
            json!({"tenant": {"tenant_id": auth.project_id}}),
        )),
        (Method::GET, "project") => Ok(json_response(
            StatusCode::OK,
            json!({"project": {"project_id": auth.project_id}}),
        )),
        (Method::GET, id) => {
            may_read(&ctx, id)?;
            Ok(json_response(StatusCode::OK, json!({"quota": effective(&ctx, id)})))
        }
        (Method::PUT, id) => {
            if !ctx.admin() {
                return Err(policy_denied("rule:update_quota").into());
            }
            // Limits are stored under the id: bounded like every project id the API takes.
            if id.chars().count() > 255 {
                return Err(NeutronError::invalid_input(format!(
                    "project id of {} characters is longer than 255",
                    id.chars().count()
                ))
                .into());
            }
            let body = parse_body(body)?;
            let out = update(&ctx, id, body).await?;
            Ok(json_response(StatusCode::OK, json!({ "quota": out })))
        }
        (_, id) => {
            if !ctx.admin() {
                return Err(policy_denied("rule:delete_quota").into());
            }
            reset(&ctx, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

pub async fn action(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    match strip_format(&action) {
        "default" => {
            may_read(&ctx, &id)?;
            Ok(json_response(StatusCode::OK, json!({"quota": defaults(&ctx)})))
        }
        "details" => {
            if !ctx.owns(&id) && !ctx.admin() {
                return Err(NeutronError::new(
                    403,
                    "AdminRequired",
                    "User does not have admin privileges: Only admin is authorized to access quotas for another project.",
                )
                .into());
            }
            let limits = effective(&ctx, &id);
            let details: Map<String, Value> = quota_resources()
                .map(|(q, r)| {
                    let limit = limits.get(q).cloned().unwrap_or(json!(-1));
                    // Creates reserve nothing ahead: a create is counted once it exists.
                    (
                        q.to_string(),
                        json!({"limit": limit, "used": r.used(&ctx, &id), "reserved": 0}),
                    )
                })
                .collect();
            Ok(json_response(StatusCode::OK, json!({ "quota": details })))
        }
        _ => Err(NeutronError::new(404, "HTTPNotFound", "The resource could not be found.").into()),
    }
}

/// One limit from an update body: an integer (or a string of one, as Neutron converts) in
/// -1..=2^31-1.
fn parse_limit(name: &str, v: &Value) -> NResult<i64> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let shown = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let n = n.ok_or_else(|| NeutronError::invalid_attr(name, format!("'{shown}' is not an integer")))?;
    if n < -1 {
        return Err(NeutronError::invalid_attr(
            name,
            format!("'{n}' is too small - must be at least '-1'"),
        ));
    }
    if n > MAX_LIMIT {
        return Err(NeutronError::invalid_attr(
            name,
            format!("'{n}' is too large - must be no larger than '{MAX_LIMIT}'"),
        ));
    }
    Ok(n)
}

async fn update(ctx: &Ctx<'_>, project: &str, body: Value) -> NResult<Map<String, Value>> {
    let Some(Value::Object(mut given)) = body.get("quota").cloned() else {
        return Err(NeutronError::bad_request("Unable to find 'quota' in request body"));
    };
    let force = match given.remove("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(other) => {
            return Err(NeutronError::invalid_attr(
                "force",
                format!("'{other}' cannot be converted to boolean"),
            ))
        }
    };
    // Neutron no longer needs it (usage is always checked unless forced) but still takes it.
    given.remove("check_limit");
    let known: Vec<&str> = quota_resources().map(|(q, _)| q).collect();
    let unknown: Vec<&str> = given
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(NeutronError::bad_request(format!(
            "Unrecognized attribute(s) '{}'",
            unknown.join(", ")
        )));
    }
    let mut changes = BTreeMap::new();
    for (k, v) in &given {
        changes.insert(k.clone(), parse_limit(k, v)?);
    }
    retry(ctx, |ctx| {
        // Each changed resource's guard is compared and rewritten, so a create planned against
        // the old limit plans again, and the usage read here cannot grow before this commits.
        let mut cmp = vec![];
        let mut ops = vec![];
        for q in changes.keys() {
            let g = keys::quota_guard(project, q);
            cmp.push(unchanged(ctx, &g));
            ops.push(touch(g));
        }
        let rkey = keys::quota(project);
        cmp.push(unchanged(ctx, &rkey));
        if !force {
            for (q, r) in quota_resources() {
                let Some(&limit) = changes.get(q) else { continue };
                let used = r.used(ctx, project);
                if limit >= 0 && used > usize::try_from(limit).unwrap_or(usize::MAX) {
                    return Err(NeutronError::bad_request(format!(
                        "Quota limit {limit} for {q} must be greater than or equal to already used {used}"
                    )));
                }
            }
        }
        let mut limits = stored_limits(ctx, project).map(|(m, _)| m).unwrap_or_default();
        limits.extend(changes.clone());
        let rec = Record {
            project_id: project.to_string(),
            limits,
        };
        ops.push(Op::put(rkey, json_bytes(&rec)));
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::info!(project, changes = ?changes, "quota limits changed");
    Ok(effective(ctx, project))
}

async fn reset(ctx: &Ctx<'_>, project: &str) -> NResult<()> {
    retry(ctx, |ctx| {
        let rkey = keys::quota(project);
        let Some((limits, _)) = stored_limits(ctx, project) else {
            return Err(NeutronError::new(
                404,
                "TenantQuotaNotFound",
                format!("Quota for project {project} could not be found."),
            ));
        };
        let mut cmp = vec![unchanged(ctx, &rkey)];
        let mut ops = vec![Op::delete(rkey)];
        // Creates planned against the old limits plan again against the defaults.
        for q in limits.keys() {
            let g = keys::quota_guard(project, q);
            cmp.push(unchanged(ctx, &g));
            ops.push(touch(g));
        }
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::info!(project, "quota limits reset to the defaults");
    Ok(())
}
