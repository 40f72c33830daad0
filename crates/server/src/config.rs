//! Server configuration. Defaults give a working all-in-one server on loopback.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Keystone-compatible identity listener.
    pub identity_listen: SocketAddr,
    /// Neutron-compatible network listener.
    pub network_listen: SocketAddr,
    /// URL advertised in the catalog for the network service (unversioned). Derived from
    /// `network_listen` when unset.
    pub network_public_url: Option<String>,
    /// URL advertised in the catalog for identity. Derived from `identity_listen` when unset.
    pub identity_public_url: Option<String>,
    /// Token lifetime in seconds.
    pub token_ttl_secs: u64,
    /// Bootstrap admin: created on first start if absent.
    pub admin_user: String,
    /// Never logged.
    #[serde(skip_serializing)]
    pub admin_password: Option<String>,
    pub admin_project: String,
    pub region: String,
    /// Segmentation ids (VXLAN VNIs) handed to networks, inclusive.
    pub vni_min: u32,
    pub vni_max: u32,
    /// Underlay MTU; tenant networks get this minus the VXLAN overhead (50).
    pub underlay_mtu: u32,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Argon2 memory cost in KiB for password hashes.
    pub password_hash_kib: u32,
    /// A node is reported not alive this long after its last heartbeat (its liveness lease's
    /// TTL). Agents heartbeat every 20 s by default; Neutron's own default is 75 s.
    pub agent_down_secs: i64,
    /// Most fixed IPs one port may ask for (Neutron's `max_fixed_ips_per_port`).
    pub max_fixed_ips_per_port: usize,
    /// Most allowed address pairs on one port (Neutron's `max_allowed_address_pair`).
    pub max_allowed_address_pair: usize,
    /// Most tags on one resource.
    pub max_tags_per_resource: usize,
    /// Longest tag, in characters (Neutron: 255).
    pub max_tag_length: usize,
    /// A client must send a request's headers within this many seconds (of connecting, or of
    /// the request's first byte on a kept-alive connection).
    pub header_read_timeout_secs: u64,
    /// A request's body must arrive within this many seconds of its headers.
    pub body_read_timeout_secs: u64,
    /// A connection with no request running and no traffic for this long is closed. Node
    /// watch streams ping more often than this.
    pub idle_timeout_secs: u64,
    /// Connections served at once per listener; more wait to be accepted.
    pub max_connections: usize,
    /// Accept a loopback underlay address in node heartbeats: only for a single-machine
    /// deployment (`isthmus up`), where no tunnel ever leaves the host.
    pub allow_loopback_underlay: bool,
    /// Store revisions of history kept for watches; older history is compacted. A watcher
    /// further behind (a server's cache after a long disconnect) relists.
    pub store_compact_window: i64,
    /// How often the compactor looks, seconds.
    pub store_compact_interval_secs: u64,
    /// Default quota limits that differ from Neutron's (resource → limit, -1 unlimited), e.g.
    /// `port = -1`. Projects without their own limits get these.
    pub quota_defaults: std::collections::BTreeMap<String, i64>,
    /// Certificate chain (PEM, leaf first) both listeners serve HTTPS with; with
    /// `tls_key_file`. Re-read on SIGHUP.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// Private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Serve plain HTTP on a non-loopback address. Without TLS the server listens only on
    /// loopback unless this says so (passwords and tokens would cross the network in clear).
    pub insecure_http: bool,
    /// Directory of token signing keys (see `identity::keys`), shared by every server of a
    /// deployment. Created with a first key if it has none. Unset: one key kept in memory.
    pub token_key_dir: Option<std::path::PathBuf>,
    /// How often the key directory is read again, seconds (also on SIGHUP).
    pub token_key_reload_secs: u64,
    /// On shutdown, how long requests in flight may take before the server exits anyway.
    pub shutdown_drain_secs: u64,
}

/// Neutron's default quota limits (`neutron.conf [QUOTAS]`); -1 is unlimited.
pub const NEUTRON_QUOTA_DEFAULTS: &[(&str, i64)] = &[
    ("network", 100),
    ("subnet", 100),
    ("port", 500),
    ("router", 10),
    ("floatingip", 50),
    ("security_group", 10),
    ("security_group_rule", 100),
    ("subnetpool", -1),
    ("rbac_policy", 10),
];

impl Default for Config {
    fn default() -> Self {
        Self {
            identity_listen: "127.0.0.1:5000".parse().expect("static address"),
            network_listen: "127.0.0.1:9696".parse().expect("static address"),
            network_public_url: None,
            identity_public_url: None,
            token_ttl_secs: 3600,
            admin_user: "admin".into(),
            admin_password: None,
            admin_project: "admin".into(),
            region: "RegionOne".into(),
            vni_min: 1000,
            vni_max: 999_999,
            underlay_mtu: 1500,
            max_body_bytes: 1024 * 1024,
            password_hash_kib: 19 * 1024,
            agent_down_secs: 60,
            max_fixed_ips_per_port: 5,
            max_allowed_address_pair: 10,
            max_tags_per_resource: 50,
            max_tag_length: 255,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 4096,
            allow_loopback_underlay: false,
            store_compact_window: 10_000,
            store_compact_interval_secs: 60,
            quota_defaults: Default::default(),
            tls_cert_file: None,
            tls_key_file: None,
            insecure_http: false,
            token_key_dir: None,
            token_key_reload_secs: 60,
            shutdown_drain_secs: 30,
        }
    }
}

// Written by hand so the admin password never reaches a log line.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("identity_listen", &self.identity_listen)
            .field("network_listen", &self.network_listen)
            .field("network_public_url", &self.network_public_url)
            .field("identity_public_url", &self.identity_public_url)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("admin_user", &self.admin_user)
            .field("admin_password", &self.admin_password.as_ref().map(|_| "<redacted>"))
            .field("admin_project", &self.admin_project)
            .field("region", &self.region)
            .field("vni_min", &self.vni_min)
            .field("vni_max", &self.vni_max)
            .field("underlay_mtu", &self.underlay_mtu)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("password_hash_kib", &self.password_hash_kib)
            .field("agent_down_secs", &self.agent_down_secs)
            .field("max_fixed_ips_per_port", &self.max_fixed_ips_per_port)
            .field("max_allowed_address_pair", &self.max_allowed_address_pair)
            .field("max_tags_per_resource", &self.max_tags_per_resource)
            .field("max_tag_length", &self.max_tag_length)
            .field("header_read_timeout_secs", &self.header_read_timeout_secs)
            .field("body_read_timeout_secs", &self.body_read_timeout_secs)
            .field("idle_timeout_secs", &self.idle_timeout_secs)
            .field("max_connections", &self.max_connections)
            .field("allow_loopback_underlay", &self.allow_loopback_underlay)
            .field("store_compact_window", &self.store_compact_window)
            .field("store_compact_interval_secs", &self.store_compact_interval_secs)
            .field("quota_defaults", &self.quota_defaults)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("insecure_http", &self.insecure_http)
            .field("token_key_dir", &self.token_key_dir)
            .field("token_key_reload_secs", &self.token_key_reload_secs)
            .field("shutdown_drain_secs", &self.shutdown_drain_secs)
            .finish()
    }
}

impl Config {
    /// The default limit of quota resource `resource`: configured, else Neutron's, else
    /// unlimited.
    pub fn quota_default(&self, resource: &str) -> i64 {
        self.quota_defaults.get(resource).copied().unwrap_or_else(|| {
            NEUTRON_QUOTA_DEFAULTS
                .iter()
                .find(|(r, _)| *r == resource)
                .map_or(-1, |(_, l)| *l)
        })
    }

    /// Sets every default quota limit to unlimited: for tests and benchmarks that make more
    /// objects in one project than Neutron's defaults allow.
    pub fn unlimited_quotas(&mut self) {
        for (r, _) in NEUTRON_QUOTA_DEFAULTS {
            self.quota_defaults.insert((*r).to_string(), -1);
        }
    }

    /// The compactor's settings.
    pub fn compaction(&self) -> isthmus_store::CompactionPolicy {
        isthmus_store::CompactionPolicy {
            window: self.store_compact_window,
            interval: std::time::Duration::from_secs(self.store_compact_interval_secs),
        }
    }

    /// Refuses settings that would only fail later, with a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.vni_min == 0 || self.vni_max > 16_777_215 || self.vni_min > self.vni_max {
            return Err(format!(
                "vni_min/vni_max must be a range within 1..=16777215 (got {}..={})",
                self.vni_min, self.vni_max
            ));
        }
        if self.underlay_mtu < 576 + 50 || self.underlay_mtu > 65_535 {
            return Err(format!(
                "underlay_mtu {} is out of range (626..=65535)",
                self.underlay_mtu
            ));
        }
        for (r, l) in &self.quota_defaults {
            if *l < -1 || *l > i64::from(i32::MAX) {
                return Err(format!(
                    "quota_defaults.{r} = {l}: a limit is -1 (unlimited) or 0..=2147483647"
                ));
            }
        }
        if self.token_ttl_secs == 0 {
            return Err("token_ttl_secs must be positive".into());
        }
        if self.max_body_bytes < 1024 {
            return Err(format!(
                "max_body_bytes {} is too small (at least 1024)",
                self.max_body_bytes
            ));
        }
        if self.agent_down_secs <= 0 {
            return Err("agent_down_secs must be positive".into());
        }
        if self.header_read_timeout_secs == 0 || self.body_read_timeout_secs == 0 || self.idle_timeout_secs == 0 {
            return Err(
                "header_read_timeout_secs, body_read_timeout_secs and idle_timeout_secs must be positive".into(),
            );
        }
        if self.store_compact_window < 1 || self.store_compact_interval_secs == 0 {
            return Err("store_compact_window and store_compact_interval_secs must be positive".into());
        }
        if self.token_key_reload_secs == 0 {
            return Err("token_key_reload_secs must be positive".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be positive".into());
        }
        check_advertised("identity", self.identity_listen, self.identity_public_url.as_deref())?;
        check_advertised("network", self.network_listen, self.network_public_url.as_deref())?;
        self.check_tls()?;
        Ok(())
    }

    /// Whether the listeners serve HTTPS.
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    fn check_tls(&self) -> Result<(), String> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), Some(_)) => {
                // Nothing answers plain HTTP there: clients sent to it would only fail.
                for (service, url) in [
                    ("identity", &self.identity_public_url),
                    ("network", &self.network_public_url),
                ] {
                    if let Some(u) = url.as_deref().filter(|u| u.starts_with("http://")) {
                        return Err(format!(
                            "{service}_public_url '{u}' is plain http, but the listeners serve HTTPS: use https://"
                        ));
                    }
                }
                return Ok(());
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err("--tls-cert and --tls-key (tls_cert_file, tls_key_file) go together".into())
            }
            (None, None) => {}
        }
        if self.insecure_http {
            return Ok(());
        }
        for (service, listen) in [("identity", self.identity_listen), ("network", self.network_listen)] {
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "{service}_listen {listen} is not a loopback address and no TLS certificate is set: \
                     give --tls-cert and --tls-key (tls_cert_file, tls_key_file), or --insecure-http \
                     (insecure_http) to send passwords and tokens in clear"
                ));
            }
        }
        Ok(())
    }

    fn scheme(&self) -> &'static str {
        if self.tls() {
            "https"
        } else {
            "http"
        }
    }

    /// The network endpoint as advertised: always ending in `/`.
    pub fn network_url(&self, bound: Option<SocketAddr>) -> String {
        match &self.network_public_url {
            Some(u) => format!("{}/", u.trim_end_matches('/')),
            None => format!("{}://{}/", self.scheme(), bound.unwrap_or(self.network_listen)),
        }
    }
    /// The identity v3 URL as advertised: the public URL given with or without its `/v3`.
    pub fn identity_url(&self, bound: Option<SocketAddr>) -> String {
        match &self.identity_public_url {
            Some(u) => {
                let u = u.trim_end_matches('/');
                if u.ends_with("/v3") {
                    u.to_string()
                } else {
                    format!("{u}/v3")
                }
            }
            None => format!("{}://{}/v3", self.scheme(), bound.unwrap_or(self.identity_listen)),
        }
    }
    pub fn tenant_mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(50)
    }
}

/// Clients find the services through the catalog, so an address they cannot connect to
/// (a wildcard, or no URL at all) must never be advertised.
fn check_advertised(service: &str, listen: SocketAddr, public: Option<&str>) -> Result<(), String> {
    let flag = format!("--{service}-public-url (config: {service}_public_url)");
    let Some(url) = public else {
        if listen.ip().is_unspecified() {
            return Err(format!(
                "{service}_listen {listen} is a wildcard address, which clients cannot connect to: \
                 set the URL they should use with {flag}"
            ));
        }
        return Ok(());
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{flag}: '{url}' is not an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(format!("{flag}: '{url}' has no host"));
    }
    if host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return Err(format!(
            "{flag}: '{url}' is a wildcard address, which clients cannot connect to"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_defaults_are_neutrons_unless_configured() {
        let mut c = Config::default();
        assert_eq!((c.quota_default("network"), c.quota_default("port")), (100, 500));
        assert_eq!(c.quota_default("no-such-thing"), -1);
        c.quota_defaults.insert("port".into(), 7);
        assert_eq!(c.quota_default("port"), 7);
        c.unlimited_quotas();
        assert_eq!((c.quota_default("network"), c.quota_default("port")), (-1, -1));
    }

    #[test]
    fn defaults_are_valid_and_nonsense_is_refused() {
        assert!(Config::default().validate().is_ok());
        let bad = [
            Config {
                vni_min: 10,
                vni_max: 5,
                ..Config::default()
            },
            Config {
                vni_max: 16_777_216,
                ..Config::default()
            },
            Config {
                underlay_mtu: 100,
                ..Config::default()
            },
            Config {
                token_ttl_secs: 0,
                ..Config::default()
            },
            Config {
                quota_defaults: [("port".to_string(), -2)].into(),
                ..Config::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }

    #[test]
    fn wildcard_listen_needs_a_public_url() {
        let wild = Config {
            identity_listen: "0.0.0.0:5000".parse().expect("addr"),
            network_listen: "[::]:9696".parse().expect("addr"),
            ..Config::default()
        };
        let e = wild.validate().expect_err("wildcard without a public URL");
        assert!(e.contains("--identity-public-url"), "{e}");
        let e = Config {
            identity_public_url: Some("http://10.0.0.5:5000/v3".into()),
            ..wild.clone()
        }
        .validate()
        .expect_err("network still a wildcard");
        assert!(e.contains("--network-public-url"), "{e}");
        let ok = Config {
            insecure_http: true,
            identity_public_url: Some("http://10.0.0.5:5000".into()),
            network_public_url: Some("http://[2001:db8::5]:9696".into()),
            ..wild.clone()
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.identity_url(None), "http://10.0.0.5:5000/v3");
        assert_eq!(ok.network_url(None), "http://[2001:db8::5]:9696/");
        for bad in ["http://0.0.0.0:9696/", "http://[::]:9696", "ftp://x/", "http:///v2.0"] {
            let c = Config {
                network_public_url: Some(bad.into()),
                ..ok.clone()
            };
            assert!(c.validate().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn plain_http_only_on_loopback_unless_told() {
        let open = Config {
            network_listen: "10.0.0.5:9696".parse().expect("addr"),
            ..Config::default()
        };
        let e = open.validate().expect_err("plain HTTP on a routable address");
        assert!(e.contains("--tls-cert") && e.contains("--insecure-http"), "{e}");
        let insecure = Config {
            insecure_http: true,
            ..open.clone()
        };
        assert_eq!(insecure.validate(), Ok(()));
        assert_eq!(insecure.network_url(None), "http://10.0.0.5:9696/");
        let tls = Config {
            tls_cert_file: Some("/etc/isthmus/cert.pem".into()),
            tls_key_file: Some("/etc/isthmus/key.pem".into()),
            ..open.clone()
        };
        assert_eq!(tls.validate(), Ok(()));
        assert_eq!(tls.network_url(None), "https://10.0.0.5:9696/");
        assert_eq!(tls.identity_url(None), "https://127.0.0.1:5000/v3");
        let e = Config {
            network_public_url: Some("http://10.0.0.5:9696/".into()),
            ..tls.clone()
        }
        .validate()
        .expect_err("an http URL for an https listener");
        assert!(e.contains("use https://"), "{e}");
        let half = Config {
            tls_key_file: None,
            ..tls
        };
        assert!(half.validate().expect_err("cert without key").contains("go together"));
    }

    #[test]
    fn debug_never_shows_the_admin_password() {
        let c = Config {
            admin_password: Some("s3cret-value".into()),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("s3cret-value"));
    }
}
