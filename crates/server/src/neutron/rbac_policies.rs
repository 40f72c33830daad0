//! RBAC policies (`rbac-policies`, `rbac-security-groups`, `rbac-subnetpool`,
//! `rbac-address-scope`): an object's owner (or the admin)
//! grants one project, or every project (`*`), access to the object. The object types and
//! what depends on a grant are in `grants`.

use super::common::{policy_denied, retry, Ctx, NResult, Stored, WILDCARD};
use super::grants::{self, object_type, policies_on, RbacObject};
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::{is_uuid, Body};
use isthmus_model::{NeutronError, RbacPolicy};
use isthmus_store::{Compare, Op, Revision};
use serde_json::Value;

pub struct RbacPolicies;

static META: Meta = Meta {
    collection: "rbac-policies",
    singular: "rbac_policy",
    plural: "rbac_policies",
    store: RbacPolicy::COLLECTION,
    not_found: RbacPolicy::NOT_FOUND,
    bulk: true,
    tags: false,
    indexed: true,
    quota: Some("rbac_policy"),
};

impl Resource for RbacPolicies {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        super::common::count_owned::<RbacPolicy>(ctx, project)
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(ctx
                .all::<RbacPolicy>()
                .into_iter()
                .filter(|(p, _)| {
                    pre.keeps("id", &p.id)
                        && pre.keeps("project_id", &p.project_id)
                        && pre.keeps("tenant_id", &p.project_id)
                        && pre.keeps("object_type", &p.object_type)
                        && pre.keeps("object_id", &p.object_id)
                        && pre.keeps("action", &p.action)
                        && pre.keeps("target_tenant", &p.target_project)
                        && pre.keeps("target_project", &p.target_project)
                })
                .filter(|(p, _)| visible(ctx, p))
                .map(|(p, _)| p.to_api())
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(visible_policy(ctx, id)?.0.to_api())
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create(ctx, body))
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, _if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(update(ctx, id, body))
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, _if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete(ctx, id))
    }
}

/// Neutron's RbacPolicyNotFound.
fn not_found(id: &str) -> NeutronError {
    NeutronError::new(
        404,
        "RbacPolicyNotFound",
        format!("RBAC policy of type unknown with ID {id} not found"),
    )
}

/// The owner of a policy and the admin see it, as in Neutron (`get_rbac_policy` is the owner's
/// reader rule: the project a policy targets does not see it), as long as its object exists:
/// a policy left by a delete that raced its creation stays hidden.
fn visible(ctx: &Ctx<'_>, p: &RbacPolicy) -> bool {
    (ctx.admin() || ctx.owns(&p.project_id))
        && object_type(&p.object_type).is_some_and(|t| t.find(ctx, &p.object_id).is_some())
}

fn visible_policy(ctx: &Ctx<'_>, id: &str) -> NResult<(RbacPolicy, Revision)> {
    ctx.get::<RbacPolicy>(id)
        .filter(|(p, _)| visible(ctx, p))
        .ok_or_else(|| not_found(id))
}

fn required(body: &mut Body, key: &str) -> NResult<String> {
    body.string(key)?.ok_or_else(|| {
        NeutronError::bad_request(format!(
            "Failed to parse request. Required attribute '{key}' not specified"
        ))
    })
}

/// `target_tenant` (the name clients send) or `target_project`: a project id or `*`.
fn target_from(body: &mut Body) -> NResult<Option<String>> {
    let tenant = body.take_raw("target_tenant");
    let project = body.take_raw("target_project");
    if let (Some(t), Some(p)) = (&tenant, &project) {
        if t != p {
            return Err(NeutronError::bad_request(
                "'target_tenant' and 'target_project' do not match",
            ));
        }
    }
    let Some(v) = tenant.or(project) else { return Ok(None) };
    match v {
        Value::String(s) if s == WILDCARD || is_uuid(&s) => Ok(Some(s)),
        other => {
            let shown = match &other {
                Value::Null => "None".to_string(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            Err(NeutronError::invalid_input(format!(
                "'{shown}' is not a valid target project ID; expected a UUID or '*'"
            )))
        }
    }
}

/// Neutron's answer to a policy change on an object the caller sees but does not own.
fn not_owner(t: &dyn RbacObject) -> NeutronError {
    let what = if t.name() == "network" { "networks" } else { "objects" };
    NeutronError::invalid_input(format!("Only admins can manipulate policies on {what} they do not own"))
}

/// The object's other policies (of its type), without `except`.
fn others(ctx: &Ctx<'_>, t: &dyn RbacObject, object_id: &str, except: &str) -> Vec<RbacPolicy> {
    policies_on(ctx, object_id)
        .into_iter()
        .filter(|(p, _)| p.object_type == t.name() && p.id != except)
        .map(|(p, _)| (*p).clone())
        .collect()
}

fn targets<'a>(policies: &'a [RbacPolicy], action: &str) -> Vec<&'a str> {
    policies
        .iter()
        .filter(|p| p.action == action)
        .map(|p| p.target_project.as_str())
        .collect()
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let otype = required(&mut body, "object_type")?;
    let t = object_type(&otype.trim().to_lowercase())
        .ok_or_else(|| NeutronError::invalid_input(format!("'{otype}' is not a valid RBAC object type")))?;
    let object_id = required(&mut body, "object_id")?;
    if !is_uuid(&object_id) {
        return Err(NeutronError::invalid_attr(
            "object_id",
            format!("'{object_id}' is not a valid UUID"),
        ));
    }
    let action = required(&mut body, "action")?;
    if !t.actions().contains(&action.as_str()) {
        return Err(NeutronError::new(
            400,
            "InvalidActionForType",
            format!(
                "Invalid action '{action}' for object type '{}'. Valid actions: {:?}",
                t.name(),
                t.actions()
            ),
        ));
    }
    let target = target_from(&mut body)?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'target_tenant' not specified")
    })?;
    body.finish()?;
    // Only the admin shares with every project.
    if target == WILDCARD && !ctx.admin() {
        return Err(policy_denied(
            "(rule:create_rbac_policy and rule:create_rbac_policy:target_tenant)",
        ));
    }
    let p = retry(ctx, |ctx| {
        if !t.visible(ctx, &object_id) {
            return Err(t.not_found(&object_id));
        }
        let obj = t.find(ctx, &object_id).ok_or_else(|| t.not_found(&object_id))?;
        if !ctx.admin() && !ctx.owns(&obj.project_id) {
            return Err(not_owner(t));
        }
        let (p, mut cmp, mut ops) = grants::grant(t.name(), &object_id, &action, &target, &project_id);
        if ctx.state.cache.contains(&grants::grant_key(&p)) {
            return Err(grants::duplicate());
        }
        let (qcmp, qops) = super::quota::check(ctx, "rbac_policy", &project_id, 1, || {
            super::common::count_owned::<RbacPolicy>(ctx, &project_id)
        })?;
        cmp.extend(qcmp);
        ops.extend(qops);
        cmp.push(Compare::ModRevision(obj.key.clone(), obj.revision));
        cmp.extend(t.guards(ctx, &object_id));
        let mut after = others(ctx, t, &object_id, &p.id);
        after.push(p.clone());
        ops.extend(t.sync(ctx, &object_id, &[&p], &after)?);
        Ok((cmp, ops, p))
    })
    .await?;
    tracing::info!(policy = %p.id, object_type = %p.object_type, object = %p.object_id, action = %p.action, target = %p.target_project, "RBAC policy created");
    Ok(p.to_api())
}

/// The checks every change of an existing policy makes: the caller owns the policy (or is
/// the admin) and the object (Neutron checks both).
fn changeable(ctx: &Ctx<'_>, id: &str, rule: &str) -> NResult<(RbacPolicy, Revision, &'static dyn RbacObject)> {
    let (p, rev) = visible_policy(ctx, id)?;
    if !ctx.admin() && !ctx.owns(&p.project_id) {
        return Err(policy_denied(&format!("rule:{rule}")));
    }
    let t = object_type(&p.object_type).ok_or_else(|| not_found(id))?;
    Ok((p, rev, t))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body) -> NResult<Value> {
    let target = target_from(&mut body)?;
    for k in ["id", "object_type", "object_id", "action", "project_id", "tenant_id"] {
        if body.contains(k) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {k}"
            )));
        }
    }
    body.finish()?;
    let (current, _, _) = changeable(ctx, id, "update_rbac_policy")?;
    let Some(target) = target else {
        return Ok(current.to_api());
    };
    if target == WILDCARD && !ctx.admin() {
        return Err(policy_denied(
            "(rule:update_rbac_policy and rule:update_rbac_policy:target_tenant)",
        ));
    }
    if target == current.target_project {
        return Ok(current.to_api());
    }
    let p = retry(ctx, |ctx| {
        let (old, rev, t) = changeable(ctx, id, "update_rbac_policy")?;
        let obj = t.find(ctx, &old.object_id).ok_or_else(|| not_found(id))?;
        if !ctx.admin() && !ctx.owns(&obj.project_id) {
            return Err(not_owner(t));
        }
        let mut new = old.clone();
        new.target_project = target.clone();
        if ctx.state.cache.contains(&grants::grant_key(&new)) {
            return Err(grants::duplicate());
        }
        let mut after = others(ctx, t, &old.object_id, id);
        let mut remaining = targets(&after, &old.action);
        remaining.push(&target);
        grants::check_release(
            ctx,
            t,
            &old.object_id,
            &obj.project_id,
            &old.action,
            &old.target_project,
            &remaining,
        )?;
        let mut cmp = vec![
            Compare::ModRevision(grants::policy_key(id), rev),
            Compare::Absent(grants::grant_key(&new)),
            Compare::ModRevision(obj.key.clone(), obj.revision),
        ];
        cmp.extend(t.guards(ctx, &old.object_id));
        let mut ops = vec![
            Op::delete(grants::grant_key(&old)),
            Op::put(grants::grant_key(&new), id.to_string()),
            Op::put(grants::policy_key(id), super::common::json_bytes(&new)),
        ];
        after.push(new.clone());
        ops.extend(t.sync(ctx, &old.object_id, &[&old, &new], &after)?);
        Ok((cmp, ops, new))
    })
    .await?;
    Ok(p.to_api())
}

async fn delete(ctx: &Ctx<'_>, id: &str) -> NResult<()> {
    retry(ctx, |ctx| {
        let (p, rev, t) = changeable(ctx, id, "delete_rbac_policy")?;
        let obj = t.find(ctx, &p.object_id).ok_or_else(|| not_found(id))?;
        let after = others(ctx, t, &p.object_id, id);
        grants::check_release(
            ctx,
            t,
            &p.object_id,
            &obj.project_id,
            &p.action,
            &p.target_project,
            &targets(&after, &p.action),
        )?;
        let mut cmp = vec![
            Compare::ModRevision(grants::policy_key(id), rev),
            Compare::ModRevision(obj.key.clone(), obj.revision),
        ];
        cmp.extend(t.guards(ctx, &p.object_id));
        let mut ops = grants::revoke(&p);
        ops.extend(t.sync(ctx, &p.object_id, &[&p], &after)?);
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::info!(policy = %id, "RBAC policy deleted");
    Ok(())
}
