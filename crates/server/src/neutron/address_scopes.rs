//! Address scopes (`address-scope`): subnet pools in one scope never overlap, and networks
//! report the scopes of their subnets' pools.

use super::common::Grants;
use super::common::{check_if_match, json_bytes, new_id, now, policy_denied, retry, Ctx, NResult, Stored};
use super::grants::{self, AddressScopeObject};
use super::lookup::{self, guard, visible_scope};
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::Body;
use isthmus_model::{keys, AddressScope, NeutronError, StandardAttrs, SubnetPool};
use isthmus_store::{Compare, Op, Revision};
use serde_json::Value;

pub struct AddressScopes;

static META: Meta = Meta {
    collection: "address-scopes",
    singular: "address_scope",
    plural: "address_scopes",
    store: AddressScope::COLLECTION,
    not_found: AddressScope::NOT_FOUND,
    bulk: true,
    // Address scopes carry no standard-attribute tags in Neutron.
    tags: false,
    indexed: true,
    quota: None,
};

impl Resource for AddressScopes {
    fn meta(&self) -> &'static Meta {
        &META
    }
    /// Neutron has no quota for address scopes.
    fn used(&self, _ctx: &Ctx<'_>, _project: &str) -> usize {
        0
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            let g = Grants::all(ctx);
            Ok(ctx
                .all::<AddressScope>()
                .into_iter()
                .filter(|(s, _)| pre.keeps_owned(&s.id, &s.name, &s.project_id))
                .filter(|(s, _)| lookup::granted_visible(ctx, OBJECT, &s.id, &s.project_id, s.shared, &g))
                .map(|(s, _)| render(ctx, &s, &g))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(render(ctx, &visible_scope(ctx, id)?.0, &Grants::of(ctx, id)))
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create(ctx, body))
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(update(ctx, id, body, if_match))
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete(ctx, id, if_match))
    }
}

fn key(id: &str) -> String {
    lookup::key::<AddressScope>(id)
}

/// The scope's RBAC object type.
const OBJECT: &str = "address_scope";

/// The API view for the caller: `shared` is true for every project the scope is shared
/// with (`rbac-address-scope`), as Neutron reports it.
fn render(ctx: &Ctx<'_>, s: &AddressScope, g: &Grants) -> Value {
    let mut v = s.to_api();
    v["shared"] = Value::Bool(lookup::shared_for(ctx, OBJECT, &s.id, s.shared, g));
    v
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let ip_version = match body.integer("ip_version")? {
        Some(4) => 4u8,
        Some(6) => 6u8,
        Some(v) => {
            return Err(NeutronError::invalid_attr(
                "ip_version",
                format!("{v} is not in [4, 6]"),
            ))
        }
        None => {
            return Err(NeutronError::bad_request(
                "Failed to parse request. Required attribute 'ip_version' not specified",
            ))
        }
    };
    let shared = body.boolean("shared")?.unwrap_or(false);
    body.finish()?;
    if shared && !ctx.admin() {
        return Err(policy_denied("rule:create_address_scope:shared"));
    }
    let id = new_id();
    let scope = AddressScope {
        id: id.clone(),
        project_id,
        name,
        ip_version,
        shared,
        std: StandardAttrs::new(&now()),
    };
    let scope = retry(ctx, |_| {
        let mut cmp = vec![Compare::Absent(key(&id))];
        let mut ops = vec![Op::put(key(&id), json_bytes(&scope))];
        // `shared` is the `*` policy, made with the scope.
        if scope.shared {
            grants::share_with_all(&AddressScopeObject, &id, &scope.project_id, &mut cmp, &mut ops);
        }
        Ok((cmp, ops, scope.clone()))
    })
    .await?;
    tracing::info!(address_scope = %scope.id, ip_version, "address scope created");
    Ok(scope.to_api())
}

fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(AddressScope, Revision)> {
    let (s, r) = visible_scope(ctx, id)?;
    if !ctx.admin() && !ctx.owns(&s.project_id) {
        return Err(NeutronError::forbidden(format!(
            "Modifying address scope {id} is not allowed by policy"
        )));
    }
    Ok((s, r))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    for ro in ["ip_version", "project_id", "tenant_id"] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let name = body.string("name")?;
    let shared = body.boolean("shared")?;
    body.finish()?;
    if shared.is_some() && !ctx.admin() {
        return Err(policy_denied("rule:update_address_scope:shared"));
    }
    let s = retry(ctx, |ctx| {
        let (mut s, rev) = writable(ctx, id)?;
        check_if_match(if_match, s.std.revision_number)?;
        if let Some(v) = &name {
            s.name = v.clone();
        }
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        if let Some(v) = shared {
            // The flag is the `*` policy: made when sharing, removed when unsharing unless
            // projects only it covers have pools in the scope.
            if v && !s.shared {
                grants::share_with_all(&AddressScopeObject, id, &s.project_id, &mut cmp, &mut ops);
            } else if !v && s.shared {
                ops.extend(grants::unshare(ctx, &AddressScopeObject, id, &s.project_id)?);
            }
            s.shared = v;
        }
        s.std.bump(&now());
        ops.push(Op::put(key(id), json_bytes(&s)));
        Ok((cmp, ops, s))
    })
    .await?;
    Ok(render(ctx, &s, &Grants::of(ctx, id)))
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (s, rev) = writable(ctx, id)?;
        check_if_match(if_match, s.std.revision_number)?;
        if ctx
            .all::<SubnetPool>()
            .iter()
            .any(|(p, _)| p.address_scope_id.as_deref() == Some(id))
        {
            return Err(NeutronError::conflict(
                "AddressScopeInUse",
                format!("Unable to complete operation on address scope {id}. There are one or more subnet pools in use on the address scope."),
            ));
        }
        // A pool joining the scope rewrites its guard, so it cannot slip in meanwhile.
        let gk = keys::scope_guard(id);
        let mut ops = vec![Op::delete(key(id)), Op::delete(gk.clone())];
        // Its RBAC policies go with it; a policy change rewrites the scope, so none is missed.
        ops.extend(grants::revoke_all(ctx, &AddressScopeObject, id));
        Ok((vec![Compare::ModRevision(key(id), rev), guard(ctx, &gk)], ops, ()))
    })
    .await?;
    tracing::info!(address_scope = %id, "address scope deleted");
    Ok(())
}
