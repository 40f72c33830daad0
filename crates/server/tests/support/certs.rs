//! Test certificates made with rcgen: a private CA and server certificates it signs, as PEM
//! files in a temporary directory. Shared by the server's and the agent's TLS tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A private CA; its certificate is in `ca_file`.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("isthmus-ca-")
            .tempdir()
            .expect("tempdir");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca cert");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write ca");
        TestCa {
            cert,
            key,
            ca_file,
            _dir: dir,
        }
    }

    /// Writes a server certificate for 127.0.0.1 and localhost, signed by this CA, and its
    /// key to `cert_file` and `key_file`.
    pub fn issue(&self, cert_file: &Path, key_file: &Path) {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        std::fs::write(cert_file, cert.pem()).expect("write cert");
        std::fs::write(key_file, key.serialize_pem()).expect("write key");
    }
}
