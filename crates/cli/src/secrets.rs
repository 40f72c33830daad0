//! Files holding secrets (a config with a password, password files, private keys) must not be
//! readable by every local user.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Refuses `path` if any user may read it. `what` says what it holds, for the message.
pub fn refuse_world_readable(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o007 != 0 {
        bail!(
            "{} holds {what} and is readable by every user (mode {mode:04o}): run `chmod 0600 {}` (or 0640 with a group of its own)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// A secret kept in a file, such as a password: read after checking it is private, trimmed.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    refuse_world_readable(path, what)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let s = text.trim().to_string();
    if s.is_empty() {
        bail!("{} is empty (expected {what})", path.display());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn world_readable_secrets_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_secret_file(&f, "a password")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("mode 0644") && e.contains("chmod 0600"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(read_secret_file(&f, "a password").ok().as_deref(), Some("s3cret"));
    }
}
