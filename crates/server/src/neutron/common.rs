//! What every resource shares: the caller's context, visibility, rendering, and the
//! plan-then-commit loop around compare-and-swap transactions.

use super::{networks, ports, routers, security_groups, subnets, Kind};
use crate::identity::AuthContext;
use crate::AppState;
use isthmus_model::keys;
use isthmus_model::validate::Body;
use isthmus_model::{Network, NeutronError, Port, Router, SecurityGroup, SecurityGroupRule, Subnet};
use isthmus_store::{Compare, Op, Revision};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

pub type NResult<T> = Result<T, NeutronError>;

/// How many times a write re-plans after losing a compare-and-swap race.
const MAX_ATTEMPTS: usize = 30;

/// One request's view of the world: the server state and who is calling.
pub struct Ctx<'a> {
    pub state: &'a AppState,
    pub auth: &'a AuthContext,
}

impl Ctx<'_> {
    pub fn admin(&self) -> bool {
        self.auth.is_admin
    }
    pub fn owns(&self, project_id: &str) -> bool {
        self.auth.project_id == project_id
    }
    /// May write in its own project: Neutron's `member` role (admin implies it). A `reader`, or
    /// a node's user (role `node` only), may read but not write.
    pub fn member(&self) -> bool {
        self.admin() || self.auth.roles.iter().any(|r| r == MEMBER_ROLE)
    }
    /// May read in its own project: Neutron's secure-RBAC defaults need `reader` (implied by
    /// member and admin); a node's user reads too. A token with only some other role sees
    /// nothing (empty lists, 404s).
    pub fn can_read(&self) -> bool {
        self.admin() || self.auth.roles.iter().any(|r| r == READER_ROLE || r == NODE_ROLE)
    }
    /// Neutron's 403 for a write the caller's roles do not allow (`rule` e.g. `create_network`).
    pub fn require_member(&self, rule: &str) -> NResult<()> {
        if self.member() {
            Ok(())
        } else {
            Err(policy_denied(&format!("rule:{rule}")))
        }
    }
    /// Neutron's ADMIN_OR_NET_OWNER_MEMBER: an admin, or a member of the network's project.
    pub fn net_owner_member(&self, network_project: &str) -> bool {
        self.admin() || (self.member() && self.owns(network_project))
    }

    pub fn get<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Option<(T, Revision)> {
        self.state.cache.get_json(&keys::resource(kind.store_name(), id))
    }
    pub fn all<T: DeserializeOwned>(&self, kind: Kind) -> Vec<(T, Revision)> {
        self.state.cache.list_json(&keys::collection(kind.store_name()))
    }

    pub fn network_visible(&self, n: &Network) -> bool {
        self.admin() || self.owns(&n.project_id) || n.shared
    }

    /// A network the caller may see, or NetworkNotFound.
    pub fn visible_network(&self, id: &str) -> NResult<(Network, Revision)> {
        match self.get::<Network>(Kind::Network, id) {
            Some((n, r)) if self.network_visible(&n) => Ok((n, r)),
            _ => Err(Kind::Network.not_found(id)),
        }
    }

    pub fn subnet_visible(&self, s: &Subnet) -> bool {
        self.admin()
            || self.owns(&s.project_id)
            || self
                .get::<Network>(Kind::Network, &s.network_id)
                .is_some_and(|(n, _)| n.shared)
    }

    pub fn port_visible(&self, p: &Port) -> bool {
        self.admin()
            || self.owns(&p.project_id)
            || self
                .get::<Network>(Kind::Network, &p.network_id)
                .is_some_and(|(n, _)| self.owns(&n.project_id))
    }

    /// The project a new resource belongs to: the caller's, or (admins only) the one named,
    /// which must exist. As in Neutron, `null` is a value (not "absent") and is refused.
    pub fn target_project(&self, body: &mut Body) -> NResult<String> {
        let p = body.take_raw("project_id");
        let t = body.take_raw("tenant_id");
        if let (Some(p), Some(t)) = (&p, &t) {
            if p != t {
                return Err(NeutronError::bad_request("'project_id' and 'tenant_id' do not match"));
            }
        }
        let given = match p.or(t) {
            None => return Ok(self.auth.project_id.clone()),
            Some(Value::String(s)) => s,
            Some(other) => {
                let shown = match &other {
                    Value::Null => "None".to_string(),
                    v => v.to_string(),
                };
                // Neutron validates tenant_id first, whichever of the two was sent.
                return Err(NeutronError::invalid_attr(
                    "tenant_id",
                    format!("'{shown}' is not a valid string"),
                ));
            }
        };
        if given.chars().count() > 255 {
            return Err(NeutronError::invalid_attr(
                "tenant_id",
                format!("'{given}' exceeds maximum length of 255"),
            ));
        }
        if given == self.auth.project_id {
            return Ok(given);
        }
        if !self.admin() {
            return Err(NeutronError::bad_request(
                "Specifying 'project_id' other than the authenticated project in request is not allowed for the current user.",
            ));
        }
        // Resources of a project identity does not know would belong to nobody.
        if !self.state.identity.project_exists(&given) {
            return Err(NeutronError::invalid_attr(
                "project_id",
                format!("project '{given}' does not exist"),
            ));
        }
        Ok(given)
    }

    /// Commits a transaction and waits until this server's cache shows it.
    /// `Ok(None)` means a comparison failed: somebody else changed what the plan read.
    pub async fn commit(&self, compares: Vec<Compare>, ops: Vec<Op>) -> NResult<Option<Revision>> {
        let res = self.state.store.txn(compares, ops).await.map_err(store_err)?;
        if !res.succeeded {
            return Ok(None);
        }
        self.state
            .cache
            .wait_for(res.revision)
            .await
            .map_err(|e| NeutronError::unavailable(e.to_string()))?;
        Ok(Some(res.revision))
    }

    /// After a lost race: bring the cache up to the store's present, with a little jitter so
    /// competing writers spread out.
    pub async fn resync(&self, attempt: usize) -> NResult<()> {
        let rev = self.state.store.revision().await.map_err(store_err)?;
        self.state
            .cache
            .wait_for(rev)
            .await
            .map_err(|e| NeutronError::unavailable(e.to_string()))?;
        if attempt > 2 {
            let ms = rand::random::<u64>() % (attempt as u64 * 2).min(20);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(())
    }
}

/// The role that may write in its project.
const MEMBER_ROLE: &str = "member";
/// The role that may read in its project.
const READER_ROLE: &str = "reader";
/// A node agent's role (see the node API).
const NODE_ROLE: &str = "node";

/// Neutron's PolicyNotAuthorized, worded as oslo.policy words it: `<check> is disallowed by policy`.
pub fn policy_denied(check: &str) -> NeutronError {
    NeutronError::forbidden(format!("{check} is disallowed by policy"))
}

pub fn store_err(e: isthmus_store::StoreError) -> NeutronError {
    tracing::error!(error = %e, "store request failed");
    NeutronError::unavailable(format!("The store is unavailable: {e}"))
}

pub fn json_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn now() -> String {
    crate::time::neutron_now()
}

/// Runs `plan` until its transaction commits, re-planning after each lost race.
/// `plan` returns the comparisons, the operations and the value to hand back on success.
pub async fn retry<T, F>(ctx: &Ctx<'_>, plan: F) -> NResult<T>
where
    F: FnMut(&Ctx<'_>) -> NResult<(Vec<Compare>, Vec<Op>, T)>,
{
    Ok(retry_rev(ctx, plan).await?.0)
}

/// [`retry`], also returning the revision the transaction committed at.
pub async fn retry_rev<T, F>(ctx: &Ctx<'_>, mut plan: F) -> NResult<(T, Revision)>
where
    F: FnMut(&Ctx<'_>) -> NResult<(Vec<Compare>, Vec<Op>, T)>,
{
    for attempt in 0..MAX_ATTEMPTS {
        let (cmp, ops, out) = plan(ctx)?;
        if let Some(rev) = ctx.commit(cmp, ops).await? {
            return Ok((out, rev));
        }
        ctx.resync(attempt).await?;
    }
    Err(NeutronError::new(
        409,
        "Conflict",
        "Too much concurrent change to this resource; retry the request",
    ))
}

/// Checks `If-Match: revision_number=N` against the current revision.
pub fn check_if_match(expected: Option<u64>, current: u64) -> NResult<()> {
    match expected {
        Some(n) if n != current => Err(NeutronError::new(
            412,
            "RevisionNumberConstraintFailed",
            format!("Constrained to {n}, but current revision is {current}"),
        )),
        _ => Ok(()),
    }
}

/// Every resource of `kind` the caller may see, rendered.
pub async fn visible_views(ctx: &Ctx<'_>, kind: Kind) -> NResult<Vec<Value>> {
    if !ctx.can_read() {
        return Ok(vec![]);
    }
    Ok(match kind {
        Kind::Network => ctx
            .all::<Network>(kind)
            .into_iter()
            .filter(|(n, _)| ctx.network_visible(n))
            .map(|(n, _)| n.to_api(ctx.admin()))
            .collect(),
        Kind::Subnet => {
            let shared: HashMap<String, bool> = ctx
                .all::<Network>(Kind::Network)
                .into_iter()
                .map(|(n, _)| (n.id, n.shared))
                .collect();
            ctx.all::<Subnet>(kind)
                .into_iter()
                .filter(|(s, _)| {
                    ctx.admin() || ctx.owns(&s.project_id) || shared.get(&s.network_id).copied().unwrap_or(false)
                })
                .map(|(s, _)| {
                    let mut v = s.to_api();
                    // Filter-only (hidden by the query): the network's shared flag.
                    v["shared"] = Value::Bool(shared.get(&s.network_id).copied().unwrap_or(false));
                    v
                })
                .collect()
        }
        Kind::Port => {
            let owners: HashMap<String, String> = ctx
                .all::<Network>(Kind::Network)
                .into_iter()
                .map(|(n, _)| (n.id, n.project_id))
                .collect();
            ctx.all::<Port>(kind)
                .into_iter()
                .filter(|(p, _)| {
                    ctx.admin() || ctx.owns(&p.project_id) || owners.get(&p.network_id).is_some_and(|o| ctx.owns(o))
                })
                .map(|(p, _)| p.to_api(ctx.admin()))
                .collect()
        }
        Kind::Router => ctx
            .all::<Router>(kind)
            .into_iter()
            .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
            .map(|(r, _)| r.to_api())
            .collect(),
        Kind::SecurityGroup => {
            security_groups::ensure_default(ctx, &ctx.auth.project_id).await?;
            let mut rules: HashMap<String, Vec<Value>> = HashMap::new();
            for (r, _) in ctx.all::<SecurityGroupRule>(Kind::SecurityGroupRule) {
                rules.entry(r.security_group_id.clone()).or_default().push(r.to_api());
            }
            ctx.all::<SecurityGroup>(kind)
                .into_iter()
                .filter(|(g, _)| ctx.admin() || ctx.owns(&g.project_id))
                .map(|(g, _)| {
                    let r = rules.remove(&g.id).unwrap_or_default();
                    g.to_api(r)
                })
                .collect()
        }
        Kind::SecurityGroupRule => {
            security_groups::ensure_default(ctx, &ctx.auth.project_id).await?;
            ctx.all::<SecurityGroupRule>(kind)
                .into_iter()
                .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
                .map(|(r, _)| r.to_api())
                .collect()
        }
    })
}

/// One resource the caller may see, rendered; NotFound otherwise (also for other projects').
pub fn show(ctx: &Ctx<'_>, kind: Kind, id: &str) -> NResult<Value> {
    if !ctx.can_read() {
        return Err(kind.not_found(id));
    }
    let nf = || kind.not_found(id);
    Ok(match kind {
        Kind::Network => ctx.visible_network(id)?.0.to_api(ctx.admin()),
        Kind::Subnet => {
            let (s, _) = ctx
                .get::<Subnet>(kind, id)
                .filter(|(s, _)| ctx.subnet_visible(s))
                .ok_or_else(nf)?;
            s.to_api()
        }
        Kind::Port => {
            let (p, _) = ctx
                .get::<Port>(kind, id)
                .filter(|(p, _)| ctx.port_visible(p))
                .ok_or_else(nf)?;
            p.to_api(ctx.admin())
        }
        Kind::Router => routers::visible(ctx, id)?.0.to_api(),
        Kind::SecurityGroup => {
            let (g, _) = security_groups::visible_group(ctx, id)?;
            g.to_api(security_groups::rules_of(ctx, &g.id))
        }
        Kind::SecurityGroupRule => {
            let (r, _) = ctx
                .get::<SecurityGroupRule>(kind, id)
                .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
                .ok_or_else(nf)?;
            r.to_api()
        }
    })
}

/// POST on a collection: one resource or a bulk list (`{"<plural>": [...]}`).
pub async fn create(ctx: &Ctx<'_>, kind: Kind, body: Value) -> NResult<Value> {
    ctx.require_member(&format!("create_{}", kind.singular()))?;
    let plural = kind.plural();
    if let Some(Value::Array(items)) = body.get(plural) {
        // Neutron registers the L3 resources without bulk support.
        if kind == Kind::Router {
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
                Value::Object(m) if m.contains_key(kind.singular()) => Value::Object(m),
                other => serde_json::json!({ kind.singular(): other }),
            };
            match create_one(ctx, kind, wrapped).await {
                Ok(v) => {
                    if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
                        made.push(id.to_string());
                    }
                    out.push(v);
                }
                Err(e) => {
                    for id in made.iter().rev() {
                        if let Err(undo) = delete(ctx, kind, id, None).await {
                            tracing::warn!(%id, error = %undo.message, "could not undo part of a failed bulk create");
                        }
                    }
                    return Err(e);
                }
            }
        }
        return Ok(serde_json::json!({ plural: out }));
    }
    let v = create_one(ctx, kind, body).await?;
    Ok(serde_json::json!({ kind.singular(): v }))
}

async fn create_one(ctx: &Ctx<'_>, kind: Kind, body: Value) -> NResult<Value> {
    let body = Body::from_value(body, kind.singular())?;
    match kind {
        Kind::Network => networks::create(ctx, body).await,
        Kind::Subnet => subnets::create(ctx, body).await,
        Kind::Port => ports::create(ctx, body).await.map(|p| p.to_api(ctx.admin())),
        Kind::Router => routers::create(ctx, body).await,
        Kind::SecurityGroup => security_groups::create_group(ctx, body).await,
        Kind::SecurityGroupRule => security_groups::create_rule(ctx, body).await,
    }
}

pub async fn update(ctx: &Ctx<'_>, kind: Kind, id: &str, body: Value, if_match: Option<u64>) -> NResult<Value> {
    // Neutron hides what the caller may not see (404) and refuses what it sees but may not
    // change (403).
    show(ctx, kind, id)?;
    ctx.require_member(&format!("update_{}", kind.singular()))?;
    let body = Body::from_value(body, kind.singular())?;
    match kind {
        Kind::Network => networks::update(ctx, id, body, if_match).await,
        Kind::Subnet => subnets::update(ctx, id, body, if_match).await,
        Kind::Port => ports::update(ctx, id, body, if_match)
            .await
            .map(|p| p.to_api(ctx.admin())),
        Kind::Router => routers::update(ctx, id, body, if_match).await,
        Kind::SecurityGroup => security_groups::update_group(ctx, id, body, if_match).await,
        Kind::SecurityGroupRule => Err(NeutronError::new(
            400,
            "HTTPBadRequest",
            "Security group rules cannot be updated",
        )),
    }
}

pub async fn delete(ctx: &Ctx<'_>, kind: Kind, id: &str, if_match: Option<u64>) -> NResult<()> {
    show(ctx, kind, id)?;
    ctx.require_member(&format!("delete_{}", kind.singular()))?;
    match kind {
        Kind::Network => networks::delete(ctx, id, if_match).await,
        Kind::Subnet => subnets::delete(ctx, id, if_match).await,
        Kind::Port => ports::delete(ctx, id, if_match).await,
        Kind::Router => routers::delete(ctx, id, if_match).await,
        Kind::SecurityGroup => security_groups::delete_group(ctx, id, if_match).await,
        Kind::SecurityGroupRule => security_groups::delete_rule(ctx, id).await,
    }
}

/// Validates a list of tags given in a create or update body, within the configured limits.
pub fn tags_from(ctx: &Ctx<'_>, body: &mut Body) -> NResult<Option<Vec<String>>> {
    let Some(tags) = body.string_list("tags")? else {
        return Ok(None);
    };
    let c = &ctx.state.config;
    isthmus_model::validate::unique_tags(tags, c.max_tags_per_resource, c.max_tag_length).map(Some)
}

/// Description, limited as Neutron limits it.
pub fn description_from(body: &mut Body) -> NResult<Option<String>> {
    body.string_max("description", 255)
}
