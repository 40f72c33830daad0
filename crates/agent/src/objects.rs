//! The node's copy of its slice of the topology, as the server's node stream delivers it, and
//! the pure functions that turn it into a [`NodeView`] and into what attaching a port needs.
//!
//! Values are typed by kind ([`isthmus_wire::stream`]); a message that does not parse is
//! refused as a whole and changes nothing. Within a parsed value, what cannot be used (a port
//! without a MAC, a network without a VNI, an unparsable address) is skipped, with the rest of
//! the view still usable.

use crate::kernel::HostRoute;
use crate::view::{LocalPort, NetworkInfo, NodeView, PortKind, RemotePort};
use ipnet::IpNet;
use isthmus_wire::stream::{self, Message, ObjectValue};
pub use isthmus_wire::stream::{FloatingIp, Network, NodeInfo, Port, Router, Subnet};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// One object of the node's view.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub revision: i64,
    pub value: ObjectValue,
}

/// The node's objects by store key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    pub by_key: BTreeMap<String, Object>,
    /// Revision of the last snapshot or update applied.
    pub revision: i64,
}

/// A stream message that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stream message: {0}")]
pub struct BadMessage(pub String);

/// What one stream message means for the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Snapshot,
    Update,
    /// The first message after a reconnect with `since`: only what changed meanwhile.
    Resume,
    Ping,
}

/// Reads one line of the node stream.
pub fn parse_message(line: &[u8]) -> Result<Message, BadMessage> {
    serde_json::from_slice(line).map_err(|e| BadMessage(e.to_string()))
}

fn entry(o: stream::Object) -> (String, Object) {
    (
        o.key,
        Object {
            revision: o.revision,
            value: o.value,
        },
    )
}

impl Objects {
    /// Applies one message of the node stream. A snapshot replaces everything.
    pub fn apply(&mut self, msg: Message) -> Applied {
        match msg {
            Message::Snapshot { revision, objects } => {
                self.by_key = objects.into_iter().map(entry).collect();
                self.revision = revision;
                Applied::Snapshot
            }
            Message::Update { revision, put, delete } => {
                self.put_delete(revision, put, delete);
                Applied::Update
            }
            Message::Resume {
                revision, put, delete, ..
            } => {
                self.put_delete(revision, put, delete);
                Applied::Resume
            }
            Message::Ping { revision } => {
                // Everything up to the ping's revision was sent before it.
                if let Some(r) = revision {
                    self.revision = self.revision.max(r);
                }
                Applied::Ping
            }
        }
    }

    fn put_delete(&mut self, revision: Option<i64>, put: Vec<stream::Object>, delete: Vec<String>) {
        for k in delete {
            self.by_key.remove(&k);
        }
        self.by_key.extend(put.into_iter().map(entry));
        if let Some(r) = revision {
            self.revision = r;
        }
    }

    /// Applies one message given as JSON; a malformed one changes nothing.
    pub fn apply_json(&mut self, msg: &Value) -> Result<Applied, BadMessage> {
        let m = <Message as serde::Deserialize>::deserialize(msg).map_err(|e| BadMessage(format!("{e} in {msg}")))?;
        Ok(self.apply(m))
    }

    pub fn ports(&self) -> impl Iterator<Item = &Port> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::Port(p) => Some(p),
            _ => None,
        })
    }

    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::Network(n) => Some(n),
            _ => None,
        })
    }

    fn subnets(&self) -> impl Iterator<Item = &Subnet> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::Subnet(s) => Some(s),
            _ => None,
        })
    }

    fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::Node(n) => Some(n),
            _ => None,
        })
    }

    pub fn routers(&self) -> impl Iterator<Item = &Router> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::Router(r) => Some(r),
            _ => None,
        })
    }

    pub fn floating_ips(&self) -> impl Iterator<Item = &FloatingIp> {
        self.by_key.values().filter_map(|o| match &o.value {
            ObjectValue::FloatingIp(f) => Some(f),
            _ => None,
        })
    }

    /// The object stored under the server's key for `collection`/`id`. Views are keyed that
    /// way, so lookups by id are one map search, not a scan (desired-state code asks often).
    fn by_id(&self, collection: &str, id: &str) -> Option<&ObjectValue> {
        self.by_key
            .get(&format!("/isthmus/v1/{collection}/{id}"))
            .map(|o| &o.value)
    }

    pub fn port(&self, id: &str) -> Option<&Port> {
        match self.by_id("ports", id) {
            Some(ObjectValue::Port(p)) if p.id == id => Some(p),
            _ => self.ports().find(|p| p.id == id),
        }
    }

    pub fn network(&self, id: &str) -> Option<&Network> {
        match self.by_id("networks", id) {
            Some(ObjectValue::Network(n)) if n.id == id => Some(n),
            _ => self.networks().find(|n| n.id == id),
        }
    }

    pub fn subnet(&self, id: &str) -> Option<&Subnet> {
        match self.by_id("subnets", id) {
            Some(ObjectValue::Subnet(s)) if s.id == id => Some(s),
            _ => self.subnets().find(|s| s.id == id),
        }
    }

    /// Underlay addresses of the nodes in the view, by host name.
    pub fn node_ips(&self) -> BTreeMap<String, IpAddr> {
        self.nodes()
            .filter(|n| !n.host.is_empty())
            .filter_map(|n| Some((n.host.clone(), n.underlay_ip.parse().ok()?)))
            .collect()
    }
}

fn network_info(n: &Network) -> Option<NetworkInfo> {
    if n.id.is_empty() {
        return None;
    }
    let vni = u32::try_from(n.segmentation_id?).ok()?;
    let mtu = n.mtu.and_then(|m| u32::try_from(m).ok()).unwrap_or(1450);
    Some(NetworkInfo {
        id: n.id.clone(),
        vni,
        mtu,
    })
}

/// `device_owner` of a trunk's subport.
pub const SUBPORT_OWNER: &str = "trunk:subport";

/// Neutron's convention: ports owned by Nova (`compute:*`) are VMs (tap devices); everything
/// else plugged by the agent is a container (veth pair).
pub fn port_kind(device_owner: &str) -> PortKind {
    if device_owner.starts_with("compute:") {
        PortKind::Tap
    } else {
        PortKind::Veth
    }
}

/// The node's view: its own ports (bound to `node`), the networks they are on, and the other
/// ports of those networks with the underlay address of the node hosting each. Ports of other
/// nodes whose address is not known, and ports without a MAC, are left out.
pub fn to_view(objects: &Objects, node: &str, underlay_ip: Option<IpAddr>) -> NodeView {
    let mut view = NodeView {
        underlay_ip,
        ..Default::default()
    };
    let node_ips = objects.node_ips();
    let mut local_nets = std::collections::BTreeSet::new();
    for p in objects.ports() {
        let (id, net, mac, host) = (&p.id, &p.network_id, &p.mac_address, &p.host_id);
        if id.is_empty() || net.is_empty() || mac.is_empty() || host != node || router_of(p).is_some() {
            continue;
        }
        let kind = match &p.subport {
            Some(s) if p.device_owner == SUBPORT_OWNER => match u16::try_from(s.segmentation_id) {
                Ok(vlan) if (1..=4094).contains(&vlan) => PortKind::Subport {
                    parent: s.parent_port_id.clone(),
                    vlan,
                },
                _ => continue,
            },
            _ => port_kind(&p.device_owner),
        };
        local_nets.insert(net.to_string());
        view.local_ports.push(LocalPort {
            id: id.clone(),
            network_id: net.clone(),
            mac: mac.to_ascii_lowercase(),
            kind,
        });
    }
    // Networks a router connects to one of ours, or of a router whose gateway is here: this
    // node routes into them.
    let snat_for: std::collections::BTreeSet<&str> = gateway_routers(objects, node).collect();
    for (r, nets) in &router_networks(objects) {
        if nets.iter().any(|n| local_nets.contains(n)) || snat_for.contains(r.as_str()) {
            view.routed
                .extend(nets.iter().filter(|n| !local_nets.contains(*n)).cloned());
        }
    }
    for net in local_nets.iter().chain(&view.routed) {
        if let Some(info) = objects.network(net).and_then(network_info) {
            view.networks.insert(net.clone(), info);
        }
    }
    view.routed.retain(|n| view.networks.contains_key(n));
    let mut pair_macs: BTreeMap<(String, String), Vec<(String, IpAddr)>> = BTreeMap::new();
    for p in objects.ports() {
        let (id, net, mac, host) = (&p.id, &p.network_id, &p.mac_address, &p.host_id);
        if id.is_empty() || mac.is_empty() || host.is_empty() || host == node || !view.networks.contains_key(net) {
            continue;
        }
        let Some(ip) = node_ips.get(host) else { continue };
        view.remote_ports.push(RemotePort {
            id: id.clone(),
            network_id: net.clone(),
            mac: mac.to_ascii_lowercase(),
            node_ip: *ip,
        });
        for pair in &p.allowed_address_pairs {
            let m = pair.mac_address.to_ascii_lowercase();
            if !m.is_empty() && m != mac.to_ascii_lowercase() && m.parse::<crate::desired::MacAddr>().is_ok() {
                pair_macs.entry((net.clone(), m)).or_default().push((id.clone(), *ip));
            }
        }
    }
    // A MAC that rides another port (an allowed address pair: a container on a macvlan in a
    // VM) is forwarded to that port's node, so it is not flooded; only when one node claims
    // it and no port has it as its own (a MAC shared by pairs on several nodes moves, and is
    // left to flooding).
    let own: std::collections::BTreeSet<(String, String)> = objects
        .ports()
        .map(|p| (p.network_id.clone(), p.mac_address.to_ascii_lowercase()))
        .collect();
    for ((net, m), claims) in pair_macs {
        let first = claims[0].1;
        if claims.iter().all(|(_, ip)| *ip == first) && !own.contains(&(net.clone(), m.clone())) {
            view.remote_ports.push(RemotePort {
                id: format!("{}/pair/{m}", claims[0].0),
                network_id: net,
                mac: m,
                node_ip: first,
            });
        }
    }
    // Routers whose SNAT node is another: their SNAT legs' MACs live there.
    let routed = router_networks(objects);
    for g in objects
        .ports()
        .filter(|p| is_gateway(p) && !p.host_id.is_empty() && p.host_id != node)
    {
        let Some(ip) = node_ips.get(&g.host_id) else { continue };
        for net in routed.get(&g.device_id).into_iter().flatten() {
            if view.networks.contains_key(net) {
                view.remote_ports.push(RemotePort {
                    id: format!("snat/{}/{net}", g.device_id),
                    network_id: net.clone(),
                    mac: crate::routing::snat_mac(&g.device_id, net),
                    node_ip: *ip,
                });
            }
        }
    }
    view
}

/// Whether a port is an interface or the gateway of a router, and of which.
pub fn router_of(p: &Port) -> Option<&str> {
    ((p.device_owner.starts_with("network:router_interface") || is_gateway(p)) && !p.device_id.is_empty())
        .then_some(p.device_id.as_str())
}

/// Whether a port is a router's gateway (its host is the router's SNAT node).
pub fn is_gateway(p: &Port) -> bool {
    p.device_owner == "network:router_gateway"
}

/// Routers whose gateway port is bound to `node` (it is their SNAT node).
pub fn gateway_routers<'a>(objects: &'a Objects, node: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    objects
        .ports()
        .filter(move |p| is_gateway(p) && p.host_id == node && !p.device_id.is_empty())
        .map(|p| p.device_id.as_str())
}

/// Router id → the networks its interface ports are on.
pub fn router_networks(objects: &Objects) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for p in objects.ports() {
        if let Some(r) = router_of(p) {
            if !p.network_id.is_empty() {
                out.entry(r.to_string()).or_default().insert(p.network_id.clone());
            }
        }
    }
    out
}

/// Status corrections for this node's ports: a port whose host device exists should be ACTIVE,
/// one whose device is gone (detached, its workload namespace vanished) DOWN. `devices` are the
/// port devices present on the node.
pub fn status_fixes(
    objects: &Objects,
    node: &str,
    devices: &std::collections::BTreeSet<String>,
) -> Vec<(String, &'static str)> {
    let mut out = vec![];
    for p in objects.ports() {
        let id = p.id.as_str();
        if id.is_empty() || p.host_id != node || router_of(p).is_some() {
            continue;
        }
        let present = devices.contains(&crate::names::tap(id));
        let status = p.status.as_str();
        if present && status != "ACTIVE" {
            out.push((id.to_string(), "ACTIVE"));
        } else if !present && status == "ACTIVE" {
            out.push((id.to_string(), "DOWN"));
        }
    }
    out
}

/// An address of a port as the workload gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAddress {
    /// With the subnet's prefix length, e.g. `10.0.0.5/24`.
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
}

/// What attaching a port needs from the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub port_id: String,
    pub network_id: String,
    pub mac: String,
    pub mtu: u32,
    pub vni: u32,
    pub addresses: Vec<PortAddress>,
    /// The default route: the gateway of the first subnet that has one.
    pub gateway: Option<IpAddr>,
    pub routes: Vec<HostRoute>,
    pub dns: Vec<String>,
}

/// Why a port cannot be planned (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("port {0} is not in this node's view")]
    NoPort(String),
    #[error("port {port} is bound to {host:?}, not to this node")]
    NotOurs { port: String, host: String },
    #[error("network {0} of the port is not in this node's view yet")]
    NoNetwork(String),
    #[error("subnet {0} of the port is not in this node's view yet")]
    NoSubnet(String),
    #[error("{0}")]
    Invalid(String),
}

impl PlanError {
    /// The view may still catch up (worth waiting for).
    pub fn transient(&self) -> bool {
        !matches!(self, PlanError::Invalid(_))
    }
}

/// Everything needed to plug port `port_id` (bound to `node`) into a workload.
pub fn port_plan(objects: &Objects, node: &str, port_id: &str) -> Result<PortPlan, PlanError> {
    let p = objects
        .port(port_id)
        .ok_or_else(|| PlanError::NoPort(port_id.to_string()))?;
    let host = p.host_id.as_str();
    if host != node {
        return Err(PlanError::NotOurs {
            port: port_id.into(),
            host: host.into(),
        });
    }
    let net_id = p.network_id.as_str();
    let net = objects
        .network(net_id)
        .and_then(network_info)
        .ok_or_else(|| PlanError::NoNetwork(net_id.to_string()))?;
    let mac = p.mac_address.to_ascii_lowercase();
    if mac.is_empty() {
        return Err(PlanError::Invalid(format!("port {port_id} has no MAC address")));
    }
    let mut plan = PortPlan {
        port_id: port_id.into(),
        network_id: net_id.into(),
        mac,
        mtu: net.mtu,
        vni: net.vni,
        addresses: vec![],
        gateway: None,
        routes: vec![],
        dns: vec![],
    };
    for fip in &p.fixed_ips {
        let sid = fip.subnet_id.as_str();
        let s = objects
            .subnet(sid)
            .ok_or_else(|| PlanError::NoSubnet(sid.to_string()))?;
        let addr: IpAddr = fip.ip_address.parse().map_err(|_| {
            let fip = serde_json::to_string(fip).unwrap_or_default();
            PlanError::Invalid(format!("port {port_id} has a bad address {fip}"))
        })?;
        let cidr: IpNet = s
            .cidr
            .parse()
            .map_err(|_| PlanError::Invalid(format!("subnet {sid} has a bad CIDR {}", Value::from(s.cidr.as_str()))))?;
        let address =
            IpNet::new(addr, cidr.prefix_len()).map_err(|_| PlanError::Invalid(format!("bad prefix for {addr}")))?;
        let gateway = s.gateway_ip.as_deref().and_then(|g| g.parse::<IpAddr>().ok());
        // Only a gateway of the same family can be a default route for this address.
        if plan.gateway.is_none() && addr.is_ipv4() {
            plan.gateway = gateway.filter(|g| g.is_ipv4());
        }
        plan.addresses.push(PortAddress { address, gateway });
        for r in &s.host_routes {
            let (Ok(destination), Ok(nexthop)) = (r.destination.parse::<IpNet>(), r.nexthop.parse::<IpAddr>()) else {
                continue;
            };
            let route = HostRoute { destination, nexthop };
            if !plan.routes.contains(&route) {
                plan.routes.push(route);
            }
        }
        plan.dns.extend(s.dns_nameservers.iter().cloned());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn port(id: &str, net: &str, host: &str, mac: &str, owner: &str, ips: Value) -> Value {
        json!({"key": format!("/isthmus/ports/{id}"), "kind": "port", "revision": 5, "value": {
            "id": id, "network_id": net, "binding:host_id": host, "mac_address": mac,
            "device_owner": owner, "fixed_ips": ips}})
    }

    fn snapshot() -> Value {
        json!({"type": "snapshot", "revision": 9, "objects": [
            {"key": "/isthmus/networks/na", "kind": "network", "revision": 1,
             "value": {"id": "na", "provider:segmentation_id": 1001, "mtu": 1450}},
            {"key": "/isthmus/subnets/sa", "kind": "subnet", "revision": 2,
             "value": {"id": "sa", "network_id": "na", "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1",
                       "host_routes": [{"destination": "172.16.0.0/16", "nexthop": "10.0.0.254"}],
                       "dns_nameservers": ["10.0.0.53"]}},
            {"key": "/isthmus/nodes/n1", "kind": "node", "revision": 3,
             "value": {"host": "n1", "underlay_ip": "192.0.2.1", "capabilities": []}},
            {"key": "/isthmus/nodes/n2", "kind": "node", "revision": 3,
             "value": {"host": "n2", "underlay_ip": "192.0.2.2", "capabilities": []}},
            port("p1", "na", "n1", "FA:16:3E:00:00:01", "", json!([{"subnet_id": "sa", "ip_address": "10.0.0.5"}])),
            port("p2", "na", "n2", "fa:16:3e:00:00:02", "compute:nova", json!([])),
            port("p3", "na", "", "fa:16:3e:00:00:03", "", json!([])),
            port("p4", "na", "n1", "fa:16:3e:00:00:04", "compute:az1", json!([])),
            port("p5", "na", "n9", "fa:16:3e:00:00:05", "", json!([])),
        ]})
    }

    fn objects() -> Objects {
        let mut o = Objects::default();
        assert_eq!(o.apply_json(&snapshot()), Ok(Applied::Snapshot));
        o
    }

    #[test]
    fn view_has_local_and_remote_ports() {
        let v = to_view(&objects(), "n1", Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            v.networks["na"],
            NetworkInfo {
                id: "na".into(),
                vni: 1001,
                mtu: 1450
            }
        );
        let local: Vec<_> = v.local_ports.iter().map(|p| (p.id.as_str(), p.kind.clone())).collect();
        assert_eq!(local, [("p1", PortKind::Veth), ("p4", PortKind::Tap)]);
        assert_eq!(v.local_ports[0].mac, "fa:16:3e:00:00:01");
        // p3 is unbound, p5's node is unknown: neither is reachable.
        assert_eq!(v.remote_ports.len(), 1);
        assert_eq!(v.remote_ports[0].id, "p2");
        assert_eq!(v.remote_ports[0].node_ip, "192.0.2.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn pair_macs_of_remote_ports_are_forwarded_to_their_node_unless_shared() {
        let mut o = objects();
        let mut vm = port("p7", "na", "n2", "fa:16:3e:00:00:07", "compute:nova", json!([]));
        vm["value"]["allowed_address_pairs"] = json!([
            {"ip_address": "10.0.0.70", "mac_address": "FA:16:3E:00:00:70"},
            {"ip_address": "10.0.0.71", "mac_address": "fa:16:3e:00:00:07"},
            {"ip_address": "10.0.0.72", "mac_address": "fa:16:3e:00:00:72"}]);
        let mut other = port("p8", "na", "n9x", "fa:16:3e:00:00:08", "", json!([]));
        other["value"]["allowed_address_pairs"] =
            json!([{"ip_address": "10.0.0.72", "mac_address": "fa:16:3e:00:00:72"}]);
        let node = json!({"key": "/isthmus/nodes/n9x", "kind": "node", "revision": 3,
            "value": {"host": "n9x", "underlay_ip": "192.0.2.9", "capabilities": []}});
        let up = json!({"type": "update", "revision": 12, "put": [vm, other, node], "delete": []});
        assert_eq!(o.apply_json(&up), Ok(Applied::Update));
        let v = to_view(&o, "n1", Some("192.0.2.1".parse().unwrap()));
        let macs: Vec<(&str, IpAddr)> = v.remote_ports.iter().map(|p| (p.mac.as_str(), p.node_ip)).collect();
        // The pair MAC of p7 goes to n2; its own MAC once; the MAC two nodes claim is flooded.
        assert!(
            macs.contains(&("fa:16:3e:00:00:70", "192.0.2.2".parse().unwrap())),
            "{macs:?}"
        );
        assert_eq!(macs.iter().filter(|(m, _)| *m == "fa:16:3e:00:00:07").count(), 1);
        assert!(!macs.iter().any(|(m, _)| *m == "fa:16:3e:00:00:72"), "{macs:?}");
    }

    #[test]
    fn a_node_without_local_ports_gets_an_empty_view() {
        let v = to_view(&objects(), "n2x", None);
        assert!(v.networks.is_empty() && v.local_ports.is_empty() && v.remote_ports.is_empty());
    }

    #[test]
    fn updates_put_and_delete_and_snapshots_replace() {
        let mut o = objects();
        let up = json!({"type": "update", "revision": 12,
            "put": [port("p6", "na", "n2", "fa:16:3e:00:00:06", "", json!([]))],
            "delete": ["/isthmus/ports/p2"]});
        assert_eq!(o.apply_json(&up), Ok(Applied::Update));
        assert_eq!(o.revision, 12);
        let v = to_view(&o, "n1", None);
        let remote: Vec<_> = v.remote_ports.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(remote, ["p6"]);
        assert_eq!(o.apply_json(&json!({"type": "ping"})), Ok(Applied::Ping));
        assert_eq!(
            o.apply_json(&json!({"type": "ping", "revision": 14})),
            Ok(Applied::Ping)
        );
        assert_eq!(o.revision, 14, "a ping vouches for everything before it");
        let resume = json!({"type": "resume", "since": 14, "revision": 17, "put": [], "delete": ["/isthmus/ports/p6"]});
        assert_eq!(o.apply_json(&resume), Ok(Applied::Resume));
        assert_eq!(o.revision, 17);
        assert!(to_view(&o, "n1", None).remote_ports.is_empty());
        let snap = json!({"type": "snapshot", "revision": 20, "objects": []});
        o.apply_json(&snap).unwrap();
        assert!(o.by_key.is_empty());
        assert_eq!(o.revision, 20);
    }

    #[test]
    fn garbage_is_rejected_without_changing_the_map() {
        let mut o = objects();
        let before = o.clone();
        for bad in [
            json!({}),
            json!({"type": "weird"}),
            json!({"type": "snapshot"}),
            json!({"type": "update", "put": [{"kind": "port"}]}),
            json!({"type": "update", "delete": [1]}),
        ] {
            assert!(o.apply_json(&bad).is_err(), "{bad}");
        }
        assert_eq!(o, before);
    }

    #[test]
    fn networks_without_a_vni_are_left_out() {
        let mut o = objects();
        o.apply_json(
            &json!({"type": "update", "put": [{"key": "/isthmus/networks/na", "kind": "network",
            "revision": 30, "value": {"id": "na", "mtu": 1450}}], "delete": []}),
        )
        .unwrap();
        let v = to_view(&o, "n1", Some("192.0.2.1".parse().unwrap()));
        assert!(v.networks.is_empty());
        assert!(crate::desired::compute(&v).bridges.is_empty());
    }

    #[test]
    fn statuses_follow_the_devices() {
        let mut o = objects();
        o.apply_json(&json!({"type": "update", "put": [
            {"key": "/isthmus/ports/p7", "kind": "port", "revision": 40, "value": {
                "id": "p7", "network_id": "na", "binding:host_id": "n1", "mac_address": "fa:16:3e:00:00:07",
                "device_owner": "", "status": "ACTIVE", "fixed_ips": []}}], "delete": []}))
            .unwrap();
        // p1 (no status yet) has a device, p7 (ACTIVE) lost its; p4 (a VM port) has its tap;
        // p2 is remote.
        let devices = [
            crate::names::tap("p1"),
            crate::names::tap("p2"),
            crate::names::tap("p4"),
        ]
        .into_iter()
        .collect();
        let fixes = status_fixes(&o, "n1", &devices);
        let want = [("p1", "ACTIVE"), ("p4", "ACTIVE"), ("p7", "DOWN")].map(|(p, s)| (p.to_string(), s));
        assert_eq!(fixes, want);
    }

    #[test]
    fn port_plan_has_addresses_routes_and_mtu() {
        let plan = port_plan(&objects(), "n1", "p1").unwrap();
        assert_eq!(plan.mac, "fa:16:3e:00:00:01");
        assert_eq!((plan.mtu, plan.vni), (1450, 1001));
        assert_eq!(plan.addresses.len(), 1);
        assert_eq!(plan.addresses[0].address.to_string(), "10.0.0.5/24");
        assert_eq!(plan.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(plan.routes.len(), 1);
        assert_eq!(plan.routes[0].destination.to_string(), "172.16.0.0/16");
        assert_eq!(plan.dns, ["10.0.0.53"]);
    }

    #[test]
    fn port_plan_errors() {
        let o = objects();
        assert_eq!(port_plan(&o, "n1", "nope"), Err(PlanError::NoPort("nope".into())));
        assert!(matches!(port_plan(&o, "n1", "p2"), Err(PlanError::NotOurs { .. })));
        let mut o2 = o.clone();
        o2.apply_json(&json!({"type": "update", "put": [], "delete": ["/isthmus/subnets/sa"]}))
            .unwrap();
        assert_eq!(port_plan(&o2, "n1", "p1"), Err(PlanError::NoSubnet("sa".into())));
        assert!(PlanError::NoSubnet("sa".into()).transient());
        let mut o3 = o.clone();
        o3.apply_json(&json!({"type": "update", "put": [
            port("p1", "na", "n1", "fa:16:3e:00:00:01", "", json!([{"subnet_id": "sa", "ip_address": "bogus"}]))],
            "delete": []}))
            .unwrap();
        let e = port_plan(&o3, "n1", "p1").unwrap_err();
        assert!(!e.transient(), "{e}");
    }
}
