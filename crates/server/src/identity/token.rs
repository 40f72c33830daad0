//! Stateless signed tokens.
//!
//! A token is `kid "." base64url(payload) "." base64url(HMAC-SHA256(key, DOMAIN || kid || 0 ||
//! payload))`, where `kid` names the key that signed it (see [`super::keys`]) and the payload is
//! a small JSON document naming the user, the project (if scoped), the methods, the
//! issue and expiry times and a random audit id. Nothing secret is inside; the signature makes
//! it unforgeable. Everything else a token means (roles, whether the user still exists...) is
//! looked up at validation time, so revoking access never needs a token list.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Separates this use of the key from any other. (v1 tokens carried no key id; they are no
/// longer accepted.)
const DOMAIN: &[u8] = b"isthmus-token-v2\0";
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
    #[error("token signed with an unknown key")]
    UnknownKey,
}

/// The signing secret. No `Debug`, and never serialized except into its key file.
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

    /// Signs `payload` as key `kid`.
    pub fn sign(&self, kid: &str, payload: &Payload) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(payload).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(kid.as_bytes());
        mac.update(&[0]);
        mac.update(&json);
        let tag = mac.finalize().into_bytes();
        format!(
            "{kid}.{}.{}",
            URL_SAFE_NO_PAD.encode(&json),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Checks the signature (in constant time) and decodes the payload. Does not look at expiry;
    /// the caller picked this key by the token's [`key_id`].
    pub fn verify(&self, token: &str) -> Result<Payload, TokenError> {
        let (kid, body, tag) = split(token)?;
        let json = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
        if tag.len() != MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let mut mac = self.mac();
        mac.update(kid.as_bytes());
        mac.update(&[0]);
        mac.update(&json);
        mac.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let payload: Payload = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
        if payload.v != 1 {
            return Err(TokenError::Malformed);
        }
        Ok(payload)
    }
}

fn split(token: &str) -> Result<(&str, &str, &str), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(kid), Some(body), Some(tag), None) if !kid.is_empty() => Ok((kid, body, tag)),
        _ => Err(TokenError::Malformed),
    }
}

/// The id of the key a token says signed it (unverified: only to pick the key).
pub fn key_id(token: &str) -> Result<&str, TokenError> {
    split(token).map(|(kid, _, _)| kid)
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
        let t = k.sign("1-k", &p);
        assert_eq!(key_id(&t), Ok("1-k"));
        assert_eq!(k.verify(&t), Ok(p));
        assert!(is_valid_audit_id(&k.verify(&t).map(|p| p.a).unwrap_or_default()));
    }

    #[test]
    fn rejects_other_key_and_tampering() {
        let k = SigningKey::generate();
        let t = k.sign("1-k", &payload());
        assert_eq!(SigningKey::generate().verify(&t), Err(TokenError::BadSignature));
        // The key id is signed too.
        assert_eq!(k.verify(&t.replacen("1-k", "2-k", 1)), Err(TokenError::BadSignature));
        // Swap in a different payload, keep the tag.
        let mut p2 = payload();
        p2.u = "admin".into();
        let forged = format!(
            "{}.{}",
            k.sign("1-k", &p2).rsplit_once('.').map(|x| x.0).unwrap_or_default(),
            t.rsplit_once('.').map(|x| x.1).unwrap_or_default()
        );
        assert_eq!(k.verify(&forged), Err(TokenError::BadSignature));
        for bad in [
            "",
            ".",
            "abc",
            "a.b",
            "..",
            "!!!.???.x",
            "k.a.b.c",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(k.verify(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_roundtrip() {
        let k = SigningKey::generate();
        let k2 = SigningKey::from_base64(&k.to_base64()).expect("decodes");
        let t = k.sign("1-k", &payload());
        assert!(k2.verify(&t).is_ok());
        assert!(SigningKey::from_base64("c2hvcnQ=").is_none());
    }
}
