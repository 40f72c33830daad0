//! HTTPS for a benchmark's server: a CA and a server certificate for 127.0.0.1, made for one
//! run in the server's temp dir.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct TlsFiles {
    /// What the benchmark's clients trust.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    pub fn make(dir: &Path) -> Result<TlsFiles> {
        let ca_key = rcgen::KeyPair::generate().context("CA key")?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
        ca.distinguished_name = rcgen::DistinguishedName::new();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "isthmus-bench CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca = ca.self_signed(&ca_key).context("CA certificate")?;
        let key = rcgen::KeyPair::generate().context("server key")?;
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).context("server names")?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &ca, &ca_key).context("server certificate")?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        };
        for (path, text) in [
            (&files.ca, ca.pem()),
            (&files.cert, cert.pem()),
            (&files.key, key.serialize_pem()),
        ] {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(files)
    }
}
