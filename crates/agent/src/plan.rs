//! The difference between the datapath a node has and the one it must have, as ordered actions.
//! Only what differs is touched, so running it again on a converged node does nothing.
//!
//! Two domains, planned apart because two controllers own them: L2 ([`plan_l2`]: bridges,
//! VXLAN devices, forwarding entries) and port devices ([`plan_ports`]). [`plan`] is both, in
//! an order the kernel accepts when one pass applies them.

use crate::desired::{Bridge, Datapath, Fdb, MacAddr, PortDevice, Vxlan};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    CreateBridge(Bridge),
    SetBridgeMtu(Bridge),
    CreateVxlan(Vxlan),
    /// The VXLAN device exists with other tunnel parameters (VNI, source): rebuild it. Its
    /// forwarding entries go with it, so the plan re-adds all of them afterwards.
    ReplaceVxlan(Vxlan),
    /// The VXLAN device is right but sits outside its bridge or has the wrong MTU (e.g. its bridge
    /// was deleted and recreated): re-enslave it in place, keeping its forwarding entries.
    FixVxlan(Vxlan),
    AddFdb(Fdb),
    DelFdb(Fdb),
    /// A VM port's TAP device is missing: create it (with the host-side MAC) in its bridge.
    CreateTap(PortDevice, Option<MacAddr>),
    /// A subport's device is missing: create its veth pair, the port's end in its bridge and
    /// the other ([`crate::names::subport_peer`]) outside, for the trunk's VLAN programs.
    CreateSubport(PortDevice),
    /// Put a trunk's VLAN programs on its tap and subport devices (named by the tap). Never
    /// planned against a backend's `apply_port`: it names trunk wiring in failure reports.
    WireTrunk(String),
    /// A port device exists but sits in the wrong bridge or with the wrong MTU.
    FixPort(PortDevice),
    DeletePort(String),
    DeleteVxlan(String),
    DeleteBridge(String),
}

impl Action {
    /// A port-device action (the rest are L2).
    pub fn is_port(&self) -> bool {
        matches!(
            self,
            Action::CreateTap(..) | Action::CreateSubport(_) | Action::FixPort(_) | Action::DeletePort(_)
        )
    }

    pub fn is_fdb(&self) -> bool {
        matches!(self, Action::AddFdb(_) | Action::DelFdb(_))
    }

    /// The device the action is about (the VXLAN device for forwarding entries).
    pub fn device(&self) -> &str {
        match self {
            Action::CreateBridge(b) | Action::SetBridgeMtu(b) => &b.name,
            Action::CreateVxlan(v) | Action::ReplaceVxlan(v) | Action::FixVxlan(v) => &v.name,
            Action::AddFdb(f) | Action::DelFdb(f) => &f.dev,
            Action::CreateTap(p, _) | Action::CreateSubport(p) | Action::FixPort(p) => &p.name,
            Action::DeletePort(n) | Action::DeleteVxlan(n) | Action::DeleteBridge(n) | Action::WireTrunk(n) => n,
        }
    }
}

/// Actions that take `actual` to `desired`, in an order the kernel accepts: bridges before the
/// devices enslaved to them, and removals of devices before their bridges. Port devices are not
/// created here (the attach path and the ports controller do); ports that should not exist are
/// removed.
pub fn plan(actual: &Datapath, desired: &Datapath) -> Vec<Action> {
    let mut out = l2_creations(actual, desired);
    out.extend(fix_ports(&actual.ports, &desired.ports));
    out.extend(fdb_changes(actual, desired));
    out.extend(delete_ports(&actual.ports, &desired.ports));
    out.extend(l2_removals(actual, desired));
    out
}

/// The L2 part of [`plan`]: bridges, VXLAN devices, forwarding entries.
pub fn plan_l2(actual: &Datapath, desired: &Datapath) -> Vec<Action> {
    let mut out = l2_creations(actual, desired);
    out.extend(fdb_changes(actual, desired));
    out.extend(l2_removals(actual, desired));
    out
}

/// The port part: devices in the wrong place fixed, missing VM taps created (`taps`: the
/// desired tap devices with their host-side MAC), devices nobody wants deleted.
pub fn plan_ports(
    actual: &BTreeMap<String, PortDevice>,
    desired: &BTreeMap<String, PortDevice>,
    taps: &BTreeMap<String, Option<MacAddr>>,
) -> Vec<Action> {
    let mut out = fix_ports(actual, desired);
    for (name, mac) in taps {
        if let (Some(p), false) = (desired.get(name), actual.contains_key(name)) {
            out.push(Action::CreateTap(p.clone(), *mac));
        }
    }
    out.extend(delete_ports(actual, desired));
    out
}

/// Missing subport devices (`subports`: the desired devices of subports) to create.
pub fn plan_subports(
    actual: &BTreeMap<String, PortDevice>,
    desired: &BTreeMap<String, PortDevice>,
    subports: &BTreeSet<String>,
) -> Vec<Action> {
    subports
        .iter()
        .filter(|n| !actual.contains_key(*n))
        .filter_map(|n| desired.get(n))
        .map(|p| Action::CreateSubport(p.clone()))
        .collect()
}

/// VXLAN devices this plan creates or rebuilds: they start without forwarding entries.
fn fresh_vxlans<'a>(actual: &Datapath, desired: &'a Datapath) -> BTreeSet<&'a str> {
    desired
        .vxlans
        .iter()
        .filter(|(name, v)| {
            actual
                .vxlans
                .get(*name)
                .is_none_or(|a| a.vni != v.vni || a.local != v.local)
        })
        .map(|(name, _)| name.as_str())
        .collect()
}

fn l2_creations(actual: &Datapath, desired: &Datapath) -> Vec<Action> {
    let mut out = vec![];
    for (name, b) in &desired.bridges {
        match actual.bridges.get(name) {
            None => out.push(Action::CreateBridge(b.clone())),
            Some(a) if a.mtu != b.mtu => out.push(Action::SetBridgeMtu(b.clone())),
            Some(_) => {}
        }
    }
    for (name, v) in &desired.vxlans {
        match actual.vxlans.get(name) {
            None => out.push(Action::CreateVxlan(v.clone())),
            Some(a) if a.vni != v.vni || a.local != v.local => out.push(Action::ReplaceVxlan(v.clone())),
            Some(a) if a != v => out.push(Action::FixVxlan(v.clone())),
            Some(_) => {}
        }
    }
    out
}

fn fix_ports(actual: &BTreeMap<String, PortDevice>, desired: &BTreeMap<String, PortDevice>) -> Vec<Action> {
    desired
        .iter()
        .filter_map(|(name, p)| {
            let a = actual.get(name)?;
            (a.bridge != p.bridge || a.mtu != p.mtu).then(|| Action::FixPort(p.clone()))
        })
        .collect()
}

fn fdb_changes(actual: &Datapath, desired: &Datapath) -> Vec<Action> {
    let fresh = fresh_vxlans(actual, desired);
    let mut out = vec![];
    for f in &desired.fdb {
        if !actual.fdb.contains(f) || fresh.contains(f.dev.as_str()) {
            out.push(Action::AddFdb(f.clone()));
        }
    }
    for f in actual.fdb.difference(&desired.fdb) {
        // Entries on a device that is going away or being rebuilt vanish with it.
        if desired.vxlans.contains_key(&f.dev) && !fresh.contains(f.dev.as_str()) {
            out.push(Action::DelFdb(f.clone()));
        }
    }
    out
}

fn delete_ports(actual: &BTreeMap<String, PortDevice>, desired: &BTreeMap<String, PortDevice>) -> Vec<Action> {
    actual
        .keys()
        .filter(|name| !desired.contains_key(*name))
        .map(|name| Action::DeletePort(name.clone()))
        .collect()
}

fn l2_removals(actual: &Datapath, desired: &Datapath) -> Vec<Action> {
    let mut out = vec![];
    for name in actual.vxlans.keys() {
        if !desired.vxlans.contains_key(name) {
            out.push(Action::DeleteVxlan(name.clone()));
        }
    }
    for name in actual.bridges.keys() {
        if !desired.bridges.contains_key(name) {
            out.push(Action::DeleteBridge(name.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::FLOOD_MAC;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn dp(vnis: &[u32], fdb: &[(&str, &str)]) -> Datapath {
        let mut d = Datapath::default();
        for v in vnis {
            let br = format!("isbr-{v}");
            d.bridges.insert(
                br.clone(),
                Bridge {
                    name: br.clone(),
                    mtu: 1450,
                },
            );
            let vx = format!("isvx-{v}");
            d.vxlans.insert(
                vx.clone(),
                Vxlan {
                    name: vx,
                    vni: *v,
                    local: ip("192.0.2.1"),
                    bridge: br,
                    mtu: 1450,
                },
            );
        }
        for (mac, dst) in fdb {
            d.fdb.insert(Fdb {
                dev: format!("isvx-{}", vnis[0]),
                mac: mac.to_string(),
                dst: ip(dst),
            });
        }
        d
    }

    #[test]
    fn converged_node_needs_nothing() {
        let d = dp(&[100], &[(FLOOD_MAC, "192.0.2.2")]);
        assert!(plan(&d, &d).is_empty());
    }

    #[test]
    fn creates_in_dependency_order() {
        let want = dp(&[100], &[("fa:16:3e:00:00:02", "192.0.2.2")]);
        let acts = plan(&Datapath::default(), &want);
        assert!(matches!(acts[0], Action::CreateBridge(_)));
        assert!(matches!(acts[1], Action::CreateVxlan(_)));
        assert!(matches!(acts[2], Action::AddFdb(_)));
        assert_eq!(acts.len(), 3);
    }

    #[test]
    fn repairs_drift_without_touching_the_rest() {
        let want = dp(
            &[100, 200],
            &[("fa:16:3e:00:00:02", "192.0.2.2"), (FLOOD_MAC, "192.0.2.2")],
        );
        let mut have = want.clone();
        have.bridges.remove("isbr-200");
        have.fdb.retain(|f| f.mac == FLOOD_MAC);
        let acts = plan(&have, &want);
        assert_eq!(acts.len(), 2, "{acts:?}");
        assert!(acts.contains(&Action::CreateBridge(Bridge {
            name: "isbr-200".into(),
            mtu: 1450
        })));
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::AddFdb(f) if f.mac == "fa:16:3e:00:00:02")));
    }

    #[test]
    fn removes_leftovers_devices_before_bridges() {
        let have = dp(&[100, 200], &[]);
        let want = dp(&[100], &[]);
        let acts = plan(&have, &want);
        assert_eq!(
            acts,
            vec![
                Action::DeleteVxlan("isvx-200".into()),
                Action::DeleteBridge("isbr-200".into())
            ]
        );
    }

    #[test]
    fn changed_vni_parameters_rebuild_the_vxlan() {
        let want = dp(&[100], &[]);
        let mut have = want.clone();
        if let Some(v) = have.vxlans.get_mut("isvx-100") {
            v.local = ip("192.0.2.9");
        }
        assert_eq!(plan(&have, &want).len(), 1);
        assert!(matches!(plan(&have, &want)[0], Action::ReplaceVxlan(_)));
    }

    #[test]
    fn a_rebuilt_vxlan_gets_all_its_entries_back() {
        let want = dp(&[100], &[("fa:16:3e:00:00:02", "192.0.2.2"), (FLOOD_MAC, "192.0.2.2")]);
        let mut have = want.clone();
        if let Some(v) = have.vxlans.get_mut("isvx-100") {
            v.vni = 7;
        }
        have.fdb.insert(Fdb {
            dev: "isvx-100".into(),
            mac: "fa:16:3e:00:00:09".into(),
            dst: ip("192.0.2.9"),
        });
        let acts = plan(&have, &want);
        assert!(matches!(acts[0], Action::ReplaceVxlan(_)), "{acts:?}");
        let added = acts.iter().filter(|a| matches!(a, Action::AddFdb(_))).count();
        assert_eq!(added, 2, "{acts:?}");
        // The stale entry dies with the old device; deleting it again would fail.
        assert_eq!(acts.len(), 3, "{acts:?}");
    }

    #[test]
    fn a_vxlan_outside_its_bridge_is_re_enslaved_not_rebuilt() {
        let want = dp(&[100], &[(FLOOD_MAC, "192.0.2.2")]);
        let mut have = want.clone();
        have.bridges.clear();
        if let Some(v) = have.vxlans.get_mut("isvx-100") {
            v.bridge = String::new();
        }
        let acts = plan(&have, &want);
        assert_eq!(acts.len(), 2, "{acts:?}");
        assert!(matches!(acts[0], Action::CreateBridge(_)));
        assert!(matches!(acts[1], Action::FixVxlan(_)));
    }
}
