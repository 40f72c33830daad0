//! Identity writes: bootstrap, and create/update/delete of projects, users, roles, role
//! assignments and token revocations. Every write is one store transaction guarded by compares
//! (`Absent` for new names, `ModRevision` for read-modify-write), retried on contention.

use super::model::{self, AssignmentRecord, Project, Revocation, RevokeEvent, Role, User};
use super::password::MAX_PASSWORD_LEN;
use super::token::Payload;
use super::{Identity, IdentityError};
use anyhow::Context;
use isthmus_store::{Compare, Op, StoreError};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

const ATTEMPTS: usize = 8;
const MAX_NAME_LEN: usize = 255;
const MAX_DESCRIPTION_LEN: usize = 65_535;

pub struct NewProject {
    pub name: String,
    pub domain_id: String,
    pub description: String,
    pub enabled: bool,
    pub tags: Vec<String>,
    pub extra: Map<String, Value>,
}

#[derive(Default)]
pub struct ProjectPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub enabled: Option<bool>,
    pub tags: Option<Vec<String>>,
    pub extra: Map<String, Value>,
}

/// Holds a password: no `Debug`.
pub struct NewUser {
    pub name: String,
    pub domain_id: String,
    pub password: Option<String>,
    pub default_project_id: Option<String>,
    pub enabled: bool,
    pub description: Option<String>,
    pub extra: Map<String, Value>,
}

/// Holds a password: no `Debug`. `Some(None)` clears an optional attribute.
#[derive(Default)]
pub struct UserPatch {
    pub name: Option<String>,
    pub password: Option<String>,
    pub default_project_id: Option<Option<String>>,
    pub enabled: Option<bool>,
    pub description: Option<Option<String>>,
    pub extra: Map<String, Value>,
}

#[derive(Default)]
pub struct RolePatch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
}

/// A change of the name index that goes with an update.
struct Rename {
    old_key: String,
    new_key: String,
    conflict: String,
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, IdentityError> {
    serde_json::to_vec(v).map_err(|e| IdentityError::Store(StoreError::Invalid(format!("encoding a record: {e}"))))
}

/// Longest names, as Keystone's schema has them.
fn max_name_len(kind: &str) -> usize {
    if kind == "project" {
        64
    } else {
        MAX_NAME_LEN
    }
}

pub(crate) fn check_name(kind: &str, name: &str) -> Result<(), IdentityError> {
    let max = max_name_len(kind);
    if name.trim().is_empty() {
        return Err(IdentityError::Invalid(format!(
            "Invalid input for field 'name': a {kind} name must not be empty."
        )));
    }
    if name.chars().count() > max {
        return Err(IdentityError::Invalid(format!(
            "Invalid input for field 'name': a {kind} name is at most {max} characters."
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(IdentityError::Invalid(format!(
            "Invalid input for field 'name': a {kind} name must not contain control characters."
        )));
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), IdentityError> {
    if d.len() > MAX_DESCRIPTION_LEN {
        return Err(IdentityError::Invalid(
            "Invalid input for field 'description': too long.".into(),
        ));
    }
    Ok(())
}

fn check_password(p: &str) -> Result<(), IdentityError> {
    if p.is_empty() {
        return Err(IdentityError::Invalid(
            "Invalid input for field 'password': must not be empty.".into(),
        ));
    }
    if p.len() > MAX_PASSWORD_LEN {
        return Err(IdentityError::Invalid(format!(
            "Invalid input for field 'password': at most {MAX_PASSWORD_LEN} bytes."
        )));
    }
    Ok(())
}

fn check_optional_id(field: &str, id: &Option<String>) -> Result<(), IdentityError> {
    match id {
        Some(id) if !model::is_valid_id(id) => Err(IdentityError::Invalid(format!(
            "Invalid input for field '{field}': not a valid id."
        ))),
        _ => Ok(()),
    }
}

impl Identity {
    /// Idempotent: loads the token keys, makes sure the roles admin/member/reader/node (node: what a node agent may do), the admin and
    /// service projects and the admin user (with role admin on the admin project) exist. An
    /// existing admin user keeps its password.
    pub async fn bootstrap(&self) -> anyhow::Result<()> {
        self.load_keys().context("token signing keys")?;
        self.drop_stored_signing_key()
            .await
            .context("deleting the former token signing key")?;
        let mut roles = Vec::new();
        for name in ["admin", "member", "reader", "node"] {
            roles.push(self.ensure_role(name).await.with_context(|| format!("role {name}"))?);
        }
        let admin_project = self
            .ensure_project(
                &self.config.admin_project.clone(),
                "Bootstrap project for initializing the cloud.",
            )
            .await
            .context("admin project")?;
        self.ensure_project("service", "Project for service users.")
            .await
            .context("service project")?;

        let admin_name = self.config.admin_user.clone();
        let admin = match self.user_by_name(model::DEFAULT_DOMAIN_ID, &admin_name) {
            Some(u) => u,
            None => {
                let password = self
                    .config
                    .admin_password
                    .clone()
                    .filter(|p| !p.is_empty())
                    .or_else(|| std::env::var("ISTHMUS_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty()));
                let Some(password) = password else {
                    anyhow::bail!(
                        "the admin user '{admin_name}' does not exist yet and no admin password is configured: \
                         set admin_password in the configuration or ISTHMUS_ADMIN_PASSWORD in the environment"
                    );
                };
                let created = self
                    .create_user(NewUser {
                        name: admin_name.clone(),
                        domain_id: model::DEFAULT_DOMAIN_ID.into(),
                        password: Some(password),
                        default_project_id: Some(admin_project.id.clone()),
                        enabled: true,
                        description: Some("Bootstrap administrator.".into()),
                        extra: Map::new(),
                    })
                    .await;
                match created {
                    Ok(u) => {
                        tracing::info!(user = %admin_name, "created the admin user");
                        u
                    }
                    Err(IdentityError::Conflict(_)) => {
                        // Another server created it at the same time.
                        self.user_by_name(model::DEFAULT_DOMAIN_ID, &admin_name)
                            .context("admin user vanished during bootstrap")?
                    }
                    Err(e) => return Err(e).context("creating the admin user"),
                }
            }
        };
        if let Some(admin_role) = roles.first() {
            if !self.has_assignment(&admin_project.id, &admin.id, &admin_role.id) {
                self.grant(&admin_project.id, &admin.id, &admin_role.id)
                    .await
                    .context("admin role assignment")?;
            }
        }
        if let Err(e) = self.prune_revocations().await {
            tracing::warn!(error = %e, "pruning expired token revocations failed");
        }
        Ok(())
    }

    /// Keys used to live in the store; the directory replaced it. Deleting the old one keeps
    /// the secret from lingering in etcd and its backups.
    async fn drop_stored_signing_key(&self) -> Result<(), IdentityError> {
        let key = model::signing_key();
        if self.store.get(&key).await?.is_some() {
            self.store.txn(vec![], vec![Op::delete(&key)]).await?;
            tracing::info!("deleted the token signing key formerly kept in the store");
        }
        Ok(())
    }

    async fn ensure_role(&self, name: &str) -> Result<Role, IdentityError> {
        if let Some(r) = self.role_by_name(name) {
            return Ok(r);
        }
        match self.create_role(name.into(), None).await {
            Err(IdentityError::Conflict(_)) => self
                .role_by_name(name)
                .ok_or_else(|| IdentityError::not_found("role", name)),
            other => other,
        }
    }

    async fn ensure_project(&self, name: &str, description: &str) -> Result<Project, IdentityError> {
        if let Some(p) = self.project_by_name(model::DEFAULT_DOMAIN_ID, name) {
            return Ok(p);
        }
        let created = self
            .create_project(NewProject {
                name: name.into(),
                domain_id: model::DEFAULT_DOMAIN_ID.into(),
                description: description.into(),
                enabled: true,
                tags: Vec::new(),
                extra: Map::new(),
            })
            .await;
        match created {
            Err(IdentityError::Conflict(_)) => self
                .project_by_name(model::DEFAULT_DOMAIN_ID, name)
                .ok_or_else(|| IdentityError::not_found("project", name)),
            other => other,
        }
    }

    /// Read-modify-write of one record, guarded by its mod revision; `apply` may rename it.
    /// `events`: revocation events to record in the same transaction (see [`Self::event_op`]).
    async fn update_record<T, F>(
        &self,
        key: &str,
        kind: &'static str,
        id: &str,
        events: &[String],
        mut apply: F,
    ) -> Result<T, IdentityError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(&mut T) -> Result<Option<Rename>, IdentityError>,
    {
        if !model::is_valid_id(id) {
            return Err(IdentityError::not_found(kind, id));
        }
        for _ in 0..ATTEMPTS {
            let Some((mut rec, rev)) = self.cache.get_json::<T>(key) else {
                return Err(IdentityError::not_found(kind, id));
            };
            let rename = apply(&mut rec)?;
            let mut compares = vec![Compare::ModRevision(key.to_string(), rev)];
            let mut ops = vec![Op::put(key, to_json(&rec)?)];
            for e in events {
                ops.push(self.event_op(e)?);
            }
            if let Some(r) = &rename {
                compares.push(Compare::Absent(r.new_key.clone()));
                ops.push(Op::delete(&r.old_key));
                ops.push(Op::put(&r.new_key, id.as_bytes().to_vec()));
            }
            if self.commit(compares, ops).await? {
                return Ok(rec);
            }
            if let Some(r) = rename {
                if self.store.get(&r.new_key).await?.is_some() {
                    return Err(IdentityError::Conflict(r.conflict));
                }
            }
        }
        Err(IdentityError::Contention)
    }

    /// Deletes a record, its name index and the given assignment keys (recomputed per try).
    async fn delete_record<T, F>(
        &self,
        key: &str,
        kind: &'static str,
        id: &str,
        mut extra_ops: F,
    ) -> Result<T, IdentityError>
    where
        T: DeserializeOwned,
        F: FnMut(&T) -> Vec<Op>,
    {
        if !model::is_valid_id(id) {
            return Err(IdentityError::not_found(kind, id));
        }
        for _ in 0..ATTEMPTS {
            let Some((rec, rev)) = self.cache.get_json::<T>(key) else {
                return Err(IdentityError::not_found(kind, id));
            };
            let mut ops = vec![Op::delete(key)];
            ops.extend(extra_ops(&rec));
            if self
                .commit(vec![Compare::ModRevision(key.to_string(), rev)], ops)
                .await?
            {
                return Ok(rec);
            }
        }
        Err(IdentityError::Contention)
    }

    /// Delete ops (both indexes) for every assignment `filter(project, user, role)` selects.
    fn assignment_delete_ops(&self, filter: impl Fn(&str, &str, &str) -> bool) -> Vec<Op> {
        let prefix = model::assignments();
        let mut ops = Vec::new();
        for kv in self.cache.list(&prefix) {
            if let Some((p, u, r)) = model::split_assignment_key(&kv.key, &prefix) {
                if filter(p, u, r) {
                    ops.push(Op::delete(model::assignment(p, u, r)));
                    ops.push(Op::delete(model::user_assignment(u, p, r)));
                }
            }
        }
        // Mirror entries whose primary is already gone.
        let uprefix = model::all_user_assignments();
        for kv in self.cache.list(&uprefix) {
            if let Some((u, p, r)) = model::split_assignment_key(&kv.key, &uprefix) {
                if filter(p, u, r) && !self.cache.contains(&model::assignment(p, u, r)) {
                    ops.push(Op::delete(&kv.key));
                }
            }
        }
        ops
    }

    // ----- projects -----

    pub async fn create_project(&self, new: NewProject) -> Result<Project, IdentityError> {
        check_name("project", &new.name)?;
        check_description(&new.description)?;
        if self.domain(&new.domain_id).is_none() {
            return Err(IdentityError::not_found("domain", &new.domain_id));
        }
        let p = Project {
            id: model::new_id(),
            name: new.name,
            domain_id: new.domain_id,
            description: new.description,
            enabled: new.enabled,
            tags: new.tags,
            extra: new.extra,
        };
        let key = model::project(&p.id);
        let name_key = model::project_name(&p.domain_id, &p.name);
        let ok = self
            .commit(
                vec![Compare::Absent(key.clone()), Compare::Absent(name_key.clone())],
                vec![
                    Op::put(&key, to_json(&p)?),
                    Op::put(&name_key, p.id.as_bytes().to_vec()),
                ],
            )
            .await?;
        if !ok {
            return Err(IdentityError::Conflict(format!(
                "Conflict occurred attempting to store project - Duplicate entry found with name {} at domain ID {}.",
                p.name, p.domain_id
            )));
        }
        tracing::info!(project_id = %p.id, name = %p.name, "project created");
        Ok(p)
    }

    pub async fn update_project(&self, id: &str, patch: ProjectPatch) -> Result<Project, IdentityError> {
        if let Some(n) = &patch.name {
            check_name("project", n)?;
        }
        if let Some(d) = &patch.description {
            check_description(d)?;
        }
        // Disabling a project ends its tokens for good, as Keystone's revocation event does:
        // enabling it again must not bring them back.
        let events = match patch.enabled {
            Some(false) => vec![model::project_revoke_event(id)],
            _ => vec![],
        };
        let p = self
            .update_record::<Project, _>(&model::project(id), "project", id, &events, |p| {
            let mut rename = None;
            if let Some(n) = &patch.name {
                if *n != p.name {
                    rename = Some(Rename {
                        old_key: model::project_name(&p.domain_id, &p.name),
                        new_key: model::project_name(&p.domain_id, n),
                        conflict: format!(
                            "Conflict occurred attempting to store project - Duplicate entry found with name {n} at domain ID {}.",
                            p.domain_id
                        ),
                    });
                    p.name = n.clone();
                }
            }
            if let Some(d) = &patch.description {
                p.description = d.clone();
            }
            if let Some(e) = patch.enabled {
                p.enabled = e;
            }
            if let Some(t) = &patch.tags {
                p.tags = t.clone();
            }
            for (k, v) in &patch.extra {
                p.extra.insert(k.clone(), v.clone());
            }
            Ok(rename)
        })
            .await?;
        if !events.is_empty() {
            tracing::info!(project_id = %p.id, "project disabled; its tokens revoked");
            self.prune_revocations_logged().await;
        }
        Ok(p)
    }

    pub async fn delete_project(&self, id: &str) -> Result<(), IdentityError> {
        let pid = id.to_string();
        let p: Project = self
            .delete_record(&model::project(id), "project", id, |p: &Project| {
                let mut ops = vec![Op::delete(model::project_name(&p.domain_id, &p.name))];
                ops.extend(self.assignment_delete_ops(|ap, _, _| ap == pid));
                ops
            })
            .await?;
        tracing::info!(project_id = %p.id, name = %p.name, "project deleted");
        Ok(())
    }

    // ----- users -----

    pub async fn create_user(&self, new: NewUser) -> Result<User, IdentityError> {
        check_name("user", &new.name)?;
        if let Some(d) = &new.description {
            check_description(d)?;
        }
        check_optional_id("default_project_id", &new.default_project_id)?;
        if self.domain(&new.domain_id).is_none() {
            return Err(IdentityError::not_found("domain", &new.domain_id));
        }
        let password_hash = match new.password {
            Some(pw) => {
                check_password(&pw)?;
                Some(self.hasher.hash(pw).await?)
            }
            None => None,
        };
        let u = User {
            id: model::new_id(),
            name: new.name,
            domain_id: new.domain_id,
            enabled: new.enabled,
            default_project_id: new.default_project_id,
            description: new.description,
            password_hash,
            tokens_valid_after: 0,
            password_version: 0,
            extra: new.extra,
        };
        let key = model::user(&u.id);
        let name_key = model::user_name(&u.domain_id, &u.name);
        let ok = self
            .commit(
                vec![Compare::Absent(key.clone()), Compare::Absent(name_key.clone())],
                vec![
                    Op::put(&key, to_json(&u)?),
                    Op::put(&name_key, u.id.as_bytes().to_vec()),
                ],
            )
            .await?;
        if !ok {
            return Err(IdentityError::Conflict(format!(
                "Conflict occurred attempting to store user - Duplicate entry found with name {} at domain ID {}.",
                u.name, u.domain_id
            )));
        }
        tracing::info!(user_id = %u.id, name = %u.name, "user created");
        Ok(u)
    }

    pub async fn update_user(&self, id: &str, patch: UserPatch) -> Result<User, IdentityError> {
        if let Some(n) = &patch.name {
            check_name("user", n)?;
        }
        if let Some(Some(d)) = &patch.description {
            check_description(d)?;
        }
        if let Some(dp) = &patch.default_project_id {
            check_optional_id("default_project_id", dp)?;
        }
        // Hash before the read-modify-write loop (it is slow and must not be repeated).
        let new_hash = match &patch.password {
            Some(pw) => {
                check_password(pw)?;
                if self.user(id).is_none() {
                    return Err(IdentityError::not_found("user", id));
                }
                Some(self.hasher.hash(pw.clone()).await?)
            }
            None => None,
        };
        // Disabling a user ends their tokens for good (Keystone's revocation event).
        let events = match patch.enabled {
            Some(false) => vec![model::user_revoke_event(id)],
            _ => vec![],
        };
        let u = self
            .update_record::<User, _>(&model::user(id), "user", id, &events, |u| {
                let mut rename = None;
                if let Some(n) = &patch.name {
                    if *n != u.name {
                        rename = Some(Rename {
                            old_key: model::user_name(&u.domain_id, &u.name),
                            new_key: model::user_name(&u.domain_id, n),
                            conflict: format!(
                                "Conflict occurred attempting to store user - Duplicate entry found with name {n} at domain ID {}.",
                                u.domain_id
                            ),
                        });
                        u.name = n.clone();
                    }
                }
                if let Some(h) = &new_hash {
                    u.password_hash = Some(h.clone());
                    u.tokens_valid_after = u.tokens_valid_after.max(model::now_micros());
                    u.password_version = u.password_version.wrapping_add(1);
                }
                if let Some(dp) = &patch.default_project_id {
                    u.default_project_id = dp.clone();
                }
                if let Some(e) = patch.enabled {
                    u.enabled = e;
                }
                if let Some(d) = &patch.description {
                    u.description = d.clone();
                }
                for (k, v) in &patch.extra {
                    u.extra.insert(k.clone(), v.clone());
                }
                Ok(rename)
            })
            .await?;
        if new_hash.is_some() {
            tracing::info!(user_id = %u.id, "user password changed; earlier tokens revoked");
        }
        if !events.is_empty() {
            tracing::info!(user_id = %u.id, "user disabled; their tokens revoked");
            self.prune_revocations_logged().await;
        }
        Ok(u)
    }

    /// A user changing their own password: the original must match.
    pub async fn change_password(&self, id: &str, original: String, new: String) -> Result<User, IdentityError> {
        check_password(&new)?;
        let Some(user) = self.user(id) else {
            return Err(IdentityError::not_found("user", id));
        };
        let ok = match (&user.password_hash, original.len() <= MAX_PASSWORD_LEN) {
            (Some(h), true) => self.hasher.verify(original, h.clone()).await,
            _ => false,
        };
        if !ok {
            tracing::info!(user_id = %id, "password change refused: original password does not match");
            return Err(IdentityError::Unauthorized);
        }
        self.update_user(
            id,
            UserPatch {
                password: Some(new),
                ..Default::default()
            },
        )
        .await
    }

    pub async fn delete_user(&self, id: &str) -> Result<(), IdentityError> {
        let uid = id.to_string();
        let u: User = self
            .delete_record(&model::user(id), "user", id, |u: &User| {
                let mut ops = vec![Op::delete(model::user_name(&u.domain_id, &u.name))];
                ops.extend(self.assignment_delete_ops(|_, au, _| au == uid));
                ops
            })
            .await?;
        tracing::info!(user_id = %u.id, name = %u.name, "user deleted");
        Ok(())
    }

    /// Checks a password for the user; unknown users cost the same time as known ones.
    pub(crate) async fn verify_password(&self, user: Option<&User>, password: String) -> bool {
        if password.len() > MAX_PASSWORD_LEN {
            return false;
        }
        match user.and_then(|u| u.password_hash.clone()) {
            Some(h) => self.hasher.verify(password, h).await,
            None => self.hasher.verify_nothing(password).await,
        }
    }

    // ----- roles -----

    pub async fn create_role(&self, name: String, description: Option<String>) -> Result<Role, IdentityError> {
        check_name("role", &name)?;
        if let Some(d) = &description {
            check_description(d)?;
        }
        let r = Role {
            id: model::new_id(),
            name,
            description,
        };
        let key = model::role(&r.id);
        let name_key = model::role_name(&r.name);
        let ok = self
            .commit(
                vec![Compare::Absent(key.clone()), Compare::Absent(name_key.clone())],
                vec![
                    Op::put(&key, to_json(&r)?),
                    Op::put(&name_key, r.id.as_bytes().to_vec()),
                ],
            )
            .await?;
        if !ok {
            return Err(IdentityError::Conflict(format!(
                "Conflict occurred attempting to store role - Duplicate entry found with name {}.",
                r.name
            )));
        }
        tracing::info!(role_id = %r.id, name = %r.name, "role created");
        Ok(r)
    }

    pub async fn update_role(&self, id: &str, patch: RolePatch) -> Result<Role, IdentityError> {
        if let Some(n) = &patch.name {
            check_name("role", n)?;
        }
        self.update_record::<Role, _>(&model::role(id), "role", id, &[], |r| {
            let mut rename = None;
            if let Some(n) = &patch.name {
                if *n != r.name {
                    rename = Some(Rename {
                        old_key: model::role_name(&r.name),
                        new_key: model::role_name(n),
                        conflict: format!(
                            "Conflict occurred attempting to store role - Duplicate entry found with name {n}."
                        ),
                    });
                    r.name = n.clone();
                }
            }
            if let Some(d) = &patch.description {
                r.description = d.clone();
            }
            Ok(rename)
        })
        .await
    }

    pub async fn delete_role(&self, id: &str) -> Result<(), IdentityError> {
        let rid = id.to_string();
        let r: Role = self
            .delete_record(&model::role(id), "role", id, |r: &Role| {
                let mut ops = vec![Op::delete(model::role_name(&r.name))];
                ops.extend(self.assignment_delete_ops(|_, _, ar| ar == rid));
                // Each (project, user) losing the role: their tokens there end, as for an
                // unassignment, so a new role given later does not revive them.
                let mut pairs: Vec<(String, String)> = self
                    .assignments()
                    .into_iter()
                    .filter(|(_, _, ar)| *ar == rid)
                    .map(|(p, u, _)| (p, u))
                    .collect();
                pairs.dedup();
                for (p, u) in pairs {
                    match self.event_op(&model::grant_revoke_event(&p, &u)) {
                        Ok(op) => ops.push(op),
                        Err(e) => tracing::error!(error = %e, "could not encode a revocation event"),
                    }
                }
                ops
            })
            .await?;
        self.prune_revocations_logged().await;
        tracing::info!(role_id = %r.id, name = %r.name, "role deleted");
        Ok(())
    }

    // ----- assignments -----

    /// Gives the user the role on the project (idempotent).
    pub async fn grant(&self, project_id: &str, user_id: &str, role_id: &str) -> Result<(), IdentityError> {
        for _ in 0..ATTEMPTS {
            if !self.project_exists(project_id) {
                return Err(IdentityError::not_found("project", project_id));
            }
            if self.user(user_id).is_none() {
                return Err(IdentityError::not_found("user", user_id));
            }
            if self.role(role_id).is_none() {
                return Err(IdentityError::not_found("role", role_id));
            }
            let rec = to_json(&AssignmentRecord {
                created_at: model::now_micros(),
            })?;
            let ok = self
                .commit(
                    vec![
                        Compare::Exists(model::project(project_id)),
                        Compare::Exists(model::user(user_id)),
                        Compare::Exists(model::role(role_id)),
                    ],
                    vec![
                        Op::put(model::assignment(project_id, user_id, role_id), rec.clone()),
                        Op::put(model::user_assignment(user_id, project_id, role_id), rec),
                    ],
                )
                .await?;
            if ok {
                tracing::info!(project_id, user_id, role_id, "role granted");
                return Ok(());
            }
        }
        Err(IdentityError::Contention)
    }

    /// Removes the role from the user on the project; 404 if it was not assigned.
    pub async fn revoke_grant(&self, project_id: &str, user_id: &str, role_id: &str) -> Result<(), IdentityError> {
        if !self.has_assignment(project_id, user_id, role_id) {
            return Err(IdentityError::not_found(
                "role assignment",
                &format!("{project_id}/{user_id}/{role_id}"),
            ));
        }
        // Keystone records a revocation event with the unassignment: the user's tokens on the
        // project end for good, and assigning a role again does not revive them.
        self.commit(
            vec![],
            vec![
                Op::delete(model::assignment(project_id, user_id, role_id)),
                Op::delete(model::user_assignment(user_id, project_id, role_id)),
                self.event_op(&model::grant_revoke_event(project_id, user_id))?,
            ],
        )
        .await?;
        tracing::info!(
            project_id,
            user_id,
            role_id,
            "role revoked; the user's tokens on the project revoked"
        );
        self.prune_revocations_logged().await;
        Ok(())
    }

    // ----- token revocation -----

    /// Revokes a token (and so every token re-scoped from it) until it would expire anyway.
    pub(crate) async fn revoke_token(&self, payload: &Payload) -> Result<(), IdentityError> {
        let rec = to_json(&Revocation {
            expires_at: payload.exp,
        })?;
        self.commit(vec![], vec![Op::put(model::revoked(&payload.a), rec)])
            .await?;
        tracing::info!(user_id = %payload.u, audit_id = %payload.a, "token revoked");
        self.prune_revocations().await
    }

    /// The put of a revocation event at `key`, dated now (or later, if an event there already
    /// is: its time only moves forward, so an event never un-revokes a token).
    fn event_op(&self, key: &str) -> Result<Op, IdentityError> {
        let earlier = self
            .cache
            .get_json::<RevokeEvent>(key)
            .map(|(e, _)| e.issued_before)
            .unwrap_or(0);
        let ev = RevokeEvent {
            issued_before: model::now_micros().max(earlier),
        };
        Ok(Op::put(key, to_json(&ev)?))
    }

    async fn prune_revocations_logged(&self) {
        if let Err(e) = self.prune_revocations().await {
            tracing::warn!(error = %e, "pruning old token revocations failed");
        }
    }

    /// Drops revocations of tokens that have expired by now, and revocation events older than
    /// the longest token lifetime (every token they could match has expired).
    async fn prune_revocations(&self) -> Result<(), IdentityError> {
        let now = model::now_micros();
        let lifetime = i64::try_from(self.config.token_ttl_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        let expired_tokens = self.cache.list(&model::revocations()).into_iter().filter(|kv| {
            serde_json::from_slice::<Revocation>(&kv.value)
                .map(|r| r.expires_at < now)
                .unwrap_or(true)
        });
        let old_events = self.cache.list(&model::revoke_events()).into_iter().filter(|kv| {
            serde_json::from_slice::<RevokeEvent>(&kv.value)
                .map(|e| e.issued_before.saturating_add(lifetime) < now)
                .unwrap_or(true)
        });
        let old: Vec<_> = expired_tokens.chain(old_events).take(256).collect();
        if old.is_empty() {
            return Ok(());
        }
        // Only if unchanged since read: a fresh event written there meanwhile must stay.
        let compares = old
            .iter()
            .map(|kv| Compare::ModRevision(kv.key.clone(), kv.mod_revision))
            .collect();
        let ops = old.iter().map(|kv| Op::delete(&kv.key)).collect();
        self.commit(compares, ops).await?;
        Ok(())
    }
}
