//! Password hashing (argon2id), off the async runtime and bounded in concurrency, since each
//! hash takes `password_hash_kib` of memory.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Longest password accepted (bytes); longer ones are refused before hashing.
pub const MAX_PASSWORD_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("password hashing task failed")]
    Join,
}

pub struct Hasher {
    memory_kib: u32,
    permits: Arc<Semaphore>,
    /// A hash of a random password, verified against when the user does not exist so that an
    /// unknown user takes as long as a wrong password.
    dummy: tokio::sync::OnceCell<String>,
}

impl Hasher {
    pub fn new(memory_kib: u32) -> Self {
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self {
            memory_kib: memory_kib.max(8),
            permits: Arc::new(Semaphore::new(cpus * 2)),
            dummy: Default::default(),
        }
    }

    fn argon2(memory_kib: u32) -> Result<Argon2<'static>, HashError> {
        let params = Params::new(memory_kib, 2, 1, None).map_err(|e| HashError::Hash(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Hashes `password` into a PHC string.
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        let _permit = self.permits.acquire().await.map_err(|_| HashError::Join)?;
        let kib = self.memory_kib;
        tokio::task::spawn_blocking(move || {
            use rand::RngCore;
            let mut salt = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Hash(e.to_string()))?;
            let hash = Self::argon2(kib)?
                .hash_password(password.as_bytes(), &salt)
                .map_err(|e| HashError::Hash(e.to_string()))?;
            Ok(hash.to_string())
        })
        .await
        .map_err(|_| HashError::Join)?
    }

    /// Whether `password` matches `hash` (the hash's own parameters are used). A malformed hash
    /// never matches.
    pub async fn verify(&self, password: String, hash: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || match PasswordHash::new(&hash) {
            Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => {
                tracing::error!("stored password hash is malformed");
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Spends the time a verification takes, and answers false.
    pub async fn verify_nothing(&self, password: String) -> bool {
        let dummy = self
            .dummy
            .get_or_try_init(|| async { self.hash(crate::identity::token::new_audit_id()).await })
            .await;
        if let Ok(d) = dummy {
            let _ = self.verify(password, d.clone()).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let h = Hasher::new(64);
        let hash = h.hash("s3cret".into()).await.expect("hashes");
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains("s3cret"));
        assert!(h.verify("s3cret".into(), hash.clone()).await);
        assert!(!h.verify("s3cret!".into(), hash.clone()).await);
        assert!(!h.verify("s3cret".into(), "garbage".into()).await);
        assert!(!h.verify_nothing("s3cret".into()).await);
        // Salted: the same password hashes differently.
        assert_ne!(hash, h.hash("s3cret".into()).await.expect("hashes"));
    }
}
