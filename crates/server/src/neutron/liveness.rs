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
use isthmus_store::{DynStore, LeaseId, Op};
use std::collections::HashMap;
use std::sync::Mutex;

/// How often a living node's record is rewritten just to keep its "last seen" time.
pub const PERSIST_EVERY: i64 = 1800;

/// The key that exists while `host`'s lease lives.
pub fn key(host: &str) -> String {
    keys::resource("liveness", host)
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

    /// Notes a heartbeat and keeps the node's lease (and its key) alive: renews the lease this
    /// server holds, or grants a new one and writes the key under it. Returns whether a store
    /// write was made.
    pub async fn beat(
        &self,
        store: &DynStore,
        cache: &crate::cache::Cache,
        host: &str,
        now: i64,
        converged_revision: Option<i64>,
        ttl_secs: i64,
    ) -> isthmus_store::Result<bool> {
        let lease = {
            let mut m = self.lock();
            let s = m.entry(host.to_string()).or_default();
            s.unix = now;
            s.converged_revision = converged_revision;
            s.lease
        };
        if let Some(id) = lease {
            if cache.contains(&key(host)) && store.keep_alive(id).await? {
                return Ok(false);
            }
        }
        let id = store.grant_lease(ttl_secs).await?;
        let value = serde_json::to_vec(&serde_json::json!({"host": host, "lease": id})).unwrap_or_default();
        let res = store
            .txn(
                vec![],
                vec![Op::PutWithLease {
                    key: key(host),
                    value,
                    lease: id,
                }],
            )
            .await?;
        // So the answer to this heartbeat already shows the node alive.
        if let Err(e) = cache.wait_for(res.revision).await {
            tracing::warn!(host, error = %e, "liveness key not yet in the cache");
        }
        let old = self.lock().get_mut(host).and_then(|s| s.lease.replace(id));
        if let Some(old) = old {
            if old != id {
                // Superseded: let it go now rather than at its expiry.
                let _ = store.revoke_lease(old).await;
            }
        }
        tracing::debug!(host, lease = id, "node liveness lease granted");
        Ok(true)
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
