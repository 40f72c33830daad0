//! A watch-fed, in-memory copy of everything under the Isthmus key root.
//!
//! Reads are served from here; writes go to the store and then wait until the cache has seen
//! their revision, so a client reads its own writes from the server it wrote through.

use isthmus_store::{DynStore, EventKind, KeyValue, Revision, WatchEvent};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

pub struct Cache {
    inner: RwLock<BTreeMap<String, Arc<KeyValue>>>,
    revision: watch::Sender<Revision>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache did not reach revision {0} in time")]
    Timeout(Revision),
}

impl Cache {
    /// Lists the store and keeps following it in a background task.
    pub async fn start(store: DynStore) -> isthmus_store::Result<Arc<Self>> {
        let (kvs, rev) = store.list(isthmus_model::keys::ROOT).await?;
        let cache = Arc::new(Self {
            inner: RwLock::new(kvs.into_iter().map(|kv| (kv.key.clone(), Arc::new(kv))).collect()),
            revision: watch::channel(rev).0,
        });
        let c = cache.clone();
        tokio::spawn(async move { c.follow(store).await });
        Ok(cache)
    }

    async fn follow(self: Arc<Self>, store: DynStore) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let from = *self.revision.borrow() + 1;
            let mut w = match store.watch(isthmus_model::keys::ROOT, from).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cache watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            while let Some(ev) = w.rx.recv().await {
                match ev {
                    Ok(WatchEvent::Events(events)) => self.apply(events),
                    Ok(WatchEvent::Compacted { compact_revision }) => {
                        tracing::warn!(compact_revision, "cache fell behind compaction; relisting");
                        if let Err(e) = self.relist(&store).await {
                            tracing::warn!(error = %e, "cache relist failed");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache watch error; resuming");
                        break;
                    }
                }
            }
        }
    }

    async fn relist(&self, store: &DynStore) -> isthmus_store::Result<()> {
        let (kvs, rev) = store.list(isthmus_model::keys::ROOT).await?;
        {
            let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
            *m = kvs.into_iter().map(|kv| (kv.key.clone(), Arc::new(kv))).collect();
        }
        self.revision.send_replace(rev);
        Ok(())
    }

    fn apply(&self, events: Vec<isthmus_store::Event>) {
        let mut max = *self.revision.borrow();
        {
            let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                max = max.max(ev.kv.mod_revision);
                match ev.kind {
                    EventKind::Put => {
                        m.insert(ev.kv.key.clone(), Arc::new(ev.kv));
                    }
                    EventKind::Delete => {
                        m.remove(&ev.kv.key);
                    }
                }
            }
        }
        self.revision.send_replace(max);
    }

    /// Notified whenever the cache moves to a new revision.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache reflects `rev` (bounded, so a stuck watch shows up as an error).
    pub async fn wait_for(&self, rev: Revision) -> Result<(), CacheError> {
        let mut rx = self.revision.subscribe();
        let reached = async move { rx.wait_for(|r| *r >= rev).await.is_ok() };
        match tokio::time::timeout(Duration::from_secs(10), reached).await {
            Ok(true) => Ok(()),
            _ => Err(CacheError::Timeout(rev)),
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<KeyValue>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Everything under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Vec<Arc<KeyValue>> {
        let m = self.inner.read().unwrap_or_else(|p| p.into_inner());
        m.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).contains_key(key)
    }

    /// Decodes a JSON value stored at `key`.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<(T, Revision)> {
        let kv = self.get(key)?;
        match serde_json::from_slice(&kv.value) {
            Ok(v) => Some((v, kv.mod_revision)),
            Err(e) => {
                tracing::error!(key, error = %e, "undecodable value in store; ignoring it");
                None
            }
        }
    }

    /// Decodes every JSON value under `prefix`, skipping (and logging) undecodable ones.
    pub fn list_json<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Vec<(T, Revision)> {
        self.list(prefix)
            .iter()
            .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                Ok(v) => Some((v, kv.mod_revision)),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "undecodable value in store; ignoring it");
                    None
                }
            })
            .collect()
    }
}
