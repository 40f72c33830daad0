//! Revisioned key/value store with compare-and-swap transactions and watches.
//!
//! Everything Isthmus persists goes through [`Store`]. The model mirrors etcd v3 so the two
//! backends behave the same: a single global revision that every successful write bumps, per-key
//! create/mod revisions, transactions guarded by comparisons, and watches that replay history
//! from a revision or say plainly that the history is gone ([`WatchEvent::Compacted`]).
//!
//! Backends:
//! - [`embedded::EmbeddedStore`]: one node, a write-ahead log in a data directory; a write is
//!   acknowledged only after it is on disk.
//! - [`etcd::EtcdStore`]: etcd v3 through its gRPC API, for clusters and several servers.
//!
//! Both also offer leases (keys that vanish when their holder stops renewing them) and keep
//! their history bounded with [`spawn_compactor`].

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod testing;

/// Global store revision; every successful write increments it. 0 means "nothing yet".
pub type Revision = i64;

/// A lease: keys written with it are deleted (in one transaction, which watches see) when it
/// expires or is revoked. Always > 0.
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Number of writes since the key was created (1 after creation).
    pub version: i64,
}

/// A condition a transaction checks before applying its operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists.
    Exists(String),
    /// The key exists and its last write was at exactly this revision.
    ModRevision(String, Revision),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    /// A put that attaches the key to `lease`: the key goes when the lease does. The lease
    /// must be alive, else the transaction is refused ([`StoreError::Invalid`]). A later plain
    /// put detaches the key again.
    PutWithLease {
        key: String,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn put_with_lease(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Self {
        Op::PutWithLease {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::PutWithLease { key, .. } | Op::Delete { key } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResult {
    /// Whether every comparison held and the operations were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it failed or wrote nothing).
    pub revision: Revision,
    /// When it failed: the highest `mod_revision` among the compared keys that exist, read
    /// atomically with the failed comparison (0 if none exists). A watcher that has reached
    /// this revision has seen every compared key that exists as the transaction saw it:
    /// wait for this, not for the store's global revision, which writes elsewhere move.
    pub compared_revision: Revision,
    /// When it failed: the compared keys that did not exist. Their delete revision is not
    /// known, so a watcher that still holds one of them must wait to see its delete.
    pub compared_absent: Vec<String>,
}

impl TxnResult {
    /// A transaction whose comparisons held, at `revision`.
    pub fn applied(revision: Revision) -> Self {
        TxnResult {
            succeeded: true,
            revision,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete: the key with an empty value and `mod_revision` = the delete's revision.
    pub kv: KeyValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// Events of one or more revisions, in revision order. Events of one transaction are never
    /// split across two batches.
    Events(Vec<Event>),
    /// The requested start revision is older than the retained history. The watch ends after
    /// this; the watcher must list again and watch from the list's revision + 1.
    Compacted { compact_revision: Revision },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("store data corrupt: {0}")]
    Corrupt(String),
    #[error("invalid store request: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A watch: events arrive on `rx` until the store side ends it (compaction, shutdown) or the
/// receiver is dropped.
pub struct Watch {
    pub rx: mpsc::Receiver<Result<WatchEvent>>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// One key, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys starting with `prefix`, sorted by key, and the store revision they were read at.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Applies `ops` atomically if every comparison holds. Deleting an absent key is a no-op.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult>;

    /// Events for keys under `prefix` with revision >= `from_revision`. `from_revision` 0 means
    /// "from now on".
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch>;

    /// Current store revision.
    async fn revision(&self) -> Result<Revision>;

    /// Forgets history before `revision` (watches from earlier revisions get `Compacted`).
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// A new lease living `ttl_secs` seconds (>= 1) unless renewed. etcd may round a short TTL
    /// up to its minimum (about 2 s).
    async fn grant_lease(&self, ttl_secs: i64) -> Result<LeaseId>;

    /// Renews the lease for another TTL; `false` if it has already expired or was revoked
    /// (its keys are gone or going).
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool>;

    /// Ends the lease now, deleting its keys in one transaction. Revoking an unknown or
    /// expired lease is not an error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Convenience: unconditional put.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        Ok(self.txn(vec![], vec![Op::put(key, value)]).await?.revision)
    }

    /// Convenience: unconditional delete.
    async fn delete(&self, key: &str) -> Result<Revision> {
        Ok(self.txn(vec![], vec![Op::delete(key)]).await?.revision)
    }
}

pub type DynStore = Arc<dyn Store>;

/// How [`spawn_compactor`] keeps history bounded.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Revisions of history kept behind the current one.
    pub window: Revision,
    /// How often to look.
    pub interval: Duration,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            window: 10_000,
            interval: Duration::from_secs(60),
        }
    }
}

/// Compacts `store` every `policy.interval` to `revision - policy.window` once the history
/// is longer than that, logging what it did at info. A watch (such as the server cache's)
/// that falls behind gets [`WatchEvent::Compacted`] and relists. Stops when the store is
/// dropped elsewhere (it holds only a weak reference between rounds).
pub fn spawn_compactor(store: &DynStore, policy: CompactionPolicy) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(store);
    let window = policy.window.max(1);
    let interval = policy.interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut compacted: Revision = 0;
        loop {
            tokio::time::sleep(interval).await;
            let Some(store) = weak.upgrade() else { return };
            let current = match store.revision().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "compaction: cannot read the store revision");
                    continue;
                }
            };
            let target = current - window;
            if target <= compacted || target <= 0 {
                continue;
            }
            match store.compact(target).await {
                Ok(()) => {
                    tracing::info!(
                        revision = target,
                        current,
                        window,
                        dropped = target - compacted.max(1),
                        "store history compacted"
                    );
                    compacted = target;
                }
                Err(e) => tracing::warn!(revision = target, error = %e, "store compaction failed"),
            }
        }
    })
}
