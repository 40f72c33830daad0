//! QoS bandwidth limits on port devices (layout in [`crate::qos`]).
//!
//! Desired: a pure function of the view (every local port device, with its limits or none).
//! Actual: read back from the kernel on every pass (a few processes), so a pass changes only
//! what differs and a limit changed by hand is repaired.

use super::{Controller, Outcome};
use crate::kernel::Shaping;
use crate::qos;
use crate::state::Snapshot;
use std::sync::Arc;
use tracing::info;

pub struct QosController<B> {
    backend: Arc<B>,
}

impl<B: Shaping> QosController<B> {
    pub fn new(backend: Arc<B>) -> Self {
        QosController { backend }
    }

    pub async fn pass(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let want = &snap.qos;
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
        Ok(out)
    }
}

impl<B: Shaping + 'static> Controller for QosController<B> {
    const NAME: &'static str = "qos";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap).await
    }
}
