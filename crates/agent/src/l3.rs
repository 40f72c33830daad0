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
use crate::objects::{gateway_routers, is_gateway, router_networks, router_of, Objects};
pub use crate::routing::*;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

fn valid_mac(s: &str) -> bool {
    s.parse::<crate::desired::MacAddr>().is_ok()
}

/// The routers this node must run: those with an interface on a network it has a port on.
/// Physical network name → the host bridge it is mapped to on this node.
pub type PhysicalNetworks = BTreeMap<String, String>;

pub fn desired(objects: &Objects, node: &str, physical: &PhysicalNetworks) -> L3Desired {
    let mut out = L3Desired::default();
    let local: BTreeSet<&str> = objects
        .ports()
        .filter(|p| p.host_id == node && !p.id.is_empty() && router_of(p).is_none())
        .map(|p| p.network_id.as_str())
        .collect();
    let snat_for: BTreeSet<&str> = gateway_routers(objects, node).collect();
    let routers = router_networks(objects);
    let mine: BTreeMap<&String, &BTreeSet<String>> = routers
        .iter()
        .filter(|(r, nets)| nets.iter().any(|n| local.contains(n.as_str())) || snat_for.contains(r.as_str()))
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
            external: None,
            snat_legs: BTreeMap::new(),
            snat: None,
            fips: BTreeSet::new(),
            default: None,
            routes: BTreeSet::new(),
        };
        for n in nets {
            let Some(net) = objects.network(n) else { continue };
            let Some(vni) = net.segmentation_id.and_then(|v| u32::try_from(v).ok()) else {
                continue;
            };
            let ports = by_net_ports.get(n.as_str()).map(Vec::as_slice).unwrap_or_default();
            for p in ports.iter().filter(|p| router_of(p) == Some(rid.as_str())) {
                let (dev, outer) = leg_names(&p.id);
                if !valid_mac(&p.mac_address) || !valid_ifname(&dev) || !valid_ifname(&outer) {
                    tracing::warn!(port = %p.id, router = %rid, "router interface skipped: bad id or MAC");
                    continue;
                }
                r.legs.insert(
                    dev.clone(),
                    Leg {
                        port_id: p.id.clone(),
                        network_id: n.clone(),
                        vni,
                        bridge: names::bridge(vni),
                        mtu: net.mtu.unwrap_or(1450) as u32,
                        mac: leg_mac(node, &p.id),
                        addresses: port_addresses(objects, p),
                        ra: advertised(objects, p),
                    },
                );
                let mut shortcut = Shortcut {
                    vxlan: names::vxlan(vni),
                    macs: ports
                        .iter()
                        .filter(|q| !q.host_id.is_empty() && q.host_id != node && router_of(q).is_none())
                        .filter_map(|q| q.mac_address.parse().ok())
                        .collect(),
                };
                if shortcut.macs.len() > SHORTCUT_MAX_MACS {
                    tracing::debug!(network = %n, remote = shortcut.macs.len(), "too many remote ports for a routing shortcut");
                    shortcut.macs.clear();
                }
                out.shortcuts.insert(outer.clone(), shortcut);
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
        if r.legs.is_empty() {
            continue;
        }
        north_south(objects, node, physical, &mut r);
        out.routers.insert(r.netns.clone(), r);
    }
    out
}

/// The IPv6 subnets of an interface port that routers advertise, with their mode.
fn advertised(objects: &Objects, p: &isthmus_wire::stream::Port) -> BTreeSet<(IpNet, RaMode)> {
    p.fixed_ips
        .iter()
        .filter_map(|f| {
            let s = objects.subnet(&f.subnet_id)?;
            let mode = RaMode::parse(s.other.get("ipv6_ra_mode")?.as_str()?)?;
            let cidr: IpNet = s.cidr.parse().ok()?;
            cidr.addr().is_ipv6().then_some((cidr, mode))
        })
        .collect()
}

/// A port's fixed IPs with their subnets' prefix lengths.
fn port_addresses(objects: &Objects, p: &isthmus_wire::stream::Port) -> BTreeSet<IpNet> {
    p.fixed_ips
        .iter()
        .filter_map(|f| {
            let ip: IpAddr = f.ip_address.parse().ok()?;
            let cidr: IpNet = objects.subnet(&f.subnet_id)?.cidr.parse().ok()?;
            IpNet::new(ip, cidr.prefix_len()).ok()
        })
        .collect()
}

/// The router's gateway, SNAT, floating IPs and static routes as this node serves them.
fn north_south(objects: &Objects, node: &str, physical: &PhysicalNetworks, r: &mut RouterNs) {
    let Some(router) = objects.routers().find(|x| x.id == r.id) else {
        return;
    };
    r.routes = router
        .routes
        .iter()
        .filter_map(|h| Some((h.destination.parse().ok()?, h.nexthop.parse().ok()?)))
        .collect();
    let Some(gw) = router
        .external_gateway_info
        .as_ref()
        .filter(|g| !g.network_id.is_empty())
    else {
        return;
    };
    let gw_port = objects
        .ports()
        .find(|p| is_gateway(p) && p.device_id == r.id && p.network_id == gw.network_id);
    let snat_host = gw_port.map(|p| p.host_id.as_str()).filter(|h| !h.is_empty());
    let here = snat_host == Some(node);
    // Floating IPs of this node's ports, through this router.
    let local_fixed: BTreeSet<&str> = objects
        .ports()
        .filter(|p| p.host_id == node && router_of(p).is_none())
        .map(|p| p.id.as_str())
        .collect();
    for f in objects.floating_ips() {
        if f.router_id.as_deref() != Some(r.id.as_str()) || f.floating_network_id != gw.network_id {
            continue;
        }
        let Some(port) = f.port_id.as_deref().filter(|p| local_fixed.contains(p)) else {
            continue;
        };
        let _ = port;
        let (Ok(floating), Some(Ok(fixed))) = (
            f.floating_ip_address.parse::<Ipv4Addr>(),
            f.fixed_ip_address.as_deref().map(str::parse::<Ipv4Addr>),
        ) else {
            continue;
        };
        r.fips.insert((floating, fixed));
    }
    // The external leg: on the SNAT node, or where floating IPs live.
    let ext_net = objects.network(&gw.network_id);
    let physnet = ext_net
        .and_then(|n| n.other.get("provider:physical_network"))
        .and_then(|v| v.as_str());
    let bridge = physnet.and_then(|p| physical.get(p));
    let gw_addr = gw_port.and_then(|p| port_addresses(objects, p).into_iter().find(|a| a.addr().is_ipv4()));
    let upstream = gw_port
        .and_then(|p| p.fixed_ips.first())
        .and_then(|f| objects.subnet(&f.subnet_id))
        .and_then(|s| s.gateway_ip.as_deref())
        .and_then(|g| g.parse::<Ipv4Addr>().ok());
    if here || !r.fips.is_empty() {
        match bridge {
            None => tracing::warn!(
                router = %r.id,
                physical_network = physnet.unwrap_or("?"),
                "no bridge mapped for the router's external network on this node: no gateway or floating IPs here"
            ),
            Some(bridge) => {
                let (dev, outer) = external_names(&r.id);
                let mut addresses: BTreeSet<IpNet> = r
                    .fips
                    .iter()
                    .map(|(f, _)| IpNet::new(IpAddr::V4(*f), 32).expect("a /32 is valid"))
                    .collect();
                let mut mac = fip_mac(&r.id, node);
                if here {
                    addresses.extend(gw_addr);
                    if let Some(p) = gw_port.filter(|p| valid_mac(&p.mac_address)) {
                        mac = p.mac_address.to_ascii_lowercase();
                    }
                }
                r.external = Some(ExternalLeg {
                    dev,
                    outer,
                    bridge: bridge.clone(),
                    mac,
                    mtu: ext_net.and_then(|n| n.mtu).unwrap_or(1500) as u32,
                    addresses,
                    gateway: upstream,
                });
            }
        }
    }
    if here && r.external.is_some() {
        if gw.enable_snat.unwrap_or(true) {
            r.snat = gw_addr.and_then(|a| match a.addr() {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            });
        }
        r.default = upstream.map(DefaultRoute::External);
        for leg in r.legs.values() {
            let (dev, outer) = snat_names(&leg.port_id);
            r.snat_legs.insert(
                dev,
                SnatLeg {
                    outer,
                    bridge: leg.bridge.clone(),
                    mac: snat_mac(&r.id, &leg.network_id),
                    mtu: leg.mtu,
                },
            );
        }
    } else if snat_host.is_some() && !here {
        // Outbound traffic without a floating IP goes to the SNAT node's leg on the first
        // internal network.
        if let Some((dev, leg)) = r
            .legs
            .iter()
            .find(|(_, l)| l.addresses.iter().any(|a| a.addr().is_ipv4()))
        {
            r.neighbors.insert(Neighbor {
                dev: dev.clone(),
                ip: IpAddr::V4(SNAT_NEXTHOP),
                mac: snat_mac(&r.id, &leg.network_id),
            });
            r.default = Some(DefaultRoute::SnatNode { dev: dev.clone() });
        }
    }
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
        let d = desired(&o, "h1", &Default::default());
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
        // Each node's copy of a gateway has its own MAC; the DVR table does not change with it.
        assert_eq!(a.mac, leg_mac("h1", "p11"));
        assert_ne!(leg_mac("h1", "p11"), leg_mac("h2", "p11"));
        assert!(a.mac.starts_with("f6:"));
        let script = dvr_script(&d);
        assert!(script.contains("== f6:00:00:00:00:00 ether type arp drop"), "{script}");
        let mut other = d.clone();
        other.routers.values_mut().for_each(|r| {
            r.legs.values_mut().for_each(|l| l.addresses.clear());
        });
        assert_eq!(dvr_script(&other), script);
        // h3 (only on nc, which no router touches) runs nothing.
        assert!(desired(&o, "h3", &Default::default()).routers.is_empty());
        assert!(!dvr_script(&desired(&o, "h3", &Default::default())).contains("chain"));
        assert_eq!(desired(&o, "h2", &Default::default()).routers.len(), 1);
    }

    #[test]
    fn routed_frames_for_other_nodes_ports_get_a_shortcut_per_leg() {
        let o = sample();
        let d = desired(&o, "h1", &Default::default());
        let mac = |s: &str| s.parse::<crate::desired::MacAddr>().unwrap();
        // Leg on nb: p02 is on h2; p04's MAC is no MAC; the router's own port is no target.
        let b = &d.shortcuts["rl-p12"];
        assert_eq!(b.vxlan, "isvx-11");
        assert_eq!(b.macs, BTreeSet::from([mac("fa:16:3e:00:00:02")]));
        // Leg on na: its only port is local, so no program at all.
        assert!(d.shortcuts["rl-p11"].macs.is_empty());
        assert_eq!(d.shortcuts.len(), 2);
        // On h2 the roles swap.
        let d2 = desired(&o, "h2", &Default::default());
        assert_eq!(d2.shortcuts["rl-p11"].macs, BTreeSet::from([mac("fa:16:3e:00:00:01")]));
        assert!(d2.shortcuts["rl-p12"].macs.is_empty());
    }

    fn with_gateway() -> Objects {
        let mut o = sample();
        let objects = vec![
            obj(
                "/isthmus/v1/networks/ext",
                "network",
                json!({"id": "ext", "provider:segmentation_id": null, "mtu": 1500,
                    "provider:network_type": "flat", "provider:physical_network": "public"}),
            ),
            obj(
                "/isthmus/v1/subnets/sx",
                "subnet",
                json!({"id": "sx", "network_id": "ext", "cidr": "203.0.113.0/24", "gateway_ip": "203.0.113.1"}),
            ),
            obj(
                "/isthmus/v1/ports/g1",
                "port",
                json!({"id": "g1", "network_id": "ext", "binding:host_id": "h2",
                    "mac_address": "fa:16:3e:00:00:99", "device_owner": "network:router_gateway", "device_id": "r1",
                    "fixed_ips": [{"subnet_id": "sx", "ip_address": "203.0.113.10"}]}),
            ),
            obj(
                "/isthmus/v1/routers/r1",
                "router",
                json!({"id": "r1", "external_gateway_info": {"network_id": "ext", "enable_snat": true,
                    "external_fixed_ips": [{"subnet_id": "sx", "ip_address": "203.0.113.10"}]},
                    "routes": [{"destination": "192.0.2.0/24", "nexthop": "10.1.0.200"}]}),
            ),
            obj(
                "/isthmus/v1/floatingips/f1",
                "floatingip",
                json!({"id": "f1", "floating_network_id": "ext", "floating_ip_address": "203.0.113.50",
                    "port_id": "p01", "fixed_ip_address": "10.1.0.5", "router_id": "r1"}),
            ),
        ];
        o.apply(Message::Update {
            revision: Some(2),
            put: objects,
            delete: vec![],
        });
        o
    }

    #[test]
    fn floating_ips_live_on_their_port_node_and_snat_on_the_gateway_node() {
        let o = with_gateway();
        let phys = PhysicalNetworks::from([("public".to_string(), "br-ext".to_string())]);
        // h1: the floating IP's node; SNAT elsewhere, reached through the SNAT leg's MAC.
        let d = desired(&o, "h1", &phys);
        let r = d.routers.values().next().unwrap();
        let e = r.external.as_ref().expect("external leg for the floating IP");
        assert_eq!(e.bridge, "br-ext");
        assert_eq!(e.addresses, BTreeSet::from(["203.0.113.50/32".parse().unwrap()]));
        assert_eq!(e.mac, fip_mac("r1", "h1"));
        assert_eq!(e.gateway, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(r.fips.len(), 1);
        assert_eq!(r.snat, None);
        assert!(r.snat_legs.is_empty());
        let Some(DefaultRoute::SnatNode { dev }) = &r.default else {
            panic!("{:?}", r.default)
        };
        assert!(r.neighbors.iter().any(|n| &n.dev == dev
            && n.ip == IpAddr::V4(SNAT_NEXTHOP)
            && n.mac == snat_mac("r1", &r.legs[dev].network_id)));
        assert_eq!(r.routes.len(), 1);
        let nat = nat_script(r);
        assert!(nat.contains("ip daddr 203.0.113.50 dnat to 10.1.0.5"), "{nat}");
        assert!(nat.contains("ip saddr 10.1.0.5 snat to 203.0.113.50"), "{nat}");
        assert!(!nat.contains("snat to 203.0.113.10"), "{nat}");
        // h2: the SNAT node, with the gateway address and a SNAT leg per internal network.
        let d = desired(&o, "h2", &phys);
        let r = d.routers.values().next().unwrap();
        let e = r.external.as_ref().expect("external leg on the SNAT node");
        assert_eq!(e.addresses, BTreeSet::from(["203.0.113.10/24".parse().unwrap()]));
        assert_eq!(e.mac, "fa:16:3e:00:00:99");
        assert_eq!(r.snat, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(r.snat_legs.len(), 2);
        assert_eq!(r.default, Some(DefaultRoute::External("203.0.113.1".parse().unwrap())));
        assert!(nat_script(r).contains("snat to 203.0.113.10"));
        // Without the physical network mapped, no external leg (and nothing to NAT).
        let d = desired(&o, "h1", &PhysicalNetworks::new());
        let r = d.routers.values().next().unwrap();
        assert!(r.external.is_none());
        assert!(!nat_script(r).contains("dnat"));
        // h3 has no port on the router's networks and is not its gateway: nothing.
        assert!(desired(&o, "h3", &phys).routers.is_empty());
    }
}
