//! NAT (floating IPs, SNAT): not built yet; the slot for its controller.

use super::{Controller, Outcome};
use crate::state::Snapshot;

/// Desires nothing yet, so it changes nothing.
#[derive(Default)]
pub struct NatController;

impl Controller for NatController {
    const NAME: &'static str = "nat";

    async fn reconcile(&self, _snap: &Snapshot) -> Result<Outcome, String> {
        Ok(Outcome::default())
    }
}
