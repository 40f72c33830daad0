//! Routers, API only: create/update/delete (interfaces are in `router_interfaces`). Routing in
//! the datapath is a later stage, so the `router` extension is not advertised yet.

use super::common::{
    check_if_match, description_from, json_bytes, new_id, now, retry, tags_from, Ctx, NResult, Stored,
};
use super::lookup::{self, router_interfaces, visible_router as visible};
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::Body;
use isthmus_model::{NeutronError, Router, StandardAttrs};
use isthmus_store::{Compare, Op};
use serde_json::Value;

pub struct Routers;

static META: Meta = Meta {
    collection: "routers",
    singular: "router",
    plural: "routers",
    store: Router::COLLECTION,
    not_found: Router::NOT_FOUND,
    // Neutron registers the L3 resources without bulk support.
    bulk: false,
    tags: true,
    indexed: false,
};

impl Resource for Routers {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(ctx
                .all::<Router>()
                .into_iter()
                .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
                .filter(|(r, _)| pre.keeps_owned(&r.id, &r.name, &r.project_id))
                .map(|(r, _)| r.to_api())
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(visible(ctx, id)?.0.to_api())
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
    lookup::key::<Router>(id)
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let admin_state_up = body.boolean("admin_state_up")?.unwrap_or(true);
    if let Some(gw) = body.take_raw("external_gateway_info") {
        let empty = gw.is_null() || gw.as_object().is_some_and(|o| o.is_empty());
        if !empty {
            return Err(NeutronError::invalid_input("external gateways are not supported yet"));
        }
    }
    for unsupported in ["distributed", "ha"] {
        if let Some(v) = body.boolean(unsupported)? {
            if v {
                return Err(NeutronError::invalid_input(format!(
                    "'{unsupported}' routers are not supported yet"
                )));
            }
        }
    }
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    let ts = now();
    let r = Router {
        id: new_id(),
        project_id,
        name,
        admin_state_up,
        status: "ACTIVE".into(),
        gateway: None,
        routes: vec![],
        std: StandardAttrs {
            description,
            tags,
            ..StandardAttrs::new(&ts)
        },
    };
    if ctx
        .commit(
            vec![Compare::Absent(key(&r.id))],
            vec![Op::put(key(&r.id), json_bytes(&r))],
        )
        .await?
        .is_none()
    {
        return Err(NeutronError::internal("router id collision"));
    }
    Ok(r.to_api())
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    visible(ctx, id)?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let admin_state_up = body.boolean("admin_state_up")?;
    if let Some(gw) = body.take_raw("external_gateway_info") {
        if !(gw.is_null() || gw.as_object().is_some_and(|o| o.is_empty())) {
            return Err(NeutronError::invalid_input("external gateways are not supported yet"));
        }
    }
    if let Some(routes) = body.take_raw("routes") {
        if !(routes.is_null() || routes.as_array().is_some_and(|a| a.is_empty())) {
            return Err(NeutronError::invalid_input("extra routes are not supported yet"));
        }
    }
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let r = retry(ctx, |ctx| {
        let (mut r, rev) = visible(ctx, id)?;
        check_if_match(if_match, r.std.revision_number)?;
        if let Some(v) = &name {
            r.name = v.clone();
        }
        if let Some(v) = &description {
            r.std.description = v.clone();
        }
        if let Some(v) = admin_state_up {
            r.admin_state_up = v;
        }
        if let Some(v) = &tags {
            r.std.tags = v.clone();
        }
        r.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&r))],
            r,
        ))
    })
    .await?;
    Ok(r.to_api())
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (r, rev) = visible(ctx, id)?;
        check_if_match(if_match, r.std.revision_number)?;
        if !router_interfaces(ctx, id).is_empty() {
            return Err(NeutronError::conflict(
                "RouterInUse",
                format!("Router {id} still has ports"),
            ));
        }
        Ok((vec![Compare::ModRevision(key(id), rev)], vec![Op::delete(key(id))], ()))
    })
    .await
}
