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
// Ports are most of what a view holds: boxing them would cost an allocation each to save
// space on the rarer kinds.
#[allow(clippy::large_enum_variant)]
pub enum ObjectValue {
    Port(Port),
    Network(Network),
    Subnet(Subnet),
    Node(NodeInfo),
    /// A security group used by one of the node's local ports (key
    /// `/isthmus/v1/security_groups/<id>`).
    #[serde(rename = "security_group")]
    SecurityGroup(SecurityGroup),
    /// A rule of such a group (key `/isthmus/v1/security_group_rules/<id>`).
    #[serde(rename = "security_group_rule")]
    SecurityGroupRule(SecurityGroupRule),
    /// One port's addresses as a member of a group that a rule the node enforces names as
    /// its remote group (key `/isthmus/v1/group_members/<group id>/<port id>`; made by the
    /// server, not stored).
    #[serde(rename = "group_member")]
    GroupMember(GroupMember),
    /// A router with a port on a network the node sees (key `/isthmus/v1/routers/<id>`).
    Router(Router),
    /// A floating IP on an external network the node sees (key
    /// `/isthmus/v1/floatingips/<id>`).
    #[serde(rename = "floatingip")]
    FloatingIp(FloatingIp),
    /// A QoS policy (with its rules) that a local port or its network names (key
    /// `/isthmus/v1/qos_policies/<id>`).
    #[serde(rename = "qos_policy")]
    QosPolicy(QosPolicy),
}

impl ObjectValue {
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectValue::Port(_) => "port",
            ObjectValue::Network(_) => "network",
            ObjectValue::Subnet(_) => "subnet",
            ObjectValue::Node(_) => "node",
            ObjectValue::SecurityGroup(_) => "security_group",
            ObjectValue::SecurityGroupRule(_) => "security_group_rule",
            ObjectValue::GroupMember(_) => "group_member",
            ObjectValue::Router(_) => "router",
            ObjectValue::FloatingIp(_) => "floatingip",
            ObjectValue::QosPolicy(_) => "qos_policy",
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
    #[serde(default, deserialize_with = "nullable")]
    pub security_groups: Vec<String>,
    /// Neutron's default is on; absent reads as on.
    #[serde(default)]
    pub port_security_enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub allowed_address_pairs: Vec<AddressPair>,
    /// Set while the port is a trunk's subport (node views only).
    #[serde(rename = "isthmus:subport", default, skip_serializing_if = "Option::is_none")]
    pub subport: Option<SubportOf>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Where a subport rides: its trunk's parent port (on the same node) and the VLAN id there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubportOf {
    #[serde(default)]
    pub trunk_id: String,
    pub parent_port_id: String,
    pub segmentation_id: u32,
}

/// An allowed address pair: an address or CIDR the port may also send from, with the MAC it
/// may use for it (empty: the port's own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPair {
    #[serde(default, deserialize_with = "nullable")]
    pub ip_address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub mac_address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecurityGroup {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub project_id: String,
    /// Neutron's default is stateful; absent reads as stateful.
    #[serde(default)]
    pub stateful: Option<bool>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A rule as Neutron renders it. For ICMP, `port_range_min`/`max` are the type and code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecurityGroupRule {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub security_group_id: String,
    /// `ingress` or `egress`.
    #[serde(default, deserialize_with = "nullable")]
    pub direction: String,
    /// `IPv4` or `IPv6`.
    #[serde(default, deserialize_with = "nullable")]
    pub ethertype: String,
    /// A name (`tcp`, `icmp`, ...) or a number as a string; `None`: any.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port_range_min: Option<u32>,
    #[serde(default)]
    pub port_range_max: Option<u32>,
    #[serde(default)]
    pub remote_ip_prefix: Option<String>,
    #[serde(default)]
    pub remote_group_id: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A member of a remote group: the port's fixed IPs and allowed-address-pair addresses
/// (addresses or CIDRs), whichever node or network it is on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMember {
    #[serde(default, deserialize_with = "nullable")]
    pub security_group_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub port_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
}

/// A QoS policy as Neutron renders it, with its rules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QosPolicy {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub rules: Vec<QosRule>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// One rule of a QoS policy; `kind` (`type` on the wire) says which fields mean something.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QosRule {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    /// `egress` (what the workload sends) or `ingress` (what it receives).
    #[serde(default, deserialize_with = "nullable")]
    pub direction: String,
    #[serde(default)]
    pub max_kbps: Option<u64>,
    #[serde(default)]
    pub max_burst_kbps: Option<u64>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// `qos_policy_id` of a rendered port or network (carried untyped among its other fields).
fn qos_policy_of(other: &Map<String, Value>) -> Option<&str> {
    other
        .get("qos_policy_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

impl Network {
    /// The network's QoS policy, if any.
    pub fn qos_policy_id(&self) -> Option<&str> {
        qos_policy_of(&self.other)
    }
}

impl Port {
    /// The port's own QoS policy, if any (its network's applies otherwise).
    pub fn qos_policy_id(&self) -> Option<&str> {
        qos_policy_of(&self.other)
    }

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

/// A router as Neutron renders it (what the datapath uses of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Router {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default)]
    pub admin_state_up: Option<bool>,
    #[serde(default)]
    pub external_gateway_info: Option<GatewayInfo>,
    #[serde(default, deserialize_with = "nullable")]
    pub routes: Vec<HostRoute>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayInfo {
    #[serde(default, deserialize_with = "nullable")]
    pub network_id: String,
    #[serde(default)]
    pub enable_snat: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub external_fixed_ips: Vec<FixedIp>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A floating IP as Neutron renders it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FloatingIp {
    #[serde(default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub floating_network_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub floating_ip_address: String,
    #[serde(default)]
    pub port_id: Option<String>,
    #[serde(default)]
    pub fixed_ip_address: Option<String>,
    #[serde(default)]
    pub router_id: Option<String>,
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
        for k in [
            "binding:vif_details",
            "binding:profile",
            "security_groups",
            "port_security_enabled",
            "allowed_address_pairs",
        ] {
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
    fn security_objects_parse_with_neutron_defaults() {
        let sg: Object = serde_json::from_value(json!({"key": "/k/security_groups/g", "kind": "security_group",
            "value": {"id": "g", "name": "default", "project_id": "p", "security_group_rules": []}}))
        .unwrap();
        let ObjectValue::SecurityGroup(g) = &sg.value else {
            panic!("{sg:?}")
        };
        assert_eq!(g.stateful, None);
        let r: Object = serde_json::from_value(
            json!({"key": "/k/security_group_rules/r", "kind": "security_group_rule",
            "value": {"id": "r", "security_group_id": "g", "direction": "ingress", "ethertype": "IPv4",
                      "protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
                      "remote_ip_prefix": null, "remote_group_id": "g"}}),
        )
        .unwrap();
        let ObjectValue::SecurityGroupRule(r) = &r.value else {
            panic!("{r:?}")
        };
        assert_eq!((r.port_range_min, r.remote_group_id.as_deref()), (Some(22), Some("g")));
        let m: Object = serde_json::from_value(json!({"key": "/k/group_members/g/p", "kind": "group_member",
            "value": {"security_group_id": "g", "port_id": "p", "addresses": ["10.0.0.5", "10.0.9.0/24"]}}))
        .unwrap();
        assert_eq!(m.value.kind(), "group_member");
        let p: Port = serde_json::from_value(json!({"id": "p", "security_groups": null,
            "allowed_address_pairs": [{"ip_address": "10.0.0.100"}]}))
        .unwrap();
        assert!(p.security_groups.is_empty());
        assert_eq!(p.port_security_enabled, None);
        assert_eq!(p.allowed_address_pairs[0].mac_address, "");
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
