//! Whether each node is alive, kept off the store's write path.
//!
//! A heartbeat used to rewrite the node's record: with 1,000 nodes that is a replicated write
//! every few milliseconds, each one examined by every node-stream follower. Now a node's
//! liveness is a store lease: the first heartbeat this server takes from a node grants a lease
//! (TTL: the agent-down time) and writes one small key under it; later heartbeats only renew
//! the lease (on etcd a keep-alive, on the embedded store a timer in memory), which is no
//! write at all. When a node stops, its lease runs out and the store deletes the key: every
//! server sees the node dead. The record itself is written only when what it says changes
//! (address, capabilities, a restart, failures) or, as a "last seen" that outlives a server
//! restart, every [`PERSIST_EVERY`] seconds; what the last heartbeats said in between (time,
//! converged revision) is held in memory here and shown by this server.
//!
//! The embedded store keeps leases in memory: after a server restart every node shows dead
//! until its next heartbeat (a few seconds).

use isthmus_model::{keys, Node};
use isthmus_store::{Compare, DynStore, LeaseId, Op};
use std::collections::HashMap;
use std::sync::Mutex;

/// How often a living node's record is rewritten just to keep its "last seen" time.
pub const PERSIST_EVERY: i64 = 1800;

/// The key that exists while `host`'s lease lives.
pub fn key(host: &str) -> String {
    keys::resource("liveness", host)
}

/// The claim on an underlay address (canonical text): its value is the host holding it,
/// written under that host's lease, so it exists exactly while that node is alive.
pub fn underlay_key(ip: &str) -> String {
    keys::resource("underlay", ip)
}

/// How often a heartbeat re-plans its claim after losing a race.
const CLAIM_ATTEMPTS: usize = 5;

/// The host holding claim `key`, and the claim's revision.
fn holder(cache: &crate::cache::Cache, key: &str) -> Option<(String, isthmus_store::Revision)> {
    let kv = cache.get(key)?;
    Some((String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision))
}

/// What a heartbeat did to the node's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    /// The lease this server holds was renewed; no write.
    Renewed,
    /// A new lease, with the liveness key and the underlay claim written under it.
    Granted,
    /// Another living node holds the underlay address; nothing was written.
    Taken { holder: String },
}

#[derive(Debug, Clone, Default)]
struct Seen {
    unix: i64,
    converged_revision: Option<i64>,
    lease: Option<LeaseId>,
}

#[derive(Default)]
pub struct Liveness {
    seen: Mutex<HashMap<String, Seen>>,
}

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a heartbeat must rewrite the node's record: what it says changed, or the
    /// persisted "last seen" is old.
    pub fn must_persist(stored: Option<&Node>, fresh: &Node, restarted: bool, now: i64) -> bool {
        let Some(s) = stored else { return true };
        restarted
            || s.underlay_ip != fresh.underlay_ip
            || s.capabilities != fresh.capabilities
            || s.failures != fresh.failures
            || now - s.heartbeat_unix >= PERSIST_EVERY
    }

    /// Notes a heartbeat and keeps the node's lease (and its keys) alive: renews the lease
    /// this server holds, or grants a new one and writes the liveness key and the underlay
    /// claim [`underlay_key`] under it. The claim is created only where no other node holds
    /// it (compared in the same transaction); a claim lives while its node's lease does, so a
    /// dead node's address is free again. `previous` is the address the node's record held,
    /// whose claim is dropped when the node moves. Returns what happened; nothing is written
    /// when the address is taken.
    #[allow(clippy::too_many_arguments)]
    pub async fn beat(
        &self,
        store: &DynStore,
        cache: &crate::cache::Cache,
        host: &str,
        underlay: &str,
        previous: Option<&str>,
        now: i64,
        converged_revision: Option<i64>,
        ttl_secs: i64,
    ) -> isthmus_store::Result<Beat> {
        let claim = underlay_key(underlay);
        let mut held = holder(cache, &claim);
        if let Some((h, _)) = held.as_ref().filter(|(h, _)| h != host) {
            // Refused: not even noted as a heartbeat.
            return Ok(Beat::Taken { holder: h.clone() });
        }
        let lease = {
            let mut m = self.lock();
            let s = m.entry(host.to_string()).or_default();
            s.unix = now;
            s.converged_revision = converged_revision;
            s.lease
        };
        if let Some(id) = lease {
            let ours = held.as_ref().is_some_and(|(h, _)| h == host);
            if ours && cache.contains(&key(host)) && store.keep_alive(id).await? {
                return Ok(Beat::Renewed);
            }
        }
        let mut id = None;
        for _ in 0..CLAIM_ATTEMPTS {
            let claim_cmp = match &held {
                Some((h, _)) if h != host => {
                    if let Some(id) = id {
                        let _ = store.revoke_lease(id).await;
                    }
                    return Ok(Beat::Taken { holder: h.clone() });
                }
                Some((_, rev)) => Compare::ModRevision(claim.clone(), *rev),
                None => Compare::Absent(claim.clone()),
            };
            let lease_id = match id {
                Some(l) => l,
                None => *id.insert(store.grant_lease(ttl_secs).await?),
            };
            let value = serde_json::to_vec(&serde_json::json!({"host": host, "lease": lease_id})).unwrap_or_default();
            let mut compares = vec![claim_cmp];
            let mut ops = vec![
                Op::put_with_lease(key(host), value, lease_id),
                Op::put_with_lease(claim.clone(), host.as_bytes().to_vec(), lease_id),
            ];
            // The address it leaves: its claim goes now, not when the old lease ends.
            if let Some(old) = previous.filter(|p| *p != underlay) {
                let old_claim = underlay_key(old);
                if let Some((_, rev)) = holder(cache, &old_claim).filter(|(h, _)| h == host) {
                    compares.push(Compare::ModRevision(old_claim.clone(), rev));
                    ops.push(Op::delete(old_claim));
                }
            }
            let res = store.txn(compares, ops).await?;
            if !res.succeeded {
                // Another writer won: look again at what the store holds.
                if let Err(e) = cache.wait_for_conflict(&res).await {
                    tracing::warn!(host, error = %e, "cache behind after a lost underlay claim");
                }
                held = holder(cache, &claim);
                continue;
            }
            // So the answer to this heartbeat already shows the node alive.
            if let Err(e) = cache.wait_for(res.revision).await {
                tracing::warn!(host, error = %e, "liveness key not yet in the cache");
            }
            let old = self.lock().get_mut(host).and_then(|s| s.lease.replace(lease_id));
            if let Some(old) = old {
                if old != lease_id {
                    // Superseded: let it go now rather than at its expiry.
                    let _ = store.revoke_lease(old).await;
                }
            }
            tracing::debug!(host, lease = lease_id, underlay, "node liveness lease granted");
            return Ok(Beat::Granted);
        }
        if let Some(id) = id {
            let _ = store.revoke_lease(id).await;
        }
        Err(isthmus_store::StoreError::Unavailable(format!(
            "the claim on underlay address {underlay} kept changing"
        )))
    }

    /// Forgets a node (deleted): ends its lease, so its key goes too.
    pub async fn forget(&self, store: &DynStore, host: &str) {
        let lease = self.lock().remove(host).and_then(|s| s.lease);
        if let Some(id) = lease {
            if let Err(e) = store.revoke_lease(id).await {
                tracing::warn!(host, error = %e, "could not revoke a deleted node's lease");
            }
        }
    }

    /// The node as this server knows it: the stored record with the newest heartbeat time
    /// and converged revision this server has seen.
    pub fn overlay(&self, mut n: Node) -> Node {
        if let Some(s) = self.lock().get(&n.host) {
            // The newest heartbeat's word, "not converged" (None) included.
            if s.unix >= n.heartbeat_unix {
                n.heartbeat_unix = s.unix;
                n.converged_revision = s.converged_revision;
            }
        }
        n
    }
}

/// The agents-API view of `n`: alive while its liveness key exists (its lease lives).
pub fn to_api(cache: &crate::cache::Cache, live: &Liveness, n: Node, now: i64, down: i64) -> serde_json::Value {
    let alive = cache.contains(&key(&n.host));
    let mut v = live.overlay(n).to_api(now, down);
    v["alive"] = serde_json::Value::Bool(alive);
    v
}
