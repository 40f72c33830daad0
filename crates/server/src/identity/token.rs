//! Stateless signed tokens.
//!
//! A token is `base64url(payload) "." base64url(HMAC-SHA256(key, DOMAIN || payload))`, where the
//! payload is a small JSON document naming the user, the project (if scoped), the methods, the
//! issue and expiry times and a random audit id. Nothing secret is inside; the signature makes
//! it unforgeable. Everything else a token means (roles, whether the user still exists...) is
//! looked up at validation time, so revoking access never needs a token list.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Separates this use of the key from any other.
const DOMAIN: &[u8] = b"isthmus-token-v1\0";
/// Longer input is rejected before any decoding work.
pub const MAX_TOKEN_LEN: usize = 4096;
const MAC_LEN: usize = 32;
pub const KEY_LEN: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Payload {
    /// Format version (1).
    pub v: u8,
    /// User id.
    pub u: String,
    /// Project id, for a project-scoped token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<String>,
    /// Authentication methods ("password", "token").
    pub m: Vec<String>,
    /// Issued at, µs since the epoch.
    pub iat: i64,
    /// Expires at, µs since the epoch.
    pub exp: i64,
    /// This token's audit id.
    pub a: String,
    /// The user's password version when the password was checked.
    #[serde(default)]
    pub pv: u64,
    /// The audit id of the token this one was re-scoped from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pa: Option<String>,
}

impl Payload {
    pub fn audit_ids(&self) -> Vec<String> {
        let mut v = vec![self.a.clone()];
        v.extend(self.pa.clone());
        v
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
}

/// The signing secret. No `Debug`, and never serialized except into its store record.
#[derive(Clone)]
pub struct SigningKey([u8; KEY_LEN]);

impl SigningKey {
    pub fn generate() -> Self {
        use rand::RngCore;
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Self(k)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn from_base64(s: &str) -> Option<Self> {
        let bytes = STANDARD.decode(s).ok()?;
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    fn mac(&self) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(DOMAIN);
        mac
    }

    pub fn sign(&self, payload: &Payload) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(payload).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&json);
        let tag = mac.finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&json), URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks the signature (in constant time) and decodes the payload. Does not look at expiry.
    pub fn verify(&self, token: &str) -> Result<Payload, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
        if tag.len() != MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let mut mac = self.mac();
        mac.update(&json);
        mac.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let payload: Payload = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if payload.v != 1 {
            return Err(TokenError::Malformed);
        }
        Ok(payload)
    }
}

/// A fresh audit id: 16 random bytes, base64url (22 characters, like Keystone's).
pub fn new_audit_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// Audit ids come back from clients (revocation); only accept their shape.
pub fn is_valid_audit_id(a: &str) -> bool {
    a.len() == 22 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        Payload {
            v: 1,
            u: "u1".into(),
            p: Some("p1".into()),
            m: vec!["password".into()],
            iat: 1,
            exp: 2,
            a: new_audit_id(),
            pv: 3,
            pa: None,
        }
    }

    #[test]
    fn roundtrip() {
        let k = SigningKey::generate();
        let p = payload();
        let t = k.sign(&p);
        assert_eq!(k.verify(&t), Ok(p));
        assert!(is_valid_audit_id(&k.verify(&t).map(|p| p.a).unwrap_or_default()));
    }

    #[test]
    fn rejects_other_key_and_tampering() {
        let k = SigningKey::generate();
        let t = k.sign(&payload());
        assert_eq!(SigningKey::generate().verify(&t), Err(TokenError::BadSignature));
        // Swap in a different payload, keep the tag.
        let mut p2 = payload();
        p2.u = "admin".into();
        let forged = format!(
            "{}.{}",
            k.sign(&p2).split_once('.').map(|x| x.0).unwrap_or_default(),
            t.split_once('.').map(|x| x.1).unwrap_or_default()
        );
        assert_eq!(k.verify(&forged), Err(TokenError::BadSignature));
        for bad in ["", ".", "abc", "a.b", "!!!.???", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(k.verify(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_roundtrip() {
        let k = SigningKey::generate();
        let k2 = SigningKey::from_base64(&k.to_base64()).expect("decodes");
        let t = k.sign(&payload());
        assert!(k2.verify(&t).is_ok());
        assert!(SigningKey::from_base64("c2hvcnQ=").is_none());
    }
}
