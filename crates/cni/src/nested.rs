//! The nested modes (`"mode": "nested-vlan"` or `"nested-macvlan"`): the plugin runs inside a
//! VM and asks the control plane's nested API for the container's port, with a credential
//! scoped to the VM's trunk, instead of asking a node agent.
//!
//! This module holds the pure parts: the config, the credential file's checks, the mapping of
//! API failures to CNI codes, the result and CHECK's comparison. The binary does the HTTP
//! calls and the netlink work.

use crate::{
    add_result, code, invalid_config, required_str, CniError, SpecVersion, DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS,
};
use ipnet::IpNet;
use isthmus_wire::nested::{Attachment, NestedMode};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MODE_VLAN: &str = "nested-vlan";
pub const MODE_MACVLAN: &str = "nested-macvlan";
/// Longest credential file read; a real one is well under 200 bytes.
const MAX_CREDENTIAL: u64 = 4096;

/// The network config of a nested mode.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedConfig {
    pub cni_version: SpecVersion,
    pub name: String,
    pub mode: NestedMode,
    /// `http://host:port` or `https://...`, without the `/isthmus/v1/...` path.
    pub api_url: String,
    pub credential_file: PathBuf,
    pub network_id: String,
    /// The VM's NIC the container's device rides (e.g. `eth0`).
    pub parent_interface: String,
    /// PEM file of the CA that signed the API's certificate (`https://` only).
    pub ca_file: Option<PathBuf>,
    /// Bound on each HTTP request and on the whole invocation.
    pub timeout: Duration,
    pub prev_result: Option<Value>,
}

/// `None` when the config names no `mode` (or is not a JSON object): the node agent's path,
/// which reports its own errors. `Some(Err)` for a nested config that is not valid.
pub fn detect(stdin: &[u8]) -> Option<Result<NestedConfig, CniError>> {
    let Ok(Value::Object(raw)) = serde_json::from_slice::<Value>(stdin) else {
        return None;
    };
    if matches!(raw.get("mode"), None | Some(Value::Null)) {
        return None;
    }
    Some(parse_nested(&raw))
}

fn parse_nested(raw: &Map<String, Value>) -> Result<NestedConfig, CniError> {
    let version = required_str(raw, "cniVersion")?;
    let cni_version = SpecVersion::parse(&version).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
        )
    })?;
    let name = required_str(raw, "name")?;
    let mode = match required_str(raw, "mode")?.as_str() {
        MODE_VLAN => NestedMode::Vlan,
        MODE_MACVLAN => NestedMode::Macvlan,
        other => {
            return Err(invalid_config(format!(
                "network config 'mode' must be {MODE_VLAN:?} or {MODE_MACVLAN:?} (or absent), not {other:?}"
            )))
        }
    };
    let Some(Value::Object(n)) = raw.get("nested") else {
        return Err(invalid_config(
            "network config 'nested' must be an object with api_url, credential_file, network_id and parent_interface",
        ));
    };
    let field = |k: &str| match n.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(invalid_config(format!(
            "network config 'nested.{k}' must be a non-empty string"
        ))),
    };
    let api_url = field("api_url")?.trim_end_matches('/').to_string();
    let https = api_url.starts_with("https://");
    if !https && !api_url.starts_with("http://") {
        return Err(invalid_config(format!(
            "network config 'nested.api_url' must start with http:// or https://, not {api_url:?}"
        )));
    }
    let ca_file = match n.get("ca_file") {
        None | Some(Value::Null) => None,
        Some(_) => Some(PathBuf::from(field("ca_file")?)),
    };
    if ca_file.is_some() && !https {
        return Err(invalid_config(
            "network config 'nested.ca_file' needs an https:// api_url",
        ));
    }
    let parent_interface = field("parent_interface")?;
    if parent_interface.len() > 15 || parent_interface.contains(['/', ':', ' ']) {
        return Err(invalid_config(format!(
            "network config 'nested.parent_interface' {parent_interface:?} is not an interface name"
        )));
    }
    let timeout_secs = match raw.get("timeout_secs") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(v) => v
            .as_u64()
            .filter(|s| (1..=MAX_TIMEOUT_SECS).contains(s))
            .ok_or_else(|| {
                invalid_config(format!(
                    "network config 'timeout_secs' must be an integer from 1 to {MAX_TIMEOUT_SECS}, not {v}"
                ))
            })?,
    };
    Ok(NestedConfig {
        cni_version,
        name,
        mode,
        api_url,
        credential_file: PathBuf::from(field("credential_file")?),
        network_id: field("network_id")?,
        parent_interface,
        ca_file,
        timeout: Duration::from_secs(timeout_secs),
        prev_result: raw.get("prevResult").filter(|v| !v.is_null()).cloned(),
    })
}

/// Reads `<id>.<secret>` from the credential file. The file must not be readable by everyone;
/// no error ever carries its content.
pub fn read_credential(path: &Path) -> Result<String, CniError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let unreadable = |e: std::io::Error| {
        invalid_config(format!("cannot read the trunk credential file {shown}")).with_details(e.to_string())
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(invalid_config(format!(
            "the trunk credential file {shown} is not a regular file"
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Err(invalid_config(format!(
            "the trunk credential file {shown} is readable by everyone (mode {mode:03o}); make it 0600"
        )));
    }
    let mut text = String::new();
    file.take(MAX_CREDENTIAL)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    let cred = text.trim();
    let well_formed = cred
        .split_once('.')
        .is_some_and(|(id, secret)| !id.is_empty() && !secret.is_empty())
        && cred.bytes().all(|b| b.is_ascii_graphic());
    if !well_formed {
        return Err(invalid_config(format!(
            "the trunk credential file {shown} does not hold <id>.<secret>"
        )));
    }
    Ok(cred.to_string())
}

/// Why a call to the nested API failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status, if an answer came.
    pub status: Option<u16>,
    /// No answer: connection refused or reset, or the timeout passed.
    pub unreachable: bool,
    pub message: String,
}

/// Nested API failure → CNI error. Unreachable or overloaded (409, 429, 502-504) → 11, the
/// runtime retries; 401/403 → 7 (the credential is wrong for this trunk, retrying will not
/// help); other 4xx → 7; anything else → 101.
pub fn api_error(what: &str, e: &ApiError) -> CniError {
    let code = match (e.unreachable, e.status) {
        (true, _) | (_, Some(409 | 429 | 502 | 503 | 504)) => code::TRY_AGAIN_LATER,
        (_, Some(400..=499)) => code::INVALID_CONFIG,
        _ => code::ATTACH_FAILED,
    };
    let status = e.status.map_or_else(String::new, |s| format!(" (status {s})"));
    CniError::new(code, format!("nested API: {what} failed{status}")).with_details(e.message.clone())
}

/// The attachment's addresses as `ip/prefix`.
pub fn addresses(att: &Attachment) -> Result<Vec<IpNet>, CniError> {
    att.addresses
        .iter()
        .map(|a| {
            IpNet::new(a.ip_address, a.prefix_len).map_err(|_| {
                CniError::new(
                    code::DECODE_FAILURE,
                    format!(
                        "nested API returned an invalid prefix /{} for {}",
                        a.prefix_len, a.ip_address
                    ),
                )
            })
        })
        .collect()
}

/// Checks that the API answered with what the config asked for.
pub fn check_attachment(config: &NestedConfig, att: &Attachment) -> Result<(), CniError> {
    let bad = |why: String| CniError::new(code::DECODE_FAILURE, format!("nested API answer: {why}"));
    if att.mode != config.mode {
        return Err(bad(format!("mode {:?}, asked for {:?}", att.mode, config.mode)));
    }
    if config.mode == NestedMode::Vlan && !att.vlan.is_some_and(|v| (1..=4094).contains(&v)) {
        return Err(bad(format!(
            "vlan mode without a VLAN id from 1 to 4094 ({:?})",
            att.vlan
        )));
    }
    if att.mtu < 68 {
        return Err(bad(format!("MTU {}", att.mtu)));
    }
    addresses(att).map(|_| ())
}

/// The ADD result, in the same form as the node agent's path gives.
pub fn add_output(
    version: SpecVersion,
    att: &Attachment,
    ifname: &str,
    netns: &str,
    prev: Option<&Value>,
) -> Result<String, CniError> {
    let ips: Vec<Value> = att
        .addresses
        .iter()
        .map(|a| {
            json!({"address": format!("{}/{}", a.ip_address, a.prefix_len),
                   "gateway": a.gateway.map(|g| g.to_string())})
        })
        .collect();
    let routes: Vec<Value> = att
        .routes
        .iter()
        .map(|r| json!({"destination": r.destination, "nexthop": r.nexthop.to_string()}))
        .collect();
    let reply = json!({
        "ok": true,
        "port_id": att.port_id,
        "interface": ifname,
        "mac": att.mac_address,
        "ips": ips,
        "mtu": att.mtu,
        "routes": routes,
        "dns_nameservers": att.dns_nameservers,
    });
    let Value::Object(reply) = reply else {
        return Err(CniError::new(code::DECODE_FAILURE, "cannot build the result"));
    };
    let result = add_result(version, &reply, ifname, netns, prev)?;
    serde_json::to_string(&result)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("cannot encode the result: {e}")))
}

/// The interface as CHECK found it in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub mac: Option<String>,
    pub up: bool,
    pub addresses: Vec<IpNet>,
}

/// CHECK: the container's interface has the attachment's MAC and addresses and is up.
pub fn check_observed(att: &Attachment, ifname: &str, seen: Option<&Observed>) -> Result<(), CniError> {
    let failed = |why: String| CniError::new(code::CHECK_FAILED, format!("{ifname}: {why}"));
    let Some(seen) = seen else {
        return Err(failed("no such interface in the container".into()));
    };
    let want_mac = att.mac_address.to_ascii_lowercase();
    if seen.mac.as_deref().map(str::to_ascii_lowercase).as_deref() != Some(want_mac.as_str()) {
        return Err(failed(format!("MAC {:?}, the port's is {want_mac}", seen.mac)));
    }
    if !seen.up {
        return Err(failed("down".into()));
    }
    for a in addresses(att)? {
        if !seen.addresses.contains(&a) {
            return Err(failed(format!("lacks {a}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_wire::nested::{AttachmentAddress, AttachmentRoute};
    use std::os::unix::fs::PermissionsExt;

    fn conf() -> Value {
        json!({"cniVersion": "1.0.0", "name": "n", "type": "isthmus-cni", "mode": "nested-vlan",
               "nested": {"api_url": "http://10.0.2.2:8080/", "credential_file": "/etc/isthmus/trunk-credential",
                          "network_id": "7b1c", "parent_interface": "eth0", "ca_file": null}})
    }

    fn attachment() -> Attachment {
        Attachment {
            port_id: "p1".into(),
            network_id: "7b1c".into(),
            mode: NestedMode::Vlan,
            mac_address: "fa:16:3e:00:00:01".into(),
            vlan: Some(101),
            mtu: 1450,
            addresses: vec![AttachmentAddress {
                ip_address: "10.9.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("10.9.0.1".parse().unwrap()),
            }],
            routes: vec![AttachmentRoute {
                destination: "172.16.0.0/12".into(),
                nexthop: "10.9.0.254".parse().unwrap(),
            }],
            dns_nameservers: vec!["10.1.1.1".into()],
        }
    }

    #[test]
    fn a_config_without_mode_is_the_agents() {
        let plain = json!({"cniVersion": "1.0.0", "name": "n", "network": "x", "project": "p"});
        assert!(detect(&serde_json::to_vec(&plain).unwrap()).is_none());
        assert!(detect(b"not json").is_none());
    }

    #[test]
    fn nested_config_parses() {
        let c = detect(&serde_json::to_vec(&conf()).unwrap()).unwrap().unwrap();
        assert_eq!(c.mode, NestedMode::Vlan);
        assert_eq!(c.api_url, "http://10.0.2.2:8080");
        assert_eq!(c.parent_interface, "eth0");
        assert_eq!(c.ca_file, None);
        assert_eq!(c.timeout, Duration::from_secs(DEFAULT_TIMEOUT_SECS));
    }

    #[test]
    fn bad_nested_configs_are_code_7() {
        let cases: Vec<(&str, Value)> = vec![
            ("mode", json!("nested-vxlan")),
            ("nested", json!(null)),
            (
                "nested",
                json!({"api_url": "ftp://x", "credential_file": "/c", "network_id": "n", "parent_interface": "eth0"}),
            ),
            (
                "nested",
                json!({"api_url": "http://x", "credential_file": "/c", "network_id": "n", "parent_interface": "eth0", "ca_file": "/ca.pem"}),
            ),
            (
                "nested",
                json!({"api_url": "http://x", "credential_file": "/c", "parent_interface": "eth0"}),
            ),
            (
                "nested",
                json!({"api_url": "http://x", "credential_file": "/c", "network_id": "n", "parent_interface": "a/b"}),
            ),
        ];
        for (key, value) in cases {
            let mut c = conf();
            c[key] = value.clone();
            let e = detect(&serde_json::to_vec(&c).unwrap()).unwrap().unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{key}={value}: {e:?}");
        }
    }

    #[test]
    fn credential_file_checks() {
        let dir = tempfile_dir();
        let path = dir.join("cred");
        let missing = read_credential(&path).unwrap_err();
        assert_eq!(missing.code, code::INVALID_CONFIG);
        std::fs::write(&path, "c1d2.s3cr3t-value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = read_credential(&path).unwrap_err();
        assert_eq!(open.code, code::INVALID_CONFIG);
        assert!(open.msg.contains("readable by everyone"), "{open:?}");
        assert!(!open.to_json("1.0.0").contains("s3cr3t"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_credential(&path).unwrap(), "c1d2.s3cr3t-value");
        std::fs::write(&path, "no-dot-s3cr3t").unwrap();
        let bad = read_credential(&path).unwrap_err();
        assert!(!bad.to_json("1.0.0").contains("s3cr3t"), "{bad:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("isthmus-cni-cred-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn api_errors_map_to_cni_codes() {
        let e = |status, unreachable| ApiError {
            status,
            unreachable,
            message: "m".into(),
        };
        assert_eq!(api_error("x", &e(None, true)).code, code::TRY_AGAIN_LATER);
        assert_eq!(api_error("x", &e(Some(503), false)).code, code::TRY_AGAIN_LATER);
        assert_eq!(api_error("x", &e(Some(401), false)).code, code::INVALID_CONFIG);
        assert_eq!(api_error("x", &e(Some(404), false)).code, code::INVALID_CONFIG);
        assert_eq!(api_error("x", &e(Some(500), false)).code, code::ATTACH_FAILED);
    }

    #[test]
    fn add_result_has_the_agents_shape() {
        let out = add_output(SpecVersion::V100, &attachment(), "eth1", "/proc/7/ns/net", None).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0",
                   "interfaces": [{"name": "eth1", "mac": "fa:16:3e:00:00:01", "sandbox": "/proc/7/ns/net"}],
                   "ips": [{"address": "10.9.0.5/24", "gateway": "10.9.0.1", "interface": 0}],
                   "routes": [{"dst": "172.16.0.0/12", "gw": "10.9.0.254"}],
                   "dns": {"nameservers": ["10.1.1.1"]}})
        );
    }

    #[test]
    fn answers_are_checked_against_the_config() {
        let c = detect(&serde_json::to_vec(&conf()).unwrap()).unwrap().unwrap();
        assert!(check_attachment(&c, &attachment()).is_ok());
        let mut no_vlan = attachment();
        no_vlan.vlan = None;
        assert_eq!(check_attachment(&c, &no_vlan).unwrap_err().code, code::DECODE_FAILURE);
        let mut other = attachment();
        other.mode = NestedMode::Macvlan;
        assert!(check_attachment(&c, &other).is_err());
    }

    #[test]
    fn check_compares_mac_state_and_addresses() {
        let att = attachment();
        let good = Observed {
            mac: Some("FA:16:3E:00:00:01".into()),
            up: true,
            addresses: vec!["10.9.0.5/24".parse().unwrap(), "fe80::1/64".parse().unwrap()],
        };
        assert!(check_observed(&att, "eth1", Some(&good)).is_ok());
        assert_eq!(check_observed(&att, "eth1", None).unwrap_err().code, code::CHECK_FAILED);
        let mut wrong = good.clone();
        wrong.addresses.clear();
        assert_eq!(
            check_observed(&att, "eth1", Some(&wrong)).unwrap_err().code,
            code::CHECK_FAILED
        );
        let mut down = good;
        down.up = false;
        assert!(check_observed(&att, "eth1", Some(&down)).is_err());
    }
}
