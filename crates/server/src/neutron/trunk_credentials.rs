//! Trunk credentials: what the CNI plugin inside a VM authenticates with on the nested API,
//! instead of a Keystone credential. One credential acts for one trunk only, as a member of
//! the trunk's project limited to that trunk's nested attachments.
//!
//! Managed with a Keystone token by the trunk's project (or an admin); other projects get
//! TrunkNotFound, as for any trunk they cannot see:
//! - `POST /isthmus/v1/trunks/{trunk_id}/credentials` → 201 `{"credential": ...}`, the
//!   secret shown this once;
//! - `GET /isthmus/v1/trunks/{trunk_id}/credentials` → `{"credentials": [...]}`, no secrets;
//! - `DELETE /isthmus/v1/trunks/{trunk_id}/credentials/{id}` → 204.
//!
//! Only the SHA-256 of the secret is stored (the secret is 256 random bits, so a plain hash
//! is as good as a slow one). A credential dies with its trunk (the trunk delete removes it)
//! and with its project (checked at each request).

use super::common::{json_bytes, new_id, not_found, now, retry, Ctx, NResult};
use super::http::{authenticate, json_response, ApiResult};
use super::lookup;
use super::trunks;
use crate::identity::AuthContext;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use isthmus_model::validate::is_uuid;
use isthmus_model::{keys, NeutronError, Trunk};
use isthmus_store::{Compare, Op, Revision};
use isthmus_wire::nested::{TrunkCredential, CREDENTIAL_HEADER};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Credentials a trunk may hold at once.
pub const MAX_PER_TRUNK: usize = 16;
/// Random bytes in a secret.
const SECRET_BYTES: usize = 32;
/// Longest header value looked at (an id, a dot, a secret, with room to spare).
const MAX_HEADER_LEN: usize = 256;

/// A stored credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub trunk_id: String,
    pub project_id: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub created_at: String,
}

impl CredentialRecord {
    fn to_wire(&self, secret: Option<String>) -> TrunkCredential {
        TrunkCredential {
            id: self.id.clone(),
            trunk_id: self.trunk_id.clone(),
            project_id: self.project_id.clone(),
            secret,
            created_at: self.created_at.clone(),
        }
    }
}

fn sha256_hex(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn credentials_of(ctx: &Ctx<'_>, trunk_id: &str) -> Vec<(CredentialRecord, Revision)> {
    ctx.state
        .cache
        .list(keys::TRUNK_CREDENTIAL_PREFIX)
        .iter()
        .filter_map(|kv| {
            let r: CredentialRecord = serde_json::from_slice(&kv.value).ok()?;
            (r.trunk_id == trunk_id).then_some((r, kv.mod_revision))
        })
        .collect()
}

fn credential_not_found(id: &str) -> NeutronError {
    NeutronError::new(
        404,
        "TrunkCredentialNotFound",
        format!("Trunk credential {id} could not be found."),
    )
}

async fn caller(state: &AppState, headers: &HeaderMap) -> NResult<AuthContext> {
    authenticate(state, headers).await
}

/// `GET` and `POST /isthmus/v1/trunks/{trunk_id}/credentials`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(trunk_id): Path<String>,
) -> ApiResult<Response> {
    let auth = caller(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    if !ctx.can_read() {
        return Err(not_found::<Trunk>(&trunk_id).into());
    }
    trunks::visible(&ctx, &trunk_id)?;
    let creds: Vec<TrunkCredential> = credentials_of(&ctx, &trunk_id)
        .into_iter()
        .map(|(r, _)| r.to_wire(None))
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "credentials": creds })))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(trunk_id): Path<String>,
) -> ApiResult<Response> {
    let auth = caller(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    trunks::visible(&ctx, &trunk_id)?;
    ctx.require_member("create_trunk_credential")?;
    let mut raw = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let id = new_id();
    let record = retry(&ctx, |ctx| {
        let (t, trev) = trunks::visible(ctx, &trunk_id)?;
        let held = credentials_of(ctx, &trunk_id).len();
        if held >= MAX_PER_TRUNK {
            return Err(NeutronError::conflict(
                "TrunkCredentialLimitExceeded",
                format!("Trunk {trunk_id} already has {held} credentials, the most it may hold; delete one first."),
            ));
        }
        let record = CredentialRecord {
            id: id.clone(),
            trunk_id: t.id.clone(),
            project_id: t.project_id.clone(),
            secret_sha256: sha256_hex(&secret),
            created_at: now(),
        };
        let guard = keys::trunk_credential_guard(&trunk_id);
        let mut cmp = vec![
            Compare::ModRevision(lookup::key::<Trunk>(&trunk_id), trev),
            Compare::Absent(keys::trunk_credential(&id)),
        ];
        cmp.push(match ctx.state.cache.get(&guard) {
            Some(kv) => Compare::ModRevision(guard.clone(), kv.mod_revision),
            None => Compare::Absent(guard.clone()),
        });
        let ops = vec![
            Op::put(keys::trunk_credential(&id), json_bytes(&record)),
            Op::put(guard, id.clone()),
        ];
        Ok((cmp, ops, record))
    })
    .await?;
    tracing::info!(trunk = %trunk_id, credential = %record.id, "trunk credential created");
    Ok(json_response(
        StatusCode::CREATED,
        json!({ "credential": record.to_wire(Some(secret)) }),
    ))
}

/// `DELETE /isthmus/v1/trunks/{trunk_id}/credentials/{id}`.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((trunk_id, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let auth = caller(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    trunks::visible(&ctx, &trunk_id)?;
    ctx.require_member("delete_trunk_credential")?;
    retry(&ctx, |ctx| {
        let (r, rev) = ctx
            .state
            .cache
            .get_json::<CredentialRecord>(&keys::trunk_credential(&id))
            .filter(|(r, _)| r.trunk_id == trunk_id)
            .ok_or_else(|| credential_not_found(&id))?;
        Ok((
            vec![Compare::ModRevision(keys::trunk_credential(&r.id), rev)],
            vec![Op::delete(keys::trunk_credential(&r.id))],
            (),
        ))
    })
    .await?;
    tracing::info!(trunk = %trunk_id, credential = %id, "trunk credential deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Who a valid credential acts as: a member of the trunk's project, for that trunk only.
pub struct TrunkCaller {
    pub credential_id: String,
    pub trunk_id: String,
    pub auth: AuthContext,
}

/// The one answer to every refused credential, whatever the reason.
pub fn refused() -> NeutronError {
    NeutronError::new(
        401,
        "HTTPUnauthorized",
        format!("The request you have made requires a valid {CREDENTIAL_HEADER} header."),
    )
}

/// Resolves the caller from the credential header. An unknown id, a wrong secret, a malformed
/// header, a deleted trunk or a disabled project are the same 401; a Keystone token counts
/// for nothing here.
pub fn authenticate_credential(state: &AppState, headers: &HeaderMap) -> NResult<TrunkCaller> {
    let deny = |why: &str| {
        tracing::info!(reason = why, "nested API request with an unusable trunk credential");
        refused()
    };
    let value = headers
        .get(CREDENTIAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= MAX_HEADER_LEN)
        .ok_or_else(|| deny("missing or malformed header"))?;
    let (id, secret) = value
        .trim()
        .split_once('.')
        .filter(|(id, secret)| is_uuid(id) && !secret.is_empty())
        .ok_or_else(|| deny("malformed header"))?;
    let presented = sha256_hex(secret);
    let found = state
        .cache
        .get_json::<CredentialRecord>(&keys::trunk_credential(id))
        .map(|(r, _)| r);
    // Hash and compare even for an unknown id, so both take the same time.
    let stored = found.as_ref().map(|r| r.secret_sha256.clone()).unwrap_or_default();
    let expected = if stored.len() == presented.len() {
        stored
    } else {
        "0".repeat(presented.len())
    };
    let matches = constant_time_eq(presented.as_bytes(), expected.as_bytes());
    let Some(record) = found.filter(|_| matches) else {
        return Err(deny("unknown credential or wrong secret"));
    };
    let trunk_alive = state
        .cache
        .get_object::<Trunk>(&record.trunk_id)
        .is_some_and(|(t, _)| t.project_id == record.project_id);
    if !trunk_alive {
        return Err(deny("the credential's trunk is gone"));
    }
    let project = state
        .identity
        .project(&record.project_id)
        .filter(|p| p.enabled)
        .ok_or_else(|| deny("the credential's project is gone or disabled"))?;
    Ok(TrunkCaller {
        auth: AuthContext {
            user_id: format!("trunk-credential-{}", record.id),
            user_name: String::new(),
            project_id: project.id,
            project_name: project.name,
            roles: vec!["member".into(), "reader".into()],
            is_admin: false,
        },
        credential_id: record.id,
        trunk_id: record.trunk_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_comparison() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sama"));
        assert!(!constant_time_eq(b"same", b"samey"));
    }
}
