//! HTTPS at the binary's edge: the server's certificate flags, reload on SIGHUP, and the
//! private CA and server certificate `isthmus up --tls` makes for itself.

use anyhow::{Context, Result};
use clap::Args;
use isthmus_server::Config;
use std::path::{Path, PathBuf};

/// How the listeners serve: HTTPS from certificate files, or plain HTTP.
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// Certificate chain (PEM, server certificate first): both listeners serve HTTPS. Re-read,
    /// with the key, on SIGHUP.
    #[arg(long, env = "ISTHMUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ISTHMUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a non-loopback address (passwords and tokens in clear): without
    /// TLS the server otherwise listens only on loopback.
    #[arg(long, env = "ISTHMUS_INSECURE_HTTP")]
    pub insecure_http: bool,
}

impl TlsArgs {
    /// Flags over the config file.
    pub fn apply(&self, config: &mut Config) {
        if let (Some(c), Some(k)) = (&self.tls_cert, &self.tls_key) {
            config.tls_cert_file = Some(c.clone());
            config.tls_key_file = Some(k.clone());
        }
        if self.insecure_http {
            config.insecure_http = true;
        }
    }
}

/// The files `up --tls` serves and trusts, in its data directory.
pub struct UpCerts {
    /// The private CA's certificate: clients' `OS_CACERT`.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

const CA_NAME: &str = "Isthmus all-in-one CA";

/// A private CA and a server certificate for `hosts` (names and addresses), made once and
/// kept in `dir` (keys 0600). The CA stays; the server certificate is signed again by it when
/// missing or when `hosts` changed (another listen address or host name).
pub fn up_certs(dir: &Path, hosts: &[String]) -> Result<UpCerts> {
    let certs = UpCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    let ca_key_file = dir.join("ca-key.pem");
    let hosts_file = dir.join("server-hosts");
    let names = hosts.join("\n");
    let same_hosts = std::fs::read_to_string(&hosts_file).is_ok_and(|h| h == names);
    if same_hosts && certs.ca.exists() && certs.cert.exists() && certs.key.exists() {
        return Ok(certs);
    }
    let (ca_key, fresh_ca) = match std::fs::read_to_string(&ca_key_file) {
        Ok(pem) if certs.ca.exists() => (
            rcgen::KeyPair::from_pem(&pem).with_context(|| format!("reading {}", ca_key_file.display()))?,
            false,
        ),
        _ => (rcgen::KeyPair::generate().context("generating the CA key")?, true),
    };
    // The same name and key sign as the kept CA certificate did.
    let ca = ca_params()?.self_signed(&ca_key).context("making the CA certificate")?;
    if fresh_ca {
        write_private(&ca_key_file, &ca_key.serialize_pem())?;
        write_file(&certs.ca, &ca.pem(), 0o644)?;
    }
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).context("server certificate names")?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        hosts.first().map_or("localhost", String::as_str),
    );
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let key = rcgen::KeyPair::generate().context("generating the server key")?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the server certificate")?;
    write_private(&certs.key, &key.serialize_pem())?;
    write_file(&certs.cert, &cert.pem(), 0o644)?;
    write_file(&hosts_file, &names, 0o644)?;
    Ok(certs)
}

fn ca_params() -> Result<rcgen::CertificateParams> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut p);
    Ok(p)
}

/// From the start of last year to ten years on: fixed per year, so a CA certificate made
/// again from its kept key says the same.
fn set_validity(p: &mut rcgen::CertificateParams) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let year = 1970 + i32::try_from(secs / 31_556_952).unwrap_or(0);
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
}

/// The names `up`'s server certificate covers: loopback, this host's name, and the hosts
/// of the listen addresses and public URLs.
pub fn up_hosts(listen: &[std::net::SocketAddr], public_urls: &[Option<&str>]) -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        hosts.push(name.trim().to_string());
    }
    for a in listen {
        if !a.ip().is_unspecified() {
            hosts.push(a.ip().to_string());
        }
    }
    for u in public_urls.iter().flatten() {
        if let Some(h) = url_host(u) {
            hosts.push(h);
        }
    }
    // A certificate names hosts in ASCII; a name it cannot carry is left out.
    hosts.retain(|h| !h.is_empty() && h.is_ascii());
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|h| seen.insert(h.clone()));
    hosts
}

fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next()?,
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    Some(host.to_string())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    write_file(path, text, 0o600)
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_covers_loopback_this_host_and_the_public_urls() {
        let hosts = up_hosts(
            &[
                "0.0.0.0:5000".parse().expect("addr"),
                "10.1.2.3:9696".parse().expect("addr"),
            ],
            &[
                Some("https://api.example.test:5000/v3"),
                Some("https://[2001:db8::5]:9696/"),
                None,
            ],
        );
        for h in [
            "localhost",
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "api.example.test",
            "2001:db8::5",
        ] {
            assert!(hosts.iter().any(|x| x == h), "{h} missing from {hosts:?}");
        }
        assert!(!hosts.iter().any(|x| x == "0.0.0.0"), "{hosts:?}");
    }

    #[test]
    fn up_certs_are_made_once_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = up_hosts(&[], &[]);
        let c = up_certs(dir.path(), &hosts).expect("certs");
        for key in [&c.key, &dir.path().join("ca-key.pem")] {
            let mode = std::fs::metadata(key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let first = std::fs::read_to_string(&c.cert).expect("cert");
        let again = up_certs(dir.path(), &hosts).expect("certs again");
        assert_eq!(std::fs::read_to_string(&again.cert).expect("cert"), first, "made again");
        // A lost server certificate is signed again by the kept CA, and so is one for
        // other hosts.
        let ca = std::fs::read_to_string(&c.ca).expect("ca");
        std::fs::remove_file(&c.cert).expect("rm");
        up_certs(dir.path(), &hosts).expect("re-signed");
        assert_eq!(std::fs::read_to_string(&c.ca).expect("ca"), ca, "the CA changed");
        let second = std::fs::read_to_string(&c.cert).expect("cert");
        assert_ne!(second, first);
        let more = up_hosts(&["192.0.2.7:5000".parse().expect("addr")], &[]);
        up_certs(dir.path(), &more).expect("other hosts");
        assert_ne!(std::fs::read_to_string(&c.cert).expect("cert"), second, "not re-signed");
        assert_eq!(std::fs::read_to_string(&c.ca).expect("ca"), ca, "the CA changed");
    }
}
