//! What every resource shares: the caller's context, visibility, rendering, and the
//! plan-then-commit loop around compare-and-swap transactions.

use crate::cache::Typed;
use crate::identity::AuthContext;
use crate::AppState;
use isthmus_model::validate::Body;
use isthmus_model::{
    AddressScope, FloatingIp, Network, NeutronError, Port, QosPolicy, RbacPolicy, Router, SecurityGroup,
    SecurityGroupRule, Subnet, SubnetPool,
};
use isthmus_store::{Compare, Op, Revision};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub type NResult<T> = Result<T, NeutronError>;

/// A stored Neutron object type: its store collection (from [`Typed`]) and how Neutron reports
/// its absence (exception prefix, display name).
pub trait Stored: Typed {
    const NOT_FOUND: (&'static str, &'static str);
}

impl Stored for Network {
    const NOT_FOUND: (&'static str, &'static str) = ("Network", "Network");
}
impl Stored for Subnet {
    const NOT_FOUND: (&'static str, &'static str) = ("Subnet", "Subnet");
}
impl Stored for Port {
    const NOT_FOUND: (&'static str, &'static str) = ("Port", "Port");
}
impl Stored for Router {
    const NOT_FOUND: (&'static str, &'static str) = ("Router", "Router");
}
impl Stored for FloatingIp {
    const NOT_FOUND: (&'static str, &'static str) = ("FloatingIP", "Floating IP");
}
impl Stored for SecurityGroup {
    const NOT_FOUND: (&'static str, &'static str) = ("SecurityGroup", "Security group");
}
impl Stored for QosPolicy {
    const NOT_FOUND: (&'static str, &'static str) = ("QosPolicy", "QoS policy");
}
impl Stored for SecurityGroupRule {
    const NOT_FOUND: (&'static str, &'static str) = ("SecurityGroupRule", "Security group rule");
}
impl Stored for RbacPolicy {
    const NOT_FOUND: (&'static str, &'static str) = ("RbacPolicy", "RBAC policy");
}

/// RBAC actions (`rbac-policies`).
pub const ACCESS_SHARED: &str = "access_as_shared";
pub const ACCESS_EXTERNAL: &str = "access_as_external";
/// The target that stands for every project.
pub const WILDCARD: &str = "*";

/// The RBAC policies in force, by object id, read once for a request (or a list).
pub struct Grants {
    by_object: HashMap<String, Vec<Arc<RbacPolicy>>>,
}

impl Grants {
    /// Every policy.
    pub fn all(ctx: &Ctx<'_>) -> Self {
        let mut by_object: HashMap<String, Vec<Arc<RbacPolicy>>> = HashMap::new();
        for (p, _) in ctx.all::<RbacPolicy>() {
            by_object.entry(p.object_id.clone()).or_default().push(p);
        }
        Self { by_object }
    }

    /// The policies on one object.
    pub fn of(ctx: &Ctx<'_>, object_id: &str) -> Self {
        let on: Vec<Arc<RbacPolicy>> = ctx
            .all::<RbacPolicy>()
            .into_iter()
            .filter(|(p, _)| p.object_id == object_id)
            .map(|(p, _)| p)
            .collect();
        Self {
            by_object: HashMap::from([(object_id.to_string(), on)]),
        }
    }

    /// The policies granting `action` on object `id` of `object_type`.
    pub fn on<'a>(
        &'a self,
        object_type: &'a str,
        id: &str,
        action: &'a str,
    ) -> impl Iterator<Item = &'a RbacPolicy> + 'a {
        self.by_object
            .get(id)
            .into_iter()
            .flatten()
            .map(|p| p.as_ref())
            .filter(move |p| p.object_type == object_type && p.action == action)
    }

    /// Whether `project` holds `action` on the object, through a policy naming it or `*`.
    pub fn grants(&self, object_type: &str, id: &str, action: &str, project: &str) -> bool {
        self.on(object_type, id, action)
            .any(|p| p.target_project == WILDCARD || p.target_project == project)
    }

    /// Neutron's per-caller `shared`: the network is shared with everyone (the flag mirrors
    /// the `*` policy; older data may have only the flag) or with the caller's project.
    pub fn network_shared(&self, n: &Network, project: &str) -> bool {
        n.shared || self.grants("network", &n.id, ACCESS_SHARED, project)
    }

    /// Whether the caller's project may use external network `n` (router gateways, floating
    /// IPs). An external network without any `access_as_external` policy predates them and is
    /// open to everyone.
    pub fn network_external(&self, n: &Network, project: &str) -> bool {
        n.external
            && (self.on("network", &n.id, ACCESS_EXTERNAL).next().is_none()
                || self.grants("network", &n.id, ACCESS_EXTERNAL, project))
    }
}

impl Stored for SubnetPool {
    const NOT_FOUND: (&'static str, &'static str) = ("SubnetPool", "Subnet pool");
}
impl Stored for AddressScope {
    const NOT_FOUND: (&'static str, &'static str) = ("AddressScope", "Address scope");
}

/// A stored object that belongs to a project (what quotas count).
pub trait Owned: Stored {
    fn project(&self) -> &str;
}

macro_rules! owned {
    ($($t:ty),*) => {$(
        impl Owned for $t {
            fn project(&self) -> &str {
                &self.project_id
            }
        }
    )*};
}
owned!(
    Network,
    Subnet,
    Port,
    Router,
    FloatingIp,
    SecurityGroup,
    SecurityGroupRule,
    SubnetPool,
    RbacPolicy
);

/// How many objects of type `T` project `project` owns.
pub fn count_owned<T: Owned>(ctx: &Ctx<'_>, project: &str) -> usize {
    ctx.all::<T>().iter().filter(|(o, _)| o.project() == project).count()
}

/// Neutron's `<Type>NotFound` for object `id` of type `T`.
pub fn not_found<T: Stored>(id: &str) -> NeutronError {
    NeutronError::not_found(T::NOT_FOUND.0, T::NOT_FOUND.1, id)
}

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
    /// May write in its own project: Neutron's `member` role (admin implies it). A `reader` may
    /// read but not write.
    pub fn member(&self) -> bool {
        self.admin() || self.auth.roles.iter().any(|r| r == MEMBER_ROLE)
    }
    /// May read in its own project: Neutron's secure-RBAC defaults need `reader` (implied by
    /// member and admin). A token with only some other role sees nothing (empty lists, 404s);
    /// so does a node's (role `node`): a project that grants a node the right to plug its
    /// ports does not let it read the project.
    pub fn can_read(&self) -> bool {
        self.admin() || self.auth.roles.iter().any(|r| r == READER_ROLE)
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

    /// Object `id` of type `T`, with the revision it was written at.
    pub fn get<T: Stored>(&self, id: &str) -> Option<(T, Revision)> {
        self.state.cache.get_object(id)
    }
    /// Every object of type `T`, in id order, shared with the cache.
    pub fn all<T: Stored>(&self) -> Vec<(Arc<T>, Revision)> {
        self.state.cache.list_typed()
    }

    /// A network is visible to its project, the admin, and the projects RBAC policies share
    /// it with (as shared or as external), as in Neutron.
    pub fn network_visible(&self, n: &Network) -> bool {
        self.network_visible_in(n, &Grants::of(self, &n.id))
    }

    /// [`Ctx::network_visible`] with the policies already read.
    pub fn network_visible_in(&self, n: &Network, g: &Grants) -> bool {
        let me = &self.auth.project_id;
        self.admin() || self.owns(&n.project_id) || g.network_shared(n, me) || g.network_external(n, me)
    }

    /// Whether the caller's project may put its own ports and subnets' addresses on `n`.
    pub fn network_shared_with_me(&self, n: &Network) -> bool {
        Grants::of(self, &n.id).network_shared(n, &self.auth.project_id)
    }

    /// A network the caller may see, or NetworkNotFound.
    pub fn visible_network(&self, id: &str) -> NResult<(Network, Revision)> {
        match self.get::<Network>(id) {
            Some((n, r)) if self.network_visible(&n) => Ok((n, r)),
            _ => Err(not_found::<Network>(id)),
        }
    }

    pub fn subnet_visible(&self, s: &Subnet) -> bool {
        self.admin()
            || self.owns(&s.project_id)
            || self
                .get::<Network>(&s.network_id)
                .is_some_and(|(n, _)| self.network_shared_with_me(&n))
    }

    pub fn port_visible(&self, p: &Port) -> bool {
        self.admin()
            || self.owns(&p.project_id)
            || self
                .get::<Network>(&p.network_id)
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
    /// `Ok(None)` means a comparison failed: somebody else changed what the plan read. The
    /// cache then already shows every compared key as the failed transaction saw it, so
    /// planning again sees the winner's write.
    pub async fn commit(&self, compares: Vec<Compare>, ops: Vec<Op>) -> NResult<Option<Revision>> {
        let res = self.state.store.txn(compares, ops).await.map_err(store_err)?;
        if !res.succeeded {
            // Wait for the revisions of the keys we compared, not for the store's global
            // revision: writes outside the cache's prefix (another tenant of the same etcd)
            // move that, and the cache never sees them.
            self.state
                .cache
                .wait_for_conflict(&res)
                .await
                .map_err(|e| NeutronError::unavailable(e.to_string()))?;
            return Ok(None);
        }
        self.state
            .cache
            .wait_for(res.revision)
            .await
            .map_err(|e| NeutronError::unavailable(e.to_string()))?;
        Ok(Some(res.revision))
    }

    /// After a lost race (the cache caught up in [`Ctx::commit`]): a little jitter so
    /// competing writers spread out.
    pub async fn resync(&self, attempt: usize) -> NResult<()> {
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
