//! Bodies of the node API (`/isthmus/v1/nodes/...`). Each travels wrapped in its resource
//! name: `{"node": Heartbeat}`, `{"port": PortReport}`, `{"port": PortCreate}`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `PUT /isthmus/v1/nodes/{host}`: registers the node or heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub underlay_ip: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The agent's first heartbeat since it started.
    #[serde(default)]
    pub restarted: bool,
    /// The view revision every controller of the node has converged to (none yet: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_revision: Option<i64>,
    /// Datapath changes the node could not make, `controller: what`, bounded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// `{"node": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatBody {
    pub node: Heartbeat,
}

/// `PUT /isthmus/v1/nodes/{host}/ports/{id}`: binding details, status and the attachment
/// record of a port bound to the node. Only what is set is changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortReport {
    /// Bind an unbound port to the node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bind: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vif_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vif_details: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "binding:profile", default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Value>,
}

impl PortReport {
    pub fn status(status: &str) -> PortReport {
        PortReport {
            status: Some(status.to_string()),
            ..Default::default()
        }
    }
}

/// `POST /isthmus/v1/nodes/{host}/ports`: a port bound to the node, in `project`'s `network`
/// (each a name or an id), checked as if a member of that project had asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortCreate {
    pub project: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_ips: Option<Vec<RequestedIp>>,
    #[serde(rename = "binding:profile", default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Value>,
}

/// An address asked for at create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedIp {
    pub ip_address: String,
}

/// `{"port": ...}`, both ways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortBody<T> {
    pub port: T,
}

/// A port as the node API answers it (Neutron's rendering, not interpreted here).
pub type PortAnswer = PortBody<Map<String, Value>>;
