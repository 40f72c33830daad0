//! Distributed routers as data: a router namespace with its legs and neighbours, the names
//! of the namespaces and devices, and the DVR table. Computed by the `l3` module, applied by the
//! kernel backend.

use crate::names;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// One interface of a router on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leg {
    /// The interface port's id.
    pub port_id: String,
    pub network_id: String,
    /// The network's VXLAN id and bridge (the leg's outer end joins it).
    pub vni: u32,
    pub bridge: String,
    pub mtu: u32,
    /// The interface port's MAC, on the router's end.
    pub mac: String,
    /// Gateway addresses with their subnets' prefix lengths.
    pub addresses: BTreeSet<IpNet>,
}

/// A permanent neighbour entry in a router namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbor {
    /// The leg device (router end) it is on.
    pub dev: String,
    pub ip: IpAddr,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterNs {
    pub id: String,
    /// The namespace's name (unique per node and router).
    pub netns: String,
    /// By router-end device name.
    pub legs: BTreeMap<String, Leg>,
    pub neighbors: BTreeSet<Neighbor>,
}

/// The routers of one node, by namespace name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L3Desired {
    pub routers: BTreeMap<String, RouterNs>,
    /// The source MAC of frames this node's routers send to other nodes.
    pub node_mac: String,
}

/// The agent's bridge table for distributed routing.
pub const DVR_TABLE: &str = "isthmus-dvr";

/// A node's own MAC for routed frames leaving it: every node's router legs share the
/// interface's MAC (local workloads resolve the gateway to it), so frames a router sends to
/// another node carry this one instead, or remote bridges would learn the gateway's MAC on
/// their VXLAN port and send their own workloads' traffic away. Locally administered
/// (`fa:16:3f`, as Neutron's DVR base), stable: a hash of the node's name.
pub fn node_mac(node: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in node.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    format!("fa:16:3f:{a:02x}:{b:02x}:{c:02x}")
}

/// The DVR table as one nft transaction (replacing what was there): on the way out to other
/// nodes, ARP for a gateway address is dropped (each node answers for its own legs) and frames
/// from a gateway MAC get the node's MAC. No routers: the table goes.
pub fn dvr_script(d: &L3Desired) -> String {
    let mut s = format!("table bridge {DVR_TABLE}\ndelete table bridge {DVR_TABLE}\n");
    let legs = d.routers.values().flat_map(|r| r.legs.values());
    let macs: BTreeSet<&str> = legs.clone().map(|l| l.mac.as_str()).collect();
    let ips: BTreeSet<String> = legs
        .flat_map(|l| l.addresses.iter())
        .filter(|a| a.addr().is_ipv4())
        .map(|a| a.addr().to_string())
        .collect();
    if macs.is_empty() {
        return s;
    }
    let join = |v: Vec<String>| v.join(", ");
    s.push_str(&format!("table bridge {DVR_TABLE} {{\n"));
    s.push_str(&format!(
        "    set gw_macs {{ type ether_addr; elements = {{ {} }}; }}\n",
        join(macs.iter().map(|m| m.to_string()).collect())
    ));
    if !ips.is_empty() {
        s.push_str(&format!(
            "    set gw_ips {{ type ipv4_addr; elements = {{ {} }}; }}\n",
            join(ips.into_iter().collect())
        ));
    }
    s.push_str("    chain out {\n        type filter hook postrouting priority 0; policy accept;\n");
    if d.routers
        .values()
        .any(|r| r.legs.values().any(|l| l.addresses.iter().any(|a| a.addr().is_ipv4())))
    {
        s.push_str(&format!(
            "        oifname \"{}*\" arp daddr ip @gw_ips drop comment \"a gateway is answered on each node\"\n",
            names::VXLAN_PREFIX
        ));
    }
    s.push_str(&format!(
        "        oifname \"{}*\" ether saddr @gw_macs ether saddr set {} comment \"routed here\"\n",
        names::VXLAN_PREFIX,
        d.node_mac
    ));
    s.push_str("    }\n}\n");
    s
}

/// Namespaces of this node's routers start with this (so a restarted agent finds its own).
pub fn netns_prefix(node: &str) -> String {
    format!("isr-{}-", short(node))
}

pub(crate) fn short(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect()
}

/// The router end of a leg (Neutron's `qr-` convention) and the bridge end.
pub fn leg_names(port_id: &str) -> (String, String) {
    let id: String = port_id.chars().take(11).collect();
    (format!("qr-{id}"), format!("rl-{id}"))
}
