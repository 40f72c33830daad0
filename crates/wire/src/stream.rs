//! The node stream: `GET /isthmus/v1/nodes/{host}/watch` answers one JSON message per line.
//!
//! `{"type":"snapshot","revision":R,"objects":[...]}` first (everything the node needs), then
//! `{"type":"update","revision":R,"put":[...],"delete":[keys]}` on every change and
//! `{"type":"ping","revision":R}` every few seconds; after a reconnect with `?since=R`,
//! `{"type":"resume","since":R,"revision":R2,"put":[...],"delete":[...]}` when the server can
//! answer with only what changed. Each object is `{"key","kind","revision","value"}`; values
//! are the Neutron API rendering (port, network, subnet) or the node's address record.

use crate::nullable;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One message of the node stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    Snapshot {
        #[serde(default)]
        revision: i64,
        objects: Vec<Object>,
    },
    Update {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
        #[serde(default)]
        put: Vec<Object>,
        #[serde(default)]
        delete: Vec<String>,
    },
    /// The first message after a reconnect with `since`: only what changed meanwhile.
    Resume {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
        #[serde(default)]
        put: Vec<Object>,
        #[serde(default)]
        delete: Vec<String>,
    },
    /// Everything up to `revision` was sent before it.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<i64>,
    },
}

/// One object of a node's view: its store key, the revision it was written at, its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub key: String,
    #[serde(default)]
    pub revision: i64,
    #[serde(flatten)]
    pub value: ObjectValue,
}

/// An object's value, by its kind (`"kind"` on the wire, the value under `"value"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum ObjectValue {
    Port(Port),
    Network(Network),
    Subnet(Subnet),
    Node(NodeInfo),
}

impl ObjectValue {
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectValue::Port(_) => "port",
            ObjectValue::Network(_) => "network",
            ObjectValue::Subnet(_) => "subnet",
            ObjectValue::Node(_) => "node",
        }
    }
}

/// A port as Neutron renders it (with binding attributes). The fields nodes use are typed; the
/// rest is carried as is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Port {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub network_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub project_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub mac_address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_owner: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub fixed_ips: Vec<FixedIp>,
    #[serde(rename = "binding:host_id", default, deserialize_with = "nullable")]
    pub host_id: String,
    #[serde(rename = "binding:vif_type", default, deserialize_with = "nullable")]
    pub vif_type: String,
    #[serde(rename = "binding:vif_details", default)]
    pub vif_details: Value,
    /// The node's record of an attachment lives under `cni` (see [`CniProfile`]).
    #[serde(rename = "binding:profile", default)]
    pub profile: Value,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Port {
    /// The CNI attachment recorded on the port, if any (fields that are not strings read as
    /// empty).
    pub fn cni_profile(&self) -> CniProfile {
        let cni = &self.profile["cni"];
        let s = |k: &str| cni[k].as_str().unwrap_or("").to_string();
        CniProfile {
            ifname: s("ifname"),
            netns: s("netns"),
            project: s("project"),
            network: s("network"),
            pool_size: cni["pool_size"].as_u64(),
        }
    }
}

/// `binding:profile.cni` of a port attached through CNI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniProfile {
    pub ifname: String,
    pub netns: String,
    /// The CNI config's `project` and `network`, as written in the config.
    pub project: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedIp {
    #[serde(default, deserialize_with = "nullable")]
    pub subnet_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ip_address: String,
}

/// A network as Neutron renders it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Network {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub mtu: Option<u64>,
    #[serde(rename = "provider:segmentation_id", default)]
    pub segmentation_id: Option<u64>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A subnet as Neutron renders it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Subnet {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub network_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub cidr: String,
    #[serde(default)]
    pub gateway_ip: Option<String>,
    #[serde(default)]
    pub enable_dhcp: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub dns_nameservers: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub host_routes: Vec<HostRoute>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRoute {
    #[serde(default, deserialize_with = "nullable")]
    pub destination: String,
    #[serde(default, deserialize_with = "nullable")]
    pub nexthop: String,
}

/// A node hosting ports of the node's networks: where to send their traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(default, deserialize_with = "nullable")]
    pub host: String,
    #[serde(default, deserialize_with = "nullable")]
    pub underlay_ip: String,
    #[serde(default, deserialize_with = "nullable")]
    pub capabilities: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_keep_their_wire_shape() {
        let port = json!({"key": "/k/ports/p1", "kind": "port", "revision": 5, "value": {
            "id": "p1", "network_id": "n", "binding:host_id": "h", "mac_address": "fa:16:3e:00:00:01",
            "device_owner": "", "fixed_ips": [{"subnet_id": "s", "ip_address": "10.0.0.5"}],
            "admin_state_up": true, "tags": ["a"], "description": null}});
        let snap = json!({"type": "snapshot", "revision": 9, "objects": [port,
            {"key": "/k/nodes/h", "kind": "node", "revision": 3,
             "value": {"host": "h", "underlay_ip": "192.0.2.1", "capabilities": []}}]});
        let m: Message = serde_json::from_value(snap.clone()).unwrap();
        let Message::Snapshot { revision, objects } = &m else {
            panic!("{m:?}")
        };
        assert_eq!(*revision, 9);
        let ObjectValue::Port(p) = &objects[0].value else {
            panic!("{objects:?}")
        };
        assert_eq!((p.id.as_str(), p.host_id.as_str()), ("p1", "h"));
        assert_eq!(p.other["tags"], json!(["a"]));
        // Back to the same JSON, fields the node does not use included.
        let mut again = serde_json::to_value(&m).unwrap();
        for k in ["name", "project_id", "device_id", "status", "binding:vif_type"] {
            assert_eq!(again["objects"][0]["value"][k], json!(""), "{k}");
            again["objects"][0]["value"].as_object_mut().unwrap().remove(k);
        }
        for k in ["binding:vif_details", "binding:profile"] {
            again["objects"][0]["value"].as_object_mut().unwrap().remove(k);
        }
        assert_eq!(again, snap);
        let ping: Message = serde_json::from_value(json!({"type": "ping", "revision": 4})).unwrap();
        assert_eq!(ping, Message::Ping { revision: Some(4) });
        assert_eq!(
            serde_json::to_value(&ping).unwrap(),
            json!({"type": "ping", "revision": 4})
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        for bad in [
            json!({}),
            json!({"type": "weird"}),
            json!({"type": "snapshot"}),
            json!({"type": "update", "put": [{"kind": "port"}]}),
            json!({"type": "update", "delete": [1]}),
        ] {
            assert!(serde_json::from_value::<Message>(bad.clone()).is_err(), "{bad}");
        }
    }
}
