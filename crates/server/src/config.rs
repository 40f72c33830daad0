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
    /// A node whose last heartbeat is older than this is reported as not alive.
    pub agent_down_secs: i64,
    /// Most fixed IPs one port may ask for (Neutron's `max_fixed_ips_per_port`).
    pub max_fixed_ips_per_port: usize,
    /// Most allowed address pairs on one port (Neutron's `max_allowed_address_pair`).
    pub max_allowed_address_pair: usize,
    /// Most tags on one resource.
    pub max_tags_per_resource: usize,
    /// Longest tag, in characters.
    pub max_tag_length: usize,
}

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
            agent_down_secs: 30,
            max_fixed_ips_per_port: 5,
            max_allowed_address_pair: 10,
            max_tags_per_resource: 50,
            max_tag_length: 60,
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
            .finish()
    }
}

impl Config {
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
        Ok(())
    }

    pub fn network_url(&self, bound: Option<SocketAddr>) -> String {
        self.network_public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/", bound.unwrap_or(self.network_listen)))
    }
    pub fn identity_url(&self, bound: Option<SocketAddr>) -> String {
        self.identity_public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/v3", bound.unwrap_or(self.identity_listen)))
    }
    pub fn tenant_mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(50)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
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
