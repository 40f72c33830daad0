//! Quota limits and their enforcement on create.
//!
//! Usage is never stored: it is the number of objects a project owns, counted from the cache,
//! so deletes give capacity back by themselves and a crash leaves nothing to leak. What makes
//! the count safe under concurrency is the guard key of (project, resource): a create under a
//! finite limit reads the guard's revision before counting and commits only if the guard is
//! unchanged, rewriting it in the same transaction. Two creates that counted the same usage
//! therefore cannot both commit, on one server or on several sharing etcd; the loser plans
//! again and counts the winner's object. Unlimited resources skip the guard (no contention).

use super::common::{json_bytes, Ctx, NResult};
use isthmus_model::{keys, NeutronError};
use isthmus_store::{Compare, Op, Revision};
use std::collections::BTreeMap;

/// What the store keeps per project: the limits it was given.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub project_id: String,
    pub limits: BTreeMap<String, i64>,
}

/// Limits a project was given (resource → limit), with the record's revision; `None` when it
/// has none (it uses the defaults).
pub fn stored_limits(ctx: &Ctx<'_>, project: &str) -> Option<(BTreeMap<String, i64>, Revision)> {
    ctx.state
        .cache
        .get_json::<Record>(&keys::quota(project))
        .map(|(r, rev)| (r.limits, rev))
}

/// The limit of `resource` for `project`: its own, else the configured default.
pub fn limit(ctx: &Ctx<'_>, project: &str, resource: &str) -> i64 {
    stored_limits(ctx, project)
        .and_then(|(m, _)| m.get(resource).copied())
        .unwrap_or_else(|| ctx.state.config.quota_default(resource))
}

/// Neutron's OverQuota.
pub fn over_quota(resource: &str) -> NeutronError {
    NeutronError::new(
        409,
        "OverQuota",
        format!("Quota exceeded for resources: ['{resource}']."),
    )
}

/// The comparison that orders writes through `key`: unchanged since the cache showed it.
pub fn unchanged(ctx: &Ctx<'_>, key: &str) -> Compare {
    match ctx.state.cache.get(key) {
        Some(kv) => Compare::ModRevision(key.to_string(), kv.mod_revision),
        None => Compare::Absent(key.to_string()),
    }
}

/// The guard's new value; only its revision matters.
pub fn touch(key: String) -> Op {
    Op::put(key, json_bytes(&crate::time::neutron_now()))
}

/// Checks that `project` may own `adding` more of `resource`, `used` counting what it owns
/// now. Returns what the create's transaction must add: the guard's comparison and rewrite
/// (nothing for an unlimited resource but a check that the limits did not change).
pub fn check(
    ctx: &Ctx<'_>,
    resource: &str,
    project: &str,
    adding: usize,
    used: impl FnOnce() -> usize,
) -> NResult<(Vec<Compare>, Vec<Op>)> {
    // The guard first: the count below then includes every create ordered before it (the cache
    // applies a transaction's keys together).
    let guard = keys::quota_guard(project, resource);
    let guard_cmp = unchanged(ctx, &guard);
    let record_cmp = unchanged(ctx, &keys::quota(project));
    let limit = limit(ctx, project, resource);
    if limit < 0 {
        return Ok((vec![record_cmp], vec![]));
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if used().saturating_add(adding) > limit {
        return Err(over_quota(resource));
    }
    Ok((vec![guard_cmp, record_cmp], vec![touch(guard)]))
}
