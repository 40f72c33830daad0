//! QoS bandwidth limits on port devices (layout in [`crate::qos`]).
//!
//! Desired: a pure function of the view (every local port device, with its limits or none).
//! Actual: read back from the kernel on every pass (a few processes), so a pass changes only
//! what differs and a limit changed by hand is repaired. A node that wants no limits and was
//! found clean is not read again until it wants some: most nodes have no policy, and the
//! controller runs every few seconds.

use super::{Controller, Outcome};
use crate::kernel::Shaping;
use crate::qos;
use crate::state::Snapshot;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tracing::info;

pub struct QosController<B> {
    backend: Arc<B>,
    /// The last pass wanted no limits and left none of ours (no bucket, no IFB).
    clean: AtomicBool,
}

impl<B: Shaping> QosController<B> {
    pub fn new(backend: Arc<B>) -> Self {
        QosController {
            backend,
            clean: AtomicBool::new(false),
        }
    }

    pub async fn pass(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let want = &snap.qos;
        let none_wanted = want.values().all(|l| l.to_port.is_none() && l.from_port.is_none());
        if none_wanted && self.clean.load(Ordering::Relaxed) {
            return Ok(Outcome::default());
        }
        let devices: Vec<String> = want.keys().cloned().collect();
        let seen = self
            .backend
            .observe_qos(devices)
            .await
            .map_err(|e| format!("reading QoS limits: {e}"))?;
        let actions = qos::plan(&seen, want);
        let mut out = Outcome {
            planned: actions.len(),
            failures: vec![],
        };
        for a in &actions {
            match self.backend.apply_qos(a).await {
                Ok(()) => info!(action = ?a, "QoS limit changed"),
                Err(e) => out.failures.push(format!("{a:?}: {e}")),
            }
        }
        self.clean
            .store(none_wanted && out.failures.is_empty(), Ordering::Relaxed);
        Ok(out)
    }
}

impl<B: Shaping + 'static> Controller for QosController<B> {
    const NAME: &'static str = "qos";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap).await
    }
}
