//! L3 (routers: namespaces, interfaces, routes): not built yet. The slot exists so routers
//! arrive as one more controller with its own desired state, plan and backend, wired by the
//! runtime like the others.

use super::{Controller, Outcome};
use crate::state::Snapshot;

/// Desires nothing yet, so it changes nothing.
#[derive(Default)]
pub struct L3Controller;

impl Controller for L3Controller {
    const NAME: &'static str = "l3";

    async fn reconcile(&self, _snap: &Snapshot) -> Result<Outcome, String> {
        Ok(Outcome::default())
    }
}
