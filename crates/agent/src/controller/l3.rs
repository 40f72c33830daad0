//! Distributed routers: one namespace per router this node routes for (layout in
//! [`crate::l3`]).
//!
//! Desired: a pure function of the view. Actual: the router namespaces with this node's prefix.
//! A router equal to what this controller last applied is left alone, except on a full resync,
//! when every router is read back and repaired; one that changed is brought to its new state
//! (the backend reads it and changes only what differs); one no longer wanted is removed.
//! A leg needs its network's bridge: the L2 controller is asked to make sure it exists first
//! (a routed network's bridge may not be there yet when the router's change arrives).

use super::l2::L2Controller;
use super::{Controller, Outcome};
use crate::kernel::{Links, Routers};
use crate::l3::{self, RouterNs};
use crate::state::Snapshot;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info};

pub struct L3Controller<B> {
    backend: Arc<B>,
    l2: Arc<L2Controller<B>>,
    /// This node's namespace prefix.
    prefix: String,
    /// Routers as last applied successfully.
    applied: Mutex<BTreeMap<String, RouterNs>>,
    /// The DVR table's script as last applied.
    dvr: Mutex<Option<String>>,
    last_full: Mutex<Option<Instant>>,
    full_resync: Duration,
}

impl<B: Routers + Links> L3Controller<B> {
    pub fn new(backend: Arc<B>, l2: Arc<L2Controller<B>>, node: &str, full_resync: Duration) -> Arc<Self> {
        Arc::new(L3Controller {
            backend,
            l2,
            prefix: l3::netns_prefix(node),
            applied: Mutex::new(BTreeMap::new()),
            dvr: Mutex::new(None),
            last_full: Mutex::new(None),
            full_resync,
        })
    }

    pub async fn pass(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let want = &snap.l3.routers;
        let due = self
            .last_full
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= self.full_resync);
        let have = self
            .backend
            .router_namespaces(&self.prefix)
            .await
            .map_err(|e| format!("listing router namespaces: {e}"))?;
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = Outcome::default();
        for ns in have.iter().filter(|ns| !want.contains_key(*ns)) {
            out.planned += 1;
            match self.backend.remove_router(ns).await {
                Ok(()) => {
                    info!(netns = %ns, "router removed: no local port on its networks");
                    self.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(ns);
                }
                Err(e) => out.failures.push(format!("removing router namespace {ns}: {e}")),
            }
        }
        // The DVR table before new legs: a new leg's first frames (its announcement, its
        // gateway answers) must already be kept off the VXLAN ports. A full resync re-applies
        // what has not changed only after what has, so it never delays a change.
        let script = l3::dvr_script(&snap.l3);
        let same = self.dvr.lock().unwrap_or_else(|p| p.into_inner()).as_deref() == Some(script.as_str());
        if !same {
            self.apply_dvr(script.clone(), &mut out).await;
        }
        let (changed, unchanged): (Vec<_>, Vec<_>) = want
            .iter()
            .partition(|(ns, r)| !have.contains(*ns) || applied.get(*ns) != Some(*r));
        for (ns, r) in changed {
            self.apply_router(ns, r, &mut out).await;
        }
        if due {
            if same {
                self.apply_dvr(script, &mut out).await;
            }
            for (ns, r) in unchanged {
                self.apply_router(ns, r, &mut out).await;
            }
        }
        // Shortcuts after the routers: their legs exist by now.
        let (wired, failed) = self.backend.wire_shortcuts(snap.l3.shortcuts.clone()).await;
        out.planned += wired;
        for (dev, e) in failed {
            out.failures.push(format!("routing shortcut on {dev}: {e}"));
        }
        // Router advertisements on the legs of IPv6 subnets in an RA mode.
        let ads = snap
            .l3
            .routers
            .values()
            .flat_map(|r| {
                r.legs.iter().filter(|(_, l)| !l.ra.is_empty()).filter_map(|(dev, l)| {
                    let mac = l.mac.parse::<crate::desired::MacAddr>().ok()?;
                    let prefixes: Vec<_> = l.ra.iter().cloned().collect();
                    Some(crate::kernel::ra::Advert {
                        netns: r.netns.clone(),
                        dev: dev.clone(),
                        packet: crate::routing::router_advertisement(mac.0, l.mtu, &prefixes),
                    })
                })
            })
            .collect();
        self.backend.advertise(ads);
        if due && out.failures.is_empty() {
            *self.last_full.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        Ok(out)
    }

    async fn apply_dvr(&self, script: String, out: &mut Outcome) {
        out.planned += 1;
        *self.dvr.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match self.backend.apply_dvr(script.clone()).await {
            Ok(()) => *self.dvr.lock().unwrap_or_else(|p| p.into_inner()) = Some(script),
            Err(e) => out.failures.push(format!("DVR table: {e}")),
        }
    }

    async fn apply_router(&self, ns: &String, r: &RouterNs, out: &mut Outcome) {
        out.planned += 1;
        let started = Instant::now();
        for leg in r.legs.values() {
            if let Err(e) = self.l2.ensure_network(leg.vni, leg.mtu).await {
                self.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(ns);
                out.failures
                    .push(format!("router {} ({ns}): its networks' devices: {e}", r.id));
                return;
            }
        }
        match self.backend.apply_router(r).await {
            Ok(()) => {
                debug!(
                    router = %r.id,
                    netns = %ns,
                    legs = r.legs.len(),
                    neighbors = r.neighbors.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "router applied"
                );
                self.applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ns.clone(), r.clone());
            }
            Err(e) => {
                self.applied.lock().unwrap_or_else(|p| p.into_inner()).remove(ns);
                out.failures.push(format!("router {} ({ns}): {e}", r.id));
            }
        }
    }
}

impl<B: Routers + Links + 'static> Controller for L3Controller<B> {
    const NAME: &'static str = "l3";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        self.pass(snap).await
    }
}
