//! The port resource: the Neutron API's view of the port operations in `portops`.

use super::common::{count_owned, Ctx, NResult, Stored};
use super::lookup::visible_port;
use super::portops;
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::Body;
use isthmus_model::{Network, Port};
use serde_json::Value;
use std::collections::HashMap;

pub struct Ports;

static META: Meta = Meta {
    collection: "ports",
    singular: "port",
    plural: "ports",
    store: Port::COLLECTION,
    not_found: Port::NOT_FOUND,
    bulk: true,
    tags: true,
    indexed: true,
    quota: Some("port"),
};

impl Resource for Ports {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            let owners: HashMap<String, String> = ctx
                .all::<Network>()
                .into_iter()
                .map(|(n, _)| (n.id.clone(), n.project_id.clone()))
                .collect();
            Ok(ctx
                .all::<Port>()
                .into_iter()
                .filter(|(p, _)| {
                    ctx.admin() || ctx.owns(&p.project_id) || owners.get(&p.network_id).is_some_and(|o| ctx.owns(o))
                })
                .filter(|(p, _)| {
                    pre.keeps_owned(&p.id, &p.name, &p.project_id)
                        && pre.keeps("network_id", &p.network_id)
                        && pre.keeps("device_id", &p.device_id)
                        && pre.keeps("device_owner", &p.device_owner)
                })
                .map(|(p, _)| rendered(ctx, &p))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(rendered(ctx, &visible_port(ctx, id)?.0))
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(async move { Ok(portops::create(ctx, body).await?.to_api(ctx.admin())) })
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(async move { Ok(rendered(ctx, &portops::update(ctx, id, body, if_match).await?)) })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(portops::delete(ctx, id, if_match))
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        count_owned::<Port>(ctx, project)
    }
}

/// A port as the API shows it, with `trunk_details` when it is a trunk's parent.
fn rendered(ctx: &Ctx<'_>, p: &Port) -> Value {
    let mut v = p.to_api(ctx.admin());
    super::trunks::add_details(ctx, &mut v);
    v
}
