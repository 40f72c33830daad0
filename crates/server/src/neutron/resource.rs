//! The resource trait: what each Neutron collection declares once (its names, its store
//! collection, its NotFound error, whether it takes bulk creates and tags) and the operations
//! it implements. The request handling every collection shares (read policy, write policy,
//! bulk create, list) is here, generic over the trait; the registry says which resources exist.

use super::common::{Ctx, NResult};
use super::query::Prefilter;
use isthmus_model::validate::Body;
use isthmus_model::NeutronError;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so the trait stays object-safe.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = NResult<T>> + Send + 'a>>;

/// What a resource declares about itself.
#[derive(Debug)]
pub struct Meta {
    /// URL collection (`/v2.0/<collection>`), e.g. `security-groups`.
    pub collection: &'static str,
    /// Body name of one object, e.g. `security_group`; also names policy rules.
    pub singular: &'static str,
    /// Body name of a list, e.g. `security_groups`.
    pub plural: &'static str,
    /// Store collection (`/isthmus/v1/<store>/<id>`).
    pub store: &'static str,
    /// Neutron's NotFound exception prefix and display name.
    pub not_found: (&'static str, &'static str),
    /// Whether `POST` takes `{"<plural>": [...]}`.
    pub bulk: bool,
    /// Whether `/v2.0/<collection>/<id>/tags` exists.
    pub tags: bool,
    /// Whether `GET /v2.0` lists it (only resources whose extension is advertised).
    pub indexed: bool,
    /// Its quota resource name (`network`), if creates count against a quota.
    pub quota: Option<&'static str>,
}

impl Meta {
    pub fn not_found(&self, id: &str) -> NeutronError {
        NeutronError::not_found(self.not_found.0, self.not_found.1, id)
    }
}

/// One Neutron collection.
pub trait Resource: Send + Sync {
    fn meta(&self) -> &'static Meta;
    /// Every object the caller may see, rendered, optionally narrowed by `pre` (which may only
    /// drop objects the query would drop anyway).
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>>;
    /// One object the caller may see, rendered; NotFound otherwise.
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value>;
    /// Creates one object from its unwrapped body; returns its rendering.
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value>;
    /// Updates a visible object; returns its rendering.
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value>;
    /// Deletes a visible object.
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()>;
    /// How many objects `project` owns (its quota usage).
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize;
}

/// Every object of `r` the caller may see, rendered; nothing without read rights.
pub async fn list_visible(ctx: &Ctx<'_>, r: &dyn Resource, pre: &Prefilter<'_>) -> NResult<Vec<Value>> {
    if !ctx.can_read() {
        return Ok(vec![]);
    }
    r.list_visible(ctx, pre).await
}

/// One object the caller may see, rendered; NotFound otherwise (also for other projects').
pub fn show(ctx: &Ctx<'_>, r: &dyn Resource, id: &str) -> NResult<Value> {
    if !ctx.can_read() {
        return Err(r.meta().not_found(id));
    }
    r.show(ctx, id)
}

/// POST on a collection: one resource or a bulk list (`{"<plural>": [...]}`).
pub async fn create(ctx: &Ctx<'_>, r: &dyn Resource, body: Value) -> NResult<Value> {
    let meta = r.meta();
    ctx.require_member(&format!("create_{}", meta.singular))?;
    if let Some(Value::Array(items)) = body.get(meta.plural) {
        // Neutron registers the L3 resources without bulk support.
        if !meta.bulk {
            return Err(NeutronError::bad_request("Bulk operation not supported"));
        }
        if items.is_empty() {
            return Err(NeutronError::bad_request("Resources required"));
        }
        // Bulk: each item is created in turn; on a failure the ones already made are removed,
        // so the request is all-or-nothing as Neutron's native bulk is.
        let mut made: Vec<String> = vec![];
        let mut out = vec![];
        for item in items.clone() {
            // Items may come bare or wrapped in their singular name, as Neutron takes them.
            let wrapped = match item {
                Value::Object(m) if m.contains_key(meta.singular) => Value::Object(m),
                other => serde_json::json!({ meta.singular: other }),
            };
            match create_one(ctx, r, wrapped).await {
                Ok(v) => {
                    if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                        made.push(id.to_string());
                    }
                    out.push(v);
                }
                Err(e) => {
                    for id in made.iter().rev() {
                        if let Err(undo) = delete(ctx, r, id, None).await {
                            tracing::warn!(%id, error = %undo.message, "could not undo part of a failed bulk create");
                        }
                    }
                    return Err(e);
                }
            }
        }
        return Ok(serde_json::json!({ meta.plural: out }));
    }
    let v = create_one(ctx, r, body).await?;
    Ok(serde_json::json!({ meta.singular: v }))
}

async fn create_one(ctx: &Ctx<'_>, r: &dyn Resource, body: Value) -> NResult<Value> {
    let body = Body::from_value(body, r.meta().singular)?;
    r.create_one(ctx, body).await
}

/// PUT on a member. Neutron hides what the caller may not see (404) and refuses what it sees
/// but may not change (403).
pub async fn update(ctx: &Ctx<'_>, r: &dyn Resource, id: &str, body: Value, if_match: Option<u64>) -> NResult<Value> {
    show(ctx, r, id)?;
    ctx.require_member(&format!("update_{}", r.meta().singular))?;
    let body = Body::from_value(body, r.meta().singular)?;
    r.update(ctx, id, body, if_match).await
}

/// DELETE on a member.
pub async fn delete(ctx: &Ctx<'_>, r: &dyn Resource, id: &str, if_match: Option<u64>) -> NResult<()> {
    show(ctx, r, id)?;
    ctx.require_member(&format!("delete_{}", r.meta().singular))?;
    r.delete(ctx, id, if_match).await
}
