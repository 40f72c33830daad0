//! Identity records as stored, and where they live in the store.
//!
//! Layout (all under `/isthmus/v1/identity/`, so the cache mirrors it):
//! - `projects/<id>`, `users/<id>`, `roles/<id>`: JSON records.
//! - `project_names/<domain>/<name>`, `user_names/<domain>/<name>`, `role_names/<name>`: the
//!   owning id; created with `Compare::Absent` so names stay unique.
//! - `assignments/<project>/<user>/<role>` and `user_assignments/<user>/<project>/<role>`: role
//!   assignments, indexed both ways (written and deleted together).
//! - `revoked/<audit_id>`: revoked tokens, until they would have expired anyway.
//! - `revoke_events/{users/<user>,projects/<project>,grants/<project>/<user>}`: Keystone-style
//!   revocation events (disable, role removal) with their time, kept for one token lifetime.
//! - `signing_key`: where the token signing secret used to be; deleted at start (keys now live
//!   in a directory, see `keys`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const PREFIX: &str = "/isthmus/v1/identity/";

/// The one built-in domain.
pub const DEFAULT_DOMAIN_ID: &str = "default";
pub const DEFAULT_DOMAIN_NAME: &str = "Default";

pub fn signing_key() -> String {
    format!("{PREFIX}signing_key")
}
pub fn project(id: &str) -> String {
    format!("{PREFIX}projects/{id}")
}
pub fn projects() -> String {
    format!("{PREFIX}projects/")
}
pub fn project_name(domain_id: &str, name: &str) -> String {
    format!("{PREFIX}project_names/{}/{}", escape(domain_id), escape(name))
}
pub fn user(id: &str) -> String {
    format!("{PREFIX}users/{id}")
}
pub fn users() -> String {
    format!("{PREFIX}users/")
}
pub fn user_name(domain_id: &str, name: &str) -> String {
    format!("{PREFIX}user_names/{}/{}", escape(domain_id), escape(name))
}
pub fn role(id: &str) -> String {
    format!("{PREFIX}roles/{id}")
}
pub fn roles() -> String {
    format!("{PREFIX}roles/")
}
pub fn role_name(name: &str) -> String {
    format!("{PREFIX}role_names/{}", escape(name))
}
pub fn assignment(project_id: &str, user_id: &str, role_id: &str) -> String {
    format!("{PREFIX}assignments/{project_id}/{user_id}/{role_id}")
}
pub fn user_assignment(user_id: &str, project_id: &str, role_id: &str) -> String {
    format!("{PREFIX}user_assignments/{user_id}/{project_id}/{role_id}")
}
/// Every assignment (project-major).
pub fn assignments() -> String {
    format!("{PREFIX}assignments/")
}
/// Assignments on one project.
pub fn project_assignments(project_id: &str) -> String {
    format!("{PREFIX}assignments/{project_id}/")
}
/// Assignments of one user on one project.
pub fn project_user_assignments(project_id: &str, user_id: &str) -> String {
    format!("{PREFIX}assignments/{project_id}/{user_id}/")
}
/// The whole user-major index.
pub fn all_user_assignments() -> String {
    format!("{PREFIX}user_assignments/")
}
/// Assignments of one user (user-major index).
pub fn user_assignments(user_id: &str) -> String {
    format!("{PREFIX}user_assignments/{user_id}/")
}
pub fn revoked(audit_id: &str) -> String {
    format!("{PREFIX}revoked/{audit_id}")
}
pub fn revocations() -> String {
    format!("{PREFIX}revoked/")
}
/// Revocation event for every token of a user issued until then (user disabled).
pub fn user_revoke_event(user_id: &str) -> String {
    format!("{PREFIX}revoke_events/users/{user_id}")
}
/// Revocation event for every token scoped to a project (project disabled).
pub fn project_revoke_event(project_id: &str) -> String {
    format!("{PREFIX}revoke_events/projects/{project_id}")
}
/// Revocation event for a user's tokens on one project (a role removed there).
pub fn grant_revoke_event(project_id: &str, user_id: &str) -> String {
    format!("{PREFIX}revoke_events/grants/{project_id}/{user_id}")
}
pub fn revoke_events() -> String {
    format!("{PREFIX}revoke_events/")
}

/// Splits an assignment key (either index) into its three trailing components.
pub fn split_assignment_key<'a>(key: &'a str, prefix: &str) -> Option<(&'a str, &'a str, &'a str)> {
    let rest = key.strip_prefix(prefix)?;
    let mut it = rest.splitn(3, '/');
    Some((it.next()?, it.next()?, it.next()?))
}

/// Names go into keys: keep `[A-Za-z0-9._-]`, percent-encode every other byte (so `/` cannot
/// change the key's shape and distinct names map to distinct keys).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Ids we generate are 32 hex digits; the bootstrap domain is "default". Anything that could
/// not be an id (a `/`, say) is never looked up, so a path parameter cannot reach another key.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Current time in microseconds since the epoch.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    #[serde(default)]
    pub description: String,
    pub enabled: bool,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Extra attributes a client set (Keystone keeps them and echoes them back).
    #[serde(default)]
    pub extra: Map<String, Value>,
}

/// A user as stored. Holds the password hash, so it has no `Debug`.
#[derive(Clone, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub domain_id: String,
    pub enabled: bool,
    #[serde(default)]
    pub default_project_id: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// Argon2 PHC string; `None` for a user without a password (cannot authenticate with one).
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Tokens issued before this (µs since epoch) are invalid: set on a password change.
    #[serde(default)]
    pub tokens_valid_after: i64,
    /// Bumped on every password change. A token carries the version of the password it was
    /// obtained with and dies when it differs, independent of clocks.
    #[serde(default)]
    pub password_version: u64,
    #[serde(default)]
    pub extra: Map<String, Value>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("domain_id", &self.domain_id)
            .field("enabled", &self.enabled)
            .field("password_hash", &self.password_hash.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Role {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// Value of an assignment key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssignmentRecord {
    pub created_at: i64,
}

/// Value of a revocation key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    /// When the revoked token expires (µs); the entry can go after that.
    pub expires_at: i64,
}

/// Value of a revocation event key: tokens matching it issued at or before `issued_before`
/// (µs) are invalid for good, whatever happens to the user, project or role afterwards. One
/// key per subject; a later event moves the time forward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeEvent {
    pub issued_before: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_keys_flat() {
        assert_eq!(escape("tempest-p1"), "tempest-p1");
        assert_eq!(escape("a/b"), "a%2Fb");
        assert_eq!(escape("a%2Fb"), "a%252Fb");
        assert_ne!(escape("a b"), escape("a_b"));
    }

    #[test]
    fn ids() {
        assert!(is_valid_id(&new_id()));
        assert!(is_valid_id("default"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".."));
    }

    #[test]
    fn split_keys() {
        let k = assignment("p", "u", "r");
        assert_eq!(split_assignment_key(&k, &assignments()), Some(("p", "u", "r")));
    }
}
