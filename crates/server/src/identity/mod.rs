//! Keystone v3 identity subset: one built-in domain, projects, users with argon2 passwords,
//! global roles and project role assignments, and stateless signed tokens.
//!
//! Everything is read from the watch-fed cache and written with store transactions, so several
//! servers can share a store. Token validation ([`Identity::validate`]) costs one HMAC and a few
//! cache lookups, and reflects the current state: deleting or disabling a user or project,
//! removing its roles, changing the password or revoking the token all take effect at once.
//! Disabling and role removal also record revocation events (as Keystone does), so undoing
//! the change later does not bring the earlier tokens back.

mod admin;
pub mod error;
mod handlers;
pub mod keys;
pub mod model;
mod password;
pub mod token;
mod writes;

use crate::{cache::Cache, config::Config};
use isthmus_store::{Compare, DynStore, Op};
use keys::KeyRing;
use model::{Project, Role, User};
use std::sync::{Arc, RwLock};
use token::Payload;

pub use handlers::router;

/// Who is calling, resolved from a valid token.
#[derive(Debug, Clone)]
pub struct AuthContext {
    pub user_id: String,
    pub user_name: String,
    pub project_id: String,
    pub project_name: String,
    /// Role names on the project, implied roles included (admin ⇒ member ⇒ reader).
    pub roles: Vec<String>,
    pub is_admin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the request you have made requires authentication")]
    Unauthorized,
    #[error("store: {0}")]
    Store(#[from] isthmus_store::StoreError),
    #[error("cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
    #[error("{0}")]
    Hash(#[from] password::HashError),
    #[error("too many concurrent updates")]
    Contention,
    #[error("identity is not bootstrapped")]
    NotReady,
    #[error("could not find {kind}: {id}")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
}

impl IdentityError {
    fn not_found(kind: &'static str, id: &str) -> Self {
        IdentityError::NotFound {
            kind,
            id: id.to_string(),
        }
    }
}

/// A domain. Only the built-in `default` domain exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub id: &'static str,
    pub name: &'static str,
}

pub const DEFAULT_DOMAIN: Domain = Domain {
    id: model::DEFAULT_DOMAIN_ID,
    name: model::DEFAULT_DOMAIN_NAME,
};

/// Roles the built-in roles imply, as Keystone's bootstrap sets them up.
fn implied_roles(name: &str) -> &'static [&'static str] {
    match name {
        "admin" => &["member", "reader"],
        "member" => &["reader"],
        _ => &[],
    }
}

/// A validated token and what it stands for now. Holds the user record (with its password
/// hash), so it has no `Debug`.
pub(crate) struct TokenInfo {
    pub payload: Payload,
    pub user: User,
    pub project: Option<Project>,
    pub roles: Vec<Role>,
}

impl TokenInfo {
    pub fn is_admin(&self) -> bool {
        self.project.is_some() && self.roles.iter().any(|r| r.name == "admin")
    }
}

pub struct Identity {
    store: DynStore,
    cache: Arc<Cache>,
    config: Arc<Config>,
    /// Token keys, replaced whole when the key directory is read again.
    keys: RwLock<Arc<KeyRing>>,
    hasher: password::Hasher,
}

impl Identity {
    pub fn new(store: DynStore, cache: Arc<Cache>, config: Arc<Config>) -> Self {
        let hasher = password::Hasher::new(config.password_hash_kib);
        Self {
            store,
            cache,
            config,
            keys: RwLock::new(Arc::new(KeyRing::default())),
            hasher,
        }
    }

    /// Validates a project-scoped token for the network API. Unscoped tokens are refused (a
    /// network request always acts in a project).
    pub async fn validate(&self, token: &str) -> Result<AuthContext, IdentityError> {
        let info = self.check_token(token)?;
        let Some(project) = &info.project else {
            tracing::info!(user_id = %info.user.id, "unscoped token refused by the network API");
            return Err(IdentityError::Unauthorized);
        };
        Ok(AuthContext {
            user_id: info.user.id.clone(),
            user_name: info.user.name.clone(),
            project_id: project.id.clone(),
            project_name: project.name.clone(),
            roles: info.roles.iter().map(|r| r.name.clone()).collect(),
            is_admin: info.is_admin(),
        })
    }

    /// Checks a token of any scope: signature, expiry, revocation, and that its user (and
    /// project) still exist, are enabled and (for a project) that the user still has a role
    /// there. Cache lookups and one HMAC; no I/O.
    pub(crate) fn check_token(&self, token: &str) -> Result<TokenInfo, IdentityError> {
        let keys = self.keys();
        if keys.is_empty() {
            return Err(IdentityError::NotReady);
        }
        let payload = match keys.verify(token.trim()) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(reason = %e, "token rejected");
                return Err(IdentityError::Unauthorized);
            }
        };
        let reject = |reason: &str| {
            tracing::info!(user_id = %payload.u, audit_id = %payload.a, reason, "token rejected");
            IdentityError::Unauthorized
        };
        if payload.exp <= model::now_micros() {
            return Err(reject("expired"));
        }
        if payload
            .audit_ids()
            .iter()
            .any(|a| self.cache.contains(&model::revoked(a)))
        {
            return Err(reject("revoked"));
        }
        let Some(user) = self.user(&payload.u) else {
            return Err(reject("user no longer exists"));
        };
        if !user.enabled {
            return Err(reject("user disabled"));
        }
        if payload.iat < user.tokens_valid_after || payload.pv != user.password_version {
            return Err(reject("issued before the user's last password change"));
        }
        if self.revoked_by_event(&model::user_revoke_event(&user.id), payload.iat) {
            return Err(reject("issued before the user was disabled"));
        }
        let (project, roles) = match &payload.p {
            None => (None, Vec::new()),
            Some(pid) => {
                let Some(project) = self.project(pid) else {
                    return Err(reject("project no longer exists"));
                };
                if !project.enabled {
                    return Err(reject("project disabled"));
                }
                if self.revoked_by_event(&model::project_revoke_event(pid), payload.iat) {
                    return Err(reject("issued before the project was disabled"));
                }
                if self.revoked_by_event(&model::grant_revoke_event(pid, &user.id), payload.iat) {
                    return Err(reject("issued before a role of the user on the project was removed"));
                }
                let roles = self.effective_roles(&user.id, pid);
                if roles.is_empty() {
                    return Err(reject("user has no role on the project any more"));
                }
                (Some(project), roles)
            }
        };
        Ok(TokenInfo {
            payload,
            user,
            project,
            roles,
        })
    }

    /// Whether the revocation event at `key` covers a token issued at `iat` (µs). As in
    /// Keystone, a token issued at or before the event's time matches it.
    fn revoked_by_event(&self, key: &str, iat: i64) -> bool {
        match self.cache.get(key) {
            None => false,
            Some(kv) => match serde_json::from_slice::<model::RevokeEvent>(&kv.value) {
                Ok(e) => iat <= e.issued_before,
                Err(e) => {
                    // Unreadable: fail closed.
                    tracing::error!(key, error = %e, "unreadable token revocation event");
                    true
                }
            },
        }
    }

    /// Signs a token. `issued_at`/`expires_at` in µs.
    pub(crate) fn issue_token(&self, payload: &Payload) -> Result<String, IdentityError> {
        self.keys()
            .sign(payload, model::now_micros() / 1_000_000)
            .ok_or(IdentityError::NotReady)
    }

    fn keys(&self) -> Arc<KeyRing> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_keys(&self, ring: KeyRing) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ring);
    }

    /// Loads the token keys: from the configured directory (created with a first key if it
    /// has none), or one in-memory key when no directory is configured.
    pub(crate) fn load_keys(&self) -> Result<(), keys::KeyDirError> {
        let now = model::now_micros() / 1_000_000;
        let ring = match &self.config.token_key_dir {
            Some(dir) => keys::load_or_create(dir, now)?,
            None => {
                tracing::warn!("no token key directory configured: tokens are signed with a key kept only in memory");
                KeyRing::ephemeral(now)
            }
        };
        tracing::info!(keys = ?ring.ids(), signer = ?ring.signer(now).map(|k| k.id.as_str()), "token keys loaded");
        self.set_keys(ring);
        Ok(())
    }

    /// Reads the key directory again (SIGHUP, and periodically): new keys verify at once and
    /// sign from their activation time; deleted ones stop verifying. A directory that cannot
    /// be read, or has no key, leaves the keys as they were.
    pub fn reload_keys(&self) -> Result<(), keys::KeyDirError> {
        let Some(dir) = &self.config.token_key_dir else {
            return Ok(());
        };
        let ring = keys::load_dir(dir)?;
        if ring.is_empty() {
            return Err(keys::KeyDirError::Empty { path: dir.clone() });
        }
        let old = self.keys();
        if ring.ids() != old.ids() {
            let now = model::now_micros() / 1_000_000;
            tracing::info!(keys = ?ring.ids(), signer = ?ring.signer(now).map(|k| k.id.as_str()), "token keys changed");
        }
        self.set_keys(ring);
        Ok(())
    }

    // ----- reads (cache only) -----

    pub fn domain(&self, id: &str) -> Option<Domain> {
        (id == DEFAULT_DOMAIN.id).then_some(DEFAULT_DOMAIN)
    }
    pub fn domain_by_name(&self, name: &str) -> Option<Domain> {
        (name == DEFAULT_DOMAIN.name).then_some(DEFAULT_DOMAIN)
    }
    pub fn domains(&self) -> Vec<Domain> {
        vec![DEFAULT_DOMAIN]
    }

    /// Whether a project with this id exists (enabled or not).
    pub fn project_exists(&self, id: &str) -> bool {
        model::is_valid_id(id) && self.cache.contains(&model::project(id))
    }
    pub fn project(&self, id: &str) -> Option<Project> {
        if !model::is_valid_id(id) {
            return None;
        }
        self.cache.get_object::<Project>(id).map(|(p, _)| p)
    }
    /// All projects, in id order.
    pub fn projects(&self) -> Vec<Project> {
        self.cache
            .list_typed::<Project>()
            .into_iter()
            .map(|(p, _)| Arc::unwrap_or_clone(p))
            .collect()
    }
    pub fn project_by_name(&self, domain_id: &str, name: &str) -> Option<Project> {
        let id = self.index(&model::project_name(domain_id, name))?;
        self.project(&id)
    }
    pub(crate) fn user(&self, id: &str) -> Option<User> {
        if !model::is_valid_id(id) {
            return None;
        }
        self.cache.get_object::<User>(id).map(|(u, _)| u)
    }
    pub(crate) fn users(&self) -> Vec<User> {
        self.cache
            .list_typed::<User>()
            .into_iter()
            .map(|(u, _)| Arc::unwrap_or_clone(u))
            .collect()
    }
    pub(crate) fn user_by_name(&self, domain_id: &str, name: &str) -> Option<User> {
        let id = self.index(&model::user_name(domain_id, name))?;
        self.user(&id)
    }
    pub fn role(&self, id: &str) -> Option<Role> {
        if !model::is_valid_id(id) {
            return None;
        }
        self.cache.get_object::<Role>(id).map(|(r, _)| r)
    }
    pub fn roles(&self) -> Vec<Role> {
        self.cache
            .list_typed::<Role>()
            .into_iter()
            .map(|(r, _)| Arc::unwrap_or_clone(r))
            .collect()
    }
    pub fn role_by_name(&self, name: &str) -> Option<Role> {
        let id = self.index(&model::role_name(name))?;
        self.role(&id)
    }

    /// The id a name-index key points at.
    fn index(&self, key: &str) -> Option<String> {
        let kv = self.cache.get(key)?;
        String::from_utf8(kv.value.clone()).ok()
    }

    /// Roles assigned directly to the user on the project (existing roles only).
    pub fn direct_roles(&self, user_id: &str, project_id: &str) -> Vec<Role> {
        if !model::is_valid_id(user_id) || !model::is_valid_id(project_id) {
            return Vec::new();
        }
        let prefix = model::project_user_assignments(project_id, user_id);
        self.cache
            .list(&prefix)
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).and_then(|rid| self.role(rid)))
            .collect()
    }

    /// Direct roles plus the roles they imply.
    pub fn effective_roles(&self, user_id: &str, project_id: &str) -> Vec<Role> {
        let mut roles = self.direct_roles(user_id, project_id);
        let mut i = 0;
        while i < roles.len() {
            for name in implied_roles(&roles[i].name) {
                if !roles.iter().any(|r| r.name == *name) {
                    if let Some(r) = self.role_by_name(name) {
                        roles.push(r);
                    }
                }
            }
            i += 1;
        }
        roles
    }

    pub fn has_assignment(&self, project_id: &str, user_id: &str, role_id: &str) -> bool {
        [project_id, user_id, role_id].iter().all(|id| model::is_valid_id(id))
            && self.cache.contains(&model::assignment(project_id, user_id, role_id))
    }

    /// Every (project, user, role) assignment whose three parts exist.
    pub fn assignments(&self) -> Vec<(String, String, String)> {
        let prefix = model::assignments();
        self.cache
            .list(&prefix)
            .iter()
            .filter_map(|kv| model::split_assignment_key(&kv.key, &prefix))
            .filter(|(p, u, r)| {
                self.project_exists(p) && self.cache.contains(&model::user(u)) && self.role(r).is_some()
            })
            .map(|(p, u, r)| (p.to_string(), u.to_string(), r.to_string()))
            .collect()
    }

    /// Projects on which the user has at least one role.
    pub fn user_projects(&self, user_id: &str) -> Vec<Project> {
        if !model::is_valid_id(user_id) {
            return Vec::new();
        }
        let prefix = model::user_assignments(user_id);
        let mut ids: Vec<String> = self
            .cache
            .list(&prefix)
            .iter()
            .filter_map(|kv| {
                kv.key
                    .strip_prefix(&prefix)?
                    .split_once('/')
                    .map(|(p, _)| p.to_string())
            })
            .collect();
        ids.dedup();
        ids.iter().filter_map(|id| self.project(id)).collect()
    }

    // ----- write plumbing -----

    /// Runs a transaction; on success waits until the cache shows it.
    /// Commits a transaction and waits until this server's cache shows its outcome: the
    /// write itself, or, after a failed compare, every compared key as the store had it
    /// then (so the caller's next read sees the winner). Waiting for the keys compared
    /// rather than the store's global revision keeps conflicts fast when something outside
    /// the cache's prefix writes to the same etcd.
    async fn commit(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, IdentityError> {
        let r = self.store.txn(compares, ops).await?;
        if r.succeeded {
            self.cache.wait_for(r.revision).await?;
        } else {
            self.cache.wait_for_conflict(&r).await?;
        }
        Ok(r.succeeded)
    }
}
