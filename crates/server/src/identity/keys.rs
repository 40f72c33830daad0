//! Token signing keys, kept in a directory outside the store.
//!
//! Each key is a file `<activates>-<16 hex>.key` (its name without `.key` is the key id that
//! tokens carry) holding 32 random bytes in base64, mode 0600, in a directory of mode 0700.
//! `activates` is a Unix time in seconds: the newest key whose time has come signs, every key
//! present verifies. A rotation writes a key that activates a little later (staging, as
//! Keystone's fernet keys), so every server sharing the directory has read it before any token
//! signed with it exists; servers re-read the directory on SIGHUP and periodically.
//! A key can go once the key after it has been signing for longer than a token lives: no
//! unexpired token can carry it then.

use super::token::{self, Payload, SigningKey, TokenError};
use std::path::{Path, PathBuf};

/// One key and when it starts signing.
#[derive(Clone)]
pub struct KeyEntry {
    pub id: String,
    /// Unix seconds.
    pub activates: i64,
    pub key: SigningKey,
}

/// The keys a server knows, ordered by activation time (then id).
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Vec<KeyEntry>,
}

impl KeyRing {
    pub fn new(mut keys: Vec<KeyEntry>) -> Self {
        keys.sort_by(|a, b| (a.activates, &a.id).cmp(&(b.activates, &b.id)));
        KeyRing { keys }
    }

    /// A ring of one fresh key, active at once, kept only in memory (a server started without
    /// a key directory: tests and embedding; tokens die with the process).
    pub fn ephemeral(now: i64) -> Self {
        KeyRing::new(vec![KeyEntry {
            id: new_key_id(now),
            activates: now,
            key: SigningKey::generate(),
        }])
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The key that signs at `now`: the newest active one. When none is active yet (a first
    /// key written staged into an empty directory) the earliest one signs: no other key
    /// exists that servers could be relying on.
    pub fn signer(&self, now: i64) -> Option<&KeyEntry> {
        self.keys
            .iter()
            .rev()
            .find(|k| k.activates <= now)
            .or_else(|| self.keys.first())
    }

    pub fn verifier(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.id == kid).map(|k| &k.key)
    }

    pub fn sign(&self, payload: &Payload, now: i64) -> Option<String> {
        self.signer(now).map(|k| k.key.sign(&k.id, payload))
    }

    /// Checks a token with the key it names; an unknown key id is a bad signature.
    pub fn verify(&self, token: &str) -> Result<Payload, TokenError> {
        let kid = token::key_id(token)?;
        self.verifier(kid).ok_or(TokenError::UnknownKey)?.verify(token)
    }
}

/// Which keys may be deleted at `now`: `keys` are (id, activation) pairs; a key goes when the
/// key activating after it has been active for `keep_secs` (a token lifetime plus a margin).
/// The newest two are always kept.
pub fn prunable(keys: &[(String, i64)], now: i64, keep_secs: i64) -> Vec<String> {
    let mut sorted: Vec<&(String, i64)> = keys.iter().collect();
    sorted.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let n = sorted.len();
    (0..n.saturating_sub(2))
        .filter(|&i| sorted[i + 1].1.saturating_add(keep_secs) <= now)
        .map(|i| sorted[i].0.clone())
        .collect()
}

/// A new key id activating at `activates`.
pub fn new_key_id(activates: i64) -> String {
    use rand::RngCore;
    format!("{activates}-{:016x}", rand::rngs::OsRng.next_u64())
}

/// The activation time in a key id, if it is one.
pub fn parse_key_id(id: &str) -> Option<i64> {
    let (ts, rnd) = id.split_once('-')?;
    if ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if rnd.len() != 16 || !rnd.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    ts.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by other users (mode {mode:04o}): run `chmod {want:04o} {path}`")]
    Permissions { path: PathBuf, mode: u32, want: u32 },
    #[error("{path} is not a token key (expected 32 bytes in base64)")]
    BadKey { path: PathBuf },
    #[error(
        "no token signing key in {path}: create one with `isthmus keys rotate --dir {path} --activate-now` \
         (or copy the key files from another server)"
    )]
    Empty { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyDirError + '_ {
    move |source| KeyDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a file or directory any other user could read.
fn check_private(path: &Path, want: u32) -> Result<(), KeyDirError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map_err(io_err(path))?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyDirError::Permissions {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    Ok(())
}

/// Every key file in `dir` (other names, such as a rotation's temporary files, are skipped),
/// after checking that the directory and the keys are private.
pub fn load_dir(dir: &Path) -> Result<KeyRing, KeyDirError> {
    check_private(dir, 0o700)?;
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".key")) else {
            continue;
        };
        let Some(activates) = parse_key_id(id) else { continue };
        let path = entry.path();
        check_private(&path, 0o600)?;
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let key = SigningKey::from_base64(text.trim()).ok_or_else(|| KeyDirError::BadKey { path: path.clone() })?;
        keys.push(KeyEntry {
            id: id.to_string(),
            activates,
            key,
        });
    }
    Ok(KeyRing::new(keys))
}

/// Creates `dir` (0700) if missing.
pub fn create_dir(dir: &Path) -> Result<(), KeyDirError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Writes a new key activating at `activates` into `dir`, atomically (a temporary file, synced,
/// then renamed), and returns its id. Readers never see a partial key.
pub fn write_key(dir: &Path, activates: i64) -> Result<String, KeyDirError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let id = new_key_id(activates);
    let tmp = dir.join(format!(".{id}.tmp"));
    let path = dir.join(format!("{id}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let written = f
        .write_all(format!("{}\n", SigningKey::generate().to_base64()).as_bytes())
        .and_then(|()| f.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&path)(e));
    }
    // The rename is durable once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(id)
}

/// Deletes the keys [`prunable`] names; returns their ids.
pub fn prune_dir(dir: &Path, now: i64, keep_secs: i64) -> Result<Vec<String>, KeyDirError> {
    let ring = load_dir(dir)?;
    let keys: Vec<(String, i64)> = ring.keys.iter().map(|k| (k.id.clone(), k.activates)).collect();
    let gone = prunable(&keys, now, keep_secs);
    for id in &gone {
        let path = dir.join(format!("{id}.key"));
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    Ok(gone)
}

/// The directory's keys, creating the directory and a first key (active at once) if it has
/// none: the first start of a single server.
pub fn load_or_create(dir: &Path, now: i64) -> Result<KeyRing, KeyDirError> {
    create_dir(dir)?;
    let ring = load_dir(dir)?;
    if !ring.is_empty() {
        return Ok(ring);
    }
    let id = write_key(dir, now)?;
    tracing::info!(dir = %dir.display(), key_id = %id, "created the first token signing key");
    load_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, activates: i64) -> KeyEntry {
        KeyEntry {
            id: id.into(),
            activates,
            key: SigningKey::generate(),
        }
    }

    fn payload() -> Payload {
        Payload {
            v: 1,
            u: "u".into(),
            p: None,
            m: vec!["password".into()],
            iat: 0,
            exp: 1,
            a: token::new_audit_id(),
            pv: 0,
            pa: None,
        }
    }

    #[test]
    fn newest_active_key_signs_and_staged_keys_only_verify() {
        let ring = KeyRing::new(vec![entry("c", 300), entry("a", 100), entry("b", 200)]);
        assert_eq!(ring.signer(250).map(|k| k.id.as_str()), Some("b"));
        // "c" is staged until 300: it verifies but does not sign.
        assert_eq!(ring.signer(299).map(|k| k.id.as_str()), Some("b"));
        assert_eq!(ring.signer(300).map(|k| k.id.as_str()), Some("c"));
        // Nothing active yet: the earliest key signs rather than none.
        assert_eq!(ring.signer(50).map(|k| k.id.as_str()), Some("a"));
        assert!(KeyRing::default().signer(0).is_none());

        let old = ring.sign(&payload(), 150).expect("signs");
        assert!(old.starts_with("a."));
        let new = ring.sign(&payload(), 350).expect("signs");
        assert!(new.starts_with("c."));
        assert!(ring.verify(&old).is_ok() && ring.verify(&new).is_ok());
        // A ring without the signing key: unknown key.
        let other = KeyRing::new(vec![entry("b", 200)]);
        assert_eq!(other.verify(&old), Err(TokenError::UnknownKey));
        // A key of the same id but other bytes: bad signature.
        let impostor = KeyRing::new(vec![entry("a", 100)]);
        assert_eq!(impostor.verify(&old), Err(TokenError::BadSignature));
    }

    #[test]
    fn pruning_keeps_the_newest_two_and_keys_tokens_may_still_carry() {
        let keys = |v: &[(&str, i64)]| v.iter().map(|(i, t)| (i.to_string(), *t)).collect::<Vec<_>>();
        let k = keys(&[("a", 0), ("b", 1000), ("c", 2000), ("d", 3000)]);
        // keep 500 s: "a" stopped signing at 1000, "b" at 2000; "c" and "d" are the newest two.
        assert_eq!(prunable(&k, 1499, 500), Vec::<String>::new());
        assert_eq!(prunable(&k, 1500, 500), vec!["a".to_string()]);
        assert_eq!(prunable(&k, 2500, 500), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(prunable(&k, 1_000_000, 500), vec!["a".to_string(), "b".to_string()]);
        // Unsorted input, and too few keys to prune.
        let k = keys(&[("d", 3000), ("a", 0), ("c", 2000)]);
        assert_eq!(prunable(&k, 1_000_000, 500), vec!["a".to_string()]);
        assert!(prunable(&keys(&[("a", 0), ("b", 1)]), 1_000_000, 0).is_empty());
    }

    #[test]
    fn key_ids() {
        let id = new_key_id(1_700_000_000);
        assert_eq!(parse_key_id(&id), Some(1_700_000_000));
        for bad in [
            "",
            "1",
            "1-",
            "-0123456789abcdef",
            "x-0123456789abcdef",
            "1-0123456789ABCDEF",
            "1-0123",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn directory_round_trip_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("keys");
        let ring = load_or_create(&dir, 100).expect("first key");
        assert_eq!(ring.ids().len(), 1);
        let first = ring.ids().concat();
        // Idempotent.
        assert_eq!(load_or_create(&dir, 200).expect("loads").ids(), ring.ids());
        let staged = write_key(&dir, 500).expect("rotate");
        std::fs::write(dir.join("README"), "not a key").expect("write");
        let ring = load_dir(&dir).expect("loads");
        assert_eq!(ring.ids().len(), 2);
        assert_eq!(ring.signer(499).map(|k| k.id.as_str()), Some(first.as_str()));
        assert_eq!(ring.signer(500).map(|k| k.id.as_str()), Some(staged.as_str()));

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = load_dir(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("chmod 0700") && e.contains("mode 0755"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let file = dir.join(format!("{staged}.key"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = load_dir(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("chmod 0600") && e.contains(&staged), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&file, "short").expect("write");
        assert!(matches!(load_dir(&dir), Err(KeyDirError::BadKey { .. })));
    }
}
