//! L2: one bridge and one VXLAN device per network with a local port, and a static forwarding
//! entry per remote port (plus head-end replication entries per remote node).
//!
//! Full passes observe everything and apply the plan. The attach path needs only its own
//! network's devices: [`L2Controller::ensure_network`] makes them under that network's lock,
//! at no cost when the last pass already did.

use super::{Controller, KeyLocks, Outcome};
use crate::desired::{compute, network_devices, Datapath};
use crate::kernel::{KernelError, Links};
use crate::names;
use crate::plan::{plan_l2, Action};
use crate::reconcile::{apply_in_order, ApplyOne, Report};
use crate::state::{NodeState, Snapshot};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tracing::{debug, info};

pub struct L2Controller<B> {
    backend: Arc<B>,
    state: Arc<NodeState>,
    /// Per VNI: making or removing a network's devices.
    locks: KeyLocks<u32>,
    /// VNIs whose bridge and VXLAN device were right at the end of the last pass or ensure.
    ready: Mutex<HashSet<u32>>,
}

impl<B: Links> L2Controller<B> {
    pub fn new(backend: Arc<B>, state: Arc<NodeState>) -> Arc<Self> {
        Arc::new(L2Controller {
            backend,
            state,
            locks: KeyLocks::default(),
            ready: Mutex::new(HashSet::new()),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets that a network's devices are in place (an attach found them missing).
    pub fn invalidate(&self, vni: u32) {
        self.ready().remove(&vni);
    }

    /// Makes sure network `vni`'s bridge and VXLAN device exist as wanted (forwarding entries
    /// are the full pass's business). Cheap when they are known to be in place.
    pub async fn ensure_network(&self, vni: u32, mtu: u32) -> Result<(), KernelError> {
        if self.ready().contains(&vni) {
            return Ok(());
        }
        let _g = self.locks.lock(&vni).await;
        if self.ready().contains(&vni) {
            return Ok(());
        }
        let (bridge, vxlan) = network_devices(vni, mtu, self.state.underlay_ip);
        let actual = self.backend.observe_l2().await?;
        let mut desired = Datapath::default();
        desired.bridges.insert(bridge.name.clone(), bridge);
        desired.vxlans.insert(vxlan.name.clone(), vxlan);
        // Only this network's devices: other networks' state is not part of this plan.
        let mut mine = Datapath::default();
        for (k, v) in actual.bridges.iter().filter(|(k, _)| desired.bridges.contains_key(*k)) {
            mine.bridges.insert(k.clone(), v.clone());
        }
        for (k, v) in actual.vxlans.iter().filter(|(k, _)| desired.vxlans.contains_key(*k)) {
            mine.vxlans.insert(k.clone(), v.clone());
        }
        let actions: Vec<Action> = plan_l2(&mine, &desired).into_iter().filter(|a| !a.is_fdb()).collect();
        for a in &actions {
            self.backend.apply_l2(a).await?;
        }
        if !actions.is_empty() {
            info!(vni, actions = actions.len(), "network devices made for an attach");
        }
        self.ready().insert(vni);
        Ok(())
    }

    /// One full pass against `snap`.
    pub async fn pass(&self, snap: &Snapshot) -> Result<Report, KernelError> {
        let mut want = compute(&snap.view);
        want.ports.clear();
        let actual = self.backend.observe_l2().await?;
        let actions = plan_l2(&actual, &want);
        if actions.is_empty() {
            *self.ready() = ready_vnis(&want);
            return Ok(Report::default());
        }
        let report = apply_in_order(&*self.backend, &actions, self).await;
        let mut ready = ready_vnis(&want);
        for f in &report.failed {
            if let Some(vni) = names::vni_of(f.action.device()) {
                ready.remove(&vni);
            }
        }
        *self.ready() = ready;
        report.log("L2 pass done");
        Ok(report)
    }
}

impl<B: Links> ApplyOne for L2Controller<B> {
    /// One device action under its network's lock. A network's devices are only removed if
    /// the current view still has no local port on it: an attach may have come since the
    /// snapshot this pass planned from.
    async fn apply_one(&self, a: &Action) -> Result<(), KernelError> {
        let Some(vni) = names::vni_of(a.device()) else {
            return self.backend.apply_l2(a).await;
        };
        let _g = self.locks.lock(&vni).await;
        if matches!(a, Action::DeleteBridge(_) | Action::DeleteVxlan(_)) {
            if self.state.wants_vni(vni) {
                debug!(vni, "network in use again; its devices stay");
                return Ok(());
            }
            self.ready().remove(&vni);
        }
        self.backend.apply_l2(a).await
    }
}

fn ready_vnis(want: &Datapath) -> HashSet<u32> {
    want.vxlans.values().map(|v| v.vni).collect()
}

impl<B: Links + 'static> Controller for L2Controller<B> {
    const NAME: &'static str = "l2";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap)
            .await
            .map(|r| Outcome::from_report(&r))
            .map_err(|e| format!("reading the datapath: {e}"))
    }
}
