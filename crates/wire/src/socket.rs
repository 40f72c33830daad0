//! The agent's local socket: one JSON request per line, one JSON reply line each.
//!
//! Requests carry `op`: `attach`, `detach`, `status` (tools and tests) and the CNI plugin's
//! `cni_add`, `cni_del`, `cni_check`, `cni_gc`, `cni_status`. Replies are `{"ok":true,...}` or
//! [`ErrorReply`] (`{"ok":false,"code":N,"message":...,"cni_code"?:N}`).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::IpAddr;

/// Largest `pool_size` a CNI config may ask for.
pub const MAX_POOL_SIZE: u64 = 64;

/// One request to the agent. Field order is the wire order (`op` first).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Plug a port bound to this node into the namespace at `netns`.
    Attach {
        port_id: String,
        netns: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        ifname: Option<String>,
    },
    Detach {
        port_id: String,
    },
    Status,
    CniAdd(CniAdd),
    CniDel(CniDel),
    CniCheck(CniCheck),
    CniGc(CniGc),
    CniStatus,
}

/// CNI ADD as the plugin forwards it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CniAdd {
    pub container_id: String,
    pub ifname: String,
    /// `CNI_NETNS` as the runtime gave it (recorded on the port).
    pub netns: String,
    /// The plugin's `/proc/<pid>/fd/<n>` for the namespace it opened: reachable whatever
    /// mount namespace the agent runs in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_fd: Option<String>,
    pub network: String,
    pub project: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The config's `poolSize` (0 to [`MAX_POOL_SIZE`]), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CniDel {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<String>,
    pub network: String,
    pub project: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CniCheck {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_fd: Option<String>,
    pub network: String,
    pub project: String,
    pub prev_result: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CniGc {
    pub network: String,
    pub project: String,
    pub valid: Vec<ValidAttachment>,
}

/// An attachment the runtime still knows (GC keeps it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

/// Why a request line is refused (the agent answers 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    /// A CNI request's field: the plugin reports CNI error 7 (invalid config).
    pub cni: bool,
}

impl RequestError {
    fn new(message: impl Into<String>) -> Self {
        RequestError {
            message: message.into(),
            cni: false,
        }
    }

    fn cni(self) -> Self {
        RequestError { cni: true, ..self }
    }
}

fn field<'a>(req: &'a Value, name: &str) -> Result<Option<&'a str>, RequestError> {
    match &req[name] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(RequestError::new(format!("'{name}' must be a string, not {other}"))),
    }
}

fn required<'a>(req: &'a Value, name: &str) -> Result<&'a str, RequestError> {
    field(req, name)?.ok_or_else(|| RequestError::new(format!("'{name}' is required")))
}

fn cni_field(req: &Value, name: &str) -> Result<Option<String>, RequestError> {
    Ok(field(req, name).map_err(RequestError::cni)?.map(str::to_string))
}

fn cni_required(req: &Value, name: &str) -> Result<String, RequestError> {
    Ok(required(req, name).map_err(RequestError::cni)?.to_string())
}

/// The (container id, interface) an attachment is known by; the interface defaults to eth0.
fn attachment(req: &Value) -> Result<(String, String), RequestError> {
    let cid = cni_required(req, "container_id")?;
    let ifname = cni_field(req, "ifname")?.unwrap_or_else(|| "eth0".into());
    Ok((cid, ifname))
}

impl Request {
    /// Reads a request, with a message naming the first field that is missing or of the wrong
    /// type (the agent's answer to a bad request).
    pub fn from_json(req: &Value) -> Result<Request, RequestError> {
        if !req.is_object() {
            return Err(RequestError::new("request must be a JSON object"));
        }
        Ok(match field(req, "op")? {
            Some("attach") => Request::Attach {
                port_id: required(req, "port_id")?.to_string(),
                netns: required(req, "netns")?.to_string(),
                ifname: field(req, "ifname")?.map(str::to_string),
            },
            Some("detach") => Request::Detach {
                port_id: required(req, "port_id")?.to_string(),
            },
            Some("status") => Request::Status,
            Some("cni_add") => {
                let (container_id, ifname) = attachment(req)?;
                let netns = cni_required(req, "netns")?;
                let netns_fd = cni_field(req, "netns_fd")?;
                let mut ips = vec![];
                for ip in req["ips"].as_array().into_iter().flatten() {
                    let parsed = ip.as_str().and_then(|s| s.parse().ok());
                    ips.push(parsed.ok_or_else(|| RequestError::new(format!("{ip} is not an IP address")).cni())?);
                }
                Request::CniAdd(CniAdd {
                    container_id,
                    ifname,
                    netns,
                    netns_fd,
                    network: cni_required(req, "network")?,
                    project: cni_required(req, "project")?,
                    ips,
                    mac: cni_field(req, "mac")?,
                    pool_size: match &req["pool_size"] {
                        Value::Null => None,
                        v => Some(v.as_u64().filter(|n| *n <= MAX_POOL_SIZE).ok_or_else(|| {
                            RequestError::new(format!("pool_size must be 0 to {MAX_POOL_SIZE}, not {v}")).cni()
                        })?),
                    },
                })
            }
            Some("cni_del") => {
                let (container_id, ifname) = attachment(req)?;
                Request::CniDel(CniDel {
                    container_id,
                    ifname,
                    netns: req["netns"].as_str().map(str::to_string),
                    network: req["network"].as_str().unwrap_or("").to_string(),
                    project: req["project"].as_str().unwrap_or("").to_string(),
                })
            }
            Some("cni_check") => {
                let (container_id, ifname) = attachment(req)?;
                Request::CniCheck(CniCheck {
                    container_id,
                    ifname,
                    netns: cni_required(req, "netns")?,
                    netns_fd: cni_field(req, "netns_fd")?,
                    network: req["network"].as_str().unwrap_or("").to_string(),
                    project: req["project"].as_str().unwrap_or("").to_string(),
                    prev_result: req["prev_result"].clone(),
                })
            }
            Some("cni_gc") => {
                let network = cni_required(req, "network")?;
                let project = cni_required(req, "project")?;
                let mut valid = vec![];
                for v in req["valid"].as_array().into_iter().flatten() {
                    let (container_id, ifname) = attachment(v)?;
                    valid.push(ValidAttachment { container_id, ifname });
                }
                Request::CniGc(CniGc {
                    network,
                    project,
                    valid,
                })
            }
            Some("cni_status") => Request::CniStatus,
            Some(op) => {
                return Err(RequestError::new(format!(
                    "unknown op {op:?} (use attach, detach, status or cni_add, cni_del, cni_check, cni_gc, cni_status)"
                )))
            }
            None => return Err(RequestError::new("'op' is required")),
        })
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Always false.
    pub ok: bool,
    /// HTTP-like: 400 bad request, 404 unknown, 409 busy, 503 no server or view yet, 500 failure.
    pub code: u16,
    pub message: String,
    /// For CNI requests: the CNI error code, when the agent knows better than the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_code: Option<u32>,
}

/// An address of an attached port, with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyIp {
    /// `10.0.0.5/24`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyRoute {
    pub destination: String,
    #[serde(default)]
    pub nexthop: Option<String>,
}

/// `attach` and `cni_add` succeeded: what the workload got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReply {
    pub ok: bool,
    #[serde(default)]
    pub port_id: Option<String>,
    /// The interface in the workload's namespace.
    #[serde(default)]
    pub interface: Option<String>,
    /// The host end (veth or tap).
    #[serde(default)]
    pub host_interface: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub ips: Option<Vec<ReplyIp>>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub routes: Option<Vec<ReplyRoute>>,
    #[serde(default)]
    pub dns_nameservers: Option<Vec<String>>,
    /// `cni_add` only: the namespace path as the runtime named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// `detach` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachReply {
    pub ok: bool,
    pub port_id: String,
    pub host_interface: String,
}

/// `status`: whether the agent has the server's view, at which revision, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub ok: bool,
    pub node: String,
    pub underlay_ip: String,
    pub synced: bool,
    pub revision: i64,
    pub local_ports: Vec<String>,
    pub networks: Vec<String>,
    pub remote_ports: usize,
}

/// `cni_del` succeeded: the ports deleted (none when nothing was attached).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelReply {
    pub ok: bool,
    pub released: Vec<String>,
}

/// `cni_check` succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReply {
    pub ok: bool,
    pub port_id: String,
}

/// `cni_gc` succeeded: the attachments it removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReply {
    pub ok: bool,
    pub removed: Vec<Removed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub port_id: String,
    pub container_id: String,
    pub ifname: String,
}

/// A success with nothing to say (`cni_status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkReply {
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_round_trip_and_bad_ones_name_the_field() {
        let add = Request::CniAdd(CniAdd {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            netns_fd: Some("/proc/1/fd/3".into()),
            network: "net".into(),
            project: "p".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            mac: None,
            pool_size: Some(0),
        });
        let v = serde_json::to_value(&add).unwrap();
        assert_eq!(v["op"], "cni_add");
        assert_eq!(v["ips"], json!(["10.0.0.5"]));
        assert_eq!(Request::from_json(&v), Ok(add));
        let e = Request::from_json(&json!({"op": "cni_add", "container_id": "c"})).unwrap_err();
        assert_eq!((e.message.as_str(), e.cni), ("'netns' is required", true));
        let e = Request::from_json(&json!({"op": "attach", "port_id": 5})).unwrap_err();
        assert_eq!(
            (e.message.as_str(), e.cni),
            ("'port_id' must be a string, not 5", false)
        );
        let e = Request::from_json(&json!({"op": "cni_add", "container_id": "c", "netns": "/x",
            "network": "n", "project": "p", "pool_size": 65}))
        .unwrap_err();
        assert!(e.message.contains("pool_size must be 0 to 64"), "{e:?}");
    }
}
