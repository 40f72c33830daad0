//! The datapath a node must have, computed from its view and nothing else.

use crate::names;
use crate::view::{NodeView, PortKind};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bridge {
    pub name: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vxlan {
    pub name: String,
    pub vni: u32,
    pub local: IpAddr,
    pub bridge: String,
    pub mtu: u32,
}

/// A static forwarding entry on a VXLAN device. `mac` all zeros is the head-end replication
/// entry: broadcast and unknown unicast go to every listed node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fdb {
    pub dev: String,
    pub mac: String,
    pub dst: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortDevice {
    pub name: String,
    pub bridge: String,
    pub mtu: u32,
    pub veth: bool,
}

/// A string that is no MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct InvalidMac(pub String);

/// An Ethernet address. Parses `aa:bb:cc:dd:ee:ff` in either case, prints lowercase (the form
/// the desired state uses, so observed and desired entries compare equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = InvalidMac;

    fn try_from(v: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(v)
            .map(MacAddr)
            .map_err(|_| InvalidMac(format!("{v:02x?}")))
    }
}

pub const FLOOD_MAC: &str = "00:00:00:00:00:00";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Datapath {
    pub bridges: BTreeMap<String, Bridge>,
    pub vxlans: BTreeMap<String, Vxlan>,
    pub fdb: BTreeSet<Fdb>,
    pub ports: BTreeMap<String, PortDevice>,
}

/// A network's bridge and VXLAN device as the node must have them.
pub fn network_devices(vni: u32, mtu: u32, local: IpAddr) -> (Bridge, Vxlan) {
    let br = names::bridge(vni);
    (
        Bridge { name: br.clone(), mtu },
        Vxlan {
            name: names::vxlan(vni),
            vni,
            local,
            bridge: br,
            mtu,
        },
    )
}

/// Adds a network's bridge and VXLAN device to `dp` (once); its bridge's name.
fn add_network(dp: &mut Datapath, vni: u32, mtu: u32, local: IpAddr) -> String {
    let (bridge, vxlan) = network_devices(vni, mtu, local);
    let name = bridge.name.clone();
    dp.bridges.entry(name.clone()).or_insert(bridge);
    dp.vxlans.entry(vxlan.name.clone()).or_insert(vxlan);
    name
}

/// Networks get state on this node only while it has a local port on them or a local router
/// routes into them; remote ports of other networks are ignored even if the view carries them.
pub fn compute(view: &NodeView) -> Datapath {
    let mut dp = Datapath::default();
    let Some(local_ip) = view.underlay_ip else { return dp };
    for net in view.routed.iter().filter_map(|n| view.networks.get(n)) {
        add_network(&mut dp, net.vni, net.mtu, local_ip);
    }
    for lp in &view.local_ports {
        let Some(net) = view.networks.get(&lp.network_id) else {
            continue;
        };
        if !crate::trunk::wired(view, &lp.kind) {
            continue;
        }
        let br = add_network(&mut dp, net.vni, net.mtu, local_ip);
        let name = names::tap(&lp.id);
        dp.ports.insert(
            name.clone(),
            PortDevice {
                name,
                bridge: br,
                mtu: net.mtu,
                veth: lp.kind != PortKind::Tap,
            },
        );
    }
    for rp in &view.remote_ports {
        let Some(net) = view.networks.get(&rp.network_id) else {
            continue;
        };
        let vx = names::vxlan(net.vni);
        if !dp.vxlans.contains_key(&vx) || rp.node_ip == local_ip {
            continue;
        }
        dp.fdb.insert(Fdb {
            dev: vx.clone(),
            mac: rp.mac.to_ascii_lowercase(),
            dst: rp.node_ip,
        });
        dp.fdb.insert(Fdb {
            dev: vx,
            mac: FLOOD_MAC.into(),
            dst: rp.node_ip,
        });
    }
    dp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let m: MacAddr = "FA:16:3e:00:0A:ff".parse().unwrap();
        assert_eq!(m.to_string(), "fa:16:3e:00:0a:ff");
        for bad in [
            "",
            "fa:16:3e:00:0a",
            "fa:16:3e:00:0a:ff:00",
            "fa:16:3e:00:0a:zz",
            "fa:16:3e:00:0a:f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::try_from(&[1u8, 2, 3][..]).is_err());
    }

    use crate::view::{LocalPort, NetworkInfo, RemotePort};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn view() -> NodeView {
        let mut v = NodeView {
            underlay_ip: Some(ip("192.0.2.1")),
            ..Default::default()
        };
        for (id, vni) in [("n1", 100), ("n2", 200)] {
            v.networks.insert(
                id.into(),
                NetworkInfo {
                    id: id.into(),
                    vni,
                    mtu: 1450,
                },
            );
        }
        v.local_ports.push(LocalPort {
            id: "p1-aaaaaaaaaaaaaaaa".into(),
            network_id: "n1".into(),
            mac: "fa:16:3e:00:00:01".into(),
            kind: PortKind::Veth,
        });
        v.remote_ports.push(RemotePort {
            id: "p2".into(),
            network_id: "n1".into(),
            mac: "FA:16:3E:00:00:02".into(),
            node_ip: ip("192.0.2.2"),
        });
        v.remote_ports.push(RemotePort {
            id: "p3".into(),
            network_id: "n1".into(),
            mac: "fa:16:3e:00:00:03".into(),
            node_ip: ip("192.0.2.2"),
        });
        // A port on a network this node has no port on: must leave no trace.
        v.remote_ports.push(RemotePort {
            id: "p4".into(),
            network_id: "n2".into(),
            mac: "fa:16:3e:00:00:04".into(),
            node_ip: ip("192.0.2.3"),
        });
        v
    }

    #[test]
    fn state_only_for_networks_with_local_ports() {
        let dp = compute(&view());
        assert_eq!(dp.bridges.keys().collect::<Vec<_>>(), ["isbr-100"]);
        assert_eq!(dp.vxlans.keys().collect::<Vec<_>>(), ["isvx-100"]);
        assert!(dp.fdb.iter().all(|f| f.dev == "isvx-100"));
        assert_eq!(dp.ports.len(), 1);
        assert!(dp.ports.contains_key("tapp1-aaaaaaaa"));
    }

    #[test]
    fn one_flood_entry_per_remote_node_and_one_entry_per_remote_mac() {
        let dp = compute(&view());
        let flood: Vec<_> = dp.fdb.iter().filter(|f| f.mac == FLOOD_MAC).collect();
        assert_eq!(flood.len(), 1);
        assert_eq!(flood[0].dst, ip("192.0.2.2"));
        let macs: Vec<_> = dp
            .fdb
            .iter()
            .filter(|f| f.mac != FLOOD_MAC)
            .map(|f| f.mac.as_str())
            .collect();
        assert_eq!(macs, ["fa:16:3e:00:00:02", "fa:16:3e:00:00:03"]);
    }

    #[test]
    fn last_local_port_gone_means_no_state() {
        let mut v = view();
        v.local_ports.clear();
        assert_eq!(compute(&v), Datapath::default());
    }

    #[test]
    fn no_underlay_address_means_nothing_to_program() {
        let mut v = view();
        v.underlay_ip = None;
        assert_eq!(compute(&v), Datapath::default());
    }
}
