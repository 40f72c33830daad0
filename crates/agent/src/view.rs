//! What a node knows about the topology: its own ports, and for each network it has ports on
//! (or that a router connects to one of those), that network's other ports and the nodes
//! hosting them. Nothing about other networks.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortKind {
    /// A container: a veth pair, the peer in the workload's namespace.
    Veth,
    /// A VM: a tap device a hypervisor opens.
    Tap,
    /// A trunk's subport riding VLAN `vlan` of local VM port `parent`'s tap: a veth pair whose
    /// bridged end is the port's device and whose other end the VLAN programs redirect to.
    Subport { parent: String, vlan: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPort {
    pub id: String,
    pub network_id: String,
    pub mac: String,
    pub kind: PortKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePort {
    pub id: String,
    pub network_id: String,
    pub mac: String,
    /// Underlay address of the node hosting it.
    pub node_ip: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub id: String,
    pub vni: u32,
    pub mtu: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// This node's underlay address (VXLAN source).
    pub underlay_ip: Option<IpAddr>,
    pub networks: BTreeMap<String, NetworkInfo>,
    pub local_ports: Vec<LocalPort>,
    pub remote_ports: Vec<RemotePort>,
    /// Networks the node has no port on but a local router connects to: it routes into them,
    /// so it needs their bridge, VXLAN device and forwarding entries.
    #[serde(default)]
    pub routed: BTreeSet<String>,
}
