//! QoS (`qos`, `qos-bw-limit-direction`, `qos-default`): policies at `/v2.0/qos/policies` and
//! their bandwidth limit rules at `.../bandwidth_limit_rules`. Rules are stored inside their
//! policy, so "one rule per direction" is settled by the policy's compare-and-swap.
//!
//! Policy as in Neutron's defaults: anyone who can read sees their project's and shared
//! policies; only admins create, change or delete policies and rules. Attaching a visible
//! policy to one's own port or network is a port or network update (`portops`, `networks`).

use super::common::{
    check_if_match, description_from, json_bytes, new_id, not_found, now, policy_denied, retry, tags_from, Ctx, NResult,
};
use super::http::{authenticate, if_match, json_response, parse_body, ApiError, ApiResult};
use super::lookup::{self, policy_visible, qos_default_key, visible_policy};
use super::query::{Prefilter, Query};
use super::resource::{BoxFut, Meta, Resource};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::validate::Body;
use isthmus_model::{BandwidthLimitRule, Network, NeutronError, Port, QosPolicy, StandardAttrs};
use isthmus_store::{Compare, Op};
use serde_json::{json, Value};
use std::sync::Arc;

/// Neutron's integer columns: what `max_kbps` and `max_burst_kbps` may be.
const DB_INTEGER_MAX: i64 = 2_147_483_647;
const DIRECTIONS: [&str; 2] = ["ingress", "egress"];

fn key(id: &str) -> String {
    lookup::key::<QosPolicy>(id)
}

fn rule_not_found(rule: &str, policy: &str) -> NeutronError {
    NeutronError::new(
        404,
        "QosRuleNotFound",
        format!("QoS rule {rule} for policy {policy} could not be found."),
    )
}

fn default_exists(project: &str) -> NeutronError {
    NeutronError::conflict(
        "QoSPolicyDefaultAlreadyExists",
        format!("A default QoS policy exists for project {project}."),
    )
}

fn require_admin(ctx: &Ctx<'_>, rule: &str) -> NResult<()> {
    if ctx.admin() {
        Ok(())
    } else {
        Err(policy_denied(&format!("rule:{rule}")))
    }
}

fn context<'a>(state: &'a AppState, auth: &'a crate::identity::AuthContext) -> Ctx<'a> {
    Ctx { state, auth }
}

/// The policies the caller may see, rendered (the list handler's and the tags API's).
fn visible_policies(ctx: &Ctx<'_>) -> Vec<Value> {
    ctx.all::<QosPolicy>()
        .into_iter()
        .filter(|(p, _)| policy_visible(ctx, p))
        .map(|(p, _)| p.to_api())
        .collect()
}

/// `GET` (list) and `POST` on `/v2.0/qos/policies`.
pub async fn policies(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = context(&state, &auth);
    if method == Method::GET {
        let q = Query::parse(q.as_deref().unwrap_or(""))?;
        let items: Vec<Value> = if ctx.can_read() { visible_policies(&ctx) } else { vec![] };
        let url = format!("{}v2.0/qos/policies", state.network_url);
        return Ok(json_response(StatusCode::OK, q.apply(items, "policies", &url)?));
    }
    require_admin(&ctx, "create_policy")?;
    let body = Body::from_value(parse_body(body)?, "policy")?;
    let p = create_policy(&ctx, body).await?;
    Ok(json_response(StatusCode::CREATED, json!({ "policy": p })))
}

/// `GET`, `PUT` and `DELETE` on `/v2.0/qos/policies/{id}`.
pub async fn policy(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = context(&state, &auth);
    let shown = readable(&ctx, &id)?;
    match method {
        Method::GET => {
            let q = Query::parse(q.as_deref().unwrap_or(""))?;
            Ok(json_response(
                StatusCode::OK,
                json!({ "policy": q.select_fields(shown) }),
            ))
        }
        Method::PUT => {
            require_admin(&ctx, "update_policy")?;
            let body = Body::from_value(parse_body(body)?, "policy")?;
            let p = update_policy(&ctx, &id, body, if_match(&headers)?).await?;
            Ok(json_response(StatusCode::OK, json!({ "policy": p })))
        }
        _ => {
            require_admin(&ctx, "delete_policy")?;
            delete_policy(&ctx, &id, if_match(&headers)?).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// A policy the caller may read, rendered; 404 otherwise.
fn readable(ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
    if !ctx.can_read() {
        return Err(not_found::<QosPolicy>(id));
    }
    Ok(visible_policy(ctx, id)?.0.to_api())
}

/// `GET` (list) and `POST` on `/v2.0/qos/policies/{id}/bandwidth_limit_rules`.
pub async fn rules(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = context(&state, &auth);
    readable(&ctx, &id)?;
    if method == Method::GET {
        let q = Query::parse(q.as_deref().unwrap_or(""))?;
        let (p, _) = visible_policy(&ctx, &id)?;
        let items = p.bandwidth_limit_rules.iter().map(|r| r.to_api(&p.id)).collect();
        let url = format!("{}v2.0/qos/policies/{id}/bandwidth_limit_rules", state.network_url);
        return Ok(json_response(
            StatusCode::OK,
            q.apply(items, "bandwidth_limit_rules", &url)?,
        ));
    }
    require_admin(&ctx, "create_policy_bandwidth_limit_rule")?;
    let body = Body::from_value(parse_body(body)?, "bandwidth_limit_rule")?;
    let r = create_rule(&ctx, &id, body).await?;
    Ok(json_response(
        StatusCode::CREATED,
        json!({ "bandwidth_limit_rule": r.to_api(&id) }),
    ))
}

/// `GET`, `PUT` and `DELETE` on `/v2.0/qos/policies/{id}/bandwidth_limit_rules/{rule}`.
pub async fn rule(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path((id, rule_id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = context(&state, &auth);
    readable(&ctx, &id)?;
    let (p, _) = visible_policy(&ctx, &id)?;
    let current = p
        .bandwidth_limit_rules
        .iter()
        .find(|r| r.id == rule_id)
        .ok_or_else(|| rule_not_found(&rule_id, &id))?;
    match method {
        Method::GET => {
            let q = Query::parse(q.as_deref().unwrap_or(""))?;
            Ok(json_response(
                StatusCode::OK,
                json!({ "bandwidth_limit_rule": q.select_fields(current.to_api(&id)) }),
            ))
        }
        Method::PUT => {
            require_admin(&ctx, "update_policy_bandwidth_limit_rule")?;
            let body = Body::from_value(parse_body(body)?, "bandwidth_limit_rule")?;
            let r = update_rule(&ctx, &id, &rule_id, body).await?;
            Ok(json_response(
                StatusCode::OK,
                json!({ "bandwidth_limit_rule": r.to_api(&id) }),
            ))
        }
        _ => {
            require_admin(&ctx, "delete_policy_bandwidth_limit_rule")?;
            delete_rule(&ctx, &id, &rule_id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// `GET /v2.0/qos/rule-types`: what this deployment enforces.
pub async fn rule_types(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    authenticate(&state, &headers).await?;
    Ok(json_response(
        StatusCode::OK,
        json!({"rule_types": [{"type": "bandwidth_limit"}]}),
    ))
}

/// `GET /v2.0/qos/rule-types/{type}`: the rule type's parameters (admin only, as in Neutron).
pub async fn rule_type(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(kind): Path<String>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    require_admin(&context(&state, &auth), "get_rule_type")?;
    if kind != "bandwidth_limit" {
        return Err(ApiError(NeutronError::new(
            404,
            "QosRuleTypeNotFound",
            format!("QoS rule type {kind} could not be found."),
        )));
    }
    let range = json!({"type": "range", "values": {"start": 0, "end": DB_INTEGER_MAX}});
    let params = json!({
        "max_kbps": {"parameter_type": "range", "parameter_values": range["values"]},
        "max_burst_kbps": {"parameter_type": "range", "parameter_values": range["values"]},
        "direction": {"parameter_type": "choices", "parameter_values": DIRECTIONS},
    });
    Ok(json_response(
        StatusCode::OK,
        json!({"rule_type": {"type": kind, "drivers": [{"name": "isthmus", "supported_parameters": params}]}}),
    ))
}

async fn create_policy(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let shared = body.boolean("shared")?.unwrap_or(false);
    let is_default = body.boolean("is_default")?.unwrap_or(false);
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    let p = QosPolicy {
        id: new_id(),
        project_id: project_id.clone(),
        name,
        shared,
        is_default,
        bandwidth_limit_rules: vec![],
        deleting: false,
        std: StandardAttrs {
            description,
            tags,
            ..StandardAttrs::new(&now())
        },
    };
    retry(ctx, |ctx| {
        let mut cmp = vec![Compare::Absent(key(&p.id))];
        let mut ops = vec![Op::put(key(&p.id), json_bytes(&p))];
        if is_default {
            let k = qos_default_key(&project_id);
            if ctx.state.cache.contains(&k) {
                return Err(default_exists(&project_id));
            }
            cmp.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, p.id.clone()));
        }
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::info!(policy = %p.id, project = %p.project_id, "QoS policy created");
    Ok(p.to_api())
}

async fn update_policy(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    for ro in ["project_id", "tenant_id"] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let shared = body.boolean("shared")?;
    let is_default = body.boolean("is_default")?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let p = retry(ctx, |ctx| {
        let (mut p, rev) = visible_policy(ctx, id)?;
        check_if_match(if_match, p.std.revision_number)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        if let Some(v) = &name {
            p.name = v.clone();
        }
        if let Some(v) = &description {
            p.std.description = v.clone();
        }
        if let Some(v) = shared {
            // Unsharing would leave other projects' ports and networks with a policy they
            // cannot see.
            if !v && p.shared {
                if let Some(u) = foreign_user_of(ctx, &p) {
                    return Err(in_use(id, u));
                }
            }
            p.shared = v;
        }
        if let Some(v) = &tags {
            p.std.tags = v.clone();
        }
        if let Some(v) = is_default {
            let k = qos_default_key(&p.project_id);
            if v && !p.is_default {
                if ctx.state.cache.contains(&k) {
                    return Err(default_exists(&p.project_id));
                }
                cmp.push(Compare::Absent(k.clone()));
                ops.push(Op::put(k, id.to_string()));
            } else if !v && p.is_default {
                ops.push(Op::delete(k));
            }
            p.is_default = v;
        }
        p.deleting = false;
        p.std.bump(&now());
        ops.insert(0, Op::put(key(id), json_bytes(&p)));
        Ok((cmp, ops, p))
    })
    .await?;
    Ok(p.to_api())
}

/// The first port or network using policy `id`: (object type, id).
fn user_of(ctx: &Ctx<'_>, id: &str) -> Option<(&'static str, String)> {
    if let Some((p, _)) = ctx
        .all::<Port>()
        .into_iter()
        .find(|(p, _)| p.qos_policy_id.as_deref() == Some(id))
    {
        return Some(("port", p.id.clone()));
    }
    ctx.all::<Network>()
        .into_iter()
        .find(|(n, _)| n.qos_policy_id.as_deref() == Some(id))
        .map(|(n, _)| ("network", n.id.clone()))
}

/// A port or network of another project than the policy's that uses it.
fn foreign_user_of(ctx: &Ctx<'_>, p: &QosPolicy) -> Option<(&'static str, String)> {
    let id = Some(p.id.as_str());
    if let Some((port, _)) = ctx
        .all::<Port>()
        .into_iter()
        .find(|(x, _)| x.qos_policy_id.as_deref() == id && x.project_id != p.project_id)
    {
        return Some(("port", port.id.clone()));
    }
    ctx.all::<Network>()
        .into_iter()
        .find(|(n, _)| n.qos_policy_id.as_deref() == id && n.project_id != p.project_id)
        .map(|(n, _)| ("network", n.id.clone()))
}

fn in_use(id: &str, (kind, user): (&str, String)) -> NeutronError {
    NeutronError::conflict("QosPolicyInUse", format!("QoS Policy {id} is used by {kind} {user}."))
}

/// Marks the policy as deleting (so no new port or network takes it: their writes compare
/// its revision), then looks for users with a cache that shows the mark, then deletes it.
async fn delete_policy(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (mut p, rev) = visible_policy(ctx, id)?;
        check_if_match(if_match, p.std.revision_number)?;
        if let Some(u) = user_of(ctx, id) {
            return Err(in_use(id, u));
        }
        p.deleting = true;
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&p))],
            (),
        ))
    })
    .await?;
    retry(ctx, |ctx| {
        let (p, rev) = visible_policy(ctx, id)?;
        if let Some(u) = user_of(ctx, id) {
            // A user slipped in before the mark: the mark is taken back below.
            return Err(in_use(id, u));
        }
        let mut ops = vec![Op::delete(key(id))];
        if lookup::default_policy_id(ctx, &p.project_id).as_deref() == Some(id) {
            ops.push(Op::delete(qos_default_key(&p.project_id)));
        }
        Ok((vec![Compare::ModRevision(key(id), rev)], ops, ()))
    })
    .await
    .inspect_err(|_| unmark(ctx, id))?;
    tracing::info!(policy = %id, "QoS policy deleted");
    Ok(())
}

/// Clears a deleting mark after a delete found the policy in use (best effort: an update
/// clears it too).
fn unmark(ctx: &Ctx<'_>, id: &str) {
    let Some((mut p, rev)) = ctx.get::<QosPolicy>(id) else {
        return;
    };
    if !p.deleting {
        return;
    }
    p.deleting = false;
    let store = ctx.state.store.clone();
    let k = key(id);
    let v = json_bytes(&p);
    tokio::spawn(async move {
        if let Err(e) = store
            .txn(vec![Compare::ModRevision(k.clone(), rev)], vec![Op::put(k, v)])
            .await
        {
            tracing::warn!(error = %e, "could not clear a QoS policy's deleting mark");
        }
    });
}

/// A rate in kbit/s as Neutron validates it: an integer (or its string) in 0..=2^31-1.
fn kbps(body: &mut Body, attr: &str) -> NResult<Option<u64>> {
    match body.integer(attr)? {
        None => Ok(None),
        Some(v) if v < 0 => Err(NeutronError::invalid_attr(
            attr,
            format!("'{v}' is too small - must be at least '0'"),
        )),
        Some(v) if v > DB_INTEGER_MAX => Err(NeutronError::invalid_attr(
            attr,
            format!("'{v}' is too large - must be no larger than '{DB_INTEGER_MAX}'"),
        )),
        Some(v) => Ok(Some(v as u64)),
    }
}

fn direction(body: &mut Body) -> NResult<Option<String>> {
    match body.string("direction")? {
        None => Ok(None),
        Some(d) if DIRECTIONS.contains(&d.as_str()) => Ok(Some(d)),
        Some(d) => Err(NeutronError::invalid_attr(
            "direction",
            format!("'{d}' is not in {DIRECTIONS:?}"),
        )),
    }
}

fn conflict(policy: &str, existing: &str) -> NeutronError {
    NeutronError::conflict(
        "QoSRulesConflict",
        format!("Rule bandwidth_limit conflicts with rule {existing} which already exists in QoS Policy {policy}."),
    )
}

async fn create_rule(ctx: &Ctx<'_>, policy_id: &str, mut body: Body) -> NResult<BandwidthLimitRule> {
    let max_kbps = kbps(&mut body, "max_kbps")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'max_kbps' not specified")
    })?;
    let burst = kbps(&mut body, "max_burst_kbps")?.unwrap_or(0);
    let direction = direction(&mut body)?.unwrap_or_else(|| "egress".into());
    body.finish()?;
    let rule = BandwidthLimitRule {
        id: new_id(),
        max_kbps,
        max_burst_kbps: burst,
        direction,
    };
    retry(ctx, |ctx| {
        let (mut p, rev) = visible_policy(ctx, policy_id)?;
        if let Some(dup) = p.bandwidth_limit_rules.iter().find(|r| r.direction == rule.direction) {
            return Err(conflict(policy_id, &dup.id));
        }
        p.bandwidth_limit_rules.push(rule.clone());
        p.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(policy_id), rev)],
            vec![Op::put(key(policy_id), json_bytes(&p))],
            (),
        ))
    })
    .await?;
    Ok(rule)
}

async fn update_rule(ctx: &Ctx<'_>, policy_id: &str, rule_id: &str, mut body: Body) -> NResult<BandwidthLimitRule> {
    let max_kbps = kbps(&mut body, "max_kbps")?;
    let burst = kbps(&mut body, "max_burst_kbps")?;
    let dir = direction(&mut body)?;
    body.finish()?;
    retry(ctx, |ctx| {
        let (mut p, rev) = visible_policy(ctx, policy_id)?;
        if let Some(d) = &dir {
            if let Some(other) = p
                .bandwidth_limit_rules
                .iter()
                .find(|r| r.id != rule_id && r.direction == *d)
            {
                return Err(conflict(policy_id, &other.id));
            }
        }
        let r = p
            .bandwidth_limit_rules
            .iter_mut()
            .find(|r| r.id == rule_id)
            .ok_or_else(|| rule_not_found(rule_id, policy_id))?;
        if let Some(v) = max_kbps {
            r.max_kbps = v;
        }
        if let Some(v) = burst {
            r.max_burst_kbps = v;
        }
        if let Some(d) = &dir {
            r.direction = d.clone();
        }
        let out = r.clone();
        p.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(policy_id), rev)],
            vec![Op::put(key(policy_id), json_bytes(&p))],
            out,
        ))
    })
    .await
}

async fn delete_rule(ctx: &Ctx<'_>, policy_id: &str, rule_id: &str) -> NResult<()> {
    retry(ctx, |ctx| {
        let (mut p, rev) = visible_policy(ctx, policy_id)?;
        let before = p.bandwidth_limit_rules.len();
        p.bandwidth_limit_rules.retain(|r| r.id != rule_id);
        if p.bandwidth_limit_rules.len() == before {
            return Err(rule_not_found(rule_id, policy_id));
        }
        p.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(policy_id), rev)],
            vec![Op::put(key(policy_id), json_bytes(&p))],
            (),
        ))
    })
    .await
}

/// QoS policies as a [`Resource`], for what the generic handlers do with any collection: the
/// tags sub-API (`/v2.0/qos/policies/{id}/tags`). Writes keep Neutron's admin-only rule.
pub struct QosPolicies;

static META: Meta = Meta {
    collection: "qos/policies",
    singular: "policy",
    plural: "policies",
    store: <QosPolicy as crate::cache::Typed>::COLLECTION,
    not_found: <QosPolicy as super::common::Stored>::NOT_FOUND,
    bulk: false,
    tags: true,
    indexed: false,
    quota: None,
};

impl Resource for QosPolicies {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn used(&self, _ctx: &Ctx<'_>, _project: &str) -> usize {
        0
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, _pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move { Ok(visible_policies(ctx)) })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        readable(ctx, id)
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(async move {
            require_admin(ctx, "create_policy")?;
            create_policy(ctx, body).await
        })
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(async move {
            require_admin(ctx, "update_policy")?;
            update_policy(ctx, id, body, if_match).await
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(async move {
            require_admin(ctx, "delete_policy")?;
            delete_policy(ctx, id, if_match).await
        })
    }
}
