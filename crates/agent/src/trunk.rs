//! Trunks as the node wires them, computed from its view: for each local VM port with local
//! subports, the parent's tap and, per subport, its VLAN id and the device the VLAN programs
//! (`kernel::vlan`) redirect its frames to.

use crate::names;
use crate::view::{NodeView, PortKind};
use std::collections::{BTreeMap, BTreeSet};

/// One trunk as the host wires it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrunkWiring {
    /// The VM's tap: untagged frames belong to the parent port's network.
    pub parent_dev: String,
    pub subports: Vec<Subport>,
}

/// A subport: frames tagged `vlan` on the parent go to and come from `dev`, a host device
/// (a veth end whose peer, `bridged`, is in the subport network's bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subport {
    pub vlan: u16,
    pub dev: String,
    pub bridged: String,
}

/// The trunks the node must wire, by parent device. A subport whose parent is not a local VM
/// port of the node is left out (no device, so it stays DOWN), and so is a second subport
/// claiming a VLAN id already taken on its parent (the API never allows one).
pub fn desired(view: &NodeView) -> BTreeMap<String, TrunkWiring> {
    let parents: BTreeSet<&str> = view
        .local_ports
        .iter()
        .filter(|p| p.kind == PortKind::Tap && view.networks.contains_key(&p.network_id))
        .map(|p| p.id.as_str())
        .collect();
    let mut out: BTreeMap<String, TrunkWiring> = BTreeMap::new();
    let mut subs: Vec<_> = view
        .local_ports
        .iter()
        .filter(|p| view.networks.contains_key(&p.network_id))
        .filter_map(|p| match &p.kind {
            PortKind::Subport { parent, vlan } if parents.contains(parent.as_str()) => Some((parent, *vlan, &p.id)),
            _ => None,
        })
        .collect();
    subs.sort();
    for (parent, vlan, id) in subs {
        let parent_dev = names::tap(parent);
        let w = out.entry(parent_dev.clone()).or_insert_with(|| TrunkWiring {
            parent_dev,
            subports: vec![],
        });
        if w.subports.iter().all(|s| s.vlan != vlan) {
            w.subports.push(Subport {
                vlan,
                dev: names::subport_peer(id),
                bridged: names::tap(id),
            });
        }
    }
    out
}

/// Whether a local port of this kind gets a device on this node.
pub fn wired(view: &NodeView, kind: &PortKind) -> bool {
    match kind {
        PortKind::Subport { parent, .. } => view
            .local_ports
            .iter()
            .any(|p| p.id == *parent && p.kind == PortKind::Tap && view.networks.contains_key(&p.network_id)),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{LocalPort, NetworkInfo};

    fn port(id: &str, net: &str, kind: PortKind) -> LocalPort {
        LocalPort {
            id: id.into(),
            network_id: net.into(),
            mac: "fa:16:3e:00:00:01".into(),
            kind,
        }
    }

    fn view(ports: Vec<LocalPort>) -> NodeView {
        let mut v = NodeView::default();
        for (n, vni) in [("n1", 1), ("n2", 2), ("n3", 3)] {
            v.networks.insert(
                n.into(),
                NetworkInfo {
                    id: n.into(),
                    vni,
                    mtu: 1450,
                },
            );
        }
        v.local_ports = ports;
        v
    }

    fn sub(parent: &str, vlan: u16) -> PortKind {
        PortKind::Subport {
            parent: parent.into(),
            vlan,
        }
    }

    #[test]
    fn subports_of_a_local_vm_port_are_wired_on_its_tap() {
        let v = view(vec![
            port("vm1-parent-port", "n1", PortKind::Tap),
            port("sub-b-port-id", "n3", sub("vm1-parent-port", 200)),
            port("sub-a-port-id", "n2", sub("vm1-parent-port", 100)),
        ]);
        let d = desired(&v);
        let w = &d[&names::tap("vm1-parent-port")];
        assert_eq!(
            w.subports,
            vec![
                Subport {
                    vlan: 100,
                    dev: names::subport_peer("sub-a-port-id"),
                    bridged: names::tap("sub-a-port-id"),
                },
                Subport {
                    vlan: 200,
                    dev: names::subport_peer("sub-b-port-id"),
                    bridged: names::tap("sub-b-port-id"),
                },
            ]
        );
        assert!(wired(&v, &sub("vm1-parent-port", 100)));
    }

    #[test]
    fn subports_without_a_local_vm_parent_are_left_out() {
        let v = view(vec![
            port("container", "n1", PortKind::Veth),
            port("s1", "n2", sub("container", 100)),
            port("s2", "n2", sub("elsewhere", 101)),
        ]);
        assert!(desired(&v).is_empty());
        assert!(!wired(&v, &sub("container", 100)));
        assert!(!wired(&v, &sub("elsewhere", 101)));
    }

    #[test]
    fn a_vlan_id_is_wired_once() {
        let v = view(vec![
            port("vm", "n1", PortKind::Tap),
            port("s1", "n2", sub("vm", 100)),
            port("s2", "n3", sub("vm", 100)),
        ]);
        assert_eq!(desired(&v)[&names::tap("vm")].subports.len(), 1);
    }
}
