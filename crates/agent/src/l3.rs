//! Distributed routers as the node must have them: a pure function of the view.
//!
//! Every node with a port on a network a router is attached to routes for that router itself
//! (as Neutron's DVR does), in a namespace of its own per router: one leg per interface, a veth
//! whose router end carries the interface's MAC and gateway address and whose other end is a
//! port of the network's bridge. The router never ARPs: every port of its networks is a
//! permanent neighbour entry, so a routed packet goes from the source node straight to the node
//! of its destination over that network's VXLAN.

use crate::kernel::valid_ifname;
use crate::names;
use crate::objects::{router_networks, router_of, Objects};
pub use crate::routing::*;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

fn valid_mac(s: &str) -> bool {
    s.parse::<crate::desired::MacAddr>().is_ok()
}

/// The routers this node must run: those with an interface on a network it has a port on.
pub fn desired(objects: &Objects, node: &str) -> L3Desired {
    let mut out = L3Desired {
        node_mac: node_mac(node),
        ..Default::default()
    };
    let local: BTreeSet<&str> = objects
        .ports()
        .filter(|p| p.host_id == node && !p.id.is_empty() && router_of(p).is_none())
        .map(|p| p.network_id.as_str())
        .collect();
    let routers = router_networks(objects);
    let mine: BTreeMap<&String, &BTreeSet<String>> = routers
        .iter()
        .filter(|(_, nets)| nets.iter().any(|n| local.contains(n.as_str())))
        .collect();
    if mine.is_empty() {
        return out;
    }
    let prefix = netns_prefix(node);
    let mut by_net_ports: BTreeMap<&str, Vec<&isthmus_wire::stream::Port>> = BTreeMap::new();
    for p in objects.ports() {
        by_net_ports.entry(p.network_id.as_str()).or_default().push(p);
    }
    for (rid, nets) in mine {
        let mut r = RouterNs {
            id: rid.clone(),
            netns: format!("{prefix}{}", crate::routing::short(rid)),
            legs: BTreeMap::new(),
            neighbors: BTreeSet::new(),
        };
        for n in nets {
            let Some(net) = objects.network(n) else { continue };
            let Some(vni) = net.segmentation_id.and_then(|v| u32::try_from(v).ok()) else {
                continue;
            };
            let ports = by_net_ports.get(n.as_str()).map(Vec::as_slice).unwrap_or_default();
            for p in ports.iter().filter(|p| router_of(p) == Some(rid.as_str())) {
                // Names and MACs end up in ip and nft input: only well-formed ones.
                let (dev, outer) = leg_names(&p.id);
                if !valid_mac(&p.mac_address) || !valid_ifname(&dev) || !valid_ifname(&outer) {
                    tracing::warn!(port = %p.id, router = %rid, "router interface skipped: bad id or MAC");
                    continue;
                }
                let addresses: BTreeSet<IpNet> = p
                    .fixed_ips
                    .iter()
                    .filter_map(|f| {
                        let ip: IpAddr = f.ip_address.parse().ok()?;
                        let cidr: IpNet = objects.subnet(&f.subnet_id)?.cidr.parse().ok()?;
                        IpNet::new(ip, cidr.prefix_len()).ok()
                    })
                    .collect();
                r.legs.insert(
                    dev.clone(),
                    Leg {
                        port_id: p.id.clone(),
                        network_id: n.clone(),
                        vni,
                        bridge: names::bridge(vni),
                        mtu: net.mtu.unwrap_or(1450) as u32,
                        mac: p.mac_address.to_ascii_lowercase(),
                        addresses,
                    },
                );
                // Everyone else on the network, as permanent entries on this leg.
                for q in ports.iter().filter(|q| router_of(q) != Some(rid.as_str())) {
                    if !valid_mac(&q.mac_address) {
                        continue;
                    }
                    for f in &q.fixed_ips {
                        if let Ok(ip) = f.ip_address.parse::<IpAddr>() {
                            r.neighbors.insert(Neighbor {
                                dev: dev.clone(),
                                ip,
                                mac: q.mac_address.to_ascii_lowercase(),
                            });
                        }
                    }
                }
            }
        }
        if !r.legs.is_empty() {
            out.routers.insert(r.netns.clone(), r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_wire::stream::{Message, Object};
    use serde_json::json;

    fn obj(key: &str, kind: &str, value: serde_json::Value) -> Object {
        serde_json::from_value(json!({"key": key, "kind": kind, "revision": 1, "value": value})).unwrap()
    }

    fn port(id: &str, net: &str, host: &str, ip: &str, subnet: &str, router: Option<&str>) -> Object {
        obj(
            &format!("/isthmus/v1/ports/{id}"),
            "port",
            json!({"id": id, "network_id": net, "binding:host_id": host,
                "mac_address": format!("fa:16:3e:00:00:{}", &id[1..]),
                "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}],
                "device_owner": if router.is_some() { "network:router_interface" } else { "" },
                "device_id": router.unwrap_or("")}),
        )
    }

    fn sample() -> Objects {
        let mut objects = vec![];
        for (n, vni, s, cidr) in [
            ("na", 10, "sa", "10.1.0.0/24"),
            ("nb", 11, "sb", "10.2.0.0/24"),
            ("nc", 12, "sc", "10.3.0.0/24"),
        ] {
            objects.push(obj(
                &format!("/isthmus/v1/networks/{n}"),
                "network",
                json!({"id": n, "provider:segmentation_id": vni, "mtu": 1450}),
            ));
            objects.push(obj(
                &format!("/isthmus/v1/subnets/{s}"),
                "subnet",
                json!({"id": s, "network_id": n, "cidr": cidr, "ip_version": 4}),
            ));
        }
        objects.push(port("p01", "na", "h1", "10.1.0.5", "sa", None));
        objects.push(port("p02", "nb", "h2", "10.2.0.5", "sb", None));
        objects.push(port("p03", "nc", "h3", "10.3.0.5", "sc", None));
        objects.push(port("p11", "na", "", "10.1.0.1", "sa", Some("r1")));
        objects.push(port("p12", "nb", "", "10.2.0.1", "sb", Some("r1")));
        // A MAC that would smuggle a command into ip's batch input: left out.
        let mut bad = port("p04", "nb", "h2", "10.2.0.6", "sb", None);
        if let isthmus_wire::stream::ObjectValue::Port(p) = &mut bad.value {
            p.mac_address = "fa:16:3e:00:00:04\nneigh flush all".into();
        }
        objects.push(bad);
        let mut o = Objects::default();
        o.apply(Message::Snapshot { revision: 1, objects });
        o
    }

    #[test]
    fn a_node_runs_the_routers_of_its_networks() {
        let o = sample();
        let d = desired(&o, "h1");
        assert_eq!(d.routers.len(), 1);
        let r = d.routers.values().next().unwrap();
        assert!(r.netns.starts_with(&netns_prefix("h1")));
        assert_eq!(r.legs.len(), 2);
        let a = &r.legs["qr-p11"];
        assert_eq!(a.bridge, "isbr-10");
        assert_eq!(a.addresses, BTreeSet::from(["10.1.0.1/24".parse().unwrap()]));
        // Every other port of both networks is a neighbour, the router's own are not.
        let ips: BTreeSet<String> = r.neighbors.iter().map(|n| n.ip.to_string()).collect();
        assert_eq!(ips, BTreeSet::from(["10.1.0.5".to_string(), "10.2.0.5".to_string()]));
        let script = dvr_script(&d);
        assert!(script.contains("ether saddr set fa:16:3f:"), "{script}");
        assert!(
            script.contains("10.1.0.1") && script.contains("fa:16:3e:00:00:11"),
            "{script}"
        );
        assert_ne!(node_mac("h1"), node_mac("h2"));
        // h3 (only on nc, which no router touches) runs nothing.
        assert!(desired(&o, "h3").routers.is_empty());
        assert!(!dvr_script(&desired(&o, "h3")).contains("chain"));
        assert_eq!(desired(&o, "h2").routers.len(), 1);
    }
}
