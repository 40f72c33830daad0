//! Port devices: the host ends of this node's ports. VM taps are created here (a hypervisor
//! opens them by name); container veths are made by the attach path, which owns the workload
//! side, through [`PortsController::plug`]. Devices in the wrong bridge are fixed, devices of
//! ports that are gone are deleted, and port statuses and tap bindings are reported to the
//! server from what is actually present.
//!
//! Every change to one device holds that device's lock, so an attach, a detach and a pass never
//! interleave on one port, and never wait for each other on different ports.

use super::l2::L2Controller;
use super::{Controller, KeyLocks, Outcome};
use crate::client::Client;
use crate::desired::{compute, PortDevice};
use crate::kernel::{KernelError, Links, MacAddr, PortDevices, VethAttach};
use crate::names;
use crate::objects::status_fixes;
use crate::plan::{plan_ports, plan_subports, Action};
use crate::reconcile::Report;
use crate::state::{NodeState, Snapshot};
use crate::view::PortKind;
use isthmus_wire::node::PortReport;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Ports whose status must not be reported (a failed CNI ADD's port on its way out).
pub type SkipReport = Arc<dyn Fn(&str) -> bool + Send + Sync>;

pub struct PortsController<K, L> {
    backend: Arc<K>,
    l2: Arc<L2Controller<L>>,
    state: Arc<NodeState>,
    client: Option<Arc<Client>>,
    skip_report: SkipReport,
    locks: KeyLocks<String>,
    /// When `plug`/`unplug` last changed each device: a pass does not report statuses for
    /// devices changed after it observed them (the attach or detach reports those itself).
    touched: std::sync::Mutex<HashMap<String, Instant>>,
    /// Trunks (by parent tap) this agent has wired, to unwire those no longer wanted.
    wired: tokio::sync::Mutex<BTreeSet<String>>,
}

/// The host-side MAC of a VM's TAP device: the VM's MAC with the first byte `fe` (libvirt's
/// convention), so the bridge never confuses the two.
pub fn tap_mac(vm_mac: &str) -> Option<MacAddr> {
    let mut m: MacAddr = vm_mac.parse().ok()?;
    m.0[0] = 0xfe;
    Some(m)
}

impl<K: PortDevices, L: Links> PortsController<K, L> {
    pub fn new(
        backend: Arc<K>,
        l2: Arc<L2Controller<L>>,
        state: Arc<NodeState>,
        client: Option<Arc<Client>>,
        skip_report: SkipReport,
    ) -> Arc<Self> {
        Arc::new(PortsController {
            backend,
            l2,
            state,
            client,
            skip_report,
            locks: KeyLocks::default(),
            touched: Default::default(),
            wired: Default::default(),
        })
    }

    pub fn backend(&self) -> &K {
        &self.backend
    }

    /// Plugs a container port: its network's devices, then the veth pair, under the port's
    /// lock. A bridge found missing (deleted behind the agent's back) is made again, once.
    pub async fn plug(&self, req: &VethAttach, vni: u32, net_mtu: u32) -> Result<(), KernelError> {
        let t0 = Instant::now();
        self.l2.ensure_network(vni, net_mtu).await?;
        let t_net = t0.elapsed();
        let _g = self.locks.lock(&req.port.name).await;
        // Where an attach waited, for slow ones.
        debug!(dev = %req.port.name, network_ms = t_net.as_secs_f64() * 1e3,
            lock_ms = t0.elapsed().as_secs_f64() * 1e3, "plugging");
        let res = match self.backend.attach_veth(req).await {
            Err(KernelError::NoDevice(d)) if d == req.port.bridge => {
                self.l2.invalidate(vni);
                self.l2.ensure_network(vni, net_mtu).await?;
                self.backend.attach_veth(req).await
            }
            other => other,
        };
        // After the change: a pass that observed before it must not report on it.
        self.touch(&req.port.name);
        res
    }

    /// Deletes a port's host device (and with a veth, the workload end). Absent is fine.
    pub async fn unplug(&self, dev: &str) -> Result<(), KernelError> {
        let _g = self.locks.lock(&dev.to_string()).await;
        let res = self.backend.detach(dev).await;
        self.touch(dev);
        res
    }

    fn touch(&self, dev: &str) {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if t.len() > 4096 {
            t.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        t.insert(dev.to_string(), now);
    }

    fn touched_since(&self, dev: &str, since: Instant) -> bool {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(dev)
            .is_some_and(|at| *at >= since)
    }

    /// One full pass: devices to the view, then statuses to the devices.
    pub async fn pass(&self, snap: &Snapshot) -> Result<Report, KernelError> {
        let want = compute(&snap.view).ports;
        let taps: BTreeMap<String, Option<MacAddr>> = snap
            .view
            .local_ports
            .iter()
            .filter(|p| p.kind == PortKind::Tap)
            .map(|p| (names::tap(&p.id), tap_mac(&p.mac)))
            .filter(|(name, _)| want.contains_key(name))
            .collect();
        let subports: BTreeSet<String> = snap
            .view
            .local_ports
            .iter()
            .filter(|p| matches!(p.kind, PortKind::Subport { .. }))
            .map(|p| names::tap(&p.id))
            .filter(|name| want.contains_key(name))
            .collect();
        let started = Instant::now();
        let actual = self.backend.observe_ports().await?;
        let mut actions = plan_ports(&actual, &want, &taps);
        actions.extend(plan_subports(&actual, &want, &subports));
        let mut devices: BTreeSet<String> = actual.keys().cloned().collect();
        let mut report = Report {
            planned: actions.len(),
            ..Default::default()
        };
        for a in &actions {
            match self.apply_one(a, &snap.view.networks).await {
                Ok(()) => {
                    report.applied += 1;
                    match a {
                        Action::CreateTap(p, _) => {
                            info!(dev = %p.name, "tap device created");
                            devices.insert(p.name.clone());
                        }
                        Action::CreateSubport(p) => {
                            info!(dev = %p.name, bridge = %p.bridge, "subport device created");
                            devices.insert(p.name.clone());
                        }
                        Action::DeletePort(n) => {
                            devices.remove(n);
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    warn!(action = ?a, error = %e, "port action failed");
                    report.failed.push(crate::reconcile::Failure {
                        action: a.clone(),
                        error: e.to_string(),
                    });
                }
            }
        }
        self.wire_trunks(snap, &mut devices, &mut report).await;
        if report.planned > 0 {
            info!(
                planned = report.planned,
                applied = report.applied,
                failed = report.failed.len(),
                "ports pass done"
            );
        }
        self.report_statuses(snap, &want, &devices, started).await;
        Ok(report)
    }

    /// Puts each trunk's VLAN programs on its devices (a no-op when they are there as wanted)
    /// and takes them off trunks that are gone. A subport whose trunk could not be wired is
    /// taken out of `devices`, so it is reported DOWN.
    async fn wire_trunks(&self, snap: &Snapshot, devices: &mut BTreeSet<String>, report: &mut Report) {
        let trunks = crate::trunk::desired(&snap.view);
        let mut wired = self.wired.lock().await;
        for gone in wired
            .iter()
            .filter(|p| !trunks.contains_key(*p))
            .cloned()
            .collect::<Vec<_>>()
        {
            match self.backend.unwire_trunk(&gone).await {
                Ok(()) => {
                    info!(dev = %gone, "trunk unwired");
                    wired.remove(&gone);
                }
                Err(e) => warn!(dev = %gone, error = %e, "unwiring trunk failed"),
            }
        }
        for (parent, w) in &trunks {
            let bridged: Vec<String> = w.subports.iter().map(|s| s.bridged.clone()).collect();
            if !devices.contains(parent) || bridged.iter().any(|d| !devices.contains(d)) {
                // Its devices are not all there yet (their creation failed); the next pass.
                for d in &bridged {
                    devices.remove(d);
                }
                continue;
            }
            match self.backend.wire_trunk(w).await {
                Ok(changed) => {
                    wired.insert(parent.clone());
                    if changed {
                        report.planned += 1;
                        report.applied += 1;
                        let vlans: Vec<u16> = w.subports.iter().map(|s| s.vlan).collect();
                        info!(dev = %parent, ?vlans, "trunk wired");
                    }
                }
                Err(e) => {
                    report.planned += 1;
                    warn!(dev = %parent, error = %e, "wiring trunk failed");
                    report.failed.push(crate::reconcile::Failure {
                        action: Action::WireTrunk(parent.clone()),
                        error: e.to_string(),
                    });
                    for d in &bridged {
                        devices.remove(d);
                    }
                }
            }
        }
    }

    async fn apply_one(
        &self,
        a: &Action,
        networks: &BTreeMap<String, crate::view::NetworkInfo>,
    ) -> Result<(), KernelError> {
        let dev = a.device().to_string();
        if let Action::CreateTap(p, _) | Action::CreateSubport(p) | Action::FixPort(p) = a {
            // The port's network devices first (the L2 pass may not have run yet).
            if let Some(vni) = names::vni_of(&p.bridge) {
                let mtu = networks.values().find(|n| n.vni == vni).map_or(p.mtu, |n| n.mtu);
                self.l2.ensure_network(vni, mtu).await?;
            }
        }
        let _g = self.locks.lock(&dev).await;
        if matches!(a, Action::DeletePort(_)) && self.state.wants_device(&dev) {
            debug!(dev = %dev, "port attached since the pass started; kept");
            return Ok(());
        }
        self.backend.apply_port(a).await
    }

    /// Statuses follow the devices present (ACTIVE with, DOWN without), and VM ports are bound
    /// as taps with the bridge and MTU a hypervisor needs. Bounded in time; the next pass
    /// retries what did not get through.
    async fn report_statuses(
        &self,
        snap: &Snapshot,
        want: &BTreeMap<String, PortDevice>,
        devices: &BTreeSet<String>,
        observed_at: Instant,
    ) {
        let Some(client) = &self.client else { return };
        let fixes = {
            let v = self.state.lock();
            let mut reports: Vec<(String, PortReport)> = vec![];
            let mut taps: HashMap<String, PortReport> = HashMap::new();
            for lp in snap.view.local_ports.iter().filter(|p| p.kind == PortKind::Tap) {
                let name = names::tap(&lp.id);
                let (Some(dev), true) = (want.get(&name), devices.contains(&name)) else {
                    continue;
                };
                let details = json!({"bridge_name": dev.bridge, "mtu": dev.mtu});
                let bound = v
                    .objects
                    .port(&lp.id)
                    .is_some_and(|p| p.vif_type == "tap" && p.vif_details == details);
                let binding = PortReport {
                    vif_type: Some("tap".into()),
                    vif_details: Some(details),
                    ..Default::default()
                };
                if !bound {
                    reports.push((lp.id.clone(), binding.clone()));
                }
                taps.insert(lp.id.clone(), binding);
            }
            for (port, status) in status_fixes(&v.objects, &self.state.node, devices) {
                // A failed ADD's port is being deleted: nothing is reported for it.
                if (self.skip_report)(&port) {
                    reports.retain(|(p, _)| *p != port);
                    continue;
                }
                let mut body = PortReport::status(status);
                if status == "ACTIVE" {
                    if let Some(b) = taps.get(&port) {
                        body.vif_type = b.vif_type.clone();
                        body.vif_details = b.vif_details.clone();
                    }
                }
                reports.retain(|(p, _)| *p != port);
                reports.push((port, body));
            }
            reports
        };
        let fixes: Vec<_> = fixes
            .into_iter()
            .filter(|(port, _)| !self.touched_since(&names::tap(port), observed_at))
            .collect();
        if fixes.is_empty() {
            return;
        }
        let report = async {
            for (port, body) in fixes {
                match client.report_port(&port, &body).await {
                    Ok(_) => {
                        info!(port = %port, report = %serde_json::to_string(&body).unwrap_or_default(), "port status/binding reported")
                    }
                    Err(e) => debug!(port = %port, error = %e, "could not report port status"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), report).await.is_err() {
            debug!("status reports cut short; the next pass retries");
        }
    }
}

impl<K: PortDevices + 'static, L: Links + 'static> Controller for PortsController<K, L> {
    const NAME: &'static str = "ports";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap)
            .await
            .map(|r| Outcome::from_report(&r))
            .map_err(|e| format!("reading port devices: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_macs_are_the_vm_mac_with_fe() {
        assert_eq!(tap_mac("FA:16:3e:01:02:03").unwrap().to_string(), "fe:16:3e:01:02:03");
        assert_eq!(tap_mac("bogus"), None);
    }
}
