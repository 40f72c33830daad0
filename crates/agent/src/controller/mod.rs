//! The agent as a set of controllers over the shared view. Each owns one domain of the node's
//! datapath (L2, port devices, DHCP, the firewall; L3 and NAT are empty slots for now) with its
//! own desired state, plan and apply through its own narrow backend trait.
//!
//! [`run`] drives one controller: it reconciles when the view changes (a lone change at once,
//! a burst at most once per debounce window), periodically (drift repair), and after a failure with a growing
//! back-off. Never two passes of one controller at once; each pass runs in a tracing span
//! naming the controller and the revision. What each controller last converged to, and what
//! failed, is kept in [`Health`] for the heartbeat.

pub mod dhcp;
pub mod firewall;
pub mod l2;
pub mod l3;
pub mod ports;
pub mod qos;

use crate::metrics::AgentMetrics;
use crate::state::{NodeState, Snapshot};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, warn, Instrument};

/// What one pass of a controller did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Changes the plan contained.
    pub planned: usize,
    /// Changes that failed, in words (what and why).
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn from_report(r: &crate::reconcile::Report) -> Self {
        Outcome {
            planned: r.planned,
            failures: r
                .failed
                .iter()
                .map(|f| format!("{:?}: {}", f.action, f.error))
                .collect(),
        }
    }
}

pub trait Controller: Send + Sync + 'static {
    /// Short name for logs, spans and the heartbeat.
    const NAME: &'static str;

    /// Brings this controller's domain to what `snap` asks for. Errs when the domain cannot
    /// even be read (the pass is retried with back-off).
    fn reconcile(&self, snap: &Snapshot) -> impl Future<Output = Result<Outcome, String>> + Send;
}

/// How a controller is driven.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// At most one pass per this window while view changes keep coming; a lone change after
    /// a quiet spell is reconciled at once.
    pub debounce: Duration,
    /// A full pass this often even without changes (drift repair).
    pub resync: Duration,
    pub backoff_first: Duration,
    pub backoff_max: Duration,
}

impl Schedule {
    pub fn new(resync: Duration) -> Self {
        Schedule {
            debounce: Duration::from_millis(50),
            resync,
            backoff_first: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// Bounded exponential backoff.
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Per controller: the last revision it fully converged to and its open failures.
#[derive(Default)]
pub struct Health {
    inner: Mutex<BTreeMap<&'static str, ControllerHealth>>,
}

/// (last revision fully converged to, open failures)
type ControllerHealth = (Option<i64>, Vec<String>);

/// At most this many failures travel in a heartbeat, each cut to this many characters.
const MAX_REPORTED: usize = 20;
const MAX_FAILURE_LEN: usize = 300;

impl Health {
    pub fn record(&self, controller: &'static str, revision: i64, failures: Vec<String>) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(controller).or_default();
        if failures.is_empty() {
            e.0 = Some(revision);
        }
        e.1 = failures;
    }

    /// Registers a controller that has not run yet (so it holds the converged revision back).
    pub fn register(&self, controller: &'static str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(controller)
            .or_default();
    }

    /// The revision every controller has converged to (`None` while one never has), and the
    /// open failures, `controller: what`, bounded.
    pub fn summary(&self) -> (Option<i64>, Vec<String>) {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let converged = m.values().map(|(r, _)| *r).min().flatten();
        let failures = m
            .iter()
            .flat_map(|(c, (_, f))| f.iter().map(move |f| format!("{c}: {f}")))
            .map(|mut f| {
                if f.len() > MAX_FAILURE_LEN {
                    let mut cut = MAX_FAILURE_LEN;
                    while !f.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    f.truncate(cut);
                }
                f
            })
            .take(MAX_REPORTED)
            .collect();
        (converged, failures)
    }
}

/// Drives `c` until the task is dropped. Nothing is reconciled before the first snapshot.
pub async fn run<C: Controller>(
    c: Arc<C>,
    state: Arc<NodeState>,
    health: Arc<Health>,
    metrics: Arc<AgentMetrics>,
    schedule: Schedule,
) {
    health.register(C::NAME);
    let mut changes = state.subscribe();
    let mut backoff = Backoff::new(schedule.backoff_first, schedule.backoff_max);
    let mut retry_in: Option<Duration> = None;
    let mut reason = "start";
    let mut last_pass: Option<std::time::Instant> = None;
    loop {
        if let Some(snap) = state.snapshot() {
            let span = tracing::info_span!("reconcile", controller = C::NAME, revision = snap.revision, reason);
            let started = std::time::Instant::now();
            last_pass = Some(started);
            let res = c.reconcile(&snap).instrument(span.clone()).await;
            let _e = span.enter();
            let (planned, failed) = match &res {
                Ok(o) => (o.planned, !o.failures.is_empty()),
                Err(_) => (0, true),
            };
            metrics.pass(C::NAME, started.elapsed().as_secs_f64(), planned, failed);
            match res {
                Ok(o) if o.failures.is_empty() => {
                    if o.planned > 0 {
                        debug!(
                            planned = o.planned,
                            ms = started.elapsed().as_millis() as u64,
                            "converged"
                        );
                    }
                    backoff.reset();
                    retry_in = None;
                    health.record(C::NAME, snap.revision, vec![]);
                }
                Ok(o) => {
                    let wait = backoff.next_wait();
                    warn!(failed = o.failures.len(), retry_in = ?wait, first = %o.failures[0], "pass had failures");
                    retry_in = Some(wait);
                    health.record(C::NAME, snap.revision, o.failures);
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    warn!(error = %e, retry_in = ?wait, "pass failed");
                    retry_in = Some(wait);
                    health.record(C::NAME, snap.revision, vec![e]);
                }
            }
        }
        let wait = retry_in.map_or(schedule.resync, |r| r.min(schedule.resync));
        reason = tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                let wait = burst_wait(last_pass.map(|t| t.elapsed()), schedule.debounce);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                changes.borrow_and_update();
                "view changed"
            }
            _ = tokio::time::sleep(wait) => if retry_in.is_some() { "retry" } else { "resync" },
        };
    }
}

/// How long to hold a view change before reconciling: nothing for a lone change after a quiet
/// spell (it goes out at once), else the rest of the debounce window since the last pass, so a
/// burst of updates costs at most one pass per window.
fn burst_wait(since_last_pass: Option<Duration>, debounce: Duration) -> Duration {
    since_last_pass.map_or(Duration::ZERO, |d| debounce.saturating_sub(d))
}

/// One async lock per key (a device, a network): work on one key waits only for other work on
/// that key. Entries nobody holds are dropped as the map grows.
pub struct KeyLocks<K> {
    map: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyLocks<K> {
    pub async fn lock(&self, key: &K) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, m| Arc::strong_count(m) > 1);
            }
            map.entry(key.clone()).or_default().clone()
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_change_goes_out_at_once_and_a_burst_waits_out_the_window() {
        let d = Duration::from_millis(50);
        assert_eq!(burst_wait(None, d), Duration::ZERO);
        assert_eq!(burst_wait(Some(Duration::from_secs(3)), d), Duration::ZERO);
        assert_eq!(burst_wait(Some(Duration::from_millis(50)), d), Duration::ZERO);
        assert_eq!(
            burst_wait(Some(Duration::from_millis(10)), d),
            Duration::from_millis(40)
        );
        assert_eq!(burst_wait(Some(Duration::ZERO), d), d);
    }

    #[test]
    fn backoff_doubles_up_to_the_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<_> = (0..5).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_wait().as_millis(), 100);
    }

    #[test]
    fn health_reports_the_lowest_converged_revision_and_failures() {
        let h = Health::default();
        h.register("l2");
        h.register("ports");
        assert_eq!(h.summary(), (None, vec![]));
        h.record("l2", 7, vec![]);
        assert_eq!(h.summary().0, None, "ports never converged");
        h.record("ports", 5, vec![]);
        assert_eq!(h.summary().0, Some(5));
        h.record("ports", 9, vec!["CreateTap: no bridge".into()]);
        let (rev, failures) = h.summary();
        assert_eq!(rev, Some(5));
        assert_eq!(failures, vec!["ports: CreateTap: no bridge".to_string()]);
        h.record("l2", 9, vec!["x".repeat(1000)]);
        assert!(h.summary().1.iter().all(|f| f.len() <= MAX_FAILURE_LEN));
    }

    #[tokio::test]
    async fn key_locks_serialise_one_key_only() {
        let locks: KeyLocks<String> = KeyLocks::default();
        let a = locks.lock(&"a".to_string()).await;
        // Another key is free.
        let _b = locks.lock(&"b".to_string()).await;
        // The same key waits.
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock(&"a".to_string())).await;
        assert!(again.is_err());
        drop(a);
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock(&"a".to_string())).await;
        assert!(again.is_ok());
    }
}
