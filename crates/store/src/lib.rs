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
//! - [`etcd::EtcdStore`]: etcd v3 through its JSON gateway, for clusters and several servers.

use async_trait::async_trait;
use std::sync::Arc;
use tokio::sync::mpsc;

pub mod conformance;
pub mod embedded;
pub mod etcd;
pub mod testing;

/// Global store revision; every successful write increments it. 0 means "nothing yet".
pub type Revision = i64;

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
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
        }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every comparison held and the operations were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it failed or wrote nothing).
    pub revision: Revision,
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
