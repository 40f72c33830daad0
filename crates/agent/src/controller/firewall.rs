//! The node's packet filter. Today it holds the DHCP guard: a bridge-family nftables table that
//! keeps workloads' DHCP on the node (requests are answered locally and never forwarded;
//! workloads cannot answer DHCP for others). Security groups will land here.
//!
//! Desired: the guard is in place while the node serves DHCP to at least one tap (the table
//! must be made after the namespace's first bridge, or it never sees bridged frames), and gone
//! once the node has no port and no network left; otherwise it stays as it is. Actual: what
//! the last successful change left, confirmed against the kernel on every full resync. A failed
//! change is retried with back-off and reported, never assumed done.

use super::dhcp::DhcpController;
use super::{Controller, Outcome};
use crate::kernel::{Firewall, PacketIo};
use crate::state::Snapshot;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::info;

/// What the guard should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Present,
    Absent,
    /// Either is fine: leave it as it is.
    AsIs,
}

/// Pure: the guard a node needs.
pub fn desired_guard(serving_dhcp: usize, view_empty: bool) -> Guard {
    if serving_dhcp > 0 {
        Guard::Present
    } else if view_empty {
        Guard::Absent
    } else {
        Guard::AsIs
    }
}

pub struct FirewallController<B, P> {
    backend: Arc<B>,
    dhcp: Arc<DhcpController<P>>,
    /// Whether the guard is there, as last seen or made; `None`: not known (check the kernel).
    known: Mutex<Option<bool>>,
    last_observed: Mutex<Option<Instant>>,
    /// The kernel is asked again this often even when nothing changed (drift repair).
    full_resync: Duration,
}

impl<B: Firewall, P: PacketIo + 'static> FirewallController<B, P> {
    pub fn new(backend: Arc<B>, dhcp: Arc<DhcpController<P>>, full_resync: Duration) -> Arc<Self> {
        Arc::new(FirewallController {
            backend,
            dhcp,
            known: Mutex::new(None),
            last_observed: Mutex::new(None),
            full_resync,
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Option<bool>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn pass(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let view_empty = snap.view.local_ports.is_empty() && snap.view.networks.is_empty();
        let want = desired_guard(self.dhcp.serving(), view_empty);
        if want == Guard::AsIs {
            return Ok(Outcome::default());
        }
        let due = self
            .last_observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= self.full_resync);
        let known = *self.known();
        let actual = match known {
            Some(k) if !due => k,
            _ => {
                let present = self
                    .backend
                    .dhcp_guard_present()
                    .await
                    .map_err(|e| format!("reading the DHCP guard: {e}"))?;
                *self.last_observed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                *self.known() = Some(present);
                present
            }
        };
        let wanted = want == Guard::Present;
        if actual == wanted {
            return Ok(Outcome::default());
        }
        // Unknown until the change is confirmed: a failure leaves it to be checked again.
        *self.known() = None;
        let res = if wanted {
            self.backend.ensure_dhcp_guard().await
        } else {
            self.backend.remove_dhcp_guard().await
        };
        match res {
            Ok(()) => {
                *self.known() = Some(wanted);
                if wanted {
                    info!("DHCP guard installed: workloads' DHCP stays on this node");
                } else {
                    info!("DHCP guard removed: no network left on this node");
                }
                Ok(Outcome {
                    planned: 1,
                    failures: vec![],
                })
            }
            Err(e) => Ok(Outcome {
                planned: 1,
                failures: vec![format!(
                    "{} the DHCP guard: {e}",
                    if wanted { "installing" } else { "removing" }
                )],
            }),
        }
    }
}

impl<B: Firewall + 'static, P: PacketIo + 'static> Controller for FirewallController<B, P> {
    const NAME: &'static str = "firewall";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_follows_dhcp_service_and_goes_with_the_last_network() {
        assert_eq!(desired_guard(1, false), Guard::Present);
        assert_eq!(desired_guard(0, true), Guard::Absent);
        assert_eq!(desired_guard(0, false), Guard::AsIs);
    }
}
