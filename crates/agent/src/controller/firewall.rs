//! The node's packet filter: security groups, port security and the DHCP guard, as the
//! agent's nftables tables (layout in [`crate::security`]).
//!
//! Desired: a pure function of the view. Actual: what the last successful change left. A
//! change is a patch from the last applied state to the new one, in one nft transaction
//! (rules of one group, elements of one set). The first pass after start, every full resync,
//! and any pass after a failure replace both tables whole, also in one transaction, so a
//! restarted agent adopts its tables without a moment of open traffic and drift is repaired.
//! Every change also moves the firewall to a new [`Generation`], so established connections
//! are checked again under the new rules (see [`crate::security`]).

use super::{Controller, Outcome};
use crate::kernel::Firewall;
use crate::security::{self, Desired, Generation};
use crate::state::Snapshot;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, info};

pub struct FirewallController<B> {
    backend: Arc<B>,
    /// What the tables hold, as last made; `None`: not known (replace them whole).
    applied: Mutex<Option<Arc<Desired>>>,
    last_full: Mutex<Option<Instant>>,
    /// The generation the tables hold; `None` before the first change.
    generation: Mutex<Option<Generation>>,
    /// The tables are replaced whole this often even when nothing changed (drift repair).
    full_resync: Duration,
}

impl<B: Firewall> FirewallController<B> {
    pub fn new(backend: Arc<B>, full_resync: Duration) -> Arc<Self> {
        Arc::new(FirewallController {
            backend,
            applied: Mutex::new(None),
            last_full: Mutex::new(None),
            generation: Mutex::new(None),
            full_resync,
        })
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, Option<Arc<Desired>>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn pass(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let want = snap.firewall.clone();
        let due = self
            .last_full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= self.full_resync);
        let old = self.applied().clone();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let current = *self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let gen = current.map_or_else(|| Generation::first(now_ms), |g| g.next(now_ms));
        let (script, whole) = match &old {
            Some(old) if !due && old.present && want.present => (security::patch(old, &want, gen), false),
            Some(old) if !due && !old.present && !want.present => return Ok(Outcome::default()),
            _ if !want.present => {
                // Nothing to filter: remove the tables if there are any (a node that never
                // had ports does not need nft at all).
                let present = self
                    .backend
                    .firewall_present()
                    .await
                    .map_err(|e| format!("reading the firewall: {e}"))?;
                *self.last_full.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                if !present {
                    *self.applied() = Some(want);
                    return Ok(Outcome::default());
                }
                (security::removal(), true)
            }
            _ => (security::full(&want, gen), true),
        };
        if script.is_empty() {
            *self.applied() = Some(want);
            return Ok(Outcome::default());
        }
        // Unknown until the change is confirmed: a failure leads to a whole replacement.
        *self.applied() = None;
        let started = Instant::now();
        match self.backend.apply_firewall(script).await {
            Ok(()) => {
                *self.generation.lock().unwrap_or_else(|p| p.into_inner()) = Some(gen);
                if whole {
                    *self.last_full.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                let (objects, _) = security::object_counts(&want);
                if whole {
                    info!(
                        ports = want.ports.len(),
                        groups = want.groups.len(),
                        objects,
                        generation = gen.value(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "firewall {}",
                        if want.present {
                            "replaced whole"
                        } else {
                            "removed: no port left on this node"
                        }
                    );
                } else {
                    debug!(
                        ports = want.ports.len(),
                        objects,
                        generation = gen.value(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "firewall patched"
                    );
                }
                *self.applied() = Some(want);
                Ok(Outcome {
                    planned: 1,
                    failures: vec![],
                })
            }
            Err(e) => Ok(Outcome {
                planned: 1,
                failures: vec![format!("changing the firewall: {e}")],
            }),
        }
    }
}

impl<B: Firewall + 'static> Controller for FirewallController<B> {
    const NAME: &'static str = "firewall";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap).await
    }
}
